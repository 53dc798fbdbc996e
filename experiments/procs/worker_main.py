"""One worker process started by the launcher:
``python -m syncbench.experiments.procs.worker_main --worker SPEC --rank R`` (a fresh interpreter),
or ``worker_main`` called in a process forked from the launcher's forkserver. It starts its
heartbeat first, then trains its rank (``syncbench.experiments.procs.rank.run_worker``) and reports
a failure to the launcher in the control directory."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from syncbench.experiments import signals
from syncbench.experiments.procs.control import write_json
from syncbench.experiments.procs.heartbeat import FileHeartbeat


def set_pdeathsig() -> None:
    """Linux: die with the launcher (no orphans even if the launcher is SIGKILLed)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="syncbench.experiments.procs.worker_main")
    parser.add_argument("--worker", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_pdeathsig()
    # the launcher passes SIGTERM/SIGINT on to stop the run in order (rank 0 records it
    # KILLED); a repeat (the launcher's and the terminal's) does not cut that short
    signals.install(armed=True, second_exits=False)
    signals.unblock()  # in case a parent blocked them
    spec = json.loads(Path(args.worker).read_text())
    control = Path(spec["control"])
    heartbeat = FileHeartbeat(control / f"hb.{args.rank}", spec.get("launcher_pid"))
    code = 1
    try:
        # torch, the config and the rank's main are imported only now, after the heartbeat has
        # started: the launcher watches a worker's start-up by its heartbeat
        import torch

        from syncbench.experiments.config import RunConfig
        from syncbench.experiments.procs.rank import run_worker

        torch.set_num_threads(args.threads)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        config = RunConfig.model_validate(spec["config"])
        run_worker(config, rank=args.rank, world=config.cluster.workers, local_world=config.cluster.workers,
                   wall0=spec["wall0"], emulate=tuple(spec["emulate"]), debug_dir=spec["debug_dir"],
                   attach={"tracking_uri": spec["tracking_uri"], "run_id": spec["run_id"],
                           "start_ms": spec["start_ms"]},
                   control=control, heartbeat=heartbeat, progress=spec["progress"],
                   activation_bytes=spec["activation_bytes"], max_steps=spec.get("max_steps"))
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, which marks the run
        with contextlib.suppress(Exception):
            write_json(control / f"error.{args.rank}.json",
                       {"message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        traceback.print_exc()
    finally:
        heartbeat.stop()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
