"""The progress bar of a run on a terminal (either backend): training clock against the
budget and the current target metric."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from syncbench.experiments.config import RunConfig
from syncbench.experiments.tta import Evaluation


class RunProgress:
    """rich progress: training clock vs budget and the current target metric."""

    def __init__(self, config: RunConfig, enabled: bool):
        self.config, self.progress, self.task = config, None, None
        if enabled:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     TextColumn("clock {task.completed:.2f}/{task.total:g} s"),
                                     TextColumn("{task.fields[metric]}"), TimeElapsedColumn())

    def __enter__(self) -> "RunProgress":
        if self.progress:
            self.progress.start()
            self.task = self.progress.add_task(self.config.name, total=self.config.budget.train_time_s, metric="")
        return self

    def update(self, ev: Evaluation) -> None:
        if self.progress:
            target = self.config.target
            value = ev.metrics.get(target.metric, float("nan"))
            self.progress.update(self.task, completed=ev.clock_s,
                                 metric=f"{target.metric}={value:.4f} (target {target.value})")

    def __exit__(self, *exc: Any) -> None:
        if self.progress:
            self.progress.stop()
