"""What a sweep is launched with (``LaunchOptions``: the stores, ``--jobs``, the display, the
heartbeat timing) and what it comes back with (``SweepResult`` and its exit code). Light: the
command line reads these before it validates the spec."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncbench.experiments.config import ConfigError
from syncbench.experiments.workspace import default_optuna_storage, default_tracking_uri
from syncbench.sweeps.progress import Counts
from syncbench.sweeps.storage import normalize_url

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class LaunchOptions:
    workspace: Path
    storage_url: str
    tracking_uri: str
    jobs: int = 1
    bar: bool = True  # rich progress bar (on a terminal)
    lines: bool = True  # one line per finished trial
    table: bool = True  # the summary table at the end
    heartbeat_s: int = 5
    grace_s: int = 30
    poll_s: float = 1.0

    @classmethod
    def from_env(cls, workspace: Path, storage: str | None, tracking_uri: str | None, **kwargs: Any) -> "LaunchOptions":
        """Defaults from the workspace; heartbeat timing from $SYNCBENCH_SWEEP_HEARTBEAT_S and
        $SYNCBENCH_SWEEP_GRACE_S (a killed launcher's trials are retried after the grace)."""
        heartbeat_s = _env_int("SYNCBENCH_SWEEP_HEARTBEAT_S", 5)
        grace_s = _env_int("SYNCBENCH_SWEEP_GRACE_S", max(30, 3 * heartbeat_s))
        if grace_s <= heartbeat_s:
            raise ConfigError(f"SYNCBENCH_SWEEP_GRACE_S ({grace_s}) must exceed SYNCBENCH_SWEEP_HEARTBEAT_S ({heartbeat_s})")
        return cls(workspace=workspace, storage_url=normalize_url(storage or default_optuna_storage(workspace)),
                   tracking_uri=tracking_uri or default_tracking_uri(workspace), heartbeat_s=heartbeat_s,
                   grace_s=grace_s, poll_s=min(1.0, heartbeat_s), **kwargs)


@dataclass
class SweepResult:
    counts: Counts
    wall_s: float
    trials_run: int  # by this launcher
    trials_wall_s: float  # Σ of those trials' own wall time (execute_run's wall_s)
    parent_run_id: str
    interrupted: bool = False
    signum: int | None = None  # the signal that stopped the sweep (None: Ctrl-C before handlers, or none)
    disk_full: str | None = None  # why the sweep stopped early: the disk filled

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + self.signum if self.signum else EXIT_INTERRUPTED
        if self.disk_full:
            return EXIT_FAILED
        return EXIT_FAILED if self.counts.failed or self.counts.done < self.counts.total else EXIT_OK


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"${name}={raw!r}: expected a whole number of seconds") from None
    if value < 1:
        raise ConfigError(f"${name}={raw!r}: must be at least 1")
    return value
