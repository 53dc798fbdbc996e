"""What the ranks of a dist run record at its end: every rank's ledger gathered, rank 0's outcome
told to all, and rank 0's one MLflow run for the trial (into the launcher's run, or a new one
under torchrun), with compute / comm / wait aggregated over the ranks as mean (``time_wait_s``)
and max (``time_wait_max_s``); ``result.json``, through which rank 0 hands its ``RunResult``
to the launcher."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from syncbench.experiments.recording import RunRecorder, open_client
from syncbench.experiments.result import RunResult, record_finished_run
from syncbench.experiments.tta import Evaluation


def open_recorder(attach: dict[str, Any] | None, create: dict[str, Any] | None) -> Any:
    if create is not None:
        return RunRecorder(create["client"], create["experiment_id"], create["run_name"], tags=create["tags"],
                           parent_run_id=create["parent_run_id"])
    assert attach is not None
    return AttachedRecorder(open_client(attach["tracking_uri"]), attach["run_id"], attach["start_ms"])


class AttachedRecorder(RunRecorder):
    """A ``RunRecorder`` on a run the launcher created (same buffering, names and timestamps)."""

    def __init__(self, client: Any, run_id: str, start_ms: int):  # noqa: D401 - no run is created
        # as in RunRecorder: MLflow is imported when a run is recorded, not when the backends are
        from mlflow.entities import Metric, Param, RunTag

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.client, self.run_id, self.start_ms = client, run_id, int(start_ms)
        self.log_seconds = 0.0
        self._metrics = []
        self._finished = False


LEDGER_FIELDS = ("elapsed", "comm", "wait", "excluded", "unsettled", "prev_eval", "steps", "pad_compute", "pad_comm")


def gather_ledgers(worker: Any, comm: Any) -> list[dict[str, float]]:
    """Every rank's final ledger (one all_gather on the gloo group); the last round's blocked
    time is split here with the same rule as during the run."""
    led = worker.ledger
    mine = torch.tensor([led.elapsed(), led.comm, led.wait, led.excluded,
                         -1.0 if led.unsettled is None else led.unsettled, worker.prev_eval_s, float(led.steps),
                         led.pad_compute, led.pad_comm], dtype=torch.float64)
    if comm.world > 1:
        out = [torch.zeros_like(mine) for _ in range(comm.world)]
        dist.all_gather(out, mine, group=comm.ctrl)
    else:
        out = [mine]
    rows = [dict(zip(LEDGER_FIELDS, t.tolist())) for t in out]
    pending = [r["unsettled"] for r in rows if r["unsettled"] >= 0]
    comm_s = min(pending) if pending else 0.0
    for i, row in enumerate(rows):
        if row["unsettled"] >= 0:
            blocked = row["unsettled"]
            c = min(blocked, comm_s)
            wait = blocked - c
            skip = min(wait, row["prev_eval"]) if i != 0 else 0.0
            row["comm"] += c
            row["wait"] += wait - skip
            row["excluded"] += skip
        row["compute"] = max(0.0, row["elapsed"] - row["comm"] - row["wait"] - row["excluded"])
    return rows


def final_outcome(worker: Any, comm: Any) -> str:
    """Rank 0's outcome, told to every rank (one broadcast at the very end)."""
    codes = ["reached", "budget", "diverged"]
    t = torch.tensor([codes.index(worker.stop_outcome) if worker.stop_outcome in codes else 1], dtype=torch.int64)
    if comm.world > 1:
        dist.broadcast(t, src=0, group=comm.ctrl)
    return codes[int(t)]


def record_run(config: Any, recorder: Any, monitor: Any, worker: Any, strategy: Any, rows: list[dict[str, float]],
               wall0: float, activation_bytes: int | None, memory: dict[str, float] | None = None) -> RunResult:
    """Rank 0: the finished run recorded whole (``record_finished_run``) with the ranks' time
    ledgers aggregated (mean and max), ``memory`` (``peak_mem_bytes`` on CUDA) and ``ranks.json``;
    returns the run's ``RunResult``."""
    res = monitor.result
    led = worker.ledger
    first_step_wall = time.time() - led.elapsed() if led.t_first is not None else time.time()
    init_s = max(0.0, first_step_wall - wall0)
    steps = [max(1.0, r["steps"]) for r in rows]
    step_time = sum(r["compute"] / s for r, s in zip(rows, steps)) / len(rows)
    last = res.evaluations[-1] if res.evaluations else None
    updates = last.updates if last else 0
    result = RunResult(**vars(res), run_id=recorder.run_id, init_s=init_s, step_time_s=step_time,
                       extra=strategy.summary_metrics())
    summary: dict[str, float] = dict(memory or {})
    for name in ("compute", "comm", "wait"):
        values = [r[name] for r in rows]
        summary[f"time_{name}_s"] = sum(values) / len(values)
        summary[f"time_{name}_max_s"] = max(values)
    artifacts = {"ranks.json": json.dumps(rows, indent=1), **strategy.artifacts()}
    record_finished_run(recorder, config, result, updates, activation_bytes, artifacts, lambda: time.time() - wall0,
                        summary)
    return result


def dump_debug(directory: Path, rank: int, worker: Any, strategy: Any, rows: list[dict[str, float]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"rank": rank, "events": worker.ledger.events, "step_times": worker.ledger.step_times,
                "step_starts": worker.ledger.step_starts,
                "rows": rows, **strategy.debug_state()}, directory / f"rank{rank}.pt")


def result_to_json(result: Any) -> dict[str, Any]:
    data = {k: v for k, v in vars(result).items() if k != "evaluations"}
    data["evaluations"] = [dataclasses.asdict(ev) for ev in result.evaluations]
    return data


def result_from_json(result_cls: type, data: dict[str, Any]) -> Any:
    evaluations = [Evaluation(**ev) for ev in data.pop("evaluations", [])]
    return result_cls(**data, evaluations=evaluations)
