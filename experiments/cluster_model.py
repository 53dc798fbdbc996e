"""The cluster model both backends share: stragglers, and the alpha-beta network.

The sim backend charges these times on its virtual clock; the dist backend pads real
compute and communication with sleeps up to them (emulation).

Compute time per worker step = ``step_s`` x the worker's straggler factor (seeded).
Communication follows the alpha-beta model: a ring all-reduce of S bytes over N workers
takes 2(N-1)*alpha + 2(N-1)/N * S/beta; a parameter-server push or pull takes
alpha + S/beta on the server's single link, where transfers queue (FIFO).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from syncbench.experiments.config import (
    BimodalStragglers,
    LognormalStragglers,
    NetworkConfig,
    PersistentStragglers,
)
from syncbench.strategies import compression


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

    def low_factor(self) -> float:
        """The factor distribution's 1st percentile (1 for factors that are never below 1)."""
        cfg = self.config
        if isinstance(cfg, LognormalStragglers):
            return float(math.exp(cfg.sigma * -2.3263478740408408 - cfg.sigma**2 / 2))
        return 1.0

    def expected_factor(self, worker: int) -> float:
        """The mean of ``worker``'s factors: lognormal factors have mean 1; persistent ones are
        fixed; a bimodal step is ``slowdown`` times slower with probability p."""
        cfg = self.config
        if isinstance(cfg, PersistentStragglers):
            return cfg.slowdown if worker in self.slow else 1.0
        if isinstance(cfg, BimodalStragglers):
            return 1.0 + cfg.p * (cfg.slowdown - 1.0)
        return 1.0

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


def ring_allgather_s(n_workers: int, nbytes: int, net: NetworkConfig) -> float:
    """Alpha-beta time of a ring all-gather of ``nbytes`` per worker: N-1 steps, each
    forwarding one worker's block; zero for one worker."""
    if n_workers <= 1:
        return 0.0
    return (n_workers - 1) * net.latency_s + (n_workers - 1) * nbytes / net.bytes_per_s


def point_to_point_s(nbytes: int, net: NetworkConfig) -> float:
    """Alpha-beta time of one push or pull on the parameter server's link."""
    alpha, bytes_per_s = net.server_link
    return alpha + nbytes / bytes_per_s


class ServerLink:
    """The parameter server's one link: transfers are served first come, first served."""

    def __init__(self) -> None:
        self.free_at = 0.0

    def reserve(self, request_t: float, duration: float) -> tuple[float, float]:
        """Queue a transfer requested at ``request_t``; returns its (start, end)."""
        start = max(request_t, self.free_at)
        self.free_at = start + duration
        return start, self.free_at


def exchange_model_s(collectives: list[Any], world: int, net: NetworkConfig) -> float:
    """The alpha-beta time of a compressed exchange's collectives (``syncbench.strategies.compression``
    ``AllReduce`` / ``AllGather``): what the sim charges and the dist emulation pads up to."""
    return sum(ring_allreduce_s(world, compression.nbytes(c.tensor), net) if isinstance(c, compression.AllReduce)
               else ring_allgather_s(world, compression.nbytes(c.tensor), net) for c in collectives)
