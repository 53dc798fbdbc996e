"""The verdicts a claim of the report can get and how they are combined and written.

- **supported**: the data show the claimed effect at the 5% level (the decision rule of each
  claim says exactly what must hold);
- **refuted**: the data show the opposite effect at the same level (or, for a claim that
  something grows, that it does not change at all);
- **inconclusive**: neither, including when the answer differs between worker counts
  (supported at some, refuted at others: "mixed");
- **underpowered (needs >= k seeds)**: the test cannot reach the 5% level with the seeds at
  hand, whatever the data (e.g. 2 vs 2 seeds: the smallest one-sided Mann–Whitney p is 1/6),
  after the Holm adjustment over the claim's settings; k is the fewest seeds that could;
- **not testable**: the sweep lacks the runs the claim needs; the text says which would test it.

A claim's overall verdict combines its comparisons (``combine``, ``COMBINE_RULE``): supported
if at least one is supported and none refuted, refuted in the mirror case, inconclusive
otherwise. The claims themselves are in ``syncbench.analysis.claims``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SUPPORTED, REFUTED, INCONCLUSIVE, NOT_TESTABLE = "supported", "refuted", "inconclusive", "not testable"

UNDERPOWERED = "underpowered"

CONCLUSIVE = (SUPPORTED, REFUTED)


@dataclass
class Row:
    label: str
    verdict: str
    values: dict[str, str]
    note: str = ""
    needs_seeds: int | None = None  # underpowered: the fewest seeds per group that could reach ALPHA

    @property
    def verdict_text(self) -> str:
        return verdict_text(self.verdict, self.needs_seeds)


def verdict_text(verdict: str, needs_seeds: int | None) -> str:
    if verdict == UNDERPOWERED and needs_seeds:
        return f"{UNDERPOWERED} (needs >= {needs_seeds} seeds)"
    return verdict


@dataclass
class Claim:
    key: str
    title: str
    measure: str  # what is measured
    test: str  # statistical test(s)
    rule: str  # decision rule
    columns: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    verdict: str = NOT_TESTABLE
    summary: str = ""
    how_to_test: str = ""  # the run that would test it (when not testable / to strengthen it)
    notes: list[str] = field(default_factory=list)
    needs_seeds: int | None = None  # underpowered: seeds per group the test needs
    power: list[str] = field(default_factory=list)  # why settings are underpowered (threats section)
    step_time_threats: list[str] = field(default_factory=list)  # (d): step times that are one number (threats)
    step_time_basis: list[str] = field(default_factory=list)  # (d): settings tested on calibration block medians
    error: str = ""  # the claim could not be evaluated (the report still is)
    caveat: str = ""  # a conclusive verdict while another setting points the other way (``add_caveat``)

    @property
    def verdict_text(self) -> str:
        return verdict_text(self.verdict, self.needs_seeds)

    def as_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "verdict": self.verdict, "verdict_text": self.verdict_text,
                "needs_seeds": self.needs_seeds, "summary": self.summary,
                "measure": self.measure, "test": self.test, "rule": self.rule, "how_to_test": self.how_to_test,
                "notes": self.notes, "error": self.error, "caveat": self.caveat,
                "comparisons": [{"label": r.label, "verdict": r.verdict, "verdict_text": r.verdict_text, **r.values,
                                 "note": r.note} for r in self.rows]}


def combine(claim: Claim) -> None:
    """Overall verdict from the per-comparison verdicts (see module docstring)."""
    tested = [r for r in claim.rows if r.verdict != NOT_TESTABLE]
    if not tested:
        claim.verdict = NOT_TESTABLE
        return
    sup = [r.label for r in tested if r.verdict == SUPPORTED]
    ref = [r.label for r in tested if r.verdict == REFUTED]
    if sup and not ref:
        claim.verdict = SUPPORTED
    elif ref and not sup:
        claim.verdict = REFUTED
    elif not sup and all(r.verdict == UNDERPOWERED for r in tested):
        claim.verdict = UNDERPOWERED
        claim.needs_seeds = max(r.needs_seeds or 0 for r in tested) or None
    else:
        claim.verdict = INCONCLUSIVE


# per claim: the column whose estimate says which way a setting points, the value that
# separates the two ways, and the side that supports the claim
DIRECTION = {"a": ("Spearman rho", 0.0, "above"), "b": ("ratio async/sync [95% CI]", 1.0, "below"),
             "c": ("SD-ratio async/sync [95% CI]", 1.0, "above")}


def add_caveat(claim: Claim) -> None:
    """A supported or refuted claim whose verdict rests on some settings while another setting's
    estimate points the other way (not significantly) says so: "refuted at N=4; the other
    direction at N=8, not significant". Correct by the combining rule, misleading unsaid."""
    if claim.verdict not in CONCLUSIVE or claim.key not in DIRECTION:
        return
    column, pivot, supports = DIRECTION[claim.key]
    decided = [r.label for r in claim.rows if r.verdict == claim.verdict]
    against = []
    for r in claim.rows:
        if r.verdict in CONCLUSIVE or r.verdict == NOT_TESTABLE:
            continue
        try:
            estimate = float(str(r.values.get(column, "")).split(" [")[0])
        except ValueError:
            continue
        side = "above" if estimate > pivot else "below" if estimate < pivot else None
        points_to_support = side == supports
        if side and points_to_support != (claim.verdict == SUPPORTED):
            against.append(f"{r.label} ({column.split(' [')[0]} {r.values[column]})")
    if decided and against:
        claim.caveat = (f"{claim.verdict} at {', '.join(decided)}; the other direction at {'; '.join(against)}, "
                        f"not significant")


