"""SLURM jobs as ``--executor slurm`` submits and follows them: a submitit executor built from the
``slurm:`` settings, the checks made before anything is submitted (``sbatch --test-only``, the
stores every node must reach), and the job states read from ``squeue``/``scontrol``.

Job states come from ``squeue`` and ``scontrol`` rather than from submitit's watcher, which reads
``sacct``: SLURM accounting is optional (the test cluster has none), ``squeue`` always answers.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from syncbench.experiments.config import ConfigError
from syncbench.sweeps.slurm_spec import SlurmSpec

# the states in which a job still holds (or waits for) its allocation
LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"}
SQUEUE_TIMEOUT_S = 30


def require_slurm() -> None:
    """SLURM's commands on PATH and a controller that answers, else bad input (exit 2)."""
    missing = [c for c in ("sbatch", "squeue", "scancel", "sinfo") if shutil.which(c) is None]
    if missing:
        raise ConfigError(f"--executor slurm: {', '.join(missing)} not found on PATH; run the sweep from a machine "
                          f"that submits to your SLURM cluster (a login node)")
    done = _slurm(["sinfo", "-h", "-o", "%P"])
    if done.returncode != 0:
        raise ConfigError(f"--executor slurm: the SLURM controller does not answer (sinfo: "
                          f"{_message(done) or 'no output'})")


