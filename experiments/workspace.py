"""Where the embedded defaults live: one workspace directory (DESIGN.md "Commands")."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_WORKSPACE = "syncbench-runs"


def workspace_dir(override: str | os.PathLike | None = None) -> Path:
    """`--workspace`, else $SYNCBENCH_WORKSPACE, else ./syncbench-runs (absolute)."""
    raw = override or os.environ.get("SYNCBENCH_WORKSPACE") or DEFAULT_WORKSPACE
    return Path(raw).expanduser().resolve()


def default_tracking_uri(workspace: Path) -> str:
    return f"sqlite:///{workspace / 'mlflow.db'}"


def default_optuna_storage(workspace: Path) -> str:
    return f"sqlite:///{workspace / 'optuna.db'}"


def artifacts_dir(workspace: Path) -> Path:
    return workspace / "artifacts"


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """Cache for generated datasets: `data_args.root` if given, else <workspace>/data."""
    path = Path(root).expanduser() if root else workspace_dir() / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path
