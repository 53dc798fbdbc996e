"""Activation checkpointing on `charlm`: step time vs activation memory, side by side.

    .venv/bin/python -m benchmarks.checkpointing [--reps 40] [--config experiments/configs/charlm.yaml]

Every variant (off; DeepSpeed with every = 1, 2, 3; torch's non-reentrant checkpoint
with every = 1 as the reference) is a copy of the same initial model, trained on the same
batches in one process on one thread. Repetitions interleave the variants (off, ds-1,
ds-2, ..., off, ds-1, ...) so that drift of the machine (frequency, other tenants) hits
all of them alike; the table reports median step time (forward + backward + optimizer
step) and ``activation_bytes`` as ratios to "off". Chen et al. (2016) predict about one
extra forward of the checkpointed blocks, i.e. a step-time ratio near 4/3 for every = 1.

Measured on the 2-core development machine (otherwise idle, 80 reps; off = 31.7 ms):
DeepSpeed every=1 1.33x time for 0.111x activation bytes (Chen bound 1.28x), every=2 and
every=3 (blocks {0, 2} and {0, 3} of 4) 1.18x for 0.556x, torch every=1 1.36x for 0.111x.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from syncbench.experiments.config import CheckpointingConfig, import_object, load_config
from syncbench.strategies.lightning_bridge import build_optimizer, capture_logs, training_loss
from syncbench.strategies.checkpointing import activation_bytes, apply_checkpointing

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "charlm.yaml"
VARIANTS: list[tuple[str, CheckpointingConfig]] = [
    ("off", CheckpointingConfig(enabled=False)),
    ("deepspeed every=1", CheckpointingConfig(enabled=True, every=1, impl="deepspeed")),
    ("deepspeed every=2", CheckpointingConfig(enabled=True, every=2, impl="deepspeed")),
    ("deepspeed every=3", CheckpointingConfig(enabled=True, every=3, impl="deepspeed")),
    ("torch every=1", CheckpointingConfig(enabled=True, every=1, impl="torch")),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--reps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    config = load_config(args.config)
    data = import_object(config.task.data, "task.data")(**config.task.data_args)
    data.setup("fit")
    batches = [tuple(t[i * config.batch_size : (i + 1) * config.batch_size] for t in data.train_set.tensors)
               for i in range(args.reps + args.warmup)]

    torch.manual_seed(config.seed)
    base = import_object(config.task.module, "task.module")(**config.task.module_args)
    runs = []
    for name, cfg in VARIANTS:
        module = copy.deepcopy(base)
        capture_logs(module)
        wrapped = apply_checkpointing(module, cfg)
        runs.append({"name": name, "module": module, "opt": build_optimizer(module), "wrapped": wrapped,
                     "bytes": activation_bytes(module, batches[0]), "times": []})

    # Chen et al.'s prediction: a checkpointed block costs one extra (no-grad) forward.
    # Time each block's forward alone, on the input it sees in training, in the same loop.
    blocks = list(base.checkpoint_blocks())
    inputs: dict[int, tuple] = {}
    hooks = [b.register_forward_pre_hook(lambda mod, a, i=i: inputs.setdefault(i, tuple(t.detach() for t in a)))
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        base(batches[0][0])
    for h in hooks:
        h.remove()
    block_times: list[list[float]] = [[] for _ in blocks]

    for rep, batch in enumerate(batches):
        with torch.no_grad():
            for i, block in enumerate(blocks):
                start = time.perf_counter()
                block(*inputs[i])
                if rep >= args.warmup:
                    block_times[i].append(time.perf_counter() - start)
        for run in runs:  # interleaved: drift affects every variant alike
            module, opt = run["module"], run["opt"]
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            training_loss(module, batch, rep).backward()
            opt.step()
            if rep >= args.warmup:
                run["times"].append(time.perf_counter() - start)

    off = runs[0]
    t_off, b_off = statistics.median(off["times"]), off["bytes"]
    n_blocks = len(base.checkpoint_blocks())
    print(f"charlm {config.task.module_args} batch {config.batch_size}, {n_blocks} blocks, one thread, "
          f"{args.reps} interleaved reps")
    print(f"{'variant':<20}{'blocks':>7}{'step ms':>10}{'time x':>8}{'Chen x':>8}{'act. MiB':>10}{'memory x':>10}")
    for run, (_, cfg) in zip(runs, VARIANTS):
        t = statistics.median(run["times"])
        wrapped = range(0, n_blocks, cfg.every) if cfg.enabled else []
        predicted = 1 + sum(statistics.median(block_times[i]) for i in wrapped) / t_off
        print(f"{run['name']:<20}{run['wrapped']:>7}{1000 * t:>10.2f}{t / t_off:>8.3f}{predicted:>8.3f}"
              f"{run['bytes'] / 2**20:>10.2f}{run['bytes'] / b_off:>10.3f}")
    print("time x: median step time / off; Chen x: 1 + no-grad forward time of the wrapped blocks / off "
          "(one recomputation, no overhead); memory x: activation_bytes / off")


if __name__ == "__main__":
    main()
