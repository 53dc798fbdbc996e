"""The user's module as Lightning runs it (docs/lightning-modules.md): each small module of
``tests/conformance_modules.py`` trained by the sim (N=1) and by the dist backend is compared
with the same module under a plain Lightning ``Trainer`` on one worker, same batches, same
steps: the learning rate of every step, the final parameters and buffers, the validation
metrics (the Trainer's own ``validate``) and the hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from syncbench.experiments.config import ConfigError, load_config
from syncbench.experiments.procs.launcher import execute_dist_run
from syncbench.experiments.run import execute_run
from syncbench.experiments.sim.driver import build_simulation
from syncbench.experiments.task import prepare_task, seed_everything
from syncbench.experiments.sharding import ShardedBatches
from syncbench.strategies.lightning_bridge import evaluate
from syncbench.strategies.lightning_flavour import flavour_of
from syncbench.strategies.tensors import flat_state
from tests.conftest import CONFIGS

M = "tests.conformance_modules"
EPOCH = 8  # SmallDigits: 256 samples, batch 32, one worker


def config_for(module: str, *overrides: str):
    return load_config(CONFIGS / "digits_mlp.yaml", [
        f"task.module={M}:{module}", f"task.data={M}:SmallDigits", "task.module_args={lr: 0.1}",
        "cluster.workers=1", "target.value=1.01", "budget.train_time_s=60", "eval.every_s=1", *overrides])


class _Shard(Dataset):
    """One epoch = the worker's shard, batches in the harness's order (``ShardedBatches``)."""

    def __init__(self, batches: ShardedBatches):
        self.batches = batches

    def __len__(self):
        return self.batches.steps_per_epoch

    def __getitem__(self, index):
        return next(self.batches)


def trainer_reference(config, steps: int, **trainer_kwargs):
    """The module under Lightning's own Trainer (of the module's package), one worker, validating
    every epoch."""
    task = prepare_task(config)
    module_cls = type(task.module)
    seed_everything(config.seed)
    module = module_cls(**config.task.module_args)  # the same initial weights as the harness's
    torch.testing.assert_close(flat_state(module), flat_state(task.module), atol=0, rtol=0)
    batches = ShardedBatches(task.train_set, 0, 1, config.batch_size, config.seed, task.collate)
    val = DataLoader(task.val_batches, batch_size=None)
    trainer = flavour_of(module).Trainer(  # a lightning.pytorch module needs lightning.pytorch's Trainer
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=DataLoader(_Shard(batches), batch_size=None), val_dataloaders=val)
    if trainer_kwargs.get("limit_val_batches") == 0:
        return module, {}
    (metrics,) = trainer.validate(module, dataloaders=val, verbose=False)
    return module, {k: float(v) for k, v in metrics.items()}


def sim_run(config, steps: int, evaluate_each_epoch: bool = True):
    """The sim backend, N workers, each ``steps`` program steps; the global model evaluated at
    each epoch end (as the Trainer validates), then once more at the end."""
    task = prepare_task(config)
    engine = build_simulation(config, task, step_s=1e-3)
    epoch = engine.workers[0].batches.steps_per_epoch
    done = 0
    while min(w.completed for w in engine.workers) < steps:
        engine.advance()
        now = min(w.completed for w in engine.workers)
        if evaluate_each_epoch and now > done and now % epoch == 0 and engine.next_time() > engine.clock:
            engine.observe_evaluation(evaluate(engine.global_model(), task.val_batches))
            done = now
    engine.finish()
    return engine, evaluate(engine.global_model(), task.val_batches)


SCHEDULED = ["WarmupLambda", "StepIntervalLambda", "EpochStepLR", "Plateau"]


@pytest.mark.parametrize("module", SCHEDULED)
def test_lr_schedules_on_sim_follow_the_trainer(module):
    steps = 3 * EPOCH + 3
    config = config_for(module)
    ref, ref_metrics = trainer_reference(config, steps)
    engine, metrics = sim_run(config, steps)
    replica = engine.workers[0].module
    assert len(ref.lrs) == steps
    assert replica.lrs == pytest.approx(ref.lrs, rel=1e-12, abs=0)
    assert len(set(ref.lrs)) > 1  # the schedule did change the lr
    torch.testing.assert_close(flat_state(engine.global_model()), flat_state(ref), atol=1e-6, rtol=0)
    for name in ("val_acc", "val_loss"):
        assert metrics[name] == pytest.approx(ref_metrics[name], abs=1e-6)


def test_the_issues_warmup_lambda_learns():
    """The issue's report: a LambdaLR starting at lr 0 was never stepped, and the run never learnt."""
    engine, _ = sim_run(config_for("WarmupLambda"), 2 * EPOCH)
    assert engine.workers[0].module.lrs[:EPOCH] == [0.0] * EPOCH
    assert engine.workers[0].module.lrs[EPOCH:] == [0.1] * EPOCH


