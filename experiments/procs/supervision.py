"""The launcher's side of a local dist run: start N worker processes (forked from a
forkserver, or fresh interpreters from a daemonic process), each in a process group of its own,
watch their exit codes and heartbeats, pass a stop signal on, and name the rank that caused a
failure (killed by a signal > hung > raised an error)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from syncbench.experiments import signals
from syncbench.experiments.messages import plain
from syncbench.experiments.procs.control import read_error, write_json
from syncbench.experiments.procs.environment import ENV_WORKER, loopback_environment, threads_per_worker
from syncbench.experiments.procs.failures import is_comm_error
from syncbench.experiments.procs.heartbeat import read_heartbeat
from syncbench.experiments.procs.worker_main import worker_main
from syncbench.experiments.progress import RunProgress
from syncbench.experiments.tta import Evaluation

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PRELOAD = ["torch", "torch.distributed", "mlflow.tracking", "syncbench.experiments.procs.rank",
           "syncbench.experiments.procs.supervision"]  # this module: the forked workers start in it


def _forkserver_context(config: Any) -> Any:
    """Workers are forked from a forkserver that imported torch and the task (with its own
    Lightning package: either flavour) once (per launcher process): a fresh interpreter per
    worker would pay those imports every run."""
    ctx = mp.get_context("forkserver")
    module = config.task.module.partition(":")[0]
    data = config.task.data.partition(":")[0]
    with contextlib.suppress(Exception):
        ctx.set_forkserver_preload(PRELOAD + [module, data])
    return ctx


@contextlib.contextmanager
def _main_module_hidden():
    """Workers never need the launcher's ``__main__``; hiding it keeps multiprocessing from
    re-running a user's script (with or without a main guard) in every worker."""
    main = sys.modules.get("__main__")
    saved = {a: getattr(main, a) for a in ("__file__", "__spec__") if main is not None and hasattr(main, a)}
    try:
        if "__file__" in saved:
            del main.__file__
        if "__spec__" in saved:
            main.__spec__ = None
        yield
    finally:
        for attr, value in saved.items():
            setattr(main, attr, value)


class _Worker:
    """A started worker process with the ``Popen`` surface the watcher uses."""

    def __init__(self, process: Any):
        self.process = process

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def poll(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # its own process group
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> None:
        self.process.join(timeout)


def run_workers(control: Path, n: int, timeout_s: float, progress: bool, config: Any) -> dict[str, Any]:
    """Start N workers and watch them; returns {ok} or {message}."""
    for stale in list(control.glob("hb.*")) + list(control.glob("error.*")) + list(control.glob("result.json")):
        stale.unlink(missing_ok=True)
    port = free_port()
    threads = threads_per_worker(n)
    # a daemonic process (e.g. a pool worker running a sweep's trial) may not have
    # multiprocessing children: start fresh interpreters instead
    fork = not mp.current_process().daemon
    ctx = _forkserver_context(config) if fork else None
    procs: list[Any] = []
    try:
        for r in range(n):
            # started with SIGTERM/SIGINT ignored, as is the forkserver they fork from: a signal to
            # the launcher's process group (systemd, SLURM, GNU timeout) would otherwise kill the
            # forkserver, and with it (PR_SET_PDEATHSIG) every worker before rank 0 records the
            # run; each worker installs its own handler first thing (worker_main)
            with signals.shielded():
                if ctx is not None:
                    process = ctx.Process(target=_forked_worker,
                                          args=(str(control / "spec.json"), r, n, port, threads),
                                          name=f"syncbench-worker-{r}", daemon=False)
                    with _main_module_hidden():
                        process.start()
                    procs.append(_Worker(process))
                else:
                    procs.append(_spawn_worker(control, r, n, port, threads))
        write_json(control / "workers.json", [p.pid for p in procs])
        outcome = _watch(procs, control, timeout_s, progress, config)
        if "message" in outcome:  # what the user reads: gloo's source locations and sign-off left out
            outcome["message"] = plain(outcome["message"])
        return outcome
    except signals.Interrupted as exc:
        _stop_workers(procs, exc.signum)
        raise
    finally:
        _kill_all(procs)


STOP_WAIT_S = 15.0  # after a signal: how long the workers get to stop (rank 0 records the run KILLED)


def _stop_workers(procs: list[Any], signum: int, wait_s: float = STOP_WAIT_S) -> None:
    """Pass a stop signal on to every worker (each leads its own process group, out of the
    terminal's reach) and give them ``wait_s`` to end: rank 0 flushes its buffered metrics
    and records the run KILLED; the others just leave. A second signal to the launcher ends
    it at once (``syncbench.experiments.signals``), and the workers with it."""
    deadline = time.monotonic() + wait_s
    next_send = 0.0
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if time.monotonic() >= next_send:  # again each second: a worker still starting ignores it
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signum)
            next_send = time.monotonic() + 1.0
        time.sleep(0.05)


