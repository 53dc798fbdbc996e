"""What a process of the dist backend reads from its environment: the ``SYNCBENCH_DIST_*``
variables, torchrun's, and the cores it owns. Standard library only: a worker reads these
before it imports torch."""

from __future__ import annotations

import os

ENV_WORKER = "SYNCBENCH_DIST_WORKER"

ENV_EMULATE = "SYNCBENCH_DIST_EMULATE"

ENV_DEBUG = "SYNCBENCH_DIST_DEBUG_DIR"

ENV_DEVICE = "SYNCBENCH_DIST_DEVICE"  # auto (default) | cpu

ENV_BUSY = "SYNCBENCH_DIST_BUSY_STRAGGLERS"  # 0: emulated stragglers sleep even when they own their cores

ENV_THREADS = "SYNCBENCH_DIST_THREADS"  # intra-op threads per worker (default: cores owned / local workers)


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")) and ENV_WORKER not in os.environ


def cores_owned() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_worker(local_world: int) -> int:
    """One intra-op thread per core the worker owns (cores of this process's affinity mask
    divided among the workers of this machine); ``SYNCBENCH_DIST_THREADS`` overrides."""
    override = os.environ.get(ENV_THREADS)
    if override:
        return max(1, int(override))
    return max(1, cores_owned() // max(1, local_world))
