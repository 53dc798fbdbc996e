"""What a sweep shows while it runs (a rich progress bar: trials done/total, running,
failed, ETA; one line per finished trial) and at the end (a table of cells)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from syncbench.analysis.reader import short_key

# grid keys named by the label's head (``sync, N=8``) rather than as ``key=value``
HEAD_KEYS = ("strategy.name", "cluster.workers")


def cell_label(cell: Any) -> str:
    """How a cell is named on screen and in the report: ``sync, N=8``, then the grid's other
    keys (``local_sgd, N=8, local_steps=16``). ``cell`` is a ``syncbench.sweeps.spec.Cell``."""
    return ", ".join(_label_parts(cell))


def run_name(cell: Any, phase: str, seed: int, number: int) -> str:
    """An MLflow run's name, short enough to show whole in the runs table: ``sync N=8 s3``
    for an evaluation run, ``tune sync N=8 #4`` for tuning trial 4."""
    head = " ".join(_label_parts(cell))
    return f"{head} s{seed}" if phase == "eval" else f"tune {head} #{number}"


def _label_parts(cell: Any) -> list[str]:
    others = [f"{short_key(k)}={_value(v)}" for k, v in cell.assignment.items() if k not in HEAD_KEYS]
    return [str(cell.config.strategy.name), f"N={cell.config.cluster.workers}", *others]


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # e.g. stragglers {kind: lognormal, sigma: 0.3}
        return "/".join(_value(v) for v in value.values())
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@dataclass
class Counts:
    """Trials of the whole sweep (all launchers), from the storage."""

    total: int
    done: int = 0  # COMPLETE (any outcome)
    failed: int = 0  # FAIL for good (an exception; stale trials are retried, not counted)
    running: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed


@dataclass
class CellSummary:
    """The eval trials of one cell, for the final table."""

    label: str
    seeds: int
    outcomes: list[str] = field(default_factory=list)
    tta: list[float] = field(default_factory=list)  # reached runs only
    tuned: dict[str, Any] | None = None
    note: str = ""


class SweepDisplay:
    """Progress on stderr while the sweep runs; the summary table on stdout at the end.

    ``bar`` shows a live rich bar (only on a terminal); ``lines`` prints one line per
    finished trial (on a terminal above the bar, else as plain log lines).
    """

    def __init__(self, name: str, *, bar: bool, lines: bool):
        self.name = name
        self.err = Console(stderr=True)
        self.out = Console()
        if not self.out.is_terminal:  # a log file or a pipe: rich would assume 80 columns
            self.out = Console(width=140)
        self.lines = lines
        self.progress: Progress | None = None
        if bar and self.err.is_terminal:
            self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("running {task.fields[running]}"),
                                     TextColumn("[red]failed {task.fields[failed]}"), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=self.err)
        self._task = None

    def __enter__(self) -> "SweepDisplay":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress:
            self.progress.stop()

    def update(self, counts: Counts) -> None:
        if not self.progress:
            return
        if self._task is None:
            # trials finished by earlier launches count as done, not as speed for the ETA
            self._task = self.progress.add_task(f"sweep {self.name}", total=counts.total, completed=counts.finished,
                                                running=counts.running, failed=counts.failed)
        self.progress.update(self._task, total=counts.total, completed=counts.finished, running=counts.running,
                             failed=counts.failed)

    def note(self, message: str) -> None:
        """A line above the bar (or on stderr)."""
        if self.lines:
            self.warn(message)

    def warn(self, message: str) -> None:
        """A line printed even with ``--no-progress``: something the user must know."""
        (self.progress.console if self.progress else self.err).print(message, highlight=False)

    def trial_line(self, counts: Counts, phase: str, label: str, seed: int | None, outcome: str,
                   tta_s: float | None, wall_s: float, error: str | None = None) -> None:
        colour = {"reached": "green", "budget": "yellow", "diverged": "magenta", "pruned": "cyan"}.get(outcome, "red")
        what = f"{phase} {label}" + (f", seed {seed}" if seed is not None else "")
        tta = f" tta {tta_s:.3g} s" if tta_s is not None else ""
        why = f" — {error}" if error else ""
        self.note(f"[{counts.finished}/{counts.total}] {what}: [{colour}]{outcome}[/]{tta} (wall {wall_s:.1f} s){why}")

    def table(self, cells: list[CellSummary], counts: Counts, wall_s: float, where: str) -> None:
        """The end-of-sweep table: per cell, reached k/n and the TTA of the reached seeds."""
        table = Table(title=f"sweep {self.name}: {counts.done}/{counts.total} trials complete, "
                            f"{counts.failed} failed, {wall_s:.0f} s", title_justify="left")
        table.add_column("cell", no_wrap=True)
        table.add_column("reached", justify="right")
        table.add_column("median tta_s", justify="right")
        table.add_column("min–max tta_s", justify="right", no_wrap=True)
        table.add_column("other outcomes")
        if any(c.tuned for c in cells):
            table.add_column("tuned")
        for cell in cells:
            reached = sum(o == "reached" for o in cell.outcomes)
            others = ", ".join(f"{o} {cell.outcomes.count(o)}" for o in ("budget", "diverged", "failed")
                               if o in cell.outcomes)
            missing = cell.seeds - len(cell.outcomes)
            if missing:
                others = ", ".join(filter(None, [others, f"not run {missing}"]))
            row = [cell.label, f"{reached}/{cell.seeds}",
                   f"{statistics.median(cell.tta):.3g}" if cell.tta else "—",
                   f"{min(cell.tta):.3g}–{max(cell.tta):.3g}" if cell.tta else "—",
                   " ".join(filter(None, [others, cell.note])) or ""]
            if any(c.tuned for c in cells):
                row.append(", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in (cell.tuned or {}).items()))
            table.add_row(*row)
        self.out.print(table)
        self.out.print(where, highlight=False)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)