def job_parameters(settings: SlurmSpec, *, name: str, nodes: int = 1, tasks_per_node: int = 1) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters for one job shape (one launcher, or one dist trial)."""
    params: dict[str, Any] = {"job_name": name[:100], "time": settings.time_min, "nodes": nodes,
                              "ntasks_per_node": tasks_per_node, "cpus_per_task": settings.cpus_per_task,
                              "setup": list(settings.setup), "additional_parameters": settings.sbatch_options()}
    if settings.partition:
        params["partition"] = settings.partition
    if settings.gpus_per_task:
        params["gpus_per_task"] = settings.gpus_per_task
    if settings.mem_gb:
        params["mem"] = f"{math.ceil(settings.mem_gb * 1024)}M"
    return params


def make_executor(folder: Path, params: dict[str, Any]) -> Any:
    """A submitit SLURM executor writing under ``folder/<job id>/``."""
    import submitit  # lazy: only --executor slurm needs it

    logging.getLogger("submitit").setLevel(logging.ERROR)  # it warns on every poll when sacct is off
    executor = submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=0)
    executor.update_parameters(**params)
    return executor


def test_submission(params: dict[str, Any], what: str) -> None:
    """``sbatch --test-only`` with the job's options: a partition that does not exist, a shape no
    node can hold or a bad option is refused here, with SLURM's own message (exit 2), before any
    store or job is created."""
    args = ["sbatch", "--test-only", f"--job-name={params['job_name']}", f"--time={params['time']}",
            f"--nodes={params['nodes']}", f"--ntasks-per-node={params['ntasks_per_node']}",
            f"--cpus-per-task={params['cpus_per_task']}"]
    for key in ("partition", "gpus_per_task", "mem"):
        if key in params:
            args.append(f"--{key.replace('_', '-')}={params[key]}")
    for key, value in params["additional_parameters"].items():
        option = "--" + key.replace("_", "-")
        args.append(option if value is True else f"{option}={value}")
    args += ["--wrap", "true"]
    done = _slurm(args)
    if done.returncode != 0:
        raise ConfigError(f"--executor slurm: SLURM refuses {what}: {_message(done)}")


def live_jobs(job_ids: list[str]) -> dict[str, str] | None:
    """State of each listed job still queued or running (job id -> state); None when ``squeue``
    did not answer (the caller then keeps what it knew)."""
    if not job_ids:
        return {}
    done = _slurm(["squeue", "-h", "-o", "%i|%T", "--states=all", f"--jobs={','.join(job_ids)}"])
    if done.returncode != 0:
        if "Invalid job id" not in done.stderr:
            return None
        if len(job_ids) == 1:  # the controller has forgotten the job: it ended a while ago
            return {}
        states: dict[str, str] = {}
        for job_id in job_ids:  # one forgotten job makes squeue fail for the whole list: ask one by one
            one = live_jobs([job_id])
            if one is None:
                return None
            states.update(one)
        return states
    states = {}
    for line in done.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id in job_ids and state in LIVE_STATES:
            states[job_id] = state
    return states


def why_ended(job: Any) -> str:
    """One line on how a job ended: its state and reason (``scontrol``) and the last line of its
    error log, when there is one."""
    done = _slurm(["scontrol", "-o", "show", "job", str(job.job_id)])
    fields = dict(item.partition("=")[::2] for item in done.stdout.split()) if done.returncode == 0 else {}
    state = fields.get("JobState", "ended")
    reason = fields.get("Reason", "")
    text = f"job {job.job_id} {state}" + (f" ({reason})" if reason and reason != "None" else "")
    with_error = [line for line in _tail(Path(job.paths.stderr)) if line.strip()]
    if with_error:
        text += f": {with_error[-1].strip()[:300]}"
    return text


def cancel(job_ids: list[str]) -> None:
    """``scancel`` the jobs: SLURM sends their processes SIGTERM, then SIGKILL after KillWait."""
    if job_ids:
        _slurm(["scancel", *job_ids])


def stores_shared(storage_url: str, tracking_uri: str) -> None:
    """The Optuna storage and the MLflow store must be reachable from every node. A database
    server (PostgreSQL, MySQL) or a tracking server is; an SQLite file (or a file store) only
    on the machine that holds it: SQLite's write-ahead log needs shared memory, which a
    network filesystem does not give, so the file is accepted only when every node of the
    cluster is this machine (a one-node cluster), for any --jobs."""
    local = [uri for uri in (storage_url, tracking_uri) if _is_file_store(uri)]
    if not local:
        return
    foreign = foreign_nodes()
    if foreign:
        from syncbench.sweeps.storage import redact  # lazy: SQLAlchemy

        raise ConfigError(f"--executor slurm: {' and '.join(redact(u) for u in local)} is a file on this machine, "
                          f"but the cluster's nodes include {', '.join(foreign[:5])}, which cannot share it (SQLite "
                          f"needs one machine; not even a shared filesystem will do). Give --storage postgresql://... "
                          f"and --tracking-uri http://<mlflow server> (or a database URI): docs/scaling-out.md")


def foreign_nodes() -> list[str]:
    """The cluster's nodes that are not this machine (by node name, hostname and address)."""
    done = _slurm(["scontrol", "-o", "show", "nodes"])
    if done.returncode != 0:
        raise ConfigError(f"--executor slurm: scontrol show nodes: {_message(done)}")
    me = {"localhost", socket.gethostname(), socket.getfqdn(), socket.gethostname().split(".")[0]}
    with_addresses = set(me)
    for name in me:
        try:
            with_addresses.update(socket.gethostbyname_ex(name)[2])
        except OSError:
            pass
    foreign = []
    for line in done.stdout.splitlines():
        fields = dict(item.partition("=")[::2] for item in line.split())
        names = {fields.get("NodeName"), fields.get("NodeHostName"), fields.get("NodeAddr")} - {None, ""}
        if not any(n in with_addresses or n.startswith("127.") for n in names):
            foreign.append(fields.get("NodeName", "?"))
    return foreign


def _is_file_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/", ".")) or "://" not in uri


def _slurm(args: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S,
                              env={**os.environ, "SLURM_TIME_FORMAT": "standard"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(args, 1, "", f"{args[0]}: {exc}")


def _message(done: subprocess.CompletedProcess) -> str:
    """SLURM's error lines, joined (sbatch says it twice: the cause, then 'submission failed')."""
    lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    return "; ".join(dict.fromkeys(lines))


def _tail(path: Path, size: int = 4000) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode(errors="replace").splitlines()
    except OSError:
        return []
