"""Statistics with censoring (syncbench.analysis.stats) and the claim decision rules on small,
hand-checkable samples."""

from __future__ import annotations

import math

import pytest

from syncbench.analysis import stats

INF = math.inf


def test_censored_median_treats_censored_runs_as_slower_than_any_reached_one():
    assert stats.censored_median([3.0, 1.0, 2.0]) == 2.0
    assert stats.censored_median([1.0, 2.0, INF]) == 2.0  # the censored run is the slowest
    assert stats.censored_median([1.0, 3.0, INF, INF]) == INF  # the median is censored: no number
    assert stats.censored_median([1.0, 3.0, 5.0, INF]) == 4.0


def test_mlperf_mean_drops_fastest_and_slowest_and_needs_five_runs():
    assert stats.mlperf_mean([1, 2, 3, 4]) is None
    assert stats.mlperf_mean([10, 1, 2, 3, 4]) == pytest.approx(3.0)
    assert stats.mlperf_mean([1, 2, 3, 4, INF]) == pytest.approx(3.0)  # the censored run is dropped as slowest
    assert stats.mlperf_mean([1, 2, 3, INF, INF]) == INF


def test_safe_ratio_bounds_censored_medians_in_the_right_direction():
    assert stats.safe_ratio(1.0, 2.0) == 0.5
    assert stats.safe_ratio(INF, 2.0) == INF
    assert stats.safe_ratio(1.0, INF) == 0.0
    assert stats.safe_ratio(INF, INF) == 1.0


def test_bootstrap_ratio_interval_excludes_one_only_for_separated_groups():
    fast, slow = [1.0, 1.1, 0.9, 1.05], [2.0, 2.2, 1.9, 2.1]
    ci = stats.bootstrap_ratio(fast, slow)
    assert ci.high < 1 and ci.excludes_one() == "below"
    assert stats.bootstrap_ratio(slow, fast).excludes_one() == "above"
    mixed = stats.bootstrap_ratio([1.0, 2.0, 1.5], [1.2, 1.8, 1.4])
    assert mixed.excludes_one() is None
    censored = stats.bootstrap_ratio([1.0, 1.1, 1.2], [INF, INF, INF])  # the other side never reached
    assert censored.high == 0.0 and censored.excludes_one() == "below"


def test_mann_whitney_ties_censored_runs_at_the_top():
    res = stats.mann_whitney([1.0, 2.0, 3.0], [INF, INF, INF], "less")
    assert res.pvalue == pytest.approx(0.05)  # exact permutation p of complete separation, 3 vs 3
    assert stats.mann_whitney([INF, INF], [INF, INF], "less").pvalue == pytest.approx(1.0)


def test_spearman_trend_with_permutation_p():
    up = stats.spearman_trend([1, 1, 2, 2, 4, 4, 8, 8], [0, 0.01, 0.1, 0.05, 0.2, 0.3, 0.5, 0.4])
    assert up.statistic > 0.9 and up.pvalue < 0.01
    from scipy.stats import spearmanr

    x, y = [1, 1, 2, 2, 4, 4, 8, 8], [0, 0.01, 0.1, 0.05, 0.2, 0.3, 0.5, 0.4]
    assert up.statistic == pytest.approx(spearmanr(x, y).statistic)
    assert math.isnan(stats.spearman_trend([1, 2, 4], [0, 0, 0]).pvalue)


def test_log_sd_lower_bound_places_censored_runs_at_the_budget():
    x = [1.0, 1.2, INF]
    bound = stats.log_sd_lower_bound(x, budget=5.0)
    assert bound == pytest.approx(stats.log_sd([1.0, 1.2, 5.0]))
    assert bound < stats.log_sd([1.0, 1.2, 50.0])  # a later true TTA only widens the spread


# ---------------------------------------------------------------------------------------
# decision rules of the claims and the cell summary, on hand-made run records


