"""Tests that catch wrong science (issue 15): every expected value comes from an independent
reference -- a closed form worked by hand in the comments, a plain-PyTorch loop written here,
``torch.optim.SGD`` -- never from the code under test.

All on the sim backend or on pure functions: fast enough to own the mutants of
``benchmarks/mutation_check.py`` (docs/testing.md lists them)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from syncbench.experiments.sim.driver import build_simulation
from syncbench.experiments.task import prepare_task
from syncbench.strategies.tensors import flat_params

SGD = "task.module_args={lr: 0.1, optimizer: sgd, hidden: 32}"
# hidden 32: 64*32 + 32 + 32*10 + 10 = 2410 float32 parameters = 9640 bytes
MLP32_BYTES = 9640
# bandwidth_gbps 0.008 = 1e6 bytes/s: a transfer of S bytes takes S microseconds
SLOW_NET = "cluster.network={latency_s: 0.001, bandwidth_gbps: 0.008}"


# ---------------------------------------------------------------------------------------
# the alpha-beta cost model in absolute terms (Patarasuk & Yuan 2009; docs/backends.md)


def test_ring_allreduce_and_point_to_point_closed_forms():
    """alpha = 1 ms, beta = 1e6 B/s, S = 1000 B, worked by hand:
    ring(N) = 2(N-1) alpha + 2(N-1)/N S/beta; bytes on the wire = 2(N-1) S (N workers each send
    2(N-1)/N S); push or pull = alpha + S/beta."""
    from syncbench.experiments.cluster_model import point_to_point_s, ring_allreduce_bytes, ring_allreduce_s
    from syncbench.experiments.config import NetworkConfig

    net = NetworkConfig(latency_s=0.001, bandwidth_gbps=0.008)
    assert net.bytes_per_s == pytest.approx(1e6)
    expected_s = {1: 0.0, 2: 0.002 + 0.001, 4: 0.006 + 0.0015, 8: 0.014 + 0.00175}
    expected_bytes = {1: 0, 2: 2000, 4: 6000, 8: 14000}
    for n in (1, 2, 4, 8):
        assert ring_allreduce_s(n, 1000, net) == pytest.approx(expected_s[n], rel=1e-12), n
        assert ring_allreduce_bytes(n, 1000) == expected_bytes[n]
    assert point_to_point_s(1000, net) == pytest.approx(0.002, rel=1e-12)


def _advance_until(engine, done) -> None:
    """Process the sim's events one at a time until ``done()`` holds."""
    while not done():
        engine.advance()


def test_sim_sync_clock_and_bytes_in_absolute_terms(digits_config):
    """sync, N = 4, step 10 ms, alpha 1 ms, beta 1e6 B/s, S = 9640 B (by hand):
    all-reduce = 6 * 1 ms + 1.5 * 9.64 ms = 20.46 ms; an update every 30.46 ms;
    6 * 9640 = 57840 bytes on the wire per update."""
    config = digits_config(SGD, "strategy.name=sync", "cluster.workers=4", "cluster.compute.step_s=0.01", SLOW_NET)
    engine = build_simulation(config, prepare_task(config), step_s=0.01)
    _advance_until(engine, lambda: engine.counters()[0] == 5)
    assert engine.clock == pytest.approx(5 * 0.03046, rel=1e-9)
    assert engine.ledger.comm_bytes == 5 * 57840
    np.testing.assert_allclose(engine.ledger.compute, 5 * 0.01, rtol=1e-9)
    np.testing.assert_allclose(engine.ledger.comm, 5 * 0.02046, rtol=1e-9)
    np.testing.assert_allclose(engine.ledger.wait, 0.0, atol=1e-12)
    assert engine.counters()[1] == 5 * 4 * 32  # 5 updates of 4 workers' batches of 32


def test_sim_parameter_server_link_is_fifo_in_absolute_terms(digits_config):
    """async, N = 2, step 10 ms, alpha 0, beta 1e6 B/s, S = 9640 B: a transfer takes 9.64 ms on
    the one server link, and a push and its pull hold it back to back (the server answers a push
    before it takes the next). By hand: both workers finish at 10 ms; w0 pushes 10 -> 19.64
    (applied: version 1, staleness 0) and pulls version 1, 19.64 -> 29.28; w1's push queues
    behind both, 29.28 -> 38.92 (version 2, staleness 1), its pull to 48.56; w0, computing
    29.28 -> 39.28, finds the link busy until 48.56 and pushes 48.56 -> 58.20 (version 3,
    staleness 1: it pulled version 1)."""
    config = digits_config(SGD, "strategy.name=async", "cluster.workers=2", "cluster.compute.step_s=0.01",
                           "cluster.network={latency_s: 0.0, bandwidth_gbps: 0.008}")
    engine = build_simulation(config, prepare_task(config), step_s=0.01)
    applied_at = []
    while len(applied_at) < 3:
        before = engine.server.version
        engine.advance()
        if engine.server.version != before:
            applied_at.append(engine.clock)
    assert applied_at == pytest.approx([0.01964, 0.03892, 0.05820], rel=1e-9)
    assert dict(engine.server.staleness) == {0: 1, 1: 2}
    # waits on the link so far: w1 19.28 ms for its first transaction (requested at 10, served
    # from 29.28); w0 9.28 ms for its second (requested at 39.28, served from 48.56)
    assert engine.ledger.wait.tolist() == pytest.approx([0.00928, 0.01928], rel=1e-9)


