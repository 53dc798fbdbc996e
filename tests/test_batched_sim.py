"""The sim backend's batched path (``cluster.sim.batching: auto``, docs/performance.md): one
replica for identical workers, their gradients in one forward/backward. It must be the same
optimisation as the per-worker path (``cluster.sim.batching: off``), fall back where it would
not be exact, batch only the gradients that count, and stay bit-for-bit reproducible."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syncbench.experiments.config import load_config
from syncbench.experiments.sharding import ShardedBatches
from syncbench.experiments.sim.driver import build_simulation
from syncbench.experiments.task import prepare_task
from syncbench.strategies import STRATEGIES
from syncbench.strategies.tensors import flat_state
from tests.conformance_modules import Base
from tests.conftest import CONFIGS

NAMES = sorted(STRATEGIES)
HERE = "tests.test_batched_sim"


class Dropped(Base):
    """The conformance MLP with a Dropout layer: random masks in every training forward."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))


class SummedLoss(Base):
    """A summed loss: the gradient of a concatenated batch is N times the workers' mean."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="sum")


class RecordsBatches(Base):
    """Records the size of every training batch it is given (how many samples a step's one
    forward/backward covers)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.sizes: list[int] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.sizes.append(int(batch[0].shape[0]))


def config(*overrides: str):
    return load_config(CONFIGS / "digits_mlp.yaml", ["cluster.workers=4", "budget.train_time_s=60",
                                                    "eval.every_s=1", *overrides])


def simulate(cfg, updates: int):
    """The engine after ``updates`` global updates (the strategy's own counter)."""
    task = prepare_task(cfg)
    engine = build_simulation(cfg, task, step_s=1e-3)
    while engine.counters()[0] < updates:
        engine.advance()
    return engine


def final_state(cfg, updates: int = 20) -> tuple[str, torch.Tensor]:
    engine = simulate(cfg, updates)
    return engine.batching, flat_state(engine.global_model()).clone()


@pytest.mark.parametrize("name", NAMES)
def test_batched_and_per_worker_paths_agree_for_every_strategy(name):
    """Every registered strategy, 20 updates of the digits MLP (Adam, no random layers): the
    global model of the batched path equals the per-worker path's within 1e-6; the strategies
    that keep replicas identical (``replicas_shareable``) take the batched path."""
    reads_h = "local_steps" in STRATEGIES[name].options_model.model_fields
    base = (f"strategy.name={name}", *(["strategy.local_steps=2"] if reads_h else []))
    mode, batched = final_state(config(*base))
    off_mode, per_worker = final_state(config(*base, "cluster.sim.batching=off"))
    assert off_mode == "per-worker: cluster.sim.batching=off"
    strategy = STRATEGIES[name](config(*base).strategy.options(), 4, 32)
    assert mode == ("batched" if strategy.replicas_shareable() else "stacked")
    torch.testing.assert_close(batched, per_worker, atol=1e-6, rtol=0)


def test_one_replica_with_stragglers_and_backup_workers_equals_n_replicas():
    """sync, N=6, 2 backup workers, lognormal stragglers, Adam with gradient clipping: the one
    shared replica follows the 6 per-worker replicas (which stay equal to each other)."""
    base = ("cluster.workers=6", "strategy.backup_workers=2", "cluster.stragglers={kind: lognormal, sigma: 0.5}",
            "trainer.gradient_clip_val=0.5")
    batched = simulate(config(*base), 20)
    per_worker = simulate(config(*base, "cluster.sim.batching=off"), 20)
    assert batched.batching == "batched"
    assert len({id(w.module) for w in batched.workers}) == 1  # one replica stands for all six
    assert len({id(w.module) for w in per_worker.workers}) == 6
    torch.testing.assert_close(flat_state(batched.global_model()), flat_state(per_worker.global_model()),
                               atol=1e-6, rtol=0)
    assert batched.counters() == per_worker.counters()
    np.testing.assert_allclose(batched.ledger.wait, per_worker.ledger.wait, rtol=0, atol=1e-12)
    assert batched.ledger.comm_bytes == per_worker.ledger.comm_bytes


def test_the_shared_optimizer_steps_its_schedule_once_per_update():
    """A per-step LambdaLR (interval step, frequency 3) and gradient clipping: the one replica's
    optimizer takes one step per update with the lr schedule each per-worker replica follows."""
    base = ("task.module=tests.conformance_modules:StepIntervalLambda", "task.module_args={lr: 0.1}",
            "trainer.gradient_clip_val=0.5")
    batched = simulate(config(*base), 12)
    per_worker = simulate(config(*base, "cluster.sim.batching=off"), 12)
    assert batched.batching == "batched"
    lrs = batched.workers[0].module.lrs
    assert len(lrs) == 12 and len(set(lrs)) > 2
    for w in per_worker.workers:  # the last update's resumptions may still be on the queue
        assert len(w.module.lrs) >= 11 and w.module.lrs == pytest.approx(lrs[:len(w.module.lrs)], rel=1e-12, abs=0)
    torch.testing.assert_close(flat_state(batched.global_model()), flat_state(per_worker.global_model()),
                               atol=1e-6, rtol=0)