def test_torchmetrics_objects_are_computed_over_the_whole_validation_set():
    steps = EPOCH + 2
    config = config_for("Metrics")
    _, ref_metrics = trainer_reference(config, steps)
    _, metrics = sim_run(config, steps)
    for name in ("val_accuracy", "val_f1", "val_max_loss", "val_acc", "val_loss"):
        assert metrics[name] == pytest.approx(ref_metrics[name], abs=1e-6), name
    assert metrics["val_accuracy"] != pytest.approx(metrics["val_acc"], abs=1e-4)  # macro vs micro: not a mean


def test_torchmetrics_run_end_to_end(tmp_path):
    result = execute_run(config_for("Metrics", "target.metric=val_accuracy", "target.value=0.5",
                                    "eval.every_s=0.005", "budget.train_time_s=0.2"), workspace=tmp_path / "ws")
    assert result.outcome == "reached" and result.best_val >= 0.5


@pytest.mark.heavy
@pytest.mark.parametrize("strategy", ["async", "local_sgd"])
def test_torchmetrics_objects_on_dist_do_not_wait_for_other_ranks(strategy, tmp_path):
    """Rank 0 evaluates alone while the others train: a Metric object left to sync over the
    process group on compute() made every such run fail with a 30-s gloo timeout. Each rank's
    metrics are computed locally, so the run reaches its target."""
    config = config_for("Metrics", f"strategy.name={strategy}", "cluster.backend=dist", "cluster.workers=2",
                        "target.metric=val_accuracy", "target.value=0.5", "eval.every_s=0.05",
                        "budget.train_time_s=2", "cluster.collective_timeout_s=10")
    result = execute_dist_run(config, workspace=tmp_path / "ws", emulate="none")
    assert result.outcome == "reached" and result.best_val >= 0.5


def test_gradient_clipping_follows_the_trainer():
    steps = EPOCH + 3
    for algorithm, value in (("norm", 0.05), ("value", 0.002)):
        config = config_for("Base", f"trainer.gradient_clip_val={value}",
                            f"trainer.gradient_clip_algorithm={algorithm}")
        ref, _ = trainer_reference(config, steps, gradient_clip_val=value, gradient_clip_algorithm=algorithm)
        engine, _ = sim_run(config, steps)
        torch.testing.assert_close(flat_state(engine.global_model()), flat_state(ref), atol=1e-6, rtol=0)
        unclipped, _ = sim_run(config_for("Base"), steps)
        assert not torch.allclose(flat_state(unclipped.global_model()), flat_state(ref), atol=1e-4)


def test_batchnorm_buffers_follow_the_trainer_on_one_worker():
    steps = EPOCH + 3
    config = config_for("BatchNorm")
    ref, ref_metrics = trainer_reference(config, steps)
    engine, metrics = sim_run(config, steps)
    torch.testing.assert_close(flat_state(engine.global_model()), flat_state(ref), atol=1e-6, rtol=0)
    assert metrics["val_loss"] == pytest.approx(ref_metrics["val_loss"], abs=1e-6)


