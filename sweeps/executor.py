"""Running a sweep's claimed trials: each trial's run config (the cell, its overrides, the seed,
the pinned calibrations), ``--jobs`` at a time in worker processes (or inline), its result told
to Optuna; a signal or a full disk stops the trials in flight, which are failed and re-enqueued
so that a rerun retries them at once."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Future, ProcessPoolExecutor, wait

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from syncbench.analysis.ui import EVAL_RUN_TYPE, save_eval_view
from syncbench.experiments import signals
from syncbench.experiments.config import ConfigError, apply_overrides, validate_config
from syncbench.experiments.sim.calibration import STEP_SAMPLES_TAG, step_samples_tag
from syncbench.experiments.workspace import is_disk_full
from syncbench.sweeps.progress import cell_label, run_name
from syncbench.sweeps.storage import Heartbeat
from syncbench.sweeps.trial_queue import OBJECTIVE_NAME, Claim, Idle, mark_runs
from syncbench.sweeps.trials import (
    TrialJob,
    TrialReport,
    TuneContext,
    make_executor,
    objective_value,
    report_attrs,
    run_trial_job,
)

STOP_WAIT_S = 20.0  # after a signal: how long trials in worker processes get to record themselves KILLED


class TrialExecutor:
    """The ``Launcher``'s running of trials (see the module docstring); mixed into
    ``syncbench.sweeps.coordinator.Launcher``, whose queue, stores and display it uses."""

    def job(self, claim: Claim) -> TrialJob:
        """The trial's full run config: the cell, its overrides, the seed, the pinned step."""
        raw = apply_overrides(claim.cell.raw, {**claim.overrides, "seed": claim.seed})
        tags = {"syncbench.sweep": self.sweep.name, "syncbench.role": "trial", "syncbench.cell": claim.cell.id,
                "syncbench.seed": str(claim.seed), "syncbench.phase": claim.phase,
                "syncbench.optuna_trial": claim.ref, **claim.extra_tags}
        if claim.phase == "eval":
            # MLflow 3.17's runs page unfolds the parent of runs of this type, so the link that
            # `syncbench ui` prints lists the evaluation runs open under the sweep's parent run
            tags[EVAL_RUN_TYPE[0]] = EVAL_RUN_TYPE[1]
        if claim.cell.id in self.step_s:
            raw = apply_overrides(raw, {"cluster.compute.step_s": self.step_s[claim.cell.id]})
            tags["syncbench.step_s_source"] = "sweep"
            tags[STEP_SAMPLES_TAG] = step_samples_tag(self.step_samples[claim.cell.id])
        if claim.cell.id in self.codec_s:
            raw = apply_overrides(raw, {"cluster.compute.codec_s_per_mb": self.codec_s[claim.cell.id]})
        config = validate_config(raw, claim.ref)  # fail here, not in a worker, when a tuned value is invalid
        name = run_name(claim.cell, claim.phase, claim.seed, claim.trial.number)
        tune = None
        if claim.phase == "tune":
            spec = self.sweep.tune
            tune = TuneContext(storage_url=self.opt.storage_url, study_name=claim.study.study_name,
                               trial_id=claim.trial._trial_id, pruner=spec.pruner, metric=config.target.metric,
                               mode=config.target.mode, every_s=config.eval.every_s, race_best_s=claim.race_best_s,
                               race_margin=spec.race_margin, n_trials=spec.n_trials)
        return TrialJob(config=raw, tags=tags, run_name=name, experiment=self.sweep.name,
                        parent_run_id=self.parent_run_id, tracking_uri=self.opt.tracking_uri,
                        workspace=str(self.opt.workspace), tune=tune)

    def run(self) -> int | None:
        """Claim and run trials, ``jobs`` at a time, until the sweep is done or stopped.
        Returns the signal that stopped it (SIGTERM, SIGINT; None when it ran to the end or
        the disk filled): trials in flight record their runs KILLED, are failed in Optuna and
        re-enqueued, so a rerun retries them at once."""
        inflight: dict[Future, Claim] = {}
        self._label_views()
        try:
            with self.display:
                self.display.update(self.counts())
                self._loop(inflight)
        except (signals.Interrupted, KeyboardInterrupt) as exc:
            signum = getattr(exc, "signum", int(signal.SIGINT))
            name = signals.signal_name(signum)
            stopped = len(inflight)  # what the last line may claim: none may have started yet
            if stopped:
                self.display.err.print(f"[red]stopped by {name}[/]: stopping the trials in flight ...",
                                       highlight=False)
            self._stop(inflight, signum)
            what = (f"{stopped} trial(s) in flight were failed and their runs recorded KILLED; rerun the same "
                    f"command to resume (they are retried at once)" if stopped else
                    "no trial had started; rerun the same command to resume")
            self.display.err.print(f"[red]stopped by {name}[/]: {what}", highlight=False)
            return signum
        except Exception as exc:  # noqa: BLE001 - the disk filled under the launcher's own writes
            if not is_disk_full(exc):
                raise
            self._disk_filled(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            self._stop(inflight, None)
        self.executor.shutdown(wait=True)
        return None

    def _label_views(self) -> None:
        """What the MLflow UI and optuna-dashboard need to show the sweep at a glance: the
        experiment's evaluation-runs view (columns tta_s, outcome, the cell, the seed) and the
        objective's name. Best effort: the sweep runs without them (a note says why)."""
        try:
            save_eval_view(self.client, self.experiment_id, list(self.sweep.spec.grid))
            if self.study.metric_names != [OBJECTIVE_NAME]:
                self.study.set_metric_names([OBJECTIVE_NAME])
        except Exception as exc:  # noqa: BLE001 - e.g. a tracking server that refuses experiment tags
            self.display.note(f"[yellow]could not label the sweep for the UIs ({type(exc).__name__}: {exc})[/]")

    def _loop(self, inflight: dict[Future, Claim]) -> None:
        waiting_noted = False
        while True:
            signals.check()
            idle: Idle | None = None
            while len(inflight) < self.jobs and not self.disk_full:
                claim = self.claim()
                if isinstance(claim, Idle):
                    idle = claim
                    break
                self._submit(claim, inflight)
                self._collect(inflight)  # inline execution: the trial is already done
                signals.check()
            if inflight:
                wait(list(inflight), timeout=self.opt.poll_s, return_when=FIRST_COMPLETED)
                self._collect(inflight)
                continue
            if idle is Idle.DONE or self.disk_full:
                return
            if not waiting_noted:  # trials of another (or a killed) launcher are still RUNNING
                self.display.note(f"waiting for trials running elsewhere (a dead launcher's trials are "
                                  f"retried {self.opt.grace_s} s after their last heartbeat)")
                waiting_noted = True
            self.display.update(self.counts())
            time.sleep(self.opt.poll_s)

    def _pool_submit(self, fn, *args) -> Future:
        """Submit to the executor with SIGTERM/SIGINT shielded while it may start a worker
        process (``signals.shielded``): a worker starts with them ignored and installs its
        handler in ``syncbench.sweeps.trials._init_worker``, so a signal never kills one mid-import."""
        if not isinstance(self.executor, ProcessPoolExecutor):
            return self.executor.submit(fn, *args)  # inline: the trial runs here, signals must reach it
        with signals.shielded():
            return self.executor.submit(fn, *args)

    def _stop(self, inflight: dict[Future, Claim], signum: int | None) -> None:
        """Stop the trials in flight: pass the signal on to the worker processes (each trial
        records its run KILLED), give them ``STOP_WAIT_S`` to report, fail and re-enqueue the
        trials; a trial whose worker did not answer is abandoned (its run marked here)."""
        reason = f"stopped by {signals.signal_name(signum)}" if signum else f"the disk filled: {self.disk_full}"
        if isinstance(self.executor, ProcessPoolExecutor) and inflight:
            deadline = time.monotonic() + STOP_WAIT_S
            while not all(f.done() for f in inflight) and time.monotonic() < deadline:
                # again each second: a worker still starting ignores it (signals.shielded)
                for process in list((getattr(self.executor, "_processes", None) or {}).values()):
                    with contextlib.suppress(OSError, AttributeError, TypeError):
                        os.kill(process.pid, signum or signal.SIGTERM)
                wait(list(inflight), timeout=1.0)
        for future in [f for f in inflight if f.done()]:
            claim = inflight.pop(future)
            try:
                report = future.result()
            except BaseException as exc:  # noqa: BLE001 - a worker died or raised on its way out
                report = TrialReport(outcome="killed", error=f"{reason} ({type(exc).__name__})")
            self._tell(claim, report)
        for claim in inflight.values():
            self._abandon(claim, reason)
        inflight.clear()
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        # every trial has reported or been abandoned: nothing is left to record in the
        # workers, whose interpreter teardown (torch, Lightning, MLflow) took seconds here
        for process in processes:
            with contextlib.suppress(Exception):
                process.kill()

    def _disk_filled(self, what: str) -> None:
        """The disk under the stores filled: free the reserve so that the stop can be
        recorded, and stop claiming trials."""
        if self.disk_full is None:
            self.reserve.release()
            self.disk_full = (f"{what}. The sweep stopped; the trials in flight were failed. Free space on the disk "
                              f"holding {self.opt.workspace} (or the stores), then rerun the same command to resume.")

    def _submit(self, claim: Claim, inflight: dict[Future, Claim]) -> None:
        claim.heartbeat = Heartbeat(self.storage, claim.trial._trial_id, self.opt.heartbeat_s).start()
        if self.display.progress:
            self.display.update(self.counts())  # show the trial as running (inline: for its whole run)
        try:
            job = self.job(claim)
        except ConfigError as exc:
            future: Future = Future()
            future.set_result(TrialReport(outcome="failed", error=str(exc)))
        else:
            try:
                future = self._pool_submit(run_trial_job, job)  # --jobs 1: runs the trial now
            except BrokenExecutor:
                self.executor = make_executor(self.jobs, self.preload)
                future = self._pool_submit(run_trial_job, job)
            except (KeyboardInterrupt, signals.Interrupted) as exc:
                self._abandon(claim, f"stopped by {signals.signal_name(getattr(exc, 'signum', signal.SIGINT))}")
                raise
        inflight[future] = claim

    def _collect(self, inflight: dict[Future, Claim]) -> None:
        for future in [f for f in inflight if f.done()]:
            claim = inflight.pop(future)
            try:
                report = future.result()
            except BrokenExecutor as exc:  # a worker process died (OOM killer, a crash in native code)
                report = TrialReport(outcome="failed", error=f"worker process died: {exc}")
                mark_runs(self.client, self.experiment_id, claim.ref, "FAILED", report.error)
                self.executor.shutdown(wait=False, cancel_futures=True)
                self.executor = make_executor(self.jobs, self.preload)
            except Exception as exc:  # noqa: BLE001 - e.g. a KeyboardInterrupt result from a worker
                report = TrialReport(outcome="failed", error=f"{type(exc).__name__}: {exc}")
            self._tell(claim, report)

    def _tell(self, claim: Claim, report: TrialReport) -> None:
        """Record the result: a value (tta_s or the penalty) or FAIL, and the user attributes."""
        claim.heartbeat.stop()
        if report.extra.get("disk_full"):
            self._disk_filled(report.error or "the disk is full")
        if report.outcome == "killed" or report.extra.get("disk_full"):
            self._fail_and_retry(claim, report)
            return
        budget = claim.cell.config.budget.train_time_s
        value = objective_value(report, budget)
        attrs = report_attrs(report)
        for attempt in range(2):
            try:
                for key, val in attrs.items():
                    claim.trial.set_user_attr(key, val)
                if report.outcome == "pruned":
                    claim.study.tell(claim.trial, state=TrialState.PRUNED)
                elif value is None:
                    claim.study.tell(claim.trial, state=TrialState.FAIL)
                else:
                    claim.study.tell(claim.trial, value)
                break
            except UpdateFinishedTrialError:
                # another launcher declared it stale (no heartbeat for the grace period) and
                # enqueued a retry; this result stays in MLflow, the retry will be recorded too
                self.display.note(f"[yellow]{claim.ref} was failed as stale while running; its retry will run "
                                  f"again[/]")
                break
            except Exception as exc:  # noqa: BLE001
                # the disk filled between the run's end in MLflow and its result here: free the
                # reserve and record the result, or a resume would run the finished cell again
                if attempt or not is_disk_full(exc):
                    raise
                self._disk_filled(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        self.trials_run += 1
        self.trials_wall_s += report.wall_s
        counts = self.counts()
        self.display.update(counts)
        self.display.trial_line(counts, claim.phase, cell_label(claim.cell), claim.seed if claim.phase == "eval" else None,
                                report.outcome, report.tta_s, report.wall_s or time.perf_counter() - claim.started,
                                report.error)

    def _fail_and_retry(self, claim: Claim, report: TrialReport) -> None:
        """A trial stopped from outside (a signal, a full disk), not by its own fault: FAIL
        it with the reason, re-enqueue a copy at once (same parameters; the copy replaces it
        in the counts and in ``n_trials``), and end its MLflow run if its process could not."""
        reason = report.error or "stopped"
        status = "KILLED" if report.outcome == "killed" else "FAILED"
        extra = {"syncbench.signal": signals.signal_name(report.extra["signal"])} if report.extra.get("signal") else {}
        mark_runs(self.client, self.experiment_id, claim.ref, status, reason, extra)
        with self.lock():
            try:
                claim.trial.set_user_attr("outcome", report.outcome)
                claim.trial.set_user_attr("error", reason)
                claim.study.tell(claim.trial, state=TrialState.FAIL)
                self._retry(claim)
            except Exception as exc:  # noqa: BLE001 - failed as stale meanwhile; its retry exists
                if is_disk_full(exc):
                    raise
        self.trials_run += 1
        self.trials_wall_s += report.wall_s
        counts = self.counts()
        self.display.update(counts)
        self.display.trial_line(counts, claim.phase, cell_label(claim.cell), claim.seed if claim.phase == "eval" else None,
                                # not "failed": it is re-enqueued, so the counts do not call it failed either
                                "stopped, retried on resume", None, report.wall_s or time.perf_counter() - claim.started,
                                reason)

    def _abandon(self, claim: Claim, reason: str) -> None:
        """Fail a trial we cannot finish; its MLflow run must not stay RUNNING."""
        if claim.heartbeat:
            claim.heartbeat.stop()
        with contextlib.suppress(Exception):  # best effort on the way out; the heartbeat covers the rest
            mark_runs(self.client, self.experiment_id, claim.ref, "KILLED", reason)
        try:
            with self.lock():
                claim.trial.set_user_attr("error", reason)
                claim.study.tell(claim.trial, state=TrialState.FAIL)
                self._retry(claim)
        except Exception:  # noqa: BLE001
            pass

    def _retry(self, claim: Claim) -> None:
        """Enqueue the copy of a stopped trial (its parameters and cell; not its result)."""
        frozen = claim.study._storage.get_trial(claim.trial._trial_id)
        frozen.user_attrs = {k: v for k, v in frozen.user_attrs.items() if k not in ("outcome", "error")}
        self.stale.retry(claim.study, frozen)  # a trial stopped by a signal: re-enqueued at once, however often
