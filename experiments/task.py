"""The user's task as a run trains it, on either backend: the module and data built, checked
against the config and dry-run (``build_task``), then every model-changing option applied
(``prepare_task``); seeding, the activation-memory probe and the checks a run makes of the
untrained model before it trains."""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from syncbench.experiments.config import ConfigError, RunConfig, import_object
from syncbench.experiments.sharding import ShardedBatches
from syncbench.experiments.workspace import available_memory_bytes
from syncbench.strategies import STRATEGIES
from syncbench.strategies.checkpointing import activation_bytes, apply_checkpointing, step_peak_bytes
from syncbench.strategies.lightning_bridge import (
    LightningModuleLike,
    capture_logs,
    check_trainable,
    evaluate,
    is_finite,
    materialize,
    plateau_monitors,
    training_loss,
)
from syncbench.strategies.lightning_flavour import require_subclass


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
    check_sim_memory(module, config)
    check_shards(train_loader.dataset, collate, config)
    check_training_step(module, train_loader.dataset, collate, config)
    return PreparedTask(module, datamodule, train_loader.dataset, collate, val_batches, logged, initial)


def check_shards(train_set: Dataset, collate: Callable[[list], Any], config: RunConfig) -> None:
    """Every one of the ``cluster.workers`` workers gets a full batch from its shard: refused
    (exit 2, with the configured N) before anything is recorded, on both backends."""
    workers = config.cluster.workers
    try:
        ShardedBatches(train_set, 0, workers, config.batch_size, config.seed, collate)
    except ValueError as exc:
        shard = len(train_set) // workers  # type: ignore[arg-type]
        raise ConfigError(f"batch_size: {exc} (one worker's shard holds {shard} samples at "
                          f"cluster.workers={workers}); lower batch_size or cluster.workers") from None


# A sim replica beyond its tensors: the module's Python objects and its worker's bookkeeping.
# A deep copy of the digits MLP measured ~17 KB over its tensors here (2026-12-03); doubled.
REPLICA_OVERHEAD_BYTES = 32 * 1024
SIM_MEMORY_SHARE = 0.8  # of the memory available when the run starts; the rest: data, MLflow, the OS


def replica_bytes(module: Any) -> int:
    """What one sim worker's replica is estimated to hold once it has stepped: parameters,
    their gradients and up to two optimizer moments (Adam) -- 4x the parameters -- its
    buffers, and ``REPLICA_OVERHEAD_BYTES``."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return 4 * params + buffers + REPLICA_OVERHEAD_BYTES


def check_sim_memory(module: Any, config: RunConfig) -> None:
    """The sim holds its ``cluster.workers`` replicas in this process: an N whose estimated
    replicas (``replica_bytes`` of the one built, times N) do not fit in the memory available
    is refused (exit 2) before a replica is copied, instead of growing until the OOM killer
    ends the run. Strategies whose replicas stay identical may share one replica; they are
    still counted a worker's overhead each."""
    if config.cluster.backend != "sim":
        return
    available = available_memory_bytes()
    if available is None:
        return
    workers, one = config.cluster.workers, replica_bytes(module)
    shared = STRATEGIES[config.strategy.name].traits.keeps_replicas_identical
    need = one + (workers - 1) * (REPLICA_OVERHEAD_BYTES if shared else one)
    budget = SIM_MEMORY_SHARE * available
    if need > budget:
        most = max(1, int((budget - one) // (REPLICA_OVERHEAD_BYTES if shared else one)) + 1)
        raise ConfigError(
            f"cluster.workers={workers}: the sim would hold {workers} replicas of {type(module).__name__} in this "
            f"process, about {one / 1e6:.1f} MB each (weights, gradients, optimizer state), "
            f"{need / 1e9:.1f} GB in all, more than {SIM_MEMORY_SHARE:.0%} of the {available / 1e9:.1f} GB "
            f"available; at most about {most} workers fit here: lower cluster.workers, or use cluster.backend=dist "
            "over several machines")


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


def _memory_probe_batch(task: PreparedTask, config: RunConfig) -> Any:
    """The batch both memory measurements run on (its own seed: the run's draws are untouched)."""
    return next(ShardedBatches(task.train_set, 0, 1, config.batch_size, config.seed + 2, task.collate))


def measure_activation_bytes(task: PreparedTask, config: RunConfig) -> int | None:
    batch = _memory_probe_batch(task, config)
    rng_state = torch.get_rng_state()
    try:
        return int(activation_bytes(copy.deepcopy(task.module), batch))
    finally:
        torch.set_rng_state(rng_state)


def measure_peak_mem_bytes(task: PreparedTask, config: RunConfig, device: torch.device | str) -> int | None:
    """The metric ``peak_mem_bytes`` (docs/metrics.md): on a CUDA device, the allocator's peak over
    one training step of the prepared (possibly checkpointed) module (``step_peak_bytes``); None
    elsewhere, where no per-step peak exists (a process's RSS holds the whole run)."""
    if torch.device(device).type != "cuda":
        return None
    return step_peak_bytes(task.module, _memory_probe_batch(task, config), device)


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
