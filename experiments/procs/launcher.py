"""The dist backend: real worker processes, each running a Lightning Trainer with one of the
strategy's worker program (``syncbench.experiments.procs.worker.ProgramStrategy``), over torch.distributed (gloo on CPU, NCCL when the
module runs on CUDA).

Two ways in, one entry point (``execute_dist_run``, called by ``syncbench.experiments.run.execute_run``
when ``cluster.backend == "dist"``):

* **launcher** (``syncbench run CFG --set cluster.backend=dist --set cluster.workers=N``):
  this process validates the config and the task (bad input raises ``ConfigError`` before
  any MLflow run exists), creates the MLflow run, starts N worker processes in a process
  group of their own (``python -m syncbench.experiments.procs.launcher --worker SPEC --rank R``, loopback
  rendezvous on a free port, one intra-op thread per core each worker owns) and watches them:
  a worker that dies (non-zero exit, a signal) or hangs (its heartbeat stops for
  ``cluster.collective_timeout_s``) ends the run ``failed`` with a message naming the rank;
  the whole process group is killed (workers also die with the launcher: PR_SET_PDEATHSIG),
  and the run is marked FAILED with tag ``outcome=failed``.
* **torchrun** (``RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR`` in the environment, e.g.
  ``torchrun --nnodes 2 --nproc-per-node 4 -m syncbench.sweeps.cli run CFG --set cluster.backend=dist``):
  this process is one worker of that job. ``WORLD_SIZE`` is the number of workers
  (``cluster.workers`` is set to it). Rank 0 creates the MLflow run after validation and
  marks it FAILED itself when a peer fails (it learns from the collective timeout, or from
  torchrun's SIGTERM).

Every rank calls ``init_process_group(timeout=cluster.collective_timeout_s)``; rank 0
evaluates the global model on the training clock, decides the stop and records one MLflow
run for the trial (curves and summary under the sim backend's names, ``backend=dist``,
tag ``syncbench.backend=dist``), with compute / comm / wait aggregated over ranks as mean
(``time_wait_s``) and max (``time_wait_max_s``).

Emulation (``SYNCBENCH_DIST_EMULATE`` = ``all`` (default) | ``none`` | ``stragglers`` |
``network``, or the ``emulate=`` argument): see ``syncbench.experiments.procs.worker.Emulation``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from syncbench.experiments import signals

ENV_WORKER = "SYNCBENCH_DIST_WORKER"
ENV_EMULATE = "SYNCBENCH_DIST_EMULATE"
ENV_DEBUG = "SYNCBENCH_DIST_DEBUG_DIR"
ENV_DEVICE = "SYNCBENCH_DIST_DEVICE"  # auto (default) | cpu
ENV_BUSY = "SYNCBENCH_DIST_BUSY_STRAGGLERS"  # 0: emulated stragglers sleep even when they own their cores
ENV_THREADS = "SYNCBENCH_DIST_THREADS"  # intra-op threads per worker (default: cores owned / local workers)
HEARTBEAT_S = 0.25
REPO_ROOT = Path(__file__).resolve().parent.parent


class DistRunFailed(RuntimeError):
    """A dist run ended ``failed`` (a worker died, hung or raised); the run is marked FAILED."""

    def __init__(self, message: str, run_id: str | None = None):
        super().__init__(message)
        self.run_id = run_id


# ------------------------------------------------------------------------------------------
# small helpers (no heavy imports: workers start their heartbeat before importing torch)
# ------------------------------------------------------------------------------------------
def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")) and ENV_WORKER not in os.environ


def parse_emulate(value: str | None) -> tuple[bool, bool]:
    """(stragglers, network) from ``all`` | ``none`` | ``stragglers`` | ``network`` | a comma list."""
    value = (value or os.environ.get(ENV_EMULATE) or "all").strip().lower()
    parts = {p.strip() for p in value.split(",") if p.strip()}
    if not parts <= {"all", "none", "stragglers", "network"}:
        from syncbench.experiments.config import ConfigError

        raise ConfigError(f"{ENV_EMULATE}={value!r}: expected all, none, stragglers, network or a comma list")
    if "all" in parts:
        return True, True
    return "stragglers" in parts, "network" in parts


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def keep_metrics_local(module: Any) -> None:
    """torchmetrics objects sync over torch.distributed's default group when computed, which
    Lightning does on every rank at once. Here each rank trains its own replica and rank 0
    evaluates alone, so a synced ``compute()`` waited for ranks that never came (a 30-s gloo
    timeout that failed every dist async run of a module logging a Metric object). Each rank's
    metrics are its own, as in the single-process run Lightning sees."""
    for m in module.modules():
        if hasattr(m, "sync_on_compute") and hasattr(m, "_to_sync"):
            m.sync_on_compute = False
            m._to_sync = False  # torchmetrics copies sync_on_compute here at construction and forward


def _set_pdeathsig() -> None:
    """Linux: die with the launcher (no orphans even if the launcher is SIGKILLed)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _is_comm_error(message: str) -> bool:
    text = message.lower()
    return any(s in text for s in ("connection closed", "connection reset", "timed out", "timeout", "broken pipe",
                                   "did not answer", "sent no gradient", "gloo", "socket", "never came back"))


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
                _write_json(self.path, [time.time(), self.steps])
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


