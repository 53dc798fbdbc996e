"""The watchdog of a local dist run: a small process that outlives a launcher killed with
SIGKILL (which no handler sees) and ends what it left behind -- the MLflow run, RUNNING forever
otherwise, is marked KILLED, and the run's control folder ``dist/<run_id>/`` is removed.

The launcher starts it once the run exists (``start_watchdog``) and holds the write end of a
pipe that is the watchdog's stdin. A launcher that ends in any way it controls writes ``done``
(``Watchdog.release``): it has recorded the run itself. A launcher that dies closes the pipe
without a word; the ranks die with it (PR_SET_PDEATHSIG), and the watchdog marks the run within
``MARK_WITHIN_S`` seconds (its imports and one store write). It runs in a session of its own, so
a Ctrl-C to the terminal reaches the launcher, which records the stop, not the watchdog."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MARK_WITHIN_S = 30  # the stated bound, launcher death -> run KILLED: 10 s for the ranks to go, then imports and one write
DONE = b"done"


class Watchdog:
    """The launcher's end of the pipe to its watchdog process."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    def release(self) -> None:
        """The run is recorded: the watchdog exits without touching anything."""
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.write(DONE)  # type: ignore[union-attr]
            self.process.stdin.close()  # type: ignore[union-attr]


def start_watchdog(tracking_uri: str, run_id: str, control: Path) -> Watchdog:
    """Start the watchdog of run ``run_id`` (see the module docstring)."""
    process = subprocess.Popen([sys.executable, "-m", "syncbench.experiments.procs.watchdog", tracking_uri, run_id,
                                str(control)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    return Watchdog(process)


def watch(tracking_uri: str, run_id: str, control: str) -> int:
    """Wait for the launcher's word or its death; on its death end the run and clean up."""
    said = sys.stdin.buffer.read()  # returns when the launcher closes the pipe, or its process ends
    if said.startswith(DONE):
        return 0
    _wait_for_ranks(Path(control) / "workers.json")  # rank 0 may still be recording the run itself
    from syncbench.experiments.recording import open_client

    client = open_client(tracking_uri)
    with contextlib.suppress(Exception):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "outcome", "killed")
            client.set_tag(run_id, "syncbench.error", "its launcher was killed (SIGKILL or a crash) before it could "
                           "record the run; marked by the run's watchdog")
            client.set_terminated(run_id, "KILLED")
    shutil.rmtree(control, ignore_errors=True)
    return 0


def _wait_for_ranks(pids_file: Path, within_s: float = 10.0) -> None:
    """Until the run's workers (``workers.json``) are gone, at most ``within_s`` seconds: they
    die with their parent (PR_SET_PDEATHSIG), forked ones once the forkserver notices."""
    try:
        pids = [int(p) for p in json.loads(pids_file.read_text())]
    except (OSError, ValueError, TypeError):
        return
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = False
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                pass
            except PermissionError:
                alive = True
        if not alive:
            return
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(watch(*sys.argv[1:4]))
