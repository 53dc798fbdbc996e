"""Drive a user's LightningModule without a Trainer, as Lightning's automatic optimisation runs it.

The run loop calls the module's own ``training_step``, ``validation_step`` and
``configure_optimizers`` (parsed by Lightning's own parser: every return form Lightning
accepts). ``self.log`` outside a Trainer only warns and returns, so each module gets an
instance-level ``log``/``log_dict`` that records values into a dict: the user's module works
unchanged and we see exactly the names it logs; torchmetrics objects passed to it are
accumulated over the validation set, computed once and reset, as the Trainer reports them.

``ModuleOptimizer`` is "the optimizer step" every strategy's program calls
(``worker.optimizer.step()``): ``on_before_optimizer_step``, gradient clipping
(``trainer.gradient_clip_val``), the optimizer's own step, then the LR schedulers bound to
that optimizer, at Lightning's points (step interval: after each step, ``frequency`` counted
on the batch index within the epoch; epoch interval: after the epoch's last step;
``ReduceLROnPlateau``: with the monitored metric of the latest evaluation, before the next
step). Both backends run it, so both train the same schedule. ``TrainerStandIn`` is what a
module reads of ``self.trainer`` in the sim backend.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from syncbench.strategies.lightning_flavour import base_class, submodule

# a LightningModule of either flavour (strategies/lightning_flavour.py)
LightningModuleLike = Any

_LOGGED = "_syncbench_logged"


def _is_metric(value: Any) -> bool:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics ships with Lightning
        return False
    return isinstance(value, Metric)


_REDUCE = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}


def _reduce_name(fx: Any) -> str:
    if isinstance(fx, str):
        return _REDUCE.get(fx.lower(), "mean")
    name = getattr(fx, "__name__", "mean")
    return _REDUCE.get(name, "mean")



@contextlib.contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, scale: float) -> Iterator[None]:
    """Every param group's lr x ``scale`` inside the block, restored after."""
    if scale == 1.0:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * scale
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr

class _LogCapture:
    """Stands in for ``module.log``/``module.log_dict``: records into ``module._syncbench_logged``.

    Accepts every argument of ``LightningModule.log`` (``prog_bar``, ``on_step``, ``on_epoch``,
    ``sync_dist``, ``reduce_fx``, ``batch_size``, ...). A value is a number, a tensor or a
    torchmetrics ``Metric`` (kept as the object: ``evaluate`` computes it once over the whole
    validation set). A plain object holding its module, so ``copy.deepcopy`` and ``pickle``
    carry it over to the copy (a closure would keep writing into the original's dict)."""

    def __init__(self, module: LightningModuleLike, many: bool = False):
        self.module, self.many = module, many

    def __call__(self, name: Any, value: Any = None, *args: Any, batch_size: int | None = None,
                 reduce_fx: Any = "mean", **kwargs: Any) -> None:
        if self.many:
            items = list(name.items())
            if value is not None:  # log_dict(dictionary, prog_bar, ...) positionally: ignore the flags
                pass
        else:
            items = [(name, value)]
        logged = getattr(self.module, _LOGGED)
        for key, val in items:
            if _is_metric(val):
                logged[key] = (val, batch_size, "metric")
                continue
            if isinstance(val, torch.Tensor):
                if torch._C._functorch.is_functorch_wrapped_tensor(val):
                    continue  # logged inside the sim's vmapped training_step: one value per worker, not kept
                val = val.detach()
                val = val.float().mean().item() if val.numel() != 1 else val.item()
            logged[key] = (float(val), batch_size, _reduce_name(reduce_fx))


def capture_logs(module: LightningModuleLike) -> None:
    """Make ``module.log``/``module.log_dict`` record into ``module._syncbench_logged``."""
    setattr(module, _LOGGED, {})
    module.log = _LogCapture(module)  # type: ignore[method-assign]
    module.log_dict = _LogCapture(module, many=True)  # type: ignore[method-assign]


def take_logged(module: LightningModuleLike) -> dict[str, tuple[Any, int | None, str]]:
    """What the module logged since the last call: name -> (value or Metric, batch_size, reduction)."""
    logged = getattr(module, _LOGGED, None)
    assert logged is not None, "capture_logs(module) was not called"
    setattr(module, _LOGGED, {})
    return logged