def rec(strategy: str, workers: int, seed: int, tta: float | None, *, budget: float = 1.0, variant: dict | None = None,
        metrics: dict | None = None, params: dict | None = None, tags: dict | None = None):
    from syncbench.analysis.reader import RunRecord

    assignments = {"strategy.name": strategy, "cluster.workers": str(workers), **(variant or {})}
    m = {"clock_s": tta if tta is not None else budget, "samples": 1000.0, **(metrics or {})}
    if tta is not None:
        m = {"tta_s": tta, "samples_to_target": 1000.0, "updates_to_target": 10.0, **m}
    p = {"strategy.name": strategy, "cluster.workers": str(workers), "budget.train_time_s": str(budget),
         "backend": "sim", "cluster.compute.step_s": "None", "cluster.stragglers.kind": "lognormal", **(params or {})}
    return RunRecord(run_id=f"{strategy}-{workers}-{seed}-{len(str(variant))}", run_name="", status="FINISHED",
                     start_time=seed, cell=",".join(f"{k}={v}" for k, v in assignments.items()),
                     assignments=assignments, strategy=strategy, workers=workers, seed=seed, phase="eval",
                     outcome="reached" if tta is not None else "budget", params=p, metrics=m, tags=dict(tags or {}),
                     artifact_uri="")


def sweep_of(runs):
    from syncbench.analysis.reader import SweepData

    return SweepData(name="t", tracking_uri="sqlite://", experiment_id="0", parent_run_id=None, parent_tags={},
                     runs=runs, tune_runs=[])


def wait_metrics(share: float) -> dict:
    return {"time_compute_s": 1 - share, "time_comm_s": 0.0, "time_wait_s": share}


def test_claim_a_supported_by_a_rising_wait_share_and_refuted_by_none_at_all():
    from syncbench.analysis.claims import claim_sync_wait

    rising = [rec("sync", n, s, 0.1, metrics=wait_metrics(0.05 * i + 0.01 * s))
              for i, n in enumerate([1, 2, 4, 8]) for s in range(3)]
    assert claim_sync_wait(sweep_of(rising)).verdict == "supported"
    flat = [rec("sync", n, s, 0.1, metrics=wait_metrics(0.0), params={"cluster.stragglers.kind": "none"})
            for n in (1, 4) for s in range(3)]
    claim = claim_sync_wait(sweep_of(flat))
    assert claim.verdict == "refuted" and "no stragglers" in claim.rows[0].note
    assert claim_sync_wait(sweep_of([rec("async", 4, 0, 0.1)])).verdict == "not testable"


def test_claim_b_counts_censored_async_runs_as_slower_not_as_their_budget():
    from syncbench.analysis.claims import claim_async_faster

    runs = [rec("sync", 4, s, 0.2 + 0.01 * s) for s in range(4)] + [rec("async", 4, s, None) for s in range(4)]
    claim = claim_async_faster(sweep_of(runs))
    assert claim.verdict == "refuted"
    assert claim.rows[0].values["median TTA async (s)"].startswith("> 1 (censored)")
    assert claim.rows[0].values["ratio async/sync [95% CI]"].startswith("∞")
    faster = [rec("sync", 4, s, 0.2 + 0.01 * s) for s in range(4)] + [rec("async", 4, s, 0.1 + 0.01 * s)
                                                                        for s in range(4)]
    assert claim_async_faster(sweep_of(faster)).verdict == "supported"
    two_seeds = faster[:2] + faster[4:6]
    claim = claim_async_faster(sweep_of(two_seeds))  # p >= 1/6 with 2 vs 2, whatever the data
    assert claim.verdict == "underpowered" and claim.verdict_text == "underpowered (needs >= 3 seeds)"


def test_claim_b_mixed_settings_are_inconclusive():
    from syncbench.analysis.claims import claim_async_faster

    runs = [rec("sync", 2, s, 0.2 + 0.01 * s) for s in range(4)] + [rec("async", 2, s, 0.1 + 0.01 * s)
                                                                      for s in range(4)]
    runs += [rec("sync", 8, s, 0.1 + 0.01 * s) for s in range(4)] + [rec("async", 8, s, 0.3 + 0.01 * s)
                                                                       for s in range(4)]
    claim = claim_async_faster(sweep_of(runs))
    assert [r.verdict for r in claim.rows] == ["supported", "refuted"]
    assert claim.verdict == "inconclusive" and claim.summary.startswith("Mixed")


