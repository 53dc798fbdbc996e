"""Statistics on time-to-accuracy with censoring.

A run that did not reach its target by the end of its budget (outcome ``budget``) or that
diverged is *censored*: its TTA is only known to be larger than the budget. Everything in
this module represents such a TTA as ``math.inf``. That is exact for order statistics and
ranks when every run of a comparison shares one budget (a censored run is slower than any
run that reached the target, and censored runs tie with each other), and it is never the
budget itself: using the budget as if it were a TTA would understate the slow side.

So: medians and other order statistics are computed with ``inf`` in place (a median that
lands on a censored run is itself censored, "> budget"); rank tests (Mann–Whitney U,
Spearman) see censored runs as ties at the top; ratios of censored medians are bounded
(0 or inf) in the direction the censoring allows. Means and variances cannot use censored
runs; where a dispersion is needed the budget gives a *lower bound* on the spread of a
group (see ``log_sd_lower_bound``), and callers only draw conclusions that the bound
supports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

INF = math.inf
ALPHA = 0.05  # significance level of every test in the report
CONFIDENCE = 0.95  # bootstrap confidence level
N_BOOT = 4000  # bootstrap resamples (percentile intervals)
N_PERM = 9999  # permutations; tests are exact when there are fewer distinct ones


def as_array(values: Sequence[float]) -> np.ndarray:
    return np.asarray(list(values), dtype=float)


def censored_median(values: Sequence[float]) -> float:
    """Median with censored values as +inf (``inf`` when the median is censored)."""
    x = np.sort(as_array(values))
    n = x.size
    if n == 0:
        return math.nan
    if n % 2:
        return float(x[n // 2])
    lo, hi = x[n // 2 - 1], x[n // 2]
    if math.isinf(hi):
        return INF
    return float((lo + hi) / 2)


def mlperf_mean(values: Sequence[float]) -> float | None:
    """MLPerf Training's score over k >= 5 runs: drop the fastest and the slowest, average
    the rest. ``inf`` when a censored run remains after the drop; None for k < 5."""
    x = np.sort(as_array(values))
    if x.size < 5:
        return None
    kept = x[1:-1]
    if np.isinf(kept).any():
        return INF
    return float(kept.mean())


def safe_ratio(a: float, b: float) -> float:
    """a / b for non-negative TTAs where either may be censored (inf).

    inf/finite = inf, finite/inf = 0 (the true ratio is below a/budget), inf/inf = 1
    (both unknown: counted as no difference, which pulls intervals towards 1)."""
    if math.isinf(a) and math.isinf(b):
        return 1.0
    if math.isinf(b):
        return 0.0
    if b == 0:
        return INF if a > 0 else 1.0
    return a / b


@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    method: str

    def excludes_one(self) -> str | None:
        """'below' / 'above' when the whole interval lies on one side of 1, else None."""
        if self.high < 1:
            return "below"
        if self.low > 1:
            return "above"
        return None


def _quantiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    # no interpolation: censored resamples (inf) must not turn into nan
    tail = (1 - level) / 2
    low = float(np.quantile(samples, tail, method="inverted_cdf"))
    high = float(np.quantile(samples, 1 - tail, method="inverted_cdf"))
    return low, high


def bootstrap_ratio(a: Sequence[float], b: Sequence[float], stat: Callable[[np.ndarray], float] = censored_median,
                    n_boot: int = N_BOOT, level: float = CONFIDENCE, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of stat(a) / stat(b), resampling each group
    independently (stratified); censored values (inf) are kept in the resamples."""
    a_arr, b_arr = as_array(a), as_array(b)
    estimate = safe_ratio(stat(a_arr), stat(b_arr))
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a_arr.size, size=(n_boot, a_arr.size))
    ib = rng.integers(0, b_arr.size, size=(n_boot, b_arr.size))
    ratios = np.array([safe_ratio(stat(a_arr[i]), stat(b_arr[j])) for i, j in zip(ia, ib)])
    low, high = _quantiles(ratios, level)
    return Interval(estimate, low, high, f"percentile bootstrap, {n_boot} stratified resamples, {level:.0%}")


