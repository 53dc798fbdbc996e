"""The contract every registered strategy joins automatically: registry x {sim, dist}.

A new strategy file plus its registration line is tested here without a line of test code:
one worker is plain SGD (against a plain PyTorch loop written here), the digits target is
reached, the required metrics and artifacts are recorded, communication is counted when
N > 1, sim runs are bit-reproducible, and both backends hold the same parameters after the
same straggler-free steps. Which of these apply is the strategy's own declaration (its
``Traits``: plain SGD at one worker, identical replicas, a parameter server), never its name.
Each test runs a ``check_*`` function that takes the strategy's name, so that a strategy
registered at run time is checked the same way (tests/test_adding_a_strategy.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from syncbench.experiments.procs.launcher import execute_dist_run
from syncbench.experiments.run import execute_run
from syncbench.experiments.sim.driver import build_simulation
from syncbench.experiments.task import prepare_task
from syncbench.experiments.sharding import ShardedBatches
from syncbench.strategies import STRATEGIES, traits
from syncbench.strategies.tensors import flat_params

NAMES = sorted(STRATEGIES)
SGD = "task.module_args={lr: 0.1, optimizer: sgd, hidden: 32}"
REQUIRED_CURVES = {"val_acc", "val_loss", "train_loss", "clock_s", "samples", "time_compute_s", "time_comm_s",
                   "time_wait_s", "comm_bytes"}
REQUIRED_SUMMARY = {"tta_s", "reached", "samples_to_target", "updates_to_target", "best_val", "final_val", "init_s",
                    "step_time_s", "clock_per_update_s", "activation_bytes"}


def plain_sgd_params(module: torch.nn.Module, train_set, batch_size: int, seed: int, steps: int, lr: float):
    """Plain PyTorch: SGD on one worker's shard (the whole set), the loss written out here."""
    model = copy.deepcopy(module)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = ShardedBatches(train_set, 0, 1, batch_size, seed)
    for _ in range(steps):
        x, y = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_sim_steps(config, steps: int):
    """Every simulated worker completes exactly ``steps`` program steps (no stragglers)."""
    task = prepare_task(config)
    initial = copy.deepcopy(task.module)
    engine = build_simulation(config, task, step_s=1e-3)
    while min(w.completed for w in engine.workers) < steps:
        engine.advance()
    return engine, initial, task


def skip_unless_plain_sgd_at_one_worker(name: str) -> None:
    declared = traits(name)
    if not declared.equals_sgd_at_one_worker:
        pytest.skip(f"{name} declares it is not plain SGD at one worker: {declared.not_sgd_at_one_worker_because}")


def lockstep(name: str) -> bool:
    """Workers that meet at every round run the same arithmetic in the same order on both
    backends; an asynchronous server applies pushes in arrival order, which real processes do
    not fix, so a strategy with one is compared with one worker instead."""
    return not traits(name).has_parameter_server


@pytest.mark.parametrize("name", NAMES)
def test_one_worker_is_plain_sgd_on_sim(digits_config, name):
    check_one_worker_is_plain_sgd_on_sim(digits_config, name)


def check_one_worker_is_plain_sgd_on_sim(digits_config, name: str) -> None:
    """One worker is plain SGD -- or, for a strategy that declares it is not, is not: the
    declaration is checked too, so that it cannot merely switch the check off."""
    config = digits_config(SGD, f"strategy.name={name}", "cluster.workers=1")
    # 2H steps (H = local_steps, 8): a strategy whose global model is its last push's
    # (asynchronous local SGD's server) holds every step here
    steps = 2 * config.strategy.local_steps
    engine, initial, task = run_sim_steps(config, steps)
    expected = plain_sgd_params(initial, task.train_set, config.batch_size, config.seed, steps, lr=0.1)
    assert not torch.equal(expected, flat_params(initial))
    if traits(name).equals_sgd_at_one_worker:
        torch.testing.assert_close(flat_params(engine.global_model()), expected, atol=1e-6, rtol=0)
    else:
        assert not torch.allclose(flat_params(engine.global_model()), expected, atol=1e-6, rtol=0), \
            f"{name} declares it is not plain SGD at one worker, but it is: equals_sgd_at_one_worker=True"


