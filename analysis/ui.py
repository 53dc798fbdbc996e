"""`syncbench ui` and `syncbench dashboard`: the MLflow UI and optuna-dashboard, on loopback.

`ui` starts ``mlflow server`` with the workspace's SQLite store (``mlflow.db``) and
artifacts (``artifacts/``), or a database ``--tracking-uri``, and prints its URL and the
runs page of the most recent sweep. `dashboard` starts optuna-dashboard over the
workspace's ``optuna.db`` (or ``--storage``) and prints the sweep's study page. The MLflow UI has
no authentication: anyone who can reach it can read, edit and delete every run. So it
binds 127.0.0.1 and refuses any other address unless ``--allow-remote`` is given, in which
case it warns.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from syncbench.analysis.server_guard import release, start_guard
from syncbench.experiments.config import ConfigError

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
    from syncbench.experiments.workspace import artifacts_dir, default_tracking_uri, workspace_dir

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
    url = f"http://{url_host(host)}:{port}"

    def announce() -> None:
        print(f"MLflow UI for {where}: {url}  (Ctrl-C to stop)", flush=True)
        try:
            latest = latest_sweep_runs_page(url)
        except Exception as exc:  # noqa: BLE001 - the UI works without this hint
            latest = None
            print(f"syncbench: could not look up the most recent sweep ({type(exc).__name__}: {exc})",
                  file=sys.stderr, flush=True)
        if latest:
            print(f"Most recent sweep {latest[0]!r}: {latest[1]}", flush=True)
        else:
            print("No sweep recorded yet: run `syncbench sweep SPEC.yaml`, then reload.", flush=True)

    return serve(server_command(store, artifacts, host, port), f"{url}/health", "MLflow UI", announce, env)


# MLflow 3.17's runs page restores a saved view from the experiment tag
# ``mlflow.sharedViewState.<key>`` when its URL carries ``viewStateShareKey=<key>`` and no search
# facet of its own (the UI's "Share" button writes such tags; plain JSON is accepted). The view
# holds what the URL cannot: the visible columns. Its search filter keeps the evaluation runs
# (tuning runs and the parent run are left out), so they are listed flat, not folded under the parent.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
EVAL_VIEW_KEY = "syncbench-evaluation-runs"
EVAL_FILTER = "tags.`syncbench.phase` = 'eval'"
FIRST_COLUMNS = ("strategy.name", "cluster.workers")
# the tag by which the runs page unfolds a parent run on load (its children of that type)
EVAL_RUN_TYPE = ("mlflow.runType", "evaluation")


def eval_view_state(grid_keys: list[str] | tuple[str, ...] = FIRST_COLUMNS) -> dict[str, Any]:
    """The saved runs-page view of a sweep's evaluation runs: filtered to them, with ``tta_s``,
    ``outcome``, strategy, workers, the grid's other keys and the seed as columns."""
    params = [*FIRST_COLUMNS, *(k for k in grid_keys if k not in FIRST_COLUMNS), "seed"]
    columns = ["metrics.`tta_s`", "tags.`outcome`", *(f"params.`{k}`" for k in params)]
    # facets and UI state left out take the page's defaults
    return {"searchFilter": EVAL_FILTER, "selectedColumns": columns, "columnOrder": columns,
            "runsHiddenMode": "SHOW_ALL"}


def save_eval_view(client, experiment_id: str, grid_keys: list[str] | tuple[str, ...] = FIRST_COLUMNS) -> None:
    """Store the evaluation-runs view on the experiment (idempotent: rewritten only when it changed)."""
    value = json.dumps(eval_view_state(grid_keys), separators=(",", ":"))
    key = SHARED_VIEW_TAG + EVAL_VIEW_KEY
    if client.get_experiment(experiment_id).tags.get(key) != value:
        client.set_experiment_tag(experiment_id, key, value)


def runs_page(base_url: str, experiment_id: str) -> str:
    """The MLflow UI page that lists a sweep's evaluation runs with their numbers (the view
    ``save_eval_view`` stored). MLflow 3.17's UI takes the experiment kind from its GenAI /
    Model-training switch (the browser's last choice, GenAI by default) rather than from the
    experiment's ``mlflow.experimentKind`` tag; the ``workflowType`` query selects model training."""
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={EVAL_VIEW_KEY}")


