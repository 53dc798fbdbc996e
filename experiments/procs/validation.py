"""What the dist backend refuses before any run exists (``ConfigError``, exit 2): an emulation
mode it does not know, what the strategy declares this backend cannot do, shards too small
for the batch size."""

from __future__ import annotations

import os
from typing import Any

from syncbench.experiments.config import ConfigError
from syncbench.experiments.procs.devices import choose_rank_device, cuda_devices, requested_device
from syncbench.experiments.procs.environment import ENV_EMULATE
from syncbench.experiments.sharding import ShardedBatches
from syncbench.strategies import STRATEGIES


def parse_emulate(value: str | None) -> tuple[bool, bool]:
    """(stragglers, network) from ``all`` | ``none`` | ``stragglers`` | ``network`` | a comma list."""
    value = (value or os.environ.get(ENV_EMULATE) or "all").strip().lower()
    parts = {p.strip() for p in value.split(",") if p.strip()}
    if not parts <= {"all", "none", "stragglers", "network"}:
        raise ConfigError(f"{ENV_EMULATE}={value!r}: expected all, none, stragglers, network or a comma list")
    if "all" in parts:
        return True, True
    return "stragglers" in parts, "network" in parts


def validate_dist_config(config: Any) -> None:
    """What the strategy declares this backend cannot do (config validation checks it too;
    under torchrun the world size is known only here)."""
    reason = STRATEGIES[config.strategy.name].unsupported(config.strategy.options(), "dist", config.cluster.workers)
    if reason:
        raise ConfigError(reason)


def check_local_devices(local_ranks: int, config_device: str = "auto") -> None:
    """N ranks on this machine need N GPUs under NCCL (docs/scaling-out.md): refused before any
    run exists, rather than a rank failing at start-up."""
    try:
        choose_rank_device(local_ranks - 1, local_ranks, cuda_devices(), requested_device(config_device))
    except ValueError as exc:
        raise ConfigError(f"cluster.workers={local_ranks}: {exc}") from None


def check_shards(task: Any, config: Any, world: int) -> None:
    try:
        ShardedBatches(task.train_set, 0, world, config.batch_size, config.seed, task.collate)
    except ValueError as exc:
        raise ConfigError(f"batch_size: {exc}") from None
