"""One launcher process's view of a sweep (``Launcher``): the stores, the studies, the MLflow
experiment and parent run, set up (or found again on a resume), the sweep's calibrations pinned,
then trials claimed (``syncbench.sweeps.trial_queue``) and run (``syncbench.sweeps.executor``)
until none is left, and the parent run closed with the summary table."""

from __future__ import annotations

import contextlib
import copy
import json
import time
import warnings
from concurrent.futures import Executor
from typing import Any

import optuna
from mlflow.entities import Metric, Param, RunTag
from optuna.trial import TrialState

from syncbench.experiments import signals
from syncbench.experiments.config import ConfigError
from syncbench.experiments.recording import get_or_create_experiment, open_client
from syncbench.analysis.ui import sweep_link
from syncbench.experiments.workspace import SpaceReserve, artifacts_dir, redact_uri
from syncbench.sweeps.calibration import pin_codec_costs, pin_step_times
from syncbench.sweeps.capacity import cap_jobs
from syncbench.sweeps.executor import TrialExecutor
from syncbench.sweeps.launch_options import LaunchOptions, SweepResult
from syncbench.sweeps.progress import SweepDisplay
from syncbench.sweeps.spec import Sweep, format_value
from syncbench.sweeps.storage import StorageLock, open_storage, redact, use_wal
from syncbench.sweeps.trial_queue import RESULT_ATTRS, StaleTrialHandler, TrialQueue, replaced_trials
from syncbench.sweeps.trials import make_executor, warm_up

MEMORY_LIMIT_TAG = "syncbench.memory_limit_bytes"  # parent run: the spec's analysis.memory_limit_bytes (JSON)
FINGERPRINT_ATTR, PARENT_ATTR = "syncbench.fingerprint", "syncbench.mlflow_parent_run_id"


