"""The time-to-accuracy rules (after MLPerf Training and DAWNBench), the same in both backends.

The training clock is the strategy's clock (virtual in the sim backend, wall seconds less
evaluation in the dist backend). The global model is evaluated at every multiple of
``eval.every_s`` of training clock (excluded from the clock); TTA is the clock of the first
evaluation that meets the target. A run that never meets it is censored at the budget; a
NaN/inf loss stops it at once as ``diverged``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from syncbench.experiments.config import RunConfig
from syncbench.strategies.lightning_bridge import is_finite


@dataclass
class Evaluation:
    """One point of the curves."""

    clock_s: float
    updates: int
    samples: int
    metrics: dict[str, float]  # what the module logged in validation_step, and our own counters


@dataclass
class LoopResult:
    outcome: str  # reached | budget | diverged
    evaluations: list[Evaluation] = field(default_factory=list)
    tta_s: float | None = None
    samples_to_target: int | None = None
    updates_to_target: int | None = None
    best_val: float | None = None
    final_val: float | None = None
    clock_s: float = 0.0


class TTATracker:
    """The TTA rules applied to a run's evaluations, in either backend: the first evaluation
    meeting the target ends the run as reached; a non-finite target metric (or a non-finite
    training loss seen since the last evaluation) as diverged; an evaluation at or past the
    budget as censored -- a target met only after the budget is not reached."""

    def __init__(self, config: RunConfig):
        self.target, self.budget = config.target, config.budget.train_time_s
        self.result = LoopResult(outcome="budget")

    def observe(self, ev: Evaluation, diverged: bool = False) -> str | None:
        """Record one evaluation; returns the outcome when the run must stop, else None."""
        res, target = self.result, self.target
        res.evaluations.append(ev)
        res.clock_s = ev.clock_s
        value = ev.metrics.get(target.metric)
        if value is None:
            raise ValueError(f"target.metric: {target.metric!r} was not logged by validation_step")
        if is_finite(value):
            res.final_val = value
            if res.best_val is None or target.better(value, res.best_val):
                res.best_val = value
        if diverged or not is_finite(value):
            res.outcome = "diverged"
        elif ev.clock_s > self.budget:
            res.outcome = "budget"
        elif target.met(value):
            res.outcome = "reached"
            res.tta_s, res.samples_to_target, res.updates_to_target = ev.clock_s, ev.samples, ev.updates
        elif ev.clock_s >= self.budget:
            res.outcome = "budget"
        else:
            return None
        return res.outcome