def training_loss(module: LightningModuleLike, batch: Any, batch_idx: int) -> torch.Tensor:
    """The loss tensor of the module's own ``training_step``."""
    out = module.training_step(batch, batch_idx)
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"{type(module).__name__}.training_step must return a loss tensor or a dict with 'loss' "
            f"(got {type(out).__name__})"
        )
    return out


# ------------------------------------------------------------------------------------------
# what a module reads of self.trainer
# ------------------------------------------------------------------------------------------
class TrainerStandIn:
    """The fields modules commonly read of ``self.trainer``, for a module driven without a Trainer.

    Each sim worker's replica, the parameter server's copy and the evaluation copy get one.
    Like the dist backend's Trainer (each process is rank 0 of 1), it reports a single process:
    ``world_size`` 1, ``global_rank`` 0, ``is_global_zero`` True. ``global_step`` is the
    optimizer steps of the module's own optimizer (a worker: its training batches, as
    Lightning counts them), ``current_epoch`` the epoch of its shard."""

    def __init__(self, module: LightningModuleLike, *, gradient_clip_val: float | None = None,
                 gradient_clip_algorithm: str | None = None, num_training_batches: float = math.inf):
        self.lightning_module = module
        self.global_step = 0
        self.current_epoch = 0
        self.max_epochs = -1
        self.max_steps = -1
        self.min_epochs = None
        self.min_steps = None
        self.num_training_batches = num_training_batches
        self.estimated_stepping_batches = math.inf
        self.accumulate_grad_batches = 1
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.check_val_every_n_epoch = None
        self.val_check_interval = None
        self.log_every_n_steps = 0
        self.world_size = 1
        self.num_devices = 1
        self.num_nodes = 1
        self.global_rank = 0
        self.local_rank = 0
        self.node_rank = 0
        self.is_global_zero = True
        self.training = True
        self.validating = False
        self.testing = False
        self.predicting = False
        self.sanity_checking = False
        self.fast_dev_run = False
        self.should_stop = False
        self.logger = None
        self.loggers: list[Any] = []
        self.callbacks: list[Any] = []
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.logged_metrics: dict[str, torch.Tensor] = {}
        self.progress_bar_metrics: dict[str, float] = {}
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list[Any] = []
        self.precision = "32-true"
        self.precision_plugin = submodule(module, "plugins.precision").Precision()
        self.profiler = submodule(module, "profilers").PassThroughProfiler()
        self.default_root_dir = "."
        self.datamodule = None
        self.strategy = SimpleNamespace(_lightning_optimizers=self.optimizers, root_device=torch.device("cpu"),
                                        world_size=1, global_rank=0, is_global_zero=True)

    def attach(self) -> "TrainerStandIn":
        """Become ``module.trainer`` (``LightningModule.__getstate__`` drops it from copies)."""
        self.lightning_module.trainer = self  # type: ignore[assignment]
        return self


def attach_trainer(module: LightningModuleLike, **kwargs: Any) -> TrainerStandIn:
    current = getattr(module, "_trainer", None)
    if isinstance(current, TrainerStandIn):
        return current
    return TrainerStandIn(module, **kwargs).attach()


_OVERRIDDEN: dict[tuple[type, str], bool] = {}


def _overridden(module: LightningModuleLike, name: str) -> bool:
    """Whether the module's class replaces Lightning's own (empty) hook ``name``: the sim calls
    several hooks per worker step, and skipping the empty ones keeps its overhead small."""
    key = (type(module), name)
    found = _OVERRIDDEN.get(key)
    if found is None:
        mine, base = getattr(type(module), name, None), getattr(base_class(module), name, None)
        found = _OVERRIDDEN[key] = mine is None or base is None or mine is not base
    return found or name in vars(module)


def _call_hook(module: LightningModuleLike, name: str, *args: Any) -> Any:
    if name.startswith("on_") and not _overridden(module, name):  # Lightning's on_* hooks are empty
        return None
    fn = getattr(module, name, None)
    if not callable(fn):
        return None
    # plain attribute: nn.Module.__setattr__'s checks cost more than the hook itself
    prev = module._current_fx_name
    object.__setattr__(module, "_current_fx_name", name)
    try:
        return fn(*args)
    finally:
        object.__setattr__(module, "_current_fx_name", prev)


