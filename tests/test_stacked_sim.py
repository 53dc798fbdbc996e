"""The sim's stacked path (``syncbench.experiments.sim.stacked``, docs/performance.md): replicas
that differ (local SGD, DiLoCo, async, ...) keep their own parameters and optimizers, and the
gradients of the workers computing together come from one ``vmap`` call. It must be the same
optimisation as per-worker compute (``cluster.sim.batching: off``) under stragglers, frozen,
unused and tied parameters and a ``training_step`` that reads its counters, and fall back where a
hook would see the step out of order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syncbench.experiments.sim.driver import build_simulation
from syncbench.experiments.task import prepare_task
from syncbench.strategies.tensors import flat_state
from tests.conformance_modules import Base
from tests.test_batched_sim import Dropped, config  # noqa: F401 - Dropped: named by a config below

HERE = "tests.test_stacked_sim"
STRAGGLERS = "cluster.stragglers={kind: lognormal, sigma: 0.5}"


class WithSpareAndFrozen(Base):
    """An unused trainable layer (autograd leaves its gradient None: Adam must not move it) and a
    frozen one that the forward uses."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.spare = nn.Linear(64, 10)
        self.frozen = nn.Linear(64, 10)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.net(x) + 0.1 * self.frozen(x)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Tied(Base):
    """Two layers share one weight (tied weights, as language models tie embeddings)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.a = nn.Linear(64, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.c.weight = self.b.weight  # one parameter under two names
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


class ReadsCounters(Base):
    """A training_step that reads its trainer's step counter and its batch_idx: workers at other
    counters must not share one vmapped call."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        scale = 1.0 + 0.5 * (self.trainer.global_step % 3) + 0.25 * (batch_idx % 2)
        return scale * F.cross_entropy(self(x), y)


class EarlyHook(Base):
    """Overrides a hook Lightning runs before training_step."""

    def on_train_batch_start(self, batch, batch_idx):
        self.seen = batch_idx


class KeepsOutputs(Base):
    """Lightning's own pattern for epoch-end work: training_step appends to a list."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.outputs = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.outputs.append(loss.detach())
        return loss


class RunningTotal(Base):
    """A running total rebound out of place, and a Python counter, in training_step."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.total = torch.zeros(())
        self.calls = 0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.total = self.total + loss.detach()
        self.calls += 1
        return loss


def run(overrides, updates: int = 20, record: list | None = None):
    cfg = config(*overrides)
    engine = build_simulation(cfg, prepare_task(cfg), step_s=1e-3)
    if record is not None and engine.mode.stacked is not None:
        compute = engine.mode.stacked.compute

        def counted(modules, *args):
            record.append(len(modules))
            return compute(modules, *args)

        engine.mode.stacked.compute = counted
    while engine.counters()[0] < updates:
        engine.advance()
    return engine


def agree(overrides, updates: int = 20):
    stacked = run(overrides, updates)
    off = run([*overrides, "cluster.sim.batching=off"], updates)
    assert stacked.batching == "stacked"
    torch.testing.assert_close(flat_state(stacked.global_model()), flat_state(off.global_model()), atol=1e-6, rtol=0)
    return stacked


def test_local_sgd_with_stragglers_agrees_and_stacks_what_is_in_flight():
    """N=6, H=3, lognormal stragglers, Adam with gradient clipping: the same parameters as per
    worker. Without stragglers every local step's six gradients come from one call; with them,
    a call takes the workers whose computations started before the first one ends (a worker's
    next step depends on its last: it cannot start earlier), so every round's first local step
    is one call of six and the later ones are smaller."""
    overrides = ["cluster.workers=6", "strategy.name=local_sgd", "strategy.local_steps=3",
                 "task.module_args={lr: 0.01, optimizer: adam}", "trainer.gradient_clip_val=0.5"]
    agree([*overrides, STRAGGLERS])
    lockstep: list[int] = []
    run(overrides, 10, lockstep)  # 10 global updates: local steps
    assert set(lockstep) == {6}
    straggling: list[int] = []
    run([*overrides, STRAGGLERS], 10, straggling)
    assert sum(straggling) == 6 * 10 and straggling.count(6) >= 4  # 10 local steps: 4 rounds begun


def test_async_with_stragglers_groups_only_workers_at_the_same_counters():
    """Async workers drift apart: a training_step that reads global_step and batch_idx gives
    the per-worker result only if workers at other counters are never stacked together."""
    overrides = ["strategy.name=async", STRAGGLERS, f"task.module={HERE}:ReadsCounters", "task.module_args={lr: 0.05}"]
    agree(overrides, 30)
    sizes: list[int] = []
    run(overrides, 30, sizes)
    assert max(sizes) > 1  # some grouping happened


