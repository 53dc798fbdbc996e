"""A server started by ``syncbench ui`` or ``syncbench dashboard`` dies with the command that
started it, even when that command is killed with SIGKILL (no handler runs then).

The server runs in a process group of its own (so that Ctrl-C in the terminal reaches only the
command, which stops it in order), and MLflow's server starts helpers of its own (uvicorn, job
consumers) in that group. A guard process, started with PR_SET_PDEATHSIG, gets SIGTERM when the
command dies and ends the whole group: SIGTERM, then SIGKILL after ``GRACE_S``. While the command
lives, the guard only waits (one check a second of whether the group is still there).

    python -m syncbench.analysis.server_guard PGID PARENT_PID
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_S = 5.0  # how long the server group gets to stop after SIGTERM before SIGKILL


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGTERM) in the guard (Linux): its parent's death is its signal."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def start_guard(pgid: int) -> subprocess.Popen:
    """Start the guard of process group ``pgid`` (the server's); stop it with ``release``."""
    return subprocess.Popen([sys.executable, "-m", "syncbench.analysis.server_guard", str(pgid), str(os.getpid())],
                            preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL)


def release(guard: subprocess.Popen) -> None:
    """The command stopped the server itself: the guard goes without touching anything."""
    with contextlib.suppress(ProcessLookupError):
        guard.send_signal(signal.SIGUSR1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        guard.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def end_group(pgid: int, grace_s: float = GRACE_S) -> None:
    """SIGTERM to the group, then SIGKILL to what is left after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def guard(pgid: int, parent: int) -> int:
    released: list[int] = []
    signal.signal(signal.SIGUSR1, lambda *_: released.append(1))
    signal.signal(signal.SIGTERM, lambda *_: end_group(pgid) or sys.exit(0))  # the command died
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to handle
    if os.getppid() != parent:  # the command died before PR_SET_PDEATHSIG took effect
        end_group(pgid)
        return 0
    while not released and _group_alive(pgid):
        time.sleep(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(guard(int(sys.argv[1]), int(sys.argv[2])))
