"""DDP-style gradient buckets: the dist backend's ``ReduceGradients``, overlapped with backward."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from syncbench.strategies.tensors import trainable


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor
    ready: set[int] = field(default_factory=set)
    work: object | None = None


class GradBuckets:
    """Gradients all-reduced in buckets that start while backward is still running.

    Parameters are bucketed in reverse registration order (roughly the order backward
    produces their gradients), a small first bucket (1 MB) then ~25 MB buckets, as
    ``DistributedDataParallel`` does. A per-parameter post-accumulate-grad hook copies the
    gradient into its bucket; a bucket whose gradients are all in is all-reduced
    (``async_op=True``) at once, in bucket order on every rank. ``finish`` waits for all of
    them and points each ``.grad`` at its (summed) slice; the caller averages.
    """

    FIRST_BUCKET_BYTES = 1 << 20
    BUCKET_BYTES = 25 << 20

    def __init__(self, module: torch.nn.Module, group, world: int, extra: int = 0):
        self.group, self.world = group, world
        self.params = trainable(module)
        self.active = True
        self.buckets: list[_Bucket] = []
        self.slot: dict[int, tuple[int, int]] = {}
        current: list[torch.nn.Parameter] = []
        size = 0
        cap = self.FIRST_BUCKET_BYTES
        for p in reversed(self.params):
            if current and (p.dtype != current[0].dtype or p.device != current[0].device or size >= cap):
                self._add_bucket(current)
                current, size, cap = [], 0, self.BUCKET_BYTES
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self._add_bucket(current)
        self.nbytes = sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)
        # ``extra`` float slots appended to the last bucket (the last one launched) carry the
        # exchange vector in the same all-reduce; only for 32/64-bit floating-point gradients
        self.extra_view: torch.Tensor | None = None
        last = self.buckets[-1] if self.buckets else None
        if extra and last is not None and last.buffer.dtype in (torch.float32, torch.float64):
            n = last.buffer.numel()
            last.buffer = torch.cat([last.buffer, torch.zeros(extra, dtype=last.buffer.dtype,
                                                              device=last.buffer.device)])
            self.extra_view = last.buffer[n:]
        self.next_launch = 0
        self.first_launch: float | None = None
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _add_bucket(self, params: list[torch.nn.Parameter]) -> None:
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        buffer = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
        index = len(self.buckets)
        self.buckets.append(_Bucket(params, offsets, buffer))
        for i, p in enumerate(params):
            self.slot[id(p)] = (index, i)

    @torch.no_grad()
    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.active or p.grad is None:
            return
        b_index, i = self.slot[id(p)]
        bucket = self.buckets[b_index]
        off = bucket.offsets[i]
        view = bucket.buffer[off : off + p.numel()]
        if p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad.reshape(-1))
        bucket.ready.add(i)
        if len(bucket.ready) == len(bucket.params):
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next_launch < len(self.buckets):
            bucket = self.buckets[self.next_launch]
            if len(bucket.ready) < len(bucket.params):
                return
            if self.first_launch is None:
                self.first_launch = time.perf_counter()
            bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True) if self.world > 1 else None
            self.next_launch += 1

    @torch.no_grad()
    def finish(self) -> tuple[float, float]:
        """After backward: launch what is left (parameters without a gradient contribute
        zeros), wait for every bucket and set ``.grad`` to the summed slices.

        Returns (seconds blocked here, seconds from the first launch to completion)."""
        for bucket in self.buckets[self.next_launch :]:
            for i, p in enumerate(bucket.params):
                if i not in bucket.ready:
                    off = bucket.offsets[i]
                    bucket.buffer[off : off + p.numel()].zero_()
                    bucket.ready.add(i)
        self._launch_ready()
        t0 = time.perf_counter()
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None
        t1 = time.perf_counter()
        span = t1 - (self.first_launch or t0)
        for bucket in self.buckets:
            for p, off in zip(bucket.params, bucket.offsets):
                p.grad = bucket.buffer[off : off + p.numel()].view_as(p)
            bucket.ready.clear()
        self.next_launch = 0
        self.first_launch = None
        return t1 - t0, span

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
