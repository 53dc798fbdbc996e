"""Where the two backends used to drift apart, each with a test (issue 10): the TTA rules,
DiLoCo through a post-local-SGD warm-up, mean-one straggler emulation, the parameter
server's one link on real processes, and evaluation pausing every rank's clock."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from syncbench.experiments.config import LognormalStragglers, RunConfig
from syncbench.experiments.procs.launcher import execute_dist_run
from syncbench.experiments.procs.emulation import Emulation
from syncbench.experiments.run import execute_run
from syncbench.experiments.tta import Evaluation, TTATracker


def test_a_target_met_only_after_the_budget_is_not_reached(digits_config):
    config = digits_config("budget.train_time_s=1.0")
    tracker = TTATracker(config)
    assert tracker.observe(Evaluation(0.5, 10, 640, {"val_acc": 0.5})) is None
    # the dist backend evaluates at step boundaries: its first evaluation past the budget
    assert tracker.observe(Evaluation(1.02, 21, 1344, {"val_acc": 0.99})) == "budget"
    assert tracker.result.tta_s is None and tracker.result.best_val == 0.99
    at_budget = TTATracker(config)
    assert at_budget.observe(Evaluation(1.0, 20, 1280, {"val_acc": 0.99})) == "reached"


@pytest.mark.parametrize("outer", [None, "{lr: 0.7, momentum: 0.9, nesterov: true}"])
def test_warmup_beyond_the_target_is_exactly_sync(digits_config, tmp_path, outer):
    """Post-local SGD whose synchronous warm-up outlasts the run is sync, clock and all; the
    outer model of DiLoCo follows the synchronised parameters through the warm-up."""
    sync = execute_run(digits_config("strategy.name=sync"), workspace=tmp_path / "s")
    extra = [f"strategy.outer={outer}"] if outer else []
    local = execute_run(digits_config("strategy.name=local_sgd", "strategy.warmup_sync_updates=100000", *extra),
                        workspace=tmp_path / "l")
    assert sync.outcome == local.outcome == "reached"
    assert local.tta_s == sync.tta_s
    assert local.updates_to_target == sync.updates_to_target
    assert [ev.metrics["val_acc"] for ev in local.evaluations] == [ev.metrics["val_acc"] for ev in sync.evaluations]


def test_diloco_outer_model_follows_the_warmup(digits_config):
    """Through the warm-up the outer model is the synchronised model, so the first outer step
    sees only the local steps after it (it used to apply the whole warm-up as one step)."""
    from syncbench.experiments.sim.driver import build_simulation
    from syncbench.experiments.task import prepare_task
    from syncbench.strategies.tensors import flat_params

    config = digits_config("strategy.name=local_sgd", "cluster.workers=2", "strategy.local_steps=3",
                           "strategy.warmup_sync_updates=5", "strategy.outer={lr: 0.7, momentum: 0.9, nesterov: true}")
    engine = build_simulation(config, prepare_task(config), step_s=1e-3)
    while min(w.completed for w in engine.workers) < 5:
        engine.advance()
    replica = flat_params(engine.workers[0].module)
    assert not torch.equal(replica, flat_params(engine.eval_module))  # training moved it
    for program in engine.programs:
        torch.testing.assert_close(program.global_state[: replica.numel()], replica, atol=0, rtol=0)
        assert float(program.momentum.abs().max()) == 0.0  # no outer step has happened yet


@pytest.mark.parametrize("nesterov", [False, True])
def test_outer_step_is_torch_sgd_on_the_pseudo_gradient(nesterov):
    from syncbench.strategies.local_sgd import OuterConfig, apply_outer_step

    gen = torch.Generator().manual_seed(0)
    outer = OuterConfig(lr=0.7, momentum=0.9, nesterov=nesterov)
    global_params = torch.randn(50, generator=gen, dtype=torch.float64)
    reference = torch.nn.Parameter(global_params.clone())
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=nesterov)
    momentum = torch.zeros_like(global_params)
    for _ in range(4):
        mean = global_params - 0.1 * torch.randn(50, generator=gen, dtype=torch.float64)
        reference.grad = (reference.detach() - mean).clone()
        sgd.step()
        apply_outer_step(global_params, mean, momentum, outer)
        torch.testing.assert_close(global_params, reference.detach(), atol=1e-12, rtol=0)


def test_straggler_emulation_has_mean_one_factors():
    """Padding every step to f x base (fast steps included) keeps the mean factor at 1: the
    emulated mean step is the base step, as in the sim; the base comes from the median of the
    unpadded warm-up steps and stays fixed."""
    from syncbench.experiments.config import load_config
    from tests.conftest import CONFIGS

    config: RunConfig = load_config(CONFIGS / "digits_mlp.yaml", ["cluster.stragglers={kind: lognormal, sigma: 0.5}",
                                                                 "cluster.compute.step_s=null"])
    emulation = Emulation(config, rank=0, world=2, stragglers=True, network=False)
    from syncbench.experiments.procs.emulation import WARM_STEPS

    warm = [0.0012, 0.0009, 0.0010, 0.0030, 0.0011, 0.0008, 0.0010, 0.0013, 0.0009]
    assert len(warm) == WARM_STEPS
    for seconds in warm:
        assert emulation.compute_pad_s() == 0.0  # the warm-up steps run unpadded
        emulation.record_compute(seconds)
    measured = 0.0010  # their median
    steps = []
    for _ in range(20000):
        steps.append(measured + emulation.compute_pad_s())
        emulation.record_compute(steps[-1] * 1.5)  # slower after a sleep, or a peer's wait inside it
    base = emulation.base_step_s()  # ... never moves the base: no feedback from padding to padding
    sigma = 0.5
    assert base == pytest.approx(measured / math.exp(-2.3263478740408408 * sigma - sigma**2 / 2))
    assert np.mean(steps) / base == pytest.approx(1.0, abs=0.02)
    assert emulation.overruns / len(steps) < 0.02  # the 1st percentile: ~1% of steps cannot be padded down
    assert LognormalStragglers(kind="lognormal", sigma=sigma)  # the config model the factors come from


@pytest.mark.parametrize("pinned,expected", [
    (0.0015, 0.0015),  # a profile's base the worker reaches: the sim and the emulation share it
    (0.0005, 0.0010 / math.exp(-2.3263478740408408 * 0.5 - 0.5**2 / 2)),  # unreachable: measured / 1st pct
])
def test_straggler_emulation_pads_around_a_reachable_pinned_step(pinned, expected):
    from syncbench.experiments.config import load_config
    from tests.conftest import CONFIGS

    config: RunConfig = load_config(CONFIGS / "digits_mlp.yaml", ["cluster.stragglers={kind: lognormal, sigma: 0.5}",
                                                                 f"cluster.compute.step_s={pinned}"])
    emulation = Emulation(config, rank=0, world=2, stragglers=True, network=False)
    for _ in range(9):
        emulation.record_compute(0.0010)
    assert emulation.base_step_s() == pytest.approx(expected)


def _dist(config, tmp_path: Path, **kwargs):
    return execute_dist_run(config, workspace=tmp_path / "ws", debug_dir=tmp_path / "debug", **kwargs)


@pytest.mark.heavy
def test_parameter_server_link_is_shared_first_come_first_served(digits_config, tmp_path):
    """At 0.02 Gbit/s a push or pull of the MLP's state takes ~7 ms on the one server link:
    two workers together get at most one update per push + pull, as in the sim, not two."""
    config = digits_config("strategy.name=async", "cluster.workers=2", "cluster.backend=dist",
                           "cluster.network={latency_s: 0.0, bandwidth_gbps: 0.02}", "budget.train_time_s=2",
                           "target.value=1.01", "eval.every_s=0.5")
    result = _dist(config, tmp_path, emulate="network")
    from syncbench.experiments.cluster_model import point_to_point_s

    state_bytes = 4 * (64 * 64 + 64 + 64 * 10 + 10)
    round_trip = 2 * point_to_point_s(state_bytes, config.cluster.network)
    updates = result.evaluations[-1].updates
    rate = updates / result.clock_s
    assert rate <= 1.05 / round_trip, (rate, 1 / round_trip)
    assert rate >= 0.5 / round_trip  # and the link is actually kept busy
    assert result.extra["staleness_mean"] > 0.5  # both workers pushed, interleaved


@pytest.mark.heavy
def test_evaluation_pauses_every_rank(digits_config, tmp_path):
    """While rank 0 evaluates, the other ranks wait for it (their time is excluded), instead of
    training on a clock that has stopped."""
    config = digits_config("strategy.name=local_sgd", "strategy.local_steps=4", "cluster.workers=2",
                           "cluster.backend=dist", "budget.train_time_s=1.5", "target.value=1.01",
                           "eval.every_s=0.05")
    _dist(config, tmp_path, emulate="none")
    rows = torch.load(tmp_path / "debug" / "rank1.pt", weights_only=False)["rows"]
    assert rows[1]["excluded"] > 0.5 * rows[0]["excluded"] > 0
    # the last round comes when each rank sees the stop: at most H - 1 local steps apart
    assert abs(rows[0]["steps"] - rows[1]["steps"]) < 4
