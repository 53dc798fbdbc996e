"""A run on the sim backend, end to end: the task prepared, the step time calibrated (unless
pinned), the configured strategy's programs simulated to the target (``train_to_target``) and
the run recorded in MLflow (``syncbench.experiments.run.execute_run`` dispatches here)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from syncbench.experiments import signals
from syncbench.experiments.config import RunConfig
from syncbench.experiments.progress import RunProgress
from syncbench.experiments.recording import RunRecorder, environment_tags, get_or_create_experiment, open_client
from syncbench.experiments.result import RunResult, record_finished_run, record_stopped_run
from syncbench.experiments.sim.batching import BATCHING_TAG, move_to
from syncbench.experiments.sim.calibration import STEP_SAMPLES_TAG, calibrate_step, step_samples_tag
from syncbench.experiments.sim.device import resolve_sim_device
from syncbench.experiments.sim.engine import SimEngine
from syncbench.experiments.sim.run_loop import train_to_target
from syncbench.experiments.strategy_setup import build_strategy, lr_factor
from syncbench.experiments.task import (
    PreparedTask,
    check_initial_target,
    measure_activation_bytes,
    measure_peak_mem_bytes,
    one_thread,
    prepare_task,
    seed_everything,
)
from syncbench.experiments.tta import Evaluation, LoopResult, TTATracker
from syncbench.experiments.workspace import artifacts_dir
from syncbench.strategies.lightning_bridge import evaluate

# on_evaluation(clock_s, metrics) -> True stops the run as ``pruned`` (a sweep's tuning race)
EvaluationCallback = Callable[[float, dict[str, float]], bool]


class _Pruned(Exception):
    """Raised from the evaluation hook to stop a run that its on_evaluation callback prunes."""


def build_simulation(config: RunConfig, task: PreparedTask, step_s: float, device: str | None = None) -> SimEngine:
    """The configured strategy's programs on a simulated cluster over the task's module and data,
    on ``device`` (default: ``cluster.device`` resolved here)."""
    cluster = config.cluster
    device = resolve_sim_device(cluster.device) if device is None else device
    seed_everything(config.seed)
    strategy = build_strategy(config)
    return SimEngine(strategy, task.module, task.train_set, task.collate, workers=cluster.workers,
                     batch_size=config.batch_size, seed=config.seed, step_s=step_s, stragglers=cluster.stragglers,
                     network=cluster.network, lr_factor=lr_factor(strategy, config.strategy.lr_scaling),
                     trainer_options=config.trainer, codec_s_per_mb=cluster.compute.codec_s_per_mb,
                     device=device, batching=cluster.sim.batching)


def execute_sim_run(config: RunConfig, *, workspace: Path, tracking_uri: str, experiment: str | None = None,
                    tags: dict[str, str] | None = None, parent_run_id: str | None = None, run_name: str | None = None,
                    progress: bool = False, on_evaluation: EvaluationCallback | None = None,
                    wall0: float | None = None) -> RunResult:
    """Run one config on the simulated cluster to its outcome and record it (see
    ``syncbench.experiments.run.execute_run``). ``wall0``: the ``perf_counter`` at which the run
    began (its ``init_s`` and ``wall_s`` count from there)."""
    wall0 = time.perf_counter() if wall0 is None else wall0
    device = resolve_sim_device(config.cluster.device)  # a device that is not here: refused before any run
    with one_thread():
        task = prepare_task(config)  # checkpointing applied: the model that is timed, probed and trained
        client = open_client(tracking_uri)
        exp_id = get_or_create_experiment(client, experiment or config.name,
                                          artifacts_dir(workspace).as_uri() if tracking_uri.startswith("sqlite") else None)
        step_s = config.cluster.compute.step_s
        with signals.deferred(raise_at_end=False):  # a run that exists is always ended, whatever stops it
            recorder = RunRecorder(client, exp_id, run_name or config.name,
                                   tags={**environment_tags(), "syncbench.backend": "sim",
                                         "syncbench.step_s_source": "pinned" if step_s is not None else "calibrated",
                                         **(tags or {})},
                                   parent_run_id=parent_run_id)
        seen = TTATracker(config)  # the loop's outcome of each evaluation, for the pruning hook
        engine: SimEngine | None = None
        init_s, act_bytes, memory = 0.0, None, {}
        result: RunResult | None = None
        try:
            signals.poll()
            recorder.log_params({**config.flat(), "backend": "sim"})
            check_initial_target(task, config)
            # calibration and the memory probe run the user's module: inside the run, so that
            # a module failing there leaves a FAILED run with its error, not an empty experiment
            if step_s is None:
                calibration = calibrate_step(task, config, device=device)
                step_s = calibration.step_s
                recorder.set_tags({STEP_SAMPLES_TAG: step_samples_tag(calibration.samples)})
            act_bytes = measure_activation_bytes(task, config)
            peak = measure_peak_mem_bytes(task, config, device)  # CUDA only
            memory = {"peak_mem_bytes": float(peak)} if peak is not None else {}
            engine = build_simulation(config, task, step_s, device)
            recorder.set_tags({BATCHING_TAG: engine.batching, "syncbench.sim.device": device})
            init_s = time.perf_counter() - wall0
            val_batches = task.val_batches if device == "cpu" else [move_to(b, device) for b in task.val_batches]
            evaluate_global = lambda s: evaluate(s.global_model(), val_batches)  # noqa: E731

            def on_eval(ev: Evaluation) -> None:
                recorder.metrics(ev.metrics, step=ev.updates, clock_s=ev.clock_s)
                bar.update(ev)
                ends = seen.observe(ev)
                if on_evaluation is not None and on_evaluation(ev.clock_s, ev.metrics) and ends is None:
                    raise _Pruned

            with RunProgress(config, progress) as bar:
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
                                    lambda: time.perf_counter() - wall0, memory)
            return result
        except signals.Interrupted as exc:
            exc.run_id = recorder.run_id  # type: ignore[attr-defined] - for the command's last word
            if recorder.finished:  # the signal came while the finished run was recorded: it stands
                exc.finished_result = result  # type: ignore[attr-defined] - a sweep tells its trial the result
                raise
            extra = dict(memory)
            if engine is not None:
                with contextlib.suppress(Exception):
                    extra.update(engine.summary_metrics())
            record_stopped_run(recorder, config, seen.result, exc.signum, init_s=init_s, step_time_s=step_s,
                               activation_bytes=act_bytes, extra=extra, wall_s=time.perf_counter() - wall0)
            raise
        except BaseException as exc:
            recorder.fail(exc)
            raise


def _result(run_id: str, loop: LoopResult, init_s: float, step_s: float, extra: dict[str, float]) -> RunResult:
    return RunResult(**vars(loop), run_id=run_id, init_s=init_s, step_time_s=step_s, extra=extra)
