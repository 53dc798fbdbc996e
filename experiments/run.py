"""One run, end to end: validate the task, calibrate, train on the simulated cluster to the
target, and record everything of DESIGN.md "What a run records" in MLflow."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from syncbench.experiments import signals
from syncbench.experiments.config import ConfigError, RunConfig, import_object
from syncbench.strategies.lightning_flavour import require_subclass
from syncbench.strategies.lightning_bridge import (
    LightningModuleLike,
    build_optimizer,
    capture_logs,
    check_trainable,
    evaluate,
    is_finite,
    materialize,
    plateau_monitors,
    take_logged,
    training_loss,
)
from syncbench.experiments.recording import RunRecorder, environment_tags, get_or_create_experiment, open_client
from syncbench.experiments.run_loop import Evaluation, LoopResult, TTATracker, train_to_target
from syncbench.experiments.workspace import artifacts_dir, default_tracking_uri, workspace_dir
from syncbench.experiments.sharding import ShardedBatches
from syncbench.experiments.sim.engine import SimEngine, lr_factor
from syncbench.strategies import STRATEGIES

# on_evaluation(clock_s, metrics) -> True stops the run as ``pruned`` (a sweep's tuning race)
EvaluationCallback = Callable[[float, dict[str, float]], bool]


class _Pruned(Exception):
    """Raised from the evaluation hook to stop a run that its on_evaluation callback prunes."""


SUMMARY_KEYS = ("tta_s", "samples_to_target", "updates_to_target", "best_val", "final_val")


@dataclass
class PreparedTask:
    """A built module and data, checked against the config before anything is recorded."""

    module: Any  # a LightningModule of either flavour
    datamodule: Any
    train_set: Dataset
    collate: Callable[[list], Any]
    val_batches: list[Any]
    logged: list[str]  # metric names validation_step logs
    # what validation_step logged for the untrained module on the first validation batch
    initial_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResult(LoopResult):
    """A run's outcome and TTA figures (``LoopResult``), with what the run around it measured."""

    outcome: str = "failed"  # reached | budget | diverged | failed | pruned
    run_id: str | None = None
    init_s: float = 0.0
    wall_s: float = 0.0
    step_time_s: float = 0.0
    mlflow_log_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def summary_line(self) -> str:
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        parts = [f"outcome={self.outcome}", f"tta_s={fmt(self.tta_s, '.2f')}",
                 f"samples_to_target={fmt(self.samples_to_target, 'd')}",
                 f"updates_to_target={fmt(self.updates_to_target, 'd')}",
                 f"best_val={fmt(self.best_val, '.4f')}"]
        if "staleness_mean" in self.extra:
            parts.append(f"staleness_mean={self.extra['staleness_mean']:.2f}")
        if self.error:
            parts.append(f"error={self.error}")
        return " ".join(parts)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_task(config: RunConfig) -> PreparedTask:
    """The task exactly as a run trains it: the user's module and data built, checked and
    dry-run (``build_task``), then every model-changing option of the config applied
    (activation checkpointing). The run on both backends, the sweep's calibration, the
    activation-memory probe and ``syncbench calibrate`` all prepare their task here, so that
    what is timed or measured is the model that is trained."""
    task = build_task(config)
    reason = STRATEGIES[config.strategy.name].unsupported_module(config.strategy.options(), task.module)
    if reason:
        raise ConfigError(reason)
    if config.checkpointing.enabled:
        from syncbench.strategies.checkpointing import apply_checkpointing

        apply_checkpointing(task.module, config.checkpointing)
    return task


