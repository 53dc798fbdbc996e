"""Reading a sweep back from MLflow (any tracking URI).

Conventions (docs/metrics.md, "A sweep"): one MLflow experiment per sweep, named after it; a parent
run tagged ``syncbench.sweep=<name>``, ``syncbench.role=parent``; one child run per trial
tagged ``syncbench.role=trial``, ``syncbench.cell="k=v,k=v"``, ``syncbench.seed`` and
``syncbench.phase=eval|tune``. The report uses ``phase=eval`` runs; tune trials are
summarised separately.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from syncbench.experiments.config import ConfigError
from syncbench.strategies.registry import traits  # torch-free: each strategy's options model declares them

CENSORED_OUTCOMES = ("budget", "diverged")
USABLE_OUTCOMES = ("reached", *CENSORED_OUTCOMES)
AXIS_KEYS = ("strategy.name", "cluster.workers")  # the table's rows; the rest of a cell is its "variant"
MAX_READ_THREADS = 8
STEP_SAMPLES_TAG = "syncbench.step_time_samples"  # syncbench.experiments.sim.calibration.STEP_SAMPLES_TAG
MEMORY_LIMIT_TAG = "syncbench.memory_limit_bytes"  # syncbench.sweeps.coordinator.MEMORY_LIMIT_TAG


def parse_cell(cell: str) -> dict[str, str]:
    """``"strategy.name=sync,cluster.workers=4"`` -> {"strategy.name": "sync", ...}. A part
    without '=' belongs to the previous value (a value that itself contained a comma)."""
    out: dict[str, str] = {}
    last = None
    for part in cell.split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            last = key.strip()
            out[last] = value.strip()
        elif last is not None:
            out[last] += "," + part
    return out


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f


@dataclass
class RunRecord:
    """One trial, as the report sees it."""

    run_id: str
    run_name: str
    status: str
    start_time: int
    cell: str
    assignments: dict[str, str]
    strategy: str
    workers: int
    seed: int | None
    phase: str
    outcome: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    artifact_uri: str

    # ---- derived -----------------------------------------------------------------------
    @property
    def variant(self) -> tuple[tuple[str, str], ...]:
        """The cell's assignments other than strategy and workers (e.g. a network setting)."""
        return tuple((k, v) for k, v in self.assignments.items() if k not in AXIS_KEYS)

    @property
    def usable(self) -> bool:
        return self.status == "FINISHED" and self.outcome in USABLE_OUTCOMES

    @property
    def reached(self) -> bool:
        return self.outcome == "reached" and self.metrics.get("tta_s") is not None

    @property
    def censored(self) -> bool:
        return self.usable and not self.reached

    @property
    def tta(self) -> float:
        """TTA for order statistics and rank tests: +inf when censored (never the budget)."""
        return float(self.metrics["tta_s"]) if self.reached else math.inf

    @property
    def budget(self) -> float:
        return _float(self.params.get("budget.train_time_s")) or math.nan

    @property
    def samples_to_target(self) -> float:
        return float(self.metrics.get("samples_to_target", math.inf)) if self.reached else math.inf

    @property
    def clock_s(self) -> float | None:
        return self.metrics.get("clock_s")

    @property
    def time_per_sample(self) -> float | None:
        """Training clock per sample whose gradient reached the model (hardware efficiency),
        measured over the whole run, so censored runs have one too."""
        clock, samples = self.metrics.get("clock_s"), self.metrics.get("samples")
        if clock is None or not samples:
            return None
        return float(clock) / float(samples)

    @property
    def wait_share(self) -> float | None:
        """Share of the workers' time spent waiting (mean over workers, whole run)."""
        parts = [self.metrics.get(k) for k in ("time_compute_s", "time_comm_s", "time_wait_s")]
        if any(p is None for p in parts) or sum(parts) <= 0:
            return None
        return float(parts[2] / sum(parts))

    @property
    def checkpointing(self) -> bool | None:
        value = self.params.get("checkpointing.enabled")
        if value is None:
            return None
        return value.strip().lower() in ("true", "1", "yes")

    @property
    def memory_bytes(self) -> tuple[str, float] | None:
        """(metric name, bytes): peak memory when recorded, else the activation bytes."""
        for key in ("peak_mem_bytes", "activation_bytes"):
            value = self.metrics.get(key)
            if value is not None and value > 0:
                return key, float(value)
        return None

    @property
    def step_time_samples(self) -> list[float] | None:
        """The repeated measurements behind the run's step time: the block medians of the
        calibration that set it (tag ``syncbench.step_time_samples``; a sweep's cells that
        share a calibration share them), or None when none were recorded."""
        raw = self.tags.get(STEP_SAMPLES_TAG)
        if not raw:
            return None
        try:
            values = [float(v) for v in json.loads(raw)]
        except (TypeError, ValueError):
            return None
        return [v for v in values if math.isfinite(v) and v > 0] or None

    @property
    def batch_size(self) -> int | None:
        value = _float(self.params.get("batch_size"))
        return int(value) if value is not None else None

    @property
    def outcome_label(self) -> str:
        if self.reached:
            return f"reached at {self.tta:.4g} s"
        if self.outcome == "budget":
            return f"censored (> {self.budget:g} s budget)"
        if self.outcome == "diverged":
            return "diverged (censored, never reaches)"
        return self.outcome