# ------------------------------------------------------------------------------------------
# validation (before any run exists)
# ------------------------------------------------------------------------------------------
def validate_dist_config(config: Any) -> None:
    """What the strategy declares this backend cannot do (config validation checks it too;
    under torchrun the world size is known only here)."""
    from syncbench.experiments.config import ConfigError
    from syncbench.strategies import STRATEGIES

    reason = STRATEGIES[config.strategy.name].unsupported(config.strategy.options(), "dist", config.cluster.workers)
    if reason:
        raise ConfigError(reason)


def check_shards(task: Any, config: Any, world: int) -> None:
    from syncbench.experiments.config import ConfigError
    from syncbench.experiments.sharding import ShardedBatches

    try:
        ShardedBatches(task.train_set, 0, world, config.batch_size, config.seed, task.collate)
    except ValueError as exc:
        raise ConfigError(f"batch_size: {exc}") from None


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------
def execute_dist_run(config: Any, *, workspace: Any = None, tracking_uri: str | None = None,
                     experiment: str | None = None, tags: dict[str, str] | None = None,
                     parent_run_id: str | None = None, run_name: str | None = None, progress: bool = False,
                     emulate: str | None = None, debug_dir: str | os.PathLike | None = None,
                     max_steps: int | None = None) -> Any:
    """Run one config on real processes and record it (see the module docstring).

    Returns ``syncbench.experiments.run.RunResult``; raises ``ConfigError`` on bad input (no run is
    created) and ``DistRunFailed`` when a worker fails (the run is marked FAILED).
    ``max_steps`` caps every worker at that many training steps (tests compare the backends
    step for step; strategies whose workers meet at every round only)."""
    from syncbench.experiments.workspace import default_tracking_uri, workspace_dir

    ws = workspace_dir(workspace)
    tracking_uri = tracking_uri or default_tracking_uri(ws)
    debug_dir = debug_dir or os.environ.get(ENV_DEBUG) or None
    if under_torchrun():
        return _join_torchrun(config, ws, tracking_uri, experiment, tags, parent_run_id, run_name, emulate, debug_dir)
    return _launch(config, ws, tracking_uri, experiment, tags, parent_run_id, run_name, progress, emulate, debug_dir,
                   max_steps)


def _run_tags(extra: dict[str, str] | None, launcher: str, emulate: tuple[bool, bool], comm_backend: str,
              world: int) -> dict[str, str]:
    from syncbench.experiments.recording import environment_tags

    mode = ",".join(k for k, on in zip(("stragglers", "network"), emulate) if on) or "none"
    return {**environment_tags(), "syncbench.backend": "dist", "syncbench.dist.launcher": launcher,
            "syncbench.dist.emulate": mode, "syncbench.dist.comm_backend": comm_backend,
            "syncbench.dist.world_size": str(world), **(extra or {})}


def _comm_backend() -> str:
    import torch

    use_cuda = torch.cuda.is_available() and os.environ.get(ENV_DEVICE, "auto") != "cpu"
    return "nccl" if use_cuda else "gloo"


