"""Shared pieces of the dist benchmarks: the ~5M-parameter MLP task (FACTS.md's 5.26M MLP),
raw-torch baselines run in their own processes (compute-only, DistributedDataParallel), and a
helper that runs the dist backend and reads back per-step times. The gloo all-reduce timings and
the alpha-beta fit live in ``syncbench.experiments.procs.calibrate`` (re-exported here).

Every number is measured in the same benchmark run as the number it is compared with; the
machine may be shared, so benchmarks interleave repetitions and report medians.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from syncbench.experiments.classification import ArrayDataModule, ClassifierModule
from syncbench.experiments.procs.calibrate import allreduce_times, fit_alpha_beta  # noqa: F401 - one copy, re-exported

IN, HIDDEN, CLASSES = 1024, 2048, 10
BATCH = 16  # per worker: FACTS.md's regime (about 13 ms compute, 32 ms DDP step at N=2)


def build_mlp() -> nn.Sequential:
    """1024-2048-1024-1024-10: 5,257,226 parameters."""
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1024), nn.ReLU(),
                         nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, CLASSES))


class BenchMLP(ClassifierModule):
    def __init__(self, **optim: Any):
        super().__init__(**optim)
        self.net = build_mlp()

    def forward(self, x):
        return self.net(x)


class RandomData(ArrayDataModule):
    """Seeded Gaussian inputs with a linear teacher's labels (learnable, never the point)."""

    def __init__(self, n_train: int = 16384, n_val: int = 512, val_batch_size: int = 512):
        super().__init__(val_batch_size=val_batch_size)
        self.n_train, self.n_val = n_train, n_val

    def load_arrays(self):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((self.n_train + self.n_val, IN)).astype(np.float32)
        y = (x @ rng.standard_normal((IN, CLASSES))).argmax(axis=1)
        return x[: self.n_train], y[: self.n_train], x[self.n_train :], y[self.n_train :]


def bench_config(strategy: str = "sync", workers: int = 2, budget_s: float = 6.0, **extra: Any):
    """A run config for the benchmark task; the target is unreachable, so runs end at the budget."""
    from syncbench.experiments.config import apply_overrides, validate_config

    raw = {
        "name": "bench-dist", "batch_size": BATCH, "seed": 0,
        "task": {"module": "benchmarks.dist_common:BenchMLP", "data": "benchmarks.dist_common:RandomData",
                 "module_args": {"lr": 1e-3, "optimizer": "adam"}},
        "target": {"metric": "val_acc", "value": 1.01, "mode": "max"},
        "budget": {"train_time_s": budget_s}, "eval": {"every_s": budget_s},
        "strategy": {"name": strategy},
        "cluster": {"backend": "dist", "workers": workers, "network": {"latency_s": 0.0, "bandwidth_gbps": 1.0e6}},
    }
    return validate_config(apply_overrides(raw, extra))


def run_dist(config: Any, workspace: Path, emulate: str = "none") -> dict[str, Any]:
    """One dist run; returns the RunResult and the per-rank debug dumps."""
    from syncbench.experiments.procs.launcher import execute_dist_run

    debug = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    result = execute_dist_run(config, workspace=workspace, debug_dir=debug, emulate=emulate)
    dumps = [torch.load(debug / f"rank{r}.pt", weights_only=False) for r in range(config.cluster.workers)]
    return {"result": result, "dumps": dumps}


def loop_step_s(dumps: list[dict[str, Any]], skip: int = 5) -> float:
    """Median wall seconds from one step's start to the next (Lightning's loop between steps
    included; the few intervals holding an evaluation are outliers the median ignores), the
    slowest rank."""
    return max(statistics.median(np.diff(d["step_starts"][skip:])) for d in dumps)


def mean_step_s(dumps: list[dict[str, Any]]) -> float:
    """Training-clock seconds per step: (elapsed - excluded) / steps of the slowest rank."""
    rows = dumps[0]["rows"]
    return max((r["elapsed"] - r["excluded"]) / max(1.0, r["steps"]) for r in rows)


def median_step_s(dumps: list[dict[str, Any]], skip: int = 5) -> float:
    """Median wall time of a training step over all ranks (first ``skip`` steps dropped)."""
    times = [t for d in dumps for t in d["step_times"][skip:]]
    return statistics.median(times)


# ------------------------------------------------------------------------------------------
# raw torch baselines, each in fresh processes
# ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(rank: int, n: int, steps: int):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(n * BATCH, IN, generator=g)
    y = torch.randint(0, CLASSES, (n * BATCH,), generator=g)
    return [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(n)]


def timed_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, steps: int,
               warmup: int) -> list[float]:
    """Wall seconds of each step after ``warmup`` (zero_grad, forward, backward, step), on the
    rank's fixed synthetic batches: every raw baseline's loop."""
    import torch.nn.functional as F

    data = _batches(rank, 16, steps)
    times = []
    for i in range(warmup + steps):
        x, y = data[i % len(data)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _raw_worker(kind: str, rank: int, world: int, port: int, steps: int, warmup: int, queue: Any,
                stat: str = "median") -> None:
    from syncbench.experiments.procs.environment import threads_per_worker

    # the intra-op threads our dist workers get on this machine: a baseline with fewer threads
    # than the program it is compared with would measure the thread count, not the harness
    torch.set_num_threads(threads_per_worker(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    if kind != "compute":
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    model = build_mlp()
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = timed_loop(model, opt, rank, steps, warmup)
    queue.put((rank, statistics.mean(times) if stat == "mean" else statistics.median(times)))
    if kind != "compute":
        dist.destroy_process_group()


def raw_step_s(kind: str, world: int = 2, steps: int = 100, warmup: int = 10, stat: str = "median") -> float:
    """Median (or mean) step seconds of ``kind`` = compute (no communication, ``world``
    concurrent processes) | ddp (torch DistributedDataParallel over gloo), max over ranks."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_raw_worker, args=(kind, r, world, port, steps, warmup, queue, stat))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return max(results.values())


def load_note() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"
    except OSError:
        return ""