@dataclass
class SweepData:
    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None
    parent_tags: dict[str, str]
    runs: list[RunRecord]  # phase=eval, one per (cell, seed), FINISHED or FAILED
    tune_runs: list[RunRecord]
    superseded: list[RunRecord] = field(default_factory=list)  # older duplicates of a (cell, seed)
    unfinished: list[RunRecord] = field(default_factory=list)  # RUNNING / SCHEDULED: not counted
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    staleness: dict[str, dict[int, int]] = field(default_factory=dict)

    @property
    def usable_runs(self) -> list[RunRecord]:
        return [r for r in self.runs if r.usable]

    @property
    def failed_runs(self) -> list[RunRecord]:
        return [r for r in self.runs if not r.usable]

    def param_values(self, key: str) -> list[str]:
        return sorted({r.params[key] for r in self.runs if key in r.params}, key=_natural)

    def tag_values(self, key: str) -> list[str]:
        return sorted({r.tags[key] for r in self.runs if key in r.tags})

    @property
    def memory_limit_bytes(self) -> float | None:
        """The spec's analysis.memory_limit_bytes, as the launcher tagged the parent run."""
        try:
            value = json.loads(self.parent_tags.get(MEMORY_LIMIT_TAG) or "null")
        except ValueError:
            return None
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    @property
    def target_metric(self) -> str:
        values = self.param_values("target.metric")
        return values[0] if values else "val_acc"

    @property
    def target_mode(self) -> str:
        values = self.param_values("target.mode")
        return values[0] if values else "max"

    @property
    def target_value(self) -> float | None:
        values = self.param_values("target.value")
        return _float(values[0]) if values else None


def _natural(value: str) -> tuple[int, float, str]:
    f = _float(value)
    return (0, f, "") if f is not None else (1, 0.0, value)


GENERIC_LEAVES = {"kind", "name", "enabled", "every", "value", "mode", "p", "sigma", "slowdown", "impl", "lr"}


def short_key(key: str) -> str:
    """A grid key as a reader wants it in a legend: its last part ("bandwidth_gbps"), or its
    last two when the last is generic ("stragglers.kind", "checkpointing.enabled")."""
    parts = key.split(".")
    if len(parts) > 1 and parts[-1] in GENERIC_LEAVES:
        return ".".join(parts[-2:])
    return parts[-1]


