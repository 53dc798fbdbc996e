"""The invariants of docs/strategies.md, checked on real training of digits_mlp."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from syncbench.strategies.lightning_bridge import build_optimizer, capture_logs, training_loss
from syncbench.experiments.sim.driver import build_simulation
from syncbench.experiments.task import PreparedTask, prepare_task
from syncbench.experiments.sharding import ShardedBatches
from syncbench.strategies.tensors import flat_params

SGD = "task.module_args={lr: 0.1, optimizer: sgd, hidden: 32}"
MOMENTUM = "task.module_args={lr: 0.05, optimizer: sgd, momentum: 0.9, hidden: 32}"


def simulate(config, updates: int, task: PreparedTask | None = None, rounds: int = 0):
    """Run a strategy for a number of global updates (and local-SGD averaging rounds)."""
    task = task or prepare_task(config)
    engine = build_simulation(config, task, step_s=config.cluster.compute.step_s or 1e-3)
    while engine.counters()[0] < updates or min(getattr(p, "rounds", 0) for p in engine.programs) < rounds:
        engine.advance()
    return engine, task


def plain_sgd(config, task: PreparedTask, steps: int, shards: int) -> torch.Tensor:
    """One model, one optimizer, batch = the concatenation of `shards` workers' batches."""
    torch.manual_seed(config.seed)
    module = type(task.module)(**config.task.module_args)
    capture_logs(module)
    module.load_state_dict(task.module.state_dict())  # the strategies' common initial point
    optimizer = build_optimizer(module)
    readers = [ShardedBatches(task.train_set, w, shards, config.batch_size, config.seed) for w in range(shards)]
    for step in range(steps):
        parts = [next(r) for r in readers]
        batch = [torch.cat([p[i] for p in parts]) for i in range(2)]
        optimizer.zero_grad()
        training_loss(module, batch, step).backward()
        optimizer.step()
    return flat_params(module)


def fresh_task(config) -> tuple[PreparedTask, dict]:
    task = prepare_task(config)
    return task, copy.deepcopy(task.module.state_dict())


@pytest.mark.parametrize("module_args", [SGD, "task.module_args={lr: 0.01, optimizer: adam, hidden: 32}"])
def test_sync_at_n_workers_is_one_worker_at_n_times_the_batch(digits_config, module_args):
    config = digits_config(module_args, "strategy.name=sync", "cluster.workers=4", "batch_size=16")
    task, init = fresh_task(config)
    engine, _ = simulate(config, updates=12, task=task)
    trained = flat_params(engine.global_model())
    task.module.load_state_dict(init)
    expected = plain_sgd(config, task, steps=12, shards=4)
    torch.testing.assert_close(trained, expected, atol=1e-5, rtol=0)
    assert not torch.equal(trained, flat_params(task.module)), "the model did not move"


@pytest.mark.parametrize("module_args", [SGD, MOMENTUM])
def test_local_sgd_with_one_local_step_is_sync(digits_config, module_args):
    base = (module_args, "cluster.workers=4")
    sync, _ = simulate(digits_config(*base, "strategy.name=sync"), updates=10)
    local, _ = simulate(digits_config(*base, "strategy.name=local_sgd", "strategy.local_steps=1"), updates=10)
    torch.testing.assert_close(flat_params(local.global_model()), flat_params(sync.global_model()), atol=1e-6, rtol=0)


def test_diloco_with_unit_outer_lr_and_no_momentum_is_local_sgd(digits_config):
    base = ("task.module_args={lr: 0.01, optimizer: adam, hidden: 32}", "strategy.name=local_sgd",
            "cluster.workers=4", "strategy.local_steps=4")
    plain, _ = simulate(digits_config(*base), updates=16, rounds=4)
    diloco, _ = simulate(digits_config(*base, "strategy.outer={lr: 1.0, momentum: 0.0}"), updates=16, rounds=4)
    assert plain.programs[0].rounds == diloco.programs[0].rounds == 4
    torch.testing.assert_close(flat_params(diloco.global_model()), flat_params(plain.global_model()),
                               atol=1e-6, rtol=0)


# DiLoCo with momentum: tests/test_science.py compares each outer step with torch.optim.SGD(nesterov=True)


