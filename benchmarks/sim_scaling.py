"""How close the sim comes to the limit of an exact simulator, and what N costs in memory (issue 23).

For each task, strategy and N: the sim's samples/s (every simulated worker's gradients, each a
real forward/backward of its batch b, driven through the strategy, the event queue and the
ledger) divided by a plain PyTorch loop at the workers' combined batch N*b on the same module,
data and device -- the most an exact simulator can do, since it must compute the same N*b
gradients per update -- and the sim's peak RSS. Each cell runs in its own process (its peak RSS
is its own), the sim and the plain loop alternating there to cancel drift; the RSS is read after
the first sim repetition, before the plain loop's large batch has run.

Targets on the CPU with one thread: sync >= 0.8 of the limit at N >= 8; local SGD and DiLoCo
>= 0.5; sync's RSS at N=512 <= 1.2x N=8 (``--rss``). On a GPU (``--device cuda``, run by
benchmarks/device_check.sh): sync >= 0.7.

    python -m benchmarks.sim_scaling [--tasks digits,mnist1d] [--workers 1,8,64,256]
        [--strategies sync,local_sgd,diloco,async] [--seconds 2] [--reps 3] [--device cpu] [--rss] [--vs-off] [--vs-ungrouped]

``--vs-off`` adds the column "x off": the sim's samples/s over the same sim with
``cluster.sim.batching=off`` (one forward/backward per worker), the three alternating in the cell's
process -- the baseline with only the batched/stacked compute switched off. ``--vs-ungrouped`` adds
"x ungr": over the same sim with only the stacked path's grouped optimizer step switched off.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {"digits": "experiments/configs/digits_mlp.yaml", "mnist1d": "experiments/configs/mnist1d_cnn.yaml"}
STRATEGIES = {
    "sync": ["strategy.name=sync"],
    "local_sgd": ["strategy.name=local_sgd", "strategy.local_steps=8"],
    "diloco": ["strategy.name=local_sgd", "strategy.local_steps=8",
               "strategy.outer={lr: 0.7, momentum: 0.9, nesterov: true}"],
    "async": ["strategy.name=async"],
}
RSS_MODULE = "task.module_args={lr: 0.01, hidden: 4096, optimizer: adam}"  # 64*4096 + 4096*10 + ...: 0.3M
TARGETS = {"sync": 0.8, "local_sgd": 0.5, "diloco": 0.5}


def cell_config(task: str, strategy: str, workers: int, batch_size: int, device: str, extra: tuple[str, ...] = ()):
    """The task's config at N workers of batch b; MNIST-1D generated with enough samples for
    four global batches per epoch (the digits set is fixed: cells that do not fit are skipped)."""
    from syncbench.experiments.config import load_config

    overrides = [*STRATEGIES[strategy], f"cluster.workers={workers}", f"batch_size={batch_size}",
                 "cluster.compute.step_s=0.001", f"cluster.device={device}"]
    if task == "mnist1d":
        overrides.append(f"task.data_args={{num_samples: {max(10000, int(workers * batch_size * 4 / 0.8))}}}")
    return load_config(CONFIGS[task], [*overrides, *extra])


def plain_samples_per_s(task, config, device: str, seconds: float) -> float:
    """A plain loop at batch N*b on the module's own optimizer, reading its batches the way the
    sim's workers do (one shuffled reader over the whole set)."""
    from syncbench.experiments.sharding import ShardedBatches
    from syncbench.experiments.sim.batching import move_to
    from syncbench.strategies.lightning_bridge import build_optimizer, training_loss

    module = copy.deepcopy(task.module).to(device)
    optimizer = build_optimizer(module)
    big = config.batch_size * config.cluster.workers
    batches = ShardedBatches(task.train_set, 0, 1, big, config.seed, task.collate)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < 2:
        optimizer.zero_grad(set_to_none=True)
        training_loss(module, move_to(next(batches), device), steps).backward()
        optimizer.step()
        steps += 1
    _synchronise(device)
    return steps * big / (time.perf_counter() - t0)


def sim_samples_per_s(task, config, device: str, seconds: float, ungrouped: bool = False) -> tuple[float, str]:
    """The sim's samples/s: gradients computed by its workers (N*b per sync update).
    ``ungrouped``: the grouped optimizer step switched off (each worker steps its own optimizer)."""
    from syncbench.experiments.sim.driver import build_simulation

    task = copy.copy(task)
    task.module = copy.deepcopy(task.module)
    engine = build_simulation(config, task, step_s=1e-3, device=device)
    if ungrouped and engine.replicas is not None:
        engine.replicas.step = lambda: False  # the baseline: only the grouped step switched off
    computed = lambda: sum(w.steps for w in engine.workers)  # noqa: E731
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or computed() < 2 * config.cluster.workers:
        engine.advance()
        engine.recent_losses.clear()
    _synchronise(device)
    return computed() * config.batch_size / (time.perf_counter() - t0), engine.batching