call_hook = _call_hook


# ------------------------------------------------------------------------------------------
# configure_optimizers, as Lightning parses it
# ------------------------------------------------------------------------------------------
def check_trainable(module: LightningModuleLike) -> None:
    """What this harness refuses (ValueError, with the reason): manual optimisation and more
    than one optimizer. A strategy's program owns the optimizer step."""
    if not module.automatic_optimization:
        raise ValueError(f"{type(module).__name__} sets automatic_optimization = False: manual optimisation is not "
                         "supported (each strategy's program owns the optimizer step; use Lightning's automatic "
                         "optimisation)")
    optimizers, _ = configure_optimizers(module)
    if len(optimizers) != 1:
        raise ValueError(f"{type(module).__name__}.configure_optimizers returned {len(optimizers)} optimizers: "
                         "exactly one is supported (several optimizers need manual optimisation)")


def configure_optimizers(module: LightningModuleLike) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """(optimizers, ``LRSchedulerConfig``s) of the module's ``configure_optimizers``, parsed and
    validated by Lightning's own parser (every return form Lightning accepts)."""
    lightning_optim = submodule(module, "core.optimizer")  # the module's own flavour parses its return value
    _configure_optimizers = lightning_optim._configure_optimizers
    _configure_schedulers_automatic_opt = lightning_optim._configure_schedulers_automatic_opt
    _validate_optimizers_attached = lightning_optim._validate_optimizers_attached
    _validate_scheduler_api = lightning_optim._validate_scheduler_api

    name = type(module).__name__
    conf = _call_hook(module, "configure_optimizers")
    if conf is None:
        raise ValueError(f"{name}.configure_optimizers returned None: an optimizer is needed")
    try:
        optimizers, schedulers, monitor = _configure_optimizers(conf)
        configs = _configure_schedulers_automatic_opt(schedulers, monitor)
        _validate_optimizers_attached(optimizers, configs)
        _validate_scheduler_api(configs, module)
    except Exception as exc:  # noqa: BLE001 - Lightning's MisconfigurationException and friends
        raise ValueError(f"{name}.configure_optimizers: {exc}") from None
    if not optimizers:
        raise ValueError(f"{name}.configure_optimizers returned no optimizer")
    return optimizers, configs


def build_optimizer(module: LightningModuleLike) -> torch.optim.Optimizer:
    """The (single) optimizer of ``configure_optimizers``, without its schedulers."""
    optimizers, _ = configure_optimizers(module)
    if len(optimizers) != 1:
        raise ValueError(f"{type(module).__name__}.configure_optimizers must return exactly one optimizer "
                         f"(got {len(optimizers)})")
    return optimizers[0]


def plateau_monitors(module: LightningModuleLike) -> list[tuple[str, bool]]:
    """(monitor, strict) of every ReduceLROnPlateau the module configures (built on a copy)."""
    import copy

    _, configs = configure_optimizers(copy.deepcopy(module))
    return [(c.monitor, c.strict) for c in configs if c.reduce_on_plateau]


