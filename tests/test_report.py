"""`syncbench report` end to end, on real sweeps of real runs recorded in MLflow (digits task).

Until the sweep launcher is used here, each sweep is built the way the launcher records
it (docs/metrics.md, sweeps/): one experiment named after the sweep, a parent run tagged
syncbench.sweep/role=parent, and one execute_run per cell x seed tagged
syncbench.sweep/role=trial/cell/seed/phase=eval under that parent.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from syncbench.analysis.ui import wait_http_ok

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "experiments" / "configs" / "digits_mlp.yaml"
TEST_ARTIFACTS = REPO / "test-artifacts"

# stragglers so that synchronous rounds wait; eval every 5 ms of training clock
SMALL_BASE = ["cluster.stragglers={kind: lognormal, sigma: 0.5}", "eval.every_s=0.005"]


# ---------------------------------------------------------------------------------------
# helpers


def build_sweep(workspace: Path, name: str, cells: list[dict], seeds: list[int], base: list[str] = (),
                per_seed: dict | None = None) -> tuple[str, str]:
    """Run every cell x seed with execute_run under a parent run, tagged like the launcher.
    ``per_seed`` maps (cell index, seed) to extra overrides. Returns (tracking URI, parent run id)."""
    from mlflow.tracking import MlflowClient

    from syncbench.experiments.config import load_config
    from syncbench.experiments.recording import get_or_create_experiment
    from syncbench.experiments.run import execute_run
    from syncbench.experiments.workspace import artifacts_dir, default_tracking_uri

    workspace.mkdir(parents=True, exist_ok=True)
    uri = default_tracking_uri(workspace)
    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, name, artifacts_dir(workspace).as_uri())
    parent = client.create_run(exp_id, run_name=name, tags={"syncbench.sweep": name, "syncbench.role": "parent"})
    for i, cell in enumerate(cells):
        cell_tag = ",".join(f"{k}={v}" for k, v in cell.items())
        for seed in seeds:
            extra = (per_seed or {}).get((i, seed), [])
            config = load_config(DIGITS, [*base, *(f"{k}={v}" for k, v in cell.items()), f"seed={seed}", *extra])
            execute_run(config, workspace=workspace, tracking_uri=uri, experiment=name,
                        parent_run_id=parent.info.run_id, run_name=f"{cell_tag},seed={seed}",
                        tags={"syncbench.sweep": name, "syncbench.role": "trial", "syncbench.cell": cell_tag,
                              "syncbench.seed": str(seed), "syncbench.phase": "eval"})
    client.set_terminated(parent.info.run_id, "FINISHED")
    return uri, parent.info.run_id


def grid(strategies, workers) -> list[dict]:
    return [{"strategy.name": s, "cluster.workers": n} for s in strategies for n in workers]


def report(workspace: Path, name: str, *extra: str) -> int:
    from syncbench.sweeps.cli import main

    return main(["report", name, "--workspace", str(workspace), *extra])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def claims_of(out: Path) -> dict[str, dict]:
    return {c["key"]: c for c in json.loads((out / "claims.json").read_text())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def wait_ok(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    assert wait_http_ok(url, proc, timeout), f"{url}: no HTTP 200 within {timeout} s (exit code {proc.poll()})"


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


# ---------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def report_ws(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report-ws")


@pytest.fixture(scope="module")
def small(report_ws):
    """digits: {sync, async} x {1, 4} workers x 2 seeds, and its report."""
    name = "small-sweep"
    uri, parent = build_sweep(report_ws, name, grid(["sync", "async"], [1, 4]), [0, 1], SMALL_BASE)
    assert report(report_ws, name) == 0
    out = report_ws / "reports" / name
    return {"name": name, "uri": uri, "parent": parent, "out": out}


# ---------------------------------------------------------------------------------------
# the report of a small real sweep


def test_report_writes_files_and_logs_them_to_the_parent_run(small):
    from mlflow.tracking import MlflowClient

    out = small["out"]
    for f in ("report.html", "report.md", "summary.csv", "claims.json", "tta_vs_workers.png", "curves.png",
              "sync_breakdown.png", "staleness.png", "efficiency.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    html = (out / "report.html").read_text()
    assert 'src="data:image/png;base64,' in html
    assert "src=\"http" not in html and "href=\"http" not in html  # self-contained
    logged = {a.path for a in MlflowClient(small["uri"]).list_artifacts(small["parent"], "report")}
    assert {"report/report.html", "report/report.md", "report/summary.csv", "report/tta_vs_workers.png"} <= logged
    md = (out / "report.md").read_text()
    assert "![Time to accuracy vs workers](tta_vs_workers.png)" in md


def test_report_states_backend_cost_model_eval_interval_and_provenance(small):
    import torch

    html = (small["out"] / "report.html").read_text()
    for needle in ("Backend", "sim", "0.0005", "lognormal", "sigma=0.5", "5e-05", "Gbit/s", "Evaluation interval",
                   "0.005 s of training clock", "pinned in the config", "Machine (host)", socket.gethostname(), torch.__version__,
                   "Git commit"):
        assert needle in html, needle


def test_summary_csv_equals_numbers_recomputed_from_mlflow(small):
    """Recompute the table from the raw MLflow runs with the client, independently of analysis/."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(small["uri"])
    exp = client.get_experiment_by_name(small["name"])
    runs = client.search_runs([exp.experiment_id], "tags.`syncbench.role` = 'trial'", max_results=1000)
    assert len(runs) == 8
    by_cell = defaultdict(list)
    for r in runs:
        by_cell[r.data.tags["syncbench.cell"]].append(r)
    rows = {row["cell"]: row for row in read_csv(small["out"] / "summary.csv")}
    assert set(rows) == set(by_cell) and len(rows) == 4

    expected = {}
    for cell, rs in by_cell.items():
        assert all(r.data.tags["outcome"] == "reached" for r in rs), "this sweep is built to reach the target"
        tta = [r.data.metrics["tta_s"] for r in rs]
        expected[cell] = {
            "workers": int(rs[0].data.params["cluster.workers"]),
            "n_seeds": len(rs), "n_reached": len(rs),
            "tta_median_s": statistics.median(tta), "tta_min_s": min(tta), "tta_max_s": max(tta),
            "samples_to_target_median": statistics.median(r.data.metrics["samples_to_target"] for r in rs),
            "time_per_sample_s": statistics.median(r.data.metrics["clock_s"] / r.data.metrics["samples"] for r in rs),
        }
    best_one = min(e["tta_median_s"] for e in expected.values() if e["workers"] == 1)
    for cell, e in expected.items():
        row = rows[cell]
        assert int(row["n_seeds"]) == e["n_seeds"] and int(row["n_reached"]) == e["n_reached"]
        assert int(row["n_censored"]) == 0 and int(row["workers"]) == e["workers"]
        for key in ("tta_median_s", "tta_min_s", "tta_max_s", "samples_to_target_median", "time_per_sample_s"):
            assert float(row[key]) == pytest.approx(e[key], rel=1e-12), (cell, key)
        speedup = best_one / e["tta_median_s"]
        assert float(row["speedup"]) == pytest.approx(speedup, rel=1e-12)
        if e["workers"] == 1:  # nothing scales in a one-worker cell
            assert row["scaling_efficiency"] == ""
        else:
            assert float(row["scaling_efficiency"]) == pytest.approx(speedup / e["workers"], rel=1e-12)
        assert row["tta_mlperf_mean_s"] == ""  # < 5 seeds


