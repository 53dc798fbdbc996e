"""Liveness of the dist backend's workers: a worker started by the launcher rewrites a file in
the control directory every ``HEARTBEAT_S`` (``FileHeartbeat``; the launcher reads its age,
``read_heartbeat``); under torchrun each rank advances a counter in the job's store
(``StoreHeartbeat``). Standard library only: a worker starts its heartbeat before it imports torch."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from syncbench.experiments.procs.control import write_json

HEARTBEAT_S = 0.25


class FileHeartbeat:
    """A daemon thread rewriting ``path`` every 0.25 s with (time, steps): a SIGSTOPped or
    dead process stops writing; the launcher reads the age. It also watches the launcher:
    a worker whose launcher is gone (even SIGKILLed) exits at once. PR_SET_PDEATHSIG alone
    cannot do that for forked workers, whose parent is the forkserver, and the forkserver
    outlives the launcher while workers hold its liveness pipe."""

    def __init__(self, path: Path, launcher_pid: int | None = None):
        self.path, self.steps, self.launcher_pid = path, 0, launcher_pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="syncbench-heartbeat", daemon=True)
        self._thread.start()

    def _launcher_gone(self) -> bool:
        if not self.launcher_pid:
            return False
        try:
            os.kill(self.launcher_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._launcher_gone():
                os._exit(3)
            try:
                write_json(self.path, [time.time(), self.steps])
            except OSError:
                pass
            self._stop.wait(HEARTBEAT_S)

    def stop(self) -> None:
        self._stop.set()


class StoreHeartbeat:
    """Under torchrun: a counter per rank in the job's c10d store, advanced every 0.25 s;
    rank 0 reads who stopped advancing when a collective fails."""

    def __init__(self, store: Any, rank: int):
        self.store, self.rank, self.steps = store, rank, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="syncbench-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(f"syncbench/hb/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store's host may be gone
                return
            self._stop.wait(HEARTBEAT_S)

    def stop(self) -> None:
        self._stop.set()

    def silent_ranks(self, world: int, window_s: float = 1.5) -> list[int]:
        try:
            before = [int(self.store.add(f"syncbench/hb/{r}", 0)) for r in range(world)]
            time.sleep(window_s)
            after = [int(self.store.add(f"syncbench/hb/{r}", 0)) for r in range(world)]
        except Exception:  # noqa: BLE001
            return []
        return [r for r in range(world) if after[r] == before[r] and r != self.rank]


def read_heartbeat(control: Path, rank: int) -> tuple[float | None, int]:
    """(age in seconds of the last heartbeat or None before the first, steps)."""
    try:
        t, steps = json.loads((control / f"hb.{rank}").read_text())
        return time.time() - float(t), int(steps)
    except (OSError, ValueError, TypeError):
        return None, 0
