"""Every statistic the report prints, against an independent reference (issue 15): statsmodels'
Holm, exact permutation distributions enumerated here, the Brown-Forsythe definition (a one-way
ANOVA on absolute deviations from the group medians), normal-theory intervals, and the coverage
of the bootstrap intervals on synthetic data with a known answer. The data are seeded: each test
is deterministic, and its tolerance is stated against the sampling error it would have."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from syncbench.analysis import stats


def test_holm_matches_statsmodels(monkeypatch):
    import gc

    from statsmodels.stats.multitest import multipletests

    # multipletests ends with gc.collect(), which costs seconds per call late in the suite
    # (a large heap of MLflow/torch objects); the collection has no bearing on the values
    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)
    rng = np.random.default_rng(0)
    for m in (1, 2, 3, 5, 8):
        for _ in range(20):
            p = rng.uniform(0, 0.2, size=m)
            expected = multipletests(p, method="holm")[1]
            np.testing.assert_allclose(stats.holm(p), expected, rtol=0, atol=1e-12)
    # by hand, m = 3: sorted 0.01, 0.02, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.02), max(0.04, 1 * 0.04)
    assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # NaN (a setting without a test) is not a hypothesis: m = 2 here
    out = stats.holm([0.01, math.nan, 0.03])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.03)


def _exact_mann_whitney_less(a: list[float], b: list[float]) -> tuple[float, float]:
    """U of a and the exact one-sided p (a stochastically smaller): every split of the pooled
    sample enumerated."""
    pooled = a + b

    def u(x, y):
        return sum((xi > yi) + 0.5 * (xi == yi) for xi in x for yi in y)

    observed = u(a, b)
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    count = 0
    for idx in splits:
        x = [pooled[i] for i in idx]
        y = [pooled[i] for i in range(len(pooled)) if i not in idx]
        count += u(x, y) <= observed + 1e-12
    return observed, count / len(splits)


def test_mann_whitney_is_the_exact_permutation_test():
    a = [1.3, 0.9, 2.2, 1.1, 1.7]
    b = [2.0, 2.6, 1.9, 3.1, 2.4]
    res = stats.mann_whitney(a, b, "less")
    u, p = _exact_mann_whitney_less(a, b)
    assert res.statistic == pytest.approx(u)
    assert res.pvalue == pytest.approx(p, abs=1e-12)
    assert res.pvalue == pytest.approx(sps.mannwhitneyu(a, b, alternative="less", method="exact").pvalue)
    greater = stats.mann_whitney(a, b, "greater")
    assert greater.pvalue == pytest.approx(sps.mannwhitneyu(a, b, alternative="greater", method="exact").pvalue)
    assert res.pvalue < 0.05 < greater.pvalue
    # censored runs (inf) are ties at the top: the same as any common value above everything
    censored = stats.mann_whitney(a, [2.0, math.inf, 1.9, math.inf, math.inf], "less")
    _, p_tied = _exact_mann_whitney_less(a, [2.0, 99.0, 1.9, 99.0, 99.0])
    assert censored.pvalue == pytest.approx(p_tied, abs=1e-12)


def test_spearman_p_is_the_exact_permutation_distribution():
    x = [1, 2, 4, 8, 16, 32]
    y = [0.10, 0.05, 0.20, 0.30, 0.25, 0.50]
    res = stats.spearman_trend(x, y, "greater")
    rho = sps.spearmanr(x, y).statistic
    perms = [sps.spearmanr(x, [y[i] for i in perm]).statistic for perm in itertools.permutations(range(6))]
    exact = float(np.mean([r >= rho - 1e-12 for r in perms]))
    assert res.statistic == pytest.approx(rho)
    assert res.pvalue == pytest.approx(exact, abs=1e-12)
    down = stats.spearman_trend(x, y, "less")
    assert down.pvalue == pytest.approx(float(np.mean([r <= rho + 1e-12 for r in perms])), abs=1e-12)


def test_brown_forsythe_is_an_anova_on_absolute_deviations_from_the_medians():
    a = [1.0, 1.2, 0.8, 1.5, 3.0, 0.4]
    b = [1.0, 1.05, 0.97, 1.02, 1.01]
    la, lb = np.log(a), np.log(b)
    reference = sps.f_oneway(np.abs(la - np.median(la)), np.abs(lb - np.median(lb)))
    res = stats.brown_forsythe(a, b)
    assert res.statistic == pytest.approx(reference.statistic, rel=1e-10)
    assert res.pvalue == pytest.approx(reference.pvalue, rel=1e-10)


def test_bootstrap_ratio_interval_has_the_normal_theory_width():
    """n = 400 per group, normal data: the 95% interval of a ratio of means is, by the delta method,
    r +- 1.96 * r * sqrt(se_a^2 / mean_a^2 + se_b^2 / mean_b^2) -- a 90% interval is 16% narrower."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(10, 1, 400), rng.normal(20, 2, 400)
    ci = stats.bootstrap_ratio(a, b, stat=np.mean)
    r = a.mean() / b.mean()
    se = r * math.sqrt((a.std(ddof=1) ** 2 / 400) / a.mean() ** 2 + (b.std(ddof=1) ** 2 / 400) / b.mean() ** 2)
    assert ci.high - ci.low == pytest.approx(2 * 1.96 * se, rel=0.06)
    assert "95%" in ci.method


