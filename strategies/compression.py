"""Compressed exchanges: the codecs ``sync`` and ``local_sgd`` (DiLoCo) may put on the wire.

A codec turns one worker's flat vector (its gradients, or its pseudo-gradient
``state - last synchronised state``) into a wire payload, and the workers' payloads into the
mean of their decoded values. Each codec is written once as an *exchange*: a generator that
yields the collectives it needs (``AllReduce``: element-wise sum; ``AllGather``: every
worker's tensor) and returns the mean. The sim backend drives N exchanges in lockstep
(``run_lockstep``), the dist backend drives one per process over torch.distributed; so both
run the same arithmetic, and the bytes on the wire follow from the yielded tensors exactly.

What goes on the wire, per codec (what real systems do):

* ``fp16`` / ``bf16``: cast, divide by N, all-reduce in the cast dtype, cast back: torch's
  ``fp16_compress_hook`` / ``bf16_compress_hook`` (the OpenDiLoCo FP16 all-reduce).
* ``int8``: per-tensor symmetric quantisation, one fp32 scale per tensor (``max|x| / 127``);
  int8 sums overflow, so the quantised tensors are all-gathered and each worker averages the
  decoded values (as prime/OpenDiLoCo's int8 ring does in its reduce step).
* ``topk``: top-k of |x + residual| over the whole vector, with error feedback: what is not
  sent is added to the next exchange (Stich et al. 2018 "Sparsified SGD with memory";
  Lin et al. 2018 "Deep Gradient Compression"). Sparse (int32 index, value) pairs are
  all-gathered.
* ``powersgd``: rank-r PowerSGD (Vogels et al. 2019), torch's ``powerSGD_hook`` semantics:
  every tensor viewed as (shape[0], -1); tensors that would not shrink by 2x (1-D ones among
  them) are all-reduced uncompressed; P = M Q, all-reduce P, orthogonalise, Q = Mᵀ P,
  all-reduce Q, M ≈ P Qᵀ / N; error feedback (local input − decoded mean) and warm start
  (Q reused); the first Q drawn from ``np.random.RandomState(0)`` as the hook does.

Floating-point buffers (BatchNorm statistics) are not gradients: they are averaged
uncompressed, in one extra fp32 all-reduce, as DDP keeps them apart from its comm hook.
"""

from __future__ import annotations

import abc
import copy
import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

# the options models live apart from torch (config validation does not import it)
from syncbench.strategies.options import CodecName, CompressionOptions  # noqa: F401 - re-exported
from syncbench.strategies.program import ReduceGradients, ReduceState
from syncbench.strategies.tensors import float_buffers, flat_state, load_flat_state_, trainable


# ------------------------------------------------------------------------------------------
# the collectives an exchange asks for
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AllReduce:
    """Element-wise sum over the workers (a ring all-reduce); resumes with the sum."""

    tensor: torch.Tensor


@dataclass(frozen=True)
class AllGather:
    """Every worker's tensor (same size on each; a ring all-gather); resumes with the list, in rank order."""

    tensor: torch.Tensor


Collective = AllReduce | AllGather
Exchange = Generator[Collective, Any, torch.Tensor]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------------------------------
# codecs: pure encode / decode, and one exchange each
# ------------------------------------------------------------------------------------------
class Codec(abc.ABC):
    """One worker's codec and its state (error feedback, PowerSGD's Q): one instance per
    worker and per kind of exchange (gradients and pseudo-gradients keep separate residuals)."""

    name: ClassVar[str]

    def __init__(self, shapes: Sequence[torch.Size]):
        self.shapes = [torch.Size(s) for s in shapes]  # the tensors the flat vector is made of, in order
        self.sizes = [s.numel() for s in self.shapes]

    @abc.abstractmethod
    def exchange(self, x: torch.Tensor, world: int) -> Exchange:
        """Yield the collectives; return the mean over the workers of the decoded vectors."""


class CastCodec(Codec):
    """fp16 / bf16: torch's ``fp16_compress_hook``: cast, divide by N in the cast dtype,
    all-reduce (sum) in that dtype, cast back."""

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype):
        super().__init__(shapes)
        self.dtype = dtype
        self.name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]  # type: ignore[misc]

    def exchange(self, x: torch.Tensor, world: int) -> Exchange:
        summed = yield AllReduce(x.to(self.dtype).div_(world))
        return summed.to(x.dtype)