def build_task(config: RunConfig) -> PreparedTask:
    """Import, build and dry-run the user's module and data; every failure names its key.
    The module is the user's, unchanged: use ``prepare_task`` for the one a run trains."""
    module_cls = import_object(config.task.module, "task.module")
    data_cls = import_object(config.task.data, "task.data")
    try:  # either Lightning package (strategies/lightning_flavour.py)
        require_subclass(module_cls, "LightningModule", f"task.module {config.task.module}")
        require_subclass(data_cls, "LightningDataModule", f"task.data {config.task.data}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    seed_everything(config.seed)
    try:
        module = module_cls(**config.task.module_args)
    except Exception as exc:  # noqa: BLE001 - a constructor rejecting its arguments is bad input
        raise ConfigError(f"task.module_args: {module_cls.__name__}({config.task.module_args}) failed: "
                          f"{type(exc).__name__}: {exc}") from None
    try:
        datamodule = data_cls(**config.task.data_args)
        datamodule.prepare_data()
        datamodule.setup("fit")
        train_loader = datamodule.train_dataloader()
        val_batches = materialize(datamodule.val_dataloader())
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"task.data_args: {data_cls.__name__}({config.task.data_args}) failed: "
                          f"{type(exc).__name__}: {exc}") from None
    if not val_batches:
        raise ConfigError(f"task.data: {data_cls.__name__}.val_dataloader() yields no batches")
    try:
        check_trainable(module)  # manual optimisation, several optimizers, a malformed configure_optimizers
        monitors = plateau_monitors(module)
    except ValueError as exc:
        raise ConfigError(f"task.module: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. an optimizer rejecting task.module_args: before any run
        raise ConfigError(f"task.module_args: {module_cls.__name__}.configure_optimizers() failed with "
                          f"{config.task.module_args}: {type(exc).__name__}: {exc}") from None
    capture_logs(module)
    probe = copy.deepcopy(module)  # the dry run leaves no trace (metric states, trainer stand-in) on the module
    initial = evaluate(probe, val_batches[:1])
    logged = sorted(initial)
    if config.target.metric not in logged:
        raise ConfigError(
            f"target.metric: {module_cls.__name__}.validation_step never logs {config.target.metric!r} "
            f"(it logs: {', '.join(logged) or 'nothing'})"
        )
    for monitor, strict in monitors:
        if strict and monitor not in logged:
            raise ConfigError(
                f"task.module: {module_cls.__name__}'s ReduceLROnPlateau monitors {monitor!r}, which validation_step "
                f"never logs (it logs: {', '.join(logged) or 'nothing'}); it reads the global model's evaluations"
            )
    collate = train_loader.collate_fn or default_collate
    check_training_step(module, train_loader.dataset, collate, config)
    return PreparedTask(module, datamodule, train_loader.dataset, collate, val_batches, logged, initial)


def check_training_step(module: LightningModuleLike, train_set: Dataset, collate: Callable[[list], Any],
                        config: RunConfig) -> None:
    """The module's contract, checked before any store is touched: ``training_step`` of a
    first batch returns a loss tensor (or a dict with ``loss``). One forward pass on a copy,
    random state restored: a module breaking it is refused (exit 2) instead of failing in
    the activation-memory probe or the first step, after the run exists."""
    try:
        batches = ShardedBatches(train_set, 0, 1, config.batch_size, config.seed + 2, collate)
    except ValueError:  # batch_size larger than the data: refused where it always was
        return
    rng_state = torch.get_rng_state()
    probe = copy.deepcopy(module)
    probe.train()
    try:
        with torch.no_grad():
            training_loss(probe, next(batches), 0)
    except ValueError as exc:  # the contract itself (training_loss names the module and the type)
        if "training_step must return" not in str(exc):
            return  # any other error fails in the run, where it is recorded
        raise ConfigError(f"task.module: {exc}") from None
    except Exception:  # noqa: BLE001 - fails in the run, where it is recorded
        return
    finally:
        torch.set_rng_state(rng_state)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Sim workers are timed on one intra-op thread (FACTS.md: two were slower and noisier here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


CALIBRATION_BLOCKS = 8  # medians of blocks of steps: the step time and its measured variability
CALIBRATION_BLOCK_STEPS = 8


@dataclass
class StepCalibration:
    """A calibrated step time: ``samples`` are the medians of ``len(samples)`` blocks of
    steps (the variability of repeated real measurements, which claim (d) tests with), and
    ``step_s`` is the least of them (a burst of load from other processes inflates a median;
    an inflated step_s stretches every simulated clock)."""

    step_s: float
    samples: list[float]


def calibrate_step(task: PreparedTask, config: RunConfig, blocks: int = CALIBRATION_BLOCKS,
                   block_steps: int = CALIBRATION_BLOCK_STEPS, warmup: int = 3) -> StepCalibration:
    """Time real training steps (forward, backward, optimizer step) of the prepared module
    (``prepare_task``: checkpointing applied) at the per-worker batch size, on a copy so the
    run's state is untouched: ``warmup`` steps, then ``blocks`` blocks of ``block_steps``.

    Timed with the thread's CPU clock: with one intra-op thread the step runs on this
    thread, and CPU time does not count the time other processes (a parallel sweep, a
    busy machine) hold the core, which inflated wall-clock medians 3-6x here under load."""
    return calibrate_steps([(task, config)], blocks, block_steps, warmup)[0]


def calibrate_steps(models: list[tuple[PreparedTask, RunConfig]], blocks: int = CALIBRATION_BLOCKS,
                    block_steps: int = CALIBRATION_BLOCK_STEPS, warmup: int = 3) -> list[StepCalibration]:
    """``calibrate_step`` for several models at once, their blocks interleaved (block 1 of
    each, then block 2 of each, ...): the speed of a virtual machine drifts within minutes
    (here: the same loop 1.0 then 1.7 ms), and CPU time does not see a host taking the core
    away, so models timed one after the other (a checkpointed cell and its plain twin) could
    differ by the drift alone; interleaved, the drift hits them all alike."""
    timers = []
    rng_state = torch.get_rng_state()
    for task, config in models:
        module = copy.deepcopy(task.module)
        batches = ShardedBatches(task.train_set, 0, 1, config.batch_size, config.seed + 1, task.collate)
        timers.append((module, build_optimizer(module), batches, []))

    def step(timer: tuple[Any, Any, Any, list[float]], i: int, timed: bool) -> None:
        module, optimizer, batches, times = timer
        batch = next(batches)
        t0 = time.thread_time()
        optimizer.zero_grad(set_to_none=True)
        training_loss(module, batch, i).backward()
        optimizer.step()
        if timed:
            times.append(time.thread_time() - t0)

    for timer in timers:
        for i in range(warmup):
            step(timer, i, timed=False)
    for b in range(blocks):
        for timer in timers:
            for i in range(block_steps):
                step(timer, warmup + b * block_steps + i, timed=True)
    torch.set_rng_state(rng_state)
    out = []
    for module, _, _, times in timers:
        take_logged(module)
        samples = [statistics.median(times[b * block_steps:(b + 1) * block_steps]) for b in range(blocks)]
        out.append(StepCalibration(min(samples), samples))
    return out


def calibrate_step_s(task: PreparedTask, config: RunConfig) -> float:
    """The calibrated seconds per worker step (``calibrate_step``)."""
    return calibrate_step(task, config).step_s


STEP_SAMPLES_TAG = "syncbench.step_time_samples"  # JSON list of the calibration's block medians


def step_samples_tag(samples: list[float]) -> str:
    return json.dumps([float(f"{x:.6g}") for x in samples])


def measure_activation_bytes(task: PreparedTask, config: RunConfig) -> int | None:
    try:
        from syncbench.strategies.checkpointing import activation_bytes
    except ImportError:
        return None
    batch = next(ShardedBatches(task.train_set, 0, 1, config.batch_size, config.seed + 2, task.collate))
    rng_state = torch.get_rng_state()
    try:
        return int(activation_bytes(copy.deepcopy(task.module), batch))
    finally:
        torch.set_rng_state(rng_state)


def build_strategy(config: RunConfig) -> Any:
    """The configured strategy (registry entry with its options) for this cluster."""
    cls = STRATEGIES[config.strategy.name]
    return cls(config.strategy.options(), config.cluster.workers, config.batch_size)


def calibrate_codec_s_per_mb(task: PreparedTask, config: RunConfig) -> float:
    """Encode + decode seconds per MB of the configured codec on this machine, on a payload the
    size of the task's gradients (``cluster.compute.codec_s_per_mb``; what a sweep pins)."""
    from syncbench.experiments.sim.engine import measure_codec_s_per_mb
    from syncbench.strategies.compression import make_codec, param_shapes
    from syncbench.strategies.program import gradient_payload

    codec = make_codec(config.strategy.options(), param_shapes(task.module))
    if codec is None:
        return 0.0
    payload = torch.randn(gradient_payload(task.module).numel(), generator=torch.Generator().manual_seed(0))
    return measure_codec_s_per_mb(codec, payload, config.cluster.workers)


def build_simulation(config: RunConfig, task: PreparedTask, step_s: float) -> SimEngine:
    """The configured strategy's programs on a simulated cluster over the task's module and data."""
    seed_everything(config.seed)
    strategy = build_strategy(config)
    cluster = config.cluster
    return SimEngine(strategy, task.module, task.train_set, task.collate, workers=cluster.workers,
                     batch_size=config.batch_size, seed=config.seed, step_s=step_s, stragglers=cluster.stragglers,
                     network=cluster.network, lr_factor=lr_factor(strategy, config.strategy.lr_scaling),
                     trainer_options=config.trainer, codec_s_per_mb=cluster.compute.codec_s_per_mb)


def curve_csv(evaluations: list[Evaluation]) -> str:
    keys = sorted({k for ev in evaluations for k in ev.metrics} - {"clock_s"})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["clock_s", "updates", *keys])
    for ev in evaluations:
        writer.writerow([f"{ev.clock_s:.6f}", ev.updates, *(ev.metrics.get(k, "") for k in keys)])
    return out.getvalue()


class _Progress:
    """rich progress: training clock vs budget and the current target metric."""

    def __init__(self, config: RunConfig, enabled: bool):
        self.config, self.progress, self.task = config, None, None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     TextColumn("clock {task.completed:.2f}/{task.total:g} s"),
                                     TextColumn("{task.fields[metric]}"), TimeElapsedColumn())

    def __enter__(self) -> "_Progress":
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


