"""Asynchronous SGD on a parameter server (Dean et al. 2012, "Downpour SGD"), with
bounded staleness (SSP, Ho et al. 2013) and staleness-dependent learning rates
(Zhang et al. 2016, lr / (1 + staleness)).

Each worker pulls theta (version v), computes a gradient and pushes it; the server
applies it on arrival. Staleness = the server's version at apply - v. Pushes and pulls
share the server's one link, where they queue. With ``max_staleness: s`` a worker may
start a new step only while its clock (gradients applied) is at most s ahead of the
slowest worker's; otherwise it waits.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytorch_lightning as pl
import torch

from experiments.lightning_bridge import build_optimizer
from strategies.base import SimStrategy, flat_grads, load_flat_grads_
from strategies.cluster import EventQueue, ServerLink, SimContext, point_to_point_s


def staleness_lr_scale(staleness: int, mode: str) -> float:
    """The factor applied to the learning rate of a gradient with this staleness."""
    return 1.0 / (1.0 + staleness) if mode == "inverse" else 1.0


def ssp_allows(clocks: np.ndarray, worker: int, max_staleness: int | None) -> bool:
    """Stale synchronous parallel: may ``worker`` start a step now?"""
    return max_staleness is None or clocks[worker] - clocks.min() <= max_staleness


@torch.no_grad()
def apply_gradient_(optimizer: torch.optim.Optimizer, lr_scale: float) -> None:
    """One optimizer step with every group's lr scaled by ``lr_scale`` (then restored)."""
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * lr_scale
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr


class AsyncPSStrategy(SimStrategy):
    name = "async"

    def __init__(self, ctx: SimContext):
        super().__init__(ctx)
        cfg = ctx.config.strategy
        self.max_staleness, self.staleness_lr = cfg.max_staleness, cfg.staleness_lr
        self.server = ctx.module
        self.optimizer = build_optimizer(self.server)
        n = ctx.n_workers
        self.transfer_s = point_to_point_s(ctx.param_bytes, ctx.net)
        self.link = ServerLink()
        self.version = 0
        self.pulled_version = np.zeros(n, dtype=np.int64)
        self.clocks = np.zeros(n, dtype=np.int64)
        self.gradients: list[torch.Tensor | None] = [None] * n
        self.blocked: dict[int, float] = {}
        self.staleness = Counter()
        self.queue = EventQueue()
        for w in range(n):
            self._request_pull(w, 0.0)

    def _request_pull(self, w: int, t: float) -> None:
        if not ssp_allows(self.clocks, w, self.max_staleness):
            self.blocked[w] = t
            return
        start, end = self.link.reserve(t, self.transfer_s)
        self._charge_transfer(w, t, start)
        self.queue.push(start, ("pull", w, end))

    def _charge_transfer(self, w: int, requested: float, start: float) -> None:
        ledger = self.ctx.ledger
        ledger.wait[w] += start - requested  # queued behind other transfers
        ledger.comm[w] += self.transfer_s
        ledger.comm_bytes += self.ctx.param_bytes

    def next_time(self) -> float:
        return self.queue.peek_time()

    def advance(self) -> None:
        t, (kind, w, *rest) = self.queue.pop()
        self.clock = t
        if kind == "pull":
            self._pull(w, rest[0])
        elif kind == "push":
            start, end = self.link.reserve(t, self.transfer_s)
            self._charge_transfer(w, t, start)
            self.queue.push(end, ("apply", w))
        else:
            self._apply(t, w)

    def _pull(self, w: int, transfer_end: float) -> None:
        """The server sends theta now; the worker's gradient is taken at exactly this theta."""
        ctx = self.ctx
        self.pulled_version[w] = self.version
        self.optimizer.zero_grad(set_to_none=True)
        ctx.accumulate_gradient(self.server, ctx.workers[w])
        self.gradients[w] = flat_grads(self.server)
        c = ctx.compute_time(w)
        ctx.ledger.compute[w] += c
        self.queue.push(transfer_end + c, ("push", w))

    def _apply(self, t: float, w: int) -> None:
        ctx = self.ctx
        if ctx.diverged:
            return
        staleness = int(self.version - self.pulled_version[w])
        self.staleness[staleness] += 1
        grad = self.gradients[w]
        assert grad is not None
        load_flat_grads_(self.server, grad)
        self.gradients[w] = None
        apply_gradient_(self.optimizer, staleness_lr_scale(staleness, self.staleness_lr))
        self.version += 1
        self.clocks[w] += 1
        self.stats.updates = self.version
        self.stats.samples += ctx.batch_size
        self._request_pull(w, t)
        for other, since in sorted(self.blocked.items()):
            if ssp_allows(self.clocks, other, self.max_staleness):
                del self.blocked[other]
                ctx.ledger.wait[other] += t - since
                self._request_pull(other, t)

    def global_model(self) -> pl.LightningModule:
        return self.server

    def _staleness_values(self) -> np.ndarray:
        return np.repeat(np.array(list(self.staleness.keys())), list(self.staleness.values()))

    def extra_metrics(self) -> dict[str, float]:
        if not self.staleness:
            return {"staleness_mean": 0.0, "staleness_max": 0.0}
        total = sum(self.staleness.values())
        mean = sum(s * c for s, c in self.staleness.items()) / total
        return {"staleness_mean": float(mean), "staleness_max": float(max(self.staleness))}

    def summary_metrics(self) -> dict[str, float]:
        values = self._staleness_values()
        if values.size == 0:
            return {}
        return {
            "staleness_mean": float(values.mean()),
            "staleness_max": float(values.max()),
            "staleness_p50": float(np.percentile(values, 50)),
            "staleness_p90": float(np.percentile(values, 90)),
        }

    def staleness_histogram(self) -> dict[int, int]:
        return dict(sorted(self.staleness.items()))
