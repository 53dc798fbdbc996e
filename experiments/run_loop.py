"""The time-to-accuracy loop (after MLPerf Training and DAWNBench).

The training clock is the strategy's virtual clock. The global model is evaluated at
every multiple of ``eval.every_s`` of training clock (excluded from the clock), with the
state produced by exactly the events up to that instant; TTA is the clock of the first
evaluation that meets the target. A run that never meets it is censored at the budget;
a NaN/inf loss stops it at once as ``diverged``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from syncbench.experiments.config import RunConfig
from syncbench.experiments.sim.engine import SimEngine
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


EvaluateFn = Callable[[SimEngine], dict[str, float]]


def train_to_target(config: RunConfig, engine: SimEngine, evaluate: EvaluateFn,
                    on_eval: Callable[[Evaluation], None] | None = None) -> LoopResult:
    """Advance ``engine`` in virtual time until the target, the budget or divergence."""
    budget, every = config.budget.train_time_s, config.eval.every_s
    tracker = TTATracker(config)
    k = 1  # index of the next evaluation: at min(k * every, budget)

    def evaluate_at(clock: float) -> str | None:
        metrics = evaluate(engine)
        engine.observe_evaluation(metrics)
        ledger = engine.ledger
        train_loss = engine.take_train_loss()
        updates, samples = engine.counters()
        metrics.update({
            "clock_s": clock,
            "samples": float(samples),
            "time_compute_s": float(ledger.compute.mean()),
            "time_comm_s": float(ledger.comm.mean()),
            "time_wait_s": float(ledger.wait.mean()),
            "comm_bytes": float(ledger.comm_bytes),
        })
        if train_loss is not None:
            metrics["train_loss"] = train_loss
        metrics.update(engine.curve_metrics())
        ev = Evaluation(clock, updates, samples, metrics)
        outcome = tracker.observe(ev, diverged=engine.diverged)
        if on_eval:
            on_eval(ev)
        return outcome

    while True:
        if engine.diverged:  # stop at once: evaluate the state the divergence left
            evaluate_at(min(engine.clock, min(k * every, budget)))
            break
        t_next = engine.next_time()
        if t_next <= min(k * every, budget):
            engine.advance()
            continue
        if evaluate_at(min(k * every, budget)) or math.isinf(t_next):
            break
        k += 1
    return tracker.result
