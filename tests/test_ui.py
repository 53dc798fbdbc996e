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
"""


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A 4-trial sweep (2 cells x 2 seeds) recorded in its own workspace."""
    root = tmp_path_factory.mktemp("ui-sweep")
    spec = root / "tiny.yaml"
    spec.write_text(TINY_SWEEP.format(base=REPO / "experiments" / "configs" / "digits_mlp.yaml"))
    done = subprocess.run([sys.executable, "-m", "syncbench", "sweep", str(spec), "--workspace", str(root / "ws"),
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'ws' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ui-tiny")
    children = client.search_runs([exp.experiment_id], filter_string="tags.`syncbench.role` = 'trial'")
    assert len(children) == 4
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
def test_ui_prints_the_latest_sweeps_runs_page_and_it_lists_every_child_run(tiny_sweep, tmp_path):
    from tests.browser import chromium_page, require_chromium

    require_chromium()
    exp = tiny_sweep["experiment"]
    # experiments syncbench creates are training experiments, not GenAI ones
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    names = sorted(tiny_sweep["children"])
    assert names == ["name=async workers=2 seed=0", "name=async workers=2 seed=1",
                     "name=sync workers=2 seed=0", "name=sync workers=2 seed=1"]  # cell and seed
    port = free_port()
    proc = ui(tiny_sweep["ws"], "--port", str(port), out=tmp_path)
    try:
        line = read_line(tmp_path / "stdout", "Most recent sweep", proc)
        url = line.split(": ", 1)[1].strip()
        assert "'ui-tiny'" in line
        assert url == f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        with chromium_page() as page:
            page.goto(url)
            page.get_by_text("matching runs").first.wait_for()
            assert page.get_by_text("Model training").first.is_visible()
            # the sweep's parent run is listed with its children folded under it: unfold them
            parent = page.locator("[role=row]", has_text="ui-tiny").first
            parent.wait_for()
            parent.locator("button").first.click()
            for name in names:
                page.get_by_text(name, exact=True).first.wait_for()
            listed = page.inner_text("body")
            TEST_ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(TEST_ARTIFACTS / "mlflow-ui-sweep-runs.png"))
        assert all(name in listed for name in names)
        assert "5 matching runs" in listed  # the parent and its 4 children
    finally:
        terminate(proc)


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


def test_dashboard_refuses_an_unknown_sweep(tiny_sweep, capsys):
    from syncbench.sweeps.cli import main

    assert main(["dashboard", "no-such-sweep", "--workspace", str(tiny_sweep["ws"]), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "no-such-sweep" in err and "ui-tiny" in err
