"""Streaming DiLoCo and asynchronous local SGD: their invariants against DiLoCo, their math
against torch.optim.SGD, the overlap on the virtual clock, DyLU under persistent stragglers, and
bad input. The contract suite (tests/test_contract.py) runs both on both backends."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from syncbench.experiments.config import ConfigError
from syncbench.experiments.procs.launcher import execute_dist_run
from syncbench.experiments.sim.driver import build_simulation
from syncbench.experiments.sim.run_loop import train_to_target
from syncbench.experiments.task import prepare_task
from syncbench.strategies.lightning_bridge import evaluate
from syncbench.strategies.async_local_sgd import delayed_nesterov_step_, dynamic_local_steps
from syncbench.strategies.local_sgd import OuterConfig
from syncbench.strategies.streaming_diloco import fragment_bounds
from syncbench.strategies.tensors import flat_params, flat_state

SGD = "task.module_args={lr: 0.1, optimizer: sgd, hidden: 32}"
NESTEROV = "strategy.outer={lr: 0.7, momentum: 0.9, nesterov: true}"
DILOCO = ("strategy.name=local_sgd", NESTEROV)


def sim_steps(config, steps: int):
    """Every simulated worker has completed ``steps`` program steps (events in time order)."""
    engine = build_simulation(config, prepare_task(config), step_s=1e-3)
    while min(w.completed for w in engine.workers) < steps:
        engine.advance()
    return engine


# -- Streaming DiLoCo --------------------------------------------------------------------------------
def test_fragments_are_contiguous_and_equal_within_ten_percent():
    sizes = [2048, 32, 320, 10, 100, 100]  # one big layer: whole-tensor groups cannot balance
    total = sum(sizes)
    for parts in (*range(1, 9), 16, 100, total):
        bounds = fragment_bounds(sizes, parts)
        assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))  # contiguous, no gap or overlap
        share = total / parts
        assert all(abs((b - a) - share) <= max(0.1 * share, 1) for a, b in bounds), (parts, bounds)
    # layers that balance stay whole (the paper's per-layer fragments): four equal tensors, two fragments
    assert fragment_bounds([10, 10, 10, 10], 2) == [(0, 20), (20, 40)]
    assert fragment_bounds([10, 10, 10, 10], 4) == [(0, 10), (10, 20), (20, 30), (30, 40)]
    with pytest.raises(ConfigError, match="strategy.fragments"):
        fragment_bounds([2, 1], 4)


@pytest.mark.parametrize("config_name", ["digits_mlp", "mnist1d_cnn", "fashion_mlp", "charlm"])
def test_fragments_of_every_shipped_task_are_equal_within_ten_percent(config_name):
    """Built from the shipped task's own module (no data needed): for P in 2, 4, 8 every
    fragment holds 1/P of the parameters within 10% (the audit found 85/15% on digits at P=2)."""
    from syncbench.experiments.config import import_object, load_config
    from syncbench.sweeps.spec import resolve_example
    from syncbench.strategies.tensors import trainable

    config = load_config(resolve_example(config_name, "config"))
    module = import_object(config.task.module, "task.module")(**config.task.module_args)
    sizes = [p.numel() for p in trainable(module)]
    for parts in (2, 4, 8):
        share = sum(sizes) / parts
        assert all(abs((b - a) - share) <= 0.1 * share for a, b in fragment_bounds(sizes, parts)), (parts, sizes)


def test_each_fragment_synchronisation_carries_its_share_of_the_model(digits_config):
    """Bytes on the wire: P = 4 on the digits MLP, N = 2. A ring all-reduce of S bytes puts
    2 (N - 1) S on the wire (all workers), so two rounds of every fragment carry 2 x 2 x 4 bytes
    per parameter; the largest single synchronisation carries at most 1.1 / P of the model's."""
    config = digits_config(SGD, "cluster.workers=2", "strategy.name=streaming_diloco", NESTEROV,
                           "strategy.fragments=4", "strategy.local_steps=8", "strategy.overlap_steps=0")
    engine = sim_steps(config, 16)  # two full rounds: every fragment twice
    module = engine.workers[0].module
    sizes = [p.numel() for p in module.parameters() if p.requires_grad]
    total = sum(sizes)
    assert not any(b.is_floating_point() for b in module.buffers())  # the MLP has no float buffers
    assert engine.ledger.comm_bytes == 2 * (2 * (2 - 1) * 4 * total)
    largest = max(b - a for a, b in fragment_bounds(sizes, 4))
    assert largest <= 1.1 * total / 4


