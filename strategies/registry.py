"""Strategies by name: configs, Optuna and MLflow see plain strings. Adding a strategy is one
file under ``strategies/`` and one line here; the contract tests pick it up
(docs/adding-a-strategy.md).

A line is ``name: (options model, "module:Strategy class")``. The options model is given

* as a class of the torch-free ``strategies/options.py`` (the shipped strategies): its keys
  are composed into the flat ``strategy:`` section of a run config, which is built when the
  config module is imported. Two of them may share a key only as one field, reused
  (``_SHARED`` there), so that a key means one thing;
* or as ``"module:Class"``, usually of the strategy's own file (a new strategy): it is
  imported when first needed, and its keys live in a section of their own,
  ``strategy.<name>.<key>``, validated when a config names the strategy or has that section.
  Nothing another strategy declares is touched.

``OPTIONS`` maps each name to its options model: for the shipped strategies config validation
and the report import no torch (CLI start-up time: a mistake in a config is answered without
importing torch). ``STRATEGIES`` maps each name to its ``Strategy`` class, importing the file
that holds it (and its torch math) the first time the name is looked up. ``traits(name)``: what
the strategy is (``syncbench.strategies.options.Traits``), read from its options model.

``register`` adds a line at run time (a test, a user's own strategy outside this package); the
registrations of a process travel to the processes it starts (the dist backend's workers,
sweep jobs) in the environment variable ``SYNCBENCH_STRATEGIES``."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from syncbench.strategies.options import (
    AsyncLocalSGDOptions,
    AsyncOptions,
    LocalSGDOptions,
    Options,
    StreamingDiLoCoOptions,
    SyncOptions,
    Traits,
)

if TYPE_CHECKING:
    from syncbench.strategies.program import Strategy

_REGISTRY: dict[str, tuple[type[Options] | str, str]] = {  # name: (options model, "module:Strategy class")
    "sync": (SyncOptions, "syncbench.strategies.sync:Sync"),
    "local_sgd": (LocalSGDOptions, "syncbench.strategies.local_sgd:LocalSGD"),
    "async": (AsyncOptions, "syncbench.strategies.async_ps:Async"),
    "streaming_diloco": (StreamingDiLoCoOptions, "syncbench.strategies.streaming_diloco:StreamingDiLoCo"),
    "async_local_sgd": (AsyncLocalSGDOptions, "syncbench.strategies.async_local_sgd:AsyncLocalSGD"),
}

ENV_STRATEGIES = "SYNCBENCH_STRATEGIES"  # JSON {name: [options "module:Class", strategy "module:Class"]}


def _import(where: str) -> type:
    module, _, attr = where.partition(":")
    return getattr(importlib.import_module(module), attr)


def has_own_section(name: str) -> bool:
    """Whether the strategy's options live in ``strategy.<name>:`` (given as ``"module:Class"``)
    rather than in the flat ``strategy:`` section."""
    return isinstance(_REGISTRY[name][0], str)


def flat_options() -> dict[str, type[Options]]:
    """The options models composed into the flat ``strategy:`` section (the shipped strategies)."""
    return {name: options for name, (options, _) in _REGISTRY.items() if not isinstance(options, str)}


class _ByName(Mapping[str, Any]):
    """A read-only view of the registry by strategy name; subclasses load each value lazily."""

    label = "REGISTRY"

    def __init__(self) -> None:
        self._loaded: dict[str, Any] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __repr__(self) -> str:
        return f"{self.label}({', '.join(_REGISTRY)})"


class _Options(_ByName):
    """name -> options model; a model given as ``"module:Class"`` is imported on first look-up."""

    label = "OPTIONS"

    def __getitem__(self, name: str) -> type[Options]:
        options, _ = _REGISTRY[name]
        if not isinstance(options, str):
            return options
        if name not in self._loaded:
            model = _import(options)
            if not (isinstance(model, type) and issubclass(model, Options)):
                raise TypeError(f"strategy {name!r}: {options} is not an Options model "
                                "(syncbench.strategies.options.Options)")
            self._loaded[name] = model
        return self._loaded[name]


OPTIONS: Mapping[str, type[Options]] = _Options()


def strategies_reading(key: str) -> list[str]:
    """The strategies whose options include ``key`` of the flat ``strategy:`` section (a key a
    config gives for a strategy that does not read it is refused naming these)."""
    return [name for name, model in flat_options().items() if key in model.model_fields]


def traits(name: str) -> Traits:
    """What the strategy ``name`` is, from its options model; the defaults for a name not
    registered (a run recorded with a strategy since removed)."""
    return OPTIONS[name].traits if name in _REGISTRY else Traits()

# Names a strategy goes by in papers and other tools that are a setting of one registered here:
# an unknown strategy.name gets "did you mean ..." from this table (keys lower case, "_" for "-").
ALIASES: dict[str, str] = {
    "diloco": "local_sgd with outer: {lr: 0.7, momentum: 0.9, nesterov: true} (DiLoCo)",
    "post_local_sgd": "local_sgd with warmup_sync_updates: K (post-local SGD)",
    "fedavg": "local_sgd (FedAvg's averaging of local steps)",
    "ddp": "sync", "allreduce": "sync", "all_reduce": "sync", "synchronous": "sync",
    "asgd": "async", "hogwild": "async", "parameter_server": "async", "ps": "async", "asynchronous": "async",
    "async_diloco": "async_local_sgd with outer: {lr: 0.7, momentum: 0.9, nesterov: true}",
}


class _Strategies(_ByName):
    """name -> Strategy class; the class's file is imported on first look-up."""

    label = "STRATEGIES"

    def __getitem__(self, name: str) -> type[Strategy]:
        if name not in self._loaded:
            # the Strategy base only now: its file imports torch, this one must not
            from syncbench.strategies.program import Strategy

            where = _REGISTRY[name][1]
            options = OPTIONS[name]
            cls = _import(where)
            if cls.name != name or cls.options_model is not options:
                raise TypeError(f"strategies/registry.py: {where} is registered as {name!r} with {options.__name__}, "
                                f"but it names itself {cls.name!r} with {cls.options_model.__name__}")
            if cls.traits.has_parameter_server != (cls.server is not Strategy.server):
                raise TypeError(f"{where}: traits.has_parameter_server is {cls.traits.has_parameter_server}, but "
                                f"the class {'does not define' if cls.server is Strategy.server else 'defines'} "
                                "server(): the backends start a server by the trait")
            self._loaded[name] = cls
        return self._loaded[name]


