"""Which of the sim's three compute paths a run takes (``cluster.sim.batching``, the
``syncbench.sim.batching`` tag; docs/performance.md):

* ``batched``: the strategy keeps its replicas identical and the module's gradient on
  concatenated batches is the mean of its per-batch gradients: one shared replica and optimizer,
  one forward/backward per update (``syncbench.experiments.sim.batching``);
* ``stacked``: replicas that differ (or a module that cannot be concatenated), and ``vmap``
  computes what per-worker calls compute: one replica and optimizer per worker, the gradients of
  the workers computing together from one call (``syncbench.experiments.sim.stacked``);
* ``per-worker: <why>``: one forward/backward per worker, as on the dist backend; the reason is
  logged once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from syncbench.experiments.sim.batching import batching_refusal, describe_mode, log_fallback
from syncbench.experiments.sim.grouped_step import StackedReplicas
from syncbench.experiments.sim.stacked import (
    STACKED,
    StackedGradients,
    StackedResult,
    draw_batches,
    one_gradient,
    stacking_refusal,
)
from syncbench.experiments.sim.worker import SimWorker


@dataclass
class ComputeMode:
    """The path chosen: ``tag`` is the tag's value; ``stacked`` is set on the stacked path."""

    tag: str
    stacked: StackedGradients | None = None
    ahead: dict[int, StackedResult] = field(default_factory=dict)  # rank -> its gradient, computed early
    replicas: StackedReplicas | None = None  # the stacked path's replicas as rows (link_replicas)

    @property
    def shared(self) -> bool:
        return self.tag == describe_mode(True, None)

    def link_replicas(self, workers: Sequence[SimWorker]) -> StackedReplicas | None:
        """On the stacked path: the workers' replicas become rows of stacked tensors, and their
        optimizers may step as one (``syncbench.experiments.sim.grouped_step``)."""
        if self.stacked is not None and len(workers) > 1:
            self.replicas = StackedReplicas([w.module for w in workers], [w.optimizer.optimizer for w in workers])
        return self.replicas

    def stacked_result(self, w: SimWorker, workers: Sequence[SimWorker], device: torch.device) -> StackedResult:
        """``w``'s gradient on the stacked path: computed earlier, or now together with those of
        every worker computing with the same counters (the "when" of ``stacked``'s docstring)."""
        assert self.stacked is not None
        early = self.ahead.pop(w.rank, None)
        if early is not None:
            return early
        key = (w.completed, w.steps)
        group = [v for v in workers if (v is w or v.computing is not None and v.rank not in self.ahead)
                 and (v.completed, v.steps) == key]  # in rank order
        idx = w.batch_idx()
        for v in group:  # what training_step may read of its trainer, as at the step's start
            v.trainer.global_step, v.trainer.current_epoch = v.completed, v.steps // v.batches.steps_per_epoch
        stacked, batches = draw_batches([v.batches for v in group], device)
        rows = self.replicas.stacked_params() if self.replicas is not None and len(group) == len(workers) else None
        if stacked is not None:
            results = self.stacked.compute([v.module for v in group], batches, idx, rows, stacked)
        else:  # batches of different shapes (a ragged collate): these one by one
            results = [one_gradient(v.module, b, idx) for v, b in zip(group, batches)]
        self.ahead.update((v.rank, r) for v, r in zip(group, results) if v is not w)
        return results[group.index(w)]

    def zero_grad(self, w: SimWorker) -> None:
        """``w``'s optimizer's ``zero_grad(set_to_none=True)`` (directly on linked replicas)."""
        if self.replicas is not None and self.replicas.refusal is None:
            self.replicas.zero_grad(w.rank)
        else:
            w.optimizer.zero_grad(set_to_none=True)

    def drop(self, rank: int) -> bool:
        """Forget ``rank``'s early gradient (its step was abandoned); whether it had one, i.e.
        whether its batch was already drawn."""
        return self.ahead.pop(rank, None) is not None


def choose_compute_mode(strategy: Any, module: Any, train_set: Dataset, collate: Callable[[list], Any], *,
                        workers: int, batching: str, batch_size: int, seed: int,
                        device: torch.device) -> ComputeMode:
    """The path for this run: batched where exact, else stacked where exact, else per worker
    (said once in the log when batching was asked for and N > 1)."""
    if batching == "off":
        return ComputeMode(describe_mode(False, "cluster.sim.batching=off"))
    if workers == 1:
        return ComputeMode(describe_mode(False, "one worker"))
    shareable = strategy.replicas_shareable()
    refusal = batching_refusal(module, train_set, collate, batch_size, seed, device) if shareable \
        else f"{strategy.name} keeps replicas that differ"
    if refusal is None:
        return ComputeMode(describe_mode(True, None))
    why, unused = stacking_refusal(module, train_set, collate, batch_size, seed, device)
    if why is None:
        return ComputeMode(STACKED, StackedGradients(module, unused))
    refusal = f"{refusal}; {why}" if shareable else why
    log_fallback(refusal)
    return ComputeMode(describe_mode(False, refusal))
