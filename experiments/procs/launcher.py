"""The dist backend: real worker processes, each running a Lightning Trainer with one of the
strategy's worker program (``syncbench.experiments.procs.program_strategy.ProgramStrategy``), over torch.distributed (gloo on CPU, NCCL when the
module runs on CUDA).

Two ways in, one entry point (``execute_dist_run``, called by ``syncbench.experiments.run.execute_run``
when ``cluster.backend == "dist"``):

* **launcher** (``syncbench run CFG --set cluster.backend=dist --set cluster.workers=N``):
  this process validates the config and the task (bad input raises ``ConfigError`` before
  any MLflow run exists), creates the MLflow run, starts N worker processes in a process
  group of their own (``python -m syncbench.experiments.procs.worker_main --worker SPEC --rank R``, loopback
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
``network``, or the ``emulate=`` argument): see ``syncbench.experiments.procs.emulation.Emulation``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from syncbench.experiments import signals
from syncbench.experiments.procs.control import attach_logs, write_json
from syncbench.experiments.procs.environment import ENV_DEBUG, threads_per_worker, under_torchrun
from syncbench.experiments.procs.failures import DistRunFailed
from syncbench.experiments.procs.rank import comm_backend, run_worker
from syncbench.experiments.procs.rank_recording import result_from_json
from syncbench.experiments.procs.supervision import run_workers
from syncbench.experiments.procs.validation import (
    check_local_devices,
    check_shards,
    parse_emulate,
    validate_dist_config,
)
from syncbench.experiments.procs.watchdog import Watchdog, start_watchdog
from syncbench.experiments.recording import (
    RunRecorder,
    environment_tags,
    get_or_create_experiment,
    open_client,
)
from syncbench.experiments.result import RunResult, record_stopped_run
from syncbench.experiments.task import check_initial_target, measure_activation_bytes, one_thread, prepare_task
from syncbench.experiments.workspace import artifacts_dir, default_tracking_uri, workspace_dir


def execute_dist_run(config: Any, *, workspace: Any = None, tracking_uri: str | None = None,
                     experiment: str | None = None, tags: dict[str, str] | None = None,
                     parent_run_id: str | None = None, run_name: str | None = None, progress: bool = False,
                     emulate: str | None = None, debug_dir: str | os.PathLike | None = None,
                     max_steps: int | None = None) -> Any:
    """Run one config on real processes and record it (see the module docstring).

    Returns ``syncbench.experiments.result.RunResult``; raises ``ConfigError`` on bad input (no run is
    created) and ``DistRunFailed`` when a worker fails (the run is marked FAILED).
    ``max_steps`` caps every worker at that many training steps (tests compare the backends
    step for step; strategies whose workers meet at every round only)."""
    ws = workspace_dir(workspace)
    tracking_uri = tracking_uri or default_tracking_uri(ws)
    debug_dir = debug_dir or os.environ.get(ENV_DEBUG) or None
    if under_torchrun():
        return _join_torchrun(config, ws, tracking_uri, experiment, tags, parent_run_id, run_name, emulate, debug_dir)
    return _launch(config, ws, tracking_uri, experiment, tags, parent_run_id, run_name, progress, emulate, debug_dir,
                   max_steps)


def _run_tags(extra: dict[str, str] | None, launcher: str, emulate: tuple[bool, bool], backend: str,
              world: int) -> dict[str, str]:
    mode = ",".join(k for k, on in zip(("stragglers", "network"), emulate) if on) or "none"
    return {**environment_tags(), "syncbench.backend": "dist", "syncbench.dist.launcher": launcher,
            "syncbench.dist.emulate": mode, "syncbench.dist.comm_backend": backend,
            "syncbench.dist.world_size": str(world), **(extra or {})}


def _launch(config: Any, ws: Path, tracking_uri: str, experiment: str | None, tags: dict[str, str] | None,
            parent_run_id: str | None, run_name: str | None, progress: bool, emulate: str | None,
            debug_dir: Any, max_steps: int | None = None) -> Any:
    wall0 = time.time()
    act_bytes: int | None = None
    emulation = parse_emulate(emulate)
    validate_dist_config(config)
    n = config.cluster.workers
    check_local_devices(n, config.cluster.device)  # every rank of a local launch is on this machine
    with one_thread():
        task = prepare_task(config)
        check_shards(task, config, n)
    client = open_client(tracking_uri)
    exp_id = get_or_create_experiment(client, experiment or config.name,
                                      artifacts_dir(ws).as_uri() if tracking_uri.startswith("sqlite") else None)
    with signals.deferred(raise_at_end=False):  # a run that exists is always ended, whatever stops it
        recorder = RunRecorder(client, exp_id, run_name or config.name,
                               tags=_run_tags(tags, "local", emulation, comm_backend(config.cluster.device), n),
                               parent_run_id=parent_run_id)
    control: Path | None = None
    watchdog: Watchdog | None = None
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
        write_json(control / "spec.json", spec)
        watchdog = start_watchdog(tracking_uri, recorder.run_id, control)  # ends the run if we are SIGKILLed
        for attempt in range(3):
            outcome = run_workers(control, n, config.cluster.collective_timeout_s, progress, config)
            if outcome.get("retry_port") and attempt < 2:
                continue
            break
        if outcome.get("ok"):
            return _recorded_result(control)
        message = outcome["message"]
        attach_logs(recorder, control)
        recorder.fail(message)
        raise DistRunFailed(message, recorder.run_id)
    except DistRunFailed:
        raise
    except signals.Interrupted as exc:
        # rank 0 recorded the run KILLED with its curve and summary, unless it could not (it
        # had not started, or did not stop in time): then the run is ended here. A run rank 0
        # had recorded FINISHED before the signal stands, with its result (a sweep's trial is
        # told it).
        with contextlib.suppress(Exception):
            status = client.get_run(recorder.run_id).info.status
            if status == "FINISHED" and control is not None and (control / "result.json").exists():
                exc.finished_result = _recorded_result(control)  # type: ignore[attr-defined]
            elif status == "RUNNING":
                if control is not None:
                    attach_logs(recorder, control)
                record_stopped_run(recorder, config, None, exc.signum, activation_bytes=act_bytes,
                                   wall_s=time.time() - wall0)
        exc.run_id = recorder.run_id  # type: ignore[attr-defined]
        raise
    except BaseException as exc:
        recorder.fail(exc)
        raise
    finally:
        if control is not None:  # the workers' files: logs are attached to a failed run
            shutil.rmtree(control, ignore_errors=True)
        if watchdog is not None:
            watchdog.release()


def _recorded_result(control: Path) -> RunResult:
    """The ``RunResult`` rank 0 wrote once it had recorded the run whole."""
    return result_from_json(RunResult, json.loads((control / "result.json").read_text()))


class _Terminated(Exception):
    pass


def _join_torchrun(config: Any, ws: Path, tracking_uri: str, experiment: str | None, tags: dict[str, str] | None,
                   parent_run_id: str | None, run_name: str | None, emulate: str | None, debug_dir: Any) -> Any:
    wall0 = time.time()
    emulation = parse_emulate(emulate)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if config.cluster.workers != world:
        config = config.model_copy(deep=True)
        config.cluster.workers = world  # the job defines the workers; params record the real count
    validate_dist_config(config)
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
                  "tags": _run_tags(tags, "torchrun", emulation, comm_backend(config.cluster.device), world),
                  "parent_run_id": parent_run_id}
        return run_worker(config, rank=rank, world=world, local_world=local_world, wall0=wall0, emulate=emulation,
                          debug_dir=debug_dir, create=create if rank == 0 else None, validate_task=True,
                          tracking_uri=tracking_uri)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
