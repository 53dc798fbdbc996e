"""Sweep resume paths (issue 15), each with a real kill or a real spec edit: a spec edit that
drops a cell while its trials are queued, a tuned sweep resumed after its launcher was killed
mid-tuning, and a pool worker dying under ``--jobs 2``. Real stores (SQLite), real launcher
processes, SIGKILL; the helpers and fixtures are test_sweeps.py's."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.test_sweeps import (  # noqa: F401 - fixtures
    FAST_HEARTBEAT,
    SLOW,
    empty_stores,
    items,
    launcher,
    mlflow_runs,
    sql,
    states,
    study,
    sweep,
    write_spec,
    ws,
)


def _kill_when_one_trial_done_and_another_running(proc, ws: Path) -> None:
    deadline = time.monotonic() + 180
    while not (sql(ws / "optuna.db", "SELECT count(*) FROM trials WHERE state = 'COMPLETE'") >= 1
               and sql(ws / "mlflow.db", "SELECT count(*) FROM runs WHERE status = 'RUNNING'") >= 2):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the launcher never got to its second trial"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.heavy
def test_a_spec_edit_that_drops_a_cell_fails_its_leftover_trials_and_finishes_the_rest(ws, tmp_path, monkeypatch):
    for key, value in FAST_HEARTBEAT.items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "edited.yaml"
    settings = {**SLOW, "budget.train_time_s": 1.0}
    spec = write_spec(path, "edited", grid={"cluster.workers": [1, 2]}, seeds=[0, 1], set=settings)
    proc = launcher(spec, ws, env=FAST_HEARTBEAT)
    _kill_when_one_trial_done_and_another_running(proc, ws)
    before = study("edited", ws).trials
    (killed,) = [t for t in before if t.state.name == "RUNNING"]

    # the edit: the N = 2 cell is dropped (largest clusters run first: the killed trial is one of its)
    write_spec(path, "edited", grid={"cluster.workers": [1]}, seeds=[0, 1], set=settings)
    assert killed.user_attrs["cell"] == "cluster.workers=2"
    assert sweep(spec, ws) == 0

    after = study("edited", ws).trials
    assert not [t for t in after if t.state.name in ("RUNNING", "WAITING")]
    complete = [t for t in after if t.state.name == "COMPLETE"]
    kept = Counter(k for k in items(complete) if k[0] == "cluster.workers=1")
    assert kept == {("cluster.workers=1", 0): 1, ("cluster.workers=1", 1): 1}
    # the dead trial's retry belongs to a cell the spec no longer has: failed, never run
    retries = [t for t in after if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state.name == "FAIL"
    assert retries[0].user_attrs["error"] == "cell × seed not in the current spec"
    _, children = mlflow_runs("edited", ws)
    assert not [r for r in children if r.info.status == "RUNNING"]
    dropped = Counter(r.info.status for r in children if r.data.tags["syncbench.cell"] == "cluster.workers=2")
    assert dropped["KILLED"] == 1 and sum(dropped.values()) == len([t for t in before if t.state.name == "COMPLETE"]) + 1


@pytest.mark.heavy
def test_a_tuned_sweep_resumed_after_a_kill_spends_exactly_n_trials_and_evaluates_the_best(ws, tmp_path,
                                                                                          monkeypatch):
    for key, value in FAST_HEARTBEAT.items():
        monkeypatch.setenv(key, value)
    tune = {"n_trials": 3, "params": {"task.module_args.lr": {"low": 0.003, "high": 0.1, "log": True}}}
    spec = write_spec(tmp_path / "tuned.yaml", "tunedkill", grid={"cluster.workers": [2]}, seeds=[0],
                      tune=tune, set={**SLOW, "budget.train_time_s": 1.0})
    proc = launcher(spec, ws, env=FAST_HEARTBEAT)
    _kill_when_one_trial_done_and_another_running(proc, ws)
    cell = "cluster.workers=2"
    killed = [t for t in study(f"tunedkill/tune/{cell}", ws).trials if t.state.name == "RUNNING"]
    assert len(killed) == 1

    assert sweep(spec, ws) == 0
    tuning = study(f"tunedkill/tune/{cell}", ws).trials
    dead = tuning[killed[0].number]
    assert dead.state.name == "FAIL"
    retry = [t for t in tuning if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].params == dead.params  # the retry gets its recorded values back
    # n_trials = 3 tuning trials spent: the dead one replaced by its retry, not counted twice
    counted = [t for t in tuning if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == 3
    best = min((t for t in counted if t.state.name == "COMPLETE"), key=lambda t: t.value)
    (evaluation,) = [t for t in study("tunedkill", ws).trials if t.state.name == "COMPLETE"]
    assert evaluation.user_attrs["overrides"] == best.params
    _, children = mlflow_runs("tunedkill", ws)
    assert not [r for r in children if r.info.status == "RUNNING"]
    assert Counter(r.info.status for r in children if r.data.tags["syncbench.phase"] == "tune") == \
        {"FINISHED": 3, "KILLED": 1}


def _pool_workers(launcher_pid: int) -> list[int]:
    """The launcher's spawned pool workers (its resource tracker is no worker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher_pid and "multiprocessing.spawn" in cmdline:
            found.append(int(entry))
    return found


