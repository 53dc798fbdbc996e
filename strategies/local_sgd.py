"""Local SGD (Stich 2019; Lin et al. 2020 post-local SGD) and DiLoCo (Douillard et al. 2023).

Each worker takes ``local_steps`` optimizer steps on its own copy, then the copies are
averaged. The first ``warmup_sync_updates`` updates are synchronous (gradients averaged
every step): post-local SGD. With ``outer``, the average becomes a pseudo-gradient
Delta = theta_global - mean(theta_i) applied by an outer SGD with (Nesterov) momentum.
"""

from __future__ import annotations

import copy

import numpy as np
import pytorch_lightning as pl
import torch

from experiments.config import OuterConfig
from experiments.lightning_bridge import build_optimizer
from strategies.base import SimStrategy, flat_params, load_flat_params_, trainable
from strategies.cluster import EventQueue, SimContext, ring_allreduce_bytes, ring_allreduce_s
from strategies.sync import SyncRound


@torch.no_grad()
def mean_state_(target: torch.nn.Module, sources: list[torch.nn.Module]) -> None:
    """``target``'s parameters and floating-point buffers := the mean over ``sources``."""
    named = [dict(src.named_parameters()) | dict(src.named_buffers()) for src in sources]
    for name, tensor in list(target.named_parameters()) + list(target.named_buffers()):
        if tensor.is_floating_point():
            tensor.copy_(torch.stack([n[name] for n in named]).mean(dim=0))


@torch.no_grad()
def average_params_(replicas: list[torch.nn.Module]) -> None:
    """Set every replica to the replicas' mean (the all-reduce of local SGD)."""
    mean_state_(replicas[0], replicas)
    for replica in replicas[1:]:
        replica.load_state_dict(replicas[0].state_dict())


@torch.no_grad()
def apply_outer_step(global_params: torch.Tensor, mean_params: torch.Tensor, momentum_buf: torch.Tensor,
                     outer: OuterConfig) -> None:
    """DiLoCo's outer step, in place: SGD (torch semantics, no dampening) on the pseudo-gradient."""
    delta = global_params - mean_params
    momentum_buf.mul_(outer.momentum).add_(delta)
    update = delta.add(momentum_buf, alpha=outer.momentum) if outer.nesterov else momentum_buf
    global_params.sub_(update, alpha=outer.lr)


class LocalSGDStrategy(SimStrategy):
    name = "local_sgd"

    def __init__(self, ctx: SimContext):
        super().__init__(ctx)
        cfg = ctx.config.strategy
        self.local_steps, self.warmup, self.outer = cfg.local_steps, cfg.warmup_sync_updates, cfg.outer
        n = ctx.n_workers
        self.replicas = [ctx.module] + [copy.deepcopy(ctx.module) for _ in range(n - 1)]
        self.optimizers = [build_optimizer(r) for r in self.replicas]
        self.eval_module = copy.deepcopy(ctx.module) if (n > 1 or self.outer) else ctx.module
        if self.outer:
            self.global_params = flat_params(ctx.module).clone()
            self.momentum_buf = torch.zeros_like(self.global_params)
        self.comm_s = ring_allreduce_s(n, ctx.param_bytes, ctx.net)
        self.local_count = np.zeros(n, dtype=np.int64)
        self.arrived: dict[int, float] = {}
        self.total_local_steps = 0
        self.sync_updates = 0
        self.rounds = 0
        self.queue = EventQueue()
        self._warm_round: SyncRound | None = None
        if self.warmup == 0:
            self._schedule_all(0.0)

    # -- events -------------------------------------------------------------------------
    def _schedule_all(self, t: float) -> None:
        for w in range(self.ctx.n_workers):
            self._schedule_step(w, t)

    def _schedule_step(self, w: int, t: float) -> None:
        c = self.ctx.compute_time(w)
        self.queue.push(t + c, ("step", w, c))

    def _in_warmup(self) -> bool:
        return self.sync_updates < self.warmup

    def _pending_warm_round(self) -> SyncRound:
        if self._warm_round is None:
            self._warm_round = SyncRound(self.ctx, self.ctx.n_workers)
        return self._warm_round

    def next_time(self) -> float:
        if self._in_warmup():
            return self.clock + self._pending_warm_round().duration
        return self.queue.peek_time()

    def advance(self) -> None:
        if self._in_warmup():
            self._warmup_update()
            return
        t, event = self.queue.pop()
        self.clock = t
        if event[0] == "step":
            self._local_step(t, event[1], event[2])
        else:
            self._average(t)

    def _warmup_update(self) -> None:
        """A synchronous step: gradients averaged across replicas, every replica steps."""
        ctx, rnd = self.ctx, self._pending_warm_round()
        grads = []
        for replica, opt, worker in zip(self.replicas, self.optimizers, ctx.workers):
            opt.zero_grad(set_to_none=True)
            ctx.accumulate_gradient(replica, worker)
            grads.append([p.grad for p in trainable(replica)])
        rnd.charge(ctx)
        self.clock += rnd.duration
        self._warm_round = None
        if ctx.diverged:
            return
        with torch.no_grad():
            for tensors in zip(*grads):
                mean = torch.stack(tensors).mean(dim=0)
                for g in tensors:
                    g.copy_(mean)
        for opt in self.optimizers:
            opt.step()
        self.sync_updates += 1
        self.stats.updates += 1
        self.stats.samples += ctx.n_workers * ctx.batch_size
        if not self._in_warmup():
            self._schedule_all(self.clock)

    def _local_step(self, t: float, w: int, compute_s: float) -> None:
        ctx = self.ctx
        self.optimizers[w].zero_grad(set_to_none=True)
        ctx.accumulate_gradient(self.replicas[w], ctx.workers[w])
        ctx.ledger.compute[w] += compute_s
        if ctx.diverged:
            return
        self.optimizers[w].step()
        self.local_count[w] += 1
        self.total_local_steps += 1
        self.stats.samples += ctx.batch_size
        self.stats.updates = self.sync_updates + self.total_local_steps // ctx.n_workers
        if self.local_count[w] % self.local_steps:
            self._schedule_step(w, t)
            return
        self.arrived[w] = t
        if len(self.arrived) == ctx.n_workers:
            self.queue.push(max(self.arrived.values()) + self.comm_s, ("average",))

    def _average(self, t: float) -> None:
        ctx = self.ctx
        last_arrival = t - self.comm_s
        for w, arrived in self.arrived.items():
            ctx.ledger.wait[w] += last_arrival - arrived
        ctx.ledger.comm += self.comm_s
        ctx.ledger.comm_bytes += ring_allreduce_bytes(ctx.n_workers, ctx.param_bytes)
        self.arrived.clear()
        self.rounds += 1
        if self.outer:
            mean_state_(self.eval_module, self.replicas)
            apply_outer_step(self.global_params, flat_params(self.eval_module), self.momentum_buf, self.outer)
            load_flat_params_(self.eval_module, self.global_params)
            for replica in self.replicas:
                replica.load_state_dict(self.eval_module.state_dict())
        else:
            average_params_(self.replicas)
        self._schedule_all(t)

    # -- views ----------------------------------------------------------------------------
    def global_model(self) -> pl.LightningModule:
        if self.outer:
            return self.eval_module  # the outer parameters of the last synchronisation
        if self.eval_module is not self.replicas[0]:
            mean_state_(self.eval_module, self.replicas)
        return self.eval_module

    def summary_metrics(self) -> dict[str, float]:
        return {"averaging_rounds": float(self.rounds)}