class Launcher(TrialQueue, TrialExecutor):
    """One launcher process's view of a sweep: stores, studies, claims, trials in flight."""

    def __init__(self, sweep: Sweep, options: LaunchOptions):
        self.sweep, self.opt = sweep, options
        self.cells = {cell.id: cell for cell in sweep.cells}
        self.lock = StorageLock(options.storage_url)
        self.stale = StaleTrialHandler(options.grace_s)
        self.reserve = SpaceReserve(options.workspace)
        self.disk_full: str | None = None  # set when the disk filled: the sweep stops
        with self.lock():  # first use creates the tables: one launcher at a time
            use_wal(options.storage_url)
            use_wal(options.tracking_uri)
            self.storage = open_storage(options.storage_url, heartbeat_s=options.heartbeat_s,
                                        grace_s=options.grace_s, stale_callback=self.stale)
            self.client = open_client(options.tracking_uri)
        self.display = SweepDisplay(sweep.name, bar=options.bar, lines=options.lines)
        self.step_s: dict[str, float] = {}  # cell id -> step_s pinned by the sweep
        self.codec_s: dict[str, float] = {}  # cell id -> codec_s_per_mb pinned by the sweep (compression)
        self.step_samples: dict[str, list[float]] = {}  # cell id -> the calibration's block medians
        self.eval_enqueued: set[str] = set()  # tuned cells whose eval trials this launch enqueued
        self.untunable: set[str] = set()  # tuned cells without a single COMPLETE tuning trial
        self.trials_run, self.trials_wall_s = 0, 0.0
        # task modules imported once by the forkserver that the --jobs workers are forked from
        self.preload = sorted({path.partition(":")[0] for cell in sweep.cells
                               for path in (cell.config.task.module, cell.config.task.data)})
        self.executor: Executor | None = None
        self.jobs = options.jobs  # --jobs as capped by what the machine holds (setup)

    def setup(self, prepared: dict[str, Any]) -> None:
        """Create or load the studies, the experiment and the parent run; calibrate; enqueue."""
        with self.lock():
            self._refuse_lost_study()
            # eval trials are all enqueued, never sampled: the sampler is never consulted
            self.study = optuna.create_study(study_name=self.sweep.name, storage=self.storage,
                                             sampler=optuna.samplers.RandomSampler(seed=0),
                                             direction="minimize", load_if_exists=True)
            self._check_fingerprint()
            self.step_s, self.step_samples = pin_step_times(self.sweep, self.study, prepared)
            self.codec_s = pin_codec_costs(self.sweep, self.study, prepared)
            self.experiment_id = self._experiment()
            self.parent_run_id = self._parent_run()
            self.stale.client, self.stale.experiment_id = self.client, self.experiment_id
            self.tune_studies = {cell.id: self._tune_study(cell) for cell in self.sweep.cells} if self.sweep.tune else {}
            self._fail_stale()
            self._rerun_lost_runs()
            if not self.sweep.tune:
                self._enqueue_eval(self.sweep.cells, {})
        self.reserve.hold()  # room to record a stop when the disk fills (check_workspace ensured it fits)
        # the pool starts after calibration, which must time a step on an otherwise idle machine
        counts = self.counts()
        capped = cap_jobs(self.opt.jobs, counts.total - counts.done)  # failed trials run again
        self.jobs = capped.jobs
        if capped.reason:
            self.display.warn(f"[yellow]--jobs {self.opt.jobs}: running {self.jobs} trial(s) at once, the most "
                              f"this machine holds ({capped.reason})[/]")
        self.executor = make_executor(self.jobs, self.preload)
        if self.jobs > 1:
            for _ in range(self.jobs):
                self._pool_submit(warm_up, self.opt.tracking_uri)

    def _check_fingerprint(self) -> None:
        """A resumed sweep must run the same base config and tuning (new cells and seeds are fine)."""
        mine = json.loads(json.dumps(self.sweep.fingerprint()))
        stored = self.study.user_attrs.get(FINGERPRINT_ATTR)
        if stored is None:
            self.study.set_user_attr(FINGERPRINT_ATTR, mine)
            return
        if stored == mine:
            return
        changes = _diff(stored.get("base", {}), mine["base"])
        if stored.get("tune") != mine["tune"]:
            changes.append(f"tune: {json.dumps(stored.get('tune'))} -> {json.dumps(mine['tune'])}")
        raise ConfigError(
            f"sweep {self.sweep.name!r} already exists in {redact(self.opt.storage_url)} with a different "
            f"configuration ({'; '.join(changes[:8])}). Resuming would mix two experiments: give the spec a new "
            f"name, or undo the change.")

    def _refuse_lost_study(self) -> None:
        """A study that is gone while the MLflow experiment holds the sweep's trial runs (an
        emptied or replaced Optuna store) is refused: running it anew would record every trial
        a second time into the same parent run."""
        if self.sweep.name in optuna.get_all_study_names(self.storage):
            return
        existing = self.client.get_experiment_by_name(self.sweep.name)
        if existing is None:
            return
        runs = [r for r in self.client.search_runs([existing.experiment_id], max_results=100,
                                                   filter_string="tags.`syncbench.role` = 'trial'")
                if r.data.tags.get("syncbench.sweep") == self.sweep.name]
        if runs:
            raise ConfigError(
                f"sweep {self.sweep.name!r}: the Optuna study is missing from {redact(self.opt.storage_url)}, but the "
                f"MLflow experiment {self.sweep.name!r} in {redact_uri(self.opt.tracking_uri)} holds its trial runs: "
                f"the two stores disagree, and running it anew would record every trial twice. Restore the study "
                f"store from a backup, or start fresh: give the spec a new name, or delete the experiment "
                f"(mlflow experiments delete, then mlflow gc) and run again")

    def _rerun_lost_runs(self) -> None:
        """Each finished trial is checked against its MLflow run (``mlflow_run_id``): a trial whose
        run is gone (an emptied or replaced tracking store, a deleted run) is run again, with a
        warning; its retry replaces it in the counts, as a stale trial's retry does."""
        present = self._run_ids()
        for study in self._studies():
            trials = study.get_trials(deepcopy=False)
            replaced = replaced_trials(trials)
            lost = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                    and t.number not in replaced and t.user_attrs.get("mlflow_run_id")
                    and t.user_attrs["mlflow_run_id"] not in present]
            for trial in lost:
                frozen = copy.deepcopy(trial)
                frozen.user_attrs = {k: v for k, v in frozen.user_attrs.items() if k not in RESULT_ATTRS}
                self.stale.retry(study, frozen)
            if lost:
                self.display.warn(
                    f"[yellow]{len(lost)} finished trial(s) of study {study.study_name!r} have no run in "
                    f"{redact_uri(self.opt.tracking_uri)} (emptied or replaced tracking store, or deleted runs): "
                    f"they run again[/]")

    def _run_ids(self) -> set[str]:
        """The ids of the sweep experiment's active runs."""
        ids: set[str] = set()
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=10_000, page_token=token)
            ids.update(r.info.run_id for r in page)
            token = page.token
            if not token:
                return ids

    def _experiment(self) -> str:
        existing = self.client.get_experiment_by_name(self.sweep.name)
        if existing is not None and existing.lifecycle_stage == "deleted":
            raise ConfigError(f"the MLflow experiment {self.sweep.name!r} is deleted: restore it "
                              f"(mlflow experiments restore) or purge it (mlflow gc) first")
        location = artifacts_dir(self.opt.workspace).as_uri() if self.opt.tracking_uri.startswith("sqlite") else None
        return get_or_create_experiment(self.client, self.sweep.name, location)

    def _parent_run(self) -> str:
        """The sweep's one parent run: found by its tags when resuming, else created."""
        found = self.client.search_runs(
            [self.experiment_id], filter_string="tags.`syncbench.role` = 'parent'",
            order_by=["attributes.start_time ASC"], max_results=10)
        found = [r for r in found if r.data.tags.get("syncbench.sweep") == self.sweep.name]
        spec = self.sweep.spec
        current = {"syncbench.grid": json.dumps(spec.grid), "syncbench.seeds": json.dumps(spec.seeds),
                   "syncbench.storage": redact(self.opt.storage_url), "syncbench.optuna_study": self.sweep.name,
                   "syncbench.step_s": json.dumps(sorted(set(self.step_s.values()))),
                   MEMORY_LIMIT_TAG: json.dumps(spec.analysis.memory_limit_bytes)}
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            for key in ("syncbench.stopped", "syncbench.signal"):  # what stopped an earlier launch
                if key in found[0].data.tags:
                    self.client.delete_tag(run_id, key)
        else:
            tags = {"syncbench.sweep": spec.name, "syncbench.role": "parent"}
            run_id = self.client.create_run(self.experiment_id, run_name=spec.name, tags=tags).info.run_id
            params = {"sweep": spec.name, "base": str(spec.base), "spec": str(self.sweep.spec_path),
                      "grid": json.dumps(spec.grid), "seeds": json.dumps(spec.seeds),
                      "set": json.dumps(self.sweep.overrides), "tune": json.dumps(spec.tune.model_dump(mode="json")
                                                                                  if spec.tune else None),
                      "cells": str(len(self.sweep.cells)), "trials": str(self.sweep.total_trials())}
            self.client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
            self.client.log_artifact(run_id, str(self.sweep.spec_path))
        # grid and seeds may grow on a resume: the tags always say what the sweep is now
        self.client.log_batch(run_id, tags=[RunTag(k, v[:5000]) for k, v in current.items()])
        self.study.set_user_attr(PARENT_ATTR, run_id)
        return run_id

    def finish(self, wall_s: float, stopped_by: int | None) -> SweepResult:
        """Close the parent run when the sweep is over, print the table, return the result."""
        counts = self.counts()
        interrupted = stopped_by is not None
        result = SweepResult(counts, wall_s, self.trials_run, self.trials_wall_s, self.parent_run_id, interrupted,
                             stopped_by, self.disk_full)
        finished = counts.running == 0 and counts.finished == counts.total
        if interrupted or self.disk_full:
            why = (f"stopped by {signals.signal_name(stopped_by)}" if interrupted else "the disk filled")
            with contextlib.suppress(Exception):
                self.client.log_batch(self.parent_run_id, tags=[RunTag("syncbench.stopped", why)] + (
                    [RunTag("syncbench.signal", signals.signal_name(stopped_by))] if interrupted else []))
            self.client.set_terminated(self.parent_run_id, "KILLED" if interrupted else "FAILED")
        elif finished:
            now = int(time.time() * 1000)
            self.client.log_batch(self.parent_run_id, metrics=[
                Metric("trials_complete", counts.done, now, 0), Metric("trials_failed", counts.failed, now, 0)])
            self.client.set_terminated(self.parent_run_id, "FAILED" if counts.failed else "FINISHED")
        link = sweep_link(self.opt.tracking_uri, self.experiment_id, self.parent_run_id)  # the evaluation runs
        where = (f"MLflow: experiment {self.sweep.name!r}, parent run {self.parent_run_id} in "
                 f"{redact_uri(self.opt.tracking_uri)}; view it: {link}\n"
                 f"Optuna: study {self.sweep.name!r} in {redact(self.opt.storage_url)}")
        if self.opt.table:
            self.display.table(self.summaries(), counts, wall_s, where)
        return result

    def close(self) -> None:
        self.reserve.release()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)  # a no-op after run() shut it down
        self.lock.close()


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {format_value(old.get(k))} -> {format_value(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO and warns that heartbeats are experimental; the
    progress display says what matters."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # we record heartbeats ourselves around ask/tell (syncbench.sweeps.storage.Heartbeat)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