@pytest.mark.heavy
def test_a_pool_worker_dying_fails_its_trials_and_a_rerun_completes_them(ws, tmp_path):
    spec = write_spec(tmp_path / "pool.yaml", "pooldeath", grid={"cluster.workers": [1, 2]}, seeds=[0],
                      set={**SLOW, "budget.train_time_s": 1.0})
    proc = launcher(spec, ws, "--jobs", "2", env=FAST_HEARTBEAT)
    deadline = time.monotonic() + 180
    # the sweep's parent run and both trials' runs: each pool worker has a run to leave behind
    while sql(ws / "mlflow.db", "SELECT count(*) FROM runs WHERE status = 'RUNNING'") < 3 or \
            not _pool_workers(proc.pid):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no trial started in a pool worker"
        time.sleep(0.05)
    os.kill(_pool_workers(proc.pid)[0], signal.SIGKILL)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, output  # a trial failed; the launcher itself carried on

    trials = study("pooldeath", ws).trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and all("worker process died" in t.user_attrs["error"] for t in failed)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    _, children = mlflow_runs("pooldeath", ws)
    assert not [r for r in children if r.info.status == "RUNNING"]  # the dead worker's run is FAILED
    assert sum(r.info.status == "FAILED" for r in children) >= 1

    assert sweep(spec, ws) == 0  # the rerun retries what failed, and only that
    complete = [t for t in study("pooldeath", ws).trials if t.state.name == "COMPLETE"]
    assert sorted(items(complete).values()) == [1, 1]
    assert states(study("pooldeath", ws).trials)["FAIL"] == len(failed)