def test_one_fragment_no_overlap_full_mixing_is_diloco_bit_for_bit(digits_config):
    """P = 1, tau = 0, alpha = 1: the same parameters and the same curve and TTA as DiLoCo."""
    base = ("cluster.workers=2", "strategy.local_steps=4", "cluster.stragglers={kind: lognormal, sigma: 0.3}")
    streaming = ("strategy.name=streaming_diloco", NESTEROV, "strategy.fragments=1", "strategy.overlap_steps=0",
                 "strategy.mixing_alpha=1.0")
    engines = [sim_steps(digits_config(SGD, *base, *s), 18) for s in (DILOCO, streaming)]
    for a, b in zip(*[e.workers for e in engines]):
        assert torch.equal(flat_state(a.module), flat_state(b.module))
    assert torch.equal(flat_params(engines[0].global_model()), flat_params(engines[1].global_model()))
    runs = []
    for s in (DILOCO, streaming):  # the run loop of execute_run, its recording left out
        config = digits_config(*base, *s, "target.value=0.9", "eval.every_s=0.005")
        task = prepare_task(config)
        engine = build_simulation(config, task, step_s=5e-4)
        runs.append(train_to_target(config, engine, lambda e: evaluate(e.global_model(), task.val_batches)))
    curves = [[(ev.clock_s, ev.updates, ev.samples, ev.metrics) for ev in r.evaluations] for r in runs]
    assert curves[0] == curves[1] and len(curves[0]) > 3
    assert runs[0].tta_s == runs[1].tta_s and runs[0].outcome == "reached"


def test_overlap_hides_the_reduction_behind_compute_on_the_clock(digits_config):
    """With tau >= 1 and a reduction shorter than a step, no communication time is exposed:
    after the same steps the workers have spent exactly the compute time; with tau = 0 each
    fragment's ring all-reduce is charged in full. Same bytes on the wire either way."""
    n, h, p, step_s, latency = 2, 4, 2, 1e-3, 2e-4
    base = (SGD, "strategy.name=streaming_diloco", f"cluster.workers={n}", f"strategy.local_steps={h}",
            f"strategy.fragments={p}", f"cluster.network={{latency_s: {latency}, bandwidth_gbps: 10}}")
    steps = 9  # fragment syncs start after steps 2, 4, 6, 8; with tau = 1 the last arrives at step 9
    exposed, hidden = (sim_steps(digits_config(*base, f"strategy.overlap_steps={tau}"), steps) for tau in (0, 1))
    module = prepare_task(digits_config(*base)).module
    sizes = [q.numel() for q in module.parameters()]
    state_bytes = 4 * sum(sizes)
    first = 4 * sizes[0]  # the digits MLP's first weight matrix is the larger half: fragment 0
    ring = [2 * (n - 1) * latency + 2 * (n - 1) / n * b / (10e9 / 8) for b in (first, state_bytes - first)]
    expected_comm = 2 * ring[0] + 2 * ring[1]  # each fragment synchronised twice
    for r in range(n):
        assert exposed.ledger.comm[r] == pytest.approx(expected_comm, rel=1e-9)
        assert hidden.ledger.comm[r] == 0.0 and hidden.ledger.wait[r] == 0.0
        assert hidden.ledger.compute[r] == pytest.approx(steps * step_s, rel=1e-12)
    assert exposed.ledger.comm_bytes == hidden.ledger.comm_bytes == 2 * 2 * (n - 1) * state_bytes