def test_claim_c_uses_censored_runs_only_as_a_lower_bound_on_spread():
    from syncbench.analysis.claims import claim_async_inconsistent

    sync = [rec("sync", 4, s, 0.200 + 0.001 * s) for s in range(6)]
    spread = [rec("async", 4, s, t) for s, t in enumerate([0.05, 0.4, 0.1, 0.8, 0.07, 0.5])]
    assert claim_async_inconsistent(sweep_of(sync + spread)).verdict == "supported"
    with_censored = spread[:4] + [rec("async", 4, 4, None), rec("async", 4, 5, None)]
    assert claim_async_inconsistent(sweep_of(sync + with_censored)).verdict == "supported"
    sync_censored = sync[:5] + [rec("sync", 4, 5, None)]  # sync's spread is then only a lower bound
    claim = claim_async_inconsistent(sweep_of(sync_censored + spread))
    assert claim.verdict == "inconclusive" and "lower bound" in claim.rows[0].note


def test_claim_d_tests_repeated_step_time_measurements_never_seeds_sharing_one_number():
    import json

    from syncbench.analysis.claims import claim_checkpointing
    from syncbench.analysis.threats import step_time_evidence

    def runs(step_on: float, mem_on: float, source: str, samples: bool = True):
        out = []
        for enabled, step, mem in (("True", step_on, mem_on), ("False", 0.010, 1000.0)):
            blocks = [step * (1 + 0.003 * b) for b in range(5)]  # one calibration, shared by the seeds
            for s in range(3):
                tags = {"syncbench.step_s_source": source}
                if samples:
                    tags["syncbench.step_time_samples"] = json.dumps(blocks)
                out.append(rec("sync", 1, s, 0.1, variant={"checkpointing.enabled": enabled.lower()},
                               params={"checkpointing.enabled": enabled},
                               metrics={"step_time_s": min(blocks), "activation_bytes": mem}, tags=tags))
        return out

    refuted = claim_checkpointing(sweep_of(runs(0.014, 100.0, "sweep")))  # 40% slower
    assert refuted.verdict == "refuted" and refuted.rows[0].values["step-time measurements (on/off)"].startswith("5/5")
    assert claim_checkpointing(sweep_of(runs(0.010, 100.0, "sweep"))).verdict == "supported"
    assert claim_checkpointing(sweep_of(runs(0.0105, 100.0, "sweep"))).verdict == "inconclusive"  # at the margin
    assert claim_checkpointing(sweep_of(runs(0.010, 1000.0, "calibrated"))).verdict == "refuted"  # no saving
    pinned = claim_checkpointing(sweep_of(runs(0.010, 100.0, "pinned", samples=False)))
    assert pinned.verdict == "inconclusive" and "pinned" in pinned.rows[0].note
    assert claim_checkpointing(sweep_of(runs(0.010, 100.0, "calibrated")[3:])).verdict == "not testable"
    # the artifact: seeds that share one calibrated number per side (a sweep before block
    # medians were recorded) are one measurement, never an interval of [1, 1] that supports the claim
    shared = claim_checkpointing(sweep_of(runs(0.010, 100.0, "sweep", samples=False)))
    assert shared.verdict == "not testable" and "single measurement" in shared.rows[0].note
    assert "single measurement" in shared.summary
    threat = step_time_evidence([shared])
    assert threat is not None and "1/1 measurements" in threat.detail
    tested = step_time_evidence([claim_checkpointing(sweep_of(runs(0.014, 100.0, "sweep")))])
    assert tested is not None and tested.inherent and "5/5 block medians" in tested.detail


def test_claim_d_on_the_dist_backend_tests_each_runs_measured_step_time():
    from syncbench.analysis.claims import claim_checkpointing

    def runs(seeds: int, step_on: float):
        out = []
        for enabled, step, mem in (("True", step_on, 100.0), ("False", 0.010, 1000.0)):
            for s in range(seeds):
                out.append(rec("sync", 2, s, 0.1, variant={"checkpointing.enabled": enabled.lower()},
                               params={"checkpointing.enabled": enabled, "backend": "dist"},
                               metrics={"step_time_s": step * (1 + 0.01 * s), "activation_bytes": mem}))
        return out

    claim = claim_checkpointing(sweep_of(runs(5, 0.014)))
    assert claim.verdict == "refuted" and "measured runs" in claim.rows[0].values["step-time measurements (on/off)"]
    few = claim_checkpointing(sweep_of(runs(2, 0.0101)))  # 2 vs 2 real measurements: p >= 1/6 whatever the data
    assert few.verdict == "underpowered" and few.verdict_text == "underpowered (needs >= 3 seeds)"
    assert few.power


