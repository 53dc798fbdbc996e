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

from experiments.config import RunConfig
from experiments.lightning_bridge import is_finite
from strategies.base import SimStrategy


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


EvaluateFn = Callable[[SimStrategy], dict[str, float]]


def train_to_target(config: RunConfig, strategy: SimStrategy, evaluate: EvaluateFn,
                    on_eval: Callable[[Evaluation], None] | None = None) -> LoopResult:
    """Advance ``strategy`` in virtual time until the target, the budget or divergence."""
    target, budget, every = config.target, config.budget.train_time_s, config.eval.every_s
    ctx = strategy.ctx
    result = LoopResult(outcome="budget")
    k = 1  # index of the next evaluation: at min(k * every, budget)

    def eval_time() -> float:
        return min(k * every, budget)

    def record(clock: float) -> Evaluation:
        metrics = evaluate(strategy)
        ledger = ctx.ledger
        train_loss = ctx.take_train_loss()
        metrics.update({
            "clock_s": clock,
            "samples": float(strategy.stats.samples),
            "time_compute_s": float(ledger.compute.mean()),
            "time_comm_s": float(ledger.comm.mean()),
            "time_wait_s": float(ledger.wait.mean()),
            "comm_bytes": float(ledger.comm_bytes),
        })
        if train_loss is not None:
            metrics["train_loss"] = train_loss
        metrics.update(strategy.extra_metrics())
        ev = Evaluation(clock, strategy.stats.updates, strategy.stats.samples, metrics)
        result.evaluations.append(ev)
        value = metrics.get(target.metric)
        if value is not None and is_finite(value):
            result.final_val = value
            if result.best_val is None or target.better(value, result.best_val):
                result.best_val = value
        if on_eval:
            on_eval(ev)
        return ev

    while True:
        if ctx.diverged:
            record(min(strategy.clock, eval_time()))
            result.outcome = "diverged"
            break
        t_next = strategy.next_time()
        if t_next <= eval_time():
            strategy.advance()
            continue
        clock = eval_time()
        ev = record(clock)
        value = ev.metrics.get(target.metric)
        if value is None:
            raise ValueError(f"target.metric: {target.metric!r} was not logged by validation_step")
        if not is_finite(value):
            result.outcome = "diverged"
            break
        if target.met(value):
            result.outcome = "reached"
            result.tta_s, result.samples_to_target, result.updates_to_target = clock, ev.samples, ev.updates
            break
        if clock >= budget or math.isinf(t_next):
            break
        k += 1
    result.clock_s = result.evaluations[-1].clock_s
    return result
