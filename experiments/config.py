"""The run config (docs/config.md): one pydantic model per section, validated at load.

Unknown keys and wrong types are rejected with their dotted key path; ``--set`` overrides
are applied to the raw mapping before validation so that they are checked the same way.
"""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

# the options models, not the strategies: validating a config imports no torch (CLI start-up time)
from syncbench.strategies.options import CheckpointingConfig, ConfigError, OuterConfig
from syncbench.strategies.registry import ALIASES, OPTIONS, flat_options, has_own_section, strategies_reading

__all__ = ["CheckpointingConfig", "ConfigError", "OuterConfig", "RunConfig", "StrategyConfig", "TrainerConfig"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Strict):
    module: str = Field(description="Your LightningModule as 'package.module:Class' (importable from the current "
                                    "directory, the config's directory or the installed packages)")
    data: str = Field(description="Your LightningDataModule as 'package.module:Class'")
    module_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the module's "
                                        "constructor (e.g. lr); any key can be swept or tuned as task.module_args.KEY")
    data_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the data module's "
                                      "constructor")

    @field_validator("module", "data")
    @classmethod
    def _import_path_shape(cls, value: str) -> str:
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"expected 'package.module:Class', got {value!r}")
        return value


class TargetConfig(_Strict):
    metric: str = Field(description="A metric the module self.log()s in validation_step (e.g. val_acc); "
                                    "a name it never logs is refused before the run")
    value: float = Field(allow_inf_nan=False, description="The target: the run has reached it at the first "
                         "evaluation that meets it (a finite number: NaN or inf could never be met)")
    mode: Literal["max", "min"] = Field(default="max", description="max: met when metric >= value; min: met "
                                        "when metric <= value")

    def met(self, observed: float) -> bool:
        return observed >= self.value if self.mode == "max" else observed <= self.value

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is better than ``b`` for this target's direction."""
        return a > b if self.mode == "max" else a < b


class BudgetConfig(_Strict):
    train_time_s: float = Field(gt=0, allow_inf_nan=False, description="Training-clock seconds after which a run "
                                "that has not met the target stops, censored (outcome=budget); finite")


class EvalConfig(_Strict):
    every_s: float = Field(gt=0, description="Evaluate the global model every this many seconds of training "
                           "clock (outside the clock); the resolution of tta_s")


def _strategy_fields() -> dict[str, Any]:
    """The shipped strategies' options, composed into one flat ``strategy:`` section (a strategy
    registered with its options as "module:Class" has a section of its own: ``_StrategyBase``)."""
    fields: dict[str, Any] = {}
    for options_model in flat_options().values():
        for key, info in options_model.model_fields.items():
            # a strategy may share another's option by reusing its field (pydantic copies it): same repr
            assert key not in fields or repr(fields[key][1]) == repr(info), \
                f"strategy option {key} defined twice, differently"
            fields[key] = (info.annotation, info)
    return fields


