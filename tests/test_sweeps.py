"""The sweep launcher against real stores: Optuna on SQLite and PostgreSQL, MLflow on
SQLite, real launcher processes killed with SIGKILL. No mocks.

Each test has its own workspace. Creating MLflow's and Optuna's tables costs seconds
(dozens of migrations), so a session fixture creates them once and each workspace starts
from a copy of those empty databases.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from syncbench.sweeps.cli import main

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "experiments" / "configs" / "digits_mlp.yaml")
SMOKE = str(REPO / "sweeps" / "specs" / "digits_smoke.yaml")
FAST_HEARTBEAT = {"SYNCBENCH_SWEEP_HEARTBEAT_S": "1", "SYNCBENCH_SWEEP_GRACE_S": "3"}
# trials that take a second or two of wall time: the target cannot be reached, so each
# run trains to its budget (step_s is pinned in digits_mlp.yaml, so the work is fixed)
SLOW = {"target.value": 1.01, "eval.every_s": 0.05}


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="session")
def empty_stores(tmp_path_factory) -> Path:
    """A workspace whose mlflow.db and optuna.db hold the tables and nothing else."""
    import optuna

    from syncbench.experiments.recording import open_client
    from syncbench.sweeps.storage import use_wal

    ws = tmp_path_factory.mktemp("empty-stores")
    for name in ("mlflow.db", "optuna.db"):
        use_wal(f"sqlite:///{ws / name}")
    open_client(f"sqlite:///{ws / 'mlflow.db'}")
    optuna.storages.RDBStorage(f"sqlite:///{ws / 'optuna.db'}").engine.dispose()
    for name in ("mlflow.db", "optuna.db"):
        with contextlib.closing(sqlite3.connect(ws / name)) as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return ws


@pytest.fixture
def ws(tmp_path, empty_stores, monkeypatch) -> Path:
    """A fresh workspace (copies of the empty stores). The CLI exports the workspace to
    the environment; monkeypatch puts the old value back afterwards."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    for name in ("mlflow.db", "optuna.db"):
        shutil.copy(empty_stores / name, workspace / name)
    monkeypatch.setenv("SYNCBENCH_WORKSPACE", str(workspace))
    return workspace


def write_spec(path: Path, name: str, *, grid: dict, seeds: list[int], base: str = DIGITS, **extra) -> str:
    spec = {"name": name, "base": base, "grid": grid, "seeds": seeds, **extra}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def sweep(spec: str, ws: Path, *args: str) -> int:
    """`syncbench sweep` in this process (the imports are paid once for the whole file)."""
    return main(["sweep", spec, "--workspace", str(ws), "--no-progress", *args])


