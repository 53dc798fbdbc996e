"""Fidelity of the simulator: does the sim backend, calibrated on this machine, predict the
dist backend's sync step time at N=2 within ±20%? 5.26M-parameter MLP over gloo.

    python -m benchmarks.dist_fidelity [--reps 3] [--budget 6]

Calibration, as the sim does it:
* ``step_s``: ``experiments.run.calibrate_step_s`` — the median forward/backward/optimizer
  step of the module at the per-worker batch size, one thread, in this process. Reported
  alongside: the compute-only step measured with N=2 concurrent processes (the condition the
  dist workers run in: both cores busy), which is what a sweep on this machine should pin;
* network: a gloo all-reduce at N=2 timed for sizes 64 KB..32 MB in two processes, fitted to
  the ring model t = 2(N-1)·α + 2(N-1)/N · S/β (least squares) -> ``latency_s`` = α,
  ``bandwidth_gbps`` = 8β/1e9.
Prediction: the sim backend's sync round for the same config (N=2) with that ``step_s`` and
network pinned (the first update's virtual time: slowest compute + ring all-reduce of the
gradients). Measurement: the dist backend's median wall seconds from one step's start to the
next (Lightning's loop included, evaluation intervals ignored by the median).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.dist_common import (
    allreduce_times,
    bench_config,
    fit_alpha_beta,
    load_note,
    loop_step_s,
    raw_step_s,
    run_dist,
)


def sim_step_s(step_s: float, latency_s: float, bandwidth_gbps: float, task) -> float:
    """The sim backend's own prediction: the virtual time of the first sync update (slowest
    compute + ring all-reduce of the gradients) with the pinned step_s and network."""
    from experiments.run import build_simulation

    config = bench_config("sync", 2, 1.0, **{"cluster.backend": "sim", "cluster.compute.step_s": step_s,
                                              "cluster.network.latency_s": latency_s,
                                              "cluster.network.bandwidth_gbps": bandwidth_gbps})
    engine = build_simulation(config, task, step_s)
    while engine.counters()[0] < 1:
        engine.advance()
    return engine.clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=6.0)
    args = parser.parse_args()
    from experiments.run import calibrate_step_s, one_thread, prepare_task

    ws = Path(tempfile.mkdtemp(prefix="bench-ws-"))
    print(f"# sim-vs-dist fidelity, sync, 5.26M MLP, batch 16/worker, N=2, gloo; {load_note()}")
    config = bench_config("sync", 2, args.budget)
    with one_thread():
        task = prepare_task(config)
    sizes = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20]
    pred_one, pred_two, measured = [], [], []
    for rep in range(args.reps):
        with one_thread():
            step_one = calibrate_step_s(task, config, warmup=5, measured=30)
        step_two = raw_step_s("compute", 2, 60)
        times = allreduce_times(sizes, 2)
        alpha, beta = fit_alpha_beta(times, 2)
        gbps = beta * 8 / 1e9
        pred_one.append(sim_step_s(step_one, alpha, gbps, task))
        pred_two.append(sim_step_s(step_two, alpha, gbps, task))
        measured.append(loop_step_s(run_dist(config, ws)["dumps"]))
        print(f"rep {rep}: step_s {step_one * 1e3:.1f} ms (1 process) / {step_two * 1e3:.1f} ms (2 concurrent); "
              f"all-reduce fit alpha {alpha * 1e6:.0f} us, beta {gbps:.2f} Gbit/s (16 MB in "
              f"{times[16 << 20] * 1e3:.1f} ms); sim {pred_one[-1] * 1e3:.1f} / {pred_two[-1] * 1e3:.1f} ms/update, "
              f"dist {measured[-1] * 1e3:.1f} ms/update -> sim/dist {pred_one[-1] / measured[-1]:.3f} / "
              f"{pred_two[-1] / measured[-1]:.3f}", flush=True)
    p1, p2, m = statistics.median(pred_one), statistics.median(pred_two), statistics.median(measured)
    print(f"median: dist measures {m * 1e3:.1f} ms/update; sim predicts {p1 * 1e3:.1f} ms/update with the sim's "
          f"own step_s calibration, {p2 * 1e3:.1f} ms/update with step_s from 2 concurrent processes")
    print(f"sim / dist = {p1 / m:.3f} (sim calibration), {p2 / m:.3f} (2-process calibration)   "
          f"(target 0.80 .. 1.20)")


if __name__ == "__main__":
    main()