class _StrategyBase(_Strict):
    # keys beyond the fields: only the own sections (strategy.<name>: {...}) of the strategies
    # registered with their options as "module:Class", each validated by its model in
    # ``_own_sections``; any other key is refused there as unknown, as everywhere else
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field(default="sync", description="The strategy, by its name in the registry "
                      "(docs/strategies.md)")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        default="none", description="Scale the module's learning rate by (effective batch / one worker's) "
        "(linear, Goyal et al. 2017) or its square root (sqrt): sync's effective batch is the N - backup_workers kept workers' batches, "
        "local SGD's and async's one worker's")

    @field_validator("name")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in OPTIONS:
            guess = ALIASES.get(value.lower().replace("-", "_")) or closest(value, OPTIONS)
            hint = f" -- did you mean {guess}?" if guess else ""
            raise ValueError(f"unknown strategy {value!r}{hint} (the strategies: {', '.join(sorted(OPTIONS))}; "
                             f"docs/strategies.md)")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _own_sections(cls, data: Any, handler: Any) -> Any:
        """``strategy.<name>: {...}`` of a strategy with a section of its own: validated by its
        options model (imported now), and filled with its defaults when the config names that
        strategy without one; any other key that is not a field is an unknown key."""
        if not isinstance(data, dict):
            return handler(data)
        errors: list[dict[str, Any]] = []
        sections: dict[str, Any] = {}
        for key, value in data.items():
            if key in cls.model_fields:
                continue
            if key not in OPTIONS or not has_own_section(key):
                errors.append({"type": "extra_forbidden", "loc": (key,), "input": value})
                continue
            try:
                sections[key] = OPTIONS[key].model_validate({} if value is None else value)
            except ValidationError as exc:
                errors += [{"type": e["type"], "loc": (key, *e["loc"]), "input": e["input"], "ctx": e.get("ctx", {})}
                           for e in exc.errors()]
        name = data.get("name")
        if isinstance(name, str) and name in OPTIONS and has_own_section(name) and name not in data:
            sections[name] = OPTIONS[name]()
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)  # type: ignore[arg-type]
        return handler({**data, **sections})

    @model_validator(mode="after")
    def _no_unread_options(self) -> "_StrategyBase":
        """An option the named strategy does not read is refused, naming the strategies that read
        it: run as written it would change nothing, yet be recorded as if it had (async with
        ``compression: fp16`` ran exactly as without). A key at its default value is allowed --
        the shipped configs spell out every option with ``name: sync`` -- since it changes
        nothing under any strategy, and it is not recorded (``_only_used``)."""
        problems = []
        for key, value in self.unread_options().items():
            readers = strategies_reading(key) or [key]  # strategy.<name>: that strategy's own section
            shown = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            problems.append(f"strategy.{key}={json.dumps(shown, default=str)} is not read by strategy "
                            f"{self.name!r} (an option of {', '.join(readers)})")
        if problems:
            raise ValueError("; ".join(problems) + ": remove it, or set strategy.name to a strategy that reads it "
                             "(a sweep's grid may pair such keys with a strategy.name it varies)")
        return self

    def used_keys(self) -> set[str]:
        """The keys of this section that the named strategy reads (``name`` and ``lr_scaling`` always)."""
        common = set(_StrategyBase.model_fields)
        return common | ({self.name} if has_own_section(self.name) else set(OPTIONS[self.name].model_fields))

    def unread_options(self) -> dict[str, Any]:
        """The keys given with a value other than their default that the named strategy does not read."""
        used = self.used_keys()
        unread = {key: getattr(self, key) for key, info in type(self).model_fields.items()
                  if key not in used and getattr(self, key) != info.get_default(call_default_factory=True)}
        for key, section in (self.model_extra or {}).items():  # another strategy's own section
            if key not in used and section != OPTIONS[key]():
                unread[key] = section
        return unread

    @model_serializer(mode="wrap")
    def _only_used(self, handler: Any) -> Any:
        """A dump (MLflow params, config.yaml, a dist rank's copy) holds only what the strategy reads."""
        data = handler(self)
        used = self.used_keys()
        return {k: v for k, v in data.items() if k in used} if isinstance(data, dict) else data

    def options(self) -> Any:
        """The options model of the named strategy, filled from this section (or its own)."""
        if has_own_section(self.name):
            return getattr(self, self.name)
        model = OPTIONS[self.name]
        return model.model_validate({k: getattr(self, k) for k in model.model_fields})


StrategyConfig = create_model("StrategyConfig", __base__=_StrategyBase, **_strategy_fields())


def without_unread_options(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a run config mapping) less the ``strategy:`` keys its strategy does not read: a
    sweep whose grid varies ``strategy.name`` gives each cell only its own strategy's options."""
    section = raw.get("strategy")
    name = section.get("name", "sync") if isinstance(section, dict) else None
    if not isinstance(name, str) or name not in OPTIONS:
        return raw  # validation names the problem
    used = set(_StrategyBase.model_fields) | ({name} if has_own_section(name) else set(OPTIONS[name].model_fields))
    known = set(StrategyConfig.model_fields) | {n for n in OPTIONS if has_own_section(n)}
    return {**raw, "strategy": {k: v for k, v in section.items() if k in used or k not in known}}


class NoStragglers(_Strict):
    kind: Literal["none"] = Field(default="none", description="Every worker step takes exactly compute.step_s")


class LognormalStragglers(_Strict):
    """Per-step factor exp(sigma*z - sigma^2/2): mean 1, heavy right tail."""

    kind: Literal["lognormal"] = Field(description="Independent lognormal slowdown per worker step")
    sigma: float = Field(gt=0, description="Standard deviation of log(factor); 0.3 is mild, 1 is heavy")