def test_bootstrap_ratio_covers_the_true_ratio_95_percent_of_the_time():
    """300 synthetic comparisons with a known answer (lognormal TTAs, true median ratio 0.8, 30
    seeds a side). A 95% interval covers about 95% of the time (percentile intervals under-cover
    slightly at small n); Binomial(300, 0.95) has SD 1.3%: allow [0.925, 0.985]; a 90%
    interval covers 91% here (the width test above separates the two levels more sharply)."""
    rng = np.random.default_rng(2)
    truth = 0.8
    covered = 0
    reps = 300
    for _ in range(reps):
        a = np.exp(rng.normal(math.log(truth), 0.3, 30))
        b = np.exp(rng.normal(0.0, 0.3, 30))
        ci = stats.bootstrap_ratio(a, b, n_boot=500, seed=int(rng.integers(1 << 30)))
        covered += ci.low <= truth <= ci.high
    assert 0.925 <= covered / reps <= 0.985, covered / reps


def test_bootstrap_sd_ratio_matches_the_f_interval_for_normal_logs():
    """SD(log a) / SD(log b) for normal logs, n = 300: the exact interval is sqrt of the F
    distribution's quantiles; the bootstrap's agrees in width within 15%."""
    rng = np.random.default_rng(3)
    a, b = np.exp(rng.normal(0, 0.4, 300)), np.exp(rng.normal(0, 0.2, 300))
    ci = stats.bootstrap_sd_ratio(a, b)
    ratio = np.log(a).std(ddof=1) / np.log(b).std(ddof=1)
    f_low, f_high = sps.f.ppf([0.025, 0.975], 299, 299)
    exact = (ratio / math.sqrt(f_high), ratio / math.sqrt(f_low))
    assert ci.estimate == pytest.approx(ratio)
    assert ci.high - ci.low == pytest.approx(exact[1] - exact[0], rel=0.15)
    assert ci.low < 2.0 < ci.high


def test_min_p_values_are_the_exact_floors():
    # complete separation, 3 vs 3: 1 / C(6, 3) = 0.05; 4 vs 5: 1 / C(9, 4) = 1 / 126
    assert stats.min_p_mann_whitney(3, 3) == pytest.approx(1 / 20)
    assert stats.min_p_mann_whitney(4, 5) == pytest.approx(1 / 126)
    # Holm over 3 settings needs 3 * 1 / C(2k, k) <= 0.05: k = 4 (C(8, 4) = 70, 3/70 = 0.043)
    assert stats.seeds_needed(stats.min_p_mann_whitney, 3) == 4
    assert stats.seeds_needed(stats.min_p_mann_whitney, 1) == 3


def test_cv_and_log_sd_definitions():
    x = [1.0, 2.0, 4.0]
    assert stats.cv(x + [math.inf]) == pytest.approx(np.std(x, ddof=1) / np.mean(x))
    assert stats.log_sd(x) == pytest.approx(math.log(2))  # logs 0, ln2, 2 ln2: SD = ln 2


def test_min_p_spearman_is_reached_by_a_perfect_trend():
    """Runs at worker counts with these multiplicities: only the orderings that keep every larger N
    above every smaller one reach rho's maximum -- prod(c!) / n! of them, by hand: [1, 2] -> 2/6,
    [2, 2] -> 4/24; and a perfect trend's exact permutation p is exactly that."""
    from syncbench.analysis.claims import min_p_spearman

    assert min_p_spearman([1, 2]) == pytest.approx(1 / 3)
    assert min_p_spearman([2, 2]) == pytest.approx(1 / 6)
    assert stats.spearman_trend([1, 2, 2], [0.0, 1.0, 2.0]).pvalue == pytest.approx(1 / 3)
    assert stats.spearman_trend([1, 1, 2, 2], [0.0, 0.1, 1.0, 2.0]).pvalue == pytest.approx(1 / 6)
