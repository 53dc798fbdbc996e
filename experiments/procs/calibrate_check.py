"""The end of ``syncbench calibrate``: does the new profile predict this machine, and was the
machine quiet while it was measured?

* **the check** (``check_profile``): for each strategy the calibration fitted (``sync``:
  ``latency_s``; ``async``: ``server_latency_s``), one short run of the user's config on the
  dist backend and the same config on the sim backend with the profile merged -- the user path,
  ``syncbench run CONFIG --profile FILE`` with ``cluster.backend`` set to each (the dist run
  with the default emulation, ``SYNCBENCH_DIST_EMULATE``, and the config's own evaluation
  interval) -- and prints predicted (sim) / measured (dist) clock per update. An unreachable
  target keeps both running to the check's budget.
* **how busy the machine was** (``busy_report``): the 1-minute load average before the
  measurement and after each pass (less the N calibration processes, which the average then
  counts) against the cores the calibration leaves free, and the spread of the passes. A busy
  machine inflates the step time and the rounds by however much the others took, and that
  share need not hold when the profile is used: on 2 cores under load 2 the user path measured
  sim/dist 0.45-0.54 where an idle machine gave 0.99 (issue 24).

Both are recorded in the profile's ``calibration`` metadata (``check``, ``machine``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from syncbench.experiments.config import apply_overrides, validate_config

CHECKED = ("sync", "async")  # the strategies whose latency the calibration fits
LOAD_SLACK = 0.5  # a load average counts a process that ran part of the minute: an idle machine shows 0-0.3
SPREAD_LIMIT = 0.20  # passes further apart than this (max / min - 1) say the machine's speed changed


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def busy_report(load_before: float | None, loads_after: list[float | None], cores: int, workers: int,
                passes: dict[str, list[float]]) -> dict[str, Any]:
    """Was the machine busy while calibrating? ``load_before``: the 1-minute load average before
    any calibration process ran; ``loads_after``: after each pass (it then counts the ``workers``
    calibration processes, subtracted here); ``passes``: each measured quantity's value per pass.
    Busy when the others' load exceeds the free cores (``cores - workers``, plus ``LOAD_SLACK``)
    or when two passes of one quantity differ by more than ``SPREAD_LIMIT``. Returns the numbers,
    ``busy`` and the warnings (each with its numbers)."""
    free = max(0, cores - workers)
    others = [x for x in [load_before, *[(a - workers) if a is not None else None for a in loads_after]]
              if x is not None]
    others_max = max(others) if others else None
    warnings = []
    if others_max is not None and others_max > free + LOAD_SLACK:
        warnings.append(f"the machine was busy: a load average of {others_max:.2f} from other processes (1-minute "
                        f"average, the calibration's {workers} processes not counted) on {cores} cores, {free} of them "
                        f"free beside the calibration's {workers}; its step time and rounds include that contention")
    spread = {}
    for name, values in passes.items():
        if len(values) >= 2 and min(values) > 0:
            spread[name] = max(values) / min(values) - 1
            if spread[name] > SPREAD_LIMIT:
                warnings.append(f"passes disagree: {name} ranged {min(values) * 1e3:.3f}-{max(values) * 1e3:.3f} ms "
                                f"over {len(values)} passes ({spread[name]:.0%} apart, limit {SPREAD_LIMIT:.0%}): "
                                "the machine's speed changed while measuring")
    return {"cores": cores, "workers": workers, "free_cores": free, "load_before": load_before,
            "loads_after_passes": loads_after, "load_from_others_max": others_max, "load_limit": free + LOAD_SLACK,
            "pass_spread": spread, "spread_limit": SPREAD_LIMIT, "busy": bool(warnings), "warnings": warnings}


def check_config(config: Any, profile_keys: dict[str, Any], strategy: str, backend: str, workers: int,
                 budget_s: float) -> Any:
    """The user's config with the profile merged (as ``--profile`` does), the strategy and
    backend set, ``workers`` workers, ``budget_s`` of training clock and an unreachable target."""
    raw = apply_overrides(config.model_dump(mode="json"), profile_keys)
    unreachable = 1e30 if config.target.mode == "max" else -1e30
    raw = apply_overrides(raw, {"name": f"{config.name}-calibrate-check", "strategy.name": strategy,
                                "cluster.backend": backend, "cluster.workers": workers,
                                "budget.train_time_s": budget_s, "target.value": unreachable})
    return validate_config(raw, f"(calibration check, {strategy} on {backend})")


def per_update_s(result: Any) -> float:
    """Training clock per global update, as both backends record ``clock_per_update_s``."""
    updates = result.evaluations[-1].updates if result.evaluations else 0
    return result.clock_s / max(1, updates)


def check_profile(config: Any, profile_keys: dict[str, Any], workers: int, budget_s: float,
                  say: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """Run each fitted strategy on dist and on sim with the profile (the user path) and return
    ``{strategy: {predicted_s, measured_s, ratio}}`` (sim / dist clock per update), printing it."""
    from syncbench.experiments.run import execute_run  # heavy: both backends

    say(f"check: {', '.join(CHECKED)} on the dist backend and on the sim with this profile, {budget_s:g} s of "
        f"training clock each, N={workers} ...")
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="syncbench-calibrate-check-") as tmp:
        ws = Path(tmp) / "ws"
        uri = f"sqlite:///{ws / 'mlflow.db'}"
        for strategy in CHECKED:
            clock = {backend: per_update_s(execute_run(
                check_config(config, profile_keys, strategy, backend, workers, budget_s), workspace=ws,
                tracking_uri=uri, tags={"syncbench.calibration": "check"})) for backend in ("dist", "sim")}
            ratio = clock["sim"] / clock["dist"] if clock["dist"] > 0 else float("nan")
            out[strategy] = {"predicted_s": clock["sim"], "measured_s": clock["dist"], "ratio": ratio}
            say(f"check {strategy}: clock per update predicted (sim) {clock['sim'] * 1e3:.3f} ms / measured (dist) "
                f"{clock['dist'] * 1e3:.3f} ms = {ratio:.2f}")
    return out


def finish(profile: dict[str, Any], meta_key: str, config: Any, workers: int, load_before: float | None,
           loads_after: list[float | None], passes: dict[str, list[float]], check_budget_s: float | None,
           say: Callable[[str], None]) -> None:
    """Record how busy the machine was and (``check_budget_s`` not None) the check in
    ``profile[meta_key]`` as ``machine`` and ``check``, printing warnings with their numbers."""
    machine = busy_report(load_before, loads_after, os.cpu_count() or 1, workers, passes)
    for warning in machine["warnings"]:
        say(f"WARNING: {warning}. Calibrate again on a quiet machine, or expect runs to differ from the profile "
            "by as much.")
    profile[meta_key]["machine"] = machine
    if check_budget_s is None:
        return
    keys = {f"cluster.{section}.{k}": v for section, values in profile["cluster"].items() for k, v in values.items()}
    check = check_profile(config, keys, workers, check_budget_s, say)
    if machine["busy"]:
        say("the check ran on the same busy machine: its ratios describe this load, not a quiet machine")
    profile[meta_key]["check"] = {"budget_s": check_budget_s, "busy": machine["busy"], "by_strategy": check,
                                  "what": "sim / dist clock per update of the config with this profile, the user path "
                                          "(syncbench run --profile), dist with the default emulation"}