# ---------------------------------------------------------------------------------------
# causality of the clock: an evaluation at clock t sees exactly the events at or before t


def _reference_batches(n_train: int, n_workers: int, batch: int, seed: int, steps: int):
    """The data contract (docs/strategies.md), written out: worker w of N reads perm[w::N] (cut to
    len // N) of a seeded per-epoch permutation, in batches; one worker at N x b reads the N
    workers' batches of a step together."""
    shard_len = n_train // n_workers
    per_epoch = shard_len // batch
    out = []
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, 31337, epoch]).permutation(n_train)
        out.append(np.concatenate([perm[w::n_workers][:shard_len][pos * batch:(pos + 1) * batch]
                                   for w in range(n_workers)]))
    return out


def plain_sgd_trajectory(module: torch.nn.Module, task, n_workers: int, batch: int, seed: int, steps: int,
                         lr: float) -> list[tuple[torch.Tensor, float]]:
    """Plain PyTorch: one model, torch.optim.SGD (no momentum, so a sum of N gradients instead
    of their mean shows as an N-fold step), batch = the N workers' batches. Returns, after each
    number of steps 0..steps, (flat parameters, validation loss)."""
    model = copy.deepcopy(module)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    x_train, y_train = task.train_set.tensors
    x_val, y_val = task.val_batches[0]

    def snapshot():
        with torch.no_grad():
            loss = float(F.cross_entropy(model(x_val), y_val))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone(), loss

    out = [snapshot()]
    for idx in _reference_batches(len(y_train), n_workers, batch, seed, steps):
        index = torch.from_numpy(idx)
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[index]), y_train[index]).backward()
        optimizer.step()
        out.append(snapshot())
    return out


def test_sim_evaluation_sees_exactly_the_updates_at_or_before_its_clock(digits_config, tmp_path):
    """sync, N = 1, step 0.25 s (exact in binary): update k lands at exactly 0.25 k. Evaluations
    every 0.5 s to a 1.9 s budget: at 0.5, 1.0, 1.5 (each coinciding with an update, which counts)
    and at the budget, 1.9 (7 updates: 2.0 is past it). Each evaluated model is the reference
    model after exactly that many steps."""
    from syncbench.experiments.run import execute_run

    config = digits_config(SGD, "strategy.name=sync", "cluster.workers=1", "cluster.compute.step_s=0.25",
                           "eval.every_s=0.5", "budget.train_time_s=1.9", "target.value=1.01")
    initial = prepare_task(config)
    reference = plain_sgd_trajectory(initial.module, initial, 1, config.batch_size, config.seed, 8, lr=0.1)
    result = execute_run(config, workspace=tmp_path / "ws")
    assert result.outcome == "budget"
    assert [(ev.clock_s, ev.updates) for ev in result.evaluations] == [(0.5, 2), (1.0, 4), (1.5, 6), (1.9, 7)]
    for ev in result.evaluations:
        assert ev.metrics["val_loss"] == pytest.approx(reference[ev.updates][1], abs=1e-5), ev


# ---------------------------------------------------------------------------------------
# the strategies' arithmetic against references


@pytest.mark.parametrize("batching", ["auto", "off"])  # one shared replica, batched; N replicas, each its own
def test_sim_sync_at_n_workers_is_plain_sgd_at_n_times_the_batch(digits_config, batching):
    config = digits_config(SGD, "strategy.name=sync", "cluster.workers=4", "batch_size=16",
                           f"cluster.sim.batching={batching}")
    task = prepare_task(config)
    reference = plain_sgd_trajectory(task.module, task, 4, 16, config.seed, 30, lr=0.1)  # spans an epoch
    engine = build_simulation(config, task, step_s=1e-3)
    _advance_until(engine, lambda: engine.counters()[0] == 30)
    torch.testing.assert_close(flat_params(engine.global_model()), reference[30][0], atol=1e-5, rtol=0)


