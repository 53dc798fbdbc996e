"""The sim backend's batched path (``cluster.sim.batching: auto``): where a strategy keeps every
replica identical (``Strategy.replicas_shareable``: sync without compression), one replica and
one optimizer stand for all N workers, and each update's gradient is computed in one
forward/backward over the concatenated batches of the workers that count (with backup workers:
the kept ones, those whose computation the clock finished before the quorum).

This is exact where the module's gradient on a concatenated batch is the mean of its gradients
on the parts -- a mean-reduced loss over samples computed independently of each other. That is
checked once per run on the module itself (``batching_refusal``: two shards' batches, both ways,
on a copy); a module that fails it (BatchNorm in training mode, a summed loss, a ``training_step``
that fails on a larger batch) runs per worker, said once in the log and recorded as the tag
``syncbench.sim.batching``.

Random layers: the check runs with ``torch.nn`` dropout layers off (a concatenated batch draws
its masks in one call, N batches in N calls: the same distribution, different numbers). What is
reproduced: a run is bit-for-bit reproducible within a mode (batched or per-worker); across
modes the Dropout masks differ, so runs agree in distribution, not bit for bit (docs/performance.md).
A module that draws random numbers some other way than the dropout layers fails the check and
runs per worker.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from syncbench.experiments.sharding import ShardedBatches, collate_indices
from syncbench.strategies.lightning_bridge import TrainerStandIn, take_logged, training_loss
from syncbench.strategies.program import gradient_payload

log = logging.getLogger(__name__)

BATCHING_TAG = "syncbench.sim.batching"  # batched | stacked | per-worker: <why>

_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
            torch.nn.FeatureAlphaDropout)

# the check's tolerance: a concatenated batch sums its samples' gradients in another order than
# N separate batches (float32 rounding, ~1e-7 relative); a summed loss or BatchNorm's batch
# statistics differ by far more
_RTOL, _ATOL = 1e-4, 1e-6


def move_to(batch: Any, device: torch.device | str) -> Any:
    """``batch`` (tensors, or lists/tuples/dicts of them) on ``device``; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def concatenated_batch(dataset: Dataset, indices: list[np.ndarray], collate: Callable[[list], Any],
                       device: torch.device | str) -> Any:
    """The workers' batches as one: their sample indices, in rank order, collated in one call
    (what ``torch.cat`` of their collated batches gives for the collates that concatenate)."""
    return move_to(collate_indices(dataset, np.concatenate(indices), collate), device)


class SharedOptimizer:
    """The one optimizer of the shared replica, as each worker's program sees it: every worker's
    program calls ``step()`` after the round's reduction; the first call of a round steps (the
    engine ``arm``s it when the round's gradient is in the replica), the others do nothing.
    Everything else is the ``ModuleOptimizer``'s."""

    def __init__(self, optimizer: Any):
        self.inner = optimizer
        self.armed = False

    def arm(self) -> None:
        self.armed = True

    def step(self, closure: Callable[[], Any] | None = None, lr_scale: float = 1.0) -> None:
        if self.armed:
            self.armed = False
            self.inner.step(closure, lr_scale=lr_scale)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _gradient_and_buffers(module: Any, batch: Any) -> torch.Tensor:
    for p in module.parameters():
        p.grad = None
    training_loss(module, batch, 0).backward()
    return gradient_payload(module)


def batching_refusal(module: Any, dataset: Dataset, collate: Callable[[list], Any], batch_size: int, seed: int,
                     device: torch.device | str) -> str | None:
    """Why the batched path would not be exact for ``module``, or None: the gradient (and float
    buffers after the forward) on two shards' batches concatenated, against the mean over the two
    batches one by one, each from the module's current state, on copies; the random number
    generators are left as they were."""
    try:
        shards = [ShardedBatches(dataset, w, 2, batch_size, seed + 7, collate) for w in range(2)]
    except ValueError:
        return "the training set holds fewer than two workers' batches"
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # the generators left as they were
            indices = [s.next_indices() for s in shards]
            payloads = []
            for part in indices:
                probe = probe_copy(module)
                payloads.append(_gradient_and_buffers(probe, move_to(collate_indices(dataset, part, collate), device)))
            probe = probe_copy(module)
            together = _gradient_and_buffers(probe, concatenated_batch(dataset, indices, collate, device))
    except Exception as exc:  # noqa: BLE001 - any failure of the module on a larger batch: per-worker compute
        return f"training_step on a concatenated batch failed ({type(exc).__name__}: {exc})"
    mean = torch.stack(payloads).mean(dim=0)
    if not torch.allclose(together, mean, rtol=_RTOL, atol=_ATOL * max(1.0, float(mean.abs().max()))):
        worst = float((together - mean).abs().max())
        batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
        why = "BatchNorm in training mode normalises by the batch's statistics" if batchnorm else \
            "the loss is not a mean over independent samples (a summed loss, batch statistics or random draws)"
        return f"the gradient of the concatenated batch differs from the mean of the workers' by {worst:.3g}: {why}"
    return None


def probe_copy(module: Any) -> Any:
    probe = copy.deepcopy(module)
    TrainerStandIn(probe).attach()
    for m in probe.modules():
        if isinstance(m, _DROPOUT):
            m.eval()  # the masks' numbers differ by construction; the rest must agree
    take_logged(probe)
    return probe


def describe_mode(shared: bool, refusal: str | None) -> str:
    """The value of the ``syncbench.sim.batching`` tag."""
    return "batched" if shared else f"per-worker: {refusal}"


def log_fallback(reason: str) -> None:
    """Said once per run, when the batched path was possible by strategy but not for the module."""
    log.warning("sim: computing per worker, not batched: %s", reason)
