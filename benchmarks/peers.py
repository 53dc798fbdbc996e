"""Peers side by side (issue 12 item 4): a peer's implementation on the same model, data and
processes as ours, N=2 over gloo, 5.26M-parameter MLP (``benchmarks.dist_common``).

    python -m benchmarks.peers [--reps 3] [--budget 6] [--steps 120] [--rank 4]

Pairs, interleaved per repetition (peer, ours, peer, ours, ...) and compared by medians:

* local SGD, H = 8: torchft's ``LocalSGD`` (PyPI ``torchft``, a lighthouse and one replica
  group per process) when it imports, else torch's own ``PostLocalSGDOptimizer`` with a
  ``PeriodicModelAverager`` (period 8, no warm-up) -- vs our ``local_sgd`` (H = 8);
* DiLoCo, H = 8, outer SGD lr 0.7, momentum 0.9, Nesterov: torchft's ``DiLoCo`` when it
  imports (no torch equivalent otherwise) -- vs our ``local_sgd`` with ``outer``;
* PowerSGD rank r: torch ``DistributedDataParallel`` with ``powerSGD_hook`` -- vs our ``sync``
  with ``compression: powersgd``: step time and the elements all-reduced per step.

Step time = mean wall seconds per training step (local SGD, DiLoCo: averaging rounds
included) or median (sync/DDP: every step communicates), the slowest rank; ours is the
training clock of the dist backend (Lightning's loop included). Target: ours / theirs <= 1.0.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.dist_common import (
    _free_port,
    timed_loop,
    bench_config,
    build_mlp,
    load_note,
    mean_step_s,
    median_step_s,
    run_dist,
)

H = 8
OUTER = {"lr": 0.7, "momentum": 0.9, "nesterov": True}


def torchft_available() -> bool:
    import importlib

    try:
        importlib.import_module("torchft.local_sgd")  # LocalSGD, DiLoCo
    except Exception:  # noqa: BLE001 - any import failure means: fall back
        return False
    return True


def _peer_worker(kind: str, rank: int, world: int, port: int, steps: int, warmup: int, queue: Any,
                 extra: dict[str, Any]) -> None:
    """One rank of a peer's implementation; puts (rank, step seconds, info)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    torch.manual_seed(0)
    model = build_mlp()
    info: dict[str, Any] = {}
    if kind.startswith("torchft"):
        times = _torchft_rank(kind, rank, model, steps, warmup, extra)
        queue.put((rank, statistics.mean(times), info))
        return
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    if kind == "torch_post_local_sgd":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer

        inner = torch.optim.Adam(model.parameters(), lr=1e-3)
        opt = PostLocalSGDOptimizer(optim=inner, averager=PeriodicModelAverager(period=H, warmup_steps=0))
        times = timed_loop(model, opt, rank, steps, warmup)
        stat = statistics.mean(times)
    elif kind == "ddp_powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        # one bucket, as our codec compresses the whole gradient at once (an explicit cap also
        # sizes DDP's first bucket); with several buckets the hook's P/Q all-reduces of different
        # buckets may interleave differently on the ranks, which gloo does not survive
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=64)
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=extra["rank"],
                                            start_powerSGD_iter=2)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        times = timed_loop(ddp, opt, rank, steps, warmup)
        stat = statistics.median(times)
        _, before, after = state.compression_stats()
        compressed_iters = state.iter - state.start_powerSGD_iter
        info["numel_per_step"] = after / max(1, compressed_iters)
        info["numel_uncompressed"] = before / max(1, compressed_iters)
    else:
        raise ValueError(kind)
    queue.put((rank, stat, info))
    dist.barrier()
    dist.destroy_process_group()


def _torchft_rank(kind: str, rank: int, model: torch.nn.Module, steps: int, warmup: int,
                  extra: dict[str, Any]) -> list[float]:
    """torchft: each process is a replica group of one (its own TCPStore), joined by the lighthouse."""
    from torch.distributed import TCPStore
    from torchft import Manager
    from torchft.local_sgd import DiLoCo, LocalSGD
    from torchft.process_group import ProcessGroupGloo

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = {"model": model, "optim": inner}  # what a recovering replica fetches from a healthy one
    manager = Manager(pg=ProcessGroupGloo(), min_replica_size=2,
                      load_state_dict=lambda sd: [state[k].load_state_dict(v) for k, v in sd.items()],
                      state_dict=lambda: {k: v.state_dict() for k, v in state.items()},
                      replica_id=str(rank), store_addr="127.0.0.1", store_port=store.port, rank=0, world_size=1,
                      lighthouse_addr=extra["lighthouse"], port=0, timeout=datetime.timedelta(seconds=20),
                      use_async_quorum=(kind != "torchft_diloco"))  # DiLoCo requires a synchronous quorum
    try:
        if kind == "torchft_local_sgd":
            with LocalSGD(manager, model, inner, sync_every=H):
                return timed_loop(model, inner, rank, steps, warmup)
        outer = torch.optim.SGD(model.parameters(), **OUTER)
        with DiLoCo(manager, [model], inner, outer, sync_every=H):
            return timed_loop(model, inner, rank, steps, warmup)
    finally:
        manager.shutdown(wait=False)