STRATEGIES: Mapping[str, type[Strategy]] = _Strategies()


def register(name: str, options: str, strategy: str) -> None:
    """Add ``name: (options, strategy)`` at run time, as a line in ``_REGISTRY`` does, both given
    as ``"module:Class"`` (so the options have their own section, ``strategy.<name>``); the
    processes this one starts inherit it (``SYNCBENCH_STRATEGIES``). Nothing is imported yet."""
    if name in _REGISTRY:
        raise ValueError(f"strategy {name!r} is already registered")
    for what, where in (("options", options), ("strategy", strategy)):
        module, sep, attr = str(where).partition(":")
        if not (isinstance(where, str) and sep and module and attr):
            raise ValueError(f"register({name!r}): {what} must be 'package.module:Class', got {where!r}")
    _REGISTRY[name] = (options, strategy)
    _export()


def unregister(name: str) -> None:
    """Undo ``register(name, ...)`` (a strategy of ``_REGISTRY`` itself cannot be removed)."""
    if name not in _registered_at_run_time():
        raise ValueError(f"strategy {name!r} was not registered at run time")
    del _REGISTRY[name]
    OPTIONS._loaded.pop(name, None)  # type: ignore[attr-defined]
    STRATEGIES._loaded.pop(name, None)  # type: ignore[attr-defined]
    _export()


_IN_THIS_FILE = frozenset(_REGISTRY)  # the lines above; the rest came from register()


def _registered_at_run_time() -> dict[str, tuple[str, str]]:
    return {n: e for n, e in _REGISTRY.items() if n not in _IN_THIS_FILE}  # type: ignore[misc]


def _export() -> None:
    extra = _registered_at_run_time()
    if extra:
        os.environ[ENV_STRATEGIES] = json.dumps({n: list(e) for n, e in extra.items()})
    else:
        os.environ.pop(ENV_STRATEGIES, None)


def _import_environment() -> None:
    """The registrations of the process that started this one."""
    raw = os.environ.get(ENV_STRATEGIES)
    if not raw:
        return
    try:
        entries = json.loads(raw)
        pairs = [(str(n), str(o), str(c)) for n, (o, c) in entries.items()]
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"${ENV_STRATEGIES}: expected JSON {{name: [\"module:Options\", \"module:Strategy\"]}}, "
                         f"got {raw!r}") from None
    for name, options, strategy in pairs:
        if name not in _REGISTRY:
            register(name, options, strategy)


_import_environment()
