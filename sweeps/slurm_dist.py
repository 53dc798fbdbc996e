"""A ``cluster.backend: dist`` sweep trial as a SLURM job of its own (``--executor slurm``).

The launcher job that claimed the trial holds one task; the trial's ``cluster.workers`` ranks
need their own allocation, possibly across nodes. So the launcher submits a job of N tasks
(``slurm.nodes`` nodes, N / nodes tasks each), every task turns SLURM's environment into
torch.distributed's (``MASTER_ADDR`` = the job's first node, ``RANK`` = ``SLURM_PROCID``,
``WORLD_SIZE``, ``LOCAL_RANK``; submitit's ``TorchDistributedEnvironment``) and runs the trial
exactly as one rank of a ``torchrun`` job (``syncbench.experiments.procs.launcher``): rank 0
evaluates and records the MLflow run, under the sweep's parent run, with the trial's tags. Its
result comes back through the job's result file in the (shared) submitit folder; the launcher
waits for it while beating the trial's heartbeat in the Optuna storage, and tells the result as
for any trial. A signal to the launcher (its job cancelled or pre-empted) cancels the trial's job.

The launcher job finds its settings in ``$SYNCBENCH_SLURM_DIST`` (JSON: the ``slurm:`` settings
and the submitit folder), set by the submitting ``syncbench sweep --executor slurm``.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

from syncbench.sweeps.slurm_jobs import cancel, job_parameters, live_jobs, make_executor, why_ended
from syncbench.sweeps.slurm_spec import SlurmSpec

SLURM_DIST_ENV = "SYNCBENCH_SLURM_DIST"
POLL_S = 1.0
RESULT_GRACE_S = 30.0  # a finished job's result file may show up late on a network filesystem


def dist_job_environment(settings: SlurmSpec, folder: Path) -> dict[str, str]:
    """The variable that makes a launcher job run its dist trials as jobs of their own."""
    return {SLURM_DIST_ENV: json.dumps({"settings": settings.model_dump(mode="json"), "folder": str(folder)})}


def runs_dist_as_jobs(backend: str) -> bool:
    """Whether a trial of this backend is to be run as a SLURM job of its own (in a launcher job)."""
    return backend == "dist" and bool(os.environ.get(SLURM_DIST_ENV))


def execute_dist_job(config: Any, *, workspace: str | None = None, tracking_uri: str | None = None,
                     experiment: str | None = None, tags: dict[str, str] | None = None,
                     parent_run_id: str | None = None, run_name: str | None = None, progress: bool = False,
                     on_evaluation: Any = None) -> Any:
    """``execute_run`` for a dist trial, on a job of ``cluster.workers`` tasks: returns rank 0's
    ``RunResult``; raises ``RuntimeError`` with SLURM's message or the ranks' error when the job
    could not start or failed (the launcher fails the trial)."""
    del progress, on_evaluation  # no display in a job; tuning hooks are sim-only
    env = json.loads(os.environ[SLURM_DIST_ENV])
    settings = SlurmSpec.model_validate(env["settings"])
    n, nodes = config.cluster.workers, settings.nodes
    params = job_parameters(settings, name=f"syncbench-dist {run_name or config.name}", nodes=nodes,
                            tasks_per_node=n // nodes)
    executor = make_executor(Path(env["folder"]), params)
    kwargs = {"workspace": workspace, "tracking_uri": tracking_uri, "experiment": experiment, "tags": tags,
              "parent_run_id": parent_run_id, "run_name": run_name}
    job = None
    try:
        try:
            job = executor.submit(run_rank, config.model_dump(mode="json"), kwargs)
        except Exception as exc:  # noqa: BLE001 - sbatch refused: its message is the trial's error
            raise RuntimeError(f"SLURM refused the trial's job of {n} tasks: {str(exc).strip()}") from None
        return _wait(job, n)
    except BaseException:
        # the launcher was stopped (its job cancelled or pre-empted), or the job failed: no rank
        # may go on recording a trial that the launcher fails and retries
        if job is not None:
            cancel([str(job.job_id)])
        raise


def _wait(job: Any, n: int) -> Any:
    """Rank 0's result once the job has left the queue (every task's error when it failed)."""
    job_id = str(job.job_id)
    while True:
        live = live_jobs([job_id])
        if live is not None and job_id not in live:
            break
        time.sleep(POLL_S)
    deadline = time.monotonic() + RESULT_GRACE_S
    paths = [Path(job.task(rank).paths.result_pickle) for rank in range(n)]
    while not paths[0].exists() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    errors = []
    for rank, path in enumerate(paths):
        if not path.exists():
            continue
        with open(path, "rb") as fh:
            outcome, value = pickle.load(fh)
        if outcome == "success" and rank == 0:
            return value
        if outcome != "success":
            errors.append(f"rank {rank}: {str(value).strip().splitlines()[-1] if str(value).strip() else outcome}")
    raise RuntimeError(f"the trial's SLURM {why_ended(job)}" + (f"; {'; '.join(errors[:4])}" if errors else
                                                                 "; rank 0 left no result"))


def run_rank(config: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """One task of a dist trial's job: SLURM's environment as torch.distributed's, then the run
    as a rank of a torchrun job (rank 0 records it)."""
    from submitit.helpers import TorchDistributedEnvironment  # lazy: only inside the job

    # CUDA_VISIBLE_DEVICES is left alone: local rank r picks cuda:r itself (docs/scaling-out.md)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ.pop(SLURM_DIST_ENV, None)
    from syncbench.experiments.config import validate_config
    from syncbench.experiments.run import execute_run

    return execute_run(validate_config(config, kwargs.get("run_name") or "dist trial"), **kwargs)