def execute_run(config: RunConfig, *, workspace: str | Path | None = None, tracking_uri: str | None = None,
                experiment: str | None = None, tags: dict[str, str] | None = None,
                parent_run_id: str | None = None, run_name: str | None = None,
                progress: bool = False, on_evaluation: EvaluationCallback | None = None) -> RunResult:
    """Run one config to its outcome and record it. Bad input raises ``ConfigError`` before
    any MLflow run exists; an exception during training marks the run FAILED and re-raises.

    ``on_evaluation(clock_s, metrics)`` (sim backend only) is called after each evaluation;
    returning True at one that does not end the run (target, budget, divergence) stops it
    there with outcome ``pruned`` (MLflow tag ``outcome=pruned``, run FINISHED, no TTA)."""
    wall0 = time.perf_counter()
    ws = workspace_dir(workspace)
    tracking_uri = tracking_uri or default_tracking_uri(ws)
    if config.cluster.backend == "dist":
        from syncbench.experiments.procs.launcher import execute_dist_run  # real processes

        return execute_dist_run(config, workspace=ws, tracking_uri=tracking_uri, experiment=experiment, tags=tags,
                                parent_run_id=parent_run_id, run_name=run_name, progress=progress)
    with one_thread():
        task = prepare_task(config)  # checkpointing applied: the model that is timed, probed and trained
        client = open_client(tracking_uri)
        exp_id = get_or_create_experiment(client, experiment or config.name,
                                          artifacts_dir(ws).as_uri() if tracking_uri.startswith("sqlite") else None)
        step_s = config.cluster.compute.step_s
        with signals.deferred(raise_at_end=False):  # a run that exists is always ended, whatever stops it
            recorder = RunRecorder(client, exp_id, run_name or config.name,
                                   tags={**environment_tags(), "syncbench.backend": "sim",
                                         "syncbench.step_s_source": "pinned" if step_s is not None else "calibrated",
                                         **(tags or {})},
                                   parent_run_id=parent_run_id)
        seen = TTATracker(config)  # the loop's outcome of each evaluation, for the pruning hook
        engine: SimEngine | None = None
        init_s, act_bytes = 0.0, None
        try:
            signals.poll()
            recorder.log_params({**config.flat(), "backend": "sim"})
            check_initial_target(task, config)
            # calibration and the memory probe run the user's module: inside the run, so that
            # a module failing there leaves a FAILED run with its error, not an empty experiment
            if step_s is None:
                calibration = calibrate_step(task, config)
                step_s = calibration.step_s
                recorder.set_tags({STEP_SAMPLES_TAG: step_samples_tag(calibration.samples)})
            act_bytes = measure_activation_bytes(task, config)
            engine = build_simulation(config, task, step_s)
            init_s = time.perf_counter() - wall0
            evaluate_global = lambda s: evaluate(s.global_model(), task.val_batches)  # noqa: E731

            def on_eval(ev: Evaluation) -> None:
                recorder.metrics(ev.metrics, step=ev.updates, clock_s=ev.clock_s)
                bar.update(ev)
                ends = seen.observe(ev)
                if on_evaluation is not None and on_evaluation(ev.clock_s, ev.metrics) and ends is None:
                    raise _Pruned

            with _Progress(config, progress) as bar:
                try:
                    loop = train_to_target(config, engine, evaluate_global, on_eval)
                except _Pruned:
                    loop = seen.result
                    loop.outcome = "pruned"
            with signals.deferred():  # record the finished run whole; a signal here stops after it
                engine.finish()
                result = _result(recorder.run_id, loop, init_s, step_s, engine.summary_metrics())
                updates, _ = engine.counters()
                record_finished_run(recorder, config, result, updates, act_bytes, engine.artifacts(),
                                    lambda: time.perf_counter() - wall0)
            return result
        except signals.Interrupted as exc:
            exc.run_id = recorder.run_id  # type: ignore[attr-defined] - for the command's last word
            if recorder.finished:  # the signal came while the finished run was recorded: it stands
                raise
            extra = {}
            if engine is not None:
                with contextlib.suppress(Exception):
                    extra = engine.summary_metrics()
            record_stopped_run(recorder, config, seen.result, exc.signum, init_s=init_s, step_time_s=step_s,
                               activation_bytes=act_bytes, extra=extra, wall_s=time.perf_counter() - wall0)
            raise
        except BaseException as exc:
            recorder.fail(exc)
            raise


