"""``syncbench sweep SPEC --executor slurm``: the sweep's launchers as SLURM jobs (submitit).

This process validates the spec and the ``slurm:`` settings, asks SLURM whether it would run the
jobs (``sbatch --test-only``: a bad partition exits 2 with SLURM's message before any store or
job exists), sets the sweep up in the stores as any launcher does (studies, parent run, pinned
calibrations, enqueued trials), then submits ``--jobs K`` launcher jobs. Each job runs the same
sweep with ``--executor local --jobs 1`` against the same Optuna storage and MLflow tracking URI,
so the jobs share the work exactly as launchers on several machines do (docs/scaling-out.md):
trials claimed under the storage lock, each cell x seed once. Dist trials become jobs of their
own (``syncbench.sweeps.slurm_dist``).

This process then follows the sweep from the storage with the local launcher's display (progress,
one line per finished trial, the summary table) and watches its jobs in ``squeue``: a job that
ends while trials are left (cancelled, failed, out of time; its launcher failed and re-enqueued
the trial it held, or the heartbeat grace period does) is replaced, ``slurm.max_resubmits`` times
in all. Ctrl-C or SIGTERM cancels the jobs (their launchers record the trials in flight KILLED and
re-enqueue them) and records the sweep stopped; rerunning the command resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from syncbench.experiments import signals
from syncbench.experiments.config import ConfigError
from syncbench.sweeps.launch_options import LaunchOptions, SweepResult
from syncbench.sweeps.slurm_dist import dist_job_environment
from syncbench.sweeps.slurm_jobs import (
    cancel,
    job_parameters,
    live_jobs,
    make_executor,
    require_slurm,
    stores_shared,
    test_submission,
    why_ended,
)
from syncbench.sweeps.slurm_spec import SlurmSpec, check_dist_cells, slurm_settings
from syncbench.sweeps.spec import Sweep

CANCEL_WAIT_S = 60.0  # after Ctrl-C: how long the cancelled jobs get to record their trials KILLED
WIND_DOWN_S = 60.0  # after the last trial: how long running jobs get to close their launchers and exit


def slurm_launch(args: argparse.Namespace, sweep: Sweep, options: LaunchOptions) -> SweepResult:
    """Check everything SLURM and the stores allow, then run the sweep as jobs (module docstring)."""
    section = sweep.spec.slurm.model_dump(mode="json", exclude_unset=True) if sweep.spec.slurm else {}
    settings = slurm_settings(section, list(getattr(args, "slurm", []) or []), f"sweep spec {sweep.spec_path}")
    check_dist_cells(settings, sweep.cells, f"sweep spec {sweep.spec_path}")
    require_slurm()
    stores_shared(options.storage_url, options.tracking_uri)
    test_submission(job_parameters(settings, name=f"syncbench {sweep.name}"), "the sweep's launcher jobs")
    for workers in sorted({c.config.cluster.workers for c in sweep.cells if c.config.cluster.backend == "dist"}):
        test_submission(job_parameters(settings, name=f"syncbench-dist {sweep.name}", nodes=settings.nodes,
                                       tasks_per_node=workers // settings.nodes),
                        f"a dist trial's job of {workers} tasks on {settings.nodes} node(s)")
    folder = Path(settings.folder).expanduser().resolve() if settings.folder else options.workspace / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    command = launcher_command(args, sweep, options)
    env = dist_job_environment(settings, folder)
    return run_slurm_sweep(sweep, options, settings, folder, command, env)


def launcher_command(args: argparse.Namespace, sweep: Sweep, options: LaunchOptions) -> list[str]:
    """What each launcher job runs: this sweep, its stores and overrides, one trial at a time."""
    command = [sys.executable, "-m", "syncbench.sweeps.cli", "sweep", str(Path(sweep.spec_path).resolve()),
               "--executor", "local", "--jobs", "1", "--no-progress", "--storage", options.storage_url,
               "--tracking-uri", options.tracking_uri, "--workspace", str(options.workspace)]
    for item in args.set:
        command += ["--set", item]
    if getattr(args, "profile", None):
        command += ["--profile", str(Path(args.profile).resolve())]
    return command


def run_slurm_sweep(sweep: Sweep, options: LaunchOptions, settings: SlurmSpec, folder: Path, command: list[str],
                    env: dict[str, str]) -> SweepResult:
    """Set the sweep up, submit the launcher jobs, follow them to the end (module docstring)."""
    from syncbench.sweeps.calibration import preflight  # lazy: torch, Optuna, MLflow (CLI start-up time)
    from syncbench.sweeps.coordinator import Launcher, quiet_optuna

    t0 = time.perf_counter()
    quiet_optuna()
    with signals.armed_section():
        prepared = preflight(sweep)
    # the local launcher runs no trial: jobs=1 keeps it from starting a pool of worker processes
    launcher = Launcher(sweep, dataclasses.replace(options, jobs=1))
    try:
        launcher.setup(prepared)
        del prepared
        follower = Follower(launcher, settings, folder, command, env, options.jobs)
        stopped_by = follower.run()
        result = launcher.finish(time.perf_counter() - t0, stopped_by)
        if follower.gave_up and not stopped_by:
            launcher.display.err.print(f"[red]syncbench: the sweep's SLURM jobs ended before it did[/]: "
                                       f"{follower.gave_up}", highlight=False)
        return result
    finally:
        launcher.close()


class Follower:
    """The submitted launcher jobs and the sweep's progress, read from the storage."""

    def __init__(self, launcher: Any, settings: SlurmSpec, folder: Path, command: list[str],
                 env: dict[str, str], jobs: int):
        import submitit  # lazy: only --executor slurm needs it

        self.launcher, self.settings, self.jobs_wanted = launcher, settings, jobs
        self.display = launcher.display
        self.executor = make_executor(folder, job_parameters(settings, name=f"syncbench {launcher.sweep.name}"))
        # the job's environment is the submitting one (sbatch exports it), plus the dist-trial settings
        self.function = submitit.helpers.CommandFunction(["env", *(f"{k}={v}" for k, v in env.items()), *command],
                                                         cwd=os.getcwd(), verbose=True)
        self.folder = folder
        self.jobs: list[Any] = []
        self.resubmits_left = settings.max_resubmits
        self.gave_up: str | None = None
        self.seen: set[tuple[str, int]] = set()

    def submit(self) -> Any:
        try:
            job = self.executor.submit(self.function)
        except Exception as exc:  # noqa: BLE001 - sbatch refused after --test-only accepted
            raise ConfigError(f"--executor slurm: SLURM refused the launcher job: {str(exc).strip()}") from None
        self.jobs.append(job)
        return job

    def run(self) -> int | None:
        """Follow until every trial has finished, or no job is left; the signal that stopped it."""
        self._mark_seen()
        try:
            with self.display:
                for _ in range(self.jobs_wanted):
                    self.submit()
                ids = ", ".join(str(j.job_id) for j in self.jobs)
                self.display.note(f"submitted {len(self.jobs)} launcher job(s) to SLURM ({ids}); their logs: "
                                  f"{self.folder}/<job id>/")
                self._follow()
        except (signals.Interrupted, KeyboardInterrupt) as exc:
            signum = getattr(exc, "signum", int(signal.SIGINT))
            name = signals.signal_name(signum)
            self.display.err.print(f"[red]stopped by {name}[/]: cancelling the sweep's SLURM jobs ...",
                                   highlight=False)
            self._cancel_all()
            self.display.err.print(f"[red]stopped by {name}[/]: jobs cancelled; trials in flight were failed and "
                                   f"re-enqueued; rerun the same command to resume", highlight=False)
            return signum
        return None

    def _follow(self) -> None:
        poll_s = max(1.0, self.launcher.opt.poll_s)
        while True:
            signals.check()
            counts = self.launcher.counts()
            self.display.update(counts)
            self._new_lines(counts)
            live = live_jobs([str(j.job_id) for j in self.jobs])
            if counts.running == 0 and counts.finished >= counts.total:
                self._wind_down(live or {})
                return
            if live is not None:
                for job in [j for j in self.jobs if str(j.job_id) not in live]:
                    self.jobs.remove(job)
                    self._replace(job)
                if not self.jobs:
                    return
            time.sleep(poll_s)

    def _wind_down(self, live: dict[str, str]) -> None:
        """The sweep is over: jobs still waiting in the queue are cancelled (they would find
        nothing to do); running ones are given a while to close their launchers and leave."""
        cancel([job_id for job_id, state in live.items() if state == "PENDING"])
        ids = [job_id for job_id, state in live.items() if state != "PENDING"]
        deadline = time.monotonic() + WIND_DOWN_S
        while ids and time.monotonic() < deadline:
            now = live_jobs(ids)
            if now is not None and not now:
                return
            time.sleep(0.5)

    def _replace(self, job: Any) -> None:
        """A job ended while trials are left: submit another, while resubmissions are left."""
        why = why_ended(job)
        if self.resubmits_left <= 0:
            self.gave_up = f"{why}; no resubmission left (slurm.max_resubmits = {self.settings.max_resubmits})"
            self.display.warn(f"[red]{why}[/]: not replaced (slurm.max_resubmits)")
            return
        self.resubmits_left -= 1
        new = self.submit()
        self.display.warn(f"[yellow]{why}[/]: trials are left, submitted job {new.job_id} in its place")

    def _cancel_all(self) -> None:
        """Cancel every job and wait (a while) for them to leave the queue: their launchers
        record the trials in flight KILLED and re-enqueue them."""
        ids = [str(j.job_id) for j in self.jobs]
        cancel(ids)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while ids and time.monotonic() < deadline:
            live = live_jobs(ids)
            if live is not None and not live:
                break
            time.sleep(1.0)

    def _mark_seen(self) -> None:
        """Trials finished before this launch are not reported again as new."""
        for study in self.launcher._studies():
            for t in study.get_trials(deepcopy=False):
                if t.state.is_finished():
                    self.seen.add((study.study_name, t.number))

    def _new_lines(self, counts: Any) -> None:
        """One line per trial that finished since the last look (whichever job ran it)."""
        for study in self.launcher._studies():
            for t in study.get_trials(deepcopy=False):
                key = (study.study_name, t.number)
                if key in self.seen or not t.state.is_finished():
                    continue
                self.seen.add(key)
                attrs = t.user_attrs
                cell = self.launcher.cells.get(attrs.get("cell"))
                if cell is None:
                    continue
                phase = attrs.get("phase", "eval")
                outcome = attrs.get("outcome") or ("pruned" if t.state.name == "PRUNED" else t.state.name.lower())
                tta = attrs.get("tta_s") if outcome == "reached" else None
                self.display.trial_line(counts, phase, cell.label, attrs.get("seed") if phase == "eval" else None,
                                        outcome, tta, float(attrs.get("wall_s") or 0.0), attrs.get("error"))