class ModuleOptimizer:
    """The optimizer step of Lightning's automatic optimisation, for one optimizer and the LR
    schedulers bound to it; everything else is delegated to the torch optimizer.

    ``step()``: pending ``ReduceLROnPlateau`` steps (with the latest evaluation's metrics),
    ``on_before_optimizer_step``, ``configure_gradient_clipping`` (when
    ``trainer.gradient_clip_val`` is set), the torch step (``lr_scale`` scales every group's
    lr for this step only: async's staleness-dependent lr), then the schedulers whose interval
    ends. ``steps_per_epoch`` optimizer steps make an epoch (one pass over the training data)."""

    def __init__(self, module: LightningModuleLike, optimizer: torch.optim.Optimizer, schedulers: list[Any], *,
                 steps_per_epoch: float = math.inf, gradient_clip_val: float | None = None,
                 gradient_clip_algorithm: str | None = None,
                 metrics: Callable[[], Mapping[str, float]] | None = None):
        self.module, self.optimizer, self.schedulers = module, optimizer, list(schedulers)
        self.steps_per_epoch = steps_per_epoch
        self.gradient_clip_val, self.gradient_clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        self.metrics = metrics or (lambda: {})
        self.steps = 0  # optimizer steps taken
        self.epoch = 0
        self.batch_in_epoch = 0
        self.pending: list[Any] = []  # ReduceLROnPlateau configs due, stepped before the next step
        self.lr_history: list[float] = []  # lr of the first group at each step (before lr_scale)

    # delegation ------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in ("optimizer", "__setstate__", "__getstate__"):
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def scale_lr(self, factor: float) -> None:
        """``strategy.lr_scaling``: scale every group's lr and the schedulers' base lrs."""
        if factor == 1.0:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * factor
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * factor
        for config in self.schedulers:
            base = getattr(config.scheduler, "base_lrs", None)
            if base is not None:
                config.scheduler.base_lrs = [lr * factor for lr in base]
            last = getattr(config.scheduler, "_last_lr", None)
            if last is not None:
                config.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _step_plateau(self) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        metrics = self.metrics()
        for config in pending:
            value = metrics.get(config.monitor)
            if value is None:
                continue  # no evaluation has produced the metric yet: nothing to compare
            _call_hook(self.module, "lr_scheduler_step", config.scheduler, torch.tensor(float(value)))

    def _scheduler_step(self, config: Any) -> None:
        if config.reduce_on_plateau:
            self.pending.append(config)
        else:
            _call_hook(self.module, "lr_scheduler_step", config.scheduler, None)

    def step(self, closure: Callable[[], Any] | None = None, lr_scale: float = 1.0) -> None:
        assert closure is None, "the strategy's program computes the gradient before the optimizer step"
        self.prepare_step()
        with scaled_lr(self.optimizer, lr_scale):
            self.optimizer.step()
        self.finish_step()

    def prepare_step(self) -> None:
        """What comes before the torch step: pending plateau steps, ``on_before_optimizer_step``,
        clipping. (A backend may run the torch steps of several workers as one, between each
        one's ``prepare_step`` and ``finish_step``: the ``Step`` operation.)"""
        self._step_plateau()
        optimizer, module = self.optimizer, self.module
        _call_hook(module, "on_before_optimizer_step", optimizer)
        if self.gradient_clip_val is not None and self.gradient_clip_val > 0:
            _call_hook_kw(module, "configure_gradient_clipping", optimizer,
                          gradient_clip_val=self.gradient_clip_val,
                          gradient_clip_algorithm=self.gradient_clip_algorithm or "norm")
        self.lr_history.append(float(optimizer.param_groups[0]["lr"]))

    def finish_step(self) -> None:
        """What comes after the torch step: the counters and the schedulers whose interval ends."""
        module = self.module
        self.steps += 1
        self.batch_in_epoch += 1
        for config in self.schedulers:
            if config.interval == "step" and self.batch_in_epoch % config.frequency == 0:
                self._scheduler_step(config)
        if self.batch_in_epoch >= self.steps_per_epoch:
            for config in self.schedulers:
                if config.interval == "epoch" and (self.epoch + 1) % config.frequency == 0:
                    self._scheduler_step(config)
            self.epoch += 1
            self.batch_in_epoch = 0
        trainer = getattr(module, "_trainer", None)
        if isinstance(trainer, TrainerStandIn) and trainer.lightning_module is module and \
                module is not None and getattr(self, "owns_counters", False):
            trainer.global_step, trainer.current_epoch = self.steps, self.epoch


def _call_hook_kw(module: LightningModuleLike, name: str, *args: Any, **kwargs: Any) -> Any:
    fn = getattr(module, name)
    prev, module._current_fx_name = module._current_fx_name, name
    try:
        return fn(*args, **kwargs)
    finally:
        module._current_fx_name = prev