class ModuleError(RuntimeError):
    """The user's module broke a rule of its own contract while the run was under way
    (the run is recorded FAILED with this message; exit 1)."""


def check_initial_target(task: PreparedTask, config: RunConfig) -> None:
    """A target metric that is NaN/inf on the untrained model (the dry run of
    ``build_task``) is a bug in the module's ``validation_step``, not a divergence of
    training: say so, rather than record ``diverged``."""
    value = task.initial_metrics.get(config.target.metric)
    if value is not None and not is_finite(value):
        raise ModuleError(f"target.metric {config.target.metric!r} is {value} before any training "
                          f"({type(task.module).__name__}.validation_step on the untrained model): a bug in the "
                          f"module, not a divergence")


def record_stopped_run(recorder: RunRecorder, config: RunConfig, loop: LoopResult | None, signum: int, *,
                       init_s: float | None = None, step_time_s: float | None = None,
                       activation_bytes: int | None = None, extra: dict[str, float] | None = None,
                       wall_s: float | None = None, artifacts: dict[str, str] | None = None) -> None:
    """End a run that a signal stopped: flush every buffered value, record the summary
    metrics known so far (no TTA: the run did not get to its outcome), ``config.yaml`` and
    the curve so far, tags ``outcome=killed`` and ``syncbench.signal``, status KILLED.
    Best effort beyond the flush: the process is on its way out."""
    name = signals.signal_name(signum)
    loop = loop or LoopResult(outcome="killed")
    last = loop.evaluations[-1] if loop.evaluations else None
    summary: dict[str, float] = {"reached": 0.0}
    for key, value in (("best_val", loop.best_val), ("final_val", loop.final_val), ("init_s", init_s),
                       ("step_time_s", step_time_s), ("wall_s", wall_s)):
        if value is not None:
            summary[key] = float(value)
    if activation_bytes is not None:
        summary["activation_bytes"] = float(activation_bytes)
    summary.update(extra or {})
    if last is not None and last.updates:
        summary["clock_per_update_s"] = last.clock_s / last.updates
    try:
        recorder.metrics(summary, step=last.updates if last else 0, clock_s=loop.clock_s)
        recorder.set_tags({"outcome": "killed", "syncbench.signal": name,
                           "syncbench.error": f"stopped by {name} after {loop.clock_s:.3g} s of training clock "
                                              f"({len(loop.evaluations)} evaluations)"})
        recorder.log_text(config.to_yaml(), "config.yaml")
        recorder.log_text(curve_csv(loop.evaluations), "curve.csv")
        for filename, text in (artifacts or {}).items():
            recorder.log_text(text, filename)
    finally:
        recorder.finish("KILLED")


