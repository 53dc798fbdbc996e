"""Testing four common claims on one sweep's data.

Each claim gets a verdict (``syncbench.analysis.verdicts``: supported, refuted, inconclusive,
underpowered, not testable), the numbers behind it and the test used.

p-values are Holm-Bonferroni adjusted across the settings of a claim (each alternative
separately), and verdicts use the adjusted values.

Comparisons are made within a *variant* (grid keys other than strategy and workers held
equal) and, for strategy comparisons, at equal worker count N >= 2 (at N = 1 sync and async
are both plain SGD). A claim's overall verdict combines its comparisons: supported if at
least one is supported and none refuted, refuted in the mirror case, inconclusive otherwise.
Censored runs enter as described in ``syncbench.analysis.stats``: +inf for ranks and medians, the
budget only as a lower bound on a spread.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from syncbench.analysis.reader import RunRecord, SweepData, variant_label, variant_sort_key
from syncbench.analysis.stats import (
    ALPHA,
    N_PERM,
    bootstrap_ratio,
    bootstrap_sd_ratio,
    brown_forsythe,
    censored_median,
    cv,
    holm,
    log_sd_lower_bound,
    mann_whitney,
    min_p_brown_forsythe,
    min_p_mann_whitney,
    mlperf_mean,
    seeds_needed,
    spearman_trend,
)
from syncbench.analysis.verdicts import (
    INCONCLUSIVE,
    NOT_TESTABLE,
    REFUTED,
    SUPPORTED,
    UNDERPOWERED,
    Claim,
    Row,
    combine,
    fmt,
    fmt_ci,
    fmt_p,
    fmt_p_adj,
    fmt_tta,
    summarize,
)

SLOWDOWN_MARGIN = 1.05  # claim (d): "without slowing training" = at most 5% slower step time
MIN_SEEDS_COMPARE = 2  # per strategy, for (b)
MIN_SEEDS_SPREAD = 3  # per strategy, for (c)


def min_p_spearman(counts: list[int]) -> float:
    """The smallest one-sided permutation p of Spearman's rho between the worker count and a
    measure, with ``counts`` runs at each worker count: only the orderings that keep every
    run of a larger N above every run of a smaller one reach rho's maximum, prod(c!) / n!
    of them (with at least 1 / (N_PERM + 1) when the test samples permutations)."""
    n = sum(counts)
    p = math.prod(math.factorial(c) for c in counts) / math.factorial(n)
    return p if math.factorial(n) <= N_PERM + 1 else max(p, 1 / (N_PERM + 1))


def _variant_label(variant: tuple) -> str:
    return variant_label(variant)


def _where(n: int | None, variant: tuple) -> str:
    parts = [f"N={n}"] if n is not None else []
    if variant:
        parts.append(_variant_label(variant))
    return ", ".join(parts) or "all runs"


def _by_variant(runs: list[RunRecord]) -> dict[tuple, list[RunRecord]]:
    out: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in runs:
        out[r.variant].append(r)
    return out


# ---------------------------------------------------------------------------------------
# (a) synchronous waiting grows with the number of workers


def claim_sync_wait(sweep: SweepData) -> Claim:
    claim = Claim(
        key="a", title="Synchronous waiting grows with the number of workers",
        measure="share of the workers' time spent waiting for the slowest gradient (time_wait_s / "
                "(time_compute_s + time_comm_s + time_wait_s), mean over workers, whole run), sync runs",
        test="Spearman rank correlation between N and the wait share over all sync runs (one point per run), "
             "one-sided permutation p-value (exact for small sweeps), Holm-adjusted across variants",
        rule=f"supported when rho > 0 with p <= {ALPHA}; refuted when rho < 0 with p <= {ALPHA} (one-sided the other "
             f"way), or when the wait share is identical at every N (no growth); inconclusive otherwise",
        columns=["worker counts", "mean wait share by N", "Spearman rho", "p (rho > 0)", "runs"],
        how_to_test="a sweep with strategy.name: sync at >= 3 worker counts (e.g. cluster.workers: [1, 2, 4, 8]), "
                    ">= 3 seeds, and stragglers (cluster.stragglers: {kind: lognormal, sigma: 0.5})",
    )
    sync = [r for r in sweep.usable_runs if r.strategy == "sync" and r.wait_share is not None]
    tests = []  # (row, x, y, up, down) of the settings with a test
    for variant, runs in _by_variant(sync).items():
        ns = sorted({r.workers for r in runs})
        label = _variant_label(variant) or "all sync runs"
        by_n = {n: [r.wait_share for r in runs if r.workers == n] for n in ns}
        shares = "; ".join(f"N={n}: {100 * float(np.mean(v)):.1f}%" for n, v in by_n.items())
        values = {"worker counts": ", ".join(map(str, ns)), "mean wait share by N": shares, "Spearman rho": "—",
                  "p (rho > 0)": "—", "runs": str(len(runs))}
        if len(ns) < 2 or len(runs) < 3:
            claim.rows.append(Row(label, NOT_TESTABLE, values, "needs sync runs at >= 2 worker counts (>= 3 runs)"))
            continue
        x = [r.workers for r in runs]
        y = [r.wait_share for r in runs]
        if np.ptp(y) == 0:
            stragglers = {r.params.get("cluster.stragglers.kind", "?") for r in runs}
            note = f"the wait share is {100 * y[0]:.1f}% at every N: it does not grow"
            if stragglers == {"none"}:
                note += (" (this sweep has no stragglers: simulated sync workers with equal step times never "
                         "wait; the claim concerns heterogeneous workers)")
            claim.rows.append(Row(label, REFUTED, values, note))
            continue
        row = Row(label, INCONCLUSIVE, values)
        claim.rows.append(row)
        tests.append((row, x, y, spearman_trend(x, y, "greater"), spearman_trend(x, y, "less")))
    m = len(tests)
    adj_up = holm([t[3].pvalue for t in tests])
    adj_down = holm([t[4].pvalue for t in tests])
    for (row, x, y, up, down), p_up, p_down in zip(tests, adj_up, adj_down):
        values = row.values
        values["Spearman rho"] = fmt(up.statistic)
        values["p (rho > 0)"] = fmt_p_adj(up.pvalue, p_up, m)
        counts = sorted(Counter(x).values())
        if m * min_p_spearman(counts) > ALPHA:
            row.verdict = UNDERPOWERED
            row.needs_seeds = seeds_needed(lambda k, _k: min_p_spearman([k] * len(counts)), m)
            row.note = (f"{len(x)} runs at {len(counts)} worker counts: the smallest one-sided permutation p of "
                        f"Spearman's rho is {fmt_p(min_p_spearman(counts))}" + (f" (x {m} settings, Holm)" if m > 1 else ""))
            claim.power.append(f"({claim.key}) {row.label}: {row.note}; needs >= {row.needs_seeds} seeds per worker count")
        elif up.statistic > 0 and p_up <= ALPHA:
            row.verdict = SUPPORTED
        elif up.statistic < 0 and p_down <= ALPHA:
            row.verdict = REFUTED
            values["p (rho > 0)"] += f" (p(rho < 0) = {fmt_p_adj(down.pvalue, p_down, m)})"
    combine(claim)
    if claim.verdict == NOT_TESTABLE:
        claim.summary = ("Not testable on this sweep: it needs synchronous runs at two or more worker counts. "
                         f"Would test it: {claim.how_to_test}.")
    elif not claim.summary:
        claim.summary = summarize(claim, "mean wait share by N", "sync wait share")
    return claim


# ---------------------------------------------------------------------------------------
# (b) async reaches the target faster than sync; (c) async is less consistent across seeds


def _pairs(sweep: SweepData) -> dict[tuple, dict[str, list[RunRecord]]]:
    """(variant, N) -> {"sync": runs, "async": runs} for N >= 2 where both strategies ran."""
    groups: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in sweep.usable_runs:
        if r.strategy in ("sync", "async"):
            groups[(r.variant, r.workers)][r.strategy].append(r)
    return {k: v for k, v in sorted(groups.items(), key=lambda kv: (variant_sort_key(kv[0][0]), kv[0][1]))
            if k[1] >= 2 and "sync" in v and "async" in v}


def claim_async_faster(sweep: SweepData) -> Claim:
    claim = Claim(
        key="b", title="Asynchronous updates reach the target faster than synchronous ones",
        measure="time-to-accuracy (training clock at the first evaluation meeting the target) of async vs sync "
                "at equal worker count N; censored runs count as slower than any run that reached it",
        test="ratio of median TTA (async / sync) with a 95% percentile-bootstrap interval (stratified resampling, "
             "censored runs kept as +inf); Mann–Whitney U (scipy) with censored runs tied at the top, one-sided "
             "permutation p-value (exact for small groups), Holm-adjusted across the worker counts",
        rule=f"at each N: supported when the whole 95% interval of the ratio is below 1 and the Holm-adjusted "
             f"Mann–Whitney p (async faster) <= {ALPHA}; refuted when the interval is above 1 and the adjusted p "
             f"(async slower) <= {ALPHA}; underpowered when no adjusted p could reach {ALPHA} with these seeds; "
             f"inconclusive otherwise",
        columns=["seeds (async/sync)", "median TTA async (s)", "median TTA sync (s)", "ratio async/sync [95% CI]",
                 "p (async faster)", "p (async slower)"],
        how_to_test="a sweep with strategy.name: [sync, async] at the same worker counts >= 2 "
                    "(e.g. cluster.workers: [2, 4, 8]) and >= 4 seeds",
    )
    pairs = _pairs(sweep)
    tests = []  # (row, a, s, ci, less, greater)
    for (variant, n), group in pairs.items():
        a, s = group["async"], group["sync"]
        label = _where(n, variant)
        budget = max(r.budget for r in a + s)
        ta, ts = [r.tta for r in a], [r.tta for r in s]
        values = {"seeds (async/sync)": f"{len(a)}/{len(s)}",
                  "median TTA async (s)": fmt_tta(censored_median(ta), budget),
                  "median TTA sync (s)": fmt_tta(censored_median(ts), budget),
                  "ratio async/sync [95% CI]": "—", "p (async faster)": "—", "p (async slower)": "—"}
        if min(len(a), len(s)) >= 5:
            ma, ms = mlperf_mean(ta), mlperf_mean(ts)
            values["MLPerf mean async / sync (s)"] = f"{fmt_tta(ma, budget)} / {fmt_tta(ms, budget)}"
        if len(a) < MIN_SEEDS_COMPARE or len(s) < MIN_SEEDS_COMPARE:
            claim.rows.append(Row(label, NOT_TESTABLE, values, f"needs >= {MIN_SEEDS_COMPARE} finished seeds each"))
            continue
        if all(math.isinf(t) for t in ta + ts):
            claim.rows.append(Row(label, INCONCLUSIVE, values, "no run of either strategy reached the target"))
            continue
        row = Row(label, INCONCLUSIVE, values)
        claim.rows.append(row)
        tests.append((row, ta, ts, bootstrap_ratio(ta, ts), mann_whitney(ta, ts, "less"),
                      mann_whitney(ta, ts, "greater")))
    if any("MLPerf mean async / sync (s)" in r.values for r in claim.rows):
        claim.columns.insert(3, "MLPerf mean async / sync (s)")
        for r in claim.rows:
            r.values.setdefault("MLPerf mean async / sync (s)", "n/a (< 5 seeds)")
    m = len(tests)
    adj_less = holm([t[4].pvalue for t in tests])
    adj_greater = holm([t[5].pvalue for t in tests])
    for (row, ta, ts, ci, less, greater), p_less, p_greater in zip(tests, adj_less, adj_greater):
        values = row.values
        values["ratio async/sync [95% CI]"] = fmt_ci(ci.estimate, ci.low, ci.high)
        values["p (async faster)"] = fmt_p_adj(less.pvalue, p_less, m)
        values["p (async slower)"] = fmt_p_adj(greater.pvalue, p_greater, m)
        side = ci.excludes_one()
        floor = min_p_mann_whitney(len(ta), len(ts))
        if m * floor > ALPHA:
            row.verdict = UNDERPOWERED
            row.needs_seeds = seeds_needed(min_p_mann_whitney, m, start=MIN_SEEDS_COMPARE)
            row.note = (f"{len(ta)} vs {len(ts)} seeds: the smallest p a one-sided Mann–Whitney U can reach is "
                        f"{floor:.3g}" + (f", {m * floor:.3g} after Holm over {m} settings" if m > 1 else ""))
            claim.power.append(f"({claim.key}) {row.label}: {row.note}; needs >= {row.needs_seeds} seeds per cell")
        elif side == "below" and p_less <= ALPHA:
            row.verdict = SUPPORTED
        elif side == "above" and p_greater <= ALPHA:
            row.verdict = REFUTED
        elif side and min(less.pvalue, greater.pvalue) <= ALPHA < min(p_less, p_greater):
            row.note = f"significant before, not after the Holm adjustment over {m} settings"
        elif side and min(p_less, p_greater) > ALPHA:
            row.note = "the interval excludes 1 but the rank test is not significant"
    combine(claim)
    if claim.verdict == NOT_TESTABLE:
        claim.summary = ("Not testable on this sweep: it has no worker count N >= 2 with finished sync and async "
                         f"runs. Would test it: {claim.how_to_test}.")
    else:
        claim.summary = summarize(claim, "ratio async/sync [95% CI]", "median TTA async/sync [95% CI]")
    return claim


def claim_async_inconsistent(sweep: SweepData) -> Claim:
    claim = Claim(
        key="c", title="Asynchronous results are less consistent across seeds",
        measure="spread of TTA across seeds within a cell: SD of log TTA (scale-free; ≈ the coefficient of "
                "variation) of async vs sync at equal N. Censored runs are placed at the budget, which makes a "
                "group's spread a lower bound",
        test="ratio of SDs of log TTA (async / sync) with a 95% percentile-bootstrap interval; Brown–Forsythe "
             "test (scipy levene, median-centred) on log TTA, Holm-adjusted across the worker counts; CV of the "
             "reached runs for reference",
        rule=f"at each N (>= {MIN_SEEDS_SPREAD} finished seeds and >= 2 reached per strategy): supported when the "
             f"interval is above 1 and the Holm-adjusted Brown–Forsythe p <= {ALPHA} and sync has no censored run "
             f"(else its spread is only a lower bound); refuted in the mirror case (interval below 1, p <= {ALPHA}, "
             f"async has no censored run); underpowered when the test could not reach {ALPHA} with these seeds "
             f"(fewer than 4 per strategy); inconclusive otherwise",
        columns=["seeds (async/sync)", "CV async", "CV sync", "SD-ratio async/sync [95% CI]", "Brown–Forsythe p",
                 "censored (async/sync)"],
        how_to_test="a sweep with strategy.name: [sync, async] at the same worker counts >= 2 and >= 5 seeds "
                    "(Brown–Forsythe cannot reach 5% with 3 seeds per group: its smallest p is 0.116)",
    )
    tests = []  # (row, ta, ts, la, ls, ci, bf, ca, cs, budget)
    for (variant, n), group in _pairs(sweep).items():
        a, s = group["async"], group["sync"]
        label = _where(n, variant)
        budget = max(r.budget for r in a + s)
        ta, ts = [r.tta for r in a], [r.tta for r in s]
        ca, cs = sum(math.isinf(t) for t in ta), sum(math.isinf(t) for t in ts)
        values = {"seeds (async/sync)": f"{len(a)}/{len(s)}", "CV async": fmt(cv(ta)), "CV sync": fmt(cv(ts)),
                  "SD-ratio async/sync [95% CI]": "—", "Brown–Forsythe p": "—", "censored (async/sync)": f"{ca}/{cs}"}
        if len(a) - ca < 2 or len(s) - cs < 2:
            claim.rows.append(Row(label, NOT_TESTABLE, values, "needs >= 2 seeds reaching the target per strategy"))
            continue
        if min(len(a), len(s)) < MIN_SEEDS_SPREAD:
            need = seeds_needed(min_p_brown_forsythe, 1, start=MIN_SEEDS_SPREAD)
            row = Row(label, UNDERPOWERED, values, f"{len(a)} vs {len(s)} seeds: a spread needs >= "
                                                   f"{MIN_SEEDS_SPREAD} per strategy", needs_seeds=need)
            claim.rows.append(row)
            claim.power.append(f"({claim.key}) {label}: {row.note}; needs >= {need} seeds per cell")
            continue
        la = [budget if math.isinf(t) else t for t in ta]
        ls = [budget if math.isinf(t) else t for t in ts]
        row = Row(label, INCONCLUSIVE, values)
        claim.rows.append(row)
        tests.append((row, ta, ts, la, ls, bootstrap_sd_ratio(la, ls), brown_forsythe(la, ls), ca, cs, budget))
    m = len(tests)
    adjusted = holm([t[6].pvalue for t in tests])
    for (row, ta, ts, la, ls, ci, bf, ca, cs, budget), p_adj in zip(tests, adjusted):
        values = row.values
        values["SD-ratio async/sync [95% CI]"] = fmt_ci(ci.estimate, ci.low, ci.high)
        values["Brown–Forsythe p"] = fmt_p_adj(bf.pvalue, p_adj, m)
        side = ci.excludes_one()
        significant = not math.isnan(p_adj) and p_adj <= ALPHA
        floor = min_p_brown_forsythe(len(ta), len(ts))
        note = ""
        if m * floor > ALPHA:
            row.verdict = UNDERPOWERED
            row.needs_seeds = seeds_needed(min_p_brown_forsythe, m, start=MIN_SEEDS_SPREAD)
            note = (f"{len(ta)} vs {len(ts)} seeds: the smallest p the Brown–Forsythe test can reach is {floor:.3g}"
                    + (f", {m * floor:.3g} after Holm over {m} settings" if m > 1 else ""))
            claim.power.append(f"({claim.key}) {row.label}: {note}; needs >= {row.needs_seeds} seeds per cell")
        elif side == "above" and significant:
            row.verdict = SUPPORTED if cs == 0 else INCONCLUSIVE
            if cs:
                note = "sync has censored runs: its spread is only a lower bound"
        elif side == "below" and significant:
            row.verdict = REFUTED if ca == 0 else INCONCLUSIVE
            if ca:
                note = "async has censored runs: its spread is only a lower bound"
        else:
            row.verdict = INCONCLUSIVE
        if ca or cs:
            note = (note + "; " if note else "") + (
                f"SDs use censored runs at the budget (lower bounds: async ≥ {fmt(log_sd_lower_bound(ta, budget))}, "
                f"sync ≥ {fmt(log_sd_lower_bound(ts, budget))})")
        row.note = note
    combine(claim)
    if claim.verdict == NOT_TESTABLE:
        claim.summary = (f"Not testable on this sweep: it needs >= {MIN_SEEDS_SPREAD} finished seeds (>= 2 reaching the "
                         f"target) of both sync and async at the same worker count >= 2. Would test it: "
                         f"{claim.how_to_test}.")
    else:
        claim.summary = summarize(claim, "SD-ratio async/sync [95% CI]", "spread of log TTA async/sync [95% CI]")
    return claim


# ---------------------------------------------------------------------------------------
# (d) activation checkpointing saves memory without slowing training


def step_time_measured(run: RunRecord) -> bool:
    """Whether the run's step time was measured with its own checkpointing setting: a real
    backend, a step calibrated by the run, or one calibrated by the sweep launcher (once per
    task, where the task includes the checkpointing setting). A step time pinned in the
    config is the same number with and without checkpointing and says nothing about it."""
    if (run.params.get("backend") or run.params.get("cluster.backend")) not in ("sim", None):
        return True
    source = run.tags.get("syncbench.step_s_source")
    if source in ("calibrated", "sweep"):
        return True
    if source == "pinned":
        return False
    return run.params.get("cluster.compute.step_s") in (None, "None", "null")


def _backend(run: RunRecord) -> str:
    return run.params.get("backend") or run.tags.get("syncbench.backend") or run.params.get("cluster.backend") or "sim"


def step_time_evidence(runs: list[RunRecord]) -> tuple[list[float], str]:
    """The independent step-time measurements behind a group of runs, and what they are.

    - ``calibration``: the block medians of each distinct calibration (a sweep's cell shares
      one calibration between its seeds: its medians count once);
    - ``runs``: real processes (dist backend), one measured step time per run;
    - ``single``: runs that recorded only their step time: each distinct number counts once,
      so seeds that share one pinned or calibrated number are one measurement, not k.
    """
    samples: list[float] = []
    kinds: set[str] = set()
    seen_calibrations: set[tuple[float, ...]] = set()
    seen_values: set[float] = set()
    for r in runs:
        value = r.metrics.get("step_time_s")
        if _backend(r) != "sim":
            if value is not None and math.isfinite(value):
                samples.append(float(value))
                kinds.add("runs")
            continue
        measured = r.step_time_samples
        if measured:
            key = tuple(measured)
            if key not in seen_calibrations:
                seen_calibrations.add(key)
                samples.extend(measured)
            kinds.add("calibration")
        elif value is not None and math.isfinite(value) and value not in seen_values:
            seen_values.add(float(value))
            samples.append(float(value))
            kinds.add("single")
    kind = "single" if "single" in kinds or not kinds else ("runs" if kinds == {"runs"} else "calibration")
    return samples, kind


EVIDENCE_TEXT = {"calibration": "calibration block medians", "runs": "measured runs (one step time each)",
                 "single": "recorded step times"}


def claim_checkpointing(sweep: SweepData) -> Claim:
    claim = Claim(
        key="d", title="Activation checkpointing saves memory without slowing training",
        measure="memory (peak_mem_bytes when recorded, else activation_bytes) and step time, checkpointing on vs "
                "off, in cells that differ only in checkpointing.enabled. The step time is tested on its repeated "
                "real measurements: the calibration's block medians (sim; the seeds of a sweep cell share one "
                "calibration, so they add no measurement) or each run's measured step time (dist). TTA ratio for "
                "reference; with analysis.memory_limit_bytes, TTA with the memory saved spent on a larger batch",
        test=f"one-sided Mann–Whitney U (permutation p) of the step-time measurements on vs off x "
             f"{SLOWDOWN_MARGIN:g} (equivalence margin: 'without slowing' = at most {SLOWDOWN_MARGIN - 1:.0%} "
             f"slower), each direction Holm-adjusted across settings; ratios of medians (on / off) with 95% "
             f"percentile-bootstrap intervals",
        rule=f"supported when memory is saved (interval below 1) and the step time is shown below "
             f"{SLOWDOWN_MARGIN:g} x off at the 5% level; refuted when memory is not saved (interval at or above 1) "
             f"or the step time is shown above {SLOWDOWN_MARGIN:g} x off; inconclusive otherwise and whenever the "
             f"step time was pinned in the config; not testable when a side has a single step-time measurement",
        columns=["runs (on/off)", "memory metric", "memory on/off [95% CI]", "step-time measurements (on/off)",
                 "step time on/off [95% CI]", "p slower / p within margin", "TTA on/off [95% CI]"],
        how_to_test="a sweep with grid checkpointing.enabled: [false, true] on a task with several blocks "
                    "(e.g. the char-LM transformer), with cluster.compute.step_s: null so the sweep calibrates each "
                    "setting and records its block medians (or the dist backend); add batch_size to the grid and "
                    "analysis.memory_limit_bytes to the spec to see whether checkpointing pays for itself",
    )
    runs = [r for r in sweep.usable_runs if r.checkpointing is not None]
    if not any(r.checkpointing for r in runs):
        claim.summary = ("Not testable on this sweep: no run has checkpointing.enabled=true. "
                         f"Would test it: {claim.how_to_test}.")
        return claim
    groups: dict[tuple, dict[bool, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        rest = tuple((k, v) for k, v in r.variant if k != "checkpointing.enabled")
        groups[(r.strategy, r.workers, rest)][bool(r.checkpointing)].append(r)
    pending = []  # (row, on samples, off samples, saved, kind) awaiting the Holm-adjusted step-time test
    for (strategy, n, rest), pair in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                             variant_sort_key(kv[0][2]))):
        label = f"{strategy}, " + _where(n, rest)
        on, off = pair.get(True, []), pair.get(False, [])
        values = {c: "—" for c in claim.columns}
        values["runs (on/off)"] = f"{len(on)}/{len(off)}"
        if not on or not off:
            claim.rows.append(Row(label, NOT_TESTABLE, values, "needs runs with checkpointing on and off"))
            continue
        mem_on, mem_off = [r.memory_bytes for r in on], [r.memory_bytes for r in off]
        if any(m is None for m in mem_on + mem_off):
            claim.rows.append(Row(label, INCONCLUSIVE, values, "memory was not recorded for every run"))
            continue
        values["memory metric"] = ", ".join(sorted({m[0] for m in mem_on + mem_off}))
        mem = bootstrap_ratio([m[1] for m in mem_on], [m[1] for m in mem_off])
        values["memory on/off [95% CI]"] = fmt_ci(mem.estimate, mem.low, mem.high)
        s_on, kind_on = step_time_evidence(on)
        s_off, kind_off = step_time_evidence(off)
        values["step-time measurements (on/off)"] = (f"{len(s_on)}/{len(s_off)} "
                                                     f"({EVIDENCE_TEXT[kind_on] if kind_on == kind_off else 'mixed'})")
        if s_on and s_off:
            step = bootstrap_ratio(s_on, s_off)
            values["step time on/off [95% CI]"] = fmt_ci(step.estimate, step.low, step.high)
        if all(math.isinf(r.tta) for r in on + off):
            values["TTA on/off [95% CI]"] = "— (no run reached the target)"
        else:
            tta = bootstrap_ratio([r.tta for r in on], [r.tta for r in off])
            values["TTA on/off [95% CI]"] = fmt_ci(tta.estimate, tta.low, tta.high)
        row = Row(label, INCONCLUSIVE, values)
        claim.rows.append(row)
        if mem.low >= 1:
            row.verdict, row.note = REFUTED, "checkpointing did not reduce memory"
        elif not all(step_time_measured(r) for r in on + off):
            row.note = ("step time was pinned by cluster.compute.step_s, so the simulated clock cannot show the cost "
                        "of recomputation; rerun with cluster.compute.step_s: null or the dist backend")
            claim.step_time_threats.append(f"{label}: the step time was pinned in the config (one number for "
                                           f"checkpointing on and off)")
        elif len(s_on) < 2 or len(s_off) < 2:
            row.verdict = NOT_TESTABLE
            row.note = (f"the step time is a single measurement ({len(s_on)} with checkpointing, {len(s_off)} "
                        f"without; seeds that share one calibrated number are not repeated measurements), so no "
                        f"test of it is possible; rerun the sweep with this version (it records the calibration's "
                        f"block medians) or on the dist backend")
            claim.step_time_threats.append(f"{label}: one step-time number per side ({len(s_on)}/{len(s_off)} "
                                           f"measurements), shared by its seeds")
        else:
            pending.append((row, s_on, s_off, mem.high < 1, kind_on if kind_on == kind_off else "mixed"))
            if "calibration" in (kind_on, kind_off):
                claim.step_time_basis.append(f"{row.label}: {len(s_on)}/{len(s_off)} block medians")
    if pending:
        scaled = [[SLOWDOWN_MARGIN * x for x in off] for _, _, off, _, _ in pending]
        p_slow = [mann_whitney(on, sc, "greater").pvalue for (_, on, _, _, _), sc in zip(pending, scaled)]
        p_fast = [mann_whitney(on, sc, "less").pvalue for (_, on, _, _, _), sc in zip(pending, scaled)]
        adj_slow, adj_fast = holm(p_slow), holm(p_fast)
        m = len(pending)
        for (row, on, off, saved, kind), ps, pf, a_s, a_f in zip(pending, p_slow, p_fast, adj_slow, adj_fast):
            row.values["p slower / p within margin"] = f"{fmt_p_adj(ps, a_s, m)} / {fmt_p_adj(pf, a_f, m)}"
            if a_s < ALPHA:
                row.verdict = REFUTED
                row.note = f"step time is more than {SLOWDOWN_MARGIN - 1:.0%} slower with checkpointing"
            elif saved and a_f < ALPHA:
                row.verdict = SUPPORTED
            elif m * min_p_mann_whitney(len(on), len(off)) > ALPHA:
                row.verdict = UNDERPOWERED
                if kind == "runs":
                    row.needs_seeds = seeds_needed(min_p_mann_whitney, m)
                row.note = (f"{len(on)} vs {len(off)} step-time measurements cannot reach the 5% level after "
                            f"the Holm adjustment over {m} setting(s)")
                claim.power.append(f"claim (d) {row.label}: {len(on)} vs {len(off)} step-time measurements")
    _spend_memory(sweep, runs, claim)
    combine(claim)
    if claim.verdict == NOT_TESTABLE:
        if any(r.values.get("memory on/off [95% CI]", "—") != "—" for r in claim.rows):
            claim.summary = ("Not testable on this sweep: the step time of each setting is a single measurement "
                             "(see the table), so whether checkpointing slows training cannot be tested. "
                             f"Would test it: {claim.how_to_test}.")
        else:
            claim.summary = ("Not testable on this sweep: no cell with checkpointing on has a twin with it off. "
                             f"Would test it: {claim.how_to_test}.")
    else:
        for r in claim.rows:
            r.values["memory, step time"] = (f"memory ×{r.values['memory on/off [95% CI]']}, "
                                              f"step time ×{r.values['step time on/off [95% CI]']}")
        claim.summary = summarize(claim, "memory, step time", "on/off ratios")
    if claim.notes:
        claim.summary += " " + " ".join(claim.notes)
    return claim


def _spend_memory(sweep: SweepData, runs: list[RunRecord], claim: Claim) -> None:
    """Time-to-accuracy with the memory saved spent as a practitioner would: under the spec's
    memory limit, each checkpointing setting at the largest batch_size that fits; does
    checkpointing at its larger batch reach the target sooner (it pays for itself)?"""
    limit = sweep.memory_limit_bytes
    if limit is None:
        return
    groups: dict[tuple, dict[tuple[bool, int], list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.batch_size is None:
            continue
        rest = tuple((k, v) for k, v in r.variant if k not in ("checkpointing.enabled", "batch_size"))
        groups[(r.strategy, r.workers, rest)][(bool(r.checkpointing), r.batch_size)].append(r)
    tests = []  # (label, on runs, off runs, b_on, b_off)
    for (strategy, n, rest), cells in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                              variant_sort_key(kv[0][2]))):
        label = f"{strategy}, " + _where(n, rest)
        best: dict[bool, int | None] = {}
        for enabled in (True, False):
            fits = [b for (e, b), rs in cells.items()
                    if e == enabled and all(r.memory_bytes is not None and r.memory_bytes[1] <= limit for r in rs)]
            best[enabled] = max(fits) if fits else None
        if len({b for _, b in cells}) < 2:
            claim.notes.append(f"Memory spent ({label}): only one batch_size was run, so the memory saved cannot be "
                               f"spent on a larger batch; add batch_size to the grid.")
        elif best[True] is None:
            claim.notes.append(f"Memory spent ({label}): no checkpointed cell fits under the memory limit of "
                               f"{limit:,.0f} bytes.")
        elif best[False] is None:
            claim.notes.append(f"Memory spent ({label}): under the memory limit of {limit:,.0f} bytes only "
                               f"checkpointing fits (batch_size {best[True]}): there it is the only way to train.")
        elif best[True] <= best[False]:
            claim.notes.append(f"Memory spent ({label}): under the memory limit of {limit:,.0f} bytes checkpointing "
                               f"allows no larger batch_size than without it ({best[False]}): the memory saved "
                               f"buys nothing here; it only costs step time.")
        else:
            tests.append((label, cells[(True, best[True])], cells[(False, best[False])], best[True], best[False]))
    if not tests:
        return
    p_faster = [mann_whitney([r.tta for r in on], [r.tta for r in off], "less").pvalue for _, on, off, _, _ in tests]
    p_slower = [mann_whitney([r.tta for r in on], [r.tta for r in off], "greater").pvalue for _, on, off, _, _ in tests]
    m = len(tests)
    for (label, on, off, b_on, b_off), pf, ps, a_f, a_s in zip(tests, p_faster, p_slower, holm(p_faster),
                                                                holm(p_slower)):
        tta = bootstrap_ratio([r.tta for r in on], [r.tta for r in off])
        if a_f < ALPHA:
            verdict = "checkpointing pays for itself: it reaches the target sooner"
        elif a_s < ALPHA:
            verdict = "checkpointing does not pay for itself: it reaches the target later"
        elif m * min_p_mann_whitney(len(on), len(off)) > ALPHA:
            verdict = (f"underpowered: {len(on)} vs {len(off)} seeds cannot reach the 5% level "
                       f"(needs >= {seeds_needed(min_p_mann_whitney, m)} seeds)")
        else:
            verdict = "no difference shown at the 5% level"
        claim.notes.append(
            f"Memory spent ({label}, limit {limit:,.0f} bytes): checkpointing at batch_size {b_on} vs without at "
            f"batch_size {b_off}, the largest that fit: TTA ×{fmt_ci(tta.estimate, tta.low, tta.high)} "
            f"(Mann–Whitney p faster {fmt_p_adj(pf, a_f, m)}, p slower {fmt_p_adj(ps, a_s, m)}): {verdict}.")


CLAIM_TITLES = {"a": "Synchronous waiting grows with the number of workers",
                "b": "Asynchronous updates reach the target faster than synchronous ones",
                "c": "Asynchronous results are less consistent across seeds",
                "d": "Activation checkpointing saves memory without slowing training"}


def evaluate_claims(sweep: SweepData) -> list[Claim]:
    """Every claim; one that raises is reported as not testable with the error, the others stand."""
    out = []
    for key, fn in (("a", claim_sync_wait), ("b", claim_async_faster), ("c", claim_async_inconsistent),
                    ("d", claim_checkpointing)):
        try:
            out.append(fn(sweep))
        except Exception as exc:  # noqa: BLE001 - one part of the report must not sink the rest
            out.append(Claim(key=key, title=CLAIM_TITLES[key], measure="—", test="—", rule="—",
                             summary=f"Could not be computed on this sweep: {type(exc).__name__}: {exc}",
                             error=f"{type(exc).__name__}: {exc}"))
    return out
