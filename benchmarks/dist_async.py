"""Asynchronous parameter server vs sync on the dist backend: global updates per second at
N=2, 5.26M-parameter MLP over gloo.

    python -m benchmarks.dist_async [--reps 3] [--budget 6]

Sync applies one update per round of N gradients; the parameter server applies every
gradient on arrival (each one a push of the gradient and a pull of θ, 21 MB each way).
Printed: updates/s of each, their ratio, samples/s, and the measured staleness.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.dist_common import BATCH, bench_config, load_note, run_dist


def _rate(out: dict) -> tuple[float, float]:
    """(updates/s, samples/s) on the training clock."""
    dumps = out["dumps"]
    row0 = dumps[0]["rows"][0]
    clock = row0["elapsed"] - row0["excluded"]
    if "version" in dumps[0]:
        updates = dumps[0]["version"]
        samples = updates * BATCH
    else:
        updates = row0["steps"]
        samples = updates * BATCH * len(dumps)
    return updates / clock, samples / clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=6.0)
    args = parser.parse_args()
    ws = Path(tempfile.mkdtemp(prefix="bench-ws-"))
    print(f"# async PS vs sync updates/s, 5.26M MLP, batch 16/worker, N=2, gloo; {load_note()}")
    sync_u, async_u, sync_s, async_s, stale = [], [], [], [], []
    for rep in range(args.reps):
        u, s = _rate(run_dist(bench_config("sync", 2, args.budget), ws))
        sync_u.append(u)
        sync_s.append(s)
        out = run_dist(bench_config("async", 2, args.budget), ws)
        u, s = _rate(out)
        async_u.append(u)
        async_s.append(s)
        stale.append(out["result"].extra.get("staleness_mean", float("nan")))
        per_rank = [int(r["steps"]) for r in out["dumps"][0]["rows"]]
        print(f"rep {rep}: sync {sync_u[-1]:.1f} updates/s  async {async_u[-1]:.1f} updates/s "
              f"(gradients per rank {per_rank}, staleness mean {stale[-1]:.2f})  "
              f"ratio {async_u[-1] / sync_u[-1]:.2f}", flush=True)
    su, au = statistics.median(sync_u), statistics.median(async_u)
    print(f"median: sync {su:.1f} updates/s ({statistics.median(sync_s):.0f} samples/s), "
          f"async {au:.1f} updates/s ({statistics.median(async_s):.0f} samples/s)")
    print(f"async / sync updates/s = {au / su:.2f}; staleness mean {statistics.median(stale):.2f}")


if __name__ == "__main__":
    main()
