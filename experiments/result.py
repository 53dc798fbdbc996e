"""A run's result and what every run records at its end, whatever its backend and however it
ended (docs/metrics.md, "One run"): the summary metrics, the outcome, config.yaml, the
curve and the strategy's artifacts, for a finished run and for one a signal stopped."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field

from syncbench.experiments import signals
from syncbench.experiments.config import RunConfig
from syncbench.experiments.recording import RunRecorder
from syncbench.experiments.tta import Evaluation, LoopResult


SUMMARY_KEYS = ("tta_s", "samples_to_target", "updates_to_target", "best_val", "final_val")


@dataclass
class RunResult(LoopResult):
    """A run's outcome and TTA figures (``LoopResult``), with what the run around it measured."""

    outcome: str = "failed"  # reached | budget | diverged | failed | pruned
    run_id: str | None = None
    init_s: float = 0.0
    wall_s: float = 0.0
    step_time_s: float = 0.0
    mlflow_log_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def summary_line(self) -> str:
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        parts = [f"outcome={self.outcome}", f"tta_s={fmt(self.tta_s, '.2f')}",
                 f"samples_to_target={fmt(self.samples_to_target, 'd')}",
                 f"updates_to_target={fmt(self.updates_to_target, 'd')}",
                 f"best_val={fmt(self.best_val, '.4f')}"]
        if "staleness_mean" in self.extra:
            parts.append(f"staleness_mean={self.extra['staleness_mean']:.2f}")
        if self.error:
            parts.append(f"error={self.error}")
        return " ".join(parts)


def curve_csv(evaluations: list[Evaluation]) -> str:
    keys = sorted({k for ev in evaluations for k in ev.metrics} - {"clock_s"})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["clock_s", "updates", *keys])
    for ev in evaluations:
        writer.writerow([f"{ev.clock_s:.6f}", ev.updates, *(ev.metrics.get(k, "") for k in keys)])
    return out.getvalue()


def record_stopped_run(recorder: RunRecorder, config: RunConfig, loop: LoopResult | None, signum: int, *,
                       init_s: float | None = None, step_time_s: float | None = None,
                       activation_bytes: int | None = None, extra: dict[str, float] | None = None,
                       wall_s: float | None = None, artifacts: dict[str, str] | None = None) -> None:
    """End a run that a signal stopped: flush every buffered value, record the summary
    metrics known so far (no TTA: the run did not get to its outcome), ``config.yaml`` and
    the curve so far, tags ``outcome=killed`` and ``syncbench.signal``, status KILLED.
    Best effort beyond the flush: the process is on its way out."""
    name = signals.signal_name(signum)
    loop = loop or LoopResult(outcome="killed")
    last = loop.evaluations[-1] if loop.evaluations else None
    summary: dict[str, float] = {"reached": 0.0}
    for key, value in (("best_val", loop.best_val), ("final_val", loop.final_val), ("init_s", init_s),
                       ("step_time_s", step_time_s), ("wall_s", wall_s)):
        if value is not None:
            summary[key] = float(value)
    if activation_bytes is not None:
        summary["activation_bytes"] = float(activation_bytes)
    summary.update(extra or {})
    if last is not None and last.updates:
        summary["clock_per_update_s"] = last.clock_s / last.updates
    try:
        recorder.metrics(summary, step=last.updates if last else 0, clock_s=loop.clock_s)
        recorder.set_tags({"outcome": "killed", "syncbench.signal": name,
                           "syncbench.error": f"stopped by {name} after {loop.clock_s:.3g} s of training clock "
                                              f"({len(loop.evaluations)} evaluations)"})
        recorder.log_text(config.to_yaml(), "config.yaml")
        recorder.log_text(curve_csv(loop.evaluations), "curve.csv")
        for filename, text in (artifacts or {}).items():
            recorder.log_text(text, filename)
    finally:
        recorder.finish("KILLED")


def record_finished_run(recorder: RunRecorder, config: RunConfig, result: RunResult, updates: int,
                        activation_bytes: int | None, artifacts: dict[str, str], wall_s: Callable[[], float],
                        extra_summary: dict[str, float] | None = None) -> None:
    """Record what every finished run records, whatever its backend (docs/metrics.md,
    "One run"): the summary metrics, the outcome tag, config.yaml, curve.csv and the
    strategy's artifacts; then end the run FINISHED."""
    summary = {k: getattr(result, k) for k in SUMMARY_KEYS if getattr(result, k) is not None}
    summary.update(reached=float(result.outcome == "reached"), init_s=result.init_s, step_time_s=result.step_time_s,
                   activation_bytes=float(activation_bytes or 0), **result.extra, **(extra_summary or {}))
    if updates:
        summary["clock_per_update_s"] = result.clock_s / updates
    recorder.metrics(summary, step=updates, clock_s=result.clock_s)
    recorder.set_tags({"outcome": result.outcome})
    recorder.log_text(config.to_yaml(), "config.yaml")
    recorder.log_text(curve_csv(result.evaluations), "curve.csv")
    for name, text in artifacts.items():
        recorder.log_text(text, name)
    result.wall_s = wall_s()
    recorder.metrics({"wall_s": result.wall_s, "mlflow_log_s": recorder.log_seconds}, clock_s=result.clock_s)
    recorder.finish("FINISHED")
    result.mlflow_log_s = recorder.log_seconds
