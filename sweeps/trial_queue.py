"""A sweep's trials as a queue shared by every launcher on the storage: eval trials enqueued once
per cell x seed, tuning trials sampled per cell up to ``n_trials``, each claimed with
``Study.ask()`` under the storage-wide lock; stale trials (their launcher died) failed,
their MLflow runs marked KILLED and retried up to a cap; the counts and per-cell summaries
the display shows (see ``syncbench.sweeps.launcher`` for the layout in the stores)."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import optuna
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from syncbench.sweeps.progress import CellSummary, Counts, cell_label
from syncbench.sweeps.spec import Cell, ParamSpec, format_value
from syncbench.sweeps.storage import Heartbeat

# a cell x seed (or tuning trial) whose trials keep killing their launcher is retried this often
# in all, across launches; then it is given up (counted in the study's user attribute below)
MAX_STALE_RETRIES = 3
# a trial's result attributes (``syncbench.sweeps.trials.report_attrs``): a retry starts without them
RESULT_ATTRS = ("outcome", "tta_s", "mlflow_run_id", "wall_s", "error")
STALE_COUNT_ATTR = "syncbench.stale_failures"  # {"<cell>|<seed or phase>": launchers it killed}
OBJECTIVE_NAME = "tta_s"  # every study's one objective (penalised when censored: docs/metrics.md)
# Optuna parameter names of an evaluation trial's cell (the grid's other keys keep their dotted names)
CELL_PARAM_NAMES = {"strategy.name": "strategy", "cluster.workers": "workers"}


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


class StaleTrialHandler:
    """Optuna's heartbeat-stale callback: mark the dead trial's MLflow run KILLED (a run
    killed with its process stays RUNNING forever otherwise), then enqueue a retry."""

    def __init__(self, grace_s: int):
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


class TrialQueue:
    """The ``Launcher``'s work assignment and accounting (see the module docstring); mixed into
    ``syncbench.sweeps.coordinator.Launcher``, whose studies, storage and lock it uses."""

    def _tune_study(self, cell: Cell):
        """One TPE study per cell: search spaces differ between cells (``when``)."""
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
        study = optuna.create_study(study_name=name, storage=self.storage, sampler=sampler,
                                    direction="minimize", load_if_exists=True)
        if study.metric_names != [OBJECTIVE_NAME]:
            study.set_metric_names([OBJECTIVE_NAME])  # the dashboard's axis reads "tta_s", not "Objective 0"
        return study

    def _studies(self) -> list[Any]:
        return [self.study, *self.tune_studies.values()]

    def _fail_stale(self) -> None:
        """Fail (and retry) trials whose heartbeat stopped. Under the lock: on SQLite two
        launchers could otherwise both fail the same trial and both enqueue a retry."""
        for study in self._studies():
            optuna.storages.fail_stale_trials(study)

    def _enqueue_eval(self, cells: list[Cell], overrides: dict[str, dict[str, Any]],
                      tuned_from: dict[str, str] | None = None) -> None:
        """Enqueue each cell × seed that has no COMPLETE, RUNNING or WAITING eval trial
        (call under the lock). Largest clusters first: a sim trial computes every worker's
        gradients, so its wall time grows with ``cluster.workers``, and with ``--jobs K``
        starting the longest trials first keeps one long trial from running alone at the
        end (longest-processing-time-first). Then seed-major, in grid order."""
        trials = self.study.get_trials(deepcopy=False)
        replaced = replaced_trials(trials)  # e.g. a finished trial whose MLflow run is gone: its retry waits
        live = {(t.user_attrs.get("cell"), t.user_attrs.get("seed")) for t in trials if t.number not in replaced
                and t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)}
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
            params = {name: value for name, value, _ in cell_params(self.sweep, cell, seed)}
            self.study.enqueue_trial(params, user_attrs=attrs)

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
            _suggest_cell(self.study, trial, self.sweep, cell, attrs["seed"])
            tags = {"syncbench.tuned_from": attrs["tuned_from"]} if "tuned_from" in attrs else {}
            return Claim(self.study, trial, "eval", cell, attrs["seed"], dict(attrs.get("overrides") or {}), tags)
        return None

    def _claim_tune(self) -> Claim | None:
        """A tuning trial of the first cell still short of ``n_trials``; cells whose tuning
        is over get their eval trials enqueued (with the best parameters) on the way."""
        n_trials = self.sweep.tune.n_trials
        for cell in self.sweep.cells:
            study = self.tune_studies[cell.id]
            trials = study.get_trials(deepcopy=False)
            state = _tally(trials)
            if state["WAITING"] or state["consumed"] < n_trials:
                if state["RUNNING"] and not state["WAITING"]:
                    # one tuning trial per cell at a time (cells tune in parallel): TPE then samples
                    # each trial from the same finished history whatever --jobs is, so a sweep with a
                    # pinned step_s is reproducible run for run
                    continue
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
        return any(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) for study in self._studies())

    def counts(self) -> Counts:
        """Done / failed / running trials of the whole sweep, across launchers."""
        counts = Counts(total=self.sweep.total_trials())
        items = {(cell.id, seed) for cell in self.sweep.cells for seed in self.sweep.seeds}
        per_item: dict[tuple[str, int], list] = {}
        trials = self.study.get_trials(deepcopy=False)
        replaced = replaced_trials(trials)
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
        latest: dict[tuple[str, int], Any] = {}
        failed: set[tuple[str, int]] = set()
        trials = self.study.get_trials(deepcopy=False)
        replaced = replaced_trials(trials)  # stale or stopped trials whose retry is queued or done
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
            row = CellSummary(cell_label(cell), len(self.sweep.seeds))
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


def cell_params(sweep, cell: Cell, seed: int) -> list[tuple[str, Any, list[Any]]]:
    """An evaluation trial's cell and seed as Optuna parameters: (name, value, the grid's values
    for that key). Values Optuna cannot store (a dict, a list) are given as their compact JSON."""
    grid = sweep.spec.grid
    values = {"strategy.name": cell.config.strategy.name, "cluster.workers": cell.config.cluster.workers,
              **cell.assignment}
    out = []
    for key, value in values.items():
        choices = list(grid.get(key, [value]))
        out.append((CELL_PARAM_NAMES.get(key, key), _choice(value), [_choice(c) for c in choices]))
    out.append(("seed", seed, list(sweep.seeds)))
    return out


def _choice(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return format_value(value)


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _suggest_cell(study, trial, sweep, cell: Cell, seed: int) -> None:
    """Record the cell's parameters on a claimed evaluation trial, so that optuna-dashboard
    can slice and rank by them. Numbers (workers, seed, numeric grid keys) are int/float
    parameters, whose range may grow when a resumed sweep adds values; anything else is
    categorical over the grid's values, and Optuna's storage fixes a categorical's choices
    study-wide at first use, so a value added to the grid later is left out of the trial's
    parameters (it stays in the ``cell`` user attribute). The values are the ones enqueued
    with the trial; a retry keeps the ones recorded before; a trial enqueued without them (by
    an older launcher) is left without, rather than let the sampler draw a wrong cell."""
    fixed = trial.storage.get_trial(trial._trial_id).system_attrs.get("fixed_params") or {}
    recorded = trial.params
    known: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        for name, dist in t.distributions.items():
            known.setdefault(name, dist)
    for name, value, choices in cell_params(sweep, cell, seed):
        if name in recorded or fixed.get(name) != value:
            continue
        if _numeric(value) and all(_numeric(c) for c in choices):
            if all(isinstance(c, int) for c in choices):
                trial.suggest_int(name, min(choices), max(choices))
            else:
                trial.suggest_float(name, float(min(choices)), float(max(choices)))
            continue
        earlier = getattr(known.get(name), "choices", None)
        if earlier is not None:
            choices = list(earlier)
        if value in choices:
            trial.suggest_categorical(name, choices)


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


def replaced_trials(trials: list) -> set[int]:
    """Numbers of stale trials that a retry replaced (RetryHeartbeatStaleTrialCallback keeps
    them in the retry's ``retry_history``)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def _tally(trials: list) -> dict[str, int]:
    """Trials by state, and ``consumed``: all but the stale ones a retry replaced (an
    exception-FAILed tuning trial uses up one of ``n_trials``; a killed one does not)."""
    replaced = replaced_trials(trials)
    tally = {"COMPLETE": 0, "RUNNING": 0, "WAITING": 0, "FAIL": 0, "PRUNED": 0, "consumed": 0}
    for t in trials:
        if t.number in replaced:
            continue
        tally[t.state.name] += 1
        tally["consumed"] += 1
    return tally
