"""`syncbench sweep --executor slurm` against a real SLURM: the one-node cluster that
`.ci/slurm-up.sh` starts (slurmctld + slurmd on this machine, munge, proctrack/linuxproc). Real
jobs submitted with submitit, Optuna on PostgreSQL (the fixture of test_sweeps) or SQLite, MLflow
on SQLite, `scancel` on a running job. No mocks.

Every test that needs the cluster is skipped, with the reason, when `sinfo` does not answer; the
settings' validation runs everywhere.
"""

from __future__ import annotations

import glob
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from syncbench.sweeps.cli import main
from tests.test_sweeps import (  # noqa: F401 - postgres, empty_stores and ws are fixtures used here
    DIGITS,
    SLOW,
    empty_stores,
    items,
    mlflow_runs,
    postgres,
    run_key,
    study,
    write_spec,
    ws,
)


def _sinfo_answers() -> str | None:
    """Why the SLURM tests cannot run here, or None when the cluster answers."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (no sinfo on PATH): .ci/run installs slurm-wlm and starts .ci/slurm-up.sh"
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s"
    if done.returncode != 0:
        return f"sinfo does not answer ({done.stderr.strip()[:200]}): start the cluster with .ci/slurm-up.sh"
    if not any(state.strip("*~#") in ("idle", "mixed", "allocated") for state in done.stdout.split()):
        return f"no SLURM node is up (sinfo: {done.stdout.strip()})"
    return None


SKIP = _sinfo_answers()
needs_slurm = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))


def slurm_sweep(spec: str, ws: Path, *args: str) -> int:
    return main(["sweep", spec, "--workspace", str(ws), "--no-progress", "--executor", "slurm", *args])


def complete_once(name: str, ws: Path, storage: str | None, expected: set[tuple[str, int]]) -> list:
    """Every expected cell x seed has exactly one COMPLETE trial and one FINISHED MLflow run."""
    trials = study(name, ws, storage).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert items(complete) == Counter({key: 1 for key in expected})
    _, children = mlflow_runs(name, ws)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert Counter(run_key(r) for r in finished) == Counter({key: 1 for key in expected})
    assert not [r for r in children if r.info.status == "RUNNING"]
    return trials


# ------------------------------------------------------------------ settings (no cluster needed)
def test_bad_slurm_settings_exit_2_naming_the_key(ws, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", "slurm-bad", grid={}, seeds=[0], slurm={"partiton": "cpu"})
    assert slurm_sweep(spec, ws) == 2
    assert "slurm.partiton: unknown key; did you mean slurm.partition?" in capsys.readouterr().err
    good = write_spec(tmp_path / "g.yaml", "slurm-bad", grid={}, seeds=[0])
    assert slurm_sweep(good, ws, "--slurm", "time_min=0") == 2
    assert "slurm.time_min" in capsys.readouterr().err
    assert slurm_sweep(good, ws, "--slurm", "sbatch.partition=x") == 2
    assert "slurm.sbatch: partition: set by syncbench" in capsys.readouterr().err
    assert main(["sweep", good, "--workspace", str(ws), "--slurm", "partition=x"]) == 2  # no --executor slurm
    assert "--slurm partition=x: SLURM settings need --executor slurm" in capsys.readouterr().err
    dist = write_spec(tmp_path / "d.yaml", "slurm-bad", grid={}, seeds=[0],
                      set={"cluster.backend": "dist", "cluster.workers": 3})
    assert slurm_sweep(dist, ws, "--slurm", "nodes=2") == 2
    assert "slurm.nodes is 2, which does not divide cluster.workers = 3" in capsys.readouterr().err


# ------------------------------------------------------------------ against the cluster
@needs_slurm
def test_bad_partition_exits_2_with_slurms_message_before_anything_exists(ws, tmp_path, capsys):
    spec = write_spec(tmp_path / "p.yaml", "slurm-partition", grid={}, seeds=[0],
                      slurm={"partition": "no-such-partition"})
    assert slurm_sweep(spec, ws) == 2
    err = capsys.readouterr().err
    assert "SLURM refuses the sweep's launcher jobs" in err and "invalid partition specified: no-such-partition" in err
    import optuna

    assert optuna.get_all_study_names(f"sqlite:///{ws / 'optuna.db'}") == []  # nothing was created
    assert not (ws / "slurm").exists()


@needs_slurm
@pytest.mark.heavy
def test_sweep_on_slurm_runs_every_cell_and_seed_once(ws, tmp_path, postgres, capsys):
    name = "slurm-grid"
    spec = write_spec(tmp_path / "grid.yaml", name, grid={"strategy.name": ["sync", "async"]}, seeds=[0, 1],
                      slurm={"time_min": 10})
    assert slurm_sweep(spec, ws, "--storage", postgres, "--jobs", "2") == 0
    out = capsys.readouterr().out
    assert f"sweep {name}: 4/4 trials complete, 0 failed" in out  # the local sweep's summary
    expected = {(f"strategy.name={s}", seed) for s in ("sync", "async") for seed in (0, 1)}
    trials = complete_once(name, ws, postgres, expected)
    assert len(trials) == 4  # no duplicate, no retry
    jobs = sorted(p.name for p in (ws / "slurm").iterdir() if p.is_dir())
    assert len(jobs) == 2, jobs  # two launcher jobs, each ran to its end
    for job in jobs:
        assert (ws / "slurm" / job / f"{job}_0_result.pkl").exists()


@needs_slurm
@pytest.mark.heavy
def test_scancelled_job_has_its_trial_retried_and_the_sweep_completes(ws, tmp_path, capsys):
    name = "slurm-scancel"
    # trials of several seconds each: the target cannot be reached, each runs its whole budget,
    # long enough that the cancel mostly lands while the first run is training (one that lands
    # after the run was recorded whole leaves its result: test_faults.py,
    # test_a_signal_once_the_run_is_recorded_whole_*)
    spec = write_spec(tmp_path / "cancel.yaml", name, grid={"cluster.workers": [1]}, seeds=[0, 1],
                      set={**SLOW, "budget.train_time_s": 10.0}, slurm={"time_min": 10})
    proc = subprocess.Popen([sys.executable, "-m", "syncbench", "sweep", spec, "--workspace", str(ws),
                             "--no-progress", "--executor", "slurm"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not _running_trial(name, ws):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no trial started in a SLURM job"
        time.sleep(0.3)
    job_ids = subprocess.run(["squeue", "-h", "-o", "%i", f"--name=syncbench {name}"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(job_ids) == 1, job_ids
    subprocess.run(["scancel", job_ids[0]], check=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"job {job_ids[0]} CANCELLED" in out and "submitted job" in out  # replaced by a new job

    trials = complete_once(name, ws, None, {("cluster.workers=1", 0), ("cluster.workers=1", 1)})
    # each cell x seed ran to one result above, whichever way the cancel landed
    _killed_or_kept_whole(name, ws, trials, out)


@needs_slurm
@pytest.mark.heavy
def test_ctrl_c_cancels_the_submitted_jobs_and_records_the_sweep_stopped(ws, tmp_path):
    name = "slurm-ctrl-c"
    spec = write_spec(tmp_path / "stop.yaml", name, grid={"cluster.workers": [1]}, seeds=[0, 1],
                      set={**SLOW, "budget.train_time_s": 10.0}, slurm={"time_min": 10})
    proc = subprocess.Popen([sys.executable, "-m", "syncbench", "sweep", spec, "--workspace", str(ws),
                             "--no-progress", "--executor", "slurm"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not _running_trial(name, ws):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no trial started in a SLURM job"
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out
    assert "cancelling the sweep's SLURM jobs" in out
    left = subprocess.run(["squeue", "-h", "-o", "%i", f"--name=syncbench {name}"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert left == []  # the job it submitted is gone
    trials = study(name, ws, None).trials
    # the trial in flight was failed as killed by its launcher and re-enqueued for a rerun, or kept
    # whole (CI saw it once: the cancel reaches the job through SLURM, seconds after the Ctrl-C)
    killed, whole = _killed_or_kept_whole(name, ws, trials, out)
    assert len(killed) + len(whole) >= 1
    assert not [t for t in trials if t.state.name == "RUNNING"]
    parents, children = mlflow_runs(name, ws)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert not [r for r in children if r.info.status == "RUNNING"]


@needs_slurm
@pytest.mark.heavy
def test_jobs_that_keep_failing_are_replaced_up_to_the_cap_then_the_sweep_fails(ws, tmp_path, capsys):
    name = "slurm-broken-node"
    # every job's setup fails before the launcher starts (a node without the project, say)
    spec = write_spec(tmp_path / "broken.yaml", name, grid={}, seeds=[0],
                      slurm={"time_min": 5, "max_resubmits": 1, "setup": ["echo no such venv >&2", "exit 3"]})
    assert slurm_sweep(spec, ws) == 1
    err = capsys.readouterr().err
    assert "submitted job" in err  # the first failed job was replaced once ...
    assert "the sweep's SLURM jobs ended before it did" in err and "slurm.max_resubmits = 1" in err  # ... then no more
    assert "FAILED" in err and "no such venv" in err  # SLURM's state and the job's own last words
    assert [t.state.name for t in study(name, ws, None).trials] == ["WAITING"]  # a rerun would run it


def _killed_or_kept_whole(name: str, ws: Path, trials: list, out: str) -> tuple[list, list]:
    """The trials of a sweep whose SLURM job was stopped mid-trial: SLURM's SIGTERM reaches the
    launcher while the trial trains (FAIL with outcome killed, its run KILLED, a retry enqueued) or
    once its run is recorded whole (COMPLETE, its run FINISHED: test_faults.py,
    test_a_signal_once_the_run_is_recorded_whole_*). Returns (killed, whole)."""
    killed = [t for t in trials if t.state.name == "FAIL"]
    whole = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(killed) <= 1 and all(t.user_attrs.get("outcome") == "killed" for t in killed), (
        [(t.number, t.state.name, t.user_attrs) for t in trials], out)
    _, children = mlflow_runs(name, ws)
    statuses: dict[str, list[str]] = {}
    for r in children:
        statuses.setdefault(r.data.tags["syncbench.optuna_trial"], []).append(r.info.status)
    assert all(statuses.get(f"{name}/{t.number}") == ["KILLED"] for t in killed), statuses
    assert all(statuses.get(f"{name}/{t.number}") == ["FINISHED"] for t in whole), statuses
    return killed, whole


def _running_trial(name: str, ws: Path) -> bool:
    from tests.test_sweeps import sql

    return sql(ws / "optuna.db", "SELECT count(*) FROM trials WHERE state = 'RUNNING'") >= 1 and \
        sql(ws / "mlflow.db", "SELECT count(*) FROM runs WHERE status = 'RUNNING'") >= 2


@needs_slurm
@pytest.mark.heavy
def test_dist_trial_runs_as_a_job_of_one_task_per_rank_and_reaches_its_target(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNCBENCH_DIST_DEVICE", "cpu")  # gloo on the CPU, whatever the machine has
    name = "slurm-dist"
    spec = write_spec(tmp_path / "dist.yaml", name, grid={}, seeds=[0], base=DIGITS,
                      set={"cluster.backend": "dist", "cluster.workers": 2, "budget.train_time_s": 30,
                           "eval.every_s": 0.2}, slurm={"time_min": 10})
    assert slurm_sweep(spec, ws) == 0
    complete_once(name, ws, None, {("base", 0)})
    _, children = mlflow_runs(name, ws)
    (run,) = children
    assert run.data.tags["outcome"] == "reached"
    assert run.data.metrics["tta_s"] <= 30
    # recorded by rank 0 of a 2-rank torch.distributed group that joined through SLURM's environment
    assert run.data.tags["syncbench.dist.launcher"] == "torchrun"
    assert run.data.tags["syncbench.dist.world_size"] == "2"
    # the launcher job (one task) and the trial's own job: two tasks, each left its result
    two_task_jobs = [Path(p).parent.name for p in glob.glob(str(ws / "slurm" / "*" / "*_1_result.pkl"))]
    assert len(two_task_jobs) == 1
    assert (ws / "slurm" / two_task_jobs[0] / f"{two_task_jobs[0]}_0_result.pkl").exists()
