"""MLflow recording of one run: params, buffered metric batches, tags and artifacts.

Per-step synchronous logging to SQLite costs milliseconds per value (FACTS.md), more than
a small model's training step, so metrics are buffered and written with ``log_batch``
(at most 1000 metrics and 100 params/tags per request), flushed at the end and on failure.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from syncbench.experiments.config import ConfigError
from syncbench.experiments.workspace import (
    check_not_locked,
    corrupt_store_message,
    is_corrupt_store,
    is_disk_full,
    release_reserve,
)

# MLflow takes seconds to import, torch too, and a store's driver is needed only for that kind
# of store: each is imported by the function that needs it, so that importing this module
# (every backend does; the report and the UI read runs with it, without torch) stays fast

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
FLUSH_EVERY = 1000  # buffered metric values before an automatic flush


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags() -> dict[str, str]:
    import torch  # lazy: see the imports

    return {"syncbench.git_commit": git_commit(), "syncbench.torch": torch.__version__, "syncbench.host": socket.gethostname()}


def probe_store(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a store that does not answer: MLflow itself retries for minutes."""
    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        check_not_locked(tracking_uri[len("sqlite:///"):], "--tracking-uri")
    elif scheme in ("postgresql", "mysql", "mssql"):
        import sqlalchemy  # lazy: see the imports

        engine = sqlalchemy.create_engine(tracking_uri, connect_args={"connect_timeout": int(timeout_s)})
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    elif scheme in ("http", "https"):
        import requests  # lazy: see the imports

        requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()


def open_client(tracking_uri: str):
    """An MlflowClient on a store that answers; an unreachable store is bad input (exit 2)."""
    from mlflow.tracking import MlflowClient  # lazy: see the imports

    # MLflow logs each failed SQL statement with its traceback before raising it; syncbench
    # reports the raised error itself, in one paragraph (a full disk, a corrupt store)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

    try:
        probe_store(tracking_uri)
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    except ConfigError:  # said already, in one line (a locked store)
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
        if is_corrupt_store(exc):
            raise ConfigError(corrupt_store_message("--tracking-uri", tracking_uri, exc)) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"--tracking-uri {tracking_uri}: the MLflow store cannot be reached "
                          f"({type(exc).__name__}: {first_line})") from None
    return client


# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it
# holds model training runs; with this tag it opens on the runs table.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def get_or_create_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """Experiment id by name; creation races between concurrent launchers are benign.
    The experiment is marked as a training experiment (EXPERIMENT_KIND_TAG)."""
    from mlflow.exceptions import MlflowException  # lazy: see the imports

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # created by an older syncbench or by hand
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class RunRecorder:
    """One MLflow run. ``log_seconds`` accumulates the time spent talking to MLflow."""

    def __init__(self, client, experiment_id: str, run_name: str, tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None):
        from mlflow.entities import Metric, Param, RunTag  # lazy: see the imports

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.client = client
        self.log_seconds = 0.0
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        t0 = time.perf_counter()
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        self.log_seconds += time.perf_counter() - t0
        self.run_id: str = run.info.run_id
        self.start_ms: int = run.info.start_time
        self._metrics: list[Any] = []
        self._finished = False

    def _timed(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.log_seconds += time.perf_counter() - t0

    def log_params(self, params: dict[str, Any]) -> None:
        items = [self._Param(k, "None" if v is None else str(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._timed(self.client.log_batch, self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [self._RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._timed(self.client.log_batch, self.run_id, tags=items[i : i + MAX_PARAMS_PER_BATCH])

    def metric(self, key: str, value: float, step: int = 0, clock_s: float | None = None) -> None:
        """Buffer one value; ``timestamp`` = run start + training clock (docs/metrics.md)."""
        ts = self.start_ms + int(round((clock_s or 0.0) * 1000))
        self._metrics.append(self._Metric(key, float(value), ts, int(step)))
        if len(self._metrics) >= FLUSH_EVERY:
            self.flush()

    def metrics(self, values: dict[str, float], step: int = 0, clock_s: float | None = None) -> None:
        for key, value in values.items():
            self.metric(key, value, step, clock_s)

    def flush(self) -> None:
        pending, self._metrics = self._metrics, []
        for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
            try:
                self._timed(self.client.log_batch, self.run_id, metrics=pending[i : i + MAX_METRICS_PER_BATCH])
            except BaseException:
                self._metrics = pending[i:] + self._metrics  # kept for the next flush (e.g. after space is freed)
                raise

    def log_text(self, text: str, filename: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, filename)
            with open(path, "w") as fh:
                fh.write(text)
            self._timed(self.client.log_artifact, self.run_id, path)

    @property
    def finished(self) -> bool:
        """Whether the run has been ended (FINISHED, FAILED or KILLED) by this recorder."""
        return self._finished

    def finish(self, status: str = "FINISHED") -> None:
        if self._finished:
            return
        self.flush()
        self._timed(self.client.set_terminated, self.run_id, status)
        self._finished = True

    def fail(self, error: BaseException | str) -> None:
        """Flush what was measured, then mark the run FAILED with the error as a tag. When
        the disk is full, the workspace's reserve (``syncbench.experiments.workspace.SpaceReserve``,
        held by ``run`` and ``sweep``) is given up to record it, rather than leave the run
        RUNNING."""
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        for attempt in range(2):
            try:
                try:
                    self.flush()
                finally:
                    self.set_tags({"outcome": "failed", "syncbench.error": message[:4900]})
                    self.finish("FAILED")
                return
            except Exception as exc:  # noqa: BLE001
                if attempt or not is_disk_full(exc) or not release_reserve():
                    raise
