"""Synchronous all-reduce SGD, with optional backup workers.

Each update averages the gradients of N workers, each on its own batch; with
``backup_workers: k`` it uses the first N-k gradients to arrive and drops the rest
(Chen et al. 2016, "Revisiting Distributed Synchronous SGD"). At equal data, sync at N
workers is the same optimisation as one worker at batch N*b.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch

from experiments.lightning_bridge import build_optimizer
from strategies.base import SimStrategy, trainable
from strategies.cluster import SimContext, ring_allreduce_bytes, ring_allreduce_s


def first_arrivals(compute_times: np.ndarray, n_keep: int) -> tuple[np.ndarray, float]:
    """The workers whose gradients arrive first (sorted by index) and when the last of them arrives."""
    order = np.argsort(compute_times, kind="stable")
    return np.sort(order[:n_keep]), float(compute_times[order[n_keep - 1]])


@torch.no_grad()
def average_gradients_(params: list[torch.nn.Parameter], n_contributions: int) -> None:
    """Turn gradients summed over ``n_contributions`` backward passes into their mean."""
    for p in params:
        if p.grad is not None:
            p.grad.div_(n_contributions)


class SyncRound:
    """Timing of one synchronous round: every worker starts together, the update happens
    when the ``n_keep``-th gradient has arrived and the all-reduce has finished."""

    def __init__(self, ctx: SimContext, n_keep: int):
        n = ctx.n_workers
        self.times = np.array([ctx.compute_time(w) for w in range(n)])
        self.kept, self.t_arrive = first_arrivals(self.times, n_keep)
        self.comm_s = ring_allreduce_s(n, ctx.param_bytes, ctx.net)
        self.duration = self.t_arrive + self.comm_s

    def charge(self, ctx: SimContext) -> None:
        ledger = ctx.ledger
        busy = np.minimum(self.times, self.t_arrive)  # dropped workers abandon their step
        ledger.compute += busy
        ledger.wait += self.t_arrive - busy
        ledger.comm += self.comm_s
        ledger.comm_bytes += ring_allreduce_bytes(ctx.n_workers, ctx.param_bytes)


class SyncStrategy(SimStrategy):
    name = "sync"

    def __init__(self, ctx: SimContext):
        super().__init__(ctx)
        self.module = ctx.module
        self.optimizer = build_optimizer(self.module)
        self.n_keep = ctx.n_workers - ctx.config.strategy.backup_workers
        self._round: SyncRound | None = None

    def _pending(self) -> SyncRound:
        if self._round is None:
            self._round = SyncRound(self.ctx, self.n_keep)
        return self._round

    def next_time(self) -> float:
        return self.clock + self._pending().duration

    def advance(self) -> None:
        rnd, ctx = self._pending(), self.ctx
        self.optimizer.zero_grad(set_to_none=True)
        kept = set(rnd.kept.tolist())
        for worker in ctx.workers:
            if worker.index in kept:
                ctx.accumulate_gradient(self.module, worker)
            else:
                ctx.skip_batch(worker)
        rnd.charge(ctx)
        self.clock += rnd.duration
        self._round = None
        if ctx.diverged:
            return
        average_gradients_(trainable(self.module), self.n_keep)
        self.optimizer.step()
        self.stats.updates += 1
        self.stats.samples += self.n_keep * ctx.batch_size

    def global_model(self) -> pl.LightningModule:
        return self.module