def _launch(config: Any, ws: Path, tracking_uri: str, experiment: str | None, tags: dict[str, str] | None,
            parent_run_id: str | None, run_name: str | None, progress: bool, emulate: str | None,
            debug_dir: Any, max_steps: int | None = None) -> Any:
    from syncbench.experiments.recording import RunRecorder, get_or_create_experiment, open_client
    from syncbench.experiments.run import (
        check_initial_target,
        measure_activation_bytes,
        one_thread,
        prepare_task,
        record_stopped_run,
    )
    from syncbench.experiments.workspace import artifacts_dir

    wall0 = time.time()
    act_bytes: int | None = None
    emulation = parse_emulate(emulate)
    validate_dist_config(config)
    n = config.cluster.workers
    with one_thread():
        task = prepare_task(config)
        check_shards(task, config, n)
    client = open_client(tracking_uri)
    exp_id = get_or_create_experiment(client, experiment or config.name,
                                      artifacts_dir(ws).as_uri() if tracking_uri.startswith("sqlite") else None)
    with signals.deferred(raise_at_end=False):  # a run that exists is always ended, whatever stops it
        recorder = RunRecorder(client, exp_id, run_name or config.name,
                               tags=_run_tags(tags, "local", emulation, _comm_backend(), n),
                               parent_run_id=parent_run_id)
    control: Path | None = None
    try:
        signals.poll()
        recorder.log_params({**config.flat(), "backend": "dist"})
        check_initial_target(task, config)
        with one_thread():  # runs the user's module: inside the run, so that a failure is recorded
            act_bytes = measure_activation_bytes(task, config)
        control = ws / "dist" / recorder.run_id
        control.mkdir(parents=True, exist_ok=True)
        spec = {
            "config": config.model_dump(mode="json"), "tracking_uri": tracking_uri, "run_id": recorder.run_id,
            "start_ms": recorder.start_ms, "wall0": wall0, "activation_bytes": act_bytes, "emulate": list(emulation),
            "debug_dir": str(debug_dir) if debug_dir else None, "control": str(control), "progress": bool(progress),
            "max_steps": max_steps,
            "launcher_pid": os.getpid(),
        }
        _write_json(control / "spec.json", spec)
        for attempt in range(3):
            outcome = _run_workers(control, n, config.cluster.collective_timeout_s, progress, config)
            if outcome.get("retry_port") and attempt < 2:
                continue
            break
        if outcome.get("ok"):
            from syncbench.experiments.run import RunResult

            return _result_from_json(RunResult, json.loads((control / "result.json").read_text()))
        message = outcome["message"]
        _attach_logs(recorder, control)
        recorder.fail(message)
        raise DistRunFailed(message, recorder.run_id)
    except DistRunFailed:
        raise
    except signals.Interrupted as exc:
        # rank 0 recorded the run KILLED with its curve and summary, unless it could not (it
        # had not started, or did not stop in time): then the run is ended here
        with contextlib.suppress(Exception):
            if client.get_run(recorder.run_id).info.status == "RUNNING":
                if control is not None:
                    _attach_logs(recorder, control)
                record_stopped_run(recorder, config, None, exc.signum, activation_bytes=act_bytes,
                                   wall_s=time.time() - wall0)
        exc.run_id = recorder.run_id  # type: ignore[attr-defined]
        raise
    except BaseException as exc:
        recorder.fail(exc)
        raise
    finally:
        if control is not None:  # the workers' files: logs are attached to a failed run
            import shutil

            shutil.rmtree(control, ignore_errors=True)


def _result_to_json(result: Any) -> dict[str, Any]:
    import dataclasses

    data = {k: v for k, v in vars(result).items() if k != "evaluations"}
    data["evaluations"] = [dataclasses.asdict(ev) for ev in result.evaluations]
    return data


def _result_from_json(result_cls: type, data: dict[str, Any]) -> Any:
    from syncbench.experiments.run_loop import Evaluation

    evaluations = [Evaluation(**ev) for ev in data.pop("evaluations", [])]
    return result_cls(**data, evaluations=evaluations)


def _attach_logs(recorder: Any, control: Path) -> None:
    try:
        for log in sorted(control.glob("rank*.log")):
            recorder._timed(recorder.client.log_artifact, recorder.run_id, str(log), "worker_logs")
    except Exception:  # noqa: BLE001 - logs are a courtesy
        pass


PRELOAD = ["torch", "torch.distributed", "pytorch_lightning", "mlflow.tracking", "syncbench.experiments.run",
           "syncbench.experiments.procs.worker"]


