"""The configured strategy, built for the cluster, and the learning-rate scaling it asks for
(``strategy.lr_scaling``): what both backends do before their workers start."""

from __future__ import annotations

import math
from typing import Any

from syncbench.experiments.config import RunConfig
from syncbench.strategies import STRATEGIES
from syncbench.strategies.lightning_bridge import ModuleOptimizer
from syncbench.strategies.program import Strategy


def build_strategy(config: RunConfig) -> Any:
    """The configured strategy (registry entry with its options) for this cluster."""
    cls = STRATEGIES[config.strategy.name]
    return cls(config.strategy.options(), config.cluster.workers, config.batch_size)


def lr_factor(strategy: Strategy, scaling: str) -> float:
    """``strategy.lr_scaling``: none | linear | sqrt of the effective batch ratio."""
    ratio = strategy.lr_batch_factor()
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[scaling]


def scale_lr_(optimizer: Any, factor: float) -> None:
    if factor == 1.0:
        return
    if isinstance(optimizer, ModuleOptimizer):  # its schedulers' base lrs too
        optimizer.scale_lr(factor)
        return
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
