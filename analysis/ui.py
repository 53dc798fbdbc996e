"""`syncbench ui`: the MLflow UI over the workspace store, bound to loopback.

Starts ``mlflow server`` with the workspace's SQLite store (``mlflow.db``) and artifacts
(``artifacts/``), or a database ``--tracking-uri``, and prints its URL. The MLflow UI has
no authentication: anyone who can reach it can read, edit and delete every run. So it
binds 127.0.0.1 and refuses any other address unless ``--allow-remote`` is given, in which
case it warns.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from experiments.config import ConfigError

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """The host to put in a URL for a bind address (all-interfaces binds are reached on loopback)."""
    bare = host.strip().strip("[]")
    if bare in ("0.0.0.0", ""):
        return "127.0.0.1"
    if bare == "::":
        return "[::1]"
    return f"[{bare}]" if ":" in bare else bare


def port_free(host: str, port: int) -> bool:
    bare = host.strip().strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bare if bare != "localhost" else "127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_http_ok(url: str, proc: subprocess.Popen | None = None, timeout: float = START_TIMEOUT_S) -> bool:
    """Poll ``url`` until it answers 200; False when ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def server_command(backend_store_uri: str, artifacts: Path | None, host: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--host", host.strip().strip("[]"), "--port", str(port), "--workers", "1"]
    if artifacts is not None:
        # artifacts logged through the server land in the workspace; runs logged directly keep their own paths
        cmd += ["--artifacts-destination", str(artifacts)]
    return cmd


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server and its workers (its own process group), then wait for them."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=STOP_TIMEOUT_S)


def _store(args) -> tuple[str, Path | None, str]:
    """(backend store URI, artifacts directory or None, description)."""
    from experiments.workspace import artifacts_dir, default_tracking_uri, workspace_dir

    uri = getattr(args, "tracking_uri", None)
    if uri:
        if uri.startswith(("http://", "https://")):
            raise ConfigError(f"--tracking-uri {uri}: this is already a tracking server; open it in a browser "
                              f"instead (syncbench ui serves a database store)")
        if uri.startswith("file:") or "://" not in uri:
            raise ConfigError(f"--tracking-uri {uri}: syncbench ui needs a database store (sqlite:///…, "
                              f"postgresql://…)")
        return uri, None, uri
    ws = workspace_dir(getattr(args, "workspace", None))
    ws.mkdir(parents=True, exist_ok=True)
    artifacts = artifacts_dir(ws)
    artifacts.mkdir(parents=True, exist_ok=True)
    note = "" if (ws / "mlflow.db").is_file() else " (empty: no run recorded yet)"
    return default_tracking_uri(ws), artifacts, f"workspace {ws}{note}"


def run_ui_command(args) -> int:
    host, port = str(args.host), int(args.port)
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: not a TCP port")
    if not is_loopback(host):
        if not getattr(args, "allow_remote", False):
            raise ConfigError(
                f"--host {host}: refusing to serve the MLflow UI on a non-loopback address. The UI has no "
                f"authentication: anyone who can reach {host}:{port} could read, change and delete every run. Keep "
                f"the default --host 127.0.0.1 and reach it through an SSH tunnel (ssh -L {port}:127.0.0.1:{port} "
                f"HOST), or pass --allow-remote to bind {host} anyway.")
        print(f"syncbench: WARNING: --allow-remote: the MLflow UI will listen on {host}:{port} without "
              f"authentication; anyone who can reach this address can read, change and delete every run. MLflow "
              f"only answers Host headers it allows (default: localhost and private addresses; set "
              f"MLFLOW_SERVER_ALLOWED_HOSTS to widen). Prefer an SSH tunnel to a loopback bind.", file=sys.stderr,
              flush=True)
    if not port_free(host, port):
        raise ConfigError(f"--port {port}: already in use on {host}; choose another with --port")
    store, artifacts, where = _store(args)
    env = dict(os.environ)
    # MLflow's background job runner serves GenAI features syncbench does not use; it slows start-up
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    proc = subprocess.Popen(server_command(store, artifacts, host, port), start_new_session=True, env=env)
    url = f"http://{url_host(host)}:{port}"

    def on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: Ctrl-C handling is the caller's
        previous = None
    try:
        if not wait_http_ok(f"{url}/health", proc):
            code = proc.poll()
            stop(proc)
            print(f"syncbench: the MLflow server did not start (exit code {code}); see its output above",
                  file=sys.stderr)
            return 1
        print(f"MLflow UI for {where}: {url}  (Ctrl-C to stop)", flush=True)
        code = proc.wait()
        return 0 if code == 0 else 1
    except KeyboardInterrupt:
        print("syncbench: stopping the MLflow UI", file=sys.stderr, flush=True)
        return 0
    finally:
        stop(proc)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