@pytest.mark.parametrize("name", NAMES)
def test_sim_runs_are_bit_reproducible(digits_config, name, tmp_path):
    check_sim_runs_are_bit_reproducible(digits_config, name, tmp_path)


def check_sim_runs_are_bit_reproducible(digits_config, name: str, tmp_path: Path) -> None:
    config = digits_config(f"strategy.name={name}", "cluster.workers=4", "budget.train_time_s=0.3",
                           "cluster.stragglers={kind: lognormal, sigma: 0.5}")
    results = [execute_run(config, workspace=tmp_path / f"ws{i}") for i in range(2)]
    curves = [[(ev.clock_s, ev.updates, ev.samples, ev.metrics) for ev in r.evaluations] for r in results]
    assert curves[0] == curves[1] and len(curves[0]) > 3
    assert results[0].tta_s == results[1].tta_s


def _recorded(workspace: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def _check_recorded(workspace: Path, result, backend: str) -> None:
    assert result.outcome == "reached", result.summary_line()
    client, run = _recorded(workspace, "digits-mlp")
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "reached"
    assert run.data.params["backend"] == backend
    assert REQUIRED_SUMMARY <= set(run.data.metrics), REQUIRED_SUMMARY - set(run.data.metrics)
    curves = {m for m in REQUIRED_CURVES if client.get_metric_history(run.info.run_id, m)}
    assert curves == REQUIRED_CURVES, REQUIRED_CURVES - curves
    assert run.data.metrics["comm_bytes"] > 0  # N = 2: the workers communicated
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curve.csv"} <= artifacts
    # the clock per update is the training clock over the global updates, whatever the backend
    updates = client.get_metric_history(run.info.run_id, "clock_s")[-1].step
    assert run.data.metrics["clock_per_update_s"] == pytest.approx(run.data.metrics["tta_s"] / updates, rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_reaches_target_and_records_everything_on_sim(digits_config, name, tmp_path):
    check_reaches_target_and_records_everything_on_sim(digits_config, name, tmp_path)


def check_reaches_target_and_records_everything_on_sim(digits_config, name: str, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    result = execute_run(digits_config(f"strategy.name={name}", "cluster.workers=2"), workspace=ws)
    _check_recorded(ws, result, "sim")


@pytest.mark.heavy
@pytest.mark.parametrize("name", NAMES)
def test_reaches_target_and_records_everything_on_dist(digits_config, name, tmp_path):
    check_reaches_target_and_records_everything_on_dist(digits_config, name, tmp_path)


def check_reaches_target_and_records_everything_on_dist(digits_config, name: str, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    config = digits_config(f"strategy.name={name}", "cluster.workers=2", "cluster.backend=dist",
                           "budget.train_time_s=20", "eval.every_s=0.02")
    _check_recorded(ws, execute_dist_run(config, workspace=ws), "dist")


def _dist_finals(config, tmp_path: Path, steps: int) -> list[torch.Tensor]:
    """Each rank's final state after ``steps`` training steps on real processes."""
    debug = tmp_path / "debug"
    execute_dist_run(config, workspace=tmp_path / "ws", debug_dir=debug, max_steps=steps, emulate="none")
    return [torch.load(debug / f"rank{r}.pt", weights_only=False)["final"]
            for r in range(config.cluster.workers)]


@pytest.mark.heavy
@pytest.mark.parametrize("name", NAMES)
def test_one_worker_is_plain_sgd_on_dist(digits_config, name, tmp_path):
    check_one_worker_is_plain_sgd_on_dist(digits_config, name, tmp_path)


def check_one_worker_is_plain_sgd_on_dist(digits_config, name: str, tmp_path: Path) -> None:
    skip_unless_plain_sgd_at_one_worker(name)
    config = digits_config(SGD, f"strategy.name={name}", "cluster.workers=1", "cluster.backend=dist",
                           "target.value=1.01", "budget.train_time_s=60")
    task = prepare_task(config)
    (final,) = _dist_finals(config, tmp_path, 15)
    expected = plain_sgd_params(task.module, task.train_set, config.batch_size, config.seed, 15, lr=0.1)
    torch.testing.assert_close(final[: expected.numel()], expected, atol=1e-5, rtol=0)


@pytest.mark.heavy
@pytest.mark.parametrize("name", [n for n in NAMES if lockstep(n)])
def test_both_backends_hold_the_same_parameters_after_the_same_steps(digits_config, name, tmp_path):
    check_both_backends_hold_the_same_parameters_after_the_same_steps(digits_config, name, tmp_path)


def check_both_backends_hold_the_same_parameters_after_the_same_steps(digits_config, name: str,
                                                                       tmp_path: Path) -> None:
    assert lockstep(name), f"{name} has a parameter server: its pushes apply in arrival order"
    from syncbench.strategies.registry import strategies_reading

    base = (SGD, f"strategy.name={name}", "cluster.workers=2", "target.value=1.01", "budget.train_time_s=60",
            *(["strategy.local_steps=4"] if name in strategies_reading("local_steps") else []))  # only who reads it
    steps = 14  # not a multiple of local_steps: local SGD's replicas have drifted apart since the last average
    engine, _, _ = run_sim_steps(digits_config(*base), steps)
    finals = _dist_finals(digits_config(*base, "cluster.backend=dist"), tmp_path, steps)
    for rank, dist in enumerate(finals):
        sim = flat_params(engine.workers[rank].module)
        torch.testing.assert_close(dist[: sim.numel()], sim, atol=1e-5, rtol=0)
    assert torch.equal(finals[0], finals[1]) == traits(name).keeps_replicas_identical


@pytest.mark.parametrize("scaling", ["none", "linear", "sqrt"])
def test_lr_scaling_scales_by_the_effective_batch_on_sim(digits_config, scaling):
    """Every worker's (and the server's) lr x the strategy's effective batch / one worker's
    (``Strategy.lr_batch_factor``: sync at N = 4 updates with 4 workers' batches, x 4 linear or
    x 2 sqrt; local SGD and async with one worker's, unchanged), or its square root."""
    for name in NAMES:
        check_lr_scaling_on_sim(digits_config, name, scaling)
    sync, asynchronous = (STRATEGIES[n](STRATEGIES[n].options_model(), 4, 1) for n in ("sync", "async"))
    assert (sync.lr_batch_factor(), asynchronous.lr_batch_factor()) == (4.0, 1.0)  # by hand: 4 batches, one


def check_lr_scaling_on_sim(digits_config, name: str, scaling: str) -> None:
    base_lr = 0.01  # digits_mlp.yaml's module_args.lr
    config = digits_config(f"strategy.name={name}", "cluster.workers=4", f"strategy.lr_scaling={scaling}")
    engine = build_simulation(config, prepare_task(config), step_s=1e-3)
    factor = STRATEGIES[name](config.strategy.options(), 4, config.batch_size).lr_batch_factor()
    expected = base_lr * {"none": 1.0, "linear": factor, "sqrt": factor ** 0.5}[scaling]
    lrs = [w.optimizer.param_groups[0]["lr"] for w in engine.workers]
    if engine.server is not None:
        lrs.append(engine.server.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([expected] * len(lrs)), (name, lrs)


@pytest.mark.parametrize("scaling,expected", [("linear", 0.01 * 6), ("sqrt", 0.01 * 6 ** 0.5)])
def test_lr_scaling_with_backup_workers_counts_the_kept_gradients(digits_config, scaling, expected):
    """sync at N = 8 with 2 backup workers: each update averages 6 workers' batches, so the
    effective batch is 6 b (hand-computed: lr 0.01 x 6, or x sqrt 6), not 8 b."""
    config = digits_config("strategy.name=sync", "cluster.workers=8", "strategy.backup_workers=2",
                           f"strategy.lr_scaling={scaling}")
    engine = build_simulation(config, prepare_task(config), step_s=1e-3)
    assert [w.optimizer.param_groups[0]["lr"] for w in engine.workers] == pytest.approx([expected] * 8)


@pytest.mark.heavy
def test_lr_scaling_on_dist(digits_config, tmp_path):
    config = digits_config("strategy.name=sync", "cluster.workers=2", "cluster.backend=dist",
                           "strategy.lr_scaling=linear", "target.value=1.01", "budget.train_time_s=60")
    execute_dist_run(config, workspace=tmp_path / "ws", debug_dir=tmp_path / "debug", max_steps=2, emulate="none")
    for rank in (0, 1):
        assert torch.load(tmp_path / "debug" / f"rank{rank}.pt", weights_only=False)["lr"] == pytest.approx(0.02)