def quantize_int8(x: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor int8: scale = max|x| / 127 per tensor, q = round(x / scale)."""
    parts = torch.split(x, list(sizes))
    scales = torch.stack([p.abs().max() if p.numel() else x.new_zeros(()) for p in parts]).float() / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.cat([torch.round(p.float() / s).clamp_(-127, 127) for p, s in zip(parts, safe)]).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    return torch.cat([part.float() * s for part, s in zip(torch.split(q, list(sizes)), scales)])


class Int8Codec(Codec):
    """Per-tensor int8 values and fp32 scales, packed into one byte tensor and all-gathered."""

    name = "int8"

    def exchange(self, x: torch.Tensor, world: int) -> Exchange:
        q, scales = quantize_int8(x, self.sizes)
        wire = torch.cat([q.view(torch.uint8), scales.view(torch.uint8)])
        gathered = yield AllGather(wire)
        n = q.numel()
        total = x.new_zeros(x.numel(), dtype=torch.float32)
        for w in gathered:  # rank order: every worker sums in the same order
            total += dequantize_int8(w[:n].view(torch.int8), w[n:].clone().view(torch.float32), self.sizes)
        return total.div_(world).to(x.dtype)


def topk_count(n: int, ratio: float) -> int:
    return max(1, min(n, math.ceil(ratio * n)))


class TopKCodec(Codec):
    """Top-k by magnitude with error feedback (Stich et al. 2018): the residual of what was
    not sent is added to the next input; (int32 index, value) pairs are all-gathered."""

    name = "topk"

    def __init__(self, shapes: Sequence[torch.Size], ratio: float):
        super().__init__(shapes)
        self.ratio = ratio
        self.residual: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and values of the k largest |x + residual|; the rest becomes the residual."""
        acc = x + self.residual if self.residual is not None else x.clone()
        k = topk_count(acc.numel(), self.ratio)
        idx = torch.topk(acc.abs(), k, sorted=False).indices.to(torch.int32)
        values = acc[idx.long()]
        acc[idx.long()] = 0
        self.residual = acc
        return idx, values

    def exchange(self, x: torch.Tensor, world: int) -> Exchange:
        idx, values = self.encode(x)
        wire = torch.cat([idx.view(torch.uint8), values.contiguous().view(torch.uint8)])
        gathered = yield AllGather(wire)
        k = idx.numel()
        total = torch.zeros_like(x)
        for w in gathered:
            total.index_add_(0, w[: 4 * k].view(torch.int32).long(), w[4 * k :].view(x.dtype))
        return total.div_(world)


class PowerSGDCodec(Codec):
    """Rank-r PowerSGD as ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook`` (one
    bucket, ``batch_tensors_with_same_shape=False``, error feedback and warm start on,
    ``min_compression_rate=2``, epsilon 0); it compresses from its first exchange, where the
    hook's own default waits ``start_powerSGD_iter`` iterations."""

    name = "powersgd"
    MIN_COMPRESSION_RATE = 2

    def __init__(self, shapes: Sequence[torch.Size], rank: int, seed: int = 0):
        super().__init__(shapes)
        self.rank = rank
        self.rng = np.random.RandomState(seed)  # the hook's PowerSGDState(random_seed=0)
        self.error: torch.Tensor | None = None
        self.q_memory: torch.Tensor | None = None
        # which tensors are compressed, grouped by shape in first-seen order (the hook's layout)
        self.compressed: list[int] = []
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(self.shapes):
            n, m = s[0] if len(s) else 1, s.numel() // (s[0] if len(s) and s[0] else 1)
            r = min(n, m, rank)
            if (n + m) * r * self.MIN_COMPRESSION_RATE < n * m:
                by_shape.setdefault((n, m), []).append(i)
        self.compressed = [i for group in by_shape.values() for i in group]
        self.uncompressed = [i for i in range(len(self.shapes)) if i not in set(self.compressed)]

    def _dims(self, i: int) -> tuple[int, int, int]:
        s = self.shapes[i]
        n = s[0]
        m = s.numel() // n
        return n, m, min(n, m, self.rank)

    def exchange(self, x: torch.Tensor, world: int) -> Exchange:
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize

        x = x + self.error if self.error is not None else x.clone()  # error feedback
        original = x.clone()
        views = list(torch.split(x, self.sizes))
        uncompressed = torch.cat([views[i] for i in self.uncompressed]) if self.uncompressed \
            else x.new_zeros(0)
        matrices = [views[i].view(1, *self._dims(i)[:2]) for i in self.compressed]
        p_sizes = [self._dims(i)[0] * self._dims(i)[2] for i in self.compressed]
        q_sizes = [self._dims(i)[1] * self._dims(i)[2] for i in self.compressed]
        p_memory = x.new_empty(sum(p_sizes))
        fresh = self.q_memory is None
        if fresh:
            self.q_memory = x.new_empty(sum(q_sizes))
        ps = [v.view(1, self._dims(i)[0], self._dims(i)[2])
              for v, i in zip(torch.split(p_memory, p_sizes), self.compressed)]
        qs = [v.view(1, self._dims(i)[1], self._dims(i)[2])
              for v, i in zip(torch.split(self.q_memory, q_sizes), self.compressed)]
        if fresh:  # the hook's first Q: one seed from its numpy RNG, randn per matrix on the CPU
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.rng.randint(1_000_000_000))
                for q in qs:
                    q.copy_(torch.randn(*q.shape, device="cpu", dtype=x.dtype))
                    _orthogonalize(q, 0)
        else:  # warm start: last exchange's Q, re-orthogonalised
            for q in qs:
                _orthogonalize(q, 0)
        for m, q, p in zip(matrices, qs, ps):
            torch.bmm(m, q, out=p)
        summed = yield AllReduce(uncompressed)
        summed = summed.div_(world)
        for i, part in zip(self.uncompressed, torch.split(summed, [self.sizes[i] for i in self.uncompressed])):
            views[i].copy_(part)
        p_memory.copy_((yield AllReduce(p_memory)))  # not divided: P is orthogonalised next
        for p in ps:
            _orthogonalize(p, 0)
        for m, p, q in zip(matrices, ps, qs):
            torch.bmm(m.transpose(1, 2), p, out=q)
        self.q_memory.copy_((yield AllReduce(self.q_memory)))
        self.q_memory.div_(world)
        for p, q, m in zip(ps, qs, matrices):
            torch.bmm(p, q.transpose(1, 2), out=m)
        self.error = original - x  # the local error, uncompressed tensors included (as the hook)
        return x

    def wire_numel(self) -> int:
        """Elements all-reduced per exchange: the uncompressed tensors, P and Q."""
        dims = [self._dims(i) for i in self.compressed]
        return sum(self.sizes[i] for i in self.uncompressed) + sum((n + m) * r for n, m, r in dims)


