"""End-to-end runs on the simulated cluster, recorded in a real MLflow SQLite store."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from syncbench.experiments.config import ConfigError
from syncbench.experiments.run import execute_run
from syncbench.experiments.workspace import default_tracking_uri
from syncbench.sweeps.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "experiments" / "configs" / "digits_mlp.yaml")


def client_for(workspace: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=default_tracking_uri(workspace))


def all_runs(workspace: Path):
    if not (workspace / "mlflow.db").exists():
        return []
    client = client_for(workspace)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps) if exps else []


@pytest.mark.parametrize("strategy", ["sync", "local_sgd", "async"])
def test_each_strategy_reaches_digits_target_with_4_workers(workspace, digits_config, strategy):
    config = digits_config(f"strategy.name={strategy}", "cluster.workers=4")
    result = execute_run(config, workspace=workspace)
    assert result.outcome == "reached"
    assert result.best_val >= 0.95
    run = client_for(workspace).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["outcome"] == "reached"
    m = run.data.metrics
    assert m["reached"] == 1.0 and m["tta_s"] == pytest.approx(result.tta_s) and m["val_acc"] >= 0.95
    assert m["samples_to_target"] > 0 and m["updates_to_target"] > 0 and m["step_time_s"] > 0
    # everything docs/metrics.md lists
    for key in ("best_val", "final_val", "init_s", "activation_bytes", "clock_s", "samples", "time_compute_s",
                "time_comm_s", "time_wait_s", "comm_bytes", "train_loss", "val_loss"):
        assert key in m, key
    if strategy == "async":
        assert m["staleness_mean"] > 0 and m["staleness_max"] >= m["staleness_mean"]
    params = run.data.params
    assert params["strategy.name"] == strategy and params["cluster.workers"] == "4" and params["backend"] == "sim"
    assert params["task.module"] == "syncbench.experiments.digits:MLP"
    for tag in ("syncbench.git_commit", "syncbench.torch", "syncbench.host"):
        assert run.data.tags[tag]
    artifacts = {a.path for a in client_for(workspace).list_artifacts(result.run_id)}
    assert {"config.yaml", "curve.csv"} <= artifacts


def test_curves_use_updates_as_step_and_training_clock_as_timestamp(workspace, digits_config):
    result = execute_run(digits_config("strategy.name=sync", "cluster.workers=2"), workspace=workspace)
    client = client_for(workspace)
    run = client.get_run(result.run_id)
    clock = client.get_metric_history(result.run_id, "clock_s")
    acc = client.get_metric_history(result.run_id, "val_acc")
    assert len(clock) == len(acc) >= 2
    start = run.info.start_time
    for point in clock:
        assert point.timestamp == start + round(point.value * 1000)
    steps = [p.step for p in acc]
    assert steps == sorted(steps) and steps[-1] == run.data.metrics["updates_to_target"]
    assert [p.value for p in clock] == pytest.approx([0.01 * (i + 1) for i in range(len(clock))])


def test_same_config_and_seed_are_reproducible_bit_for_bit(workspace, digits_config):
    overrides = ("strategy.name=async", "cluster.workers=4", "cluster.stragglers={kind: lognormal, sigma: 0.4}")
    first = execute_run(digits_config(*overrides), workspace=workspace)
    second = execute_run(digits_config(*overrides), workspace=workspace)
    assert first.tta_s == second.tta_s is not None
    client = client_for(workspace)
    for key in ("val_acc", "val_loss", "train_loss", "time_wait_s", "staleness_mean"):
        a = [(p.step, p.value) for p in client.get_metric_history(first.run_id, key)]
        b = [(p.step, p.value) for p in client.get_metric_history(second.run_id, key)]
        assert a == b, key
    other_seed = execute_run(digits_config(*overrides, "seed=1"), workspace=workspace)
    a = [p.value for p in client.get_metric_history(first.run_id, "val_loss")]
    c = [p.value for p in client.get_metric_history(other_seed.run_id, "val_loss")]
    assert a != c


def test_diverging_lr_ends_the_run_diverged_within_one_evaluation(workspace, digits_config):
    config = digits_config("task.module_args={lr: 1.0e+10, optimizer: sgd}", "strategy.name=sync", "cluster.workers=2",
                           "budget.train_time_s=5")
    result = execute_run(config, workspace=workspace)
    assert result.outcome == "diverged"
    client = client_for(workspace)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["outcome"] == "diverged"
    assert run.data.metrics["reached"] == 0.0 and "tta_s" not in run.data.metrics
    losses = client.get_metric_history(result.run_id, "train_loss")
    # the run stopped at the first evaluation after the loss went non-finite
    # (MLflow stores +inf as the largest float)
    non_finite = lambda v: not math.isfinite(v) or v >= 1e308  # noqa: E731
    assert non_finite(losses[-1].value)
    assert not any(non_finite(p.value) for p in losses[:-1])
    assert result.clock_s < 0.5


def test_budget_censors_a_run_that_never_reaches(workspace, digits_config):
    config = digits_config("target.value=0.999", "budget.train_time_s=0.05", "eval.every_s=0.02")
    result = execute_run(config, workspace=workspace)
    assert result.outcome == "budget" and result.tta_s is None
    run = client_for(workspace).get_run(result.run_id)
    assert run.data.tags["outcome"] == "budget" and run.data.metrics["reached"] == 0.0
    clocks = [p.value for p in client_for(workspace).get_metric_history(result.run_id, "clock_s")]
    assert clocks == pytest.approx([0.02, 0.04, 0.05])


def test_a_run_that_raises_is_failed_with_its_error(workspace, digits_config):
    # each worker's replica counts its own calls (4 workers: each replica fails at its 31st step)
    config = digits_config("task.module=tests.modules:FailingMLP", "task.module_args={fail_after: 30}",
                           "target.value=1.01")
    with pytest.raises(RuntimeError, match="boom"):
        execute_run(config, workspace=workspace)
    (run,) = all_runs(workspace)
    assert run.info.status == "FAILED"
    assert run.data.tags["outcome"] == "failed"
    assert "boom" in run.data.tags["syncbench.error"]
    assert len(client_for(workspace).get_metric_history(run.info.run_id, "val_acc")) >= 1  # flushed before failing


def test_lightning_return_forms_are_accepted(workspace, digits_config):
    result = execute_run(digits_config("task.module=tests.modules:DictLossMLP"), workspace=workspace)
    assert result.outcome == "reached"


BAD_CONFIGS = [
    (["--set", "strategy.nmae=sync"], "strategy.nmae: unknown key"),
    (["--set", "cluster.workers=four"], "cluster.workers"),
    (["--set", "strategy.name=gossip"], "strategy.name"),
    (["--set", "task.module=syncbench.experiments.digits:Nope"], "task.module"),
    (["--set", "task.module=no_such_package.mod:X"], "task.module"),
    (["--set", "task.module=syncbench.experiments.digits"], "task.module"),
    (["--set", "target.metric=val_f1"], "target.metric"),
    (["--set", "task.module_args.lr=fast"], "configure_optimizers() failed"),
    (["--set", "task.module=tests.modules:SilentMLP"], "target.metric"),
    (["--set", "cluster.stragglers={kind: lognormal}"], "cluster.stragglers.sigma"),
    (["--set", "strategy.backup_workers=4"], "backup_workers"),
    (["--set", "task.module_args={lr: 0.1, bogus: 1}"], "task.module_args"),
    (["--set", "noequals"], "--set"),
]


@pytest.mark.parametrize("args,named", BAD_CONFIGS)
def test_bad_config_exits_2_naming_the_key_and_creates_nothing(workspace, capsys, args, named):
    code = cli_main(["run", DIGITS, "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert named in err
    assert all_runs(workspace) == []


def test_unreachable_tracking_store_exits_2(workspace, capsys):
    code = cli_main(["run", DIGITS, "--no-progress", "--tracking-uri", "postgresql://nobody@127.0.0.1:1/none"])
    assert code == 2
    assert "tracking-uri" in capsys.readouterr().err


@pytest.mark.heavy  # a CLI subprocess or real signals: seconds each; `make test` and CI run it
def test_command_line_run_prints_summary_and_records(tmp_path):
    ws = tmp_path / "ws"
    proc = subprocess.run(
        [sys.executable, "-m", "syncbench", "run", DIGITS, "--set", "strategy.name=local_sgd",
         "--set", "cluster.workers=8", "--workspace", str(ws)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("outcome=")]
    assert proc.stdout.strip().splitlines()[-1].startswith("MLflow: run ")  # where it was recorded, last
    assert line.startswith("outcome=reached") and "tta_s=" in line and "updates_to_target=" in line
    (run,) = all_runs(ws)
    assert run.data.params["cluster.workers"] == "8"
    bad = subprocess.run([sys.executable, "-m", "syncbench", "run", DIGITS, "--set", "batch_size=big",
                          "--workspace", str(ws)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "batch_size" in bad.stderr
    assert len(all_runs(ws)) == 1


def test_interleaved_calibration_times_each_model_in_its_place(workspace, digits_config):
    """calibrate_steps (a sweep's step_s for several models, blocks interleaved) returns each
    model's own timing, in order: a batch of 1024 costs more per step than a batch of 4 (timed
    together, so load hits both alike), and a model timed alone keeps the same form (8 block
    medians, step_s their least)."""
    import torch

    from syncbench.experiments.sim.calibration import calibrate_step, calibrate_steps
    from syncbench.experiments.task import one_thread, prepare_task

    # one worker: 1024 x 4 workers would not fit the training set, which is refused (issue 27)
    small, large = digits_config("batch_size=4"), digits_config("batch_size=1024", "cluster.workers=1")
    with one_thread():
        tasks = [prepare_task(small), prepare_task(large)]
        rng = torch.get_rng_state()
        timed = calibrate_steps([(tasks[0], small), (tasks[1], large)])
        assert torch.equal(torch.get_rng_state(), rng)  # the runs' random streams are untouched
        alone = calibrate_step(tasks[0], small)
    for c in (*timed, alone):
        assert len(c.samples) == 8 and c.step_s == min(c.samples) > 0
    assert timed[1].step_s > 1.3 * timed[0].step_s
