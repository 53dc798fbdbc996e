"""The report's "at a glance" lines: which strategy is fastest at each worker count, named only
where the data show it.

At each worker count (and combination of the grid's other keys) every pair of strategies is
compared as the claims compare sync and async (``syncbench.analysis.claims``): the ratio of
median TTA with its percentile-bootstrap interval, and one-sided Mann–Whitney U tests with
censored runs tied at the top, each direction Holm-adjusted over the pairs at that worker count.
A pair differs significantly when the interval lies on one side of 1 and the adjusted p of that
direction is <= ``ALPHA``. A strategy is named *fastest* only when it is significantly faster
than every other strategy there; otherwise the line says so and gives the ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations

from syncbench.analysis.reader import variant_label
from syncbench.analysis.stats import ALPHA, Interval, bootstrap_ratio, holm, mann_whitney, min_p_mann_whitney
from syncbench.analysis.summary import CellSummary
from syncbench.analysis.verdicts import fmt_ci, fmt_p

MIN_SEEDS = 2  # finished seeds per strategy for a comparison (as claim (b))


@dataclass
class Pair:
    """``slow`` vs ``fast`` (``fast`` has the lower median): ratio = median slow / median fast."""

    fast: str
    slow: str
    interval: Interval
    p_raw: float  # one-sided, fast faster than slow
    p_adj: float  # Holm-adjusted over the pairs at this worker count
    significant: bool

    def text(self) -> str:
        return f"{self.slow}/{self.fast} {fmt_ci(self.interval.estimate, self.interval.low, self.interval.high)}"


@dataclass
class Glance:
    """One worker count (within one combination of the other grid keys)."""

    workers: int
    variant: tuple
    fastest: str | None = None
    fastest_median_s: float | None = None
    pairs: list[Pair] = field(default_factory=list)
    too_few: list[str] = field(default_factory=list)  # strategies with < MIN_SEEDS finished seeds
    underpowered: str = ""  # why no test could reach ALPHA with these seeds
    line: str = ""


def _fmt_s(x: float) -> str:
    return f"{x:.3g} s"


def compare(cells: list[CellSummary], workers: int, variant: tuple) -> Glance:
    """The comparison of every pair of strategies among ``cells`` (one worker count, one variant)."""
    glance = Glance(workers, variant)
    tested = []
    for c in cells:
        if c.n_seeds < MIN_SEEDS:
            glance.too_few.append(c.strategy)
        else:
            tested.append(c)
    raw = []  # (cell a, cell b, interval a/b, p a faster, p a slower)
    for a, b in combinations(tested, 2):
        ta, tb = [r.tta for r in a.usable], [r.tta for r in b.usable]
        if all(math.isinf(t) for t in ta + tb):
            continue  # neither reached the target: nothing to rank
        raw.append((a, b, bootstrap_ratio(ta, tb), mann_whitney(ta, tb, "less").pvalue,
                    mann_whitney(ta, tb, "greater").pvalue))
    m = len(raw)
    adj_less, adj_greater = holm([r[3] for r in raw]), holm([r[4] for r in raw])
    for (a, b, ci, p_less, p_greater), q_less, q_greater in zip(raw, adj_less, adj_greater):
        if ci.estimate <= 1:  # a is (by medians) the faster one
            fast, slow, p, q = a, b, p_less, q_less
            interval = Interval(_inv(ci.estimate), _inv(ci.high), _inv(ci.low), ci.method)
            significant = ci.excludes_one() == "below" and q <= ALPHA
        else:
            fast, slow, p, q, interval = b, a, p_greater, q_greater, ci
            significant = ci.excludes_one() == "above" and q <= ALPHA
        glance.pairs.append(Pair(fast.strategy, slow.strategy, interval, p, q, significant))
    if raw:
        floor = max(min_p_mann_whitney(len(a.usable), len(b.usable)) for a, b, *_ in raw)
        if m * floor > ALPHA:
            seeds = sorted({len(c.usable) for c in tested})
            glance.underpowered = (f"with {'/'.join(map(str, seeds))} seeds per strategy no test can reach "
                                   f"{ALPHA:.0%}" + (f" after Holm over {m} pairs" if m > 1 else ""))
    others = {c.strategy for c in tested}
    for c in tested:
        beaten = {p.slow for p in glance.pairs if p.fast == c.strategy and p.significant}
        if len(others) > 1 and beaten == others - {c.strategy}:
            glance.fastest, glance.fastest_median_s = c.strategy, c.tta_median_s
    glance.line = _line(glance)
    return glance


def _inv(x: float) -> float:
    if x == 0:
        return math.inf
    return 1 / x if math.isfinite(x) else 0.0


def _line(g: Glance) -> str:
    where = f"N={g.workers}" + (f", {variant_label(g.variant)}" if g.variant else "")
    few = f"; {', '.join(g.too_few)}: fewer than {MIN_SEEDS} finished seeds, not compared" if g.too_few else ""
    if not g.pairs:
        if g.too_few:
            return f"{where}: no comparison{few[1:]}."
        return f"{where}: only one strategy ran."
    ratios = "; ".join(p.text() for p in g.pairs)
    if g.fastest:
        median = f", median TTA {_fmt_s(g.fastest_median_s)}" if g.fastest_median_s is not None else ""
        beaten = "; ".join(f"{p.text()}, Holm p {fmt_p(p.p_adj)}" for p in g.pairs if p.fast == g.fastest)
        return f"{where}: fastest is {g.fastest}{median} (median TTA ratio [95% CI]: {beaten}){few}."
    significant = [p for p in g.pairs if p.significant]
    if significant:
        shown = "; ".join(f"{p.fast} faster than {p.slow}: {p.text()}" for p in significant)
        rest = [p for p in g.pairs if not p.significant]
        tail = f"; no significant difference for {'; '.join(p.text() for p in rest)}" if rest else ""
        return f"{where}: no single fastest strategy (median TTA ratio [95% CI]: {shown}{tail}){few}."
    why = f"; {g.underpowered}" if g.underpowered else ""
    return f"{where}: no significant difference (median TTA ratio [95% CI]: {ratios}{why}){few}."


def glance_lines(cells: list[CellSummary]) -> list[Glance]:
    """One ``Glance`` per worker count and combination of the other grid keys, in table order."""
    out = []
    for variant in sorted({c.variant for c in cells}):
        for n in sorted({c.workers for c in cells if c.variant == variant}):
            out.append(compare([c for c in cells if c.variant == variant and c.workers == n], n, variant))
    return out