def test_cell_summary_with_censored_seeds():
    from syncbench.analysis.summary import summarize_cells

    runs = [rec("sync", 1, 0, 0.1), rec("sync", 1, 1, 0.3), rec("sync", 1, 2, None), rec("sync", 1, 3, None)]
    (cell,) = summarize_cells(sweep_of(runs))
    assert cell.tta_median_s is None and cell.median_note == "censored (> 1 s)"  # median falls on a censored run
    assert cell.tta_min_s == 0.1 and cell.tta_max_s is None and cell.n_censored == 2
    five = [rec("sync", 1, s, t) for s, t in enumerate([0.1, 0.2, 0.3, 0.4, None])]
    (cell,) = summarize_cells(sweep_of(five))
    assert cell.tta_median_s == pytest.approx(0.3) and cell.tta_mlperf_mean_s == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------
# multiple settings and power


def test_holm_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.2]
    order = sorted(range(4), key=lambda i: p[i])
    expected, running = [0.0] * 4, 0.0
    for rank, i in enumerate(order):  # Holm (1979): max over the smaller ones of (m - rank) p, capped at 1
        running = max(running, min(1.0, (4 - rank) * p[i]))
        expected[i] = running
    assert stats.holm(p) == pytest.approx(expected)
    assert stats.holm([0.02]) == [0.02]


def test_smallest_attainable_p_values_come_from_scipy():
    from scipy import stats as sps

    assert stats.min_p_mann_whitney(2, 2) == pytest.approx(
        sps.mannwhitneyu([1, 2], [3, 4], alternative="less", method="exact").pvalue)  # 1/6 = 0.167
    assert stats.min_p_mann_whitney(2, 2) == pytest.approx(0.1667, abs=1e-4)
    assert stats.seeds_needed(stats.min_p_mann_whitney, 1) == 3  # 1/20 = 0.05
    assert stats.seeds_needed(stats.min_p_mann_whitney, 3) == 4  # 3/20 > 0.05 >= 3/70
    assert stats.min_p_brown_forsythe(3, 3) == pytest.approx(sps.levene([0, 1, 2], [7, 7, 7], center="median").pvalue)
    assert stats.min_p_brown_forsythe(3, 3) > 0.05 and stats.min_p_brown_forsythe(4, 4) == 0.0


BORDERLINE = {"async": [1.0, 2.0, 3.0, 10.0], "sync": [9.0, 11.0, 12.0, 13.0]}  # rank sum 11: p = 2/70


def test_holm_adjustment_changes_a_borderline_verdict():
    from scipy import stats as sps

    from syncbench.analysis.claims import claim_async_faster

    raw = sps.mannwhitneyu(BORDERLINE["async"], BORDERLINE["sync"], alternative="less", method="exact").pvalue
    assert raw <= 0.05 < 2 * raw  # significant alone, not after Holm over two settings

    def runs(workers):
        return [rec(strategy, n, s, t, budget=100.0) for n in workers for strategy, ttas in BORDERLINE.items()
                for s, t in enumerate(ttas)]

    alone = claim_async_faster(sweep_of(runs([4])))
    assert alone.verdict == "supported"
    both = claim_async_faster(sweep_of(runs([2, 4])))
    assert [r.verdict for r in both.rows] == ["inconclusive", "inconclusive"]
    assert both.verdict == "inconclusive"
    assert all("not after the Holm adjustment" in r.note for r in both.rows)
    assert f"Holm {2 * raw:.3g}" in both.rows[0].values["p (async faster)"]


