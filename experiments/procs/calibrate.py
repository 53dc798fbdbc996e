"""``syncbench calibrate``: measure this machine (or a torchrun job) on real processes and write
a cluster profile the sim backend can use (``syncbench run|sweep --profile FILE``).

What is measured, with N processes running at once:

* **compute per step** (``cluster.compute.step_s``): the dist backend itself runs the task for
  a few seconds as local SGD with no synchronisation at all (``local_steps`` larger than any
  run), no emulation, an unreachable target; each rank records when every step starts. The
  time from one step's start to the next is one worker step as the dist backend runs it:
  forward, backward, optimizer step *and* Lightning's loop between steps (hooks, batch
  fetch), with N processes competing for the machine -- which is what the sim's ``step_s``
  stands for. The profile holds the mean over the steady state (the clock per update is a
  sum of steps, so the mean is what predicts it); the median is reported alongside.
* **network** (``cluster.network``): gloo all-reduces of several sizes (spanning the task's
  gradient and state sizes) in N fresh processes, fitted to the ring model
  t = 2(N-1)·α + 2(N-1)/N · S/β, and ping-pong point-to-point transfers between two
  processes (the parameter server's push and pull), fitted to t = α + S/β. Both fits minimise
  the relative error, so α is determined by the small sizes and β by the large ones; sizes are
  interleaved so that a burst of load hits all of them alike. ``bandwidth_gbps`` is the
  all-reduce β. ``latency_s`` is the all-reduce α, raised when that is more to the α with
  which the sim's closed-form clock per update equals the dist backend's in its own short sync
  runs at N; ``server_latency_s`` / ``server_bandwidth_gbps`` (the parameter server's link) are
  the point-to-point fit, its α raised likewise to match the dist backend's async runs. For
  small models the framework's per-round work (gloo's threads, the hooks, the server thread's
  Python and its share of rank 0's core) and the jitter between ranks cost more than the
  wire; on 2 cores the async round trip needed several times the all-reduce's α.
* **repeats**: the three dist loops (no communication, sync, async) are timed in ``repeats``
  interleaved passes (default 3) and each quantity is the median over the passes: on a shared
  2-core machine one launch measured up to 15% off the next.

The profile is YAML: ``cluster.compute`` and ``cluster.network`` keys, plus a ``calibration``
section of metadata (host, N, date, torch, every measured number) that ``--profile`` strips
before merging.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from syncbench.experiments.config import (
    ClusterConfig,
    ComputeConfig,
    ConfigError,
    NetworkConfig,
    apply_overrides,
    flatten,
    parse_override,
    read_yaml,
    validate_config,
    without_unread_options,
)
from syncbench.experiments.procs.environment import under_torchrun
from syncbench.strategies.registry import STRATEGIES  # torch-free until a strategy is looked up

# torch, the dist backend, the task, scipy and the cluster model are imported inside the
# functions that measure: `syncbench run|sweep --profile` reads a profile through this module
# before it validates the config, and must not import them then (CLI start-up time)

META_KEY = "calibration"  # metadata section of a profile; stripped by --profile
PROFILE_SECTIONS = ("cluster.compute", "cluster.network")  # what a profile may set
NEVER_SYNC = 10**9  # local_steps of the compute measurement: no averaging ever happens
DEFAULT_SIZES = [1 << 10, 8 << 10, 64 << 10, 512 << 10, 2 << 20, 8 << 20]  # bytes


# ------------------------------------------------------------------------------------------
# alpha-beta fits (pure functions)
# ------------------------------------------------------------------------------------------
def _fit_linear(c_alpha: float, c_bytes: np.ndarray, sizes: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Fit t = c_alpha·α + c_bytes·S/β by least squares on the relative error (each row divided
    by its t), α ≥ 0 and 1/β > 0 enforced; returns (α seconds, β bytes/s)."""
    w = 1.0 / np.maximum(t, 1e-12)
    a = np.stack([np.full_like(sizes, c_alpha), c_bytes * sizes], axis=1) * w[:, None]
    (alpha, inv_beta), *_ = np.linalg.lstsq(a, t * w, rcond=None)
    if alpha < 0:  # latency below the noise: fit the bandwidth alone
        alpha = 0.0
        inv_beta = float(np.sum(a[:, 1] * t * w) / np.sum(a[:, 1] ** 2))
    if inv_beta <= 0:  # no measurable size dependence: latency alone, bandwidth "infinite"
        inv_beta = 1e-15
        alpha = float(np.sum(a[:, 0] * t * w) / np.sum(a[:, 0] ** 2))
    return float(alpha), 1.0 / float(inv_beta)


