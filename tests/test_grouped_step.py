"""The sim's grouped optimizer step (``syncbench.experiments.sim.grouped_step``, docs/performance.md):
the N workers' optimizer steps taken as one step over stacked replicas must be, bit for bit,
the steps N separate torch optimizers take (the reference here: plain torch optimizers), and
must step each worker alone wherever that cannot hold."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from syncbench.experiments.sim.grouped_step import StackedReplicas
from syncbench.strategies.tensors import flat_state
from tests.test_stacked_sim import STRAGGLERS, agree, run

KWARGS = {"SGD": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
          "Adam": {"lr": 1e-2, "weight_decay": 1e-3}, "AdamW": {"lr": 1e-2, "amsgrad": True},
          "RMSprop": {"lr": 1e-2, "momentum": 0.5, "centered": True}, "Adagrad": {"lr": 0.1},
          "Adamax": {"lr": 1e-2}, "Adadelta": {"lr": 1.0}}


class Odd(nn.Module):
    """Odd shapes (a row's elements straddle vector widths) and an unused parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.b = nn.Conv1d(3, 5, 3)
        self.spare = nn.Parameter(torch.randn(5))


def replicas(cls: str, n: int, seed: int = 0):
    torch.manual_seed(seed)
    modules = [Odd() for _ in range(n)]  # replicas that differ
    kw = KWARGS[cls]

    def optimizer(m):
        groups = [{"params": [m.a.weight, m.b.weight, m.spare]},
                  {"params": [m.a.bias, m.b.bias], "lr": kw["lr"] / 3, "weight_decay": 0.0}]
        return getattr(torch.optim, cls)(groups, foreach=True, **kw)

    return modules, optimizer


def give_gradients(modules, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for m in modules:
        for name, p in m.named_parameters():
            p.grad = None if name == "spare" else torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("cls", list(KWARGS))
def test_grouped_steps_are_bitwise_the_workers_own(cls):
    """20 steps of 5 replicas that differ, two param groups, a parameter without a gradient:
    the grouped step equals 5 plain torch optimizers bit for bit, and every step was grouped."""
    modules, optimizer = replicas(cls, 5)
    reference, _ = replicas(cls, 5)
    ref_opts = [optimizer(m) for m in reference]
    stacked = StackedReplicas(modules, [optimizer(m) for m in modules])
    assert stacked.refusal is None
    for step in range(20):
        give_gradients(modules, step)
        give_gradients(reference, step)
        assert stacked.step()
        for opt in ref_opts:
            opt.step()
    assert stacked.steps_grouped == 20
    for m, r in zip(modules, reference):
        assert torch.equal(flat_state(m), flat_state(r))
        assert torch.equal(m.spare, r.spare)  # no gradient: never moved
    # the workers' own optimizers hold the state a per-worker step continues from
    alone = stacked.optimizers[2]
    give_gradients(modules, 99)
    give_gradients(reference, 99)
    alone.step()
    ref_opts[2].step()
    assert torch.equal(flat_state(modules[2]), flat_state(reference[2]))


def test_what_cannot_be_grouped_is_stepped_by_each_worker():
    """Hyperparameters out of step, a parameter replaced, a step hook, another optimizer class:
    ``step`` declines (the caller steps each worker), and grouping resumes where it can."""
    modules, optimizer = replicas("Adam", 3)
    opts = [optimizer(m) for m in modules]
    stacked = StackedReplicas(modules, opts)
    give_gradients(modules, 0)
    assert stacked.step()
    opts[1].param_groups[0]["lr"] = 0.5
    give_gradients(modules, 1)
    assert not stacked.step()
    opts[1].param_groups[0]["lr"] = opts[0].param_groups[0]["lr"]
    assert stacked.step()
    handle = opts[0].register_step_pre_hook(lambda *a: None)
    assert not stacked.step()
    handle.remove()
    modules[2].a.weight.data = modules[2].a.weight.data.clone()  # no longer a view of its row
    assert not stacked.step() and stacked.stacked_params() is None
    nadam = StackedReplicas(*(lambda ms: (ms, [torch.optim.NAdam(m.parameters()) for m in ms]))(replicas("Adam", 2)[0]))
    assert nadam.refusal is not None and "NAdam" in nadam.refusal


@pytest.mark.parametrize("strategy", [
    ["strategy.name=local_sgd", "strategy.local_steps=3", "strategy.warmup_sync_updates=2"],
    ["strategy.name=local_sgd", "strategy.local_steps=2", "strategy.outer={lr: 0.7, momentum: 0.9, nesterov: true}"],
    ["strategy.name=sync", "strategy.compression=topk", "strategy.topk_ratio=0.25"],
])
def test_lockstep_runs_group_every_step_and_agree_with_per_worker(strategy):
    """Without stragglers all N workers step at the same instant: every optimizer step is
    grouped (Adam, clipping; a warm-up, DiLoCo's outer step, a compressed exchange), and the run
    is the per-worker run."""
    overrides = ["cluster.workers=5", *strategy, "task.module_args={lr: 0.01, optimizer: adam}",
                 "trainer.gradient_clip_val=0.5"]
    engine = agree(overrides, 12)
    assert engine.replicas is not None and engine.replicas.steps_grouped >= 12 and engine.replicas.steps_alone == 0


def test_stragglers_step_each_worker_alone_and_agree():
    overrides = ["cluster.workers=4", "strategy.name=local_sgd", "strategy.local_steps=3",
                 "task.module_args={lr: 0.01, optimizer: adam}", STRAGGLERS]
    engine = agree(overrides, 12)
    assert engine.replicas is not None and engine.replicas.steps_grouped == 0
    assert engine.workers[0].optimizer.steps > 0


def test_a_grouped_run_is_bit_reproducible():
    overrides = ["cluster.workers=4", "strategy.name=local_sgd", "strategy.local_steps=2",
                 "task.module_args={lr: 0.01, optimizer: adam}"]
    first, second = run(overrides, 8), run(overrides, 8)
    assert first.replicas.steps_grouped > 0
    assert torch.equal(flat_state(first.global_model()), flat_state(second.global_model()))


def test_schedulers_and_hooks_run_per_worker_in_their_order_around_a_grouped_step():
    """SGD with a per-epoch StepLR and a per-step ExponentialLR, and an on_before_optimizer_step
    hook recording each step's lr: grouped, every worker sees the lrs the per-worker run's
    workers see, step by step, across epochs, and the run is the per-worker run."""
    overrides = ["cluster.workers=4", "strategy.name=local_sgd", "strategy.local_steps=2",
                 "task.module=tests.conformance_modules:EpochStepLR", "task.module_args={lr: 0.1}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grouped = agree(overrides, 30)
    # the workers' own optimizers were not stepped: their schedulers must not think so
    assert not [w for w in caught if "before `optimizer.step()`" in str(w.message)]
    off = run([*overrides, "cluster.sim.batching=off"], 30)
    assert grouped.replicas.steps_grouped >= 30 and grouped.replicas.steps_alone == 0
    assert grouped.workers[0].optimizer.epoch >= 2  # the per-epoch schedule has fired
    for a, b in zip(grouped.workers, off.workers):
        assert a.module.lrs == b.module.lrs and len(set(a.module.lrs)) > 2
