"""Local SGD (H=8) on the dist backend vs a compute-only step at N=2, 5.26M-parameter MLP.

    python -m benchmarks.dist_local_sgd [--reps 3] [--budget 6]

Three numbers per repetition, interleaved:
* compute-only: raw torch forward/backward/Adam in two concurrent processes, no communication;
* local SGD H=inf: the dist backend with averaging never due (Lightning's loop + our hooks);
* local SGD H=8: one flat parameter all-reduce every 8 steps.
Target: local SGD H=8 / H=inf <= 1.15 -- the baseline is the same program with only its
communication switched off (averaging never due), so the ratio is the cost of averaging every 8
steps. Both are training-clock seconds per local step ((elapsed - evaluation) / steps, averaging
rounds and Lightning's loop between steps included). The raw compute-only step is printed for
context (Lightning's loop and our hooks: H=inf / compute-only).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.dist_common import bench_config, load_note, mean_step_s, raw_step_s, run_dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=6.0)
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    ws = Path(tempfile.mkdtemp(prefix="bench-ws-"))
    print(f"# local SGD vs compute-only, 5.26M MLP, batch 16/worker, N=2, gloo; {load_note()}")
    compute, no_avg, local = [], [], []
    for rep in range(args.reps):
        compute.append(raw_step_s("compute", 2, args.steps, stat="mean"))
        out = run_dist(bench_config("local_sgd", 2, args.budget, **{"strategy.local_steps": 10**9}), ws)
        no_avg.append(mean_step_s(out["dumps"]))
        out = run_dist(bench_config("local_sgd", 2, args.budget, **{"strategy.local_steps": 8}), ws)
        local.append(mean_step_s(out["dumps"]))
        rounds = out["dumps"][0]["rounds"]
        print(f"rep {rep}: compute-only {compute[-1] * 1e3:.1f} ms  local SGD H=inf {no_avg[-1] * 1e3:.1f} ms  "
              f"H=8 {local[-1] * 1e3:.1f} ms ({rounds} averages)  ratio {local[-1] / no_avg[-1]:.3f}", flush=True)
    c, n, l_ = (statistics.median(v) for v in (compute, no_avg, local))
    print(f"median step: compute-only {c * 1e3:.1f} ms, local SGD H=inf {n * 1e3:.1f} ms, H=8 {l_ * 1e3:.1f} ms")
    print(f"local SGD H=8 / H=inf (communication switched off) = {l_ / n:.3f}   (target <= 1.15)")
    print(f"  context: Lightning's loop + hooks (H=inf / raw compute-only) = {n / c:.3f}, H=8 / raw = {l_ / c:.3f}")


if __name__ == "__main__":
    main()
