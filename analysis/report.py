"""`syncbench report SWEEP_NAME`: read a sweep back from MLflow and write what it means.

Writes ``reports/<sweep>/`` in the workspace (or ``--out``): ``report.html`` (one
self-contained file, figures embedded as base64 PNG), ``report.md``, ``summary.csv``,
``claims.json`` and the figures as PNG files, and logs them under ``report/`` as artifacts
of the sweep's parent run so that they open in the MLflow UI.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape

from syncbench.analysis.claims import evaluate_claims
from syncbench.analysis.headline import glance_lines
from syncbench.analysis.plots import Plot, make_plots
from syncbench.analysis.reader import (SweepData, load_sweep, resolve_tracking_uri, short_key, strategy_sort_key,
                                       variant_label)
from syncbench.analysis.stats import ALPHA, CONFIDENCE, N_BOOT, N_PERM
from syncbench.analysis.summary import CellSummary, summarize_cells, summary_csv
from syncbench.analysis.threats import Threat, compute_threats
from syncbench.analysis.verdicts import COMBINE_RULE, NOT_TESTABLE, Claim, add_caveat
from syncbench.experiments.config import ConfigError

TEMPLATE_DIR = Path(__file__).resolve().parent
REPORT_FILES = ("report.html", "report.md", "summary.csv", "claims.json", "threats.json")
STEP_SOURCES = {"pinned": "pinned in the config", "calibrated": "calibrated by each run on its machine",
                "sweep": "calibrated once per task by the sweep"}
EVAL_RESOLUTION_LIMIT = 0.05  # docs/claims.md: the eval interval should be <= 5% of the 1-worker TTA


@dataclass
class ReportResult:
    out_dir: Path
    files: list[Path]
    sweep: SweepData
    cells: list[CellSummary]
    claims: list[Claim]
    plots: list[Plot]
    parent_run_id: str | None
    threats: list[Threat] = field(default_factory=list)
    logged_to_parent: bool = False
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# formatting


def redact_uri(uri: str) -> str:
    """A tracking URI without its password (postgresql://user:secret@host/db)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def fmt_s(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "—"
    if x == 0:
        return "0"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def fmt_int(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:,.0f}"


def cell_row(c: CellSummary) -> dict[str, Any]:
    budget = c.budget_s
    if c.tta_min_s is None:
        minmax = f"all censored (> {budget:g})" if c.n_seeds else "—"
    elif c.tta_max_s is None:
        minmax = f"{fmt_s(c.tta_min_s)} – > {budget:g} (censored)"
    else:
        minmax = f"{fmt_s(c.tta_min_s)} – {fmt_s(c.tta_max_s)}"
    extra = []
    if c.n_censored:
        extra.append(f"{c.n_censored} over budget")
    if c.n_diverged:
        extra.append(f"{c.n_diverged} diverged")
    if c.n_failed:
        extra.append(f"{c.n_failed} failed (excluded)")
    if c.n_seeds >= 5:
        mlperf = fmt_s(c.tta_mlperf_mean_s) if c.tta_mlperf_mean_s is not None else f"> {budget:g} (censored)"
    else:
        mlperf = "n/a (< 5 seeds)"
    return {
        "strategy": c.strategy,
        "workers": c.workers,
        "variant": c.variant_label,
        "reached": f"{c.n_reached}/{c.n_seeds}",
        "reached_note": ", ".join(extra),
        "median": fmt_s(c.tta_median_s) if c.tta_median_s is not None else c.median_note,
        "median_missing": c.tta_median_s is None,
        "minmax": minmax,
        "censored": c.n_reached < c.n_seeds or c.n_failed > 0,
        "mlperf": mlperf,
        "speedup": f"{c.speedup:.2f}×" if c.speedup is not None else "—",
        "efficiency": f"{100 * c.scaling_efficiency:.0f}%" if c.scaling_efficiency is not None else "—",
        "samples": fmt_int(c.samples_to_target_median),
        "updates": fmt_int(c.updates_to_target_median),
        "time_per_sample": fmt_s(1e6 * c.time_per_sample_s) if c.time_per_sample_s is not None else "—",
        "seeds": ", ".join(map(str, c.seeds)),
    }


def run_label(run) -> str:
    """A run's cell as every table names it: ``sync, N=8`` (then the grid's other keys)."""
    base = f"{run.strategy}, N={run.workers}"
    return f"{base}, {variant_label(run.variant)}" if run.variant else base


def cell_hyperparameters(sweep: SweepData) -> dict[str, str]:
    """Per cell (id): the hyperparameter values its evaluation runs used where cells may differ:
    the keys its tuning varied, and the learning rate when it is not one value sweep-wide.
    Rounded to 3 significant figures; several values in one cell are all listed."""
    tuned: dict[str, set[str]] = {}
    for r in sweep.tune_runs:
        tuned.setdefault(r.cell, set())
    for cell in tuned:
        runs = [r for r in sweep.tune_runs if r.cell == cell]
        tuned[cell] = {k for k in {k for r in runs for k in r.params}
                       if k != "name" and len({r.params.get(k) for r in runs}) > 1}
    lr_key = "task.module_args.lr"
    grid = set(grid_keys(sweep))
    lr_varies = len(sweep.param_values(lr_key)) > 1 and lr_key not in grid
    out: dict[str, str] = {}
    for cell in {r.cell for r in sweep.runs}:
        keys = sorted(tuned.get(cell, set()) | ({lr_key} if lr_varies else set()))
        runs = [r for r in sweep.runs if r.cell == cell]
        parts = []
        for k in keys:
            values = sorted({_short_value(r.params.get(k)) for r in runs if k in r.params})
            if values:
                parts.append(f"{k.rsplit('.', 1)[-1]}={'/'.join(values)}")
        out[cell] = ", ".join(parts)
    return out


def _rows(cells: list[CellSummary], other_keys: list[str], hparams: dict[str, str] | None = None
          ) -> list[dict[str, Any]]:
    rows, previous = [], None
    for c in cells:
        row = cell_row(c)
        row["hparams"] = (hparams or {}).get(c.cell, "")
        values = dict(c.variant)
        row["variant_values"] = [values.get(k, "—") for k in other_keys]
        row["group_start"] = previous is not None and c.variant != previous
        previous = c.variant
        rows.append(row)
    return rows


def _distinct(sweep: SweepData, key: str) -> str:
    values = sweep.param_values(key)
    return ", ".join(values) if values else "—"


def provenance(sweep: SweepData) -> list[tuple[str, str]]:
    """What a reader needs to judge the numbers: backend, cost model, TTA resolution, machine."""
    runs = sweep.runs
    backends = sorted({r.params.get("backend") or r.tags.get("syncbench.backend") or r.params.get("cluster.backend", "?")
                       for r in runs})
    rows = [("Backend", ", ".join(backends) + ("  (simulated cluster: virtual clock, one process)"
                                               if backends == ["sim"] else ""))]
    sim = [r for r in runs if (r.params.get("backend") or r.params.get("cluster.backend")) == "sim"]
    if sim:
        sources = sorted({STEP_SOURCES.get(r.tags.get("syncbench.step_s_source", ""), "source not recorded")
                          for r in sim})
        used = sorted({float(r.metrics["step_time_s"]) for r in sim if "step_time_s" in r.metrics})
        shown = ", ".join(f"{v:.4g}" for v in used[:6]) + (f" … ({len(used)} values)" if len(used) > 6 else "")
        rows.append(("Sim compute: seconds per worker step", f"{shown or '—'} s ({'; '.join(sources)})"))
        rows.append(("Sim network: latency (alpha)", f"{_distinct(sweep, 'cluster.network.latency_s')} s"))
        rows.append(("Sim network: bandwidth (beta)", f"{_distinct(sweep, 'cluster.network.bandwidth_gbps')} Gbit/s"))
        straggler_keys = sorted({k for r in sim for k in r.params if k.startswith("cluster.stragglers.")})
        combos = sorted({", ".join(f"{k.split('.')[-1]}={r.params[k]}" for k in straggler_keys if k in r.params)
                         for r in sim})
        rows.append(("Sim stragglers", "; ".join(combos) or "—"))
    every = sweep.param_values("eval.every_s")
    res = f"{', '.join(every)} s of training clock (TTA is resolved to this interval)"
    one = [r.tta for r in sweep.usable_runs if r.workers == 1 and r.reached]
    if every and one:
        share = float(every[-1]) / min(one)
        res += f"; = {100 * share:.1f}% of the fastest 1-worker TTA"
        if share > EVAL_RESOLUTION_LIMIT:
            res += f" — coarser than the {EVAL_RESOLUTION_LIMIT:.0%} the TTA rules ask for: treat small differences with care"
    rows.append(("Evaluation interval", res))
    rows.append(("Target", f"{_distinct(sweep, 'target.metric')} "
                           f"{'≥' if sweep.target_mode == 'max' else '≤'} {_distinct(sweep, 'target.value')}"))
    rows.append(("Budget (censoring)", f"{_distinct(sweep, 'budget.train_time_s')} s of training clock"))
    rows.append(("Task", f"{_distinct(sweep, 'task.module')} on {_distinct(sweep, 'task.data')}, "
                         f"batch size {_distinct(sweep, 'batch_size')} per worker"))
    lr = sorted({_short_value(v) for v in sweep.param_values("task.module_args.lr")})
    if len(lr) == 1:
        rows.append(("Learning rate", lr[0]))
    elif lr:
        rows.append(("Learning rate", "differs between cells: see the summary table"))
    rows.append(("Seeds", ", ".join(map(str, sorted({r.seed for r in runs if r.seed is not None})))))
    differing = within_cell_differences(sweep)
    if differing:
        rows.append(("Differences within a cell", "; ".join(differing) + "  (runs of one cell are not identical "
                                                                        "apart from the seed: read its spread with care)"))
    rows.append(("Machine (host)", ", ".join(sweep.tag_values("syncbench.host")) or "—"))
    rows.append(("torch", ", ".join(sweep.tag_values("syncbench.torch")) or "—"))
    commits = sweep.tag_values("syncbench.git_commit")
    rows.append(("Git commit", ", ".join(c[:12] for c in commits) + ("  (runs span several commits!)"
                                                                      if len(commits) > 1 else "") or "—"))
    return rows


IGNORED_WITHIN_CELL = {"seed", "name"}


def within_cell_differences(sweep: SweepData) -> list[str]:
    """Config keys whose value differs between the seeds of one cell (other than the seed)."""
    by_cell: dict[str, list] = {}
    for r in sweep.runs:
        by_cell.setdefault(r.cell, []).append(r)
    out = []
    for cell, runs in by_cell.items():
        keys = sorted({k for r in runs for k in r.params} - IGNORED_WITHIN_CELL)
        varying = [k for k in keys if len({r.params.get(k) for r in runs}) > 1]
        if varying:
            out.append(f"{run_label(runs[0])}: {', '.join(varying)}")
    return out


def grid_keys(sweep: SweepData) -> list[str]:
    keys: dict[str, None] = {}
    for r in sweep.runs:
        for k in r.assignments:
            keys.setdefault(k, None)
    return list(keys)


def findings(sweep: SweepData, cells: list[CellSummary], claims: list[Claim]) -> list[str]:
    """A few plain sentences: at each worker count the fastest strategy where the data show one
    (``syncbench.analysis.headline``), then how many runs reached the target."""
    out = [g.line for g in glance_lines(cells)]
    excluded = sum(c.n_failed for c in cells)
    censored = sum(c.n_seeds - c.n_reached for c in cells)
    total = sum(c.n_seeds for c in cells)
    out.append(f"{total - censored} of {total} finished runs reached the target; {censored} censored"
               + (f"; {excluded} failed runs excluded" if excluded else "") + ".")
    return out


def embed_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _md_escape(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)), autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["md"] = _md_escape
    return env


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "sweep"