def fit_alpha_beta(times: dict[int, float], world: int) -> tuple[float, float]:
    """Ring all-reduce model t = 2(N-1)·α + 2(N-1)/N · S/β fitted to ``{bytes: seconds}``
    measured at ``world`` processes: returns (α seconds, β bytes/s)."""
    if world < 2:
        raise ValueError("an all-reduce fit needs at least 2 processes")
    sizes = np.array(sorted(times), dtype=float)
    t = np.array([times[int(s)] for s in sizes])
    return _fit_linear(2 * (world - 1), 2 * (world - 1) / world, sizes, t)


def fit_point_to_point(times: dict[int, float]) -> tuple[float, float]:
    """Point-to-point model t = α + S/β fitted to one-way ``{bytes: seconds}``: (α s, β bytes/s)."""
    sizes = np.array(sorted(times), dtype=float)
    t = np.array([times[int(s)] for s in sizes])
    return _fit_linear(1.0, 1.0, sizes, t)


def gbps(bytes_per_s: float) -> float:
    return bytes_per_s * 8 / 1e9


# ------------------------------------------------------------------------------------------
# timed transfers in fresh processes (gloo)
# ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_allreduce(dist: Any, sizes: list[int], reps: int) -> dict[int, float]:
    """Median seconds of an all-reduce of each size. Sizes are interleaved (one of each per
    repetition), so that a burst of load from other processes hits every size alike instead of
    bending the fit."""
    import torch  # heavy: see the imports

    bufs = {size: torch.zeros(max(1, size // 4)) for size in sizes}
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for i in range(3 + reps):
        for size in sizes:
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(bufs[size])
            if i >= 3:
                times[size].append(time.perf_counter() - t0)
    return {size: statistics.median(ts) for size, ts in times.items()}


def _time_p2p(dist: Any, sizes: list[int], reps: int, rank: int, peer: int) -> dict[int, float]:
    """Ping-pong between rank 0 and ``peer``, sizes interleaved: half the median round trip
    = one transfer (a push or a pull). Other ranks only take part in the barriers."""
    import torch  # heavy: see the imports

    bufs = {size: torch.zeros(max(1, size // 4)) for size in sizes}
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for i in range(3 + reps):
        for size in sizes:
            buf = bufs[size]
            dist.barrier()
            if rank == 0:
                t0 = time.perf_counter()
                dist.send(buf, dst=peer)
                dist.recv(buf, src=peer)
                if i >= 3:
                    times[size].append((time.perf_counter() - t0) / 2)
            elif rank == peer:
                dist.recv(buf, src=0)
                dist.send(buf, dst=0)
    return {size: statistics.median(ts) for size, ts in times.items()} if rank == 0 else {}


def _net_worker(rank: int, world: int, port: int, sizes: list[int], reps: int, out: str) -> None:
    import torch  # heavy: see the imports
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        ar = _time_allreduce(dist, sizes, reps)
        p2p = _time_p2p(dist, sizes, reps, rank, world - 1)
        Path(out).write_text(json.dumps({"allreduce": ar, "p2p": p2p}))
    finally:
        dist.destroy_process_group()


def transfer_times(sizes: list[int], world: int = 2, reps: int = 25) -> tuple[dict[int, float], dict[int, float]]:
    """(all-reduce seconds by size: the slowest rank's median; one-way point-to-point seconds
    by size) measured in ``world`` fresh gloo processes on this machine (``python -m
    syncbench.experiments.procs.calibrate --net-worker ...``: no dependence on the caller's main module)."""
    if world < 2:
        raise ValueError("timing transfers needs at least 2 processes")
    port = _free_port()
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    with tempfile.TemporaryDirectory(prefix="syncbench-net-") as tmp:
        outs = [Path(tmp) / f"rank{r}.json" for r in range(world)]
        procs = [subprocess.Popen([sys.executable, "-m", "syncbench.experiments.procs.calibrate", "--net-worker", str(r),
                                   str(world), str(port), ",".join(map(str, sizes)), str(reps), str(outs[r])],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for r in range(world)]
        errors = []
        try:
            for p in procs:
                _, err = p.communicate(timeout=300)
                if p.returncode != 0:
                    errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if errors:
            raise RuntimeError(f"timing transfers failed: {errors[0]}")
        results = [json.loads(o.read_text()) for o in outs]
    allreduce = {s: max(r["allreduce"][str(s)] for r in results) for s in sizes}
    p2p = {s: results[0]["p2p"][str(s)] for s in sizes}
    return allreduce, p2p


def allreduce_times(sizes: list[int], world: int = 2, reps: int = 25) -> dict[int, float]:
    """Median seconds of one gloo all-reduce of each size (bytes) at ``world`` processes."""
    return transfer_times(sizes, world, reps)[0]


def transfer_times_torchrun(sizes: list[int], reps: int = 25) -> tuple[dict[int, float], dict[int, float]]:
    """As ``transfer_times``, inside a torchrun job (every rank calls it; rank 0 gets the
    numbers): one gloo group over the job's nodes, initialised and destroyed here."""
    import torch  # heavy: see the imports
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        ar = _time_allreduce(dist, sizes, reps)
        p2p = _time_p2p(dist, sizes, reps, rank, world - 1)
        slowest = [torch.tensor([ar[s] for s in sizes], dtype=torch.float64)]
        dist.all_reduce(slowest[0], op=dist.ReduceOp.MAX)
        ar = dict(zip(sizes, slowest[0].tolist()))
        return ar, p2p
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# compute per step: the dist backend's own loop without communication
# ------------------------------------------------------------------------------------------
def measurement_config(config: Any, workers: int, budget_s: float, strategy: str = "compute") -> Any:
    """A measurement run: the task as configured, N dist workers, no stragglers, an unreachable
    target, ``budget_s`` of training clock. ``strategy``: ``compute`` = local SGD that never
    synchronises (no communication at all), ``sync`` or ``async`` = that strategy's rounds."""
    raw = config.model_dump(mode="json")
    unreachable = 1e30 if config.target.mode == "max" else -1e30
    if strategy == "compute":
        chosen = {"strategy.name": "local_sgd", "strategy.local_steps": NEVER_SYNC, "strategy.outer": None,
                  "strategy.warmup_sync_updates": 0}
    else:
        chosen = {"strategy.name": strategy, "strategy.backup_workers": 0, "strategy.max_staleness": None}
    raw = apply_overrides(raw, {
        "name": f"{config.name}-calibrate", **chosen, "strategy.lr_scaling": "none",
        "cluster.backend": "dist", "cluster.workers": workers, "cluster.stragglers": {"kind": "none"},
        "budget.train_time_s": budget_s, "eval.every_s": budget_s, "target.value": unreachable})
    # the configured strategy's own options (outer, compression, ...) mean nothing to the measured one
    return validate_config(without_unread_options(raw), "(calibration run)")


def _dist_run(cfg: Any, tmp: Path, tag: str, debug: bool) -> tuple[Any, Path]:
    from syncbench.experiments.procs.launcher import execute_dist_run  # heavy: see the imports

    ws, debug_dir = tmp / "ws", tmp / f"debug-{tag}"
    result = execute_dist_run(cfg, workspace=ws, tracking_uri=f"sqlite:///{ws / 'mlflow.db'}",
                              debug_dir=debug_dir if debug else None, emulate="none",
                              tags={"syncbench.calibration": tag})
    return result, debug_dir


def measure_loop(config: Any, workers: int, strategy: str = "compute", budget_s: float = 3.0,
                 skip: int = 10) -> dict[str, Any]:
    """The dist backend's loop, N processes at once, no emulation (``strategy``: ``compute`` =
    no communication at all, or ``sync`` / ``async``): ``mean_s`` and ``median_s`` of the
    step-start intervals (first ``skip`` steps dropped, and the rare intervals beyond 10x the
    median that hold something other than a step: a GC pause, the budget's stop decision), the
    slowest rank's; ``clock_per_update_s`` as the run records it."""
    import torch  # heavy: see the imports

    cfg = measurement_config(config, workers, budget_s, strategy)
    with tempfile.TemporaryDirectory(prefix="syncbench-calibrate-") as tmp:
        result, debug = _dist_run(cfg, Path(tmp), strategy, debug=True)
        ranks = [int(os.environ.get("RANK", "0"))] if under_torchrun() else range(cfg.cluster.workers)
        dumps = [torch.load(debug / f"rank{r}.pt", weights_only=False) for r in ranks]
    per_rank = []
    for d in dumps:
        gaps = np.diff(np.asarray(d["step_starts"], dtype=float))
        gaps = gaps[skip:]
        if len(gaps) < 5:
            raise RuntimeError(f"calibration: rank {d['rank']} took only {len(gaps) + skip + 1} steps of "
                               f"{strategy} in {budget_s} s")
        med = float(np.median(gaps))
        kept = gaps[gaps < 10 * med]
        per_rank.append({"rank": int(d["rank"]), "steps": int(len(d["step_starts"])), "median_s": med,
                         "mean_s": float(kept.mean()), "p90_s": float(np.percentile(kept, 90))})
    updates = result.evaluations[-1].updates if result.evaluations else 0
    out = {"mean_s": max(r["mean_s"] for r in per_rank), "median_s": max(r["median_s"] for r in per_rank),
           "clock_per_update_s": result.clock_s / max(1, updates), "ranks": per_rank}
    # the ledgers of every rank (gathered): blocked seconds per step, split into communication
    # (the last arrival's blocked time) and waiting for the slower rank, measured in this run
    rows = dumps[0]["rows"]
    out["comm_per_step_s"] = statistics.mean(r["comm"] / max(1.0, r["steps"]) for r in rows)
    out["wait_per_step_s"] = statistics.mean(r["wait"] / max(1.0, r["steps"]) for r in rows)
    return out


def measure_compute(config: Any, workers: int, budget_s: float = 3.0) -> dict[str, Any]:
    """Seconds per worker step of the dist backend's loop without communication (see measure_loop)."""
    return measure_loop(config, workers, "compute", budget_s)


# ------------------------------------------------------------------------------------------
# the whole calibration and the profile
# ------------------------------------------------------------------------------------------
def payload_sizes(config: Any) -> dict[str, int]:
    """Bytes the strategies move for this task: gradients (sync, async push) and the whole
    float state (local SGD's average, async's pull)."""
    from syncbench.experiments.task import one_thread, prepare_task  # heavy: see the imports
    from syncbench.strategies.tensors import flat_state, trainable

    with one_thread():
        task = prepare_task(config)
    grads = sum(p.numel() * p.element_size() for p in trainable(task.module))
    state = flat_state(task.module)
    return {"gradient_bytes": int(grads), "state_bytes": int(state.numel() * state.element_size())}


def predicted_per_update(strategy: str, workers: int, step_s: float, latency_s: float, bytes_per_s: float,
                         payload: dict[str, int], options: Any = None) -> float | None:
    """The sim's training clock per global update without stragglers, in closed form: the
    strategy's own (``Strategy.clock_per_update``: sync = a step + a ring all-reduce of the
    gradients; local SGD = a step + a ring all-reduce of the state every H steps; async = a
    worker's cycle / N, never less than the server link's time per update), with ``options``
    (default: the strategy's defaults); None for a strategy that has no closed form. For a
    strategy with a parameter server, ``latency_s`` and ``bytes_per_s`` are the server link's."""
    cls = STRATEGIES[strategy]
    options = options if options is not None else cls.options_model()
    return cls.clock_per_update(options, workers, step_s, latency_s, bytes_per_s, payload)


def fit_latency(strategy: str, measured: float, workers: int, step_s: float, bytes_per_s: float,
                payload: dict[str, int]) -> float | None:
    """The alpha (seconds) with which the sim's closed-form clock per update of ``strategy``
    equals the dist backend's ``measured`` one; None when even alpha = 0 predicts more (compute
    alone accounts for it) or the strategy has no closed form."""
    from scipy.optimize import brentq  # heavy: see the imports

    def pred(alpha: float) -> float:
        value = predicted_per_update(strategy, workers, step_s, alpha, bytes_per_s, payload)
        assert value is not None
        return value

    if predicted_per_update(strategy, workers, step_s, 0.0, bytes_per_s, payload) is None:
        return None
    if pred(0.0) >= measured:
        return None
    high = 1e-3
    while pred(high) < measured:  # predictions rise strictly with alpha: one root
        high *= 10
    return float(brentq(lambda a: pred(a) - measured, 0.0, high, xtol=1e-12, rtol=1e-12))


def calibrate(config: Any, workers: int, budget_s: float = 3.0, reps: int = 25, repeats: int = 3,
              log: Any = None, check: bool = True) -> dict[str, Any]:
    """Measure and return the profile (a mapping ready for YAML). The dist loops (no
    communication, sync, async) are timed ``repeats`` times, interleaved, and each quantity is
    the median over the passes: on a shared machine one launch can run 15% off the next. Ends
    (``calibrate_check``) with how busy the machine was and, with ``check`` (not under
    torchrun), the profile's predicted / measured clock per update on the user path."""
    if repeats < 1:
        raise ValueError(f"repeats {repeats}: must be at least 1")
    import torch  # heavy: see the imports

    from syncbench.experiments.procs import calibrate_check

    say = log or (lambda msg: None)
    load_before, loads_after = calibrate_check.load_average(), []
    torchrun = under_torchrun()
    if torchrun:
        workers = int(os.environ["WORLD_SIZE"])
    payload = payload_sizes(config)
    sizes = sorted(set(DEFAULT_SIZES) | {max(4, payload["gradient_bytes"]), max(4, payload["state_bytes"])})
    say(f"timing gloo all-reduce and point-to-point transfers of {len(sizes)} sizes at N={workers} ...")
    if torchrun:
        ar_times, p2p_times = transfer_times_torchrun(sizes, reps)
    else:
        ar_times, p2p_times = transfer_times(sizes, workers, reps)
    alpha, beta = fit_alpha_beta(ar_times, workers)
    p_alpha, p_beta = fit_point_to_point(p2p_times) if p2p_times else (float("nan"), float("nan"))
    say(f"transfers: all-reduce fit alpha {alpha * 1e6:.1f} us, beta {gbps(beta):.3g} Gbit/s; point-to-point "
        f"fit alpha {p_alpha * 1e6:.1f} us, beta {gbps(p_beta):.3g} Gbit/s")
    round_budget = max(1.0, budget_s * 2 / 3)
    say(f"timing the dist backend's loop with {workers} processes at once, {repeats} interleaved passes: no "
        f"communication {budget_s:g} s, then sync and async rounds {round_budget:g} s each ...")
    passes = []
    for i in range(repeats):
        one = {"compute": measure_compute(config, workers, budget_s),
               **{s: measure_loop(config, workers, s, round_budget) for s in ("sync", "async")}}
        passes.append(one)
        loads_after.append(calibrate_check.load_average())
        say(f"pass {i + 1}/{repeats}: step mean {one['compute']['mean_s'] * 1e3:.3f} ms; per update sync "
            f"{one['sync']['clock_per_update_s'] * 1e3:.3f} ms, async {one['async']['clock_per_update_s'] * 1e3:.3f} ms")
    compute = {"mean_s": statistics.median(p["compute"]["mean_s"] for p in passes),
               "median_s": statistics.median(p["compute"]["median_s"] for p in passes),
               "ranks": [p["compute"]["ranks"] for p in passes]}
    step_s = compute["mean_s"]
    say(f"compute per step: mean {step_s * 1e3:.3f} ms, median {compute['median_s'] * 1e3:.3f} ms "
        f"(the dist backend's loop included, {workers} processes at once; medians of {repeats} passes)")
    measured = {s: statistics.median(p[s]["clock_per_update_s"] for p in passes) for s in ("sync", "async")}
    # Each alpha is the wire's, raised to the per-message time the dist backend's own rounds
    # need when that is larger: for small models the framework's per-round work and the jitter
    # between ranks cost more than the wire, and the runs' ledgers cannot say how much (gradient
    # buckets are reduced while backward runs, so most of a sync round's cost shows up as slower
    # compute). latency_s (the all-reduce of sync and local SGD) is fitted to the sync rounds;
    # server_latency_s (the parameter server's link) to the async rounds, whose server thread
    # shares rank 0's process and core with a worker: on 2 cores that round trip cost several
    # times the all-reduce's alpha, which one alpha for both could not describe.
    if not math.isfinite(p_beta) or p_beta <= 0:
        p_alpha, p_beta = alpha, beta  # no point-to-point timings: the all-reduce fit stands in
    sync_alpha = fit_latency("sync", measured["sync"], workers, step_s, beta, payload)
    async_alpha = fit_latency("async", measured["async"], workers, step_s, p_beta, payload)
    latency, server_latency = max(alpha, sync_alpha or 0.0), max(p_alpha, async_alpha or 0.0)
    links = {"sync": (latency, beta), "async": (server_latency, p_beta)}
    wire = {"sync": (alpha, beta), "async": (p_alpha, p_beta)}
    # the predicted/measured check: every measured strategy with a closed form for its clock
    raw_pred = {s: p for s in measured if (p := predicted_per_update(s, workers, step_s, *wire[s], payload)) is not None}
    new_pred = {s: p for s in measured if (p := predicted_per_update(s, workers, step_s, *links[s], payload)) is not None}
    for s in sorted(set(measured) - set(raw_pred)):
        say(f"{s}: no closed form for its clock per update (Strategy.clock_per_update); skipped in the "
            "predicted/measured check")
    fmt = lambda d: ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in d.items())  # noqa: E731
    fmt_a = lambda a: "none (compute alone accounts for it)" if a is None else f"{a * 1e6:.0f} us"  # noqa: E731
    note = (f"latency_s = {latency * 1e6:.0f} us: the larger of the all-reduce fit of timed transfers "
            f"({alpha * 1e6:.0f} us) and what the dist backend's own sync rounds need ({fmt_a(sync_alpha)}); "
            f"server_latency_s = {server_latency * 1e6:.0f} us: the larger of the point-to-point fit "
            f"({p_alpha * 1e6:.0f} us, {gbps(p_beta):.3g} Gbit/s) and what its async rounds need "
            f"({fmt_a(async_alpha)}: the server thread shares rank 0's process with a worker). Sim per update "
            f"with the wire fits {fmt(raw_pred)}; with the profile {fmt(new_pred)}; dist measured {fmt(measured)}.")
    say(note)

    def model_vs_measured(times: dict[int, float], fn: Any) -> dict[int, list[float]]:
        return {int(s): [float(times[s]), float(fn(s))] for s in sorted(times)}

    # With stragglers whose factors go below 1 (lognormal), the dist backend's emulation pads
    # each step to f x a base step that fast steps can still reach: the measured step over the
    # factors' 1st percentile (syncbench.experiments.procs.emulation.Emulation). The sim must be timed on
    # that same base for the two clocks to describe one cluster.
    from syncbench.experiments.cluster_model import StragglerModel  # heavy: see the imports

    low = StragglerModel(config.cluster.stragglers, workers, config.seed).low_factor()
    profile_step_s = step_s / low
    if low < 1.0:
        say(f"stragglers {config.cluster.stragglers.kind}: step_s = {step_s * 1e3:.3f} ms / {low:.3f} "
            f"(the factors' 1st percentile) = {profile_step_s * 1e3:.3f} ms, the dist emulation's base step")

    from syncbench.experiments.procs.calibrate_codecs import codec_profile_keys, measure_codecs

    codecs = measure_codecs(config, workers)
    say("codecs, encode + decode per MB for one worker of " + str(workers) + ": " +
        ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in codecs.items()))
    ring = lambda s: 2 * (workers - 1) * alpha + 2 * (workers - 1) / workers * s / beta  # noqa: E731
    p2p = lambda s: p_alpha + s / p_beta  # noqa: E731
    profile = {
        "cluster": {
            "compute": {"step_s": float(f"{profile_step_s:.6g}"), **codec_profile_keys(config, codecs)},
            "network": {"latency_s": float(f"{latency:.6g}"), "bandwidth_gbps": float(f"{gbps(beta):.6g}"),
                        "server_latency_s": float(f"{server_latency:.6g}"),
                        "server_bandwidth_gbps": float(f"{gbps(p_beta):.6g}")},
        },
        META_KEY: {
            "host": socket.gethostname(), "platform": platform.platform(), "date": datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "workers": int(workers), "launcher": "torchrun" if torchrun else "local",
            "config": config.name, "task": config.task.module, "batch_size": int(config.batch_size),
            "step_s": {"mean": step_s, "median": compute["median_s"], "straggler_low_factor": low,
                       "source": "mean step-start interval of the dist backend's loop without communication",
                       "ranks": compute["ranks"]},
            "payload": payload,
            "codec_s_per_mb": {"by_codec": codecs, "workers": int(workers), "source": "one worker's encode + its N "
                               "decodes (all-gather codecs) per MB of the task's gradients (calibrate_codecs)"},
            "allreduce_fit": {"latency_s": alpha, "bandwidth_gbps": gbps(beta),
                              "seconds_measured_vs_model": model_vs_measured(ar_times, ring)},
            "point_to_point_fit": {"latency_s": p_alpha, "bandwidth_gbps": gbps(p_beta),
                                   "seconds_measured_vs_model": model_vs_measured(p2p_times, p2p)},
            "dist_clock_per_update_s": measured,
            "passes": [{"step_mean_s": p["compute"]["mean_s"], "step_median_s": p["compute"]["median_s"],
                        **{f"{s}_clock_per_update_s": p[s]["clock_per_update_s"] for s in ("sync", "async")}}
                       for p in passes],
            "sim_clock_per_update_s": {"with_profile": new_pred, "with_wire_fits": raw_pred},
            "latency_needed_s": {"sync": sync_alpha, "async": async_alpha},
            "latency_source": "max(all-reduce fit, what the dist backend's sync rounds need)",
            "server_latency_source": "max(point-to-point fit, what the dist backend's async rounds need)",
            "note": note,
        },
    }
    per_pass = {"compute step": [p["compute"]["mean_s"] for p in passes],
                **{f"{s} clock per update": [p[s]["clock_per_update_s"] for p in passes] for s in ("sync", "async")}}
    calibrate_check.finish(profile, META_KEY, config, workers, load_before, loads_after, per_pass,
                           round_budget if check and not torchrun else None, say)
    return profile


def profile_yaml(profile: dict[str, Any]) -> str:
    head = ("# syncbench cluster profile, written by `syncbench calibrate`.\n"
            "# Merge it with `syncbench run|sweep ... --profile THIS_FILE` (`--set` still wins);\n"
            f"# the `{META_KEY}:` section is metadata and is not merged.\n")
    return head + yaml.safe_dump(_plain(profile), sort_keys=False)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, str):
        return str(obj)  # torch.__version__ is a str subclass
    return obj


# ------------------------------------------------------------------------------------------
# reading a profile (--profile FILE)
# ------------------------------------------------------------------------------------------
def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    """The profile's config keys as ``{dotted key: value}`` (metadata stripped). Raises
    ``ConfigError`` naming the key for anything but known ``cluster.compute`` /
    ``cluster.network`` keys, and for values of the wrong type."""
    raw = read_yaml(path)
    raw.pop(META_KEY, None)
    flat = flatten(raw)
    if not flat:
        raise ConfigError(f"profile {path}: no config keys (expected cluster.compute / cluster.network keys)")
    sections = {"cluster.compute": ComputeConfig, "cluster.network": NetworkConfig}
    assert tuple(sections) == PROFILE_SECTIONS
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, field = key.rpartition(".")
        model = sections.get(section)
        if model is None or field not in model.model_fields:
            known = [f"{s}.{f}" for s, m in sections.items() for f in m.model_fields]
            what = "unknown key" if model is not None or not key.startswith("cluster.") or \
                key.split(".")[1] not in ClusterConfig.model_fields else "not a profile key"
            raise ConfigError(f"profile {path}: {key}: {what} (a profile sets only {', '.join(known)}; "
                              f"metadata goes under `{META_KEY}:`)")
        try:
            model.model_validate({field: value})
        except ValidationError as exc:
            raise ConfigError(f"profile {path}: {key}: {exc.errors()[0]['msg']} (got {value!r})") from None
        out[key] = value
    return out


def profile_overrides(path: str | os.PathLike) -> list[str]:
    """The profile as ``--set``-style ``KEY=VALUE`` items (values written as YAML and checked to
    read back identically), to go before the user's own ``--set`` items so that those win."""
    items = []
    for key, value in load_profile(path).items():
        text = yaml.safe_dump([value], default_flow_style=True).strip()[1:-1]
        item = f"{key}={text}"
        assert parse_override(item) == (key, value), (item, value)
        items.append(item)
    return items


def check_writable(path: str | os.PathLike) -> Path:
    """``--out``: refuse (``ConfigError``) a path that cannot be written, before measuring."""
    out = Path(path).expanduser().resolve()
    if out.is_dir():
        raise ConfigError(f"--out {path}: is a directory; give a file name, e.g. {Path(path) / 'profile.yaml'}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {path}: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ConfigError(f"--out {path}: not writable")
    return out


if __name__ == "__main__":  # one process of ``transfer_times``
    _, flag, rank_, world_, port_, sizes_, reps_, out_ = sys.argv
    assert flag == "--net-worker", sys.argv
    _net_worker(int(rank_), int(world_), int(port_), [int(x) for x in sizes_.split(",")], int(reps_), out_)
