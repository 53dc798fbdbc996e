"""SIGTERM and SIGINT, handled alike in every syncbench process.

Schedulers (SLURM, Kubernetes, systemd, CI time-outs) stop work with SIGTERM; a person
stops it with Ctrl-C (SIGINT). Either one makes ``run``, ``sweep`` and the dist backend
stop within seconds, flush what they measured, mark their MLflow runs KILLED (tag
``outcome=killed`` and ``syncbench.signal``), fail their in-flight Optuna trials so that a
rerun retries them at once, and exit with ``128 + signal`` (the shell's convention: 130
for SIGINT, 143 for SIGTERM). A second signal to a command-line process ends it at once
(``os._exit``): the way out when the orderly stop itself hangs; one that follows the
first within ``REPEAT_S`` is taken for the same request (GNU ``timeout`` signals the
process, then its whole group).

The handler never raises where nobody expects it: a process *arms* it around the code
that may be stopped in the middle (a training run) and polls :func:`received` elsewhere
(the sweep launcher's bookkeeping, a pool worker between trials). Sections that must not
be cut in two (creating an MLflow run, recording a finished one) run in :func:`deferred`:
a signal that arrives there is raised when the section ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 0.5  # a signal this soon after the first is the same request (see _handler)


class Interrupted(BaseException):
    """A stop requested by SIGTERM or SIGINT. A ``BaseException`` (like ``KeyboardInterrupt``)
    so that ``except Exception`` in user code and libraries does not swallow it; not a
    ``KeyboardInterrupt`` because Lightning turns those into ``sys.exit(1)``."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal_name(self.signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _State:
    signum: int | None = None  # the first signal received (None: none yet)
    armed = 0  # > 0: the handler raises Interrupted in the main thread
    deferred = 0  # > 0: hold the raise until the section ends
    second_exits = True  # a second signal ends the process at once
    installed = False
    first_at = 0.0  # time.monotonic() of the first signal


_state = _State()


def _handler(signum: int, _frame) -> None:
    if _state.signum is not None:
        # GNU timeout (CI time-outs) and some supervisors send the signal to the process and
        # then to its group within microseconds: one request, not a second one
        if _state.second_exits and time.monotonic() - _state.first_at >= REPEAT_S:
            with contextlib.suppress(OSError):
                os.write(2, f"\nsyncbench: second {signal_name(signum)}: stopping at once; a run or trial being "
                            f"recorded may be left RUNNING (rerun a sweep to retry it)\n".encode())
            os._exit(128 + signum)
        return
    _state.signum, _state.first_at = signum, time.monotonic()
    if _state.armed and not _state.deferred:
        raise Interrupted(signum)


def install(*, armed: bool = True, second_exits: bool = True) -> None:
    """Handle SIGTERM and SIGINT in this process (main thread only; elsewhere a no-op).

    ``armed``: raise :class:`Interrupted` at once wherever the main thread is (a ``run``);
    else only record the signal for :func:`received` / inside :func:`armed_section`.
    ``second_exits``: a second signal ends the process at once (command-line processes;
    worker processes, which the launcher stops and then kills, keep stopping in order)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _state.signum, _state.deferred = None, 0
    _state.armed = 1 if armed else 0
    _state.second_exits = second_exits
    for sig in HANDLED:
        signal.signal(sig, _handler)
    _state.installed = True


@contextlib.contextmanager
def handling(*, armed: bool = True, second_exits: bool = True) -> Iterator[None]:
    """:func:`install` for the duration of a command; the previous handlers come back after
    (a command run in-process, e.g. by a test, leaves the host process as it found it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in HANDLED}
    install(armed=armed, second_exits=second_exits)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _state.installed, _state.armed, _state.deferred, _state.signum = False, 0, 0, None


def received() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _state.signum


def check() -> None:
    """Raise :class:`Interrupted` if a stop was requested."""
    if _state.signum is not None:
        raise Interrupted(_state.signum)


@contextlib.contextmanager
def armed_section() -> Iterator[None]:
    """Inside, a signal raises :class:`Interrupted` at once (one already received raises on
    entry). A no-op where the handler is not installed."""
    if not _state.installed:
        yield
        return
    check()
    _state.armed += 1
    try:
        yield
    finally:
        _state.armed -= 1


@contextlib.contextmanager
def deferred(raise_at_end: bool = True) -> Iterator[None]:
    """A section a signal must not cut in two; a signal received inside is raised at its
    end (if the process is armed there; ``raise_at_end=False``: at the next :func:`poll`)."""
    _state.deferred += 1
    try:
        yield
    finally:
        _state.deferred -= 1
    if raise_at_end:
        poll()


def poll() -> None:
    """Raise :class:`Interrupted` if a signal was received and raising is armed here."""
    if _state.signum is not None and _state.armed and not _state.deferred:
        raise Interrupted(_state.signum)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Start child processes inside: they begin with SIGTERM and SIGINT *ignored* (an
    ignored disposition survives ``exec``; a blocked mask does not survive the way
    multiprocessing starts interpreters), so that a signal to the whole process group
    (Ctrl-C, ``kill -- -PGID``, GNU timeout, systemd) neither kills a child mid-import with a
    traceback nor kills multiprocessing's forkserver (and with it, through
    PR_SET_PDEATHSIG, every dist worker before rank 0 records the run). Each child installs
    its own handler once it can stop in order. In this process the signals are blocked
    meanwhile (Linux keeps a blocked signal pending even while it is ignored) and delivered
    to the handler when the section ends. Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def unblock() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