def _short_value(value: str | None) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.3g}" if not number.is_integer() else str(value)


def _tune_rows(sweep: SweepData) -> list[dict[str, Any]]:
    """Per tuned cell: trials, how many reached and were pruned, the best TTA and its values."""
    tune_cells: dict[str, list] = {}
    for r in sweep.tune_runs:
        tune_cells.setdefault(r.cell, []).append(r)
    rows = []
    for cell, runs in sorted(tune_cells.items()):
        reached = [r for r in runs if r.usable and r.reached]
        varying = sorted(k for k in {k for r in runs for k in r.params}
                         if len({r.params.get(k) for r in runs}) > 1 and k != "name")
        best = min(reached, key=lambda r: r.tta) if reached else None
        # the values the seeds ran with (the launcher's pick among tied best trials is Optuna's)
        used = next((r for r in sweep.runs if r.cell == cell and "syncbench.tuned_from" in r.tags), best)
        chosen = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short_value(used.params.get(k))}" for k in varying) if used else "—"
        rows.append({"cell": run_label(runs[0]), "trials": len(runs), "reached": len(reached),
                     "pruned": sum(r.outcome == "pruned" for r in runs),
                     "best": fmt_s(best.tta) if best else "—", "chosen": chosen or "—"})
    return rows


def build_context(sweep: SweepData, cells: list[CellSummary], claims: list[Claim], plots: list[Plot],
                  skipped: list[str], out_dir: Path, threats: list[Threat] = (),
                  threat_errors: list[str] = ()) -> dict[str, Any]:
    keys = grid_keys(sweep)
    other_keys = [k for k in keys if k not in ("strategy.name", "cluster.workers")]
    tune_rows = _tune_rows(sweep)
    rows = _rows(cells, other_keys, cell_hyperparameters(sweep))
    not_reached = [r for r in sweep.runs if not r.reached]
    return {
        "sweep": sweep,
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "report_host": socket.gethostname(),
        "tracking_uri": redact_uri(sweep.tracking_uri),
        "grid_keys": keys,
        "target_text": dict(provenance(sweep))["Target"],
        "has_variant": bool(other_keys),
        "variant_keys": [(k, short_key(k)) for k in other_keys],
        "show_mlperf": any(c.n_seeds >= 5 for c in cells),
        "n_runs": len(sweep.runs),
        "n_cells": len(cells),
        "rows": rows,
        "show_hparams": any(r["hparams"] for r in rows),
        "provenance": provenance(sweep),
        "findings": findings(sweep, cells, claims),
        "claims": claims,
        "threats": list(threats),
        "threat_errors": list(threat_errors),
        "not_testable": NOT_TESTABLE,
        "combine_rule": COMBINE_RULE,
        "alpha": ALPHA,
        "confidence": CONFIDENCE,
        "n_boot": N_BOOT,
        "n_perm": N_PERM,
        "plots": [{"file": p.filename, "title": p.title, "caption": p.caption,
                   "data": embed_png(out_dir / p.filename)} for p in plots],
        "skipped": skipped,
        "not_reached": [{"cell": run_label(r), "seed": r.seed, "outcome": r.outcome_label, "status": r.status,
                         "best": fmt_s(r.metrics.get("best_val")), "clock": fmt_s(r.metrics.get("clock_s")),
                         "error": r.tags.get("syncbench.error", "")[:300], "run_id": r.run_id} for r in not_reached],
        "superseded": len(sweep.superseded),
        "unfinished": len(sweep.unfinished),
        "tune_rows": tune_rows,
        "n_tune": len(sweep.tune_runs),
        "runs": [{"cell": run_label(r), "seed": r.seed, "outcome": r.outcome_label, "run_id": r.run_id,
                  "strategy": r.strategy, "workers": r.workers} for r in sweep.runs],
        "mlflow_version": _mlflow_version(),
    }


