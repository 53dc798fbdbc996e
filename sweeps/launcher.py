"""The sweep launcher: grid cells × seeds as Optuna trials and MLflow child runs,
optionally tuned first, resumable, safe with several launchers on one storage.

Layout in the stores (the report relies on it):

* Optuna: the study ``<name>`` holds one *eval* trial per cell × seed (user attributes
  ``cell``, ``seed``, ``phase``, ``overrides``; after the run ``outcome``, ``tta_s``,
  ``mlflow_run_id``, ``wall_s``); with ``tune:``, each cell also has a study
  ``<name>/tune/<cell id>`` of ``n_trials`` TPE trials (``phase = tune``). The value is
  ``tta_s`` or a penalty (see :mod:`syncbench.sweeps.trials`); each evaluation of a tuning trial is an
  intermediate value (the target metric) and a trial that ``tune.pruner`` stops is PRUNED
  (its MLflow run ``outcome=pruned``; it counts towards ``n_trials``). Study user attributes keep the spec's
  fingerprint, the calibrated ``step_s`` per task and the MLflow parent run id.
* MLflow: the experiment ``<name>``; one parent run (run name ``<name>``, tags
  ``syncbench.sweep``, ``syncbench.role=parent``; params ``base``, ``grid``, ``seeds``, ``set``,
  ``tune``, ...); one child run per trial (tags ``syncbench.sweep``, ``syncbench.role=trial``,
  ``syncbench.cell``, ``syncbench.seed``, ``syncbench.phase``, ``syncbench.optuna_trial =
  <study>/<number>``; params: the whole flattened config).

Work assignment: every eval trial is enqueued once (``Study.enqueue_trial``) and every
trial is claimed with ``Study.ask()``, both under the storage-wide lock of
:mod:`syncbench.sweeps.storage`, after re-reading the study. So two launchers never enqueue the same
cell × seed twice, never claim the same trial, and never sample more than ``n_trials``
tuning trials per cell. Resume: enqueueing only what has no COMPLETE, RUNNING or WAITING
trial makes a rerun finish what is missing (and retry what failed); a trial whose launcher
died stops beating its heartbeat, and after the grace period the next launcher fails it,
marks its MLflow run KILLED and enqueues a copy (``RetryHeartbeatStaleTrialCallback``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Executor, Future, wait
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

from syncbench.experiments import signals
from syncbench.experiments.config import ConfigError, apply_overrides, validate_config
from syncbench.experiments.workspace import (
    SpaceReserve,
    artifacts_dir,
    check_workspace,
    default_optuna_storage,
    default_tracking_uri,
    is_disk_full,
)
from syncbench.sweeps.progress import CellSummary, Counts, SweepDisplay
from syncbench.sweeps.spec import Cell, ParamSpec, Sweep, format_value, load_sweep, task_key
from syncbench.sweeps.storage import Heartbeat, StorageLock, normalize_url, open_storage, redact, use_wal
from syncbench.sweeps.trials import (
    TrialJob,
    TrialReport,
    TuneContext,
    make_executor,
    objective_value,
    report_attrs,
    run_trial_job,
    warm_up,
)

T = TypeVar("T")
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
# a cell x seed (or tuning trial) whose trials keep killing their launcher is retried this often
# in all, across launches; then it is given up (counted in the study's user attribute below)
MAX_STALE_RETRIES = 3
STALE_COUNT_ATTR = "syncbench.stale_failures"  # {"<cell>|<seed or phase>": launchers it killed}
STOP_WAIT_S = 20.0  # after a signal: how long trials in worker processes get to record themselves KILLED
# the step calibration per task_key: {"step_s", "samples"} (the attribute "syncbench.step_s" of
# sweeps stored before it timed checkpointed models as a run trains them is not reused)
CODEC_ATTR = "syncbench.codec_calibration"  # study attribute: {task and codec: codec_s_per_mb}
MEMORY_LIMIT_TAG = "syncbench.memory_limit_bytes"  # parent run: the spec's analysis.memory_limit_bytes (JSON)
FINGERPRINT_ATTR, STEP_S_ATTR, PARENT_ATTR = ("syncbench.fingerprint", "syncbench.step_calibration",
                                              "syncbench.mlflow_parent_run_id")


@dataclass
class LaunchOptions:
    workspace: Path
    storage_url: str
    tracking_uri: str
    jobs: int = 1
    bar: bool = True  # rich progress bar (on a terminal)
    lines: bool = True  # one line per finished trial
    table: bool = True  # the summary table at the end
    heartbeat_s: int = 5
    grace_s: int = 30
    poll_s: float = 1.0

    @classmethod
    def from_env(cls, workspace: Path, storage: str | None, tracking_uri: str | None, **kwargs: Any) -> "LaunchOptions":
        """Defaults from the workspace; heartbeat timing from $SYNCBENCH_SWEEP_HEARTBEAT_S and
        $SYNCBENCH_SWEEP_GRACE_S (a killed launcher's trials are retried after the grace)."""
        heartbeat_s = _env_int("SYNCBENCH_SWEEP_HEARTBEAT_S", 5)
        grace_s = _env_int("SYNCBENCH_SWEEP_GRACE_S", max(30, 3 * heartbeat_s))
        if grace_s <= heartbeat_s:
            raise ConfigError(f"SYNCBENCH_SWEEP_GRACE_S ({grace_s}) must exceed SYNCBENCH_SWEEP_HEARTBEAT_S ({heartbeat_s})")
        return cls(workspace=workspace, storage_url=normalize_url(storage or default_optuna_storage(workspace)),
                   tracking_uri=tracking_uri or default_tracking_uri(workspace), heartbeat_s=heartbeat_s,
                   grace_s=grace_s, poll_s=min(1.0, heartbeat_s), **kwargs)


@dataclass
class SweepResult:
    counts: Counts
    wall_s: float
    trials_run: int  # by this launcher
    trials_wall_s: float  # Σ of those trials' own wall time (execute_run's wall_s)
    parent_run_id: str
    interrupted: bool = False
    signum: int | None = None  # the signal that stopped the sweep (None: Ctrl-C before handlers, or none)
    disk_full: str | None = None  # why the sweep stopped early: the disk filled

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + self.signum if self.signum else EXIT_INTERRUPTED
        if self.disk_full:
            return EXIT_FAILED
        return EXIT_FAILED if self.counts.failed or self.counts.done < self.counts.total else EXIT_OK


class Idle(Enum):
    WAIT = "wait"  # nothing to claim now, but trials are running (here or in another launcher)
    DONE = "done"  # nothing waiting, nothing running: the sweep is finished


@dataclass
class Claim:
    """A trial this launcher owns from ``ask()`` to ``tell()``."""

    study: Any  # optuna.Study
    trial: Any  # optuna.Trial
    phase: str  # tune | eval
    cell: Cell
    seed: int
    overrides: dict[str, Any]
    extra_tags: dict[str, str] = field(default_factory=dict)
    race_best_s: float | None = None  # tune: the cell's best TTA when the trial was claimed
    heartbeat: Heartbeat | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def ref(self) -> str:
        return f"{self.study.study_name}/{self.trial.number}"


def run_sweep_command(args: argparse.Namespace) -> int:
    """``syncbench sweep``: exit 0 when every trial completed (whatever its outcome), 1 when a
    trial failed, 2 on bad input (raised as ConfigError before anything is created)."""
    sweep = load_sweep(args.spec, args.set, getattr(args, "profile_set", None))
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: must be at least 1")
    progress = not getattr(args, "no_progress", False)
    options = LaunchOptions.from_env(check_workspace(args.workspace), args.storage, args.tracking_uri,
                                     jobs=args.jobs, bar=progress, lines=progress)
    result = run_sweep(sweep, options)
    if result.interrupted and result.signum:
        raise signals.Interrupted(result.signum)  # the command's last word and exit code (syncbench.sweeps.cli.main)
    if result.disk_full:  # one plain paragraph, after the table
        print(f"syncbench: the disk is full: {result.disk_full}", file=sys.stderr)
    return result.exit_code


def run_sweep(sweep: Sweep, options: LaunchOptions) -> SweepResult:
    """Check the tasks, open the stores, set the sweep up, run trials until none is left."""
    t0 = time.perf_counter()
    _quiet_optuna()
    with signals.armed_section():  # nothing exists yet: a signal simply ends the command
        prepared = preflight(sweep)
    launcher = Launcher(sweep, options)
    try:
        launcher.setup(prepared)
        del prepared
        stopped_by = launcher.run()
        return launcher.finish(time.perf_counter() - t0, stopped_by)
    finally:
        launcher.close()


def preflight(sweep: Sweep) -> dict[str, Any]:
    """Build each distinct task once (import paths, constructor arguments, target metric),
    with the tuned parameters at a sample value, so that a typo exits 2 before any store is
    touched. Returns the built tasks by ``task_key`` for calibration."""
    from syncbench.experiments.run import one_thread, prepare_task

    built: dict[str, Any] = {}
    checked: set[str] = set()
    for cell in sweep.cells:
        samples = {key: p.samples()[0] for key, p in sweep.tune_params.get(cell.id, {}).items()}
        for config in (validate_config(apply_overrides(cell.raw, samples)), cell.config):
            ident = json.dumps([config.task.model_dump(mode="json"), config.target.metric], sort_keys=True)
            if ident in checked:
                continue
            checked.add(ident)
            try:
                with one_thread():
                    task = prepare_task(config)
            except ConfigError as exc:
                raise ConfigError(f"sweep spec {sweep.spec_path}, grid cell {cell.id}: {exc}") from None
            if config is cell.config:
                built.setdefault(task_key(config), task)
    return built


class StaleTrialHandler:
    """Optuna's heartbeat-stale callback: mark the dead trial's MLflow run KILLED (a run
    killed with its process stays RUNNING forever otherwise), then enqueue a retry."""

    def __init__(self, grace_s: int):
        import optuna

        # the cap is ours (across launches, per cell x seed); Optuna's counts one retry chain
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)
        self.grace_s = grace_s
        self.client = None
        self.experiment_id: str | None = None

    def __call__(self, study, trial) -> None:
        key = stale_key(trial.user_attrs)
        counts = dict(study.user_attrs.get(STALE_COUNT_ATTR, {}))
        counts[key] = counts.get(key, 0) + 1
        study.set_user_attr(STALE_COUNT_ATTR, counts)
        given_up = counts[key] > MAX_STALE_RETRIES
        if self.client is not None:
            then = (f"given up after {counts[key]} launchers stopped with it (a trial that kills its launcher, "
                    f"e.g. out of memory?)" if given_up else "the trial is retried")
            mark_runs(self.client, self.experiment_id, f"{study.study_name}/{trial.number}", "KILLED",
                      f"its launcher stopped (no heartbeat for over {self.grace_s} s); {then}")
        if not given_up:
            self.retry(study, trial)