def _synchronise(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def run_cell(spec: dict) -> dict:
    """One cell, in this process: the sim first (its RSS), then plain and sim alternating."""
    from syncbench.experiments.sim.device import resolve_sim_device
    from syncbench.experiments.task import one_thread, prepare_task

    config = cell_config(spec["task"], spec["strategy"], spec["workers"], spec["batch_size"], spec["device"],
                         tuple(spec.get("extra", ())))
    device = resolve_sim_device(config.cluster.device)
    with one_thread():
        task = prepare_task(config)
        sims, plains = [], []
        rate, batching = sim_samples_per_s(task, config, device, spec["seconds"])
        sims.append(rate)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if spec.get("rss_only"):
            return {"rss_mb": rss_mb, "batching": batching}
        plain_samples_per_s(task, config, device, 0.2)  # warm-up
        off_config = config.model_copy(update={"cluster": config.cluster.model_copy(update={
            "sim": config.cluster.sim.model_copy(update={"batching": "off"})})}) if spec.get("vs_off") else None
        offs, ungrouped = [], []
        for _ in range(spec["reps"]):
            plains.append(plain_samples_per_s(task, config, device, spec["seconds"]))
            sims.append(sim_samples_per_s(task, config, device, spec["seconds"])[0])
            if off_config is not None:  # the same sim with only the batched/stacked compute switched off
                offs.append(sim_samples_per_s(task, off_config, device, spec["seconds"])[0])
            if spec.get("vs_ungrouped"):
                ungrouped.append(sim_samples_per_s(task, config, device, spec["seconds"], ungrouped=True)[0])
    return {"sim": statistics.median(sims), "plain": statistics.median(plains), "rss_mb": rss_mb,
            "batching": batching, "off": statistics.median(offs) if offs else None,
            "ungrouped": statistics.median(ungrouped) if ungrouped else None}


def in_child(spec: dict) -> dict | str:
    done = subprocess.run([sys.executable, "-m", "benchmarks.sim_scaling", "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"failed: {last[:120]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,mnist1d")
    parser.add_argument("--workers", default="1,8,64,256")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per repetition and side")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vs-off", action="store_true",
                        help="also the same sim with cluster.sim.batching=off, alternating: the x off column")
    parser.add_argument("--vs-ungrouped", action="store_true",
                        help="also the same sim with the grouped optimizer step switched off: the x ungr column")
    parser.add_argument("--rss", action="store_true", help="also sync's peak RSS at N=8 and N=512 (digits)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_cell(json.loads(args.child))))
        return
    print(f"sim samples/s / plain loop at batch N*b (b={args.batch_size}), median of {args.reps} alternating "
          f"repetitions of {args.seconds}s, one thread, device {args.device}; peak RSS of the cell's process")
    print(f"{'task':<8} {'strategy':<10} {'N':>4} {'plain':>10} {'sim':>10} {'ratio':>6} {'target':>6} "
          f"{'RSS MB':>7} {'x off':>6} {'x ungr':>6}  path")
    for task in args.tasks.split(","):
        for strategy in args.strategies.split(","):
            for workers in (int(n) for n in args.workers.split(",")):
                spec = {"task": task, "strategy": strategy, "workers": workers, "batch_size": args.batch_size,
                        "seconds": args.seconds, "reps": args.reps, "device": args.device, "vs_off": args.vs_off,
                        "vs_ungrouped": args.vs_ungrouped}
                out = _fits(task, workers, args.batch_size) or in_child(spec)
                if isinstance(out, str):
                    print(f"{task:<8} {strategy:<10} {workers:>4}  {out}")
                    continue
                target = TARGETS.get(strategy) if workers >= 8 else None
                target = 0.7 if (target and strategy == "sync" and args.device != "cpu") else target
                print(f"{task:<8} {strategy:<10} {workers:>4} {out['plain']:>10.0f} {out['sim']:>10.0f} "
                      f"{out['sim'] / out['plain']:>6.2f} {target if target else '':>6} {out['rss_mb']:>7.0f} "
                      f"{out['sim'] / out['off'] if out.get('off') else float('nan'):>6.2f} "
                      f"{out['sim'] / out['ungrouped'] if out.get('ungrouped') else float('nan'):>6.2f}  "
                      f"{out['batching'][:40]}", flush=True)
    if args.rss:
        for batching in ("auto", "off"):
            rss = {}
            for workers in (8, 512):
                spec = {"task": "digits", "strategy": "sync", "workers": workers, "batch_size": 2, "seconds": 1.0,
                        "reps": 0, "device": args.device, "rss_only": True,
                        "extra": [RSS_MODULE, f"cluster.sim.batching={batching}"]}
                out = in_child(spec)
                rss[workers] = out["rss_mb"] if isinstance(out, dict) else float("nan")
            print(f"sync peak RSS, 0.3M-parameter digits MLP (hidden 4096), b=2, 1 s, batching {batching}: "
                  f"N=8 {rss[8]:.0f} MB, N=512 {rss[512]:.0f} MB, ratio {rss[512] / rss[8]:.2f} (target <= 1.2)",
                  flush=True)


def _fits(task: str, workers: int, batch_size: int) -> str | None:
    """Digits is a fixed set of 1,797 images (80% for training): a cell whose N*b exceeds it is skipped."""
    if task == "digits" and workers * batch_size > 1437:
        return f"skipped: N*b = {workers * batch_size} exceeds the digits training set (1437)"
    return None


if __name__ == "__main__":
    main()