def summarize(claim: Claim, column: str, what: str) -> str:
    """One paragraph: at how many settings each verdict was reached, with the key number."""
    tested = [r for r in claim.rows if r.verdict != NOT_TESTABLE]
    parts = []
    for verdict in (SUPPORTED, REFUTED, INCONCLUSIVE, UNDERPOWERED):
        rows = [r for r in tested if r.verdict == verdict]
        if not rows:
            continue
        brief = len(rows) > 3
        items = [f"{r.label}: {r.values[column].split(' [')[0] if brief else r.values[column]}" for r in rows]
        where = "the only setting" if len(tested) == 1 else f"{len(rows)} of {len(tested)} settings"
        shown = verdict_text(verdict, max(r.needs_seeds or 0 for r in rows) or None)
        parts.append(f"{shown[0].upper() + shown[1:]} at {where} ({what}: {'; '.join(items)})")
    text = ". ".join(parts) + "."
    if any(r.verdict == SUPPORTED for r in tested) and any(r.verdict == REFUTED for r in tested):
        text = "Mixed: the answer depends on the setting. " + text
    skipped = len(claim.rows) - len(tested)
    if skipped:
        text += f" {skipped} setting(s) could not be tested (see the table)."
    return text


def fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "∞"
    return format(x, spec)


def fmt_tta(x: float, budget: float) -> str:
    return f"> {budget:g} (censored)" if math.isinf(x) else f"{x:.4g}"


def fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "—"
    return f"{p:.3g}" if p >= 1e-4 else "< 0.0001"


def fmt_p_adj(raw: float, adjusted: float, settings: int) -> str:
    """A p-value with its Holm adjustment when there are several settings."""
    if settings <= 1 or raw is None or math.isnan(raw):
        return fmt_p(raw)
    return f"{fmt_p(raw)} (Holm {fmt_p(adjusted)})"


def fmt_ci(est: float, low: float, high: float) -> str:
    return f"{fmt(est)} [{fmt(low)}, {fmt(high)}]"


COMBINE_RULE = ("A claim is tested separately in each comparable setting (per worker count and per combination of "
                "other grid keys). Its p-values are Holm-Bonferroni adjusted across those settings (each one-sided "
                "alternative separately) and every test uses the 5% level on the adjusted values. The overall "
                "verdict is supported when at least one setting supports it and none refutes it, refuted in the "
                "mirror case, underpowered (needs >= k seeds) when no setting's test could reach 5% with the seeds "
                "at hand whatever the data, and inconclusive when no setting is conclusive or settings disagree "
                "(mixed).")
