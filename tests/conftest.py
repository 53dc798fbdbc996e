"""Shared fixtures: a temp workspace (real MLflow/Optuna SQLite stores) and config loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.setenv("SYNCBENCH_WORKSPACE", str(ws))
    return ws


@pytest.fixture
def digits_config():
    from syncbench.experiments.config import load_config

    def make(*overrides: str):
        return load_config(CONFIGS / "digits_mlp.yaml", list(overrides))

    return make


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
