"""Drive a user's LightningModule without a Trainer.

The run loop calls the module's own ``training_step``, ``validation_step`` and
``configure_optimizers``. ``self.log`` outside a Trainer only warns and returns, so each
module gets an instance-level ``log``/``log_dict`` that records values into a dict: the
user's module works unchanged and we see exactly the names it logs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch

_LOGGED = "_syncbench_logged"


class _LogCapture:
    """Stands in for ``module.log``/``module.log_dict``: records into ``module._syncbench_logged``.

    A plain object holding its module, so ``copy.deepcopy`` and ``pickle`` carry it over
    to the copy (a closure would keep writing into the original's dict)."""

    def __init__(self, module: pl.LightningModule, many: bool = False):
        self.module, self.many = module, many

    def __call__(self, name: Any, value: Any = None, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        items = name.items() if self.many else [(name, value)]
        logged = getattr(self.module, _LOGGED)
        for key, val in items:
            if isinstance(val, torch.Tensor):
                val = val.detach()
                val = val.float().mean().item() if val.numel() != 1 else val.item()
            logged[key] = (float(val), batch_size)


def capture_logs(module: pl.LightningModule) -> None:
    """Make ``module.log``/``module.log_dict`` record into ``module._syncbench_logged``."""
    setattr(module, _LOGGED, {})
    module.log = _LogCapture(module)  # type: ignore[method-assign]
    module.log_dict = _LogCapture(module, many=True)  # type: ignore[method-assign]


def take_logged(module: pl.LightningModule) -> dict[str, tuple[float, int | None]]:
    logged = getattr(module, _LOGGED, None)
    assert logged is not None, "capture_logs(module) was not called"
    setattr(module, _LOGGED, {})
    return logged


def training_loss(module: pl.LightningModule, batch: Any, batch_idx: int) -> torch.Tensor:
    """The loss tensor of the module's own ``training_step``."""
    out = module.training_step(batch, batch_idx)
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"{type(module).__name__}.training_step must return a loss tensor or a dict with 'loss' "
            f"(got {type(out).__name__})"
        )
    return out


def build_optimizer(module: pl.LightningModule) -> torch.optim.Optimizer:
    """The (single) optimizer of ``configure_optimizers``, in any of Lightning's return forms."""
    conf = module.configure_optimizers()
    if isinstance(conf, dict):
        conf = conf["optimizer"]
    if isinstance(conf, (list, tuple)):
        if not conf:
            raise ValueError(f"{type(module).__name__}.configure_optimizers returned no optimizer")
        first = conf[0]
        if isinstance(first, (list, tuple)):
            first = first[0]
        if isinstance(first, dict):
            first = first["optimizer"]
        conf = first
    if not isinstance(conf, torch.optim.Optimizer):
        raise ValueError(
            f"{type(module).__name__}.configure_optimizers must return an optimizer (got {type(conf).__name__})"
        )
    return conf


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size_of(next(iter(batch.values())))
    return 1


@torch.no_grad()
def evaluate(module: pl.LightningModule, batches: Sequence[Any]) -> dict[str, float]:
    """Run ``validation_step`` over all batches; metrics are batch-size-weighted means,
    as Lightning's ``on_epoch`` reduction computes them."""
    was_training = module.training
    module.eval()
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    try:
        take_logged(module)
        for idx, batch in enumerate(batches):
            module.validation_step(batch, idx)
            default_size = batch_size_of(batch)
            for name, (value, size) in take_logged(module).items():
                w = float(size or default_size)
                sums[name] = sums.get(name, 0.0) + value * w
                weights[name] = weights.get(name, 0.0) + w
    finally:
        module.train(was_training)
    return {name: sums[name] / weights[name] for name in sums}


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def materialize(loader: Iterable[Any]) -> list[Any]:
    """Collate a dataloader once, so repeated evaluations skip its overhead."""
    return list(loader)
