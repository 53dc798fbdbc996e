"""The sim backend's run loop: the engine advanced in virtual time, the global model evaluated
at every multiple of ``eval.every_s`` of training clock with the state produced by exactly the
events up to that instant, until the target, the budget or divergence (the TTA rules are
``syncbench.experiments.tta``'s, the same in both backends)."""

from __future__ import annotations

import math
from collections.abc import Callable

from syncbench.experiments.config import RunConfig
from syncbench.experiments.sim.engine import SimEngine
from syncbench.experiments.tta import Evaluation, LoopResult, TTATracker


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