@pytest.mark.parametrize("module", ["WithSpareAndFrozen", "Tied"])
def test_unused_frozen_and_tied_parameters(module):
    """DiLoCo (outer Nesterov): an unused layer keeps a None gradient (vmap's zeros would move
    it under Adam), a frozen layer is passed, not trained, and a tied weight gets the sum of its
    uses' gradients -- all as per-worker compute."""
    overrides = [f"task.module={HERE}:{module}", "task.module_args={lr: 0.01}", "strategy.name=local_sgd",
                 "strategy.local_steps=2", "strategy.outer={lr: 0.7, momentum: 0.9, nesterov: true}"]
    engine = agree(overrides)
    if module == "WithSpareAndFrozen":
        fresh = prepare_task(config(*overrides)).module
        model = engine.global_model()
        torch.testing.assert_close(model.spare.weight, fresh.spare.weight, atol=0, rtol=0)
        torch.testing.assert_close(model.frozen.weight, fresh.frozen.weight, atol=0, rtol=0)


def test_dropout_stacked_runs_are_bit_reproducible():
    """vmap draws each worker's masks (randomness "different") from the seeded generator in a
    fixed order: a stacked run with dropout repeats bit for bit."""
    overrides = [f"task.module={HERE}:Dropped", "task.module_args={lr: 0.1}", "strategy.name=local_sgd", "strategy.local_steps=2", STRAGGLERS]
    first, second = run(overrides, 10), run(overrides, 10)
    assert first.batching == "stacked"
    assert torch.equal(flat_state(first.global_model()), flat_state(second.global_model()))


def test_a_module_overriding_an_early_hook_runs_per_worker():
    engine = run([f"task.module={HERE}:EarlyHook", "task.module_args={lr: 0.1}", "strategy.name=local_sgd", "strategy.local_steps=2"], 2)
    assert engine.batching.startswith("per-worker:") and "on_train_batch_start" in engine.batching


@pytest.mark.parametrize("module, attribute", [("KeepsOutputs", "outputs"), ("RunningTotal", "calls")])
def test_a_training_step_with_side_effects_runs_per_worker_and_keeps_them(module, attribute):
    """Stacked, such a training_step would run once per group on batched values: the module runs
    per worker (naming the attribute), and each replica keeps what its own steps did."""
    engine = run([f"task.module={HERE}:{module}", "task.module_args={lr: 0.1}", "strategy.name=local_sgd",
                  "strategy.local_steps=2", STRAGGLERS], 6)
    assert engine.batching.startswith("per-worker:") and repr(attribute) in engine.batching
    for w in engine.workers:
        count = len(w.module.outputs) if module == "KeepsOutputs" else w.module.calls
        assert count == w.steps and w.steps > 0


@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "Adadelta"])
def test_foreach_is_chosen_only_where_it_is_bitwise_the_single_tensor_step(cls):
    """The sim asks for ``foreach`` (``optimizer_speed.prefer_foreach_``) only where 20 steps equal
    torch's single-tensor loop bit for bit, with momentum/weight decay on and odd tensor shapes."""
    from syncbench.experiments.sim.optimizer_speed import prefer_foreach_

    kwargs = {"SGD": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, "Adam": {"weight_decay": 1e-3},
              "RMSprop": {"momentum": 0.5, "centered": True}}.get(cls, {})
    torch.manual_seed(0)
    shapes = [(7, 3), (5,), (2, 3, 4), ()]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(20)]

    def steps(foreach_choice):
        params = [nn.Parameter(t.clone()) for t in start]
        optimizer = getattr(torch.optim, cls)(params, lr=0.01, foreach=foreach_choice, **kwargs)
        if foreach_choice is None:
            assert prefer_foreach_(optimizer)
            assert optimizer.param_groups[0]["foreach"] is True
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        return [p.detach() for p in params]

    for chosen, reference in zip(steps(None), steps(False)):
        assert torch.equal(chosen, reference)


def test_foreach_is_left_alone_where_the_user_chose_or_bits_differ():
    from syncbench.experiments.sim.optimizer_speed import prefer_foreach_

    p = [nn.Parameter(torch.zeros(3))]
    fused = torch.optim.Adam(p, fused=True)
    single = torch.optim.SGD(p, lr=0.1, foreach=False)
    nadam = torch.optim.NAdam(p)
    assert not prefer_foreach_(fused) and not prefer_foreach_(single) and not prefer_foreach_(nadam)
    assert single.param_groups[0]["foreach"] is False and nadam.param_groups[0]["foreach"] is None
