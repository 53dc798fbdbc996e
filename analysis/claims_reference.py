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