def make_codec(options: Any, shapes: Sequence[torch.Size]) -> Codec | None:
    """The codec of ``strategy.compression`` (None for ``none``: the exact, uncompressed mean)."""
    name = options.compression
    if name == "none":
        return None
    if name in ("fp16", "bf16"):
        return CastCodec(shapes, torch.float16 if name == "fp16" else torch.bfloat16)
    if name == "int8":
        return Int8Codec(shapes)
    if name == "topk":
        return TopKCodec(shapes, options.topk_ratio)
    if name == "powersgd":
        return PowerSGDCodec(shapes, options.powersgd_rank)
    raise ValueError(f"strategy.compression: unknown codec {name!r}")


def param_shapes(module: torch.nn.Module) -> list[torch.Size]:
    return [p.shape for p in trainable(module)]


# ------------------------------------------------------------------------------------------
# what the backends do with a ReduceGradients / ReduceState that carries a codec
# ------------------------------------------------------------------------------------------
def op_payload(op: ReduceGradients | ReduceState, module: torch.nn.Module) -> torch.Tensor:
    """The vector a compressed op exchanges: the gradients then the float buffers
    (``gradient_payload``'s layout), or the state minus the op's reference."""
    from syncbench.strategies.program import gradient_payload

    if isinstance(op, ReduceGradients):
        return gradient_payload(module)
    assert op.reference is not None, "a compressed ReduceState needs the reference it exchanges deltas from"
    return flat_state(module) - op.reference