def launcher(spec: str, ws: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`syncbench sweep` as its own process, as a user would start it."""
    env = {**os.environ, **(env or {}), "SYNCBENCH_WORKSPACE": str(ws)}
    return subprocess.Popen([sys.executable, "-m", "syncbench", "sweep", spec, "--workspace", str(ws),
                             "--no-progress", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def study(name: str, ws: Path, storage: str | None = None):
    import optuna

    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{ws / 'optuna.db'}")


def mlflow_runs(name: str, ws: Path):
    """(parent runs, child runs) of the sweep's experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    assert exp is not None, f"no MLflow experiment {name!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("syncbench.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("syncbench.role") == "trial"]
    return parents, children


def items(trials) -> Counter:
    return Counter((t.user_attrs["cell"], t.user_attrs["seed"]) for t in trials)


def states(trials) -> Counter:
    return Counter(t.state.name for t in trials)


def run_key(run) -> tuple[str, int]:
    return run.data.tags["syncbench.cell"], int(run.data.tags["syncbench.seed"])


def sql(db: Path, query: str) -> int:
    """One number from a store, read-only, without opening it through Optuna or MLflow
    (which would create tables while the launcher is creating them)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute(query).fetchone()[0]
    except sqlite3.Error:
        return 0


# ------------------------------------------------------------------ grid, resume
def test_grid_sweep_runs_each_cell_and_seed_once_then_resumes_to_nothing(ws, capsys):
    assert sweep(SMOKE, ws) == 0
    trials = study("digits-smoke", ws).trials
    assert states(trials) == {"COMPLETE": 8}
    cells = {"strategy.name=sync,cluster.workers=1", "strategy.name=sync,cluster.workers=4",
             "strategy.name=async,cluster.workers=1", "strategy.name=async,cluster.workers=4"}
    assert set(items(trials)) == {(c, s) for c in cells for s in (0, 1)}
    assert all(v == 1 for v in items(trials).values())
    assert all(t.user_attrs["outcome"] in ("reached", "budget", "diverged") for t in trials)
    assert all(t.value == t.user_attrs["tta_s"] for t in trials if t.user_attrs["outcome"] == "reached")

    parents, children = mlflow_runs("digits-smoke", ws)
    assert len(parents) == 1 and len(children) == 8
    parent = parents[0]
    assert parent.info.run_name == "digits-smoke" and parent.info.status == "FINISHED"
    assert parent.data.tags["syncbench.sweep"] == "digits-smoke"
    assert yaml.safe_load(parent.data.params["seeds"]) == [0, 1]
    assert {run_key(r) for r in children} == set(items(trials))
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["syncbench.sweep"] == "digits-smoke" and tags["syncbench.phase"] == "eval"
        name, workers = (kv.split("=")[1] for kv in tags["syncbench.cell"].split(","))
        assert params["strategy.name"] == name and params["cluster.workers"] == workers
        assert params["seed"] == tags["syncbench.seed"]
        study_name, number = tags["syncbench.optuna_trial"].rsplit("/", 1)
        trial = trials[int(number)]
        assert study_name == "digits-smoke" and trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.info.status == "FINISHED" and tags["outcome"] == trial.user_attrs["outcome"]

    # the same command again: nothing is missing, nothing runs
    assert sweep(SMOKE, ws) == 0
    assert len(study("digits-smoke", ws).trials) == 8
    assert [len(x) for x in mlflow_runs("digits-smoke", ws)] == [1, 8]

    # resuming with another base config would mix two experiments: refused, nothing created
    capsys.readouterr()
    assert sweep(SMOKE, ws, "--set", "budget.train_time_s=3") == 2
    assert "budget.train_time_s: 5 -> 3" in capsys.readouterr().err
    assert len(study("digits-smoke", ws).trials) == 8


def test_step_s_is_calibrated_once_and_pinned_for_every_trial_also_after_adding_seeds(ws, tmp_path):
    grid = {"strategy.name": ["sync", "async"]}
    spec = write_spec(tmp_path / "cal.yaml", "calibrated", grid=grid, seeds=[0],
                      set={"cluster.compute.step_s": None})
    assert sweep(spec, ws) == 0
    step_s = study("calibrated", ws).user_attrs["syncbench.step_calibration"]
    assert len(step_s) == 1  # one task
    ((value, samples),) = ((c["step_s"], c["samples"]) for c in step_s.values())
    assert len(samples) == 8 and value == min(samples)
    # a resume that adds a seed reuses the stored value instead of calibrating again
    spec = write_spec(tmp_path / "cal.yaml", "calibrated", grid=grid, seeds=[0, 1],
                      set={"cluster.compute.step_s": None})
    assert sweep(spec, ws) == 0
    assert study("calibrated", ws).user_attrs["syncbench.step_calibration"] == step_s
    parents, children = mlflow_runs("calibrated", ws)
    assert len(children) == 4 and yaml.safe_load(parents[0].data.tags["syncbench.seeds"]) == [0, 1]
    for run in children:
        assert float(run.data.params["cluster.compute.step_s"]) == value
        assert run.data.tags["syncbench.step_s_source"] == "sweep"
        assert json.loads(run.data.tags["syncbench.step_time_samples"]) == pytest.approx(samples, rel=1e-5)


# ------------------------------------------------------------------ kill -9 and resume
@pytest.mark.heavy
def test_killed_launcher_leaves_nothing_running_after_resume(ws, tmp_path, monkeypatch):
    for key, value in FAST_HEARTBEAT.items():  # the resume waits out the grace period: keep it short
        monkeypatch.setenv(key, value)
    spec = write_spec(tmp_path / "slow.yaml", "killed", grid={"cluster.workers": [1, 2]}, seeds=[0, 1],
                      set={**SLOW, "budget.train_time_s": 2.0})
    proc = launcher(spec, ws, env=FAST_HEARTBEAT)
    deadline = time.monotonic() + 120
    # kill when one trial is COMPLETE and the next one has its MLflow run open
    while not (sql(ws / "optuna.db", "SELECT count(*) FROM trials WHERE state = 'COMPLETE'") >= 1
               and sql(ws / "mlflow.db", "SELECT count(*) FROM runs WHERE status = 'RUNNING'") >= 2):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the launcher never got to its second trial"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    before = study("killed", ws).trials
    done_before = {t.number: t.value for t in before if t.state.name == "COMPLETE"}
    killed = [t for t in before if t.state.name == "RUNNING"]
    assert len(killed) == 1 and done_before

    assert sweep(spec, ws) == 0  # waits out the grace period, fails the dead trial, retries it
    after = study("killed", ws).trials
    complete = [t for t in after if t.state.name == "COMPLETE"]
    assert sorted(items(complete).values()) == [1, 1, 1, 1]  # every cell × seed exactly once
    assert {n: v for n, v in ((t.number, t.value) for t in complete) if n in done_before} == done_before
    dead = after[killed[0].number]
    assert dead.state.name == "FAIL"
    retries = [t for t in after if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"

    _, children = mlflow_runs("killed", ws)
    assert not [r for r in children if r.info.status == "RUNNING"]
    dead_runs = [r for r in children if r.data.tags["syncbench.optuna_trial"] == f"killed/{dead.number}"]
    assert len(dead_runs) == 1 and dead_runs[0].info.status == "KILLED"
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(Counter(run_key(r) for r in finished).values()) == [1, 1, 1, 1]


# ------------------------------------------------------------------ two launchers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server on a free loopback port; its URL."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL server binaries not installed (looked for /usr/lib/postgresql/*/bin/initdb)")
    bindir = Path(bins[-1]).parent
    as_pg: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        if not shutil.which("runuser"):
            pytest.skip("running as root and runuser is missing: cannot start postgres as the postgres user")
        as_pg = ["runuser", "-u", "postgres", "--"]
    # not under pytest's tmp dir: its parents are private to root, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="syncbench-test-pg-"))
    if as_pg:
        shutil.chown(root, user="postgres")
    data, port = root / "data", _free_port()
    try:
        _run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"])
        _run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "start", "-o",
              f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"])
        try:
            _run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna"])
            yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
        finally:
            subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}"


@pytest.mark.heavy
@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_two_launchers_run_each_cell_and_seed_exactly_once(backend, ws, tmp_path, request):
    from syncbench.sweeps.launcher import LaunchOptions, run_sweep
    from syncbench.sweeps.spec import load_sweep

    storage = request.getfixturevalue("postgres") if backend == "postgresql" else f"sqlite:///{ws / 'optuna.db'}"
    name = f"two-launchers-{backend}"
    spec = write_spec(tmp_path / "two.yaml", name, grid={"strategy.name": ["sync", "async"],
                                                         "cluster.workers": [1, 2]},
                      seeds=[0, 1, 2], set={**SLOW, "budget.train_time_s": 0.5})
    # launcher 1: its own process, with a pool of two worker processes
    proc = launcher(spec, ws, "--storage", storage, "--jobs", "2")
    deadline = time.monotonic() + 180
    while not _running_trials(name, ws, storage):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "launcher 1 never started a trial"
        time.sleep(0.2)
    # launcher 2: this process, trials in-process, joining while launcher 1 is busy
    options = LaunchOptions.from_env(ws, storage, None, bar=False, lines=False)
    mine = run_sweep(load_sweep(spec), options)
    assert proc.wait(timeout=180) == 0, proc.communicate()[0]
    assert mine.exit_code == 0
    assert 1 <= mine.trials_run < 12, "both launchers should have run trials"

    trials = study(name, ws, storage).trials
    assert states(trials) == {"COMPLETE": 12}  # no duplicate, no stray sampled trial
    assert sorted(items(trials).values()) == [1] * 12
    parents, children = mlflow_runs(name, ws)
    assert len(parents) == 1 and len(children) == 12
    assert sorted(Counter(run_key(r) for r in children).values()) == [1] * 12
    assert all(r.info.status == "FINISHED" for r in children)


def _running_trials(name: str, ws: Path, storage: str) -> int:
    """RUNNING trials of a sweep, read without creating anything (the launcher may still be
    creating the tables)."""
    if storage.startswith("sqlite"):
        return sql(ws / "optuna.db", "SELECT count(*) FROM trials WHERE state = 'RUNNING'")
    import sqlalchemy

    engine = sqlalchemy.create_engine(storage.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as con:
            return con.execute(sqlalchemy.text("SELECT count(*) FROM trials WHERE state = 'RUNNING'")).scalar()
    except sqlalchemy.exc.SQLAlchemyError:
        return 0
    finally:
        engine.dispose()


# ------------------------------------------------------------------ tune then evaluate
@pytest.mark.heavy
def test_tuned_cells_run_their_seeds_with_their_best_parameters(ws, tmp_path):
    tune = {"n_trials": 3, "params": {
        "task.module_args.lr": {"low": 0.003, "high": 0.1, "log": True},
        "strategy.local_steps": {"choices": [2, 4], "when": {"strategy.name": "local_sgd"}}}}
    spec = write_spec(tmp_path / "tuned.yaml", "tuned", grid={"strategy.name": ["sync", "local_sgd"],
                                                              "cluster.workers": [2]},
                      seeds=[0, 1], tune=tune)
    assert sweep(spec, ws) == 0

    _, children = mlflow_runs("tuned", ws)
    assert Counter(r.data.tags["syncbench.phase"] for r in children) == {"tune": 6, "eval": 4}
    for name in ("sync", "local_sgd"):
        cell = f"strategy.name={name},cluster.workers=2"
        tuning = study(f"tuned/tune/{cell}", ws)
        # the race pruner (the default) may stop trials that can no longer win: PRUNED, still counted
        assert sum(states(tuning.trials).values()) == 3 and set(states(tuning.trials)) <= {"COMPLETE", "PRUNED"}
        assert all(("strategy.local_steps" in t.params) == (name == "local_sgd") for t in tuning.trials)
        best = tuning.best_trial.params
        runs = [r for r in children if r.data.tags["syncbench.cell"] == cell]
        evals = [r for r in runs if r.data.tags["syncbench.phase"] == "eval"]
        assert sorted(int(r.data.params["seed"]) for r in evals) == [0, 1]
        assert all(r.data.params["seed"] == "0" for r in runs if r.data.tags["syncbench.phase"] == "tune")
        for run in evals:
            assert float(run.data.params["task.module_args.lr"]) == pytest.approx(best["task.module_args.lr"])
            if name == "local_sgd":
                assert int(run.data.params["strategy.local_steps"]) == best["strategy.local_steps"]
            assert run.data.tags["syncbench.tuned_from"] == f"tuned/tune/{cell}/{tuning.best_trial.number}"


# ------------------------------------------------------------------ tuning race
RACE_TUNE = {"n_trials": 6, "params": {"task.module_args.lr": {"low": 1.0e-4, "high": 0.05, "log": True}}}
RACE_CELL = "strategy.name=sync,cluster.workers=2"


@pytest.mark.heavy
def test_race_pruner_stops_trials_that_cannot_win_and_never_the_best(ws, tmp_path):
    """Sequential tuning (--jobs 1) of one cell: each trial is raced against the best TTA of
    the trials before it. A pruned trial is PRUNED in Optuna and outcome=pruned in MLflow,
    was stopped at the first evaluation after which it could no longer win, and, rerun
    without pruning, would indeed have been slower than the cell's best."""
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from syncbench.experiments.config import load_config
    from syncbench.experiments.run import execute_run

    every, budget = 0.01, 2.0  # digits_mlp.yaml's eval.every_s; a short budget
    spec = write_spec(tmp_path / "race.yaml", "race", grid={"strategy.name": ["sync"], "cluster.workers": [2]},
                      seeds=[0], set={"budget.train_time_s": budget}, tune=RACE_TUNE)
    assert sweep(spec, ws) == 0
    trials = sorted(study(f"race/tune/{RACE_CELL}", ws).trials, key=lambda t: t.number)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and len(pruned) < len(trials)
    assert states(trials)["COMPLETE"] + len(pruned) == 6  # pruned trials count towards n_trials
    best_final = min(t.value for t in trials if t.state == TrialState.COMPLETE)
    for t in trials:
        # every evaluation was reported: steps 1..k, k = the evaluation the run stopped at
        assert sorted(t.intermediate_values) == list(range(1, t.last_step + 1))
        earlier = [u.value for u in trials[:t.number]
                   if u.state == TrialState.COMPLETE and u.user_attrs["outcome"] == "reached"]
        best = min(earlier, default=math.inf)
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["outcome"] == "pruned"
            # stopped as soon as the next evaluation would come after the best so far, not later
            assert (t.last_step + 1) * every > best + 1e-9 and t.last_step * every <= best + 1e-9
        else:
            # not pruned: it reached the target no later than the best before it (or raced nobody)
            assert math.isinf(best) or (t.user_attrs["outcome"] == "reached" and t.value <= best + 1e-9)

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    _, children = mlflow_runs("race", ws)
    tune_runs = {r.info.run_id: r for r in children if r.data.tags["syncbench.phase"] == "tune"}
    assert sorted(r.data.tags["outcome"] for r in tune_runs.values() if r.data.tags["outcome"] == "pruned") == \
        ["pruned"] * len(pruned)
    for t in pruned:
        run = tune_runs[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "pruned"
        assert run.data.metrics["reached"] == 0 and "tta_s" not in run.data.metrics
        history = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
        assert [m.value for m in history] == pytest.approx([t.intermediate_values[k] for k in sorted(t.intermediate_values)])
    assert sum(r.data.tags["syncbench.phase"] == "eval" for r in children) == 1  # pruned trials are not eval runs

    # the report lists pruned trials with the tuning trials and uses none of them for TTA statistics
    assert main(["report", "race", "--workspace", str(ws)]) == 0
    out = ws / "reports" / "race"
    (row,) = list(csv.DictReader(open(out / "summary.csv")))
    assert (row["n_seeds"], row["n_reached"]) == ("1", "1")
    md = (out / "report.md").read_text()
    assert f"| sync, N=2 | 6 | {6 - len(pruned)} | {len(pruned)} |" in md  # the report's one label format

    # rerun each pruned trial's parameters to the end: none of them would have won
    for t in pruned:
        config = load_config(DIGITS, [f"budget.train_time_s={budget}", "cluster.workers=2",
                                      f"task.module_args.lr={t.params['task.module_args.lr']}", "seed=0"])
        result = execute_run(config, workspace=tmp_path / "rerun", tracking_uri=f"sqlite:///{tmp_path / 'rerun.db'}")
        assert result.outcome != "reached" or result.tta_s > best_final


@pytest.mark.heavy
def test_median_pruner_compares_the_target_metric_in_its_own_direction(ws, tmp_path):
    """tune.pruner: median is Optuna's MedianPruner on the reported val_acc. The tuning study
    minimises TTA, but accuracy is better high: a pruned trial must be one whose best
    accuracy so far was below the median of the finished trials at that evaluation."""
    import numpy as np
    from optuna.trial import TrialState

    tune = {**RACE_TUNE, "pruner": "median"}
    spec = write_spec(tmp_path / "median.yaml", "median", grid={"strategy.name": ["sync"], "cluster.workers": [2]},
                      seeds=[0], set={"budget.train_time_s": 1.0}, tune=tune)
    assert sweep(spec, ws) == 0
    trials = sorted(study(f"median/tune/{RACE_CELL}", ws).trials, key=lambda t: t.number)
    assert set(states(trials)) <= {"COMPLETE", "PRUNED"} and len(trials) == 6
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "the low learning rates of this range should fall behind the median"
    for t in pruned:
        step = t.last_step
        others = [u.intermediate_values[step] for u in trials[:t.number]
                  if u.state == TrialState.COMPLETE and step in u.intermediate_values]
        assert max(t.intermediate_values.values()) < np.median(others)
    _, children = mlflow_runs("median", ws)
    assert sum(r.data.tags["outcome"] == "pruned" for r in children) == len(pruned)


# ------------------------------------------------------------------ divergence
def test_a_diverging_cell_completes_with_a_penalty_and_is_never_best(ws, tmp_path):
    spec = write_spec(tmp_path / "diverge.yaml", "diverge", grid={"task.module_args.lr": [0.1, 1.0e12]},
                      seeds=[0, 1], set={"task.module_args.optimizer": "sgd", "task.module_args.momentum": 0.9,
                                         "cluster.workers": 2})
    assert sweep(spec, ws) == 0
    s = study("diverge", ws)
    assert states(s.trials) == {"COMPLETE": 4}
    by_cell = {t.user_attrs["cell"] for t in s.trials if t.user_attrs["outcome"] == "diverged"}
    assert by_cell == {"task.module_args.lr=1000000000000.0"}
    budget = 5.0  # digits_mlp.yaml
    assert all(t.value == 4 * budget for t in s.trials if t.user_attrs["outcome"] == "diverged")
    assert s.best_trial.user_attrs["outcome"] == "reached"


def test_a_run_that_raises_fails_its_trial_and_the_sweep_exits_1(ws, tmp_path):
    # a module that raises only once training is under way (not a config error): each replica
    # of the 4 workers fails at its 4th training step
    spec = write_spec(tmp_path / "raises.yaml", "raises", grid={"task.module_args.fail_after": [100000, 3]},
                      seeds=[0], set={"task.module": "tests.modules:FailingMLP"})
    assert sweep(spec, ws) == 1
    trials = study("raises", ws).trials
    assert sorted(states(trials).items()) == [("COMPLETE", 1), ("FAIL", 1)]
    failed = next(t for t in trials if t.state.name == "FAIL")
    assert failed.user_attrs["outcome"] == "failed" and "boom" in failed.user_attrs["error"]
    parents, children = mlflow_runs("raises", ws)
    assert parents[0].info.status == "FAILED"
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    # a rerun retries what failed, not what completed
    assert sweep(spec, ws) == 1
    assert sorted(states(study("raises", ws).trials).items()) == [("COMPLETE", 1), ("FAIL", 2)]


# ------------------------------------------------------------------ bad input
BAD_SPECS = {
    "unknown spec key": ({"grids": {"cluster.workers": [1]}}, "grids: unknown key"),
    "unknown config key": ({"grid": {"cluster.workrs": [1, 2]}}, "cluster.workrs: unknown key"),
    "wrong value type": ({"grid": {"cluster.workers": ["two"]}}, "cluster.workers"),
    "empty seeds": ({"seeds": []}, "seeds"),
    "missing base": ({"base": "experiments/configs/nope.yaml"}, "base: no such file"),
    "bad import path": ({"set": {"task.module": "syncbench.experiments.nope:MLP"}}, "task.module: cannot import"),
    "unknown tuned key": ({"tune": {"n_trials": 2, "params": {"strategy.local_stepz": {"choices": [2]}}}},
                          "strategy.local_stepz"),
    "invalid tuned value": ({"tune": {"n_trials": 2, "params": {"strategy.local_steps": {"choices": [0, 4]}}}},
                            "tune.params.strategy.local_steps: value 0"),
    "when matches nothing": ({"tune": {"n_trials": 2, "params": {"strategy.local_steps": {
        "choices": [2], "when": {"strategy.name": "local-sgd"}}}}}, "matches no grid cell"),
    "when names no key": ({"tune": {"n_trials": 2, "params": {"strategy.local_steps": {
        "choices": [2], "when": {"strategy.nam": "sync"}}}}}, "'strategy.nam' is not a config key"),
    "bad pruner name": ({"tune": {"n_trials": 2, "pruner": "medain", "params": {
        "task.module_args.lr": {"low": 0.001, "high": 0.1}}}}, "tune.pruner"),
    "unknown analysis key": ({"analysis": {"memory_limit": 8000000}}, "analysis.memory_limit: unknown key"),
    "memory limit not positive": ({"analysis": {"memory_limit_bytes": 0}}, "analysis.memory_limit_bytes"),
    "race margin below 1": ({"tune": {"n_trials": 2, "race_margin": 0.5, "params": {
        "task.module_args.lr": {"low": 0.001, "high": 0.1}}}}, "tune.race_margin"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_specs_exit_2_naming_the_key_and_create_nothing(case, tmp_path, capsys, monkeypatch):
    change, message = BAD_SPECS[case]
    spec = {"name": "bad", "base": DIGITS, "grid": {"strategy.name": ["sync", "async"]}, "seeds": [0], **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    workspace = tmp_path / "ws"
    monkeypatch.setenv("SYNCBENCH_WORKSPACE", str(workspace))
    assert main(["sweep", str(path), "--workspace", str(workspace), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (workspace / "optuna.db").exists() and not (workspace / "mlflow.db").exists()


def test_unreachable_storage_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SYNCBENCH_WORKSPACE", str(tmp_path / "ws"))
    code = main(["sweep", SMOKE, "--workspace", str(tmp_path / "ws"), "--no-progress",
                 "--storage", f"postgresql://nobody@127.0.0.1:{_free_port()}/none"])
    assert code == 2
    assert "--storage postgresql" in capsys.readouterr().err


def test_codec_cost_is_measured_once_and_pinned_for_every_compressed_trial(ws, tmp_path):
    """cluster.compute.codec_s_per_mb, like step_s: one measurement per task and codec, kept in
    the study and pinned in every trial of the cells that compress (none: nothing pinned)."""
    grid = {"strategy.compression": ["none", "fp16"]}
    spec = write_spec(tmp_path / "codec.yaml", "codec-pinned", grid=grid, seeds=[0, 1],
                      set={"cluster.workers": 2, "budget.train_time_s": 0.3})
    assert sweep(spec, ws) == 0
    stored = study("codec-pinned", ws).user_attrs["syncbench.codec_calibration"]
    ((key, value),) = stored.items()
    assert "fp16" in key and value > 0
    _, children = mlflow_runs("codec-pinned", ws)
    pinned = [r for r in children if r.data.params["strategy.compression"] == "fp16"]
    plain = [r for r in children if r.data.params["strategy.compression"] == "none"]
    assert len(pinned) == len(plain) == 2
    assert all(float(r.data.params["cluster.compute.codec_s_per_mb"]) == value for r in pinned)
    assert all(r.data.params["cluster.compute.codec_s_per_mb"] == "None" for r in plain)