def _forkserver_context(config: Any) -> Any:
    """Workers are forked from a forkserver that imported torch, Lightning and the task once
    (per launcher process): a fresh interpreter per worker would pay those imports every run."""
    import multiprocessing as mp

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


def _run_workers(control: Path, n: int, timeout_s: float, progress: bool, config: Any) -> dict[str, Any]:
    """Start N workers and watch them; returns {ok} or {message}."""
    for stale in list(control.glob("hb.*")) + list(control.glob("error.*")) + list(control.glob("result.json")):
        stale.unlink(missing_ok=True)
    import multiprocessing as mp

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
            # run; each worker installs its own handler first thing (_worker_main)
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
        _write_json(control / "workers.json", [p.pid for p in procs])
        return _watch(procs, control, timeout_s, progress, config)
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
    """A worker started as ``python -m syncbench.experiments.procs.launcher --worker SPEC --rank R``."""

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
        import subprocess

        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)
        self.log.close()


def _spawn_worker(control: Path, rank: int, world: int, port: int, threads: int) -> _PopenWorker:
    import subprocess

    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
               LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")
    env[ENV_WORKER] = "1"
    log = open(control / f"rank{rank}.log", "wb")
    popen = subprocess.Popen([sys.executable, "-m", "syncbench.experiments.procs.launcher", "--worker", str(control / "spec.json"),
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
                      OMP_NUM_THREADS=str(threads))
    os.environ[ENV_WORKER] = "1"
    control = Path(spec_path).parent
    fd = os.open(control / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _worker_main(["--worker", spec_path, "--rank", str(rank), "--threads", str(threads)])


def _heartbeat(control: Path, rank: int) -> tuple[float | None, int]:
    """(age in seconds of the last heartbeat or None before the first, steps)."""
    try:
        t, steps = json.loads((control / f"hb.{rank}").read_text())
        return time.time() - float(t), int(steps)
    except (OSError, ValueError, TypeError):
        return None, 0


def _process_state(pid: int) -> str:
    try:
        import psutil

        return psutil.Process(pid).status()
    except Exception:  # noqa: BLE001
        return "unknown"


def _read_error(control: Path, rank: int) -> dict[str, Any] | None:
    try:
        return json.loads((control / f"error.{rank}.json").read_text())
    except (OSError, ValueError):
        return None


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
            beats = [_heartbeat(control, r) for r in range(n)]
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
    beats = [_heartbeat(control, r) for r in range(n)]
    errors = {r: _read_error(control, r) for r in range(n)}
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
        root = [r for r in failed if errors.get(r) and not _is_comm_error(errors[r]["message"])]
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
            from syncbench.experiments.run import _Progress
            from syncbench.experiments.run_loop import Evaluation

            self.Evaluation = Evaluation
            self.bar = _Progress(config, True).__enter__()
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
        self.bar.update(self.Evaluation(data["clock_s"], data["updates"], data["samples"], data["metrics"]))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------
# torchrun: this process is one worker of the job
# ------------------------------------------------------------------------------------------
class _Terminated(Exception):
    pass


def _join_torchrun(config: Any, ws: Path, tracking_uri: str, experiment: str | None, tags: dict[str, str] | None,
                   parent_run_id: str | None, run_name: str | None, emulate: str | None, debug_dir: Any) -> Any:
    from syncbench.experiments.recording import get_or_create_experiment, open_client
    from syncbench.experiments.workspace import artifacts_dir

    wall0 = time.time()
    emulation = parse_emulate(emulate)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if config.cluster.workers != world:
        config = config.model_copy(deep=True)
        config.cluster.workers = world  # the job defines the workers; params record the real count
    validate_dist_config(config)
    import torch

    torch.set_num_threads(threads_per_worker(local_world))
    client = exp_id = None
    if rank == 0:
        client = open_client(tracking_uri)
        exp_id = get_or_create_experiment(client, experiment or config.name,
                                          artifacts_dir(ws).as_uri() if tracking_uri.startswith("sqlite") else None)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise _Terminated("terminated by torchrun (SIGTERM), most likely after another worker failed")

    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        create = {"client": client, "experiment_id": exp_id, "run_name": run_name or config.name,
                  "tags": _run_tags(tags, "torchrun", emulation, _comm_backend(), world),
                  "parent_run_id": parent_run_id}
        return run_worker(config, rank=rank, world=world, local_world=local_world, wall0=wall0, emulate=emulation,
                          debug_dir=debug_dir, create=create if rank == 0 else None, validate_task=True,
                          tracking_uri=tracking_uri)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------
# one worker
# ------------------------------------------------------------------------------------------
def run_worker(config: Any, *, rank: int, world: int, local_world: int, wall0: float, emulate: tuple[bool, bool],
               debug_dir: Any = None, attach: dict[str, Any] | None = None, create: dict[str, Any] | None = None,
               control: Path | None = None, heartbeat: FileHeartbeat | None = None, progress: bool = False,
               activation_bytes: int | None = None, validate_task: bool = False, max_steps: int | None = None,
               tracking_uri: str | None = None) -> Any:
    """Train this rank to the outcome. Rank 0 records the run (``attach``: into the
    launcher's run; ``create``: a new run, under torchrun) and returns its ``RunResult``;
    other ranks return a ``RunResult`` without a run id."""
    import copy
    import datetime
    import logging
    import warnings

    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Dataset

    from syncbench.experiments.run import RunResult, measure_activation_bytes, prepare_task, record_stopped_run, seed_everything
    from syncbench.experiments.sharding import ShardedBatches
    from syncbench.experiments.procs.worker import Comm, Emulation, TTAMonitor, WorkerFailure, WorkerState, program_strategy_class
    from syncbench.strategies.lightning_flavour import flavour_of
    from syncbench.experiments.run import build_strategy
    from syncbench.experiments.sim.engine import lr_factor

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")

    task = prepare_task(config)  # checkpointing applied, as in every other caller
    if validate_task:
        check_shards(task, config, world)
    if rank == 0 and activation_bytes is None and create is not None:
        activation_bytes = measure_activation_bytes(task, config)
    _warm_up(task, config, rank, world)
    if config.checkpointing.enabled:  # DeepSpeed made a one-process group for the steps above; it
        from syncbench.strategies.checkpointing import release_deepspeed_process_group  # joins the real one next

        release_deepspeed_process_group()
    seed_everything(config.seed)

    timeout = datetime.timedelta(seconds=config.cluster.collective_timeout_s)
    backend = _comm_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    ctrl = dist.new_group(backend="gloo", timeout=timeout)
    ps = dist.new_group(backend="gloo", timeout=timeout)
    comm = Comm(rank=rank, world=world, device=device, main=None, ctrl=ctrl, ps=ps,
                timeout_s=config.cluster.collective_timeout_s)
    store_hb = None
    if heartbeat is None:
        with contextlib.suppress(Exception):
            store_hb = StoreHeartbeat(dist.distributed_c10d._get_default_store(), rank)

    recorder = None
    torchrun_run_id: list[str | None] = [None]
    monitor = strategy = None

    def strategy_summary() -> dict[str, float]:
        with contextlib.suppress(Exception):
            return dict(strategy.summary_metrics()) if strategy is not None else {}
        return {}

    try:
        if rank == 0:
            recorder = _open_recorder(attach, create)
            torchrun_run_id[0] = recorder.run_id
        if attach is None and world > 1:
            # torchrun: every rank learns rank 0's run id, to mark it FAILED should rank 0 die
            # (the job's store may die with rank 0, so it travels in a collective)
            dist.broadcast_object_list(torchrun_run_id, src=0, group=ctrl)
        keep_metrics_local(task.module)
        if rank == 0:
            if create is not None:
                recorder.log_params({**config.flat(), "backend": "dist"})
            eval_module = copy.deepcopy(task.module).cpu()
            monitor = TTAMonitor(config, eval_module, task.val_batches,
                                 on_eval=_on_eval(recorder, control if progress else None))
        # a worker that owns its cores keeps them busy while it straggles (Emulation.straggle)
        hold_core = cores_owned() >= local_world and os.environ.get(ENV_BUSY, "1") != "0"
        emulation = Emulation(config, rank, world, *emulate, hold_core=hold_core)
        worker = WorkerState(config, comm, emulation, monitor, debug=bool(debug_dir))
        definition = build_strategy(config)
        lightning = flavour_of(task.module)  # the module's own Lightning drives it
        strategy = program_strategy_class(lightning)(worker, definition, lr_factor(definition, config.strategy.lr_scaling))
        batches = ShardedBatches(task.train_set, rank, world, config.batch_size, config.seed, task.collate)

        class _Stream(Dataset):  # one epoch = this rank's shard (Lightning counts epochs as the sim does)
            def __len__(self):
                return batches.steps_per_epoch

            def __getitem__(self, index):
                if heartbeat is not None:
                    heartbeat.steps += 1
                return next(batches)

        trainer = lightning.Trainer(
            accelerator="cuda" if device.type == "cuda" else "cpu", devices=[local_rank] if device.type == "cuda" else 1,
            strategy=strategy, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_epochs=-1, max_steps=max_steps or -1,
            use_distributed_sampler=False, log_every_n_steps=0,
        )
        trainer.fit(task.module, train_dataloaders=DataLoader(_Stream(), batch_size=None))
        if not worker.stopped:
            if not max_steps:
                raise WorkerFailure(f"rank {rank}: training ended without a stop decision")
            worker.stopped, worker.stop_outcome = True, worker.stop_outcome or "budget"  # the step cap
        strategy.shutdown()
        rows = _gather_ledgers(worker, comm)
        if debug_dir:
            _dump_debug(Path(debug_dir), rank, worker, strategy, rows)
        outcome = _final_outcome(worker, comm)
        if rank != 0:
            return RunResult(run_id=None, outcome=outcome)
        assert monitor is not None and recorder is not None
        with signals.deferred():  # the finished run is recorded whole; a signal here stops after it
            result = _record(config, recorder, monitor, worker, strategy, rows, wall0, activation_bytes,
                             RunResult)
            if control is not None:
                _write_json(control / "result.json", _result_to_json(result))
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        return result
    except BaseException as exc:
        signum = signals.received()
        if recorder is not None and recorder.finished:
            raise  # recorded whole before the signal was raised (signals.deferred above)
        if recorder is not None and signum is not None and (attach is not None
                                                            or isinstance(exc, signals.Interrupted)):
            # stopped by the launcher (which passed a SIGTERM/SIGINT on): record what was
            # measured, the run KILLED; the launcher leaves a run that is no longer RUNNING alone.
            # (Under torchrun SIGTERM keeps its meaning, _Terminated: torchrun stops the job
            # when a peer failed.)
            with contextlib.suppress(Exception):
                record_stopped_run(recorder, config, monitor.result if monitor is not None else None, signum,
                                   activation_bytes=activation_bytes, extra=strategy_summary(),
                                   wall_s=time.time() - wall0)
            raise
        if recorder is not None:
            if create is not None:  # torchrun: nobody else will mark the run
                message = _failure_message(exc, rank, store_hb, world)
                with contextlib.suppress(Exception):
                    recorder.fail(message)
                raise DistRunFailed(message, recorder.run_id) from exc
            with contextlib.suppress(Exception):
                recorder.flush()  # keep the curve measured so far; the launcher marks the run
        elif attach is None and create is None and tracking_uri and torchrun_run_id[0]:
            # torchrun, a rank other than 0: if rank 0 died, nobody else would end its run
            _fail_orphaned_run(torchrun_run_id[0], store_hb, world, tracking_uri,
                               _failure_message(exc, rank, store_hb, world))
        raise
    finally:
        if store_hb is not None:
            store_hb.stop()


def _fail_orphaned_run(run_id: str, store_hb: "StoreHeartbeat | None", world: int, tracking_uri: str,
                       message: str, grace_s: float = 3.0) -> None:
    """Under torchrun, mark rank 0's run FAILED when rank 0 is gone: its heartbeat in the job's
    store stopped (or the store, which rank 0 may host, is gone) and the run is still RUNNING
    after a grace period in which a live rank 0 would have marked it itself."""
    if store_hb is not None:
        alive = [r for r in range(world) if r not in store_hb.silent_ranks(world, window_s=1.0)]
        store_reachable = True
        try:
            store_hb.store.add("syncbench/probe", 0)
        except Exception:  # noqa: BLE001
            store_reachable = False
        if store_reachable and 0 in alive:
            return  # rank 0 is alive and marks its own run
    time.sleep(grace_s)
    with contextlib.suppress(Exception):
        from syncbench.experiments.recording import open_client

        client = open_client(tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "outcome", "failed")
            client.set_tag(run_id, "syncbench.error", f"worker rank 0 died or hangs (no heartbeat); {message}"[:5000])
            client.set_terminated(run_id, "FAILED")


def _warm_up(task: Any, config: Any, rank: int, world: int, steps: int = 2) -> None:
    """Untimed forward/backward/optimizer steps on a copy of the module, so that one-time
    costs (autograd engine threads, optimizer state, lazy imports) are paid before the
    training clock starts, as the sim backend's calibration pays them; rank skew at the
    first step would otherwise land in the first round's waiting and in TTA."""
    import copy

    import torch

    from syncbench.strategies.lightning_bridge import build_optimizer, take_logged, training_loss
    from syncbench.experiments.sharding import ShardedBatches

    rng = torch.get_rng_state()
    module = copy.deepcopy(task.module)
    optimizer = build_optimizer(module)
    batches = ShardedBatches(task.train_set, rank, world, config.batch_size, config.seed + 3, task.collate)
    for i in range(steps):
        optimizer.zero_grad(set_to_none=True)
        training_loss(module, next(batches), i).backward()
        optimizer.step()
    take_logged(module)
    torch.set_rng_state(rng)


def _failure_message(exc: BaseException, rank: int, store_hb: StoreHeartbeat | None, world: int) -> str:
    message = f"{type(exc).__name__}: {exc}"
    if store_hb is not None and _is_comm_error(message):
        silent = store_hb.silent_ranks(world)
        if silent:
            return f"worker rank {silent[0]} died or hangs (no heartbeat); rank {rank} saw: {message.splitlines()[0]}"
    return message


def _open_recorder(attach: dict[str, Any] | None, create: dict[str, Any] | None) -> Any:
    from syncbench.experiments.recording import RunRecorder, open_client

    if create is not None:
        return RunRecorder(create["client"], create["experiment_id"], create["run_name"], tags=create["tags"],
                           parent_run_id=create["parent_run_id"])
    assert attach is not None
    return AttachedRecorder(open_client(attach["tracking_uri"]), attach["run_id"], attach["start_ms"])


def _attached_recorder_class() -> type:
    from syncbench.experiments.recording import RunRecorder

    class _Attached(RunRecorder):
        """A ``RunRecorder`` on a run the launcher created (same buffering, names and timestamps)."""

        def __init__(self, client: Any, run_id: str, start_ms: int):  # noqa: D401 - no run is created
            from mlflow.entities import Metric, Param, RunTag

            self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
            self.client, self.run_id, self.start_ms = client, run_id, int(start_ms)
            self.log_seconds = 0.0
            self._metrics = []
            self._finished = False

    return _Attached


def AttachedRecorder(client: Any, run_id: str, start_ms: int) -> Any:  # noqa: N802 - a factory
    return _attached_recorder_class()(client, run_id, start_ms)


def _on_eval(recorder: Any, control: Path | None):
    state = {"last": 0.0}

    def on_eval(ev: Any) -> None:
        recorder.metrics(ev.metrics, step=ev.updates, clock_s=ev.clock_s)
        if control is not None and time.time() - state["last"] > 0.2:
            state["last"] = time.time()
            with contextlib.suppress(OSError):
                _write_json(control / "progress.json", {"clock_s": ev.clock_s, "updates": ev.updates,
                                                        "samples": ev.samples, "metrics": ev.metrics})

    return on_eval


LEDGER_FIELDS = ("elapsed", "comm", "wait", "excluded", "unsettled", "prev_eval", "steps", "pad_compute", "pad_comm")


def _gather_ledgers(worker: Any, comm: Any) -> list[dict[str, float]]:
    """Every rank's final ledger (one all_gather on the gloo group); the last round's blocked
    time is split here with the same rule as during the run."""
    import torch
    import torch.distributed as dist

    led = worker.ledger
    mine = torch.tensor([led.elapsed(), led.comm, led.wait, led.excluded,
                         -1.0 if led.unsettled is None else led.unsettled, worker.prev_eval_s, float(led.steps),
                         led.pad_compute, led.pad_comm], dtype=torch.float64)
    if comm.world > 1:
        out = [torch.zeros_like(mine) for _ in range(comm.world)]
        dist.all_gather(out, mine, group=comm.ctrl)
    else:
        out = [mine]
    rows = [dict(zip(LEDGER_FIELDS, t.tolist())) for t in out]
    pending = [r["unsettled"] for r in rows if r["unsettled"] >= 0]
    comm_s = min(pending) if pending else 0.0
    for i, row in enumerate(rows):
        if row["unsettled"] >= 0:
            blocked = row["unsettled"]
            c = min(blocked, comm_s)
            wait = blocked - c
            skip = min(wait, row["prev_eval"]) if i != 0 else 0.0
            row["comm"] += c
            row["wait"] += wait - skip
            row["excluded"] += skip
        row["compute"] = max(0.0, row["elapsed"] - row["comm"] - row["wait"] - row["excluded"])
    return rows


def _final_outcome(worker: Any, comm: Any) -> str:
    """Rank 0's outcome, told to every rank (one broadcast at the very end)."""
    import torch
    import torch.distributed as dist

    codes = ["reached", "budget", "diverged"]
    t = torch.tensor([codes.index(worker.stop_outcome) if worker.stop_outcome in codes else 1], dtype=torch.int64)
    if comm.world > 1:
        dist.broadcast(t, src=0, group=comm.ctrl)
    return codes[int(t)]


def _record(config: Any, recorder: Any, monitor: Any, worker: Any, strategy: Any, rows: list[dict[str, float]],
            wall0: float, activation_bytes: int | None, RunResult: Any) -> Any:  # noqa: N803
    from syncbench.experiments.run import record_finished_run

    res = monitor.result
    led = worker.ledger
    first_step_wall = time.time() - led.elapsed() if led.t_first is not None else time.time()
    init_s = max(0.0, first_step_wall - wall0)
    steps = [max(1.0, r["steps"]) for r in rows]
    step_time = sum(r["compute"] / s for r, s in zip(rows, steps)) / len(rows)
    last = res.evaluations[-1] if res.evaluations else None
    updates = last.updates if last else 0
    result = RunResult(**vars(res), run_id=recorder.run_id, init_s=init_s, step_time_s=step_time,
                       extra=strategy.summary_metrics())
    summary: dict[str, float] = {}
    for name in ("compute", "comm", "wait"):
        values = [r[name] for r in rows]
        summary[f"time_{name}_s"] = sum(values) / len(values)
        summary[f"time_{name}_max_s"] = max(values)
    artifacts = {"ranks.json": json.dumps(rows, indent=1), **strategy.artifacts()}
    record_finished_run(recorder, config, result, updates, activation_bytes, artifacts, lambda: time.time() - wall0,
                        summary)
    return result


def _dump_debug(directory: Path, rank: int, worker: Any, strategy: Any, rows: list[dict[str, float]]) -> None:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"rank": rank, "events": worker.ledger.events, "step_times": worker.ledger.step_times,
                "step_starts": worker.ledger.step_starts,
                "rows": rows, **strategy.debug_state()}, directory / f"rank{rank}.pt")


