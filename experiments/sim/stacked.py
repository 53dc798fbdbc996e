"""The sim backend's stacked path (``cluster.sim.batching: auto``) for strategies whose replicas
differ (local SGD, DiLoCo, streaming DiLoCo, async, compressed sync): the gradients of the
workers whose computations are in flight together are computed in one call, ``torch.func.vmap``
over ``grad`` of the module's own ``training_step`` under ``functional_call``, with each
worker's parameters stacked along a new first dimension. Each worker keeps its own replica and
its own optimizer; only the forward/backward is shared (docs/performance.md).

When: a worker's gradient depends only on its replica and its batch, and a worker's replica
does not change while its computation is in flight (its program is suspended on ``Compute``;
the engine changes a replica only in that worker's own program flow). So when the first
computation in flight ends on the clock, the gradients of every worker then computing -- with
the same training-step counters (``batch_idx``, ``global_step``, epoch), which a
``training_step`` may read -- are computed together and kept until each one's computation ends.

Exact where ``vmap`` computes what N separate calls compute: checked once per run on two
differing copies of the module (``stacking_refusal``). A module fails it, and runs per worker,
when its forward updates buffers (BatchNorm's running statistics), when ``vmap`` refuses its
``training_step`` (data-dependent Python control flow, ``.item()``), when its batches are not
tensors of one shape, or when it overrides a hook that runs before ``training_step`` or
``backward`` (``on_train_epoch_start``, ``on_train_batch_start``, ``on_before_backward``: on this
path those hooks run when the worker's computation ends, after its gradient was computed), or
when its ``training_step`` changes an attribute of the module (a counter, a list of outputs, a
running total: stacked, it would run once for the group, on batched values).
What the module logs inside ``training_step`` is not recorded on this path (the sim reads the
training loss from the returned value, not from the log).

Random layers: ``vmap(randomness="different")`` draws each worker's dropout masks in one call:
a run is bit-for-bit reproducible within a mode; across modes the masks differ (statistically
equivalent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import grad_and_value, vmap
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset, TensorDataset

from syncbench.experiments.sharding import ShardedBatches, collate_indices
from syncbench.experiments.sim.batching import move_to, probe_copy
from syncbench.strategies.lightning_bridge import take_logged, training_loss
from syncbench.strategies.tensors import trainable
from syncbench.strategies.lightning_flavour import base_class

STACKED = "stacked"  # the batching tag's value on this path

# hooks Lightning runs before training_step or backward: here they run when the computation
# ends, after the gradient, so a module whose override could change the gradient runs per worker
_EARLY_HOOKS = ("on_train_epoch_start", "on_train_batch_start", "on_before_backward")

_RTOL, _ATOL = 1e-4, 1e-6  # as the batched path's check: float32 summation order, not semantics


@dataclass
class StackedResult:
    """One worker's share of a stacked computation: its batch, loss and gradients (one per
    trainable parameter, None where the parameter takes no part in the loss)."""

    batch: Any
    loss: torch.Tensor
    grads: list[torch.Tensor | None]


class StackedGradients:
    """Computes the gradients of several replicas of one module in one ``vmap`` call."""

    def __init__(self, module: Any, unused: frozenset[str]):
        """``unused``: the trainable parameters that take no part in the loss (their gradient
        stays None, as autograd leaves it, instead of vmap's zeros)."""
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.unused = unused
        # frozen parameters and buffers, passed to each replica's call (most modules have none)
        self.has_fixed = any(not p.requires_grad for p in module.parameters()) or any(True for _ in module.buffers())

    def compute(self, modules: Sequence[Any], batches: Sequence[Any], batch_idx: int,
                rows: Sequence[torch.Tensor] | None = None, stacked: Any = None) -> list[StackedResult]:
        """The gradients of ``modules[i]`` on ``batches[i]``, the first module's ``training_step``
        run once under ``vmap`` (its trainer's counters hold for all: the caller groups by them).
        ``rows``: the modules' trainable parameters already stacked (``grouped_step``), in order;
        ``stacked``: the batches already stacked (``draw_batches``)."""
        lead = modules[0]
        # trainable() lists each module's trainable parameters in named_parameters() order
        params = dict(zip(self.names, rows)) if rows is not None else \
            {n: torch.stack([p.detach() for p in ps]) for n, ps in zip(self.names, zip(*map(trainable, modules)))}
        fixed = {n: torch.stack([t.detach() for t in ts]) for n, ts in _fixed_tensors(modules).items()} \
            if self.has_fixed else {}
        batch = stacked if stacked is not None else stack_batches(batches)

        def loss_of(p: dict[str, torch.Tensor], f: dict[str, torch.Tensor], b: Any) -> torch.Tensor:
            return training_loss_functional(lead, {**p, **f}, b, batch_idx)

        grads, losses = vmap(grad_and_value(loss_of), randomness="different")(params, fixed, batch)
        take_logged(lead)  # values logged under vmap are not recorded (module docstring)
        n = len(modules)
        per_worker = zip(*([None] * n if name in self.unused else grads[name].unbind(0) for name in self.names))
        return [StackedResult(b, loss, list(g)) for b, loss, g in zip(batches, losses.detach().unbind(0), per_worker)]


def training_loss_functional(module: Any, state: dict[str, torch.Tensor], batch: Any, batch_idx: int) -> torch.Tensor:
    """The module's ``training_step`` loss with ``state`` standing in for its parameters and
    buffers. (``torch.func.functional_call`` does this around ``forward``; the loss comes from
    ``training_step``, so the same reparametrisation is applied around that call.)"""
    with _reparametrize_module(module, state, tie_weights=True):
        return training_loss(module, batch, batch_idx)


def one_gradient(module: Any, batch: Any, batch_idx: int) -> StackedResult:
    """One worker's share computed alone (a group whose batches cannot be stacked)."""
    loss = training_loss(module, batch, batch_idx)
    grads = torch.autograd.grad(loss, trainable(module), allow_unused=True)
    return StackedResult(batch, loss.detach(), list(grads))


def draw_batches(shards: Sequence[ShardedBatches], device: torch.device) -> tuple[Any, list[Any]]:
    """Each shard's next batch on ``device``, and the batches stacked along a new first dimension
    (None where they cannot be). From a ``TensorDataset`` (whose batches are gathered, not
    collated: ``collate_indices``), one gather for all, the workers' batches views of its rows."""
    dataset = shards[0].dataset
    if isinstance(dataset, TensorDataset) and all(s.dataset is dataset for s in shards):
        index = torch.from_numpy(np.concatenate([s.next_indices() for s in shards]))
        stacked = [move_to(t[index], device).view(len(shards), -1, *t.shape[1:]) for t in dataset.tensors]
        return stacked, [list(parts) for parts in zip(*(x.unbind(0) for x in stacked))]
    batches = [move_to(next(s), device) for s in shards]
    try:
        return stack_batches(batches), batches
    except ValueError:  # batches of different shapes (a ragged collate)
        return None, batches


def stack_batches(batches: Sequence[Any]) -> Any:
    """The workers' collated batches stacked along a new first dimension, leaf by leaf;
    ``ValueError`` when they are not tensors of one structure and shape."""
    flat = [pytree.tree_flatten(b) for b in batches]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        raise ValueError("the workers' batches differ in structure")
    leaves = []
    for parts in zip(*(f for f, _ in flat)):
        if not all(isinstance(p, torch.Tensor) for p in parts):
            raise ValueError(f"a batch holds a {type(parts[0]).__name__}, not a tensor")
        if any(p.shape != parts[0].shape for p in parts):
            raise ValueError("the workers' batches differ in shape")
        leaves.append(torch.stack(parts))
    return pytree.tree_unflatten(leaves, spec)


def _fixed_tensors(modules: Sequence[Any]) -> dict[str, list[torch.Tensor]]:
    """Per name, each module's frozen parameters and buffers (passed, not differentiated)."""
    out: dict[str, list[torch.Tensor]] = {}
    for m in modules:
        for n, p in m.named_parameters():
            if not p.requires_grad:
                out.setdefault(n, []).append(p)
        for n, b in m.named_buffers():
            out.setdefault(n, []).append(b)
    return out


def _fingerprint(value: Any) -> Any:
    """What tells whether an attribute changed: a tensor's values, a container's length and
    items (by identity), a plain value itself, any other object's identity."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (int, float, complex, str, bytes, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return type(value), tuple(map(id, value))
    if isinstance(value, dict):
        return dict, tuple(value), tuple(map(id, value.values()))
    return id(value)


def _attribute_fingerprints(module: Any) -> dict[tuple[str, str], tuple[int, Any]]:
    """The public attributes of every submodule (not parameters, buffers or submodules, which
    live in nn.Module's private dicts; Lightning's own state is private too)."""
    return {(prefix, name): (id(value), _fingerprint(value))
            for prefix, sub in module.named_modules() for name, value in vars(sub).items()
            if not name.startswith("_")}


def _changed_attribute(before: dict[tuple[str, str], tuple[int, Any]],
                       after: dict[tuple[str, str], tuple[int, Any]]) -> str | None:
    """The first attribute that a training step set, rebound or changed, as ``sub.name``."""
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        same = old is not None and new is not None and old[0] == new[0] and (
            torch.equal(old[1], new[1]) if isinstance(old[1], torch.Tensor) and isinstance(new[1], torch.Tensor)
            else type(old[1]) is type(new[1]) and (old[1] == new[1] or old[1] != old[1] and new[1] != new[1]))
        if not same:
            return ".".join(k for k in key if k)
    return None


def stacking_refusal(module: Any, dataset: Dataset, collate: Callable[[list], Any], batch_size: int, seed: int,
                     device: torch.device | str) -> tuple[str | None, frozenset[str]]:
    """Why the stacked path would not be exact for ``module`` (or None), and the trainable
    parameters that take no part in its loss: two copies of the module (the second's
    parameters moved a little, so the replicas differ), two shards' batches, gradients and
    losses by ``StackedGradients`` against one by one; buffers must not change in the forward.
    The random number generators are left as they were."""
    base = base_class(module)
    for hook in _EARLY_HOOKS:
        if getattr(type(module), hook, None) is not getattr(base, hook, None):
            return f"the module overrides {hook}, which must run before its own gradient", frozenset()
    try:
        shards = [ShardedBatches(dataset, w, 2, batch_size, seed + 11, collate) for w in range(2)]
    except ValueError:
        return "the training set holds fewer than two workers' batches", frozenset()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # the generators left as they were
        try:
            probes = [probe_copy(module), probe_copy(module)]
            with torch.no_grad():
                for i, p in enumerate(trainable(probes[1])):
                    p.add_(0.01 * torch.cos(torch.arange(p.numel(), device=p.device, dtype=p.dtype) + i).view_as(p))
            batches = [move_to(collate_indices(dataset, s.next_indices(), collate), device) for s in shards]
            singles, unused = [], set()
            for probe, batch in zip(probes, batches):
                before = [b.detach().clone() for b in probe.buffers()]
                attributes = _attribute_fingerprints(probe)
                for p in probe.parameters():
                    p.grad = None
                loss = training_loss(probe, batch, 0)
                loss.backward()
                if any(not torch.equal(b0, b1) for b0, b1 in zip(before, probe.buffers())):
                    return "the module's forward updates its buffers (running statistics)", frozenset()
                changed = _changed_attribute(attributes, _attribute_fingerprints(probe))
                if changed is not None:
                    return (f"training_step changes the module's attribute {changed!r} (stacked, it would run once "
                            f"for all workers, on batched values)"), frozenset()
                unused |= {n for n, p in probe.named_parameters() if p.requires_grad and p.grad is None}
                singles.append((loss.detach(), [p.grad for n, p in probe.named_parameters() if p.requires_grad]))
            stacked = StackedGradients(probes[0], frozenset(unused)).compute(probes, batches, 0)
        except Exception as exc:  # noqa: BLE001 - any refusal of vmap or of the module: per-worker compute
            return f"vmap over the module's training_step failed ({type(exc).__name__}: {str(exc)[:200]})", frozenset()
    for (loss, grads), result in zip(singles, stacked):
        pairs = [(loss, result.loss)] + [(g, s) for g, s in zip(grads, result.grads) if g is not None]
        for expected, got in pairs:
            assert got is not None
            if not torch.allclose(got, expected, rtol=_RTOL, atol=_ATOL * max(1.0, float(expected.abs().max()))):
                worst = float((got - expected).abs().max())
                return f"vmap's gradient differs from the per-worker one by {worst:.3g}", frozenset()
    return None, frozenset(unused)
