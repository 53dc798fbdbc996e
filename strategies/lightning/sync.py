"""Synchronous all-reduce SGD as a Lightning strategy over torch.distributed.

Gradients are all-reduced in buckets launched from per-parameter post-accumulate-grad
hooks while backward is still running (``GradBuckets``, DDP's scheme), waited for at the end
of backward, then averaged with ``strategies.sync.average_gradients_`` — the sim backend's
function — before Lightning's gradient clipping and the optimizer step. Floating-point
buffers (BatchNorm statistics) are averaged in the same round. The exchange vector rides
along each step, so stopping and the time ledger cost no extra round trip.

Backup workers (``strategy.backup_workers > 0``) are refused by the dist backend: dropping
the slowest gradients needs a non-blocking reduction that gloo/NCCL all-reduce is not.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import Strategy

from strategies.cluster import ring_allreduce_bytes, ring_allreduce_s
from strategies.lightning.base import Exchange, WorkerStrategy
from strategies.lightning.tensors import GradBuckets, float_buffers, flat_state, load_flat_state_
from strategies.sync import average_gradients_


class SyncWorkerStrategy(WorkerStrategy):
    strategy_name = "syncbench_sync"

    def _setup_comm(self) -> None:
        comm = self.worker.comm
        self.exchange = Exchange(comm)
        self.buckets = GradBuckets(self.module, comm.main, comm.world, extra=self.exchange.size)
        self.buffers = float_buffers(self.module)
        self.grad_bytes = self.buckets.nbytes
        self.model_comm_s = ring_allreduce_s(comm.world, self.grad_bytes, self.worker.config.cluster.network)
        self.updates = 0
        self._flags: torch.Tensor | None = None
        self._flags_work = None
        self._buf_flat: torch.Tensor | None = None
        self._buf_work = None
        self._stop_flag = False
        self._pad = 0.0

    # -- one round per step ---------------------------------------------------------------------------
    def _launch_flags(self) -> None:
        self._flags = self.exchange.build(self.worker)
        if self.buckets.extra_view is not None:  # rides in the last gradient bucket
            self.buckets.extra_view.copy_(self._flags)
            self._flags_work = None
        else:
            self._flags_work = self.exchange.launch(self._flags)
        comm = self.worker.comm
        if self.buffers and comm.world > 1:
            self._buf_flat = torch.cat([b.detach().reshape(-1) for b in self.buffers])
            self._buf_work = dist.all_reduce(self._buf_flat, group=comm.main, async_op=True)

    def _before_backward(self) -> None:
        self._launch_flags()

    @torch.no_grad()
    def _after_backward(self) -> None:
        comm, worker = self.worker.comm, self.worker
        blocked, span = self.buckets.finish()
        t0 = time.perf_counter()
        if self._flags_work is not None:
            self._flags_work.wait()
        if self._buf_work is not None:
            self._buf_work.wait()
            offset = 0
            for b in self.buffers:
                b.copy_(self._buf_flat[offset : offset + b.numel()].view_as(b) / comm.world)
                offset += b.numel()
            self._buf_flat, self._buf_work = None, None
        blocked += time.perf_counter() - t0
        if self.buckets.extra_view is not None and self._flags is not None:
            self._flags.copy_(self.buckets.extra_view)
        average_gradients_(self.buckets.params, comm.world)
        self._pad = worker.emulation.network_pad_s(self.model_comm_s, span) if comm.world > 1 else 0.0
        if self._pad > 0:
            time.sleep(self._pad)
            worker.ledger.comm += self._pad
            worker.ledger.pad_comm += self._pad
        self._exclude(blocked + self._pad)
        assert self._flags is not None
        self._stop_flag = self.exchange.absorb(worker, self._flags)
        worker.ledger.block(blocked, worker.debug)
        worker.comm_bytes += ring_allreduce_bytes(comm.world, self.grad_bytes)

    def _step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        self._flags = None
        out = Strategy.optimizer_step(self, optimizer, closure, model, **kwargs)
        if self._flags is None:
            raise RuntimeError("sync (dist): training_step returned no loss; every worker must produce a gradient "
                               "at every step")
        self.updates += 1
        self._end_step()
        if self._stop_flag:
            self._stop_now()
            return out
        self._maybe_evaluate(self._load_global, self._counters)
        return out

    # -- views --------------------------------------------------------------------------------------------
    def _load_global(self, target: torch.nn.Module) -> None:
        load_flat_state_(target, flat_state(self.module).to("cpu"))

    def _counters(self) -> dict[str, float]:
        comm = self.worker.comm
        return self.common_counters(self.updates, self.updates * comm.world * self.worker.batch_size)

    def debug_state(self) -> dict[str, Any]:
        return {"final": flat_state(self.module).cpu()}