# ------------------------------------------------------------------------------------------
# `python -m syncbench.experiments.procs.launcher --worker SPEC --rank R`: one worker started by the launcher
# ------------------------------------------------------------------------------------------
def _worker_main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="syncbench.experiments.procs.launcher")
    parser.add_argument("--worker", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    _set_pdeathsig()
    # the launcher passes SIGTERM/SIGINT on to stop the run in order (rank 0 records it
    # KILLED); a repeat (the launcher's and the terminal's) does not cut that short
    signals.install(armed=True, second_exits=False)
    signals.unblock()  # in case a parent blocked them
    spec = json.loads(Path(args.worker).read_text())
    control = Path(spec["control"])
    heartbeat = FileHeartbeat(control / f"hb.{args.rank}", spec.get("launcher_pid"))
    code = 1
    try:
        import torch

        torch.set_num_threads(args.threads)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        from syncbench.experiments.config import RunConfig

        config = RunConfig.model_validate(spec["config"])
        run_worker(config, rank=args.rank, world=config.cluster.workers, local_world=config.cluster.workers,
                   wall0=spec["wall0"], emulate=tuple(spec["emulate"]), debug_dir=spec["debug_dir"],
                   attach={"tracking_uri": spec["tracking_uri"], "run_id": spec["run_id"],
                           "start_ms": spec["start_ms"]},
                   control=control, heartbeat=heartbeat, progress=spec["progress"],
                   activation_bytes=spec["activation_bytes"], max_steps=spec.get("max_steps"))
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, which marks the run
        with contextlib.suppress(Exception):
            _write_json(control / f"error.{args.rank}.json",
                        {"message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        traceback.print_exc()
    finally:
        heartbeat.stop()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
