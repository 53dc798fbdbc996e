"""Sync (dist backend: Lightning Trainer + our bucketed, overlapped all-reduce) vs torch
DistributedDataParallel on the same 5.26M-parameter MLP at N=2 over gloo, and both vs a
compute-only step (two concurrent processes, no communication).

    python -m benchmarks.dist_sync_vs_ddp [--reps 3] [--budget 6]

Target: sync / DDP <= 1.05. Repetitions are interleaved (DDP, sync, DDP, sync, ...) and the
medians compared, so that a shared machine's load drifts into both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.dist_common import bench_config, load_note, loop_step_s, median_step_s, raw_step_s, run_dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=6.0, help="training seconds per sync run")
    parser.add_argument("--steps", type=int, default=120, help="timed steps per raw baseline")
    args = parser.parse_args()
    ws = Path(tempfile.mkdtemp(prefix="bench-ws-"))
    print(f"# sync (dist) vs DDP, 5.26M MLP, batch 16/worker, N=2, gloo; {load_note()}")
    compute, ddp, sync, loop = [], [], [], []
    for rep in range(args.reps):
        compute.append(raw_step_s("compute", 2, args.steps))
        ddp.append(raw_step_s("ddp", 2, args.steps))
        out = run_dist(bench_config("sync", 2, args.budget), ws)
        sync.append(median_step_s(out["dumps"]))
        loop.append(loop_step_s(out["dumps"]))
        print(f"rep {rep}: compute-only {compute[-1] * 1e3:.1f} ms  DDP {ddp[-1] * 1e3:.1f} ms  "
              f"sync {sync[-1] * 1e3:.1f} ms/step ({loop[-1] * 1e3:.1f} with Lightning's loop)  "
              f"ratio {sync[-1] / ddp[-1]:.3f} ({loop[-1] / ddp[-1]:.3f})", flush=True)
    c, d, s, l_ = (statistics.median(v) for v in (compute, ddp, sync, loop))
    print(f"median step: compute-only {c * 1e3:.1f} ms, DDP {d * 1e3:.1f} ms, sync {s * 1e3:.1f} ms "
          f"({l_ * 1e3:.1f} ms including Lightning's loop between steps)")
    print(f"sync / DDP = {s / d:.3f} step, {l_ / d:.3f} including the loop   (target <= 1.05)")
    print(f"DDP / compute-only = {d / c:.2f}, sync / compute-only = {s / c:.2f}")


if __name__ == "__main__":
    main()
