"""Time on a rank of the dist backend: the rank's ledger and rank 0's training clock.

Time accounting per rank (seconds since the rank's first training step):
``compute = elapsed - comm - wait - excluded``; ``comm`` includes emulated network padding,
``compute`` includes emulated straggler padding; ``excluded`` is rank 0's evaluation time
(the training clock is paused during evaluation) and, on the other ranks, the part of their
blocking that only waited for rank 0's evaluation.

A blocking collective round is split into communication and waiting after the fact: the
rank that arrives last waits for nobody, so the smallest blocked time over the ranks is the
round's communication time and each rank's excess over it is waiting. Each rank's blocked
time rides in the next round's exchange vector (and the final gather), so the split costs
no extra message.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from syncbench.experiments.config import RunConfig
from syncbench.experiments.tta import Evaluation, TTATracker
from syncbench.strategies.lightning_bridge import LightningModuleLike, evaluate


@dataclass
class RankLedger:
    """Cumulative seconds of one rank since its first training step."""

    t_first: float | None = None
    comm: float = 0.0
    wait: float = 0.0
    excluded: float = 0.0
    pad_compute: float = 0.0
    pad_comm: float = 0.0
    steps: int = 0  # local optimizer steps (or gradients pushed, async)
    unsettled: float | None = None  # blocked seconds of the last round, not yet split
    rounds: int = 0
    events: list[tuple[int, float]] = field(default_factory=list)  # (step, blocked_s) per blocking round
    step_times: list[float] = field(default_factory=list)  # wall seconds of each step (debug only)
    step_starts: list[float] = field(default_factory=list)  # perf_counter at each step's start (debug only)

    def elapsed(self, now: float | None = None) -> float:
        if self.t_first is None:
            return 0.0
        return (now or time.perf_counter()) - self.t_first

    def compute(self, now: float | None = None) -> float:
        return max(0.0, self.elapsed(now) - self.comm - self.wait - self.excluded)

    def vector(self) -> tuple[float, float, float]:
        return self.compute(), self.comm, self.wait

    def block(self, blocked_s: float, keep_events: bool) -> None:
        """A blocking round ended: keep its blocked time until the other ranks' are known."""
        self.unsettled = blocked_s
        self.rounds += 1
        if keep_events:
            self.events.append((self.steps + 1, blocked_s))  # 1-based number of the step it ended

    def settle(self, comm_s: float, excluded_s: float) -> None:
        """Split the last round's blocked time: ``comm_s`` is the round's communication time
        (the last arrival's blocked time); the excess is waiting, less what only waited for
        rank 0's evaluation (``excluded_s``)."""
        if self.unsettled is None:
            return
        blocked, self.unsettled = self.unsettled, None
        comm = min(blocked, max(comm_s, 0.0))
        wait = blocked - comm
        skip = min(wait, max(excluded_s, 0.0))
        self.comm += comm
        self.wait += wait - skip
        self.excluded += skip


class TTAMonitor:
    """The training clock (docs/metrics.md) on rank 0: wall seconds since the first training
    step, evaluation (and its recording) excluded. The global model is evaluated at the first
    step boundary at or after each multiple of ``eval.every_s`` at which the strategy can
    produce it (and once the clock passes the budget); the TTA rules are the run loop's
    ``TTATracker``, the same in both backends."""

    def __init__(self, config: RunConfig, eval_module: LightningModuleLike, val_batches: list[Any],
                 on_eval: Callable[[Evaluation], None] | None = None):
        self.config = config
        self.eval_module = eval_module
        self.val_batches = val_batches
        self.on_eval = on_eval
        self.t0: float | None = None
        self.eval_total = 0.0
        self.next_eval = config.eval.every_s
        self.tracker = TTATracker(config)
        self.result = self.tracker.result  # syncbench.experiments.tta.LoopResult

    def start(self, now: float) -> None:
        if self.t0 is None:
            self.t0 = now

    def clock(self, now: float | None = None) -> float:
        if self.t0 is None:
            return 0.0
        return (now or time.perf_counter()) - self.t0 - self.eval_total

    def due(self) -> bool:
        c = self.clock()
        return c >= self.next_eval or c >= self.config.budget.train_time_s

    def evaluate(self, load: Callable[[LightningModuleLike], None], counters: dict[str, float],
                 diverged: bool = False) -> tuple[str | None, float]:
        """Evaluate the global model (``load`` copies it into the evaluation module);
        returns (outcome or None, seconds spent, to be excluded from the clock)."""
        t_start = time.perf_counter()
        clock = self.clock(t_start)
        load(self.eval_module)
        metrics = evaluate(self.eval_module, self.val_batches)
        metrics.update(counters)
        metrics["clock_s"] = clock
        updates = int(counters.get("updates", 0))
        samples = int(counters.get("samples", 0))
        metrics.pop("updates", None)
        ev = Evaluation(clock, updates, samples, metrics)
        outcome = self.tracker.observe(ev, diverged=diverged)
        every = self.config.eval.every_s
        self.next_eval = (math.floor(clock / every) + 1) * every
        if self.on_eval:
            self.on_eval(ev)
        spent = time.perf_counter() - t_start
        self.eval_total += spent
        return outcome, spent