@pytest.mark.heavy
def test_report_html_renders_in_headless_chromium(small):
    from tests.browser import chromium_page, require_chromium

    require_chromium()
    out = small["out"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    TEST_ARTIFACTS.mkdir(exist_ok=True)
    shot = TEST_ARTIFACTS / "report-small-sweep.png"
    with chromium_page(width=1280, height=900) as page:
        page.goto((out / "report.html").as_uri(), wait_until="load")
        images = page.evaluate("[...document.images].map(i => ({ok: i.complete, w: i.naturalWidth, "
                               "h: i.naturalHeight, alt: i.alt}))")
        rows = page.evaluate("document.querySelectorAll('#summary-table tbody tr.cell-row').length")
        headers = page.evaluate("[...document.querySelectorAll('#summary-table thead th')].map(t => t.textContent)")
        verdicts = page.evaluate("[...document.querySelectorAll('section.claim')].map(s => s.id)")
        page.screenshot(path=str(shot), full_page=True)
    assert len(images) == len(pngs) >= 5
    assert all(i["ok"] and i["w"] > 0 and i["h"] > 0 for i in images), images
    assert rows == 4  # one row per cell
    assert "median TTA (s)" in headers and "reached" in headers
    assert verdicts == ["claim-a", "claim-b", "claim-c", "claim-d"]
    assert shot.stat().st_size > 10_000
    shutil.copytree(out, TEST_ARTIFACTS / "report-small-sweep", dirs_exist_ok=True)


def test_claims_section_is_complete_on_the_small_sweep(small):
    claims = claims_of(small["out"])
    assert set(claims) == {"a", "b", "c", "d"}
    for c in claims.values():
        assert c["verdict"] in ("supported", "refuted", "inconclusive", "underpowered", "not testable")
        assert c["test"] and c["rule"] and c["summary"]
    # 2 seeds per cell cannot make a one-sided rank test significant at 5%, whatever the data
    assert claims["b"]["verdict_text"] == "underpowered (needs >= 3 seeds)"
    assert claims["c"]["verdict_text"] == "underpowered (needs >= 4 seeds)"  # Brown–Forsythe: 3 per group is not enough
    assert claims["d"]["verdict"] == "not testable" and "checkpointing.enabled" in claims["d"]["summary"]
    html = (small["out"] / "report.html").read_text()
    assert "Decision rule" in html and "Mann–Whitney" in html and "bootstrap" in html


def test_report_of_an_unknown_sweep_is_bad_input(small, report_ws, tmp_path, capsys):
    assert report(report_ws, "no-such-sweep") == 2
    assert "no-such-sweep" in capsys.readouterr().err
    assert report(tmp_path / "empty-ws", "small-sweep") == 2  # no store there: nothing is created
    assert not (tmp_path / "empty-ws" / "mlflow.db").exists()


def test_report_honours_out_and_tracking_uri(small, tmp_path):
    out = tmp_path / "elsewhere"
    assert report(tmp_path / "unused-ws", small["name"], "--tracking-uri", small["uri"], "--out", str(out)) == 0
    assert (out / "report.html").is_file() and (out / "summary.csv").is_file()


# ---------------------------------------------------------------------------------------
# honesty: censored runs


@pytest.fixture(scope="module")
def censored(report_ws):
    """sync N=1 reaches; async N=4 reaches for seed 0 only: seeds 1 and 2 run on a link so slow
    (0.005 Gbit/s) that they are censored at the 0.3 s budget."""
    name = "censored-sweep"
    slow = ["cluster.network.bandwidth_gbps=0.005"]
    base = ["budget.train_time_s=0.3", "eval.every_s=0.01"]
    uri, parent = build_sweep(report_ws, name, grid(["sync"], [1]) + grid(["async"], [4]), [0, 1, 2], base,
                              per_seed={(1, 1): slow, (1, 2): slow})
    assert report(report_ws, name) == 0
    return {"name": name, "uri": uri, "out": report_ws / "reports" / name}


def test_censored_runs_are_shown_as_censored_never_as_their_budget(censored):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(censored["uri"])
    exp = client.get_experiment_by_name(censored["name"])
    runs = client.search_runs([exp.experiment_id], "tags.`syncbench.cell` = 'strategy.name=async,cluster.workers=4'")
    outcomes = sorted(r.data.tags["outcome"] for r in runs)
    assert outcomes == ["budget", "budget", "reached"]
    reached_tta = [r.data.metrics["tta_s"] for r in runs if r.data.tags["outcome"] == "reached"]
    assert all("tta_s" not in r.data.metrics for r in runs if r.data.tags["outcome"] == "budget")

    rows = {r["cell"]: r for r in read_csv(censored["out"] / "summary.csv")}
    row = rows["strategy.name=async,cluster.workers=4"]
    assert (row["n_seeds"], row["n_reached"], row["n_censored"]) == ("3", "1", "2")
    assert row["tta_median_s"] == "" and "no median" in row["tta_median_note"]  # < 2 reached: no median
    assert float(row["tta_min_s"]) == pytest.approx(reached_tta[0])
    assert row["tta_max_s"] == "" and "censored" in row["tta_max_note"]  # never the 0.3 s budget
    assert row["speedup"] == "" and row["samples_to_target_median"] == ""
    assert float(row["time_per_sample_s"]) > 0  # hardware efficiency is measured for censored runs too

    html = (censored["out"] / "report.html").read_text()
    assert "1/3" in html and "no median" in html and "&gt; 0.3 (censored)" in html
    section = html[html.index('id="censoring"'):html.index('id="methods"')]
    assert section.count("censored (&gt; 0.3 s budget)") == 2  # both censored runs listed
    md = (censored["out"] / "report.md").read_text()
    assert "> 0.3 (censored)" in md
    # this cell's seeds ran on different networks on purpose: the report says so
    assert "Differences within a cell" in md and "cluster.network.bandwidth_gbps" in md


# ---------------------------------------------------------------------------------------
# the claims section decides claim (b) both ways on sweeps built for it


@pytest.mark.heavy
def test_claim_async_faster_is_supported_under_heavy_stragglers(report_ws):
    """8 workers, each step 20x slower with probability 0.2: a sync round waits for its slowest
    worker almost every time, async does not wait at all."""
    name = "async-wins"
    build_sweep(report_ws, name, grid(["sync", "async"], [8]), [0, 1, 2, 3],
                ["cluster.stragglers={kind: bimodal, p: 0.2, slowdown: 20}", "eval.every_s=0.005"])
    assert report(report_ws, name) == 0
    out = report_ws / "reports" / name
    b = claims_of(out)["b"]
    assert b["verdict"] == "supported", b
    (row,) = b["comparisons"]
    assert row["label"] == "N=8" and row["verdict"] == "supported"
    html = (out / "report.html").read_text()
    section = html[html.index('id="claim-b"'):html.index('id="claim-c"')]
    assert "v-supported" in section and "ratio async/sync" in section


@pytest.mark.heavy
def test_claim_async_faster_is_refuted_on_a_slow_network(report_ws):
    """8 workers on a 0.05 Gbit/s network: every async update pushes and pulls the model
    through the parameter server's one link, sync all-reduces once per 8 gradients."""
    name = "async-loses"
    build_sweep(report_ws, name, grid(["sync", "async"], [8]), [0, 1, 2, 3],
                ["cluster.network.bandwidth_gbps=0.05", "eval.every_s=0.01"])
    assert report(report_ws, name) == 0
    out = report_ws / "reports" / name
    b = claims_of(out)["b"]
    assert b["verdict"] == "refuted", b
    html = (out / "report.html").read_text()
    section = html[html.index('id="claim-b"'):html.index('id="claim-c"')]
    assert "v-refuted" in section


# ---------------------------------------------------------------------------------------
# a tracking server on loopback serves the sweep and the report


@pytest.mark.heavy
def test_mlflow_server_serves_the_sweep_runs_and_the_report(small, report_ws):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", small["uri"], "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=report_ws,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # GenAI job runner: not needed
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ok(f"{base}/health", proc)
        exp = http_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={small['name']}")
        exp_id = exp["experiment"]["experiment_id"]
        found = http_json(f"{base}/api/2.0/mlflow/runs/search",
                          {"experiment_ids": [exp_id], "filter": "tags.`syncbench.role` = 'trial'",
                           "max_results": 100})
        assert len(found["runs"]) == 8
        tags = {t["key"]: t["value"] for t in found["runs"][0]["data"]["tags"]}
        assert tags["syncbench.sweep"] == small["name"] and tags["syncbench.phase"] == "eval"
        query = urllib.parse.urlencode({"run_id": small["parent"], "path": "report"})
        listed = http_json(f"{base}/api/2.0/mlflow/artifacts/list?{query}")
        paths = {f["path"] for f in listed["files"]}
        assert {"report/report.html", "report/summary.csv", "report/tta_vs_workers.png"} <= paths
        query = urllib.parse.urlencode({"run_uuid": small["parent"], "path": "report/report.html"})
        with urllib.request.urlopen(f"{base}/get-artifact?{query}", timeout=30) as resp:
            assert resp.status == 200 and resp.read().startswith(b"<!DOCTYPE html>")
    finally:
        stop_group(proc)


# ---------------------------------------------------------------------------------------
# degenerate sweeps: the report is always written, and each missing part says why


@pytest.fixture(scope="module")
def degenerate_ws(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("degenerate-ws")


def _html_and_md(workspace: Path, name: str) -> tuple[str, str]:
    out = workspace / "reports" / name
    return (out / "report.html").read_text(), (out / "report.md").read_text()


def test_report_of_one_seed_per_cell_and_a_cell_that_never_reaches_is_written(degenerate_ws, capsys):
    """4 cells x 1 seed (this made `syncbench report` exit 1 on the efficiency plot's empty
    legend); async at 4 workers on a 0.005 Gbit/s link never reaches the target."""
    name = "one-seed"
    build_sweep(degenerate_ws, name, grid(["sync", "async"], [1, 4]), [0],
                ["budget.train_time_s=0.3", "eval.every_s=0.01"], per_seed={(3, 0): ["cluster.network.bandwidth_gbps=0.005"]})
    assert report(degenerate_ws, name) == 0
    html, md = _html_and_md(degenerate_ws, name)
    claims = claims_of(degenerate_ws / "reports" / name)
    assert claims["b"]["verdict"] == "not testable" and "needs >= 2 finished seeds" in json.dumps(claims["b"])
    # no cell has a median samples-to-target: said in its place (the figure used to raise here)
    assert "The left panel is empty: no cell has 2 or more seeds reaching the target" in md
    assert "Threats to validity" in md and "Censored runs" in md and "Too few seeds" in md
    rows = {r["cell"]: r for r in read_csv(degenerate_ws / "reports" / name / "summary.csv")}
    assert rows["strategy.name=async,cluster.workers=4"]["n_reached"] == "0"
    assert 'id="threats"' in html and html.index('id="threats"') < html.index('id="summary"')


def test_report_of_a_single_worker_count_and_a_single_strategy_is_written(degenerate_ws):
    name = "single"
    build_sweep(degenerate_ws, name, grid(["sync"], [4]), [0, 1], SMALL_BASE)
    assert report(degenerate_ws, name) == 0
    html, md = _html_and_md(degenerate_ws, name)
    claims = claims_of(degenerate_ws / "reports" / name)
    assert claims["a"]["verdict"] == "not testable" and claims["b"]["verdict"] == "not testable"
    assert "efficiency: not drawn — the sweep has a single worker count" in md
    assert "staleness: not drawn" in md


def test_report_of_a_sweep_still_running_is_written(degenerate_ws):
    """One finished run and one still RUNNING (a live launcher); then a sweep with nothing
    finished yet: both reports are written and say what is missing."""
    from mlflow.tracking import MlflowClient

    name = "running"
    uri, parent = build_sweep(degenerate_ws, name, grid(["sync"], [1]), [0], SMALL_BASE)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    client.create_run(exp.experiment_id, run_name="in flight", tags={
        "syncbench.sweep": name, "syncbench.role": "trial", "syncbench.cell": "strategy.name=async,cluster.workers=4",
        "syncbench.seed": "0", "syncbench.phase": "eval", "mlflow.parentRunId": parent})
    assert report(degenerate_ws, name) == 0
    _, md = _html_and_md(degenerate_ws, name)
    assert "Missing runs" in md and "1 evaluation run(s) still RUNNING were left out" in md

    name = "nothing-yet"
    client.create_experiment(name, artifact_location=(degenerate_ws / "artifacts" / name).as_uri())
    exp = client.get_experiment_by_name(name)
    client.create_run(exp.experiment_id, tags={"syncbench.sweep": name, "syncbench.role": "parent"})
    client.create_run(exp.experiment_id, run_name="first", tags={
        "syncbench.sweep": name, "syncbench.role": "trial", "syncbench.cell": "strategy.name=sync,cluster.workers=1",
        "syncbench.seed": "0", "syncbench.phase": "eval"})
    assert report(degenerate_ws, name) == 0
    html, md = _html_and_md(degenerate_ws, name)
    assert "tta vs workers: not drawn — the sweep has no finished evaluation runs yet" in md
    assert all(c["verdict"] == "not testable" for c in claims_of(degenerate_ws / "reports" / name).values())