@pytest.mark.parametrize("strategy", ["sync", "local_sgd"])
def test_batchnorm_buffers_are_averaged(strategy):
    """sync: the float buffers are averaged in every gradient round; local SGD: with the
    parameters at every average. Reference: each worker's first forward written out here."""
    options = ["strategy.local_steps=1"] if strategy == "local_sgd" else []  # sync reads no local_steps
    config = config_for("BatchNorm", "cluster.workers=2", f"strategy.name={strategy}", *options)
    task = prepare_task(config)
    initial = copy.deepcopy(task.module)
    engine, _ = sim_run(config, 1, evaluate_each_epoch=False)
    expected = []
    for rank in range(2):
        replica = copy.deepcopy(initial).train()
        x, _ = next(ShardedBatches(task.train_set, rank, 2, config.batch_size, config.seed, task.collate))
        replica.net[1](replica.net[0](x))
        expected.append(torch.cat([replica.net[1].running_mean, replica.net[1].running_var]))
    bn = [w.module.net[1] for w in engine.workers]
    for layer in bn:
        torch.testing.assert_close(torch.cat([layer.running_mean, layer.running_var]),
                                   (expected[0] + expected[1]) / 2, atol=1e-6, rtol=0)


def test_hooks_run_at_the_trainers_points():
    steps = EPOCH + 2
    config = config_for("Hooks")
    ref, _ = trainer_reference(config, steps, limit_val_batches=0)
    engine, _ = sim_run(config, steps, evaluate_each_epoch=False)
    sim_calls = engine.workers[0].module.calls
    assert sim_calls == ref.calls
    names = [c[0] for c in sim_calls]
    assert names[:3] == ["on_fit_start", "on_train_start", "on_train_epoch_start"]
    assert names.count("on_train_epoch_end") == 2 and names[-1] == "on_train_end"  # the last one cut short
    eval_calls = engine.eval_module.calls  # the evaluation copy's validation hooks
    assert [c[0] for c in eval_calls[-2:]] == ["on_validation_epoch_start", "on_validation_epoch_end"]


@pytest.mark.parametrize("module,needle", [("Manual", "automatic_optimization = False"),
                                           ("TwoOptimizers", "2 optimizers"),
                                           ("PlateauUnlogged", "val_nothing")])
def test_refused_before_any_run(module, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle):
        execute_run(config_for(module), workspace=tmp_path / "ws")
    assert not (tmp_path / "ws" / "artifacts").exists() or not any((tmp_path / "ws" / "artifacts").iterdir())