def test_backup_workers_batch_only_the_kept_gradients():
    """sync, N=3, one backup worker, a persistent straggler: each update's one forward/backward
    covers the two kept workers' batches (64 samples), and the parameters are plain SGD on
    exactly those samples (the reference loop is written here)."""
    cfg = config(f"task.module={HERE}:RecordsBatches", "task.module_args={lr: 0.1}", "cluster.workers=3",
                 "strategy.backup_workers=1", "cluster.stragglers={kind: persistent, slow_fraction: 0.34, slowdown: 4}")
    task = prepare_task(cfg)
    model = copy.deepcopy(task.module)
    engine = build_simulation(cfg, task, step_s=1e-3)
    assert engine.batching == "batched"
    (slow,) = engine.stragglers.slow
    kept = [w for w in range(3) if w != slow]
    while engine.counters()[0] < 6:
        engine.advance()
    assert engine.workers[0].module.sizes == [2 * 32] * 6
    shards = [ShardedBatches(task.train_set, w, 3, 32, cfg.seed) for w in range(3)]
    x, y = task.train_set.tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(6):
        indices = [s.next_indices() for s in shards]
        index = torch.from_numpy(np.concatenate([indices[w] for w in kept]))
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    got = torch.cat([p.detach().reshape(-1) for p in engine.global_model().parameters()])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_a_module_that_cannot_be_batched_exactly_runs_per_worker(caplog):
    """BatchNorm in training mode fails both exactness checks (batch statistics over the
    concatenated batch; running statistics updated in the forward, which vmap cannot carry back):
    per-worker compute, said once in the log and in the batching tag, the same parameters as
    batching off."""
    base = ("task.module=tests.conformance_modules:BatchNorm", "task.module_args={lr: 0.05}")
    with caplog.at_level("WARNING", logger="syncbench.experiments.sim.batching"):
        engine = simulate(config(*base), 5)
    assert engine.batching.startswith("per-worker:") and "BatchNorm" in engine.batching
    assert "updates its buffers" in engine.batching
    assert sum("not batched" in r.getMessage() for r in caplog.records) == 1
    off = simulate(config(*base, "cluster.sim.batching=off"), 5)
    assert torch.equal(flat_state(engine.global_model()), flat_state(off.global_model()))


def test_a_summed_loss_is_not_concatenated_but_stacked():
    """A summed loss: concatenating the batches would multiply the gradient by N, so sync keeps
    N replicas; their gradients are still computed in one vmapped call (exact: the same
    parameters as per-worker compute within float32 summation order)."""
    base = (f"task.module={HERE}:SummedLoss", "task.module_args={lr: 0.005}")
    engine = simulate(config(*base), 5)
    assert engine.batching == "stacked"
    off = simulate(config(*base, "cluster.sim.batching=off"), 5)
    torch.testing.assert_close(flat_state(engine.global_model()), flat_state(off.global_model()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("batching", ["auto", "off"])
def test_dropout_runs_are_bit_reproducible_within_a_mode(batching):
    """Dropout: the masks come from the seeded generator in a fixed order within each mode, so a
    run repeats bit for bit; the batched path draws one mask per round, the per-worker path one
    per worker (docs/performance.md: equal in distribution across modes, not bit for bit)."""
    base = (f"task.module={HERE}:Dropped", "task.module_args={lr: 0.1}", f"cluster.sim.batching={batching}",
            "cluster.stragglers={kind: lognormal, sigma: 0.3}")
    first, second = final_state(config(*base), 10), final_state(config(*base), 10)
    assert first[0] == ("batched" if batching == "auto" else "per-worker: cluster.sim.batching=off")
    assert torch.equal(first[1], second[1])


def test_dropout_modes_agree_in_distribution():
    """Across modes the Dropout masks differ, the training does not: both modes reach the same
    training loss after 30 sync updates within the spread of per-worker runs over seeds."""
    def loss_after(batching: str, seed: int) -> float:
        cfg = config(f"task.module={HERE}:Dropped", "task.module_args={lr: 0.1}", f"cluster.sim.batching={batching}",
                     f"seed={seed}")
        engine = simulate(cfg, 30)
        engine.take_train_loss()
        model = engine.global_model().eval()
        x, y = prepare_task(cfg).train_set.tensors
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    per_worker = [loss_after("off", s) for s in range(3)]
    batched = [loss_after("auto", s) for s in range(3)]
    spread = max(per_worker) - min(per_worker)
    assert abs(np.mean(batched) - np.mean(per_worker)) <= max(2 * spread, 0.05)