class _PopenWorker:
    """A worker started as ``python -m syncbench.experiments.procs.worker_main --worker SPEC --rank R``."""

    def __init__(self, popen: Any, log: Any):
        self.popen, self.log = popen, log

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def poll(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()

    def wait(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)
        self.log.close()


def _spawn_worker(control: Path, rank: int, world: int, port: int, threads: int) -> _PopenWorker:
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
               LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1", **loopback_environment())
    env[ENV_WORKER] = "1"
    log = open(control / f"rank{rank}.log", "wb")
    popen = subprocess.Popen([sys.executable, "-m", "syncbench.experiments.procs.worker_main", "--worker", str(control / "spec.json"),
                              "--rank", str(rank), "--threads", str(threads)],
                             env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    return _PopenWorker(popen, log)


def _kill_all(procs: list[Any]) -> None:
    """SIGKILL every worker that is still there (each leads its own process group)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(timeout=10)


def _forked_worker(spec_path: str, rank: int, world: int, port: int, threads: int) -> None:
    """Body of a forked worker: its own process group, dies with the launcher, env for
    ``init_process_group(init_method="env://")``, output to ``rank{R}.log``."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0",
                      OMP_NUM_THREADS=str(threads), **loopback_environment())
    os.environ[ENV_WORKER] = "1"
    control = Path(spec_path).parent
    fd = os.open(control / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    worker_main(["--worker", spec_path, "--rank", str(rank), "--threads", str(threads)])


def _process_state(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except Exception:  # noqa: BLE001
        return "unknown"


def _watch(procs: list[Any], control: Path, timeout_s: float, progress: bool,
           config: Any) -> dict[str, Any]:
    n = len(procs)
    t_start = time.time()
    startup_limit = 120.0 + timeout_s
    first_problem: float | None = None
    last_steps, last_progress = [0] * n, time.time()
    bar = _LauncherProgress(config, control) if progress else None
    try:
        while True:
            codes = [p.poll() for p in procs]
            now = time.time()
            if codes[0] == 0 and (control / "result.json").exists():
                # rank 0 recorded the run; give the others the collective timeout to exit
                deadline = now + timeout_s
                while any(p.poll() is None for p in procs) and time.time() < deadline:
                    time.sleep(0.02)
                return {"ok": True}
            beats = [read_heartbeat(control, r) for r in range(n)]
            for r, (_, steps) in enumerate(beats):
                if steps != last_steps[r]:
                    last_steps[r], last_progress = steps, now
            dead = [r for r, c in enumerate(codes) if c is not None and c != 0]
            silent = [r for r, (age, _) in enumerate(beats)
                      if codes[r] is None and ((age is not None and age > timeout_s)
                                               or (age is None and now - t_start > startup_limit))]
            exited_ok_early = [r for r, c in enumerate(codes) if c == 0 and r != 0]
            stalled = now - last_progress > 2 * timeout_s + 30 and all(a is not None for a, _ in beats)
            if dead or silent or stalled or (codes[0] == 0 and not (control / "result.json").exists()):
                if first_problem is None:
                    first_problem = now
                # give the other ranks a moment to report, so the root cause can be named
                if now - first_problem < 1.0 and not silent and len(dead) < n:
                    time.sleep(0.05)
                    continue
                return {"ok": False, **_diagnose(procs, control, timeout_s, stalled, exited_ok_early)}
            if bar is not None:
                bar.update()
            time.sleep(0.05)
    finally:
        if bar is not None:
            bar.close()


def _diagnose(procs: list[Any], control: Path, timeout_s: float, stalled: bool,
              exited_early: list[int]) -> dict[str, Any]:
    """Name the rank that caused the failure: killed by a signal > hung > raised an error."""
    n = len(procs)
    codes = [p.poll() for p in procs]
    beats = [read_heartbeat(control, r) for r in range(n)]
    errors = {r: read_error(control, r) for r in range(n)}
    killed = [r for r, c in enumerate(codes) if c is not None and c < 0]
    if killed:
        r = killed[0]
        try:
            name = signal.Signals(-codes[r]).name
        except ValueError:
            name = f"signal {-codes[r]}"
        return {"message": f"worker rank {r} (pid {procs[r].pid}) died: killed by {name}"
                           + _secondary(errors, exclude=r)}
    someone_failed = any(c not in (None, 0) for c in codes)
    hung = []
    for r, (age, _) in enumerate(beats):
        if codes[r] is not None:
            continue
        state = _process_state(procs[r].pid)
        if state == "stopped" or age is None or age > (1.0 if someone_failed else timeout_s):
            hung.append((r, age, state))
    if hung:
        r, age, state = hung[0]
        when = "during start-up" if age is None else f"no heartbeat for {age:.1f} s"
        return {"message": f"worker rank {r} (pid {procs[r].pid}) hung ({when}; process state: {state}); "
                           f"cluster.collective_timeout_s={timeout_s:g}" + _secondary(errors, exclude=r)}
    failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
    if failed:
        if any(e and "address already in use" in e.get("message", "").lower() for e in errors.values()):
            return {"message": "rendezvous port was taken", "retry_port": True}
        root = [r for r in failed if errors.get(r) and not is_comm_error(errors[r]["message"])]
        r = (root or failed)[0]
        err = errors.get(r)
        what = err["message"] if err else f"exited with code {codes[r]} without a report (see rank{r}.log)"
        return {"message": f"worker rank {r} (pid {procs[r].pid}) failed: {what}" + _secondary(errors, exclude=r)}
    if exited_early or (codes[0] == 0):
        return {"message": "worker rank 0 exited without recording a result" if codes[0] == 0 else
                f"worker rank(s) {exited_early} exited before the run ended"}
    if stalled:
        return {"message": f"no worker made progress for {2 * timeout_s + 30:g} s (deadlock?)"}
    return {"message": "the dist run failed for an unknown reason"}


def _secondary(errors: dict[int, dict[str, Any] | None], exclude: int) -> str:
    others = [(r, e["message"]) for r, e in errors.items() if e and r != exclude]
    if not others:
        return ""
    r, msg = others[0]
    return f" (then rank {r}: {msg.splitlines()[0][:300]})"


class _LauncherProgress:
    """rich progress in the launcher from rank 0's progress file."""

    def __init__(self, config: Any, control: Path):
        self.control, self.bar, self._last = control, None, 0.0
        try:
            self.bar = RunProgress(config, True).__enter__()
        except Exception:  # noqa: BLE001 - progress is optional
            self.bar = None

    def update(self) -> None:
        if self.bar is None or time.time() - self._last < 0.2:
            return
        self._last = time.time()
        try:
            data = json.loads((self.control / "progress.json").read_text())
        except (OSError, ValueError):
            return
        self.bar.update(Evaluation(data["clock_s"], data["updates"], data["samples"], data["metrics"]))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