@pytest.mark.heavy  # a CLI subprocess or real signals: seconds each; `make test` and CI run it
def test_refusal_exits_2(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    out = subprocess.run([sys.executable, "-m", "syncbench", "run", str(CONFIGS / "digits_mlp.yaml"),
                          "--set", f"task.module={M}:Manual", "--set", "task.module_args={lr: 0.1}", "--workspace", str(tmp_path / "ws")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "automatic_optimization" in out.stderr + out.stdout


def test_async_server_steps_its_schedule_once_per_update():
    config = config_for("StepIntervalLambda", "cluster.workers=2", "strategy.name=async")
    engine, _ = sim_run(config, EPOCH, evaluate_each_epoch=False)
    server = engine.server
    assert server.optimizer.steps == server.version > 0
    assert all(w.optimizer.steps == 0 for w in engine.workers)  # the workers' optimizers never step
    # the server's epoch is one pass over the data (2 shards x 4 batches); frequency 3 counts the
    # batch index within that epoch, as Lightning counts it
    ref, k = [], 0
    for t in range(server.version):
        ref.append(0.0 if k == 0 else 0.1 * 0.9 ** k)
        k += ((t % 8) + 1) % 3 == 0
    assert server.module.lrs == pytest.approx(ref, rel=1e-12)


# ------------------------------------------------------------------------------------------
# dist: real processes, each worker capped at K steps
# ------------------------------------------------------------------------------------------
def dist_finals(config, tmp_path, steps: int):
    debug = tmp_path / "debug"
    execute_dist_run(config, workspace=tmp_path / "ws", debug_dir=debug, max_steps=steps, emulate="none")
    return [torch.load(debug / f"rank{r}.pt", weights_only=False)["final"] for r in range(config.cluster.workers)]


@pytest.mark.heavy
@pytest.mark.parametrize("module,extra", [("EpochStepLR", ()), ("StepIntervalLambda", ()), ("BatchNorm", ()),
                                          ("Base", ("trainer.gradient_clip_val=0.05",))])
def test_dist_one_worker_follows_the_trainer(module, extra, tmp_path):
    steps = 2 * EPOCH + 3
    config = config_for(module, "cluster.backend=dist", *extra)
    kwargs = {"gradient_clip_val": 0.05} if extra else {}
    ref, _ = trainer_reference(config, steps, **kwargs)
    (final,) = dist_finals(config, tmp_path, steps)
    torch.testing.assert_close(final, flat_state(ref), atol=1e-5, rtol=0)


@pytest.mark.heavy
@pytest.mark.parametrize("strategy", ["sync", "local_sgd"])
def test_dist_and_sim_agree_with_schedules_and_batchnorm(strategy, tmp_path):
    """Two workers: schedules per replica and BatchNorm buffers are the same on both backends."""
    base = ("cluster.workers=2", f"strategy.name={strategy}", "trainer.gradient_clip_val=0.5",
            *(["strategy.local_steps=3"] if strategy == "local_sgd" else []))  # an option sync does not read
    steps = 2 * (EPOCH // 2) + 1
    engine, _ = sim_run(config_for("BatchNormEpochLR", *base), steps, evaluate_each_epoch=False)
    finals = dist_finals(config_for("BatchNormEpochLR", *base, "cluster.backend=dist"), tmp_path, steps)
    for rank, final in enumerate(finals):
        torch.testing.assert_close(final, flat_state(engine.workers[rank].module), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# one module written both ways: pytorch_lightning and `import lightning as L`
# ------------------------------------------------------------------------------------------
FLAVOURS = {"pytorch_lightning": "PL", "lightning.pytorch": "L"}  # conformance_modules.written_with


def flavour_config(flavour: str, *overrides: str):
    prefix = FLAVOURS[flavour]
    return config_for(f"{prefix}Flavoured", f"task.data={M}:{prefix}FlavouredDigits",
                      "trainer.gradient_clip_val=0.05", *overrides)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_one_module_written_both_ways_follows_its_trainer_on_sim(flavour):
    """Each flavour against its own package's Trainer: the lr of every step (two schedules),
    the parameters and BatchNorm buffers (with clipping), the validation metrics (a
    torchmetrics object among them) and the fit hooks with what they read of the Trainer."""
    steps = 2 * EPOCH + 3
    config = flavour_config(flavour)
    ref, ref_metrics = trainer_reference(config, steps, gradient_clip_val=0.05)
    assert flavour_of(ref).__name__ == flavour and type(ref._trainer).__module__.startswith(flavour + ".")
    engine, metrics = sim_run(config, steps)
    replica = engine.workers[0].module
    assert flavour_of(replica).__name__ == flavour
    assert len(ref.lrs) == steps and len(set(ref.lrs)) > 2
    assert replica.lrs == pytest.approx(ref.lrs, rel=1e-12, abs=0)
    assert replica.calls == ref.calls
    names = [c[0] for c in ref.calls]
    assert names[:3] == ["on_fit_start", "on_train_start", "on_train_epoch_start"] and names[-1] == "on_train_end"
    torch.testing.assert_close(flat_state(engine.global_model()), flat_state(ref), atol=1e-6, rtol=0)
    for name in ("val_acc", "val_loss", "val_accuracy"):
        assert metrics[name] == pytest.approx(ref_metrics[name], abs=1e-6), name


def test_both_flavours_train_the_same_on_sim():
    """Same source, same seed: the two packages' modules train bit-for-bit the same."""
    steps = EPOCH + 3
    (a, a_metrics), (b, b_metrics) = (sim_run(flavour_config(f), steps) for f in FLAVOURS)
    from syncbench.strategies.lightning_flavour import flavour_of

    assert flavour_of(a.global_model()) is not flavour_of(b.global_model())  # two class hierarchies
    torch.testing.assert_close(flat_state(a.global_model()), flat_state(b.global_model()), atol=0, rtol=0)
    assert a_metrics == b_metrics
    assert a.workers[0].module.calls == b.workers[0].module.calls


@pytest.mark.heavy
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_one_module_written_both_ways_follows_its_trainer_on_dist(flavour, tmp_path):
    """Real processes: each worker drives the module with its own package's Trainer and Strategy."""
    steps = 2 * EPOCH + 3
    config = flavour_config(flavour, "cluster.backend=dist")
    ref, _ = trainer_reference(config, steps, gradient_clip_val=0.05)
    (final,) = dist_finals(config, tmp_path, steps)
    torch.testing.assert_close(final, flat_state(ref), atol=1e-5, rtol=0)
