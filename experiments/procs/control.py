"""The control directory through which the launcher and its workers talk (``spec.json``,
``hb.R``, ``error.R.json``, ``progress.json``, ``result.json``, ``rank{R}.log``): files written
atomically, read back by the other side. Standard library only (a worker writes here before it
imports torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_error(control: Path, rank: int) -> dict[str, Any] | None:
    try:
        return json.loads((control / f"error.{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def attach_logs(recorder: Any, control: Path) -> None:
    try:
        for log in sorted(control.glob("rank*.log")):
            recorder._timed(recorder.client.log_artifact, recorder.run_id, str(log), "worker_logs")
    except Exception:  # noqa: BLE001 - logs are a courtesy
        pass