def test_claims_with_too_few_seeds_are_underpowered_not_inconclusive():
    from syncbench.analysis.claims import claim_async_faster, claim_async_inconsistent, claim_sync_wait

    sync = [rec("sync", 4, s, 0.2 + 0.01 * s) for s in range(3)]
    fast = [rec("async", 4, s, 0.1 + 0.05 * s) for s in range(3)]
    spread = claim_async_inconsistent(sweep_of(sync + fast))
    assert spread.verdict_text == "underpowered (needs >= 4 seeds)"
    # three worker counts x 3 seeds: 1/20 each for (b), x 3 settings with Holm = 0.15 > 0.05
    runs = [rec(st, n, s, (0.1 if st == "async" else 0.2) + 0.01 * s) for n in (2, 4, 8) for st in ("sync", "async")
            for s in range(3)]
    claim = claim_async_faster(sweep_of(runs))
    assert claim.verdict_text == "underpowered (needs >= 4 seeds)"
    assert "0.05" in claim.rows[0].note and "0.15 after Holm over 3 settings" in claim.rows[0].note
    # claim (a): 2 worker counts x 2 seeds: the smallest p is 2!2!/4! = 1/6
    wait = [rec("sync", n, s, 0.1, metrics=wait_metrics(0.1 * n + 0.01 * s)) for n in (2, 4) for s in range(2)]
    assert claim_sync_wait(sweep_of(wait)).verdict_text == "underpowered (needs >= 3 seeds)"


# ---------------------------------------------------------------------------------------
# threats to validity


def _threats(runs):
    from syncbench.analysis.claims import evaluate_claims
    from syncbench.analysis.summary import summarize_cells
    from syncbench.analysis.threats import compute_threats

    sweep = sweep_of(runs)
    cells = summarize_cells(sweep)
    threats, errors = compute_threats(sweep, cells, evaluate_claims(sweep))
    assert errors == []
    return {t.key: t for t in threats}


def test_threats_list_an_untuned_cross_n_comparison_and_drop_it_once_cells_are_tuned():
    def runs(tuned: bool):
        tags = {"syncbench.tuned_from": "s/tune/cell/3"} if tuned else {}
        return [rec(st, n, s, 0.1 * n ** 0.5 + 0.01 * s, budget=10.0, params={"task.module_args.lr": "0.003",
                                                                             "eval.every_s": "0.001"},
                    metrics={"samples_to_target": 1000.0 * n, "step_time_s": 0.0015}, tags=tags)
                for st in ("sync", "async") for n in (1, 4, 8) for s in range(5)]

    untuned = _threats(runs(tuned=False))
    assert "untuned" in untuned
    assert "N=1: lr 0.003" in untuned["untuned"].detail and "grow 8.0x from N=1 to N=8" in untuned["untuned"].detail
    tuned = _threats(runs(tuned=True))
    assert "untuned" not in tuned
    # 5 seeds, no censoring, a fine eval interval: what is left is inherent to the simulation
    assert [t.key for t in tuned.values() if not t.inherent] == []


def test_threats_name_too_few_seeds_censoring_and_a_coarse_resolution():
    runs = [rec("sync", 4, s, 0.2 + 0.01 * s, params={"eval.every_s": "0.05"}) for s in range(2)]
    runs += [rec("async", 4, 0, 0.1, params={"eval.every_s": "0.05"}),
             rec("async", 4, 1, None, params={"eval.every_s": "0.05"})]
    threats = _threats(runs)
    assert "2 vs 2 seeds: the smallest p a one-sided Mann–Whitney U can reach is 0.167" in threats["seeds"].detail
    assert "1 of 4 finished runs" in threats["censoring"].detail
    assert "24% of the fastest cell's median TTA (sync, N=4: 0.205 s)" in threats["resolution"].detail
    assert threats["simulated"].inherent


def test_staleness_is_plotted_for_every_strategy_with_a_parameter_server(tmp_path):
    """The strategies' own declaration (Traits.has_parameter_server), not a name, selects the
    runs whose staleness histogram is drawn: async and async_local_sgd alike, never sync."""
    from syncbench.analysis.plots import plot_staleness
    from syncbench.analysis.reader import strategy_sort_key
    from syncbench.analysis.summary import summarize_cells

    runs = [rec(s, 4, seed, 0.1) for s in ("async_local_sgd", "sync", "async") for seed in range(2)]
    sweep = sweep_of(runs)
    sweep.staleness = {r.run_id: {0: 3, 2: 1} for r in runs}
    plot = plot_staleness(sweep, summarize_cells(sweep), tmp_path)
    assert plot is not None and (tmp_path / "staleness.png").is_file()
    assert "of async, async_local_sgd)" in plot.caption  # in the declared display order
    assert sorted(["async_local_sgd", "sync", "async"], key=strategy_sort_key) == ["sync", "async", "async_local_sgd"]
