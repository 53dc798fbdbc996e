"""Running one sweep trial, in the launcher's process or in a worker process.

Sim trials run inside an already-imported interpreter (no ~5 s start per trial):
``--jobs 1`` calls :func:`run_trial_job` in the launcher itself, ``--jobs K`` in a pool of K
long-lived worker processes that each import torch once and run many trials. The pool uses
``spawn``: not ``fork`` (the launcher has already run torch, whose thread pools do not
survive a fork) and not ``forkserver`` (its workers would be children of the server, which
outlives a killed launcher because every worker holds its "alive" pipe open, so they could
not be tied to the launcher's life). Dist-backend trials start their own processes inside
``execute_run``.

Objective (minimised): ``tta_s`` when the target was reached; a censored run (``budget``)
scores ``BUDGET_PENALTY`` × ``budget.train_time_s`` and a diverged one ``DIVERGED_PENALTY`` ×
``budget.train_time_s`` — finite, so the trial completes and the sampler learns from it, and
always worse than any reached run (whose TTA is at most the budget), with divergence worse
than censoring. NaN is never a value. A run that raised makes the trial FAIL.

Tuning trials (``TrialJob.tune`` set) report every evaluation's target metric to Optuna as
an intermediate value (``step`` = evaluation index, so step k is training clock k x
``eval.every_s`` in every trial of a cell) and may be pruned: see :class:`TuneHook`. A
pruned run ends with outcome ``pruned`` (MLflow tag), the launcher tells Optuna PRUNED.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import multiprocessing
import os
import signal
import traceback
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from syncbench.experiments import signals
from syncbench.experiments.messages import describe
from syncbench.experiments.workspace import is_disk_full

# Optuna, the config (and the stores' module, which imports it), the run and MLflow are
# imported inside the functions that use them: a pool worker imports this module before
# ``_init_worker`` installs its signal handlers, and a signal must not find it in the middle
# of those imports (the heavy ones come after)

REFRESH_EVERY = 10  # race: re-read the cell's best TTA every this many evaluations
BUDGET_PENALTY = 2.0
DIVERGED_PENALTY = 4.0


@dataclass
class TrialJob:
    """Everything a worker needs: plain data, picklable."""

    config: dict[str, Any]  # the full raw run config, seed and pinned step_s included
    tags: dict[str, str]
    run_name: str
    experiment: str
    parent_run_id: str
    tracking_uri: str
    workspace: str
    tune: "TuneContext | None" = None  # tuning trials: report evaluations, maybe prune


@dataclass
class TuneContext:
    """Where a tuning trial reports its evaluations and when it stops (plain data)."""

    storage_url: str
    study_name: str
    trial_id: int
    pruner: str  # race | median | hyperband | none
    metric: str  # the target metric, reported at each evaluation
    mode: str  # max | min: the metric's better direction (Optuna's pruners compare in it)
    every_s: float  # eval.every_s: step k = clock k x every_s
    race_best_s: float | None = None  # race: the cell's best TTA when the trial started
    race_margin: float = 1.0
    n_trials: int = 8


@dataclass
class TrialReport:
    """What came back from a trial (``outcome`` is reached | budget | diverged | failed | pruned)."""

    outcome: str
    run_id: str | None = None
    tta_s: float | None = None
    wall_s: float = 0.0
    mlflow_log_s: float = 0.0
    init_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def run_trial_job(job: TrialJob) -> TrialReport:
    """Validate and run one trial; an exception becomes a ``failed`` report (the MLflow run,
    if one was created, is already marked FAILED by ``execute_run``)."""
    from syncbench.experiments.config import validate_config  # after the handlers: see the imports
    from syncbench.experiments.run import execute_run
    from syncbench.sweeps.slurm_dist import execute_dist_job, runs_dist_as_jobs

    try:
        with signals.armed_section():  # a signal stops the run where it is; it records itself KILLED
            config = validate_config(job.config, job.run_name)
            hook = TuneHook(job.tune) if job.tune is not None and config.cluster.backend == "sim" else None
            # --executor slurm: a dist trial is a SLURM job of its own, one task per rank
            run = execute_dist_job if runs_dist_as_jobs(config.cluster.backend) else execute_run
            result = run(config, workspace=job.workspace, tracking_uri=job.tracking_uri,
                         experiment=job.experiment, tags=job.tags, parent_run_id=job.parent_run_id,
                         run_name=job.run_name, progress=False, on_evaluation=hook)
    except signals.Interrupted as exc:  # the launcher fails the trial and re-enqueues it ...
        finished = getattr(exc, "finished_result", None)
        if finished is not None:  # ... unless its run was recorded whole before the signal: a result
            return trial_report(finished)
        return TrialReport(outcome="killed", run_id=getattr(exc, "run_id", None), error=f"stopped by {exc.name}",
                           extra={"signal": exc.signum})
    except Exception as exc:  # noqa: BLE001 - reported to the launcher, which fails the trial
        tb = traceback.format_exc(limit=6)
        extra: dict[str, Any] = {"traceback": tb}
        if is_disk_full(exc):
            extra["disk_full"] = True  # the launcher stops the sweep
        return TrialReport(outcome="failed", error=describe(exc), extra=extra)
    return trial_report(result)


def trial_report(result: Any) -> TrialReport:
    """The report of a trial whose run finished (a ``RunResult``)."""
    return TrialReport(outcome=result.outcome, run_id=result.run_id, tta_s=result.tta_s, wall_s=result.wall_s,
                       mlflow_log_s=result.mlflow_log_s, init_s=result.init_s,
                       extra={"best_val": result.best_val, "samples_to_target": result.samples_to_target})


_STORAGES: dict[tuple[str, str], Any] = {}  # per process: engine start-up is not free


def _hook_storage(url: str, mode: str):
    """A plain Optuna storage (no heartbeats: the launcher beats for the trial) whose studies
    report the target metric's direction (``mode``) instead of the stored one (minimise TTA):
    Optuna's pruners compare intermediate values in the study's direction. Only the tuning
    hook uses it; the launcher's own handle is untouched."""
    key = (url, mode)
    if key not in _STORAGES:
        from optuna.storages import RDBStorage  # after the handlers: see the imports
        from optuna.study import StudyDirection

        from syncbench.sweeps.storage import SQLITE_BUSY_TIMEOUT_S, _relax_sqlite_sync, is_sqlite

        kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if is_sqlite(url) else {"pool_pre_ping": True}
        storage = RDBStorage(url, engine_kwargs=kwargs)
        if is_sqlite(url):
            _relax_sqlite_sync(storage.engine)
        direction = StudyDirection.MAXIMIZE if mode == "max" else StudyDirection.MINIMIZE
        storage.get_study_directions = lambda study_id: [direction]
        _STORAGES[key] = storage
    return _STORAGES[key]