def build_module_optimizer(module: LightningModuleLike, *, steps_per_epoch: float = math.inf,
                           gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None,
                           metrics: Callable[[], Mapping[str, float]] | None = None,
                           owns_counters: bool = False) -> ModuleOptimizer:
    """The module's optimizer and its schedulers, built together (the schedulers are bound to
    that optimizer), as one ``ModuleOptimizer``. ``owns_counters``: the module's trainer
    stand-in reads ``global_step``/``current_epoch`` from this optimizer (the parameter server)."""
    optimizers, configs = configure_optimizers(module)
    if len(optimizers) != 1:
        raise ValueError(f"{type(module).__name__}.configure_optimizers must return exactly one optimizer "
                         f"(got {len(optimizers)})")
    opt = ModuleOptimizer(module, optimizers[0], configs, steps_per_epoch=steps_per_epoch,
                          gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm,
                          metrics=metrics)
    opt.owns_counters = owns_counters
    trainer = getattr(module, "_trainer", None)
    if isinstance(trainer, TrainerStandIn):
        trainer.optimizers[:] = [opt.optimizer]
        trainer.lr_scheduler_configs = opt.schedulers
    return opt


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size_of(next(iter(batch.values())))
    return 1


@torch.no_grad()
def evaluate(module: LightningModuleLike, batches: Sequence[Any]) -> dict[str, float]:
    """Run ``validation_step`` over all batches, with the validation hooks, as the Trainer's
    validation epoch reports it: a logged number or tensor is reduced over the batches by its
    ``reduce_fx`` (mean: batch-size weighted); a logged torchmetrics object is computed once
    over the whole set, then reset."""
    was_training = module.training
    trainer = getattr(module, "_trainer", None)
    stand_in = trainer if isinstance(trainer, TrainerStandIn) else None
    if trainer is None:
        stand_in = attach_trainer(module)
    if stand_in is not None:
        stand_in.training, stand_in.validating = False, True
    module.eval()
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    extremes: dict[str, float] = {}
    reductions: dict[str, str] = {}
    metric_objects: dict[str, Any] = {}
    try:
        take_logged(module)
        _call_hook(module, "on_validation_epoch_start")
        for idx, batch in enumerate(batches):
            _call_hook(module, "on_validation_batch_start", batch, idx)
            out = module.validation_step(batch, idx)
            _call_hook(module, "on_validation_batch_end", out, batch, idx)
            default_size = batch_size_of(batch)
            for name, (value, size, how) in take_logged(module).items():
                reductions[name] = how
                if how == "metric":
                    metric_objects[name] = value
                elif how == "mean":
                    w = float(size or default_size)
                    sums[name] = sums.get(name, 0.0) + value * w
                    weights[name] = weights.get(name, 0.0) + w
                elif how == "sum":
                    sums[name] = sums.get(name, 0.0) + value
                else:
                    best = extremes.get(name)
                    extremes[name] = value if best is None else (max if how == "max" else min)(best, value)
        _call_hook(module, "on_validation_epoch_end")
        for name, (value, size, how) in take_logged(module).items():  # logged in on_validation_epoch_end
            reductions[name] = how
            if how == "metric":
                metric_objects[name] = value
            else:
                sums[name], weights[name] = value, 1.0
                reductions[name] = "mean"
    finally:
        module.train(was_training)
        if stand_in is not None:
            stand_in.training, stand_in.validating = True, False
    out: dict[str, float] = {}
    for name, how in reductions.items():
        if how == "metric":
            continue
        if how == "mean":
            out[name] = sums[name] / weights[name]
        elif how == "sum":
            out[name] = sums[name]
        else:
            out[name] = extremes[name]
    computed: dict[int, Any] = {}
    for name, metric in metric_objects.items():
        if id(metric) not in computed:
            computed[id(metric)] = metric.compute()
        value = computed[id(metric)]
        out[name] = float(value.float().mean()) if isinstance(value, torch.Tensor) else float(value)
    for metric in {id(m): m for m in metric_objects.values()}.values():
        metric.reset()
    if stand_in is not None:
        stand_in.callback_metrics.update({k: torch.tensor(v) for k, v in out.items()})
    return out


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def materialize(loader: Iterable[Any]) -> list[Any]:
    """Collate a dataloader once, so repeated evaluations skip its overhead."""
    return list(loader)