def unless_the_module_fails(measure: Callable[[], T]) -> T | None:
    """``measure()``, or None when the user's module raises (anything but a ConfigError): the
    sweep then pins nothing for it, so each trial measures in its own run and fails there,
    recorded FAILED."""
    try:
        return measure()
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - the user's module, in preparation or training
        return None


def prepared_task(prepared: dict[str, Any], config: Any) -> Any:
    """The task of ``config`` as a run trains it (``prepare_task``), built once per task key."""
    from syncbench.experiments.run import prepare_task

    key = task_key(config)
    if key not in prepared:
        prepared[key] = prepare_task(config)
    return prepared[key]


def stale_key(user_attrs: dict[str, Any]) -> str:
    """What the retry cap counts: an evaluation trial's cell x seed, a tuning trial's cell."""
    seed = user_attrs.get("seed")
    return f"{user_attrs.get('cell')}|{seed if seed is not None else user_attrs.get('phase', 'tune')}"


def given_up(study) -> set[str]:
    """The ``stale_key``s whose trials killed their launcher more than MAX_STALE_RETRIES times."""
    return {k for k, n in study.user_attrs.get(STALE_COUNT_ATTR, {}).items() if n > MAX_STALE_RETRIES}


def mark_runs(client, experiment_id: str | None, trial_ref: str, status: str, reason: str,
              extra_tags: dict[str, str] | None = None) -> int:
    """Terminate the still-RUNNING MLflow runs of one Optuna trial (``outcome`` killed for
    KILLED, else failed); returns how many. Safe against the trial's process ending the
    same run concurrently."""
    if experiment_id is None:
        return 0
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    marked = 0
    for run in runs:
        if run.data.tags.get("syncbench.optuna_trial") != trial_ref:
            continue
        outcome = "killed" if status == "KILLED" else "failed"
        tags = [RunTag("outcome", outcome), RunTag("syncbench.error", reason[:4900]), *(extra_tags or {}).items()]
        tags = [t if isinstance(t, RunTag) else RunTag(t[0], str(t[1])) for t in tags]
        for attempt in range(3):
            try:
                # the trial's own process may be ending the run at this very moment (a signal
                # reached both): a run that is no longer RUNNING is left as its process recorded it
                if client.get_run(run.info.run_id).info.status != "RUNNING":
                    break
                client.log_batch(run.info.run_id, tags=tags)
                client.set_terminated(run.info.run_id, status)
                marked += 1
                break
            except MlflowException:  # e.g. UNIQUE constraint on tags: both wrote the same tag at once
                time.sleep(0.2 * (attempt + 1))
    return marked


