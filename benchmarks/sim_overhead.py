"""Harness overhead of the sim backend (issue 2).

Simulated worker-steps per second (each a real forward/backward/optimizer step of the
module, driven through the strategy, the event queue, data sharding and the ledger)
against a plain PyTorch loop doing the same forward/backward/step on the same module,
data and batch size, side by side in one process, interleaved to cancel drift. Target: ≥ 0.9.

    python -m benchmarks.sim_overhead [--config experiments/configs/mnist1d_cnn.yaml]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from syncbench.experiments.config import load_config
from syncbench.strategies.lightning_bridge import build_optimizer, training_loss
from syncbench.experiments.sim.driver import build_simulation
from syncbench.experiments.task import one_thread, prepare_task
from syncbench.experiments.sharding import ShardedBatches
from syncbench.strategies.registry import OPTIONS


def plain_steps_per_s(task, config, steps: int) -> float:
    """A plain loop: it reads its batches from the training set, as any training loop does
    (the same shuffled reader the sim's workers use), so the ratio measures the strategy,
    event queue and ledger, not the data pipeline both have."""
    module = copy.deepcopy(task.module)
    optimizer = build_optimizer(module)
    batches = iter(ShardedBatches(task.train_set, 0, 1, config.batch_size, config.seed, task.collate))
    t0 = time.perf_counter()
    for i in range(steps):
        optimizer.zero_grad(set_to_none=True)
        training_loss(module, next(batches), i).backward()
        optimizer.step()
    return steps / (time.perf_counter() - t0)


def sim_worker_steps_per_s(task, config, steps: int) -> float:
    task = copy.copy(task)
    task.module = copy.deepcopy(task.module)
    engine = build_simulation(config, task, step_s=1e-3)
    computed = lambda: sum(w.steps for w in engine.workers)  # noqa: E731
    t0 = time.perf_counter()
    while computed() < steps:
        engine.advance()
        engine.recent_losses.clear()
    return computed() / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/configs/mnist1d_cnn.yaml")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"{args.config}: {args.workers} workers, {args.steps} worker-steps per repetition, "
          f"median of {args.reps} interleaved repetitions, one thread")
    print(f"{'strategy':<16} {'plain steps/s':>14} {'sim steps/s':>12} {'ratio':>7}")
    with one_thread():
        for name in OPTIONS:  # every registered strategy, with its default options
            config = load_config(args.config, [f"strategy.name={name}", f"cluster.workers={args.workers}"])
            task = prepare_task(config)
            plain_steps_per_s(task, config, 50)  # warm-up
            plain, sim = [], []
            for _ in range(args.reps):
                plain.append(plain_steps_per_s(task, config, args.steps))
                sim.append(sim_worker_steps_per_s(task, config, args.steps))
            p, s = statistics.median(plain), statistics.median(sim)
            print(f"{name:<16} {p:>14.1f} {s:>12.1f} {s / p:>7.3f}")


if __name__ == "__main__":
    main()
