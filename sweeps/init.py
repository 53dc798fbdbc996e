"""`syncbench init DIR`: a task module, a run config and a sweep spec to start from.

The files come from ``sweeps/templates/`` (package data, so this works from an installed
wheel as well as from a clone). Existing files are never overwritten.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from syncbench.experiments.config import ConfigError

FILES = {"my_task.py": "my_task.py.tmpl", "run.yaml": "run.yaml.tmpl", "sweep.yaml": "sweep.yaml.tmpl"}


def init_project(directory: str | Path) -> list[Path]:
    root = Path(directory)
    clashes = [str(root / name) for name in FILES if (root / name).exists()]
    if clashes:
        raise ConfigError(f"syncbench init {directory}: {', '.join(clashes)} already exist(s); "
                          f"choose an empty directory (nothing was written)")
    root.mkdir(parents=True, exist_ok=True)
    templates = resources.files("syncbench.sweeps") / "templates"
    written = []
    for name, template in FILES.items():
        text = (templates / template).read_text()
        if name.endswith(".yaml"):
            text = text.format(dir=str(directory).rstrip("/") or ".")
        (root / name).write_text(text)
        written.append(root / name)
    return written
