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

from syncbench.experiments.sim.batching import batching_refusal, describe_mode, log_fallback, move_to
from syncbench.experiments.sim.stacked import STACKED, StackedGradients, StackedResult, one_gradient, stacking_refusal
from syncbench.experiments.sim.worker import SimWorker


@dataclass
class ComputeMode:
    """The path chosen: ``tag`` is the tag's value; ``stacked`` is set on the stacked path."""

    tag: str
    stacked: StackedGradients | None = None
    ahead: dict[int, StackedResult] = field(default_factory=dict)  # rank -> its gradient, computed early

    @property
    def shared(self) -> bool:
        return self.tag == describe_mode(True, None)

    def stacked_result(self, w: SimWorker, workers: Sequence[SimWorker], device: torch.device) -> StackedResult:
        """``w``'s gradient on the stacked path: computed earlier, or now together with those of
        every worker computing with the same counters (the "when" of ``stacked``'s docstring)."""
        assert self.stacked is not None
        early = self.ahead.pop(w.rank, None)
        if early is not None:
            return early
        key = (w.completed, w.steps)
        group = [w] + [v for v in workers if v is not w and v.computing is not None
                       and v.rank not in self.ahead and (v.completed, v.steps) == key]
        idx = w.batch_idx()
        for v in group:  # what training_step may read of its trainer, as at the step's start
            v.trainer.global_step, v.trainer.current_epoch = v.completed, v.steps // v.batches.steps_per_epoch
        batches = [move_to(next(v.batches), device) for v in group]
        try:
            results = self.stacked.compute([v.module for v in group], batches, idx)
        except ValueError:  # batches of different shapes (a ragged collate): these one by one
            results = [one_gradient(v.module, b, idx) for v, b in zip(group, batches)]
        self.ahead.update((v.rank, r) for v, r in zip(group[1:], results[1:]))
        return results[0]

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
