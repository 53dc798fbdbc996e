"""Statistics with censoring (analysis.stats) and the claim decision rules on small,
hand-checkable samples."""

from __future__ import annotations

import math

import pytest

from analysis import stats

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
    assert math.isnan(stats.spearman_trend([1, 2, 4], [0, 0, 0]).pvalue)


def test_log_sd_lower_bound_places_censored_runs_at_the_budget():
    x = [1.0, 1.2, INF]
    bound = stats.log_sd_lower_bound(x, budget=5.0)
    assert bound == pytest.approx(stats.log_sd([1.0, 1.2, 5.0]))
    assert bound < stats.log_sd([1.0, 1.2, 50.0])  # a later true TTA only widens the spread