def sweep_link(tracking_uri: str, experiment_id: str, parent_run_id: str | None = None,
               workspace: str | os.PathLike | None = None) -> str:
    """How to look at a sweep: on a tracking server, the runs page of its evaluation runs
    (``runs_page``); for a database store, the ``syncbench ui`` command that serves it (and prints
    that page)."""
    from syncbench.experiments.workspace import redact_uri, ui_link

    if tracking_uri.startswith(("http://", "https://")):
        return runs_page(redact_uri(tracking_uri), experiment_id)
    return ui_link(tracking_uri, parent_run_id, experiment_id, workspace)


def latest_sweep_runs_page(tracking_uri: str) -> tuple[str, str] | None:
    """(sweep name, runs page URL) of the sweep whose parent run started last, asked of the
    tracking server at ``tracking_uri``; None when no sweep was recorded. The sweep's
    experiment gets its evaluation-runs view if it lacks one (sweeps recorded before it existed)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = client.search_experiments(max_results=1000)
    if not experiments:
        return None
    ids = [e.experiment_id for e in experiments]
    newest = None
    for i in range(0, len(ids), 100):  # the search API takes a bounded number of experiments at once
        found = client.search_runs(ids[i : i + 100], filter_string="tags.`syncbench.role` = 'parent'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found and (newest is None or found[0].info.start_time > newest.info.start_time):
            newest = found[0]
    if newest is None:
        return None
    name = newest.data.tags.get("syncbench.sweep") or newest.info.run_name
    try:
        grid = list(json.loads(newest.data.tags.get("syncbench.grid") or "{}"))
    except (ValueError, TypeError):
        grid = []
    save_eval_view(client, newest.info.experiment_id, grid or FIRST_COLUMNS)
    return name, runs_page(tracking_uri, newest.info.experiment_id)


def serve(cmd: list[str], health_url: str, what: str, announce, env: dict[str, str] | None = None) -> int:
    """Run a server in its own process group until it exits, Ctrl-C or SIGTERM; ``announce()``
    once it answers ``health_url``."""
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    guard = start_guard(proc.pid)  # ends the server's group if this command is killed (even SIGKILL)

    stopping = []

    def on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        # no exception from a handler: one raised at an unlucky point (inside ``finally``)
        # escapes and the interpreter dies of SIGINT; stop the server and let wait() return
        stopping.append(signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: Ctrl-C handling is the caller's
        previous = None
    try:
        if not wait_http_ok(health_url, proc) and not stopping:
            code = proc.poll()
            stop(proc)
            print(f"syncbench: the {what} did not start (exit code {code}); see its output above", file=sys.stderr)
            return 1
        announce()
        while proc.poll() is None and not stopping:
            time.sleep(0.1)
        code = proc.poll()
        if stopping:
            print(f"syncbench: stopping the {what}", file=sys.stderr, flush=True)
            return 0
        return 0 if code == 0 else 1
    except KeyboardInterrupt:
        print(f"syncbench: stopping the {what}", file=sys.stderr, flush=True)
        return 0
    finally:
        stop(proc)
        release(guard)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# ---- optuna-dashboard -------------------------------------------------------------------
def dashboard_command(storage_url: str, port: int) -> list[str]:
    return [sys.executable, "-m", "optuna_dashboard._cli", storage_url, "--host", "127.0.0.1", "--port", str(port),
            "--quiet"]


def sweep_studies(storage_url: str) -> list[tuple[str, int, Any]]:
    """(study name, study id, start time) of every sweep study (not the per-cell tuning
    studies ``<sweep>/tune/<cell>``), most recently started first."""
    import optuna

    storage = optuna.storages.get_storage(storage_url)
    try:
        rows = []
        for summary in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
            if "/tune/" in summary.study_name:
                continue
            rows.append((summary.study_name, storage.get_study_id_from_name(summary.study_name),
                         summary.datetime_start))
    finally:
        engine = getattr(storage, "engine", None)
        if engine is not None:
            engine.dispose()
    return sorted(rows, key=lambda r: (r[2] is not None, r[2]), reverse=True)