@pytest.mark.heavy
def test_a_trial_that_keeps_killing_its_launcher_is_given_up_after_the_retry_cap(ws, tmp_path, monkeypatch):
    """The retry cap holds across launches: a cell x seed whose trial kills its launcher every
    time runs 1 + MAX_STALE_RETRIES times in all, then every rerun leaves it alone (its runs
    KILLED, none RUNNING) while the sweep's other cells finish."""
    from syncbench.sweeps.trial_queue import MAX_STALE_RETRIES

    for key, value in FAST_HEARTBEAT.items():
        monkeypatch.setenv(key, value)
    spec = write_spec(tmp_path / "poison.yaml", "poison", seeds=[0],
                      grid={"task.module": ["tests.modules:SelfKillingMLP", "syncbench.experiments.digits:MLP"]},
                      set={"cluster.workers": 1, "cluster.compute.step_s": 0.001})
    deaths = 0
    for _ in range(MAX_STALE_RETRIES + 3):
        proc = launcher(spec, ws, env=FAST_HEARTBEAT)
        out, _ = proc.communicate(timeout=120)
        if proc.returncode == -signal.SIGKILL:
            deaths += 1
            continue
        assert proc.returncode == 1, out  # finished, with the given-up cell x seed reported as failed
        assert "is not run again" in out, out
        break
    assert deaths == 1 + MAX_STALE_RETRIES
    trials = study("poison", ws).trials
    poison = [t for t in trials if t.user_attrs.get("cell", "").endswith("SelfKillingMLP")]
    assert len(poison) == 1 + MAX_STALE_RETRIES and all(t.state.name == "FAIL" for t in poison)
    assert [t.state.name for t in trials if t not in poison] == ["COMPLETE"]
    # one more rerun: nothing to run, nothing retried
    proc = launcher(spec, ws, env=FAST_HEARTBEAT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "is not run again" in out, out
    assert len(study("poison", ws).trials) == len(trials)
    _, children = mlflow_runs("poison", ws)
    statuses = Counter(r.info.status for r in children if r.data.tags["syncbench.cell"].endswith("SelfKillingMLP"))
    assert statuses == {"KILLED": 1 + MAX_STALE_RETRIES}


# ------------------------------------------------------------------ the two stores agree (issue 27)
def _sweep_process(spec: str, ws: Path) -> tuple[int, str]:
    """A launch as its own process, as a user resumes: this process keeps no connection to a
    store that is then emptied under it."""
    proc = launcher(spec, ws)
    out = proc.communicate(timeout=300)[0]
    return proc.returncode, " ".join(out.split())


def _empty(db: Path) -> None:
    """What a user's mistake or a restore from the wrong backup does: the store file emptied
    (and its WAL with it), the other store untouched."""
    db.write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


@pytest.mark.heavy
def test_an_emptied_mlflow_store_reruns_the_finished_trials_with_a_warning(ws, tmp_path):
    spec = write_spec(tmp_path / "agree.yaml", "agree-mlflow", grid={"cluster.workers": [1, 2]}, seeds=[0],
                      set={"budget.train_time_s": 0.2, "eval.every_s": 0.05})
    assert _sweep_process(spec, ws)[0] == 0
    first = study("agree-mlflow", ws).trials
    assert states(first) == {"COMPLETE": 2}
    _empty(ws / "mlflow.db")

    code, out = _sweep_process(spec, ws)
    assert code == 0, out
    assert "2 finished trial(s) of study 'agree-mlflow' have no run" in out and "they run again" in out
    assert "2/2 trials complete" in out
    trials = study("agree-mlflow", ws).trials
    assert states(trials) == {"COMPLETE": 4}
    retries = [t for t in trials if t.system_attrs.get("retry_history")]
    assert sorted(t.system_attrs["retry_history"][-1] for t in retries) == [t.number for t in first]
    assert items(retries) == items(first)  # each cell x seed once more, nothing else
    parents, children = mlflow_runs("agree-mlflow", ws)
    assert len(parents) == 1 and len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in retries}

    assert _sweep_process(spec, ws)[0] == 0  # the stores agree now: nothing runs again
    assert len(study("agree-mlflow", ws).trials) == 4 and len(mlflow_runs("agree-mlflow", ws)[1]) == 2


@pytest.mark.heavy
def test_an_emptied_optuna_store_is_refused_while_mlflow_holds_the_runs(ws, tmp_path):
    spec = write_spec(tmp_path / "agree.yaml", "agree-optuna", grid={"cluster.workers": [1, 2]}, seeds=[0],
                      set={"budget.train_time_s": 0.2, "eval.every_s": 0.05})
    assert _sweep_process(spec, ws)[0] == 0
    _empty(ws / "optuna.db")

    code, err = _sweep_process(spec, ws)
    assert code == 2, err
    assert "the Optuna study is missing" in err and "holds its trial runs" in err and "start fresh" in err
    parents, children = mlflow_runs("agree-optuna", ws)  # nothing recorded twice, the parent left FINISHED
    assert len(children) == 2 and [p.info.status for p in parents] == ["FINISHED"]