def peer_step_s(kind: str, steps: int, warmup: int = 8, **extra: Any) -> tuple[float, dict[str, Any]]:
    """Step seconds of a peer's implementation (slowest of the two ranks) and rank 0's info."""
    lighthouse = None
    if kind.startswith("torchft"):
        from torchft._torchft import LighthouseServer

        lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2)
        extra["lighthouse"] = lighthouse.address()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_peer_worker, args=(kind, r, 2, port, steps, warmup, queue, extra)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
        if lighthouse is not None:
            lighthouse.shutdown()
    info = next(i for r, _, i in results if r == 0)
    return max(s for _, s, _ in results), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=6.0, help="training seconds per run of ours")
    parser.add_argument("--steps", type=int, default=120, help="timed steps per peer run (a multiple of 8)")
    parser.add_argument("--rank", type=int, default=4, help="PowerSGD rank")
    parser.add_argument("--only", choices=["local_sgd", "diloco", "powersgd"], action="append")
    args = parser.parse_args()
    ws = Path(tempfile.mkdtemp(prefix="bench-ws-"))
    ft = torchft_available()
    print(f"# peers side by side, 5.26M MLP, batch 16/worker, N=2, gloo; {load_note()}")
    print(f"# local SGD peer: {'torchft LocalSGD' if ft else 'torch PostLocalSGDOptimizer + PeriodicModelAverager'};"
          f" DiLoCo peer: {'torchft DiLoCo' if ft else 'none (torchft not importable)'}")
    pairs = []
    wanted = set(args.only or ["local_sgd", "diloco", "powersgd"])
    if "local_sgd" in wanted:
        pairs.append(("local SGD H=8", "torchft_local_sgd" if ft else "torch_post_local_sgd",
                      bench_config("local_sgd", 2, args.budget, **{"strategy.local_steps": H}), mean_step_s))
    if "diloco" in wanted and ft:
        pairs.append(("DiLoCo H=8", "torchft_diloco",
                      bench_config("local_sgd", 2, args.budget, **{"strategy.local_steps": H,
                                                                  "strategy.outer": OUTER}), mean_step_s))
    if "powersgd" in wanted:
        pairs.append((f"PowerSGD r={args.rank}", "ddp_powersgd",
                      bench_config("sync", 2, args.budget, **{"strategy.compression": "powersgd",
                                                             "strategy.powersgd_rank": args.rank}), median_step_s))
    theirs: dict[str, list[float]] = {p[0]: [] for p in pairs}
    ours: dict[str, list[float]] = {p[0]: [] for p in pairs}
    for rep in range(args.reps):
        for label, kind, config, stat in pairs:
            peer, info = peer_step_s(kind, args.steps, rank=args.rank)
            out = run_dist(config, ws)
            theirs[label].append(peer)
            ours[label].append(stat(out["dumps"]))
            line = (f"rep {rep} {label}: theirs ({kind}) {peer * 1e3:.1f} ms  ours {ours[label][-1] * 1e3:.1f} ms  "
                    f"ratio {ours[label][-1] / peer:.3f}")
            if kind == "ddp_powersgd":
                from syncbench.strategies.compression import PowerSGDCodec, param_shapes

                codec = PowerSGDCodec(param_shapes(build_mlp()), args.rank)
                updates = out["result"].evaluations[-1].updates if out["result"].evaluations else 0
                line += (f"  elements all-reduced/step: theirs {info['numel_per_step']:.0f} "
                         f"ours {codec.wire_numel()} (of {info['numel_uncompressed']:.0f}); "
                         f"ours comm_bytes/update {_bytes_per_update(out):.0f} (updates {updates})")
            print(line, flush=True)
    for label, *_ in pairs:
        t, o = statistics.median(theirs[label]), statistics.median(ours[label])
        print(f"{label}: median step theirs {t * 1e3:.1f} ms, ours {o * 1e3:.1f} ms; ours / theirs = {o / t:.3f}"
              f"   (target <= 1.0)")


def _bytes_per_update(out: dict[str, Any]) -> float:
    result = out["result"]
    ev = result.evaluations[-1] if result.evaluations else None
    if ev is None or not ev.updates:
        return float("nan")
    return ev.metrics.get("comm_bytes", float("nan")) / ev.updates


if __name__ == "__main__":
    main()
