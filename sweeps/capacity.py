"""How many trials this machine can run at once: ``--jobs`` capped by its cores, by the memory a
trial process needs, and by the trials there are to run (issue 27: ``--jobs 1000`` on a one-trial
spec started 1,000 interpreters that each imported torch, and the OOM killer ended the launcher).

Each pool worker is a spawned interpreter that imports torch, Lightning, MLflow and the task
(550-620 MB each, measured in that report), and a sim trial trains on one thread
(``syncbench.experiments.task.one_thread``): more workers than cores only time-share them, and
more than memory holds is fatal. The memory per worker is measured on the launcher itself once it
has imported the task and calibrated it (the same imports and the same model a worker holds),
never taken below ``WORKER_BYTES_FLOOR``."""

from __future__ import annotations

import os
from dataclasses import dataclass

from syncbench.experiments.workspace import available_memory_bytes

# a spawned trial process with torch, Lightning and MLflow imported: 550-620 MB measured (issue 27)
WORKER_BYTES_FLOOR = 600 * 1024**2
MEMORY_SHARE = 0.8  # of the memory available when the pool starts: the launcher and the OS keep the rest


@dataclass(frozen=True)
class JobsCap:
    """The number of trial processes to start, and why it is fewer than asked (or None)."""

    jobs: int
    reason: str | None = None


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a cgroup)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resident_bytes() -> int | None:
    """This process's resident set (``VmRSS``), or None where /proc has none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cap_jobs(requested: int, pending: int, *, cores: int | None = None, available: int | None = None,
             per_worker: int | None = None) -> JobsCap:
    """``requested`` (``--jobs``) capped by ``pending`` (the trials left to run), ``cores`` and
    ``available`` memory / ``per_worker`` bytes; each defaults to this machine as it is now."""
    cores = usable_cores() if cores is None else cores
    available = available_memory_bytes() if available is None else available
    per_worker = max(WORKER_BYTES_FLOOR, resident_bytes() or 0) if per_worker is None else per_worker
    limits = [(max(1, pending), f"{pending} trial(s) left to run"), (cores, f"{cores} usable core(s)")]
    if available is not None:
        fits = max(1, int(MEMORY_SHARE * available // per_worker))
        limits.append((fits, f"{available / 1024**3:.1f} GiB of memory available at about "
                             f"{per_worker / 1024**2:.0f} MiB per trial process"))
    jobs, why = min(limits, key=lambda item: item[0])
    if requested <= jobs:
        return JobsCap(requested)
    return JobsCap(jobs, why)
