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

from analysis.ui import is_loopback, port_free, url_host, wait_http_ok

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui(workspace: Path, *args: str, out: Path) -> subprocess.Popen:
    """`syncbench ui` in its own process group (it starts mlflow server as a child)."""
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", "ui", "--workspace", str(workspace), *args],
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
    from sweeps.cli import main

    port = free_port()
    assert main(["ui", "--host", host, "--port", str(port), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and "--allow-remote" in err and host in err
    assert port_free("127.0.0.1", port)  # nothing was started
    assert not (tmp_path / "ws").exists()


def test_ui_rejects_a_port_in_use_and_an_http_tracking_uri(tmp_path, capsys):
    from sweeps.cli import main

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