def top_ties(values: Sequence[float], ceiling: float) -> np.ndarray:
    """Censored values (inf) replaced by one common value above every observation, so that
    rank tests treat them as ties at the top."""
    x = as_array(values)
    return np.where(np.isinf(x), ceiling, x)


@dataclass
class TestResult:
    name: str
    statistic: float
    pvalue: float
    detail: str = ""


def mann_whitney(a: Sequence[float], b: Sequence[float], alternative: str) -> TestResult:
    """Mann–Whitney U of a vs b (scipy), censored runs as ties at the top; the p-value is
    a permutation p-value (exact when the groups are small), which is valid with ties."""
    from scipy import stats

    a_arr, b_arr = as_array(a), as_array(b)
    finite = np.concatenate([a_arr, b_arr])
    finite = finite[np.isfinite(finite)]
    ceiling = (finite.max() if finite.size else 1.0) * 2 + 1
    res = stats.mannwhitneyu(top_ties(a_arr, ceiling), top_ties(b_arr, ceiling), alternative=alternative,
                             method=stats.PermutationMethod(n_resamples=N_PERM, rng=0))
    return TestResult("Mann–Whitney U (one-sided, permutation p)", float(res.statistic), float(res.pvalue),
                      f"U={res.statistic:g}, n={a_arr.size} vs {b_arr.size}, alternative={alternative}")


def spearman_trend(x: Sequence[float], y: Sequence[float], alternative: str = "greater") -> TestResult:
    """Spearman's rho between x and y with a permutation p-value (exact for small n)."""
    from scipy import stats

    x_arr, y_arr = as_array(x), as_array(y)
    if np.ptp(x_arr) == 0 or np.ptp(y_arr) == 0:
        return TestResult("Spearman rank correlation (permutation p)", math.nan, math.nan, "constant data")
    # Spearman's rho is Pearson's r of the (tie-averaged) ranks; permuting x permutes its ranks
    rx, ry = stats.rankdata(x_arr), stats.rankdata(y_arr)
    ry = (ry - ry.mean()) / np.sqrt(((ry - ry.mean()) ** 2).sum())

    def rho(xr: np.ndarray, axis: int = -1) -> np.ndarray:
        xc = xr - xr.mean(axis=axis, keepdims=True)
        return (xc * ry).sum(axis=axis) / np.sqrt((xc**2).sum(axis=axis))

    res = stats.permutation_test((rx,), rho, permutation_type="pairings", alternative=alternative,
                                 n_resamples=N_PERM, rng=0, vectorized=True)
    return TestResult("Spearman rank correlation (permutation p)", float(res.statistic), float(res.pvalue),
                      f"rho={res.statistic:.3f}, n={x_arr.size}, alternative={alternative}")


def log_sd(values: Sequence[float]) -> float:
    """Sample standard deviation of log(values) (scale-free spread ~ the CV for small spreads)."""
    x = as_array(values)
    if x.size < 2:
        return math.nan
    return float(np.std(np.log(x), ddof=1))


def log_sd_lower_bound(values: Sequence[float], budget: float) -> float:
    """Spread of log TTA with censored runs placed at the budget. Raising the largest values
    of a sample only increases its variance, so this is a lower bound on the true spread."""
    x = as_array(values)
    return log_sd(np.where(np.isinf(x), budget, x))


def cv(values: Sequence[float]) -> float:
    """Coefficient of variation (sample SD / mean) of finite values."""
    x = as_array(values)
    x = x[np.isfinite(x)]
    if x.size < 2 or x.mean() == 0:
        return math.nan
    return float(np.std(x, ddof=1) / x.mean())