def _mlflow_version() -> str:
    try:
        import mlflow

        return mlflow.__version__
    except Exception:  # noqa: BLE001
        return "?"


def write_report(client, sweep_name: str, out_dir: Path, *, tracking_uri: str,
                 log_to_parent: bool = True) -> ReportResult:
    sweep = load_sweep(client, sweep_name, tracking_uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = summarize_cells(sweep)
    claims = evaluate_claims(sweep)  # a claim that raises is reported as such, the others stand
    for claim in claims:
        add_caveat(claim)
    plots, skipped = make_plots(sweep, cells, out_dir)  # likewise each figure
    threats, threat_errors = compute_threats(sweep, cells, claims)
    ctx = build_context(sweep, cells, claims, plots, skipped, out_dir, threats, threat_errors)
    env = _env()
    files = []
    (out_dir / "report.html").write_text(env.get_template("report.html.j2").render(**ctx), encoding="utf-8")
    (out_dir / "report.md").write_text(env.get_template("report.md.j2").render(**ctx), encoding="utf-8")
    (out_dir / "summary.csv").write_text(summary_csv(cells), encoding="utf-8")
    (out_dir / "claims.json").write_text(json.dumps([c.as_dict() for c in claims], indent=2, ensure_ascii=False),
                                         encoding="utf-8")
    (out_dir / "threats.json").write_text(json.dumps([t.as_dict() for t in threats], indent=2, ensure_ascii=False),
                                          encoding="utf-8")
    files = [out_dir / f for f in REPORT_FILES] + [out_dir / p.filename for p in plots]
    result = ReportResult(out_dir=out_dir, files=files, sweep=sweep, cells=cells, claims=claims, plots=plots,
                          parent_run_id=sweep.parent_run_id, threats=threats)
    if log_to_parent:
        if sweep.parent_run_id is None:
            result.warnings.append(f"sweep {sweep_name!r} has no parent run (syncbench.role=parent): the report was "
                                   f"not logged to MLflow")
        else:
            try:
                for path in files:
                    client.log_artifact(sweep.parent_run_id, str(path), artifact_path="report")
                result.logged_to_parent = True
            except Exception as exc:  # noqa: BLE001 - the report is written; say why MLflow lacks it
                result.warnings.append(f"the report was written to {out_dir} but could not be logged to the parent "
                                       f"run {sweep.parent_run_id}: {type(exc).__name__}: {exc}")
    return result


def run_report_command(args) -> int:
    """CLI entry (sweeps/cli.py): exit 0 when written, ConfigError (exit 2) on bad input."""
    from syncbench.experiments.recording import open_client
    from syncbench.experiments.workspace import workspace_dir

    tracking_uri = resolve_tracking_uri(getattr(args, "tracking_uri", None), getattr(args, "workspace", None))
    client = open_client(tracking_uri)
    out = Path(args.out).expanduser().resolve() if getattr(args, "out", None) else \
        workspace_dir(getattr(args, "workspace", None)) / "reports" / _safe_name(args.sweep_name)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    result = write_report(client, args.sweep_name, out, tracking_uri=tracking_uri)
    for warning in result.warnings:
        print(f"syncbench: warning: {warning}", file=sys.stderr)
    verdicts = ", ".join(f"({c.key}) {c.verdict_text}" for c in result.claims)
    print(f"report for sweep {args.sweep_name!r}: {len(result.sweep.runs)} runs in {len(result.cells)} cells; "
          f"claims: {verdicts}")
    print(f"wrote {out / 'report.html'}")
    if result.logged_to_parent:
        print(f"logged to MLflow run {result.parent_run_id} under artifacts/report/")
    return 0


__all__ = ["run_report_command", "write_report", "ReportResult", "strategy_sort_key"]