class PersistentStragglers(_Strict):
    """A fixed, seeded subset of round(slow_fraction*N) workers is always `slowdown` times slower."""

    kind: Literal["persistent"] = Field(description="Some workers are always slow")
    slow_fraction: float = Field(gt=0, le=1, description="Fraction of the workers that are slow (rounded)")
    slowdown: float = Field(ge=1, description="How many times slower a slow worker's step is")


class BimodalStragglers(_Strict):
    """Each step is `slowdown` times slower with probability p (independently per worker)."""

    kind: Literal["bimodal"] = Field(description="Rare independent hiccups")
    p: float = Field(ge=0, le=1, description="Probability that a worker step is slow")
    slowdown: float = Field(ge=1, description="How many times slower a slow step is")


StragglerConfig = Annotated[
    Union[NoStragglers, LognormalStragglers, PersistentStragglers, BimodalStragglers],
    Field(discriminator="kind"),
]


class ComputeConfig(_Strict):
    step_s: float | None = Field(default=None, gt=0, description="sim: seconds per worker step before "
                                 "stragglers; null = calibrate on this machine, the model as it is trained "
                                 "(checkpointing applied); a sweep calibrates once per task, batch_size and "
                                 "checkpointing setting and pins it")
    codec_s_per_mb: float | None = Field(default=None, ge=0, description="sim: encode + decode seconds per MB "
                                         "(1e6 bytes) of one worker's payload at each compressed exchange "
                                         "(strategy.compression); null = measured on this machine at the first "
                                         "exchange (recorded as the summary metric codec_s_per_mb); a sweep "
                                         "measures it once per task and codec and pins it; pin it for "
                                         "bit-reproducible compressed runs")


class NetworkConfig(_Strict):
    latency_s: float = Field(default=5.0e-5, ge=0, description="Alpha: seconds per message")
    bandwidth_gbps: float = Field(default=10.0, gt=0, description="Beta: link bandwidth in Gbit/s")
    server_latency_s: float | None = Field(default=None, ge=0, description="Alpha of the parameter server's "
                                           "link (a push or a pull); null = latency_s. `syncbench calibrate` "
                                           "fits it to the dist backend's async rounds")
    server_bandwidth_gbps: float | None = Field(default=None, gt=0, description="Beta of the parameter "
                                                "server's link in Gbit/s; null = bandwidth_gbps")

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9 / 8

    @property
    def server_link(self) -> tuple[float, float]:
        """(alpha seconds, beta bytes/s) of a push or a pull on the parameter server's link."""
        alpha = self.latency_s if self.server_latency_s is None else self.server_latency_s
        gbps = self.bandwidth_gbps if self.server_bandwidth_gbps is None else self.server_bandwidth_gbps
        return alpha, gbps * 1e9 / 8


class SimOptions(_Strict):
    batching: Literal["auto", "off"] = Field(default="auto", description="auto: where a strategy keeps every "
                                             "replica identical (sync without compression) the sim holds one "
                                             "replica and one optimizer and computes each update's gradient in one "
                                             "forward/backward over the kept workers' concatenated batches "
                                             "(batched); where replicas differ (local SGD, DiLoCo, async, ...) or "
                                             "a module cannot be concatenated, each worker keeps its replica and "
                                             "the gradients of the workers computing together come from one "
                                             "torch.func.vmap call (stacked); each path is checked once per run "
                                             "against per-worker gradients for the module, and a module that fails "
                                             "both (BatchNorm in training mode) computes per worker, tagged "
                                             "syncbench.sim.batching; off: one replica, optimizer and "
                                             "forward/backward per worker")

    @field_validator("batching", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class ClusterConfig(_Strict):
    backend: Literal["sim", "dist"] = Field(default="sim", description="sim: N virtual workers on a virtual "
                                            "clock in one process; dist: N real processes (torch.distributed)")
    workers: int = Field(default=1, ge=1, description="N, the number of workers")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="Compute time model (sim)")
    stragglers: StragglerConfig = Field(default_factory=NoStragglers, description="Straggler model, chosen by "
                                        "kind (sim; emulated with sleeps on dist)")
    network: NetworkConfig = Field(default_factory=NetworkConfig, description="Alpha-beta network model (sim; "
                                   "emulated with sleeps on dist)")
    collective_timeout_s: float = Field(default=30.0, gt=0, description="dist: a worker that dies or hangs "
                                        "fails the run within this many seconds")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="auto | cpu | cuda | "
                        "cuda:K. sim: where the replicas, batches and collectives live (auto: cuda:0 when CUDA is "
                        "available, else cpu); dist: cpu = gloo on the CPU, cuda = NCCL with local rank r on "
                        "cuda:r (refused when a node has fewer GPUs than ranks), auto = cuda when there are GPUs; "
                        "cuda:K is for the sim backend. The environment variable SYNCBENCH_DIST_DEVICE, when set, "
                        "overrides it on dist")
    sim: SimOptions = Field(default_factory=lambda: SimOptions(), description="How the sim backend computes "
                            "(docs/performance.md)")

    @model_validator(mode="after")
    def _device_for_backend(self) -> "ClusterConfig":
        if self.backend == "dist" and self.device.startswith("cuda:"):
            raise ValueError(f"cluster.device={self.device}: the dist backend gives local rank r cuda:r; "
                             "use cluster.device=cuda (or auto), or cluster.backend=sim")
        return self


