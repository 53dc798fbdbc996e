"""How a sweep's cells and runs are named for people: MLflow run names short enough to show whole,
one label format in every table, and the cell as Optuna parameters (what optuna-dashboard plots)."""

from __future__ import annotations

from pathlib import Path

from syncbench.sweeps.progress import cell_label, run_name
from syncbench.sweeps.spec import load_sweep
from syncbench.sweeps.trial_queue import cell_params

REPO = Path(__file__).resolve().parents[1]
SPEC = f"""\
name: names
base: {REPO / 'experiments' / 'configs' / 'digits_mlp.yaml'}
grid:
  strategy.name: [sync, local_sgd]
  cluster.workers: [1, 8]
  strategy.local_steps: [4, 16]
  cluster.stragglers: [{{kind: none}}, {{kind: lognormal, sigma: 0.3}}]
seeds: [0, 3]
"""


def test_run_names_and_labels_name_the_cell_compactly(tmp_path):
    spec = tmp_path / "names.yaml"
    spec.write_text(SPEC)
    sweep = load_sweep(spec)
    cell = next(c for c in sweep.cells if c.assignment == {
        "strategy.name": "local_sgd", "cluster.workers": 8, "strategy.local_steps": 16,
        "cluster.stragglers": {"kind": "lognormal", "sigma": 0.3}})
    assert run_name(cell, "eval", 3, 0) == "local_sgd N=8 local_steps=16 stragglers=lognormal/0.3 s3"
    assert run_name(cell, "tune", 0, 4) == "tune local_sgd N=8 local_steps=16 stragglers=lognormal/0.3 #4"
    assert cell_label(cell) == "local_sgd, N=8, local_steps=16, stragglers=lognormal/0.3"
    names = {run_name(c, "eval", s, 0) for c in sweep.cells for s in sweep.seeds}
    assert len(names) == len(sweep.cells) * len(sweep.seeds)  # distinct: every run tells its cell and seed


def test_a_grid_of_strategy_and_workers_only_gives_the_short_names(tmp_path):
    spec = tmp_path / "short.yaml"
    spec.write_text(SPEC.replace("  strategy.local_steps: [4, 16]\n", "").replace(
        "  cluster.stragglers: [{kind: none}, {kind: lognormal, sigma: 0.3}]\n", ""))
    sweep = load_sweep(spec)
    assert sorted(run_name(c, "eval", 3, 0) for c in sweep.cells) == [
        "local_sgd N=1 s3", "local_sgd N=8 s3", "sync N=1 s3", "sync N=8 s3"]


def test_cell_params_share_one_search_space_and_match_the_cell(tmp_path):
    spec = tmp_path / "names.yaml"
    spec.write_text(SPEC)
    sweep = load_sweep(spec)
    spaces = set()
    for cell in sweep.cells:
        params = cell_params(sweep, cell, 3)
        values = {name: value for name, value, _ in params}
        assert values["strategy"] == cell.assignment["strategy.name"]
        assert values["workers"] == cell.assignment["cluster.workers"]
        assert values["strategy.local_steps"] == cell.assignment["strategy.local_steps"]
        assert values["seed"] == 3
        # a dict-valued grid key is given as its compact JSON, one of the choices
        assert values["cluster.stragglers"] in ('{"kind":"none"}', '{"kind":"lognormal","sigma":0.3}')
        for _, value, choices in params:
            assert value in choices
        spaces.add(tuple((name, tuple(choices)) for name, _, choices in params))
    assert len(spaces) == 1


def test_a_sweep_on_a_tracking_server_links_its_evaluation_runs_page(tmp_path):
    from syncbench.analysis.ui import EVAL_VIEW_KEY, sweep_link

    link = sweep_link("http://user:secret@mlflow.example:5000/", "7", "abc")
    assert link == ("http://user:***@mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning"
                    f"&viewStateShareKey={EVAL_VIEW_KEY}")
    ws = tmp_path / "ws"
    local = sweep_link(f"sqlite:///{ws / 'mlflow.db'}", "7", "abc", ws)
    assert local.startswith("syncbench ui")  # a database store: the command that serves it


def test_a_resumed_sweep_that_grows_its_grid_keeps_recording_the_cells(tmp_path):
    """Optuna fixes a categorical's choices study-wide at first use: a strategy added to the grid
    on a resume is left out of its trials' parameters (it stays in the ``cell`` attribute), while
    numbers (workers, seed) are int parameters whose range may grow."""
    import optuna

    from syncbench.sweeps.cli import main

    spec = tmp_path / "grow.yaml"
    body = SPEC.replace("name: names", "name: grow").replace("  strategy.local_steps: [4, 16]\n", "").replace(
        "  cluster.stragglers: [{kind: none}, {kind: lognormal, sigma: 0.3}]\n", "")
    body += "set: {budget.train_time_s: 1}\n"
    spec.write_text(body.replace("[sync, local_sgd]", "[sync]").replace("[1, 8]", "[2]").replace("[0, 3]", "[0]"))
    ws = tmp_path / "ws"
    assert main(["sweep", str(spec), "--workspace", str(ws), "--no-progress"]) == 0
    spec.write_text(body.replace("[sync, local_sgd]", "[sync, async]").replace("[1, 8]", "[2, 1]"))
    assert main(["sweep", str(spec), "--workspace", str(ws), "--no-progress"]) == 0
    study = optuna.load_study(study_name="grow", storage=f"sqlite:///{ws / 'optuna.db'}")
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 2 * 2 * 2  # every cell x seed once
    for t in trials:
        cell = dict(part.split("=", 1) for part in t.user_attrs["cell"].split(","))
        assert t.params["workers"] == int(cell["cluster.workers"]) and t.params["seed"] == t.user_attrs["seed"]
        if cell["strategy.name"] == "sync":
            assert t.params["strategy"] == "sync"
        else:
            assert "strategy" not in t.params
