"""`syncbench ui`: the MLflow UI on loopback; anything else only with --allow-remote, and a warning."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from syncbench.analysis.ui import is_loopback, port_free, url_host, wait_http_ok

REPO = Path(__file__).resolve().parents[1]
TEST_ARTIFACTS = REPO / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui(workspace: Path, *args: str, out: Path) -> subprocess.Popen:
    """`syncbench ui` in its own process group (it starts mlflow server as a child)."""
    return subprocess.Popen([sys.executable, "-m", "syncbench", "ui", "--workspace", str(workspace), *args],
                            cwd=REPO, stdout=open(out / "stdout", "w"), stderr=open(out / "stderr", "w"),
                            start_new_session=True)


def wait_200(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    assert wait_http_ok(url, proc, timeout), f"{url}: no HTTP 200 within {timeout} s (exit code {proc.poll()})"


def terminate(proc: subprocess.Popen) -> int:
    """SIGTERM to `syncbench ui` only: it must stop its server itself."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for_text(path: Path, text: str, timeout: float = 60) -> None:
    """The command prints its URL once its own health check passed, which may be a moment
    after the server first answers the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)


def wait_port_free(port: int, host: str = "127.0.0.1", timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_free(host, port):
            return True
        time.sleep(0.3)
    return False


def test_loopback_detection():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "example.com", ""):
        assert not is_loopback(host), host
    assert url_host("0.0.0.0") == "127.0.0.1" and url_host("::1") == "[::1]"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::"])
def test_ui_refuses_a_non_loopback_bind_without_allow_remote(host, tmp_path, capsys):
    from syncbench.sweeps.cli import main

    port = free_port()
    assert main(["ui", "--host", host, "--port", str(port), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and "--allow-remote" in err and host in err
    assert port_free("127.0.0.1", port)  # nothing was started
    assert not (tmp_path / "ws").exists()


def test_ui_rejects_a_port_in_use_and_an_http_tracking_uri(tmp_path, capsys):
    from syncbench.sweeps.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--port", str(port), "--workspace", str(tmp_path)]) == 2
    assert "in use" in capsys.readouterr().err
    assert main(["ui", "--port", str(free_port()), "--tracking-uri", "http://127.0.0.1:5000"]) == 2
    assert "already a tracking server" in capsys.readouterr().err


@pytest.mark.heavy
def test_ui_serves_the_workspace_on_loopback_and_stops_on_sigterm(tmp_path):
    port = free_port()
    proc = ui(tmp_path / "ws", "--port", str(port), out=tmp_path)
    try:
        wait_200(f"http://127.0.0.1:{port}/", proc)
        wait_200(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10", proc)
        wait_for_text(tmp_path / "stdout", f"http://127.0.0.1:{port}")
    finally:
        code = terminate(proc)
    out = (tmp_path / "stdout").read_text()
    assert f"http://127.0.0.1:{port}" in out
    assert code == 0
    assert wait_port_free(port)  # the server went down with it
    assert (tmp_path / "ws" / "mlflow.db").is_file()  # the workspace store it served
    assert "WARNING" not in (tmp_path / "stderr").read_text()


@pytest.mark.heavy
def test_ui_binds_elsewhere_only_with_allow_remote_and_warns(tmp_path):
    port = free_port()
    proc = ui(tmp_path / "ws", "--host", "0.0.0.0", "--allow-remote", "--port", str(port), out=tmp_path)
    try:
        wait_200(f"http://127.0.0.1:{port}/health", proc)
        wait_for_text(tmp_path / "stdout", f":{port}")
    finally:
        code = terminate(proc)
    err = (tmp_path / "stderr").read_text()
    assert "WARNING" in err and "--allow-remote" in err and "without authentication" in err
    assert code == 0
    assert wait_port_free(port, "0.0.0.0")


# ---- the runs of a sweep in the MLflow UI, its studies in optuna-dashboard ----------------
TINY_SWEEP = """\
name: ui-tiny
base: {base}
set: {{budget.train_time_s: 2}}
grid:
  strategy.name: [sync, async]
  cluster.workers: [2]
seeds: [0, 1]
tune:
  n_trials: 2
  params:
    task.module_args.lr: {{low: 0.003, high: 0.03, log: true}}