def make_pruner(name: str, n_trials: int):
    """Optuna's pruner for ``tune.pruner`` (None for race and none, decided by TuneHook)."""
    import optuna  # after the handlers: see the imports

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, n_trials // 4)), n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2)
    return None


class TuneHook:
    """``execute_run``'s ``on_evaluation`` for a tuning trial: report the target metric as an
    Optuna intermediate value, then say whether to stop.

    * ``race``: stop once the next evaluation would come later than the cell's best TTA so
      far x ``race_margin``: this trial's TTA could then only be worse than the best, so it
      cannot win (with margin 1 the trial that ends up best is never stopped: it reaches
      the target at or before that clock).
    * ``median`` / ``hyperband``: ``Trial.should_prune()`` with Optuna's pruner. They compare
      intermediate values in the study's direction, which for a tuning study (minimising
      TTA) is the opposite of a ``max`` target metric: the hook's own storage handle reports
      the metric's direction to the pruner, nothing else changes.
    """

    def __init__(self, ctx: TuneContext):
        import optuna  # after the handlers: see the imports

        self.ctx = ctx
        pruner = make_pruner(ctx.pruner, ctx.n_trials)
        study = optuna.load_study(study_name=ctx.study_name, storage=_hook_storage(ctx.storage_url, ctx.mode),
                                  pruner=pruner)
        self.study = study
        self.trial = optuna.trial.Trial(study, ctx.trial_id)
        self.best_s = ctx.race_best_s
        self.calls = 0

    @property
    def threshold(self) -> float:
        if self.ctx.pruner != "race" or self.best_s is None:
            return math.inf
        return self.best_s * self.ctx.race_margin

    def _refresh_best(self) -> None:
        """With --jobs K, trials of one cell run side by side: a sibling that finished since
        this one started may have set a better TTA."""
        from optuna.trial import TrialState  # after the handlers: see the imports

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("outcome") == "reached" and t.value is not None:
                self.best_s = t.value if self.best_s is None else min(self.best_s, t.value)

    def __call__(self, clock_s: float, metrics: dict[str, float]) -> bool:
        step = int(round(clock_s / self.ctx.every_s))
        value = metrics.get(self.ctx.metric)
        if value is not None and math.isfinite(value):
            self.trial.report(float(value), step)
        self.calls += 1
        if self.ctx.pruner == "race" and self.calls % REFRESH_EVERY == 0:
            self._refresh_best()
        if self.ctx.pruner == "race":
            next_clock = (step + 1) * self.ctx.every_s
            return next_clock > self.threshold * (1 + 1e-9)
        if self.ctx.pruner in ("median", "hyperband"):
            return self.trial.should_prune()
        return False