def test_diloco_through_a_run_is_torch_nesterov_sgd_on_the_pseudo_gradient(digits_config):
    """Each round, the outer parameters move by torch.optim.SGD(nesterov=True) applied to
    Delta = theta_global - mean(theta_i), the mean taken here over the replicas' parameters
    just before the round's averaging."""
    config = digits_config(SGD, "strategy.name=local_sgd", "cluster.workers=2", "strategy.local_steps=3",
                           "strategy.outer={lr: 0.7, momentum: 0.9, nesterov: true}")
    task = prepare_task(config)
    engine = build_simulation(config, task, step_s=1e-3)
    outer = torch.nn.Parameter(flat_params(task.module).clone())
    sgd = torch.optim.SGD([outer], lr=0.7, momentum=0.9, nesterov=True)
    for round_ in range(1, 4):
        # every replica has taken its 3rd local step of the round: collect them before they average
        _advance_until(engine, lambda: all(p.local_steps == 3 * round_ for p in engine.programs))
        mean = torch.stack([flat_params(w.module) for w in engine.workers]).mean(0)
        _advance_until(engine, lambda: all(p.rounds == round_ for p in engine.programs))
        outer.grad = outer.detach() - mean
        sgd.step()
        got = flat_params(engine.global_model())
        torch.testing.assert_close(got, outer.detach(), atol=1e-6, rtol=0)
        for w in engine.workers:  # every replica restarts from the outer parameters
            torch.testing.assert_close(flat_params(w.module), outer.detach(), atol=1e-6, rtol=0)


def test_local_sgd_global_model_between_rounds_is_the_replicas_mean(digits_config):
    config = digits_config(SGD, "strategy.name=local_sgd", "cluster.workers=3", "strategy.local_steps=4")
    engine = build_simulation(config, prepare_task(config), step_s=1e-3)
    _advance_until(engine, lambda: all(p.local_steps == 2 for p in engine.programs))
    replicas = [flat_params(w.module) for w in engine.workers]
    assert not torch.equal(replicas[0], replicas[1])
    expected = (replicas[0] + replicas[1] + replicas[2]) / 3
    torch.testing.assert_close(flat_params(engine.global_model()), expected, atol=1e-6, rtol=0)


def test_post_local_sgd_warmup_is_exactly_w_synchronous_updates(digits_config):
    """warmup_sync_updates = 3, H = 4, N = 2 (Lin et al. 2020): three gradient all-reduces keep the
    replicas identical, the 4th step is local (they drift), and the first state average comes after
    4 local steps. Bytes by hand: 3 gradient rounds of 2 * 9640 on the wire, then one state round."""
    config = digits_config(SGD, "strategy.name=local_sgd", "cluster.workers=2", "strategy.local_steps=4",
                           "strategy.warmup_sync_updates=3")
    engine = build_simulation(config, prepare_task(config), step_s=1e-3)
    _advance_until(engine, lambda: all(w.completed == 3 for w in engine.workers))
    assert torch.equal(flat_params(engine.workers[0].module), flat_params(engine.workers[1].module))
    assert engine.ledger.comm_bytes == 3 * 2 * MLP32_BYTES
    _advance_until(engine, lambda: all(w.completed == 4 for w in engine.workers))
    assert not torch.equal(flat_params(engine.workers[0].module), flat_params(engine.workers[1].module))
    assert engine.ledger.comm_bytes == 3 * 2 * MLP32_BYTES  # the 4th step communicated nothing
    _advance_until(engine, lambda: all(w.completed == 7 for w in engine.workers))
    assert engine.programs[0].rounds == 1
    assert engine.counters()[0] == 3 + 4  # 3 sync updates + 8 local steps / 2 workers


@pytest.mark.parametrize("batching", ["auto", "off"])  # the kept workers' batches concatenated; their mean
def test_backup_workers_keep_the_first_gradients_and_divide_by_their_count(digits_config, batching):
    """sync, N = 3, backup_workers = 1, persistent straggler (slowdown 4, worker chosen by seed):
    each update averages the two fast workers' gradients -- their sum / 2, not / 3 -- and the
    straggler's batch is dropped. Reference: plain SGD on the two kept workers' batches."""
    config = digits_config(SGD, "strategy.name=sync", "cluster.workers=3", "strategy.backup_workers=1",
                           "cluster.stragglers={kind: persistent, slow_fraction: 0.34, slowdown: 4}",
                           f"cluster.sim.batching={batching}")
    task = prepare_task(config)
    model = copy.deepcopy(task.module)
    engine = build_simulation(config, task, step_s=1e-3)
    (slow,) = engine.stragglers.slow
    kept = [w for w in range(3) if w != slow]
    x_train, y_train = task.train_set.tensors
    batches = _reference_batches(len(y_train), 3, config.batch_size, config.seed, 6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for idx in batches:
        index = torch.from_numpy(np.concatenate([idx[w * 32:(w + 1) * 32] for w in kept]))
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[index]), y_train[index]).backward()
        optimizer.step()
    _advance_until(engine, lambda: engine.counters()[0] == 6)
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(flat_params(engine.global_model()), expected, atol=1e-5, rtol=0)
    assert engine.counters()[1] == 6 * 2 * 32  # samples: only the kept gradients count


