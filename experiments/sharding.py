"""Each worker reads its own shard of the training data: every sample once per epoch across
workers, the same shards in both backends."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset, default_collate


def collate_indices(dataset: Dataset, idx: np.ndarray, collate: Callable[[list], Any]) -> Any:
    if isinstance(dataset, TensorDataset):  # fast path: one gather per tensor
        index = torch.from_numpy(idx)
        return [t[index] for t in dataset.tensors]
    return collate([dataset[int(i)] for i in idx])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded permutation of one epoch, computed once for all N workers' shards (read-only)."""
    perm = np.random.default_rng([seed, 31337, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


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
        self.n_samples = len(dataset)  # type: ignore[arg-type]
        self.shard_len = self.n_samples // n_workers
        self.steps_per_epoch = self.shard_len // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size ({batch_size}) x cluster.workers ({n_workers}) exceeds the training set "
                f"({len(dataset)} samples): a worker would have no full batch"  # type: ignore[arg-type]
            )
        self.epoch, self.position = 0, 0
        self._shard = self._make_shard()

    def _make_shard(self) -> np.ndarray:
        perm = _epoch_permutation(self.seed, self.epoch, self.n_samples)
        # a copy: a view would keep the whole permutation alive for every worker (N x the data set)
        return perm[self.worker :: self.n_workers][: self.shard_len].copy()

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