"""
EVAL_NAMES = ["async N=2 s0", "async N=2 s1", "sync N=2 s0", "sync N=2 s1"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A sweep of 2 cells x 2 seeds, each cell tuned with 2 trials first, in its own workspace."""
    root = tmp_path_factory.mktemp("ui-sweep")
    spec = root / "tiny.yaml"
    spec.write_text(TINY_SWEEP.format(base=REPO / "experiments" / "configs" / "digits_mlp.yaml"))
    done = subprocess.run([sys.executable, "-m", "syncbench", "sweep", str(spec), "--workspace", str(root / "ws"),
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'ws' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ui-tiny")
    children = client.search_runs([exp.experiment_id], filter_string="tags.`syncbench.phase` = 'eval'")
    assert len(children) == 4
    tuning = client.search_runs([exp.experiment_id], filter_string="tags.`syncbench.phase` = 'tune'")
    assert sorted(r.info.run_name for r in tuning) == ["tune async N=2 #0", "tune async N=2 #1",
                                                       "tune sync N=2 #0", "tune sync N=2 #1"]
    return {"root": root, "ws": root / "ws", "experiment": exp,
            "children": {r.info.run_name: r.info.run_id for r in children}}


def read_line(path: Path, prefix: str, proc: subprocess.Popen, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                if line.startswith(prefix):
                    return line
        assert proc.poll() is None, f"exited with {proc.returncode}: {path.with_name('stderr').read_text()[-2000:]}"
        time.sleep(0.3)
    raise AssertionError(f"no line starting {prefix!r} in {path} within {timeout} s")


@pytest.mark.heavy
def test_ui_link_lists_the_evaluation_runs_with_tta_and_outcome_columns(tiny_sweep, tmp_path):
    """The link `syncbench ui` prints opens the sweep's evaluation runs (not its tuning runs),
    named in full, with tta_s, outcome, strategy, workers and seed on screen as columns."""
    from tests.browser import chromium_page, require_chromium

    require_chromium()
    exp = tiny_sweep["experiment"]
    # experiments syncbench creates are training experiments, not GenAI ones
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert sorted(tiny_sweep["children"]) == EVAL_NAMES  # cell and seed
    port = free_port()
    proc = ui(tiny_sweep["ws"], "--port", str(port), out=tmp_path)
    try:
        line = read_line(tmp_path / "stdout", "Most recent sweep", proc)
        url = line.split(": ", 1)[1].strip()
        assert "'ui-tiny'" in line
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?")
        with chromium_page(width=1400, height=900) as page:
            page.goto(url)
            page.get_by_text("matching runs").first.wait_for()
            assert page.get_by_text("Model training").first.is_visible()
            # the evaluation runs are listed open, each name whole in its cell
            names = {name: page.get_by_role("link", name=name, exact=True) for name in EVAL_NAMES}
            for link in names.values():
                link.first.wait_for()
            width = page.viewport_size["width"]
            headers = {}
            for title in ("tta_s", "outcome", "strategy.name", "cluster.workers", "seed"):
                header = page.locator("[role=columnheader]", has_text=title).first
                header.wait_for()
                box = header.bounding_box()
                # tta_s and outcome come first: on screen even beside MLflow's assistant panel
                on_screen = box is not None and header.is_visible() and box["x"] + box["width"] <= width
                headers[title] = on_screen and (title not in ("tta_s", "outcome") or box["x"] + box["width"] <= 1000)
            listed = page.inner_text("[role=grid]") if page.locator("[role=grid]").count() else page.inner_text("body")
            TEST_ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(TEST_ARTIFACTS / "mlflow-ui-sweep-runs.png"))
        assert all(headers.values()), headers
        assert "tune " not in listed  # tuning runs are filtered out
        for name in EVAL_NAMES:
            assert name in listed
    finally:
        terminate(proc)


def test_the_saved_view_is_what_mlflow_reads(tiny_sweep):
    """The view the link names is stored on the experiment as MLflow's shared views are: a
    tag ``mlflow.sharedViewState.<key>`` holding JSON with the search filter and columns."""
    import json

    from mlflow.tracking import MlflowClient

    from syncbench.analysis.ui import EVAL_VIEW_KEY, runs_page

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_sweep['ws'] / 'mlflow.db'}")
    exp = client.get_experiment(tiny_sweep["experiment"].experiment_id)
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{EVAL_VIEW_KEY}"])
    assert view["selectedColumns"][:2] == ["metrics.`tta_s`", "tags.`outcome`"]
    assert {"params.`strategy.name`", "params.`cluster.workers`", "params.`seed`"} <= set(view["selectedColumns"])
    # the filter keeps exactly the evaluation runs (MLflow's own search, not ours)
    found = client.search_runs([exp.experiment_id], filter_string=view["searchFilter"])
    assert sorted(r.info.run_name for r in found) == EVAL_NAMES
    assert f"viewStateShareKey={EVAL_VIEW_KEY}" in runs_page("http://h:1", exp.experiment_id)


def test_trials_carry_their_mlflow_run_id(tiny_sweep):
    import optuna

    study = optuna.load_study(study_name="ui-tiny", storage=f"sqlite:///{tiny_sweep['ws'] / 'optuna.db'}")
    ids = {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert ids == set(tiny_sweep["children"].values())


@pytest.mark.heavy
def test_dashboard_serves_the_sweeps_study_over_http(tiny_sweep, tmp_path):
    import json

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "syncbench", "dashboard", "--workspace", str(tiny_sweep["ws"]),
                             "--port", str(port)], cwd=REPO, stdout=open(tmp_path / "stdout", "w"),
                            stderr=open(tmp_path / "stderr", "w"), start_new_session=True)
    try:
        line = read_line(tmp_path / "stdout", "Sweep 'ui-tiny'", proc)
        page_url = line.split(": ", 1)[1].strip()
        study_id = int(page_url.rsplit("/", 1)[1])
        assert page_url == f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"
        wait_200(page_url, proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as resp:
            studies = json.load(resp)["study_summaries"]
        assert "ui-tiny" in {s["study_name"] for s in studies}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=30) as resp:
            detail = json.load(resp)
        trials = detail["trials"]
        assert len(trials) == 4 and all(t["state"] == "Complete" for t in trials)
        run_ids = {a["value"] for t in trials for a in t["user_attrs"] if a["key"] == "mlflow_run_id"}
        assert run_ids == set(tiny_sweep["children"].values())
    finally:
        code = terminate(proc)
    assert code == 0
    assert wait_port_free(port)