def _streaming_reference(task, n: int, batch: int, seed: int, h: int, bounds: list[tuple[int, int]], tau: int,
                         alpha: float, steps: int) -> tuple[list[tuple[list[torch.Tensor], torch.Tensor]], list[tuple[int, int]]]:
    """Streaming DiLoCo (Douillard et al. 2025, Algorithm 1) transcribed in plain PyTorch: N
    replicas, each torch.optim.SGD(lr 0.1) on its shard (worker w reads perm[w::N], the data
    contract); fragment p starts its synchronisation after local steps (p + 1) H/P + k H; tau
    steps later the replicas' mean of that fragment *at the start* gives the pseudo-gradient
    Delta = global - mean, an outer torch SGD(lr 0.7, momentum 0.9, nesterov) step per fragment
    moves the global fragment, and each replica mixes it in: local <- alpha global + (1 - alpha)
    local (syncbench's alpha; the paper's is 1 - alpha, docs/strategies.md). Returns, after each
    step, (the replicas, the global parameters), and the (start step, fragment) of every
    synchronisation."""
    import numpy as np
    import torch.nn.functional as F

    models = [copy.deepcopy(task.module) for _ in range(n)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    flat = lambda m: torch.cat([q.detach().reshape(-1) for q in m.parameters()])  # noqa: E731
    outer = [torch.nn.Parameter(flat(models[0])[a:b].clone()) for a, b in bounds]
    outer_opt = [torch.optim.SGD([o], lr=0.7, momentum=0.9, nesterov=True) for o in outer]
    x_train, y_train = task.train_set.tensors
    shard_len = len(y_train) // n
    per_epoch = shard_len // batch
    in_flight: dict[int, tuple[int, torch.Tensor]] = {}  # arrival step -> (fragment, mean at the start)
    schedule, after = [], []
    for step in range(1, steps + 1):
        epoch, pos = divmod(step - 1, per_epoch)
        perm = np.random.default_rng([seed, 31337, epoch]).permutation(len(y_train))
        for w, (model, opt) in enumerate(zip(models, optimizers)):
            index = torch.from_numpy(perm[w::n][:shard_len][pos * batch:(pos + 1) * batch])
            opt.zero_grad()
            F.cross_entropy(model(x_train[index]), y_train[index]).backward()
            opt.step()
        if step % (h // len(bounds)) == 0:  # a start: (p + 1) H/P + k H  <=>  p = (step / (H/P) - 1) mod P
            p = (step // (h // len(bounds)) - 1) % len(bounds)
            a, b = bounds[p]
            schedule.append((step, p))
            in_flight[step + tau] = (p, torch.stack([flat(m)[a:b] for m in models]).mean(0))
        if step in in_flight:
            p, mean = in_flight.pop(step)
            a, b = bounds[p]
            outer[p].grad = outer[p].detach() - mean
            outer_opt[p].step()
            for m in models:
                state = flat(m)
                state[a:b] = alpha * outer[p].detach() + (1 - alpha) * state[a:b]
                torch.nn.utils.vector_to_parameters(state, m.parameters())
        after.append(([flat(m) for m in models], torch.cat([o.detach() for o in outer])))
    return after, schedule


@pytest.mark.parametrize("fragments,tau", [(4, 0), (4, 1), (2, 1)])
def test_streaming_diloco_is_the_papers_algorithm_step_by_step(digits_config, fragments, tau):
    """The schedule (which fragment synchronises after which step), the overlap and the mixing at
    alpha = 0.3 (where alpha and 1 - alpha differ, unlike 0.5, and mixing matters, unlike 1)
    against the transcription above, after every local step of two rounds and a half. The
    fragments are the balanced cuts of the digits MLP (hidden 32: 2048 + 32 + 320 + 10 = 2410
    parameters), written out: 1/P of the vector each (the whole-layer cut 2048 is not within 5%)."""
    h, alpha, steps, n = 8, 0.3, 20, 2
    bounds = {2: [(0, 1205), (1205, 2410)], 4: [(0, 602), (602, 1205), (1205, 1808), (1808, 2410)]}[fragments]
    config = digits_config(SGD, f"cluster.workers={n}", "strategy.name=streaming_diloco", NESTEROV,
                           f"strategy.fragments={fragments}", f"strategy.local_steps={h}",
                           f"strategy.overlap_steps={tau}", f"strategy.mixing_alpha={alpha}")
    task = prepare_task(config)
    initial = copy.deepcopy(task)  # the sim may train task.module in place
    engine = build_simulation(config, task, step_s=1e-3)
    reference, schedule = _streaming_reference(initial, n, config.batch_size, config.seed, h, bounds, tau, alpha, steps)
    for k, (replicas, global_) in enumerate(reference, 1):
        while not all(w.completed >= k for w in engine.workers):  # step k's program done (its sync included)
            engine.advance()
        assert all(w.completed == k for w in engine.workers)
        for w in range(n):
            torch.testing.assert_close(flat_params(engine.workers[w].module), replicas[w], atol=2e-6, rtol=0,
                                       msg=lambda m: f"replica {w} after step {k}: {m}")
        torch.testing.assert_close(engine.programs[0].global_state[:2410], global_, atol=2e-6, rtol=0)
    gap = h // fragments
    assert [s for s, _ in schedule] == list(range(gap, steps + 1, gap))
    assert [p for _, p in schedule][:fragments] == list(range(fragments))
    assert engine.programs[0].syncs == len([s for s, _ in schedule if s + tau <= steps])


def test_bad_streaming_options_are_refused_naming_the_key(digits_config):
    with pytest.raises(ConfigError, match="strategy.fragments"):
        digits_config("strategy.name=streaming_diloco", "strategy.fragments=3")
    with pytest.raises(ConfigError, match="strategy.overlap_steps"):
        digits_config("strategy.name=streaming_diloco", "strategy.fragments=2", "strategy.overlap_steps=4")
    with pytest.raises(ConfigError, match="strategy.mixing_alpha"):
        digits_config("strategy.name=streaming_diloco", "strategy.mixing_alpha=0")
    config = digits_config("strategy.name=streaming_diloco", "strategy.local_steps=8192", "strategy.fragments=8192")
    with pytest.raises(ConfigError, match="strategy.fragments"):  # the digits MLP has 4,810 parameters
        prepare_task(config)


@pytest.mark.heavy
def test_overlapped_fragments_hold_the_same_parameters_on_both_backends(digits_config, tmp_path):
    """tau = 1, alpha = 0.5, outer Nesterov: the reductions in flight over gloo give the sim's numbers."""
    base = (SGD, "strategy.name=streaming_diloco", "cluster.workers=2", "strategy.local_steps=4",
            "strategy.overlap_steps=1", "strategy.mixing_alpha=0.5", NESTEROV, "target.value=1.01",
            "budget.train_time_s=60")
    engine = sim_steps(digits_config(*base), 14)
    execute_dist_run(digits_config(*base, "cluster.backend=dist"), workspace=tmp_path / "ws",
                     debug_dir=tmp_path / "debug", max_steps=14, emulate="none")
    for rank in range(2):
        dist_final = torch.load(tmp_path / "debug" / f"rank{rank}.pt", weights_only=False)["final"]
        sim = flat_params(engine.workers[rank].module)
        torch.testing.assert_close(dist_final[: sim.numel()], sim, atol=1e-5, rtol=0)


# -- asynchronous local SGD -------------------------------------------------------------------------
def test_one_worker_async_local_sgd_is_diloco_bit_for_bit(digits_config):
    base = (SGD, "cluster.workers=1", "strategy.local_steps=4")
    diloco, async_local = (sim_steps(digits_config(*base, *s), 22) for s in (
        DILOCO, ("strategy.name=async_local_sgd", NESTEROV)))
    assert torch.equal(flat_params(diloco.global_model()), flat_params(async_local.global_model()))
    assert torch.equal(flat_state(diloco.workers[0].module), flat_state(async_local.workers[0].module))
    assert async_local.server.version == 5  # pushes after steps 4, 8, ..., 20


def _torch_sgd_steps(start: torch.Tensor, grads: list[torch.Tensor], outer: OuterConfig) -> torch.Tensor:
    p = torch.nn.Parameter(start.clone())
    opt = torch.optim.SGD([p], lr=outer.lr, momentum=outer.momentum, nesterov=outer.nesterov)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("nesterov", [True, False])
def test_delayed_nesterov_against_torch_sgd(nesterov):
    """N = 1 is torch's SGD on every pseudo-gradient; with N = 3 the pushes in between are plain
    lr/N steps and every N pushes together are torch's step on their average."""
    gen = torch.Generator().manual_seed(0)
    outer = OuterConfig(lr=0.7, momentum=0.9, nesterov=nesterov)
    start = torch.randn(50, generator=gen)
    grads = [torch.randn(50, generator=gen) for _ in range(6)]

    def run(period: int) -> list[torch.Tensor]:
        params, momentum, pending, seen = start.clone(), torch.zeros(50), torch.zeros(50), []
        for i, g in enumerate(grads, 1):
            delayed_nesterov_step_(params, g, momentum, pending, i, period, outer)
            seen.append(params.clone())
        return seen

    torch.testing.assert_close(run(1)[-1], _torch_sgd_steps(start, grads, outer), atol=1e-6, rtol=1e-6)
    seen = run(3)
    torch.testing.assert_close(seen[0], start - outer.lr / 3 * grads[0], atol=1e-6, rtol=1e-6)
    averages = [sum(grads[:3]) / 3, sum(grads[3:]) / 3]
    torch.testing.assert_close(seen[2], _torch_sgd_steps(start, averages[:1], outer), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(seen[5], _torch_sgd_steps(start, averages, outer), atol=1e-6, rtol=1e-6)


def test_dynamic_local_steps_follow_speed():
    assert dynamic_local_steps(8, [1.0, 4.0, 1.0, 2.0]) == [8, 2, 8, 4]
    assert dynamic_local_steps(8, [3.0, 3.0]) == [8, 8]
    assert dynamic_local_steps(2, [1.0, 10.0]) == [2, 1]


def test_dylu_gives_slow_workers_fewer_local_steps_and_fresher_pushes(digits_config):
    """Persistent stragglers 4x slower: with DyLU they take H/4 local steps and push about as
    often as the fast workers in the same virtual time; without, four times less often."""
    base = (SGD, "strategy.name=async_local_sgd", "cluster.workers=4", "strategy.local_steps=8",
            "cluster.stragglers={kind: persistent, slow_fraction: 0.5, slowdown: 4}")
    results = {}
    for dylu in (False, True):
        engine = build_simulation(config := digits_config(*base, f"strategy.dynamic_local_updates={dylu}"),
                                  prepare_task(config), step_s=1e-3)
        while engine.next_time() < 0.1:
            engine.advance()
        slow = sorted(engine.stragglers.slow)
        fast = [r for r in range(4) if r not in slow]
        results[dylu] = ({r: engine.programs[r].h for r in range(4)},
                         {r: engine.programs[r].pushes for r in range(4)}, slow, fast)
    (h_off, pushes_off, slow, fast), (h_on, pushes_on, _, _) = results[False], results[True]
    assert len(slow) == 2
    assert all(h_off[r] == 8 for r in range(4))
    assert all(h_on[r] == 2 for r in slow) and all(h_on[r] == 8 for r in fast)
    # in 0.1 s a fast worker takes ~100 steps (~12 pushes of 8), a slow one ~25 (~3 of 8, ~12 of 2)
    assert all(11 <= pushes_off[r] <= 12 for r in fast) and all(2 <= pushes_off[r] <= 3 for r in slow)
    assert all(abs(pushes_on[r] - pushes_on[fast[0]]) <= 1 for r in range(4)) and pushes_on[fast[0]] >= 11
    # the samples that reached the model: H_i batches per push applied
    _, samples = engine.counters()
    assert samples == 32 * sum(engine.server.pushes_by_rank[r] * h_on[r] for r in range(4))
    assert sum(engine.server.pushes_by_rank.values()) == engine.server.version > 0


def test_bad_async_local_options_are_refused_naming_the_key(digits_config):
    with pytest.raises(ConfigError, match="strategy.delayed_nesterov"):
        digits_config("strategy.name=async_local_sgd", "strategy.delayed_nesterov=2")
    with pytest.raises(ConfigError, match="strategy.delayed_nesterov"):
        digits_config("strategy.name=async_local_sgd", "strategy.delayed_nesterov=0", NESTEROV)


def test_literature_spec_loads_and_names_each_method():
    """sweeps/specs/literature.yaml validates as written: every cell is one method as its paper
    runs it, crossed with two straggler models."""
    from syncbench.sweeps.spec import load_sweep

    sweep = load_sweep(Path(__file__).resolve().parents[1] / "sweeps" / "specs" / "literature.yaml")
    methods = {(c.config.strategy.name, c.config.strategy.local_steps, c.config.strategy.outer is not None,
                c.config.strategy.delayed_nesterov, c.config.strategy.dynamic_local_updates) for c in sweep.cells}
    assert {("local_sgd", h, True, None, False) for h in (1, 8, 32, 128)} <= methods
    assert {("local_sgd", h, False, None, False) for h in (32, 128)} <= methods
    assert {("async_local_sgd", 32, True, dn, dylu) for dn, dylu in ((None, False), (4, False), (4, True))} <= methods
    assert ("streaming_diloco", 32, True, None, False) in methods
    assert {c.config.cluster.stragglers.kind for c in sweep.cells} == {"lognormal", "persistent"}
    assert {c.config.strategy.compression for c in sweep.cells if c.config.strategy.name == "sync"} == {
        "none", "fp16", "int8", "topk", "powersgd"}
    assert all(c.config.cluster.backend == "sim" for c in sweep.cells) and sweep.total_trials() == 90
