"""Local SGD, post-local SGD and DiLoCo as a Lightning strategy over torch.distributed.

Each worker takes ``local_steps`` optimizer steps on its own replica with no communication at
all, then the replicas' flattened parameters (and floating-point buffers) are averaged with one
all-reduce. The first ``warmup_sync_updates`` updates are synchronous (gradient buckets as in
sync: post-local SGD, Lin et al.). With ``outer`` the average is a pseudo-gradient applied by
``strategies.local_sgd.apply_outer_step`` (DiLoCo), the sim backend's function; every rank
holds the same outer parameters and momentum, so the outer step needs no extra message.

The global model is the mean of the replicas. It exists without communication only at an
averaging point, so evaluations are taken at the first averaging point at or after each
multiple of ``eval.every_s``: the evaluated model is then exactly the mean of the replicas at
the recorded clock (and, with ``outer``, the outer parameters of that synchronisation).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import Strategy

from strategies.base import flat_params
from strategies.cluster import ring_allreduce_bytes, ring_allreduce_s
from strategies.lightning.base import Exchange, StopNotice, WorkerStrategy
from strategies.lightning.tensors import (
    GradBuckets,
    float_buffers,
    flat_state,
    load_flat_state_,
    state_numel,
)
from strategies.local_sgd import apply_outer_step
from strategies.sync import average_gradients_


class LocalSGDWorkerStrategy(WorkerStrategy):
    strategy_name = "syncbench_local_sgd"

    def _setup_comm(self) -> None:
        comm, cfg = self.worker.comm, self.worker.config.strategy
        self.local_steps, self.warmup, self.outer = cfg.local_steps, cfg.warmup_sync_updates, cfg.outer
        self.exchange = Exchange(comm)
        self.buckets = GradBuckets(self.module, comm.main, comm.world, extra=self.exchange.size) \
            if self.warmup > 0 else None
        self.buffers = float_buffers(self.module)
        self.n_params = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        sample = flat_params(self.module)
        self.state_bytes = state_numel(self.module) * sample.element_size()
        net = self.worker.config.cluster.network
        self.model_avg_s = ring_allreduce_s(comm.world, self.state_bytes, net)
        self.model_grad_s = ring_allreduce_s(comm.world, self.buckets.nbytes, net) if self.buckets else 0.0
        if self.outer:
            self.global_params = sample.clone()
            self.momentum_buf = torch.zeros_like(self.global_params)
        self.sync_updates = 0
        self.local_count = 0
        self.rounds = 0
        self._flags: torch.Tensor | None = None
        self._flags_work = None
        self._stop_flag = False
        self.last_pre: torch.Tensor | None = None
        self.last_post: torch.Tensor | None = None
        self.notice = StopNotice(comm.rank, comm.timeout_s) if comm.world > 1 else None

    def _in_warmup(self) -> bool:
        return self.sync_updates < self.warmup

    # -- warm-up: synchronous steps ------------------------------------------------------------------
    def _before_backward(self) -> None:
        if self._in_warmup():
            assert self.buckets is not None
            self._flags = self.exchange.build(self.worker)
            if self.buckets.extra_view is not None:  # rides in the last gradient bucket
                self.buckets.extra_view.copy_(self._flags)
                self._flags_work = None
            else:
                self._flags_work = self.exchange.launch(self._flags)

    @torch.no_grad()
    def _after_backward(self) -> None:
        if not self._in_warmup():
            return
        comm, worker = self.worker.comm, self.worker
        assert self.buckets is not None and self._flags is not None
        blocked, span = self.buckets.finish()
        t0 = time.perf_counter()
        if self._flags_work is not None:
            self._flags_work.wait()
        blocked += time.perf_counter() - t0
        if self.buckets.extra_view is not None:
            self._flags.copy_(self.buckets.extra_view)
        average_gradients_(self.buckets.params, comm.world)
        self._finish_round(blocked, self.model_grad_s, span, ring_allreduce_bytes(comm.world, self.buckets.nbytes))

    def _finish_round(self, blocked: float, model_s: float, measured_s: float, nbytes: int) -> None:
        worker = self.worker
        pad = worker.emulation.network_pad_s(model_s, measured_s) if worker.comm.world > 1 else 0.0
        if pad > 0:
            time.sleep(pad)
            worker.ledger.comm += pad
            worker.ledger.pad_comm += pad
        self._exclude(blocked + pad)
        assert self._flags is not None
        self._stop_flag = self.exchange.absorb(worker, self._flags)
        worker.ledger.block(blocked, worker.debug)
        worker.comm_bytes += nbytes

    # -- local steps and averaging --------------------------------------------------------------------
    @torch.no_grad()
    def _average(self) -> None:
        comm = self.worker.comm
        flat = flat_state(self.module)
        if self.worker.debug:
            self.last_pre = flat.detach().cpu().clone()
        self._flags = self.exchange.build(self.worker)
        packed = flat.dtype in (torch.float32, torch.float64)
        if packed:  # the exchange vector rides in the same all-reduce
            flat = torch.cat([flat, self._flags.to(flat.dtype)])
        t0 = time.perf_counter()
        flags_work = None if packed else self.exchange.launch(self._flags)
        work = dist.all_reduce(flat, group=comm.main, async_op=True) if comm.world > 1 else None
        if flags_work is not None:
            flags_work.wait()
        if work is not None:
            work.wait()
        blocked = time.perf_counter() - t0
        if packed:
            self._flags.copy_(flat[-self.exchange.size :])
            flat = flat[: -self.exchange.size]
        flat.div_(comm.world)
        if self.outer:
            apply_outer_step(self.global_params, flat[: self.n_params], self.momentum_buf, self.outer)
            load_flat_state_(self.module, torch.cat([self.global_params, flat[self.n_params :]]))
        else:
            load_flat_state_(self.module, flat)
        self.rounds += 1
        self._finish_round(blocked, self.model_avg_s, blocked, ring_allreduce_bytes(comm.world, self.state_bytes))
        if self.worker.debug:
            self.last_post = flat_state(self.module).cpu().clone()

    def _step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        warm = self._in_warmup()
        out = Strategy.optimizer_step(self, optimizer, closure, model, **kwargs)
        round_done = False
        if warm:
            self.sync_updates += 1
            round_done = True
            if not self._in_warmup() and self.buckets is not None:
                self.buckets.active = False
        else:
            self.local_count += 1
            if self.local_count % self.local_steps == 0 or self._stop_requested():
                self._average()
                round_done = True
        self._end_step()
        if not round_done:
            return out
        if self._stop_flag:
            if self.worker.stop_pending and self.worker.stop_outcome is None:
                # rank 0 stopped early (budget, divergence): evaluate the final average
                self._maybe_evaluate(self._load_global, self._counters, force=True)
                self.worker.stop_outcome = self.worker.stop_outcome or "budget"
            self._stop_now()
            return out
        if self._maybe_evaluate(self._load_global, self._counters) is not None:
            self._announce_stop()
        return out

    def _stop_requested(self) -> bool:
        """Enter a round now rather than at the H-th local step: rank 0 has decided to stop
        (or its clock passed the budget / its loss diverged), or rank 0 said so out of band."""
        worker = self.worker
        if worker.comm.rank != 0:
            return self.notice is not None and self.notice.is_set()
        if worker.stop_outcome is not None or worker.stop_pending:
            return True
        monitor = worker.monitor
        if monitor is not None and (monitor.clock() >= worker.config.budget.train_time_s
                                    or worker.diverged_locally):
            worker.stop_pending = True
            self._announce_stop()
            return True
        return False

    def _announce_stop(self) -> None:
        if self.notice is not None:
            self.notice.send()

    def shutdown(self) -> None:
        if self.notice is not None:
            self.notice.close()

    # -- views --------------------------------------------------------------------------------------------
    def _load_global(self, target: torch.nn.Module) -> None:
        # right after an averaging point this replica is the mean of the replicas (or the outer parameters)
        load_flat_state_(target, flat_state(self.module).to("cpu"))

    def _counters(self) -> dict[str, float]:
        n, b = self.worker.comm.world, self.worker.batch_size
        updates = self.sync_updates + self.local_count
        return self.common_counters(updates, (self.sync_updates + self.local_count) * n * b)

    def summary_metrics(self) -> dict[str, float]:
        return {"averaging_rounds": float(self.rounds)}

    def debug_state(self) -> dict[str, Any]:
        return {"final": flat_state(self.module).cpu(), "last_pre": self.last_pre, "last_post": self.last_post,
                "rounds": self.rounds, "local_count": self.local_count}