def warm_up(tracking_uri: str) -> None:
    """A pool worker's one-time costs (the MLflow store's engine and schema check, ~1.5 s),
    paid while the launcher is still setting up rather than in the first trial."""
    from syncbench.experiments.recording import open_client  # after the handlers: see the imports

    open_client(tracking_uri)


def objective_value(report: TrialReport, budget_s: float) -> float | None:
    """The value Optuna minimises, or None when the trial must FAIL."""
    if report.outcome == "reached" and report.tta_s is not None and math.isfinite(report.tta_s):
        return float(report.tta_s)
    if report.outcome == "budget":
        return BUDGET_PENALTY * budget_s
    if report.outcome == "diverged":
        return DIVERGED_PENALTY * budget_s
    return None  # failed (FAIL) or pruned (PRUNED: the launcher tells the state, no value)


def report_attrs(report: TrialReport) -> dict[str, Any]:
    """The trial user attributes recorded with the result: few, since each is one write
    (one commit) to the storage; everything else is in the MLflow run."""
    attrs = {"outcome": report.outcome, "tta_s": report.tta_s, "mlflow_run_id": report.run_id,
             "wall_s": round(report.wall_s, 4), "error": report.error}
    return {k: v for k, v in attrs.items() if v is not None}


class InlineExecutor(Executor):
    """``--jobs 1``: run each trial at submit time in this process (no pool, no pickling)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def make_executor(jobs: int, preload: list[str]) -> Executor:
    """The trial executor for ``--jobs``: inline for 1, a pool of worker processes for more
    (``preload``: modules each worker imports before its first trial)."""
    if jobs <= 1:
        return InlineExecutor()
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(), preload))


def _init_worker(launcher_pid: int, preload: list[str]) -> None:
    """Die with the launcher: a worker orphaned by ``kill -9`` would finish its trial and
    record a second run of a cell × seed that the resumed sweep retries anyway. Then import
    what every trial needs, once."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # PR_SET_PDEATHSIG: SIGKILL when the thread that spawned us (the launcher's main
        # thread, which submits every trial) ends
        libc.prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker finishes its trial, then exits on EOF
        pass
    if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
        os._exit(1)
    # SIGTERM/SIGINT (from the launcher, or Ctrl-C to the whole terminal group) stop the trial
    # in flight, which records its run KILLED; between trials they only mark the worker
    # stopped. The launcher started us with them ignored (signals.shielded) until now.
    signals.install(armed=False, second_exits=False)
    signals.unblock()
    for module in ["syncbench.experiments.run", *preload]:
        importlib.import_module(module)