def test_trials_carry_their_cell_as_parameters_and_name_their_objective(tiny_sweep):
    """optuna-dashboard charts and ranks parameters: every evaluation trial has its cell and
    seed as parameters (matching the cell it ran), and every study calls its objective tta_s."""
    import optuna

    storage = f"sqlite:///{tiny_sweep['ws'] / 'optuna.db'}"
    study = optuna.load_study(study_name="ui-tiny", storage=storage)
    assert study.metric_names == ["tta_s"]
    seen = set()
    for t in study.trials:
        cell = dict(part.split("=", 1) for part in t.user_attrs["cell"].split(","))
        assert t.params == {"strategy": cell["strategy.name"], "workers": int(cell["cluster.workers"]),
                            "seed": t.user_attrs["seed"]}
        assert t.distributions["strategy"].choices == ("sync", "async")
        seen.add((t.params["strategy"], t.params["seed"]))
    assert seen == {(s, k) for s in ("sync", "async") for k in (0, 1)}
    for cell in ("strategy.name=sync,cluster.workers=2", "strategy.name=async,cluster.workers=2"):
        tune = optuna.load_study(study_name=f"ui-tiny/tune/{cell}", storage=storage)
        assert tune.metric_names == ["tta_s"]
        assert all("task.module_args.lr" in t.params for t in tune.trials)


@pytest.mark.heavy
def test_dashboard_page_shows_the_cells_parameters_without_a_server_exception(tiny_sweep, tmp_path):
    from tests.browser import chromium_page, require_chromium

    require_chromium()
    port = free_port()
    # optuna-dashboard itself, not quiet: its log is where a failed request leaves its traceback
    from syncbench.experiments.workspace import default_optuna_storage

    proc = subprocess.Popen([sys.executable, "-m", "optuna_dashboard._cli", default_optuna_storage(tiny_sweep["ws"]),
                             "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                            stdout=open(tmp_path / "stdout", "w"), stderr=open(tmp_path / "stderr", "w"),
                            start_new_session=True)
    try:
        wait_200(f"http://127.0.0.1:{port}/api/meta", proc)
        from syncbench.analysis.ui import sweep_studies

        study_id = next(i for name, i, _ in sweep_studies(default_optuna_storage(tiny_sweep["ws"]))
                        if name == "ui-tiny")
        with chromium_page() as page:
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}")
            page.get_by_text("Hyperparameter Importance").first.wait_for()
            page.get_by_text("Params = [strategy:").first.wait_for()  # the best trial's parameters
            for name in ("strategy", "workers", "seed"):  # the importance chart's parameter axis
                page.get_by_text(name, exact=True).first.wait_for()
            body = page.inner_text("body")
            TEST_ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(TEST_ARTIFACTS / "optuna-dashboard-eval-study.png"), full_page=True)
        assert "tta_s" in body and "Objective 0" not in body
        assert not errors, errors
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}/param_importances",
                                    timeout=30) as resp:
            assert resp.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    log = (tmp_path / "stderr").read_text()
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]


def test_dashboard_refuses_an_unknown_sweep(tiny_sweep, capsys):
    from syncbench.sweeps.cli import main

    assert main(["dashboard", "no-such-sweep", "--workspace", str(tiny_sweep["ws"]), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "no-such-sweep" in err and "ui-tiny" in err
