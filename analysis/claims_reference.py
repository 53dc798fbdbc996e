"""docs/claims.md, generated from the claims' own definitions: what each claim measures, the
test, the decision rule and the sweep that can settle it (``python -m
syncbench.analysis.claims_reference`` prints it; tests/test_docs.py keeps the file current)."""

from __future__ import annotations

import sys

from syncbench.analysis.claims import evaluate_claims
from syncbench.analysis.reader import SweepData
from syncbench.analysis.verdicts import COMBINE_RULE

INTRO = """# Claims (a)-(d)

`syncbench report` tests four popular claims on the runs of one sweep and opens with their
verdicts. This page is generated from the code that tests them (`python -m
syncbench.analysis.claims_reference`), so it says exactly what the report does.

Each claim reads **supported**, **refuted**, **inconclusive**, **underpowered (needs >= k
seeds)** or **not testable** (the sweep lacks the runs it needs; the report then says which
sweep would test it). {combine}

## Designing a sweep that settles a claim

- Compare at equal worker counts and tune each cell (`tune:` in the spec): a comparison across
  worker counts with hyperparameters chosen for another cell is a threat the report names.
- Give every cell enough seeds for the test to reach 5% *after* the Holm adjustment over the
  claim's settings: the report's "underpowered (needs >= k seeds)" names k. Two seeds per cell
  can never settle (b) (smallest one-sided Mann-Whitney p = 1/6); the demo uses 8.
- Keep `eval.every_s` at or below 5% of the fastest cell's median TTA: TTA is only resolved to
  one evaluation interval.
- Make the effect possible: without straggler noise simulated synchronous workers never wait
  (claim (a) then has nothing to test); claim (d) needs cells that differ only in
  `checkpointing.enabled` (and `batch_size` for spending the memory saved).

## The report's "At a glance" lines

At each worker count (and combination of the grid's other keys) every pair of strategies that
has >= 2 finished seeds is compared as claim (b) compares async and sync: the ratio of median
TTA with its 95% percentile-bootstrap interval, and one-sided Mann-Whitney U tests (censored runs
tied at the top), each direction Holm-adjusted over the pairs at that worker count. A line names
the **fastest** strategy only when it is significantly faster than every other strategy there
(interval on one side of 1 and adjusted p <= 0.05), and gives the ratios with their intervals;
otherwise it reads "no significant difference (ratios ... [CI])", or "no single fastest strategy"
with the pairs that do differ. A claim whose verdict rests on some settings while another
setting's estimate points the other way (not significantly) says so beside its verdict, e.g.
"refuted at N=4; the other direction at N=8 (...), not significant".
"""


def markdown() -> str:
    """The reference page: the intro, then each claim's measure, test, rule and the sweep that tests it."""
    empty = SweepData(name="", tracking_uri="", experiment_id="", parent_run_id=None, parent_tags={}, runs=[],
                      tune_runs=[])
    parts = [INTRO.format(combine=COMBINE_RULE)]
    for claim in evaluate_claims(empty):
        parts.append(f"\n## ({claim.key}) {claim.title}\n\n"
                     f"- **Measure**: {claim.measure}.\n"
                     f"- **Test**: {claim.test}.\n"
                     f"- **Rule**: {claim.rule}.\n"
                     f"- **A sweep that tests it**: {claim.how_to_test or 'see the report'}.\n")
    return "".join(parts)


if __name__ == "__main__":
    sys.stdout.write(markdown())