def _server(lr: float, staleness_lr: str, max_staleness: int | None = None):
    """The async strategy's parameter server around a Linear(3, 1) and plain torch SGD."""
    from syncbench.strategies.async_ps import AsyncOptions, AsyncServer

    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    options = AsyncOptions(staleness_lr=staleness_lr, max_staleness=max_staleness)
    return AsyncServer(module, torch.optim.SGD(module.parameters(), lr=lr), options, world=4)


@pytest.mark.parametrize("mode", ["none", "inverse"])
def test_async_server_applies_lr_over_one_plus_staleness(mode):
    """Zhang et al. 2016: a gradient of staleness s is applied at lr / (1 + s) with
    ``staleness_lr: inverse``, at lr otherwise. Pushes computed on versions 0, 0, 0, 2: staleness
    0, 1, 2, 1 -- theta = theta_0 - lr * sum(g_i * factor(s_i)), worked out here."""
    server = _server(lr=0.5, staleness_lr=mode)
    theta0 = flat_params(server.module).clone()
    gradients = [torch.full((4,), float(k + 1)) for k in range(4)]  # Linear(3, 1): 3 weights + 1 bias
    pulled = [0, 0, 0, 2]
    for g, v in zip(gradients, pulled):
        assert server.apply(0, g.clone(), v)
    staleness = [0, 1, 2, 1]
    factor = [1 / (1 + s) if mode == "inverse" else 1.0 for s in staleness]
    expected = theta0 - 0.5 * sum(g * f for g, f in zip(gradients, factor))
    torch.testing.assert_close(flat_params(server.module), expected, atol=1e-6, rtol=0)
    assert dict(server.staleness) == {0: 1, 1: 2, 2: 1}
    assert server.version == 4


def test_async_server_refuses_gradients_staler_than_the_bound():
    server = _server(lr=0.5, staleness_lr="none", max_staleness=1)
    theta0 = flat_params(server.module).clone()
    assert server.apply(0, torch.ones(4), 0)  # staleness 0
    assert server.apply(1, torch.ones(4), 0)  # staleness 1: at the bound, applied
    assert not server.apply(2, torch.ones(4), 0)  # staleness 2: refused, theta untouched
    torch.testing.assert_close(flat_params(server.module), theta0 - 1.0, atol=1e-6, rtol=0)
    assert server.refused == 1 and server.version == 2


def test_async_with_one_worker_is_plain_sgd_against_an_independent_loop(digits_config):
    config = digits_config(SGD, "strategy.name=async", "cluster.workers=1")
    task = prepare_task(config)
    reference = plain_sgd_trajectory(task.module, task, 1, config.batch_size, config.seed, 12, lr=0.1)
    engine = build_simulation(config, task, step_s=1e-3)
    _advance_until(engine, lambda: engine.counters()[0] == 12)
    torch.testing.assert_close(flat_params(engine.global_model()), reference[12][0], atol=1e-6, rtol=0)
    assert dict(engine.server.staleness) == {0: 12}


# ---------------------------------------------------------------------------------------
# stragglers


def test_lognormal_stragglers_have_mean_one_and_the_configured_spread():
    from syncbench.experiments.cluster_model import StragglerModel
    from syncbench.experiments.config import LognormalStragglers

    model = StragglerModel(LognormalStragglers(kind="lognormal", sigma=0.5), 2, seed=1)
    draws = np.array([model.factor(1) for _ in range(20000)])
    # E[exp(sigma Z - sigma^2/2)] = 1; SD of the log = sigma; standard error of the mean ~ 0.0038
    assert draws.mean() == pytest.approx(1.0, abs=0.02)
    assert np.log(draws).std() == pytest.approx(0.5, abs=0.02)


def test_bimodal_stragglers_are_slow_with_probability_p():
    """{kind: bimodal, p: 0.2, slowdown: 10}: each step is 10x with probability 0.2, else 1x.
    20000 draws: the slow count is Binomial(20000, 0.2), SD ~ 57; allow 5 SD."""
    from syncbench.experiments.cluster_model import StragglerModel
    from syncbench.experiments.config import BimodalStragglers

    model = StragglerModel(BimodalStragglers(kind="bimodal", p=0.2, slowdown=10), 3, seed=0)
    draws = np.array([model.factor(2) for _ in range(20000)])
    assert set(np.unique(draws).tolist()) == {1.0, 10.0}
    assert abs(int((draws == 10.0).sum()) - 4000) < 5 * math.sqrt(20000 * 0.2 * 0.8)
    # different workers draw independently
    other = np.array([model.factor(0) for _ in range(20000)])
    assert not np.array_equal(draws, other)
