"""Threats to validity, computed from a sweep's runs (docs/claims.md).

Each threat names what could make a verdict or a number wrong, with the evidence from this
sweep, and whether it is *inherent* to a simulated cluster (it would remain in any sim
sweep, however well designed) or something a better sweep would remove (tuning per cell,
more seeds, a finer evaluation interval, a larger budget, one backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from syncbench.analysis.reader import SweepData, strategy_sort_key
from syncbench.analysis.summary import CellSummary
from syncbench.analysis.verdicts import Claim

EVAL_RESOLUTION_LIMIT = 0.05  # docs/claims.md: the eval interval should be <= 5% of the TTA it resolves
TUNED_TAG = "syncbench.tuned_from"


@dataclass
class Threat:
    key: str
    title: str
    detail: str
    inherent: bool = False  # inherent to a simulation: remains in every sim sweep

    def as_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "detail": self.detail, "inherent": self.inherent}


def _backend(run) -> str:
    return run.params.get("backend") or run.tags.get("syncbench.backend") or run.params.get("cluster.backend") or "?"


def untuned_cross_n(sweep: SweepData, cells: list[CellSummary]) -> Threat | None:
    """Worker counts compared with hyperparameters that were not tuned for each cell."""
    runs = sweep.usable_runs
    if len({r.workers for r in runs}) < 2:
        return None
    untuned = sorted({r.cell for r in runs if TUNED_TAG not in r.tags})
    if not untuned:
        return None
    by_n: dict[int, set[str]] = {}
    for r in runs:
        by_n.setdefault(r.workers, set()).add(r.params.get("task.module_args.lr", "?"))
    lrs = "; ".join(f"N={n}: lr {', '.join(sorted(v))}" for n, v in sorted(by_n.items()))
    detail = (f"{len(untuned)} of {len({r.cell for r in runs})} cells ran without per-cell tuning ({lrs}). "
              f"Hyperparameters chosen for one worker count favour it: a larger effective batch (sync) or staler "
              f"gradients (async) need their own learning rate, so a cross-N difference may be the hyperparameters', "
              f"not the strategy's.")
    scaling = sorted({r.params.get("strategy.lr_scaling", "none") for r in runs} - {"none", "None"})
    if scaling:
        detail += f" strategy.lr_scaling={', '.join(scaling)} rescales the learning rate by rule; it is not tuned."
    for strategy in sorted({c.strategy for c in cells}, key=strategy_sort_key):
        have = sorted((c for c in cells if c.strategy == strategy and c.samples_to_target_median is not None),
                      key=lambda c: c.workers)
        if len(have) >= 2 and have[-1].samples_to_target_median > 1.5 * have[0].samples_to_target_median:
            lo, hi = have[0], have[-1]
            detail += (f" Evidence: {strategy}'s samples to target grow {hi.samples_to_target_median / lo.samples_to_target_median:.1f}x "
                       f"from N={lo.workers} to N={hi.workers} ({lo.samples_to_target_median:,.0f} -> "
                       f"{hi.samples_to_target_median:,.0f}), the signature of a learning rate not adapted to the "
                       f"larger batch.")
            break
    detail += " Fix: a tune: section in the spec (tuned per cell, e.g. task.module_args.lr and strategy.local_steps)."
    return Threat("untuned", "Worker counts compared with hyperparameters not tuned per cell", detail)


def too_few_seeds(sweep: SweepData, cells: list[CellSummary], claims: list[Claim]) -> Threat | None:
    lines = [line for c in claims for line in c.power]
    counts = sorted({c.n_seeds for c in cells if c.n_seeds})
    few = [c for c in cells if 0 < c.n_seeds < 5]
    if not lines and not few:
        return None
    detail = f"Seeds per cell: {', '.join(map(str, counts)) or '0'}. "
    if lines:
        detail += "Tests that cannot reach 5% with these seeds, whatever the data: " + "; ".join(lines) + ". "
    if few:
        detail += (f"{len(few)} cell(s) have fewer than 5 seeds: no MLPerf mean (drop the fastest and slowest), and "
                   f"medians and min–max of so few runs move with every seed.")
    return Threat("seeds", "Too few seeds per cell for the tests", detail.strip())


def censoring(sweep: SweepData, cells: list[CellSummary]) -> Threat | None:
    censored = [c for c in cells if c.n_seeds and c.n_reached < c.n_seeds]
    if not censored:
        return None
    total = sum(c.n_seeds for c in cells)
    n_cens = sum(c.n_seeds - c.n_reached for c in cells)
    worst = sorted(censored, key=lambda c: -(c.n_seeds - c.n_reached) / c.n_seeds)[:4]
    shares = "; ".join(f"{c.label}: {c.n_seeds - c.n_reached}/{c.n_seeds}" for c in worst)
    return Threat("censoring", "Censored runs",
                  f"{n_cens} of {total} finished runs did not reach the target within the budget (or diverged); "
                  f"largest shares: {shares}. Their TTA is only known to exceed the budget: medians that fall on them "
                  f"are censored, spreads are lower bounds. A larger budget.train_time_s (or tuning) would resolve them.")


def resolution(sweep: SweepData, cells: list[CellSummary]) -> Threat | None:
    every = [float(v) for v in sweep.param_values("eval.every_s") if _is_number(v)]
    medians = [c for c in cells if c.tta_median_s]
    if not every or not medians:
        return None
    fastest = min(medians, key=lambda c: c.tta_median_s)
    share = max(every) / fastest.tta_median_s
    if share <= EVAL_RESOLUTION_LIMIT:
        return None
    return Threat("resolution", "Coarse TTA resolution",
                  f"The global model is evaluated every {max(every):g} s of training clock: "
                  f"{100 * share:.0f}% of the fastest cell's median TTA ({fastest.label}: {fastest.tta_median_s:.3g} s), "
                  f"above the {EVAL_RESOLUTION_LIMIT:.0%} the TTA rules ask for. Differences smaller than one interval "
                  f"are not resolved; lower eval.every_s.")


def simulated_hardware(sweep: SweepData) -> Threat | None:
    sim = [r for r in sweep.runs if _backend(r) == "sim"]
    if not sim:
        return None
    steps = sorted({float(r.metrics["step_time_s"]) for r in sim if "step_time_s" in r.metrics})
    sources = sorted({r.tags.get("syncbench.step_s_source", "?") for r in sim})
    shown = ", ".join(f"{v:.3g}" for v in steps[:4]) + (" …" if len(steps) > 4 else "")
    how = {"sweep": "calibrated once per task by the sweep and pinned", "pinned": "pinned in the config",
           "calibrated": "calibrated by each run"}
    return Threat("simulated", "Hardware efficiency is simulated, not measured",
                  f"{len(sim)} run(s) on the simulated cluster: compute time per worker step = step_s ({shown} s; "
                  f"{'; '.join(how.get(s, s) for s in sources)}) x a seeded straggler factor, communication from the "
                  f"alpha-beta network model. Clock per sample and therefore TTA are the model's, not a machine's; "
                  f"statistical efficiency (samples to target) is real training. Check the conclusions on the dist "
                  f"backend (cluster.backend: dist) or with a calibrated profile.",
                  inherent=True)


def step_time_evidence(claims: list[Claim]) -> Threat | None:
    """Claim (d)'s step-time cost, where it rests on one number per side (a pinned step_s, or
    a sweep calibration without its repeated medians): seeds sharing it are not measurements."""
    lines = [line for c in claims if c.key == "d" for line in c.step_time_threats]
    basis = [line for c in claims if c.key == "d" for line in c.step_time_basis]
    if not lines and basis:
        return Threat("step-time", "Checkpointing's step-time cost is measured in one process on one machine",
                      "Claim (d) tests the step time on the block medians of each setting's calibration (" +
                      "; ".join(basis) + "): they show the timing noise of this machine while it calibrated, not "
                      "the variation between machines, runs or times of day. A slowdown they show is this "
                      "machine's; check it on the target hardware (syncbench calibrate, the dist backend).",
                      inherent=True)
    if not lines:
        return None
    return Threat("step-time", "Checkpointing's step-time cost rests on a single number",
                  "Claim (d) compares step times that are not repeated measurements: " + "; ".join(lines) + ". The "
                  "seeds of a cell share that number, so they carry no information about its variability, and no "
                  "interval or test of the slowdown can be drawn from them (an interval of [1, 1] from such seeds "
                  "would be an artifact). Rerun with cluster.compute.step_s: null (the sweep then records the "
                  "calibration's block medians per checkpointing setting) or on the dist backend.")


def mixed_backends(sweep: SweepData) -> Threat | None:
    backends = sorted({_backend(r) for r in sweep.runs})
    if len(backends) < 2:
        return None
    return Threat("backends", "Mixed backends",
                  f"The runs use {', '.join(backends)}: simulated and measured clocks are not on one scale, so TTAs "
                  f"across backends are not comparable.")


def incomplete(sweep: SweepData) -> Threat | None:
    parts = []
    if sweep.unfinished:
        parts.append(f"{len(sweep.unfinished)} evaluation run(s) still RUNNING were left out (the sweep is not "
                     f"finished, or its launcher died)")
    if sweep.failed_runs:
        parts.append(f"{len(sweep.failed_runs)} run(s) failed and are excluded")
    if not parts:
        return None
    return Threat("incomplete", "Missing runs", "; ".join(parts) + ": cells with fewer runs than seeds weigh less.")


def compute_threats(sweep: SweepData, cells: list[CellSummary], claims: list[Claim]) -> tuple[list[Threat], list[str]]:
    """Every threat that applies, and a note for each check that could not be computed."""
    checks = [("untuned", lambda: untuned_cross_n(sweep, cells)), ("seeds", lambda: too_few_seeds(sweep, cells, claims)),
              ("censoring", lambda: censoring(sweep, cells)), ("resolution", lambda: resolution(sweep, cells)),
              ("simulated", lambda: simulated_hardware(sweep)), ("step-time", lambda: step_time_evidence(claims)),
              ("backends", lambda: mixed_backends(sweep)),
              ("incomplete", lambda: incomplete(sweep))]
    threats, errors = [], []
    for name, check in checks:
        try:
            threat = check()
        except Exception as exc:  # noqa: BLE001 - one check must not sink the report
            errors.append(f"{name}: could not be checked ({type(exc).__name__}: {exc})")
            continue
        if threat is not None:
            threats.append(threat)
    return threats, errors


def _is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
