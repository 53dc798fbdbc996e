"""Every strategy's options model, and the checks a config gets from them, without torch.

A run config's ``strategy:`` and ``checkpointing:`` sections are composed from these models
(``syncbench.experiments.config``). They live here, apart from the strategy files that hold
the torch math, so that a config is validated -- and a mistake answered -- before torch,
Lightning or MLflow is imported (CLI start-up time: importing torch alone takes seconds).
Each strategy file imports its options from here (``syncbench.strategies.sync.SyncOptions``
and the like still name them), and the registry maps names to these models without
importing the strategy files. Nothing here may import torch. (A strategy added later keeps its
options model in its own file and its options in a section of their own, ``strategy.<name>``:
docs/adding-a-strategy.md.)

Each options model also says what its strategy *is* (``Options.traits``, a ``Traits``): facts
the contract tests, ``syncbench calibrate`` and the report read by name instead of comparing
strategy names, here so that the report reads them without torch too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class ConfigError(ValueError):
    """Bad user input (config, spec, override, store): the CLI exits with code 2."""


@dataclass(frozen=True)
class Traits:
    """What a strategy is, declared once on its options model (``traits = Traits(...)``) and
    read by name: the contract tests decide with it which invariants apply, the report draws
    with it, ``syncbench calibrate`` and the backends ask it. No field names a strategy."""

    equals_sgd_at_one_worker: bool = True
    """With one worker and its default options the global model follows plain SGD step for step
    (the contract tests check it against a plain PyTorch loop). False needs the reason,
    ``not_sgd_at_one_worker_because``."""
    not_sgd_at_one_worker_because: str | None = None
    keeps_replicas_identical: bool = False
    """After every step every worker's replica holds the same parameters (sync)."""
    has_parameter_server: bool = False
    """Its programs ``PushPull`` to a parameter server (``Strategy.server``): the backends
    start one, and the report plots the staleness the server records."""
    display_color: str | None = None
    """Its colour in the report's figures (a matplotlib colour); None: one from a spare palette."""
    display_order: int = 100
    """Its place in the report's tables and legends (lower first; ties by name)."""

    def __post_init__(self) -> None:
        if not self.equals_sgd_at_one_worker and not self.not_sgd_at_one_worker_because:
            raise ValueError("Traits(equals_sgd_at_one_worker=False) needs not_sgd_at_one_worker_because: the reason")