def load_op_result_(op: ReduceGradients | ReduceState, module: torch.nn.Module, mean: torch.Tensor) -> None:
    from syncbench.strategies.program import load_gradient_payload_

    if isinstance(op, ReduceGradients):
        load_gradient_payload_(module, mean)
    else:
        assert op.reference is not None
        load_flat_state_(module, op.reference + mean)


def payload_exchange(codec: Codec, payload: torch.Tensor, world: int) -> Exchange:
    """The codec on the parameter part; the float buffers (a tail beyond the codec's tensors)
    averaged uncompressed in one more all-reduce."""
    n = sum(codec.sizes)
    mean = yield from codec.exchange(payload[:n], world)
    if payload.numel() == n:
        return mean
    buffers = yield AllReduce(payload[n:].clone())
    return torch.cat([mean, buffers.div_(world)])


def buffers_numel(module: torch.nn.Module) -> int:
    return sum(b.numel() for b in float_buffers(module))


def run_lockstep(exchanges: list[Exchange]) -> tuple[list[torch.Tensor], list[Collective]]:
    """Drive N workers' exchanges together, as the collectives would (sums in rank order);
    returns each worker's result and rank 0's collectives (for bytes and time)."""
    world = len(exchanges)
    values: list[Any] = [None] * world
    log: list[Collective] = []
    while True:
        requests = []
        results = []
        for g, v in zip(exchanges, values):
            try:
                requests.append(g.send(v))
            except StopIteration as stop:
                results.append(stop.value)
        if results:
            assert len(results) == world, "workers' exchanges disagree on their collectives"
            return results, log
        first = requests[0]
        assert all(type(r) is type(first) and r.tensor.shape == first.tensor.shape for r in requests), \
            "workers' exchanges disagree on their collectives"
        log.append(first)
        if isinstance(first, AllReduce):
            total = requests[0].tensor.clone()
            for r in requests[1:]:
                total += r.tensor
            values = [total.clone() for _ in range(world)]
        else:
            gathered = [r.tensor.clone() for r in requests]
            values = [list(gathered) for _ in range(world)]


def one_worker_exchange(exchange: Exchange, world: int) -> torch.Tensor:
    """Drive one worker's exchange as one of ``world`` workers that all sent the same payload:
    an all-reduce resumes with N x its tensor, an all-gather with N payloads. The worker thus
    encodes once and decodes N payloads, as each worker of an all-gather codec (int8, top-k)
    does in a real exchange; ``run_lockstep`` over one exchange would decode one."""
    value: Any = None
    while True:
        try:
            request = exchange.send(value)
        except StopIteration as stop:
            return stop.value
        if isinstance(request, AllReduce):
            value = request.tensor * world
        else:  # the N payloads of an all-gather (equal here: decoding cost does not depend on values)
            value = [request.tensor] * world
    raise AssertionError("unreachable")  # pragma: no cover - for the type checker


def codec_seconds_per_mb(codec: Codec, payload: torch.Tensor, world: int, repeats: int = 5) -> float:
    """Encode + decode seconds per MB of ``payload`` charged to *one worker* of a ``world``-worker
    exchange on this machine: the median of ``repeats`` timed ``one_worker_exchange`` runs on
    copies of the codec (its state untouched), after one untimed warm-up. For the all-gather
    codecs the charge grows with N (one encode, N decodes); for the all-reduce ones it does not."""
    if repeats < 1:
        raise ValueError(f"repeats {repeats}: must be at least 1")
    times = []
    for _ in range(repeats + 1):
        trial = copy.deepcopy(codec)
        x = payload.clone()
        t0 = time.perf_counter()
        one_worker_exchange(payload_exchange(trial, x, world), world)
        times.append(time.perf_counter() - t0)
    nbytes_ = max(1, payload.numel() * payload.element_size())
    return float(np.median(times[1:])) / (nbytes_ / 1e6)


def wire_bytes(collectives: Sequence[Collective], world: int) -> int:
    """Bytes put on the wire, summed over the workers: a ring all-reduce of S bytes sends
    2(N-1)/N * S per worker; a ring all-gather of S bytes per worker sends (N-1) * S per worker."""
    if world <= 1:
        return 0
    total = 0
    for c in collectives:
        s = nbytes(c.tensor)
        total += 2 * (world - 1) * s if isinstance(c, AllReduce) else world * (world - 1) * s
    return total
