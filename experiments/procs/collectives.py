"""The dist backend's executors of the collective ops (``ReduceGradients``, ``ReduceState``,
with or without a codec, and the overlapped ``StartReduce`` / ``WaitReduce``): torch.distributed
collectives on the main group with the exchange vector riding along, every round's blocked
time on the ledger and the emulated network's padding after it. Mixed into ``ProgramStrategy``
(``syncbench.experiments.procs.program_strategy``), whose state they use."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from syncbench.experiments.cluster_model import exchange_model_s, ring_allreduce_bytes, ring_allreduce_s
from syncbench.experiments.procs.compressed import run_exchange
from syncbench.strategies import compression
from syncbench.strategies.program import (
    ReduceGradients,
    ReduceState,
    StartReduce,
    WaitReduce,
    gradient_payload,
    load_gradient_payload_,
)
from syncbench.strategies.tensors import flat_state, float_buffers, load_flat_state_, trainable


@dataclass
class Overlapped:
    """A ``StartReduce`` in flight: its buffer (the payload, the exchange vector packed after it
    when the dtypes allow), the work handles, and the MAX of the ranks' start times (emulation)."""

    payload: torch.Tensor
    flags: torch.Tensor
    nbytes: int
    buf: torch.Tensor = field(init=False)  # what is all-reduced: the payload, or payload + flags
    works: list[Any] = field(default_factory=list)
    started: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.buf = self.payload