class Launcher:
    """One launcher process's view of a sweep: stores, studies, claims, trials in flight."""

    def __init__(self, sweep: Sweep, options: LaunchOptions):
        from syncbench.experiments.recording import open_client

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

    # ---------------------------------------------------------------- set-up
    def setup(self, prepared: dict[str, Any]) -> None:
        """Create or load the studies, the experiment and the parent run; calibrate; enqueue."""
        import optuna

        with self.lock():
            # eval trials are all enqueued, never sampled: the sampler is never consulted
            self.study = optuna.create_study(study_name=self.sweep.name, storage=self.storage,
                                             sampler=optuna.samplers.RandomSampler(seed=0),
                                             direction="minimize", load_if_exists=True)
            self._check_fingerprint()
            self._calibrate(prepared)
            self._calibrate_codecs(prepared)
            self.experiment_id = self._experiment()
            self.parent_run_id = self._parent_run()
            self.stale.client, self.stale.experiment_id = self.client, self.experiment_id
            self.tune_studies = {cell.id: self._tune_study(cell) for cell in self.sweep.cells} if self.sweep.tune else {}
            self._fail_stale()
            if not self.sweep.tune:
                self._enqueue_eval(self.sweep.cells, {})
        self.reserve.hold()  # room to record a stop when the disk fills (check_workspace ensured it fits)
        # the pool starts after calibration, which must time a step on an otherwise idle machine
        self.executor = make_executor(self.opt.jobs, self.preload)
        if self.opt.jobs > 1:
            for _ in range(self.opt.jobs):
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

    def _calibrate(self, prepared: dict[str, Any]) -> None:
        """DESIGN.md: a sweep calibrates step_s once per model-changing config (``task_key``:
        the task, the per-worker batch and the checkpointing section) and pins it for all the
        trials of the cells that share it. The task is prepared as a run trains it
        (``prepare_task``: checkpointing applied), so a checkpointed cell is timed with its
        recomputation. The configs still missing a value are timed together, their blocks
        interleaved (``calibrate_steps``), so a drift of the machine's speed during calibration
        cannot favour one of them. The value and its block medians are kept in the study, so resumed and
        concurrent launchers reuse them; the medians go to each trial as a tag (claim (d)
        tests the step time with them)."""
        from syncbench.experiments.run import calibrate_steps, one_thread

        stored: dict[str, dict[str, Any]] = dict(self.study.user_attrs.get(STEP_S_ATTR, {}))
        timed = [cell for cell in self.sweep.cells
                 if cell.config.cluster.backend == "sim" and cell.config.cluster.compute.step_s is None]
        missing: dict[str, Any] = {}  # task key -> a config of it, in cell order
        for cell in timed:
            if task_key(cell.config) not in stored:
                missing.setdefault(task_key(cell.config), cell.config)
        if missing:
            with one_thread():
                models = {}
                for key, config in missing.items():
                    task = unless_the_module_fails(lambda config=config: prepared_task(prepared, config))
                    if task is not None:
                        models[key] = (task, config)
                # all at once, blocks interleaved (calibrate_steps: the machine's speed drifts); if a
                # module fails in training, the others are timed alone and it is left out
                together = unless_the_module_fails(lambda: calibrate_steps(list(models.values())))
                if together is not None:
                    calibrations = dict(zip(models, together))
                else:
                    calibrations = {}
                    for key, model in models.items():
                        alone = unless_the_module_fails(lambda model=model: calibrate_steps([model]))
                        if alone is not None:
                            calibrations[key] = alone[0]
            for key, calibration in calibrations.items():
                stored[key] = {"step_s": calibration.step_s, "samples": calibration.samples}
            self.study.set_user_attr(STEP_S_ATTR, stored)
        for cell in timed:
            if task_key(cell.config) in stored:
                self.step_s[cell.id] = stored[task_key(cell.config)]["step_s"]
                self.step_samples[cell.id] = stored[task_key(cell.config)]["samples"]

    def _calibrate_codecs(self, prepared: dict[str, Any]) -> None:
        """As ``step_s``: the encode/decode cost of a compressed exchange
        (``cluster.compute.codec_s_per_mb``) is measured once per task and codec, kept in the
        study and pinned for every trial that uses it, so the cells are timed on one scale and
        each trial is bit-reproducible."""
        from syncbench.experiments.run import calibrate_codec_s_per_mb, one_thread

        stored: dict[str, float] = dict(self.study.user_attrs.get(CODEC_ATTR, {}))
        changed = False
        for cell in self.sweep.cells:
            config = cell.config
            if (config.cluster.backend != "sim" or config.strategy.compression == "none"
                    or config.cluster.compute.codec_s_per_mb is not None):
                continue
            st = config.strategy
            key = json.dumps([task_key(config), st.compression, st.topk_ratio, st.powersgd_rank])
            if key not in stored:
                with one_thread():
                    value = unless_the_module_fails(
                        lambda config=config: calibrate_codec_s_per_mb(prepared_task(prepared, config), config))
                if value is None:
                    continue
                stored[key] = value
                changed = True
            self.codec_s[cell.id] = stored[key]
        if changed:
            self.study.set_user_attr(CODEC_ATTR, stored)

    def _experiment(self) -> str:
        from syncbench.experiments.recording import get_or_create_experiment

        existing = self.client.get_experiment_by_name(self.sweep.name)
        if existing is not None and existing.lifecycle_stage == "deleted":
            raise ConfigError(f"the MLflow experiment {self.sweep.name!r} is deleted: restore it "
                              f"(mlflow experiments restore) or purge it (mlflow gc) first")
        location = artifacts_dir(self.opt.workspace).as_uri() if self.opt.tracking_uri.startswith("sqlite") else None
        return get_or_create_experiment(self.client, self.sweep.name, location)

    def _parent_run(self) -> str:
        """The sweep's one parent run: found by its tags when resuming, else created."""
        from mlflow.entities import Param, RunTag

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

    def _tune_study(self, cell: Cell):
        """One TPE study per cell: search spaces differ between cells (``when``)."""
        import optuna
        import zlib

        tune = self.sweep.tune
        name = f"{self.sweep.name}/tune/{cell.id}"
        try:
            existing = len(optuna.load_study(study_name=name, storage=self.storage).trials)
        except KeyError:
            existing = 0
        # the seed moves on with the trials already run, so a resumed launcher does not
        # replay the first random points
        seed = (tune.seed * 1_000_003 + zlib.crc32(cell.id.encode()) + existing) % 2**32
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                             n_startup_trials=max(1, min(10, tune.n_trials // 2)))
        return optuna.create_study(study_name=name, storage=self.storage, sampler=sampler,
                                   direction="minimize", load_if_exists=True)

    # ---------------------------------------------------------------- work assignment
    def _studies(self) -> list[Any]:
        return [self.study, *self.tune_studies.values()]

    def _fail_stale(self) -> None:
        """Fail (and retry) trials whose heartbeat stopped. Under the lock: on SQLite two
        launchers could otherwise both fail the same trial and both enqueue a retry."""
        import optuna

        for study in self._studies():
            optuna.storages.fail_stale_trials(study)

    def _enqueue_eval(self, cells: list[Cell], overrides: dict[str, dict[str, Any]],
                      tuned_from: dict[str, str] | None = None) -> None:
        """Enqueue each cell × seed that has no COMPLETE, RUNNING or WAITING eval trial
        (call under the lock). Largest clusters first: a sim trial computes every worker's
        gradients, so its wall time grows with ``cluster.workers``, and with ``--jobs K``
        starting the longest trials first keeps one long trial from running alone at the
        end (longest-processing-time-first). Then seed-major, in grid order."""
        from optuna.trial import TrialState

        live = {(t.user_attrs.get("cell"), t.user_attrs.get("seed"))
                for t in self.study.get_trials(deepcopy=False,
                                               states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))}
        order = sorted(((cell, seed) for seed in self.sweep.seeds for cell in cells),
                       key=lambda item: -item[0].config.cluster.workers)  # stable: seed-major, grid order
        abandoned = given_up(self.study)
        for cell, seed in order:
            if (cell.id, seed) in live:
                continue
            if stale_key({"cell": cell.id, "seed": seed}) in abandoned:
                self.display.warn(f"[red]{cell.id} seed {seed} is not run again: its trials stopped their launcher "
                                  f"{MAX_STALE_RETRIES + 1} times (see the KILLED runs)")
                continue
            attrs = {"cell": cell.id, "seed": seed, "phase": "eval", "overrides": overrides.get(cell.id, {})}
            if tuned_from and cell.id in tuned_from:
                attrs["tuned_from"] = tuned_from[cell.id]
            self.study.enqueue_trial({}, user_attrs=attrs)

    def claim(self) -> Claim | Idle:
        """The next trial for this launcher, or why there is none."""
        with self.lock():
            self._fail_stale()
            claim = self._pop_eval()
            if claim is None and self.sweep.tune:
                claim = self._claim_tune()
            if claim is not None:
                return claim
            return Idle.WAIT if self._running_anywhere() else Idle.DONE

    def _pop_eval(self) -> Claim | None:
        from optuna.trial import TrialState

        while self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial = self.study.ask()  # pops the oldest WAITING trial
            self.storage.record_heartbeat(trial._trial_id)  # no heartbeat row = never detected as stale
            attrs = trial.user_attrs
            cell = self.cells.get(attrs.get("cell"))
            if cell is None or attrs.get("seed") not in self.sweep.seeds:
                # enqueued by a launcher whose spec had this cell (the spec was edited since)
                trial.set_user_attr("error", "cell × seed not in the current spec")
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            tags = {"syncbench.tuned_from": attrs["tuned_from"]} if "tuned_from" in attrs else {}
            return Claim(self.study, trial, "eval", cell, attrs["seed"], dict(attrs.get("overrides") or {}), tags)
        return None

    def _claim_tune(self) -> Claim | None:
        """A tuning trial of the first cell still short of ``n_trials``; cells whose tuning
        is over get their eval trials enqueued (with the best parameters) on the way."""
        from optuna.trial import TrialState

        n_trials = self.sweep.tune.n_trials
        for cell in self.sweep.cells:
            study = self.tune_studies[cell.id]
            trials = study.get_trials(deepcopy=False)
            state = _tally(trials)
            if state["WAITING"] or state["consumed"] < n_trials:
                trial = study.ask()  # a stale trial's retry if one waits, else a new TPE trial
                self.storage.record_heartbeat(trial._trial_id)
                for key, param in self.sweep.tune_params[cell.id].items():
                    _suggest(trial, key, param)  # a retry gets its recorded values back
                trial.set_user_attr("cell", cell.id)
                trial.set_user_attr("seed", self.sweep.seeds[0])
                trial.set_user_attr("phase", "tune")
                return Claim(study, trial, "tune", cell, self.sweep.seeds[0], dict(trial.params),
                             race_best_s=_best_tta(trials))
            if state["RUNNING"] or cell.id in self.eval_enqueued:
                continue
            self.eval_enqueued.add(cell.id)
            complete = [t for t in trials if t.state == TrialState.COMPLETE]
            if not complete:
                self.untunable.add(cell.id)
                continue
            best = study.best_trial
            self._enqueue_eval([cell], {cell.id: dict(best.params)}, {cell.id: f"{study.study_name}/{best.number}"})
            claim = self._pop_eval()
            if claim is not None:
                return claim
        return None

    def _running_anywhere(self) -> bool:
        from optuna.trial import TrialState

        return any(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) for study in self._studies())

    # ---------------------------------------------------------------- running trials
    def job(self, claim: Claim) -> TrialJob:
        """The trial's full run config: the cell, its overrides, the seed, the pinned step."""
        raw = apply_overrides(claim.cell.raw, {**claim.overrides, "seed": claim.seed})
        tags = {"syncbench.sweep": self.sweep.name, "syncbench.role": "trial", "syncbench.cell": claim.cell.id,
                "syncbench.seed": str(claim.seed), "syncbench.phase": claim.phase,
                "syncbench.optuna_trial": claim.ref, **claim.extra_tags}
        if claim.cell.id in self.step_s:
            from syncbench.experiments.run import STEP_SAMPLES_TAG, step_samples_tag

            raw = apply_overrides(raw, {"cluster.compute.step_s": self.step_s[claim.cell.id]})
            tags["syncbench.step_s_source"] = "sweep"
            tags[STEP_SAMPLES_TAG] = step_samples_tag(self.step_samples[claim.cell.id])
        if claim.cell.id in self.codec_s:
            raw = apply_overrides(raw, {"cluster.compute.codec_s_per_mb": self.codec_s[claim.cell.id]})
        config = validate_config(raw, claim.ref)  # fail here, not in a worker, when a tuned value is invalid
        run_name = (f"{claim.cell.label} seed={claim.seed}" if claim.phase == "eval"
                    else f"tune {claim.cell.label} #{claim.trial.number}")
        tune = None
        if claim.phase == "tune":
            spec = self.sweep.tune
            tune = TuneContext(storage_url=self.opt.storage_url, study_name=claim.study.study_name,
                               trial_id=claim.trial._trial_id, pruner=spec.pruner, metric=config.target.metric,
                               mode=config.target.mode, every_s=config.eval.every_s, race_best_s=claim.race_best_s,
                               race_margin=spec.race_margin, n_trials=spec.n_trials)
        return TrialJob(config=raw, tags=tags, run_name=run_name, experiment=self.sweep.name,
                        parent_run_id=self.parent_run_id, tracking_uri=self.opt.tracking_uri,
                        workspace=str(self.opt.workspace), tune=tune)

    def run(self) -> int | None:
        """Claim and run trials, ``jobs`` at a time, until the sweep is done or stopped.
        Returns the signal that stopped it (SIGTERM, SIGINT; None when it ran to the end or
        the disk filled): trials in flight record their runs KILLED, are failed in Optuna and
        re-enqueued, so a rerun retries them at once."""
        inflight: dict[Future, Claim] = {}
        try:
            with self.display:
                self.display.update(self.counts())
                self._loop(inflight)
        except (signals.Interrupted, KeyboardInterrupt) as exc:
            signum = getattr(exc, "signum", int(signal.SIGINT))
            name = signals.signal_name(signum)
            self.display.err.print(f"[red]stopped by {name}[/]: stopping the trials in flight ...", highlight=False)
            self._stop(inflight, signum)
            self.display.err.print(f"[red]stopped by {name}[/]: trials in flight were failed and their runs "
                                   f"recorded KILLED; rerun the same command to resume (they are retried at once)",
                                   highlight=False)
            return signum
        except Exception as exc:  # noqa: BLE001 - the disk filled under the launcher's own writes
            if not is_disk_full(exc):
                raise
            self._disk_filled(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            self._stop(inflight, None)
        self.executor.shutdown(wait=True)
        return None

    def _loop(self, inflight: dict[Future, Claim]) -> None:
        waiting_noted = False
        while True:
            signals.check()
            idle: Idle | None = None
            while len(inflight) < self.opt.jobs and not self.disk_full:
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
        from concurrent.futures import ProcessPoolExecutor

        if not isinstance(self.executor, ProcessPoolExecutor):
            return self.executor.submit(fn, *args)  # inline: the trial runs here, signals must reach it
        with signals.shielded():
            return self.executor.submit(fn, *args)

    def _stop(self, inflight: dict[Future, Claim], signum: int | None) -> None:
        """Stop the trials in flight: pass the signal on to the worker processes (each trial
        records its run KILLED), give them ``STOP_WAIT_S`` to report, fail and re-enqueue the
        trials; a trial whose worker did not answer is abandoned (its run marked here)."""
        from concurrent.futures import ProcessPoolExecutor

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
                self.executor = make_executor(self.opt.jobs, self.preload)
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
                self.executor = make_executor(self.opt.jobs, self.preload)
            except Exception as exc:  # noqa: BLE001 - e.g. a KeyboardInterrupt result from a worker
                report = TrialReport(outcome="failed", error=f"{type(exc).__name__}: {exc}")
            self._tell(claim, report)

    def _tell(self, claim: Claim, report: TrialReport) -> None:
        """Record the result: a value (tta_s or the penalty) or FAIL, and the user attributes."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

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
        self.display.trial_line(counts, claim.phase, claim.cell.label, claim.seed if claim.phase == "eval" else None,
                                report.outcome, report.tta_s, report.wall_s or time.perf_counter() - claim.started,
                                report.error)

    def _fail_and_retry(self, claim: Claim, report: TrialReport) -> None:
        """A trial stopped from outside (a signal, a full disk), not by its own fault: FAIL
        it with the reason, re-enqueue a copy at once (same parameters; the copy replaces it
        in the counts and in ``n_trials``), and end its MLflow run if its process could not."""
        from optuna.trial import TrialState

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
        self.display.trial_line(counts, claim.phase, claim.cell.label, claim.seed if claim.phase == "eval" else None,
                                report.outcome, None, report.wall_s or time.perf_counter() - claim.started, reason)

    def _abandon(self, claim: Claim, reason: str) -> None:
        """Fail a trial we cannot finish; its MLflow run must not stay RUNNING."""
        from optuna.trial import TrialState

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

    # ---------------------------------------------------------------- accounting
    def counts(self) -> Counts:
        """Done / failed / running trials of the whole sweep, across launchers."""
        counts = Counts(total=self.sweep.total_trials())
        items = {(cell.id, seed) for cell in self.sweep.cells for seed in self.sweep.seeds}
        per_item: dict[tuple[str, int], list] = {}
        trials = self.study.get_trials(deepcopy=False)
        replaced = _replaced(trials)
        for t in trials:
            key = (t.user_attrs.get("cell"), t.user_attrs.get("seed"))
            if key in items:
                per_item.setdefault(key, []).append(t)
        for key in items:
            states = {t.state.name for t in per_item.get(key, []) if t.number not in replaced}
            if "COMPLETE" in states:
                counts.done += 1
            elif "RUNNING" in states:
                counts.running += 1
            elif "FAIL" in states and "WAITING" not in states:
                counts.failed += 1
            elif key[0] in self.untunable:
                counts.failed += 1
        n_trials = self.sweep.tune.n_trials if self.sweep.tune else 0
        for study in self.tune_studies.values():
            tally = _tally(study.get_trials(deepcopy=False))
            done = min(n_trials, tally["COMPLETE"] + tally["PRUNED"])
            counts.done += done
            counts.failed += min(n_trials - done, tally["FAIL"])
            counts.running += tally["RUNNING"]
        return counts

    def summaries(self) -> list[CellSummary]:
        """Per cell: the outcomes and TTAs of its COMPLETE eval trials (current seeds only)."""
        from optuna.trial import TrialState

        latest: dict[tuple[str, int], Any] = {}
        failed: set[tuple[str, int]] = set()
        trials = self.study.get_trials(deepcopy=False)
        replaced = _replaced(trials)  # stale or stopped trials whose retry is queued or done
        for t in trials:
            if t.number in replaced or t.state not in (TrialState.COMPLETE, TrialState.FAIL):
                continue
            key = (t.user_attrs.get("cell"), t.user_attrs.get("seed"))
            if t.state == TrialState.COMPLETE:
                latest[key] = t
            else:
                failed.add(key)
        rows = []
        for cell in self.sweep.cells:
            row = CellSummary(cell.label, len(self.sweep.seeds))
            for seed in self.sweep.seeds:
                t = latest.get((cell.id, seed))
                if t is None:
                    if (cell.id, seed) in failed:
                        row.outcomes.append("failed")
                    continue
                row.outcomes.append(t.user_attrs.get("outcome", "?"))
                if t.user_attrs.get("outcome") == "reached":
                    row.tta.append(float(t.user_attrs["tta_s"]))
                if self.sweep.tune:
                    row.tuned = t.user_attrs.get("overrides")
            if cell.id in self.untunable:
                row.note = "every tuning trial failed"
            rows.append(row)
        return rows

    def finish(self, wall_s: float, stopped_by: int | None) -> SweepResult:
        """Close the parent run when the sweep is over, print the table, return the result."""
        counts = self.counts()
        interrupted = stopped_by is not None
        result = SweepResult(counts, wall_s, self.trials_run, self.trials_wall_s, self.parent_run_id, interrupted,
                             stopped_by, self.disk_full)
        finished = counts.running == 0 and counts.finished == counts.total
        if interrupted or self.disk_full:
            from mlflow.entities import RunTag

            why = (f"stopped by {signals.signal_name(stopped_by)}" if interrupted else "the disk filled")
            with contextlib.suppress(Exception):
                self.client.log_batch(self.parent_run_id, tags=[RunTag("syncbench.stopped", why)] + (
                    [RunTag("syncbench.signal", signals.signal_name(stopped_by))] if interrupted else []))
            self.client.set_terminated(self.parent_run_id, "KILLED" if interrupted else "FAILED")
        elif finished:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.parent_run_id, metrics=[
                Metric("trials_complete", counts.done, now, 0), Metric("trials_failed", counts.failed, now, 0)])
            self.client.set_terminated(self.parent_run_id, "FAILED" if counts.failed else "FINISHED")
        where = (f"MLflow: experiment {self.sweep.name!r}, parent run {self.parent_run_id} "
                 f"({self.opt.tracking_uri}); Optuna: study {self.sweep.name!r} ({redact(self.opt.storage_url)})")
        if self.opt.table:
            self.display.table(self.summaries(), counts, wall_s, where)
        return result

    def close(self) -> None:
        self.reserve.release()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)  # a no-op after run() shut it down
        self.lock.close()


# -------------------------------------------------------------------- helpers
def _suggest(trial, key: str, param: ParamSpec) -> Any:
    if param.choices is not None:
        return trial.suggest_categorical(key, param.choices)
    if param.is_int:
        return trial.suggest_int(key, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return trial.suggest_float(key, float(param.low), float(param.high), step=param.step, log=param.log)


def _best_tta(trials: list) -> float | None:
    """The best TTA among a tuning study's finished trials that reached the target."""
    ttas = [t.value for t in trials if t.state.name == "COMPLETE" and t.user_attrs.get("outcome") == "reached"
            and t.value is not None]
    return min(ttas) if ttas else None


def _replaced(trials: list) -> set[int]:
    """Numbers of stale trials that a retry replaced (RetryHeartbeatStaleTrialCallback keeps
    them in the retry's ``retry_history``)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def _tally(trials: list) -> dict[str, int]:
    """Trials by state, and ``consumed``: all but the stale ones a retry replaced (an
    exception-FAILed tuning trial uses up one of ``n_trials``; a killed one does not)."""
    replaced = _replaced(trials)
    tally = {"COMPLETE": 0, "RUNNING": 0, "WAITING": 0, "FAIL": 0, "PRUNED": 0, "consumed": 0}
    for t in trials:
        if t.number in replaced:
            continue
        tally[t.state.name] += 1
        tally["consumed"] += 1
    return tally


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {format_value(old.get(k))} -> {format_value(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"${name}={raw!r}: expected a whole number of seconds") from None
    if value < 1:
        raise ConfigError(f"${name}={raw!r}: must be at least 1")
    return value


def _quiet_optuna() -> None:
    """Optuna logs every trial at INFO and warns that heartbeats are experimental; the
    progress display says what matters."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # we record heartbeats ourselves around ask/tell (syncbench.sweeps.storage.Heartbeat)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