def variant_label(variant: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{short_key(k)}={v}" for k, v in variant)


def variant_sort_key(variant: tuple[tuple[str, str], ...]) -> tuple:
    return tuple((k, _natural(v)) for k, v in variant)


def strategy_sort_key(name: str) -> tuple[int, str]:
    """Tables and legends list strategies by their declared ``display_order``, then by name."""
    return (traits(name).display_order, name)


def _record(run) -> RunRecord:
    params, tags = dict(run.data.params), dict(run.data.tags)
    cell = tags.get("syncbench.cell") or ""
    assignments = parse_cell(cell) if cell else {}
    strategy = params.get("strategy.name") or assignments.get("strategy.name") or "?"
    workers = int(float(params.get("cluster.workers") or assignments.get("cluster.workers") or 1))
    if not cell:
        assignments = {"strategy.name": strategy, "cluster.workers": str(workers)}
        cell = f"strategy.name={strategy},cluster.workers={workers}"
    seed_raw = tags.get("syncbench.seed", params.get("seed"))
    seed = int(float(seed_raw)) if _float(seed_raw) is not None else None
    status = run.info.status
    outcome = tags.get("outcome") or ("failed" if status == "FAILED" else "unknown")
    return RunRecord(run_id=run.info.run_id, run_name=run.info.run_name or "", status=status,
                     start_time=int(run.info.start_time or 0), cell=cell, assignments=assignments,
                     strategy=strategy, workers=workers, seed=seed, phase=tags.get("syncbench.phase", "eval"),
                     outcome=outcome, params=params, metrics=dict(run.data.metrics), tags=tags,
                     artifact_uri=run.info.artifact_uri)


def search_all(client, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def known_sweeps(client) -> list[str]:
    try:
        return sorted(e.name for e in client.search_experiments(max_results=200) if e.name != "Default")
    except Exception:  # noqa: BLE001 - only used to make an error message helpful
        return []


def _quote(value: str) -> str:
    """A string literal for an MLflow search filter."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"sweep name {value!r}: contains both kinds of quote; MLflow filters cannot express it")


def load_sweep(client, name: str, tracking_uri: str, *, curves: bool = True) -> SweepData:
    """All trials of the sweep ``name``; raises ConfigError when there is nothing to report."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        others = known_sweeps(client)
        hint = f" Experiments in this store: {', '.join(others)}." if others else " The store has no experiments."
        raise ConfigError(f"sweep {name!r}: no MLflow experiment of that name at {tracking_uri}.{hint}")
    sweep_filter = f"tags.`syncbench.sweep` = {_quote(name)}"
    parents = search_all(client, exp.experiment_id, f"{sweep_filter} and tags.`syncbench.role` = 'parent'")
    parents.sort(key=lambda r: r.info.start_time or 0)
    trials = [_record(r) for r in search_all(client, exp.experiment_id, f"{sweep_filter} and tags.`syncbench.role` = 'trial'")]
    if not trials:
        raise ConfigError(f"sweep {name!r}: the experiment exists at {tracking_uri} but has no trial runs "
                          f"(tagged syncbench.role=trial); nothing to report yet")
    eval_runs, tune_runs, superseded, unfinished = [], [], [], []
    by_key: dict[tuple[str, Any], list[RunRecord]] = {}
    for rec in trials:
        if rec.phase == "tune":
            tune_runs.append(rec)
        elif rec.status in ("RUNNING", "SCHEDULED"):
            unfinished.append(rec)
        else:
            by_key.setdefault((rec.cell, rec.seed), []).append(rec)
    for group in by_key.values():
        # a resumed sweep retries failed trials: keep the latest finished run of each (cell, seed)
        group.sort(key=lambda r: (r.status == "FINISHED", r.start_time))
        eval_runs.append(group[-1])
        superseded.extend(group[:-1])
    # no finished evaluation run yet (tuning, or every run still RUNNING): the report is still
    # written, and each part says why it is empty
    eval_runs.sort(key=lambda r: (variant_sort_key(r.variant), strategy_sort_key(r.strategy), r.workers, r.seed or 0))
    parent = parents[-1] if parents else None
    data = SweepData(name=name, tracking_uri=tracking_uri, experiment_id=exp.experiment_id,
                     parent_run_id=parent.info.run_id if parent else None,
                     parent_tags=dict(parent.data.tags) if parent else {}, runs=eval_runs, tune_runs=tune_runs,
                     superseded=superseded, unfinished=unfinished)
    if curves:
        data.curves = read_curves(client, [r.run_id for r in data.usable_runs], data.target_metric)
    # every strategy with a parameter server records its staleness histogram (staleness.json)
    data.staleness = read_staleness(client, [r for r in data.usable_runs if traits(r.strategy).has_parameter_server])
    return data


def _curve(client, run_id: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(training clock s, metric) at each evaluation. Both series are logged together at
    each evaluation with the same (step, timestamp), so they pair up in that order."""
    values = client.get_metric_history(run_id, metric)
    clocks = client.get_metric_history(run_id, "clock_s")
    key = lambda m: (m.timestamp, m.step)  # noqa: E731
    values, clocks = sorted(values, key=key), sorted(clocks, key=key)
    clock_at = {}
    for m in clocks:
        clock_at.setdefault((m.timestamp, m.step), []).append(m.value)
    xs, ys = [], []
    for m in values:
        slot = clock_at.get((m.timestamp, m.step))
        if not slot:
            continue
        xs.append(slot.pop(0))
        ys.append(m.value)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def read_curves(client, run_ids: list[str], metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Metric histories of many runs, read in parallel (each is a separate request)."""
    if not run_ids:
        return {}
    with ThreadPoolExecutor(max_workers=min(MAX_READ_THREADS, len(run_ids))) as pool:
        results = pool.map(lambda rid: _curve(client, rid, metric), run_ids)
        return dict(zip(run_ids, results))


def _staleness(client, run_id: str) -> dict[int, int] | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "staleness.json", tmp)
        except Exception:  # noqa: BLE001 - a run without the artifact (e.g. an older run)
            return None
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
    return {int(k): int(v) for k, v in raw.items()}


def read_staleness(client, runs: list[RunRecord]) -> dict[str, dict[int, int]]:
    if not runs:
        return {}
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bar per tiny file
    with ThreadPoolExecutor(max_workers=min(MAX_READ_THREADS, len(runs))) as pool:
        results = pool.map(lambda r: _staleness(client, r.run_id), runs)
        return {r.run_id: h for r, h in zip(runs, results) if h is not None}


def resolve_tracking_uri(tracking_uri: str | None, workspace: str | os.PathLike | None) -> str:
    from syncbench.experiments.workspace import default_tracking_uri, workspace_dir

    if tracking_uri:
        return tracking_uri
    ws = workspace_dir(workspace)
    db = ws / "mlflow.db"
    if not db.is_file():
        raise ConfigError(f"no MLflow store in the workspace {ws} (expected {db}); run a sweep first, "
                          f"or pass --workspace / --tracking-uri")
    return default_tracking_uri(ws)