def brown_forsythe(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Levene's test centred on the median (Brown–Forsythe), scipy, on log values."""
    from scipy import stats

    la, lb = np.log(as_array(a)), np.log(as_array(b))
    if np.ptp(la) == 0 and np.ptp(lb) == 0:
        return TestResult("Brown–Forsythe (Levene, median-centred) on log TTA", math.nan, math.nan,
                          "both groups constant")
    res = stats.levene(la, lb, center="median")
    return TestResult("Brown–Forsythe (Levene, median-centred) on log TTA", float(res.statistic), float(res.pvalue),
                      f"W={res.statistic:.3f}, n={la.size} vs {lb.size}")


def bootstrap_sd_ratio(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, level: float = CONFIDENCE,
                       seed: int = 0) -> Interval:
    """Bootstrap interval of SD(log a) / SD(log b); 0/0 counts as 1, x/0 as inf."""
    a_arr, b_arr = np.log(as_array(a)), np.log(as_array(b))

    def sd(v: np.ndarray) -> float:
        return float(np.std(v, ddof=1)) if v.size > 1 else math.nan

    def ratio(x: float, y: float) -> float:
        if y == 0:
            return 1.0 if x == 0 else INF
        return x / y

    estimate = ratio(sd(a_arr), sd(b_arr))
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a_arr.size, size=(n_boot, a_arr.size))
    ib = rng.integers(0, b_arr.size, size=(n_boot, b_arr.size))
    ratios = np.array([ratio(sd(a_arr[i]), sd(b_arr[j])) for i, j in zip(ia, ib)])
    low, high = _quantiles(ratios, level)
    return Interval(estimate, low, high, f"percentile bootstrap, {n_boot} stratified resamples, {level:.0%}")


# ---------------------------------------------------------------------------------------
# multiple settings and power: Holm-Bonferroni, and the smallest p-value a test can reach


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down), in the input order; NaN stays NaN and
    does not count as a hypothesis. Adjusted p_(i) = max_{j<=i} min(1, (m - j + 1) p_(j))."""
    p = as_array(pvalues)
    out = np.full(p.size, math.nan)
    idx = [i for i in np.argsort(p, kind="stable") if not math.isnan(p[i])]
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return [float(v) for v in out]


def min_p_mann_whitney(n_a: int, n_b: int) -> float:
    """The smallest one-sided p-value a Mann–Whitney U can reach with groups of n_a and n_b
    (complete separation, no ties): scipy's exact null distribution, 1 / C(n_a + n_b, n_a)."""
    from scipy import stats

    if n_a < 1 or n_b < 1:
        return 1.0
    return float(stats.mannwhitneyu(np.arange(n_a), np.arange(n_a, n_a + n_b), alternative="less",
                                    method="exact").pvalue)


def min_p_brown_forsythe(n_a: int, n_b: int) -> float:
    """The smallest p-value of the Brown–Forsythe test with groups of n_a and n_b. With both
    groups of >= 4 it can reach 0 (equal deviations within each group). With a group of 3
    the deviations from its median are {0, x, y}: the largest statistic is at x = y against a
    constant other group (W = 4 for 3 vs 3, p = 0.116). Fewer than 3: no test (the claim
    needs >= 3 finished seeds)."""
    from scipy import stats

    small, large = sorted((n_a, n_b))
    if small < 3:
        return 1.0
    if small >= 4:
        return 0.0
    res = stats.levene([0.0, 1.0, 2.0], [5.0] * large, center="median")
    return float(res.pvalue)


def seeds_needed(min_p: Callable[[int, int], float], settings: int, alpha: float = ALPHA, start: int = 2,
                 limit: int = 50) -> int:
    """The fewest seeds per group k for which ``settings`` x min_p(k, k) <= alpha, i.e. the
    smallest Holm-adjusted p-value over that many settings can reach the level."""
    for k in range(start, limit + 1):
        if max(1, settings) * min_p(k, k) <= alpha:
            return k
    return limit
