"""One virtual worker of the sim backend (``SimWorker``): what its program sees, and the
engine's bookkeeping of it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from syncbench.experiments.sharding import ShardedBatches
from syncbench.strategies.lightning_bridge import (
    LightningModuleLike,
    TrainerStandIn,
    build_module_optimizer,
)
from syncbench.strategies.program import WorkerProgram, gradient_payload


class SimWorker:
    """One virtual worker: the ``syncbench.strategies.program.Worker`` its program sees, plus the
    engine's bookkeeping (its generator, its computation in flight, its collective count).

    Its replica runs as under Lightning's Trainer: a trainer stand-in (``global_step`` = the
    worker's training batches, ``current_epoch`` = the epoch of its shard), the fit hooks at
    the matching points, and ``optimizer`` = the module's optimizer with its LR schedulers,
    gradient clipping and ``on_before_optimizer_step`` (``ModuleOptimizer``)."""

    def __init__(self, rank: int, world: int, batch_size: int, module: LightningModuleLike,
                 batches: ShardedBatches, trainer_options: Any = None,
                 metrics: Callable[[], dict[str, float]] | None = None,
                 shared: tuple[TrainerStandIn, Any] | None = None):
        """``shared``: the trainer stand-in and optimizer of a replica every worker shares (the
        batched path, ``syncbench.experiments.sim.batching``), instead of this worker's own."""
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.module = module
        if shared is not None:
            self.trainer, self.optimizer = shared
        else:
            clip = clip_options(trainer_options)
            self.trainer = TrainerStandIn(module, num_training_batches=batches.steps_per_epoch, **clip).attach()
            self.optimizer = build_module_optimizer(module, steps_per_epoch=batches.steps_per_epoch,
                                                    metrics=metrics, **clip)
        self.batches = batches
        self.pending: np.ndarray | None = None  # batched path: the sample indices of the computed batch
        self.last_batch: Any = None
        self.last_loss: torch.Tensor | None = None
        self.steps = 0  # gradients computed (the module's batch_idx)
        self.completed = 0  # program steps finished
        self.program: WorkerProgram | None = None
        self.gen: Any = None
        self.computing: tuple[float, int] | None = None  # (start, token) of the computation in flight
        self.token = 0
        self.collectives = 0
        self.pulled_version = 0
        self.step_factors = [1.0] * world  # the straggler model's expected factors (set by the engine)

    @functools.cached_property
    def gradient_bytes(self) -> int:
        """Bytes of this replica's ``gradient_payload`` (a push of its gradient)."""
        payload = gradient_payload(self.module)
        return payload.numel() * payload.element_size()

    def stop_requested(self) -> bool:
        return False  # the sim stops between events; nothing is ever left unsynchronised

    def expected_step_factors(self) -> list[float]:
        return list(self.step_factors)

    def batch_idx(self) -> int:
        """Index of the next batch within its epoch (the module's ``batch_idx``, as the Trainer's)."""
        return self.steps % self.batches.steps_per_epoch


def clip_options(trainer_options: Any) -> dict[str, Any]:
    """``trainer.gradient_clip_*`` as ``TrainerStandIn`` and ``build_module_optimizer`` take them."""
    if trainer_options is None:
        return {}
    return {"gradient_clip_val": trainer_options.gradient_clip_val,
            "gradient_clip_algorithm": trainer_options.gradient_clip_algorithm}
