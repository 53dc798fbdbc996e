"""The summary table: one row per cell (strategy x workers, and any other grid key).

Per cell, over its seeds (docs/metrics.md; README.md, "What gets measured"):
- TTA: median and min–max; with >= 5 seeds also the MLPerf mean (drop fastest and slowest).
  Censored runs count as slower than every run that reached the target; a median that
  falls on a censored run is reported as "> budget", and a cell with fewer than 2 seeds
  that reached the target gets no median at all.
- speedup = median TTA of the best 1-worker cell (of the same variant) / median TTA;
  scaling efficiency = speedup / N (none for one-worker cells: nothing scales).
- statistical efficiency: samples to target (median, censored as above);
  hardware efficiency: training clock per sample (median over all finished seeds).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from syncbench.analysis.reader import RunRecord, SweepData, strategy_sort_key, variant_label, variant_sort_key
from syncbench.analysis.stats import censored_median, mlperf_mean

MIN_REACHED_FOR_MEDIAN = 2


@dataclass
class CellSummary:
    cell: str
    strategy: str
    workers: int
    variant: tuple[tuple[str, str], ...]
    runs: list[RunRecord]
    n_seeds: int = 0  # finished runs (reached + censored); failed ones are listed separately
    n_reached: int = 0
    n_censored: int = 0  # over budget
    n_diverged: int = 0
    n_failed: int = 0
    budget_s: float = math.nan
    tta_median_s: float | None = None  # finite number, or None (see median_note)
    median_note: str = ""  # why there is no number: "too few reached", "censored"
    tta_min_s: float | None = None
    tta_max_s: float | None = None  # None when the slowest seed is censored
    tta_mlperf_mean_s: float | None = None
    mlperf_note: str = ""
    speedup: float | None = None
    scaling_efficiency: float | None = None
    baseline_cell: str = ""
    samples_to_target_median: float | None = None
    updates_to_target_median: float | None = None
    time_per_sample_s: float | None = None
    seeds: list[int] = field(default_factory=list)

    @property
    def usable(self) -> list[RunRecord]:
        return [r for r in self.runs if r.usable]

    @property
    def variant_label(self) -> str:
        return variant_label(self.variant)

    @property
    def label(self) -> str:
        """``sync, N=8``, then the grid's other keys: the format of every display (run names aside)."""
        base = f"{self.strategy}, N={self.workers}"
        return f"{base}, {self.variant_label}" if self.variant else base


def _median_of(values: Iterable[float]) -> float | None:
    m = censored_median(list(values))
    return None if (math.isnan(m) or math.isinf(m)) else m


def summarize_cells(sweep: SweepData) -> list[CellSummary]:
    by_cell: dict[str, list[RunRecord]] = {}
    for run in sweep.runs:
        by_cell.setdefault(run.cell, []).append(run)
    cells = []
    for cell, runs in by_cell.items():
        first = runs[0]
        s = CellSummary(cell=cell, strategy=first.strategy, workers=first.workers, variant=first.variant, runs=runs)
        usable = s.usable
        s.seeds = sorted(r.seed for r in runs if r.seed is not None)
        s.n_seeds = len(usable)
        s.n_reached = sum(r.reached for r in usable)
        s.n_diverged = sum(r.outcome == "diverged" for r in usable)
        s.n_censored = s.n_seeds - s.n_reached - s.n_diverged
        s.n_failed = len(runs) - len(usable)
        budgets = [r.budget for r in usable if not math.isnan(r.budget)]
        s.budget_s = max(budgets) if budgets else math.nan
        ttas = [r.tta for r in usable]
        reached = [t for t in ttas if math.isfinite(t)]
        if reached:
            s.tta_min_s = min(reached)
            s.tta_max_s = max(reached) if len(reached) == len(ttas) else None
        if s.n_reached < MIN_REACHED_FOR_MEDIAN:
            s.median_note = f"{s.n_reached}/{s.n_seeds} reached: no median"
        else:
            m = censored_median(ttas)
            if math.isinf(m):
                s.median_note = f"censored (> {s.budget_s:g} s)"
            else:
                s.tta_median_s = m
        if s.n_seeds >= 5:
            mm = mlperf_mean(ttas)
            if mm is not None and math.isfinite(mm):
                s.tta_mlperf_mean_s = mm
            else:
                s.mlperf_note = "censored"
        if s.n_reached >= MIN_REACHED_FOR_MEDIAN:
            s.samples_to_target_median = _median_of(r.samples_to_target for r in usable)
            upd = [float(r.metrics.get("updates_to_target", math.inf)) if r.reached else math.inf for r in usable]
            s.updates_to_target_median = _median_of(upd)
        tps = [r.time_per_sample for r in usable if r.time_per_sample is not None]
        s.time_per_sample_s = float(np.median(tps)) if tps else None
        cells.append(s)
    cells.sort(key=lambda c: (variant_sort_key(c.variant), strategy_sort_key(c.strategy), c.workers))
    _add_speedups(cells)
    return cells


def _add_speedups(cells: list[CellSummary]) -> None:
    """Speedup over the best (fastest median) 1-worker cell of the same variant, whatever
    its strategy; the sweep-wide best 1-worker cell when the variant has none."""
    def best(pool: list[CellSummary]) -> CellSummary | None:
        ones = [c for c in pool if c.workers == 1 and c.tta_median_s is not None]
        return min(ones, key=lambda c: c.tta_median_s) if ones else None

    overall = best(cells)
    for c in cells:
        base = best([o for o in cells if o.variant == c.variant]) or overall
        if base is None or c.tta_median_s is None:
            continue
        c.baseline_cell = base.label
        c.speedup = base.tta_median_s / c.tta_median_s
        # speedup / N says how well N workers scale; a one-worker cell has nothing to scale
        # (beside the baseline it is a plain ratio of two one-worker times)
        c.scaling_efficiency = c.speedup / c.workers if c.workers > 1 else None


CSV_COLUMNS = [
    "cell", "strategy", "workers", "variant", "seeds", "n_seeds", "n_reached", "n_censored", "n_diverged", "n_failed",
    "budget_s", "tta_median_s", "tta_median_note", "tta_min_s", "tta_max_s", "tta_max_note", "tta_mlperf_mean_s",
    "speedup", "scaling_efficiency", "baseline_cell", "samples_to_target_median", "updates_to_target_median",
    "time_per_sample_s",
]


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def summary_csv(cells: list[CellSummary]) -> str:
    """Empty fields mean "no number" and the *_note column says why (never the budget)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in cells:
        censored_max = c.tta_max_s is None and c.n_seeds > c.n_reached
        writer.writerow([
            c.cell, c.strategy, c.workers, ",".join(f"{k}={v}" for k, v in c.variant), " ".join(map(str, c.seeds)), c.n_seeds, c.n_reached,
            c.n_censored, c.n_diverged, c.n_failed, _num(c.budget_s if math.isfinite(c.budget_s) else None),
            _num(c.tta_median_s), c.median_note, _num(c.tta_min_s), _num(c.tta_max_s),
            f"censored (> {c.budget_s:g} s)" if censored_max else "", _num(c.tta_mlperf_mean_s),
            _num(c.speedup), _num(c.scaling_efficiency), c.baseline_cell, _num(c.samples_to_target_median),
            _num(c.updates_to_target_median), _num(c.time_per_sample_s),
        ])
    return out.getvalue()
