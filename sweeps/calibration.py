"""A sweep's tasks, built once: checked before any store is touched (``preflight``), then timed
on this machine so that every trial of the cells that share a model runs on one pinned scale:
the worker step (``cluster.compute.step_s``) and the codec's encode/decode cost
(``cluster.compute.codec_s_per_mb``), kept in the study for resumed and concurrent launchers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from syncbench.experiments.config import ConfigError, apply_overrides, validate_config
from syncbench.experiments.sim.calibration import calibrate_codec_s_per_mb, calibrate_steps
from syncbench.experiments.task import one_thread, prepare_task
from syncbench.sweeps.spec import Sweep, task_key

T = TypeVar("T")
# the step calibration per task_key: {"step_s", "samples"} (the attribute "syncbench.step_s" of
# sweeps stored before it timed checkpointed models as a run trains them is not reused)
STEP_S_ATTR = "syncbench.step_calibration"
CODEC_ATTR = "syncbench.codec_calibration"  # study attribute: {task, codec and N: codec_s_per_mb}


def preflight(sweep: Sweep) -> dict[str, Any]:
    """Build each distinct task once (import paths, constructor arguments, target metric),
    with the tuned parameters at a sample value, so that a typo exits 2 before any store is
    touched. Returns the built tasks by ``task_key`` for calibration."""
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
    key = task_key(config)
    if key not in prepared:
        prepared[key] = prepare_task(config)
    return prepared[key]


def pin_step_times(sweep: Sweep, study: Any,
                   prepared: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """docs/backends.md: a sweep calibrates step_s once per model-changing config (``task_key``:
    the task, the per-worker batch and the checkpointing section) and pins it for all the
    trials of the cells that share it. The task is prepared as a run trains it
    (``prepare_task``: checkpointing applied), so a checkpointed cell is timed with its
    recomputation. The configs still missing a value are timed together, their blocks
    interleaved (``calibrate_steps``), so a drift of the machine's speed during calibration
    cannot favour one of them. The value and its block medians are kept in the study, so resumed and
    concurrent launchers reuse them; the medians go to each trial as a tag (claim (d)
    tests the step time with them). Returns the pinned ``step_s`` and the block medians by cell id."""
    stored: dict[str, dict[str, Any]] = dict(study.user_attrs.get(STEP_S_ATTR, {}))
    timed = [cell for cell in sweep.cells
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
        study.set_user_attr(STEP_S_ATTR, stored)
    step_s: dict[str, float] = {}  # cell id -> step_s pinned by the sweep
    samples: dict[str, list[float]] = {}  # cell id -> the calibration's block medians
    for cell in timed:
        if task_key(cell.config) in stored:
            step_s[cell.id] = stored[task_key(cell.config)]["step_s"]
            samples[cell.id] = stored[task_key(cell.config)]["samples"]
    return step_s, samples


def pin_codec_costs(sweep: Sweep, study: Any, prepared: dict[str, Any]) -> dict[str, float]:
    """As ``step_s``: the encode/decode cost of a compressed exchange
    (``cluster.compute.codec_s_per_mb``) is measured once per task, codec and worker count
    (one worker of N decodes N payloads of an all-gather codec: the charge grows with N), kept
    in the study and pinned for every trial that uses it, so the cells are timed on one scale
    and each trial is bit-reproducible. Returns the pinned ``codec_s_per_mb`` by cell id."""
    codec_s: dict[str, float] = {}  # cell id -> codec_s_per_mb pinned by the sweep
    stored: dict[str, float] = dict(study.user_attrs.get(CODEC_ATTR, {}))
    changed = False
    for cell in sweep.cells:
        config = cell.config
        if (config.cluster.backend != "sim" or config.strategy.compression == "none"
                or config.cluster.compute.codec_s_per_mb is not None):
            continue
        st = config.strategy
        key = json.dumps([task_key(config), st.compression, st.topk_ratio, st.powersgd_rank, config.cluster.workers])
        if key not in stored:
            with one_thread():
                value = unless_the_module_fails(
                    lambda config=config: calibrate_codec_s_per_mb(prepared_task(prepared, config), config))
            if value is None:
                continue
            stored[key] = value
            changed = True
        codec_s[cell.id] = stored[key]
    if changed:
        study.set_user_attr(CODEC_ATTR, stored)
    return codec_s
