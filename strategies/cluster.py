"""The simulated cluster: virtual workers, their data shards, stragglers and the network.

Compute time per worker step = ``step_s`` x the worker's straggler factor (seeded).
Communication follows the alpha-beta model: a ring all-reduce of S bytes over N workers
takes 2(N-1)*alpha + 2(N-1)/N * S/beta; a parameter-server push or pull takes
alpha + S/beta on the server's single link, where transfers queue (FIFO).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from experiments.config import (
    BimodalStragglers,
    LognormalStragglers,
    NetworkConfig,
    PersistentStragglers,
    RunConfig,
)
from experiments.lightning_bridge import is_finite, training_loss


class StragglerModel:
    """Per-worker, per-step compute-time factors, reproducible from the run seed."""

    def __init__(self, config: Any, n_workers: int, seed: int):
        self.config = config
        self.rngs = [np.random.default_rng([seed, 7919, w]) for w in range(n_workers)]
        self.slow: set[int] = set()
        if isinstance(config, PersistentStragglers):
            n_slow = int(math.floor(config.slow_fraction * n_workers + 0.5))
            chosen = np.random.default_rng([seed, 104729]).permutation(n_workers)[:n_slow]
            self.slow = {int(w) for w in chosen}

    def factor(self, worker: int) -> float:
        cfg = self.config
        if isinstance(cfg, LognormalStragglers):
            return float(np.exp(cfg.sigma * self.rngs[worker].standard_normal() - cfg.sigma**2 / 2))
        if isinstance(cfg, PersistentStragglers):
            return cfg.slowdown if worker in self.slow else 1.0
        if isinstance(cfg, BimodalStragglers):
            return cfg.slowdown if self.rngs[worker].random() < cfg.p else 1.0
        return 1.0


def ring_allreduce_s(n_workers: int, nbytes: int, net: NetworkConfig) -> float:
    """Alpha-beta time of a ring all-reduce (Patarasuk & Yuan 2009); zero for one worker."""
    if n_workers <= 1:
        return 0.0
    return 2 * (n_workers - 1) * net.latency_s + 2 * (n_workers - 1) / n_workers * nbytes / net.bytes_per_s


def ring_allreduce_bytes(n_workers: int, nbytes: int) -> int:
    """Bytes put on the wire by a ring all-reduce, summed over all workers."""
    return 0 if n_workers <= 1 else int(2 * (n_workers - 1) * nbytes)


def point_to_point_s(nbytes: int, net: NetworkConfig) -> float:
    return net.latency_s + nbytes / net.bytes_per_s


class ServerLink:
    """The parameter server's one link: transfers are served first come, first served."""

    def __init__(self) -> None:
        self.free_at = 0.0

    def reserve(self, request_t: float, duration: float) -> tuple[float, float]:
        """Queue a transfer requested at ``request_t``; returns its (start, end)."""
        start = max(request_t, self.free_at)
        self.free_at = start + duration
        return start, self.free_at


def collate_indices(dataset: Dataset, idx: np.ndarray, collate: Callable[[list], Any]) -> Any:
    if isinstance(dataset, TensorDataset):  # fast path: one gather per tensor
        index = torch.from_numpy(idx)
        return [t[index] for t in dataset.tensors]
    return collate([dataset[int(i)] for i in idx])


class ShardedBatches:
    """Worker ``w`` of ``n`` reads ``perm[w::n]`` of a seeded per-epoch permutation.

    Every sample is read once per epoch across workers; shards are cut to the same
    length and batches to the same size, so N shards at batch b cover exactly what one
    worker at batch N*b covers (the basis of "sync at N = large batch").
    """

    def __init__(self, dataset: Dataset, worker: int, n_workers: int, batch_size: int, seed: int,
                 collate: Callable[[list], Any] = default_collate):
        self.dataset, self.worker, self.n_workers = dataset, worker, n_workers
        self.batch_size, self.seed, self.collate = batch_size, seed, collate
        self.shard_len = len(dataset) // n_workers  # type: ignore[arg-type]
        self.steps_per_epoch = self.shard_len // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size ({batch_size}) x cluster.workers ({n_workers}) exceeds the training set "
                f"({len(dataset)} samples): a worker would have no full batch"  # type: ignore[arg-type]
            )
        self.epoch, self.position = 0, 0
        self._shard = self._make_shard()

    def _make_shard(self) -> np.ndarray:
        perm = np.random.default_rng([self.seed, 31337, self.epoch]).permutation(len(self.dataset))  # type: ignore[arg-type]
        return perm[self.worker :: self.n_workers][: self.shard_len]

    def next_indices(self) -> np.ndarray:
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._shard = self._make_shard()
        b = self.batch_size
        idx = self._shard[self.position * b : (self.position + 1) * b]
        self.position += 1
        return idx

    def __next__(self) -> Any:
        return collate_indices(self.dataset, self.next_indices(), self.collate)

    def __iter__(self) -> Iterator[Any]:
        return self


@dataclass
class TimeLedger:
    """Cumulative compute / communication / waiting seconds per worker."""

    n_workers: int
    compute: np.ndarray = field(init=False)
    comm: np.ndarray = field(init=False)
    wait: np.ndarray = field(init=False)
    comm_bytes: int = 0

    def __post_init__(self) -> None:
        self.compute, self.comm, self.wait = (np.zeros(self.n_workers) for _ in range(3))


@dataclass
class SimWorker:
    index: int
    batches: ShardedBatches
    steps: int = 0  # gradients computed by this worker (its batch_idx)


class SimContext:
    """Everything a simulated strategy needs: the module, N workers with their data,
    the clock's cost model and the ledger it fills."""

    def __init__(self, config: RunConfig, module: pl.LightningModule, train_set: Dataset, step_s: float,
                 collate: Callable[[list], Any] = default_collate):
        n = config.cluster.workers
        self.config, self.module, self.n_workers, self.step_s = config, module, n, step_s
        self.batch_size = config.batch_size
        self.net = config.cluster.network
        self.stragglers = StragglerModel(config.cluster.stragglers, n, config.seed)
        self.workers = [
            SimWorker(w, ShardedBatches(train_set, w, n, config.batch_size, config.seed, collate)) for w in range(n)
        ]
        self.ledger = TimeLedger(n)
        self.param_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
        self.recent_losses: list[float] = []
        self.diverged = False

    def compute_time(self, worker: int) -> float:
        return self.step_s * self.stragglers.factor(worker)

    def accumulate_gradient(self, module: pl.LightningModule, worker: SimWorker) -> float:
        """Forward/backward of ``worker``'s next batch on ``module``, adding into ``.grad``."""
        batch = next(worker.batches)
        loss = training_loss(module, batch, worker.steps)
        worker.steps += 1
        value = float(loss.detach())
        self.recent_losses.append(value)
        if not is_finite(value):
            self.diverged = True
            return value
        loss.backward()
        return value

    def skip_batch(self, worker: SimWorker) -> None:
        """A dropped (backup) worker's batch is consumed but never computed."""
        worker.batches.next_indices()
        worker.steps += 1

    def take_train_loss(self) -> float | None:
        losses, self.recent_losses = self.recent_losses, []
        return float(np.mean(losses)) if losses else None


class EventQueue:
    """Discrete events in (time, insertion order): ties resolve deterministically."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = 0

    def push(self, time: float, payload: Any) -> None:
        heapq.heappush(self._heap, (time, self._seq, payload))
        self._seq += 1

    def peek_time(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def pop(self) -> tuple[float, Any]:
        time, _, payload = heapq.heappop(self._heap)
        return time, payload

    def __len__(self) -> int:
        return len(self._heap)