class TrainerConfig(_Strict):
    """What Lightning's Trainer would take for the user's module, applied identically on both backends."""

    gradient_clip_val: float | None = Field(default=None, ge=0, description="Clip gradients at this value before "
                                            "every optimizer step, as Trainer(gradient_clip_val=...) does (through "
                                            "the module's configure_gradient_clipping); applied to the gradient the "
                                            "step uses: sync's averaged one, each local SGD replica's, the async "
                                            "server's pushed one; null or 0 = no clipping")
    gradient_clip_algorithm: Literal["norm", "value"] = Field(default="norm", description="norm: scale the "
                                                              "gradients so that their total 2-norm is at most "
                                                              "gradient_clip_val; value: clamp each element to "
                                                              "[-gradient_clip_val, gradient_clip_val]")


class RunConfig(_Strict):
    name: str = Field(description="The run's name; also the MLflow experiment of a single run")
    task: TaskConfig = Field(description="What to train: your LightningModule and LightningDataModule")
    target: TargetConfig = Field(description="The accuracy target that stops the TTA clock")
    budget: BudgetConfig = Field(description="Censoring: when a run that has not reached the target stops")
    eval: EvalConfig = Field(description="Evaluation of the global model")
    batch_size: int = Field(ge=1, description="Per-worker batch size")
    seed: int = Field(default=0, description="Seeds the model, data order and stragglers")
    strategy: StrategyConfig = Field(default_factory=StrategyConfig, description="How the workers' updates are "
                                     "combined (docs/strategies.md)")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Workers, backend and the "
                                   "hardware model")
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig, description="Activation "
                                               "checkpointing of every k-th block")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Trainer options for the user's "
                                   "module (gradient clipping), the same on both backends")

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        reason = self.strategy.options().unsupported(self.cluster.backend, self.cluster.workers)
        if reason:
            raise ValueError(reason)
        if self.eval.every_s > self.budget.train_time_s:
            raise ValueError(
                f"eval.every_s ({self.eval.every_s}) is longer than budget.train_time_s "
                f"({self.budget.train_time_s}): no evaluation would happen"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """The whole config as dotted keys (what MLflow records as params)."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b.c=VALUE`` with VALUE parsed as YAML (so ``8`` is an int, ``null`` is None)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. cluster.workers=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from None
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``key='a.b.c'``, creating mappings on the way."""
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a {type(child).__name__}, cannot set {key}")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    tree = copy.deepcopy(raw)
    if not overrides:
        return tree
    pairs = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in pairs:
        set_dotted(tree, key, value)
    return tree


def closest(word: str, choices: Any) -> str | None:
    """The choice closest to ``word`` (case and ``-``/``_`` aside), for a did-you-mean, or None."""
    import difflib

    norm = {str(c).lower().replace("-", "_"): str(c) for c in choices}
    close = difflib.get_close_matches(str(word).lower().replace("-", "_"), list(norm), n=1, cutoff=0.6)
    return norm[close[0]] if close else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation holds (through ``X | None``, unions, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def keys_at(loc: tuple[Any, ...], root: type[BaseModel] | None = None) -> list[str]:
    """The keys ``root`` (the run config) accepts in the mapping at ``loc``, an error's
    location (union tags and the keys of free mappings such as ``tune.params`` included)."""
    models: list[type[BaseModel]] = [root or RunConfig]
    for part in loc:
        if _is_union_tag(part):  # a discriminated union's variant: keep the one of that kind
            models = [m for m in models if "kind" in m.model_fields
                      and part in get_args(m.model_fields["kind"].annotation)] or models
        elif any(part in m.model_fields for m in models):
            models = [inner for m in models if part in m.model_fields
                      for inner in _models_in(m.model_fields[part].annotation)]
        elif any(issubclass(m, _StrategyBase) for m in models) and part in OPTIONS and has_own_section(part):
            models = [OPTIONS[part]]  # strategy.<name>: the own section of that strategy
        # else: a key of a mapping (dict[str, Model]): its values are the models already held
    return sorted({k for m in models for k in m.model_fields})


def _all_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the run config (every variant of a union)."""
    keys = []
    for name, info in (model or RunConfig).model_fields.items():
        keys.append(prefix + name)
        for inner in _models_in(info.annotation):
            keys += _all_keys(inner, f"{prefix}{name}.")
    return list(dict.fromkeys(keys))


def _unknown_key_hint(loc: tuple[Any, ...]) -> str:
    """Did-you-mean for an unknown key: a close key of the same mapping, else a key of that
    name (or close to it) elsewhere in the config (``workers`` -> ``cluster.workers``)."""
    if not loc or not isinstance(loc[-1], str):
        return ""
    key, parent = loc[-1], loc[:-1]
    sibling = closest(key, keys_at(parent))
    if sibling:
        prefix = "".join(f"{p}." for p in parent if not _is_union_tag(p))
        return f"; did you mean {prefix}{sibling}?"
    by_leaf: dict[str, list[str]] = {}
    for k in _all_keys():
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    leaf = key if key in by_leaf else closest(key, by_leaf)
    guesses = by_leaf[leaf] if leaf else []
    # lr, hidden, ...: most likely the module's own argument (not strategy.outer.lr), unless a
    # section holds that key directly (workers: cluster.workers)
    if parent in ((), ("task",)) and not any(k.count(".") == 1 for k in by_leaf.get(key, [])):
        guesses = [f"task.module_args.{key} (an argument of your module)", *guesses]
    return f"; did you mean {' or '.join(guesses)}?" if guesses else ""


def _format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each naming its dotted key path, in our words (pydantic's own
    wording -- "Extra inputs are not permitted", links to its docs -- stays out)."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _unknown_key_hint(err["loc"])
        elif err["type"] == "missing":
            msg = "required key is missing"
        # a cross-key check fails at the root, where the "input" is the whole config; a value
        # error's message already names the value
        quiet = err["type"] in ("extra_forbidden", "missing", "value_error") or not loc
        got = "" if quiet else f" (got {err.get('input')!r})"
        lines.append(f"  {loc}: {msg}{got}" if loc else f"  {msg}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the discriminator value ('lognormal', ...) into the location of union errors
    return isinstance(part, str) and part in ("none", "lognormal", "persistent", "bimodal")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def validate_config(raw: dict[str, Any], source: str = "") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config (shape and types only; see ``check_task``)."""
    return validate_config(apply_overrides(read_yaml(path), overrides), str(path))


def import_object(path: str, key: str) -> Any:
    """Import ``package.module:Attr``; errors name the config ``key``."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's path
        missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        if not missing or not (module_name == missing or module_name.startswith(missing + ".")):
            raise ConfigError(f"{key}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
        # the user's own module (or a package above it) was not found: say where it was looked for
        import os
        import sys

        parent, _, leaf = missing.rpartition(".")
        found = sys.modules.get(parent) if parent else None
        where = list(getattr(found, "__path__", None) or []) if found is not None else []
        installed = tuple(os.path.abspath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
        tried = [os.path.abspath(p or ".") for p in (where or sys.path)]
        user = list(dict.fromkeys(p for p in tried if not p.startswith(installed)))
        rest = len(tried) - len(user)
        searched = ", ".join(user) or "none outside the Python installation"
        if where:
            what = f"package {parent!r} (from {searched}) has no module {leaf!r}"
        else:
            what = (f"no module {missing!r} in the sys.path entries tried: {searched}"
                    + (f" (and {rest} of the Python installation)" if rest else ""))
        raise ConfigError(f"{key}: cannot import module {module_name!r}: {what}. Give it as 'package.module:Class' "
                          "importable from the config's directory or the current directory, or add its "
                          "directory to PYTHONPATH") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}") from None