def test_async_with_one_worker_is_plain_sgd(digits_config):
    config = digits_config(SGD, "strategy.name=async", "cluster.workers=1")
    task, init = fresh_task(config)
    engine, _ = simulate(config, updates=20, task=task)
    trained = flat_params(engine.global_model())
    task.module.load_state_dict(init)
    torch.testing.assert_close(trained, plain_sgd(config, task, steps=20, shards=1), atol=1e-6, rtol=0)
    assert engine.summary_metrics()["staleness_max"] == 0


def test_async_mean_staleness_with_8_homogeneous_workers(digits_config):
    # a compute step much longer than a transfer: the server link is not the bottleneck
    config = digits_config("strategy.name=async", "cluster.workers=8", "cluster.compute.step_s=0.01")
    engine, _ = simulate(config, updates=200)
    mean = engine.summary_metrics()["staleness_mean"]
    assert 6 <= mean <= 8, mean


@pytest.mark.parametrize("bound", [0, 2])
def test_max_staleness_bounds_the_recorded_staleness(digits_config, bound):
    stragglers = "cluster.stragglers={kind: lognormal, sigma: 0.5}"
    config = digits_config("strategy.name=async", "cluster.workers=8", f"strategy.max_staleness={bound}", stragglers,
                           "cluster.compute.step_s=0.01")
    engine, _ = simulate(config, updates=80)
    summary = engine.summary_metrics()
    assert summary["staleness_max"] <= bound
    assert summary["refused_pushes"] > 0  # 8 workers: most gradients would be staler than the bound
    unbounded, _ = simulate(digits_config("strategy.name=async", "cluster.workers=8", stragglers,
                                          "cluster.compute.step_s=0.01"), updates=80)
    assert unbounded.summary_metrics()["staleness_max"] > bound
    assert unbounded.summary_metrics()["refused_pushes"] == 0


def test_local_sgd_h8_communicates_one_eighth_of_sync(digits_config):
    sync, _ = simulate(digits_config("strategy.name=sync", "cluster.workers=4"), updates=64)
    local, _ = simulate(digits_config("strategy.name=local_sgd", "strategy.local_steps=8", "cluster.workers=4"),
                        updates=64, rounds=8)
    assert sum(p.local_steps for p in local.programs) == 4 * 64
    assert local.ledger.comm_bytes * 8 == sync.ledger.comm_bytes > 0


def _wait_per_update(digits_config, workers: int, backup: int = 0) -> float:
    config = digits_config("strategy.name=sync", f"cluster.workers={workers}", f"strategy.backup_workers={backup}",
                           "cluster.stragglers={kind: lognormal, sigma: 0.5}", "batch_size=8",
                           "cluster.compute.step_s=0.01")
    engine, _ = simulate(config, updates=60)
    return float(engine.ledger.wait.mean() / engine.counters()[0])


@pytest.mark.heavy  # a CLI subprocess or real signals: seconds each; `make test` and CI run it
def test_sync_waiting_grows_with_workers_and_backup_workers_cut_it(digits_config):
    w1, w4, w16 = (_wait_per_update(digits_config, n) for n in (1, 4, 16))
    assert w1 == 0.0
    assert w1 < w4 < w16
    with_backups = _wait_per_update(digits_config, 16, backup=2)
    assert with_backups < 0.7 * w16


def test_straggler_models_are_seeded(digits_config):
    from syncbench.experiments.cluster_model import StragglerModel
    from syncbench.experiments.config import LognormalStragglers, PersistentStragglers

    a = StragglerModel(LognormalStragglers(kind="lognormal", sigma=0.3), 4, seed=3)
    b = StragglerModel(LognormalStragglers(kind="lognormal", sigma=0.3), 4, seed=3)
    assert [a.factor(w) for w in range(4)] == [b.factor(w) for w in range(4)]
    draws = [a.factor(0) for _ in range(4000)]
    assert abs(np.mean(draws) - 1.0) < 0.03  # mean-one factors: stragglers do not rescale step_s
    persistent = StragglerModel(PersistentStragglers(kind="persistent", slow_fraction=0.25, slowdown=4), 8, seed=0)
    assert sorted(persistent.factor(w) for w in range(8)) == [1.0] * 6 + [4.0] * 2


def test_shards_cover_every_sample_once_per_epoch(digits_config):
    config = digits_config()
    task = prepare_task(config)
    readers = [ShardedBatches(task.train_set, w, 4, 8, seed=0) for w in range(4)]
    seen = np.concatenate([r.next_indices() for r in readers for _ in range(readers[0].steps_per_epoch)])
    assert len(seen) == len(set(seen.tolist())) > 0.9 * len(task.train_set)