class CollectiveOps:
    """``ProgramStrategy``'s executors of the collective ops (see the module docstring)."""

    # ReduceGradients / ReduceState: the exchange vector rides along -------------------------------------
    def _launch_flags(self) -> None:
        self._flags = self.exchange.build(self.worker)
        assert self.buckets is not None
        extra = self.buckets.extra_view
        if extra is not None:  # rides in the last gradient bucket, the float buffers after it
            extra[: self.exchange.size].copy_(self._flags)
            offset = self.exchange.size
            for b in float_buffers(self.module):
                extra[offset : offset + b.numel()].copy_(b.detach().reshape(-1))
                offset += b.numel()
            self._flags_work = None
        else:
            self._flags_work = self.exchange.launch(self._flags)

    @torch.no_grad()
    def _reduce_gradients(self) -> None:
        comm, worker = self.worker.comm, self.worker
        payload_bytes = sum(p.numel() * p.element_size() for p in trainable(self.module))
        if comm.world == 1:
            self._flags = self.exchange.build(worker)
            self._finish_round(0.0, 0.0, 0)
            return
        if self._armed and self._flags is not None:
            assert self.buckets is not None
            blocked, _ = self.buckets.finish()
            t0 = time.perf_counter()
            if self._flags_work is not None:
                self._flags_work.wait()
            # BatchNorm statistics averaged in the same round, as in the sim backend
            extra = self.buckets.extra_view
            buffers = float_buffers(self.module)
            if extra is None and buffers:
                flat = torch.cat([b.detach().reshape(-1) for b in buffers])
                dist.all_reduce(flat, group=comm.main)
            elif extra is not None:
                self._flags.copy_(extra[: self.exchange.size])
                flat = extra[self.exchange.size :]
            offset = 0
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b) / comm.world)
                offset += b.numel()
            blocked += time.perf_counter() - t0
            for p in self.buckets.params:
                if p.grad is not None:
                    p.grad.div_(comm.world)
        else:  # not announced in advance: one flat reduction after backward
            payload = gradient_payload(self.module)
            blocked = self._all_reduce_with_flags(payload)
            load_gradient_payload_(self.module, payload.div_(comm.world))
        model_s = ring_allreduce_s(comm.world, payload_bytes, worker.config.cluster.network)
        self._finish_round(blocked, model_s, ring_allreduce_bytes(comm.world, payload_bytes))

    @torch.no_grad()
    def _reduce_state(self) -> None:
        comm = self.worker.comm
        flat = flat_state(self.module)
        if self.worker.debug:
            self.last_pre = flat.detach().cpu().clone()
        blocked = self._all_reduce_with_flags(flat) if comm.world > 1 else 0.0
        if comm.world == 1:
            self._flags = self.exchange.build(self.worker)
        load_flat_state_(self.module, flat.div_(comm.world))
        if self.worker.debug:
            self.last_post = flat_state(self.module).detach().cpu().clone()
        self.rounds += 1
        model_s = ring_allreduce_s(comm.world, self.state_bytes, self.worker.config.cluster.network)
        self._finish_round(blocked, model_s, ring_allreduce_bytes(comm.world, self.state_bytes))

    @torch.no_grad()
    def _reduce_compressed(self, op: ReduceGradients | ReduceState) -> None:
        """A ReduceGradients / ReduceState with a codec: the whole payload after backward (no
        bucket overlap), the codec's collectives on the main group, the exchange vector on
        the control group alongside."""
        comm, worker = self.worker.comm, self.worker
        payload = compression.op_payload(op, self.module)
        self._flags = self.exchange.build(worker)
        flags_work = self.exchange.launch(self._flags)
        mean, blocked, collectives = run_exchange(compression.payload_exchange(op.codec, payload, comm.world),
                                                  comm.main, comm.world)
        if flags_work is not None:
            t0 = time.perf_counter()
            flags_work.wait()
            blocked += time.perf_counter() - t0
        compression.load_op_result_(op, self.module, mean)
        if isinstance(op, ReduceState):
            self.rounds += 1
        model_s = exchange_model_s(collectives, comm.world, worker.config.cluster.network)
        self._finish_round(blocked if comm.world > 1 else 0.0, model_s, compression.wire_bytes(collectives, comm.world))

    def _all_reduce_with_flags(self, flat: torch.Tensor) -> float:
        """All-reduce ``flat`` (summed, in place) with the exchange vector riding along; returns
        the seconds blocked."""
        comm = self.worker.comm
        self._flags = self.exchange.build(self.worker)
        packed = flat.dtype in (torch.float32, torch.float64)
        buf = torch.cat([flat, self._flags.to(flat.dtype)]) if packed else flat
        t0 = time.perf_counter()
        flags_work = None if packed else self.exchange.launch(self._flags)
        work = dist.all_reduce(buf, group=comm.main, async_op=True)
        if flags_work is not None:
            flags_work.wait()
        work.wait()
        blocked = time.perf_counter() - t0
        if packed:
            self._flags.copy_(buf[-self.exchange.size :])
            flat.copy_(buf[: -self.exchange.size])
        return blocked

    def _finish_round(self, blocked: float, model_s: float, nbytes: int, pad_s: float | None = None) -> None:
        worker = self.worker
        assert self._flags is not None
        self._stop_flag = self.exchange.absorb(worker, self._flags)
        # the emulated network is charged after the last arrival: every rank leaves the
        # collective together and pads by the same amount, the model time less the real
        # communication of the last settled round (the last arrival's blocked time)
        if pad_s is not None:  # an overlapped reduction computed its own (``_wait_reduce``)
            pad = pad_s
        else:
            pad = worker.emulation.network_pad_s(model_s, worker.last_round_comm_s) if worker.comm.world > 1 else 0.0
        if pad > 0:
            time.sleep(pad)
            worker.ledger.comm += pad
            worker.ledger.pad_comm += pad
        self._exclude(blocked + pad)
        worker.ledger.block(blocked, worker.debug)
        worker.comm_bytes += nbytes
        self._round_done = True
        self._flags = None

    # StartReduce / WaitReduce: an all-reduce in flight while the worker computes -----------------------------
    @torch.no_grad()
    def _start_reduce(self, op: StartReduce) -> int:
        """Launch the reduction of ``op.payload`` (the exchange vector packed with it) and return at
        once. With network emulation on, a MAX all-reduce of the ranks' start times finds the last
        start, from which the emulated transfer is timed, as the sim backend times it."""
        comm, worker = self.worker.comm, self.worker
        handle, self._handles = self._handles, self._handles + 1
        flags = self.exchange.build(worker)
        payload = op.payload.to(comm.device)
        pending = Overlapped(payload, flags, payload.numel() * payload.element_size())
        self._reductions[handle] = pending
        if comm.world == 1:
            return handle
        packed = payload.dtype in (torch.float32, torch.float64)
        if packed:
            pending.buf = torch.cat([payload, flags.to(payload.dtype)])
        pending.works.append(dist.all_reduce(pending.buf, group=comm.main, async_op=True))
        if not packed:
            pending.works.append(self.exchange.launch(flags))
        if worker.emulation.network_on:
            pending.started = torch.tensor([time.time()], dtype=torch.float64)
            pending.works.append(dist.all_reduce(pending.started, op=dist.ReduceOp.MAX, group=comm.ctrl,
                                                 async_op=True))
        return handle

    @torch.no_grad()
    def _wait_reduce(self, op: WaitReduce) -> torch.Tensor:
        """Block until the reduction has arrived; the emulated network pads up to the last start
        plus the alpha-beta time of the payload, never below the real transfer. Returns the mean."""
        comm, worker = self.worker.comm, self.worker
        pending = self._reductions.pop(op.handle)
        t0 = time.perf_counter()
        for work in pending.works:
            work.wait()
        blocked = time.perf_counter() - t0
        n = pending.payload.numel()
        if pending.buf is not pending.payload:
            pending.flags.copy_(pending.buf[n:])
        self._flags = pending.flags
        result = pending.buf[:n].div_(comm.world)
        model_s = ring_allreduce_s(comm.world, pending.nbytes, worker.config.cluster.network)
        pad = 0.0
        if pending.started is not None:
            pad = max(0.0, float(pending.started[0]) + model_s - time.time())
        self.rounds += 1
        self._finish_round(blocked, model_s, ring_allreduce_bytes(comm.world, pending.nbytes), pad_s=pad)
        return result