def record_finished_run(recorder: RunRecorder, config: RunConfig, result: RunResult, updates: int,
                        activation_bytes: int | None, artifacts: dict[str, str], wall_s: Callable[[], float],
                        extra_summary: dict[str, float] | None = None) -> None:
    """Record what every finished run records, whatever its backend (DESIGN.md "What a run
    records"): the summary metrics, the outcome tag, config.yaml, curve.csv and the
    strategy's artifacts; then end the run FINISHED."""
    summary = {k: getattr(result, k) for k in SUMMARY_KEYS if getattr(result, k) is not None}
    summary.update(reached=float(result.outcome == "reached"), init_s=result.init_s, step_time_s=result.step_time_s,
                   activation_bytes=float(activation_bytes or 0), **result.extra, **(extra_summary or {}))
    if updates:
        summary["clock_per_update_s"] = result.clock_s / updates
    recorder.metrics(summary, step=updates, clock_s=result.clock_s)
    recorder.set_tags({"outcome": result.outcome})
    recorder.log_text(config.to_yaml(), "config.yaml")
    recorder.log_text(curve_csv(result.evaluations), "curve.csv")
    for name, text in artifacts.items():
        recorder.log_text(text, name)
    result.wall_s = wall_s()
    recorder.metrics({"wall_s": result.wall_s, "mlflow_log_s": recorder.log_seconds}, clock_s=result.clock_s)
    recorder.finish("FINISHED")
    result.mlflow_log_s = recorder.log_seconds


def _result(run_id: str, loop: LoopResult, init_s: float, step_s: float, extra: dict[str, float]) -> RunResult:
    return RunResult(**vars(loop), run_id=run_id, init_s=init_s, step_time_s=step_s, extra=extra)