class Options(BaseModel):
    """Base of every strategy's options: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    traits: ClassVar[Traits] = Traits()  # what the strategy is: each strategy's options model sets its own

    def unsupported(self, backend: str, world: int) -> str | None:
        """Why ``backend`` with ``world`` workers cannot run these options (the config is
        refused before anything runs), or None. ``Strategy.unsupported`` asks this; it runs
        at config validation, so it must not need torch."""
        return None


# ------------------------------------------------------------------------------------------
# compression (sync, local_sgd): strategies/compression.py
# ------------------------------------------------------------------------------------------
CodecName = Literal["none", "fp16", "bf16", "int8", "topk", "powersgd"]


class CompressionOptions(Options):
    """The compression options ``sync`` and ``local_sgd`` share (one definition: the flat
    ``strategy:`` section accepts a key defined by two strategies only if it is identical)."""

    compression: CodecName = Field(default="none", description="sync, local_sgd: what the averaging puts on the "
                                   "wire: none | fp16 | bf16 (cast all-reduce) | int8 (per-tensor quantised, "
                                   "all-gathered) | topk (error feedback) | powersgd (Vogels et al. 2019); "
                                   "local_sgd compresses the pseudo-gradient (state − last synchronised state); "
                                   "docs/strategies.md")
    topk_ratio: float = Field(default=0.01, gt=0, le=1, description="compression=topk: fraction of the "
                              "gradient's entries sent per exchange (k = ceil(ratio × n))")
    powersgd_rank: int = Field(default=1, ge=1, description="compression=powersgd: rank r of the approximation")


# ------------------------------------------------------------------------------------------
# sync: strategies/sync.py
# ------------------------------------------------------------------------------------------
class SyncOptions(CompressionOptions):
    traits = Traits(keeps_replicas_identical=True, display_color="#1f77b4", display_order=0)

    backup_workers: int = Field(default=0, ge=0, description="sync: each update uses the first N-k gradients "
                                "to arrive and drops the rest (Chen et al. 2016); must be < cluster.workers; "
                                "sim backend only")

    def unsupported(self, backend: str, world: int) -> str | None:
        if self.backup_workers >= world:
            return (f"strategy.backup_workers ({self.backup_workers}) must be smaller than "
                    f"cluster.workers ({world})")
        if self.backup_workers > 0 and self.compression != "none":
            return ("strategy.compression: a compressed exchange needs every worker (its codec state "
                    "advances at every exchange); set strategy.backup_workers=0 or strategy.compression=none")
        if backend == "dist" and self.backup_workers > 0:
            return ("strategy.backup_workers: backup workers are not supported by cluster.backend=dist "
                    "(dropping the slowest gradients needs a non-blocking reduction that a gloo/NCCL "
                    "all-reduce is not); use cluster.backend=sim or set strategy.backup_workers=0")
        return None


# ------------------------------------------------------------------------------------------
# local_sgd (and DiLoCo): strategies/local_sgd.py
# ------------------------------------------------------------------------------------------
class OuterConfig(Options):
    """DiLoCo outer optimizer (Douillard et al. 2023): SGD on the pseudo-gradient."""

    lr: float = Field(gt=0, description="Outer learning rate applied to the pseudo-gradient")
    momentum: float = Field(default=0.0, ge=0, lt=1, description="Outer SGD momentum")
    nesterov: bool = Field(default=False, description="Nesterov momentum for the outer step (DiLoCo uses it)")


class LocalSGDOptions(CompressionOptions):
    traits = Traits(display_color="#2ca02c", display_order=1)

    local_steps: int = Field(default=8, ge=1, description="local_sgd, streaming_diloco, async_local_sgd: H local "
                             "optimizer steps per worker between averages (between pushes, async_local_sgd)")
    warmup_sync_updates: int = Field(default=0, ge=0, description="local_sgd: run this many synchronous "
                                     "updates first, then local SGD (post-local SGD, Lin et al. 2020); with outer, "
                                     "the outer model follows the synchronised one through the warm-up")
    outer: OuterConfig | None = Field(default=None, description="local_sgd, streaming_diloco: an outer SGD on the "
                                      "pseudo-gradient θ_global − mean(θ_i) (DiLoCo); async_local_sgd: the server's "
                                      "outer SGD on each pushed pseudo-gradient; null = plain averaging (async_local_sgd: "
                                      "lr 1, no momentum)")


_SHARED = LocalSGDOptions.model_fields  # H and the outer optimizer mean what they mean for DiLoCo


# ------------------------------------------------------------------------------------------
# async: strategies/async_ps.py
# ------------------------------------------------------------------------------------------
class AsyncOptions(Options):
    traits = Traits(has_parameter_server=True, display_color="#d62728", display_order=2)

    max_staleness: int | None = Field(default=None, ge=0, description="async: bound on a gradient's staleness "
                                      "(server version at apply − version it was computed on): a staler push is "
                                      "refused and the worker recomputes on fresh parameters (bounded delay, Li et "
                                      "al. 2014); null = unbounded")
    staleness_lr: Literal["none", "inverse"] = Field(default="none", description="async: none, or inverse = "
                                                     "scale each gradient's lr by 1 / (1 + staleness)")


# ------------------------------------------------------------------------------------------
# streaming_diloco: strategies/streaming_diloco.py
# ------------------------------------------------------------------------------------------
class StreamingDiLoCoOptions(Options):
    traits = Traits(display_color="#9467bd", display_order=4)

    local_steps: int = _SHARED["local_steps"]
    outer: OuterConfig | None = _SHARED["outer"]
    fragments: int = Field(default=2, ge=1, description="streaming_diloco: P fragments of the parameters "
                           "(equal slices of the flat parameter vector, within 10% of 1/P; cut at layer boundaries where those "
                           "balance), each synchronised every "
                           "local_steps steps, staggered local_steps / P steps apart; local_steps must be a multiple")
    overlap_steps: int = Field(default=0, ge=0, description="streaming_diloco: tau, inner steps a fragment's "
                               "reduction overlaps: it starts, the worker computes tau more steps, then the average "
                               "is applied; must be smaller than local_steps / fragments (the paper uses 1-5)")
    mixing_alpha: float = Field(default=1.0, gt=0, le=1, description="streaming_diloco: theta_local <- alpha * "
                                "theta_outer + (1 - alpha) * theta_local for the arriving fragment; 1 = take the "
                                "outer result, as DiLoCo (the paper's alpha is 1 - this; it uses 0.5)")

    def unsupported(self, backend: str, world: int) -> str | None:
        h, p, tau = self.local_steps, self.fragments, self.overlap_steps
        if h % p:
            return (f"strategy.fragments ({p}) must divide strategy.local_steps ({h}): the fragments are "
                    "synchronised local_steps / fragments steps apart")
        if tau >= h // p:
            return (f"strategy.overlap_steps ({tau}) must be smaller than strategy.local_steps / strategy.fragments "
                    f"({h // p}): one fragment's reduction arrives before the next one starts")
        return None


# ------------------------------------------------------------------------------------------
# async_local_sgd: strategies/async_local_sgd.py
# ------------------------------------------------------------------------------------------
class AsyncLocalSGDOptions(Options):
    traits = Traits(has_parameter_server=True, display_color="#e377c2", display_order=3)

    local_steps: int = _SHARED["local_steps"]
    outer: OuterConfig | None = _SHARED["outer"]
    delayed_nesterov: int | None = Field(default=None, ge=1, description="async_local_sgd: DN (Liu et al. 2024): "
                                         "the outer momentum is updated once every this many pushes, from their "
                                         "average, with plain SGD steps of lr / N in between; needs outer with "
                                         "momentum > 0; null = the momentum on every push")
    dynamic_local_updates: bool = Field(default=False, description="async_local_sgd: DyLU (Liu et al. 2024): "
                                        "worker i takes max(1, floor(local_steps * v_i / max v)) local steps per "
                                        "push, v = 1 / its expected compute-time factor under cluster.stragglers "
                                        "(so only persistent stragglers differ)")

    def unsupported(self, backend: str, world: int) -> str | None:
        if self.delayed_nesterov is not None and (self.outer is None or self.outer.momentum == 0):
            return ("strategy.delayed_nesterov delays the outer momentum: set strategy.outer with momentum > 0 "
                    "(e.g. {lr: 0.7, momentum: 0.9, nesterov: true}) or strategy.delayed_nesterov=null")
        return None


# ------------------------------------------------------------------------------------------
# activation checkpointing (``checkpointing:``): strategies/checkpointing.py
# ------------------------------------------------------------------------------------------
class CheckpointingConfig(Options):
    """Activation checkpointing of every k-th block (``checkpointing:`` in a run config)."""

    enabled: bool = Field(default=False, description="Checkpoint the module's checkpoint_blocks()")
    every: int = Field(default=1, ge=1, description="Wrap blocks 0, k, 2k, ... (1 = every block)")
    impl: Literal["deepspeed", "torch"] = Field(default="deepspeed", description="deepspeed.checkpointing or "
                                                "torch.utils.checkpoint (the reference)")
    partition_activations: bool = Field(default=False, description="DeepSpeed option, passed through")
    cpu_checkpointing: bool = Field(default=False, description="DeepSpeed option, passed through")
