"""Sweep specs (docs/config.md, "Sweep spec"): load, validate and expand into grid cells.

A spec is checked completely before anything is created: every grid cell's run config
is validated, every tuned parameter is validated with sample values on every cell it
applies to, and every ``when`` condition must name a config key and match at least one
cell. Any problem raises :class:`~syncbench.experiments.config.ConfigError` naming the key.

```yaml
name: workers-scaling                    # the MLflow experiment and the Optuna study
base: mnist1d_cnn                        # a path, or a shipped config's name (`syncbench examples`)
set: {budget.train_time_s: 30}           # optional overrides of the base, for every cell
grid:                                    # every combination is a cell
  strategy.name: [sync, local_sgd, async]
  cluster.workers: [1, 2, 4, 8]
seeds: [0, 1, 2]                         # each cell is run once per seed
analysis: {memory_limit_bytes: 8000000}   # optional: claim (d) with the memory saved spent on a larger batch
slurm: {partition: cpu, time_min: 120}    # optional: for --executor slurm (docs/scaling-out.md)
tune:                                    # optional: tune each cell, then run seeds with the best
  n_trials: 8
  seed: 0                                # TPE sampler seed (mixed with the cell id)
  pruner: race                           # race (default) | median | hyperband | none
  race_margin: 1.0                       # race: stop a trial once its clock passes best TTA x this
  params:
    task.module_args.lr: {low: 1.0e-3, high: 0.3, log: true}
    strategy.local_steps: {choices: [2, 4, 8, 16], when: {strategy.name: local_sgd}}
```
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import syncbench.experiments
from syncbench.experiments.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    closest,
    flatten,
    keys_at,
    parse_override,
    read_yaml,
    validate_config,
    without_unread_options,
)
from syncbench.sweeps.slurm_spec import SlurmSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
# The shipped examples, found inside the installed package (a wheel's as a clone's):
# `syncbench run NAME`, `syncbench sweep NAME`, `syncbench examples`.
CONFIGS_DIR = Path(syncbench.experiments.__file__).resolve().parent / "configs"
SPECS_DIR = Path(__file__).resolve().parent / "specs"
EXAMPLES = {"config": (CONFIGS_DIR, "run config", "syncbench run"), "spec": (SPECS_DIR, "sweep spec", "syncbench sweep")}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
Scalar = bool | int | float | str | None  # what Optuna can store as a categorical choice


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Strict):
    """One tuned parameter: a range ``{low, high, log, step}`` or ``{choices}``, optionally
    restricted to the cells whose config matches ``when`` (a list value means "any of").

    Both bounds written as integers make an integer parameter (write ``0.0`` for a float).
    """

    low: int | float | None = Field(default=None, description="Lower bound of a range (both bounds integers = "
                                    "an integer parameter)")
    high: int | float | None = Field(default=None, description="Upper bound of a range")
    log: bool = Field(default=False, description="Sample the range on a log scale")
    step: int | float | None = Field(default=None, description="Discretisation step of the range")
    choices: list[Scalar] | None = Field(default=None, description="A categorical parameter: one of these values")
    when: dict[str, Any] = Field(default_factory=dict, description="Tune it only in the cells whose config has "
                                 "these dotted key values (a list = any of)")

    @model_validator(mode="after")
    def _range_or_choices(self) -> "ParamSpec":
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged or self.log or self.step is not None:
                raise ValueError("give either {low, high, log, step} or {choices}, not both")
            if not self.choices:
                raise ValueError("choices: must not be empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give {low, high} (optionally log, step) or {choices}")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be smaller than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("step and log: true cannot be combined")
        return self

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in (self.low, self.high))

    def samples(self) -> list[Any]:
        """Values to validate the config with: both bounds, or every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def applies_to(self, flat_config: dict[str, Any]) -> bool:
        return all(_matches(flat_config, key, want) for key, want in self.when.items())


PRUNERS = ("race", "median", "hyperband", "none")
TUNE_DEFAULTS = {"pruner": "race", "race_margin": 1.0}  # keys added after the first sweeps were stored


class TuneSpec(_Strict):
    """Tuning per cell. Every evaluation of a tuning trial is reported to Optuna as an
    intermediate value (the target metric, step = evaluation index). ``pruner``: ``race``
    stops a trial as soon as its next evaluation would come later than the best TTA of its
    cell so far x ``race_margin`` (it can no longer win); ``median`` / ``hyperband`` are
    Optuna's pruners on the intermediate values; ``none`` prunes nothing. Pruned trials are
    Optuna PRUNED, MLflow ``outcome=pruned``, and count towards ``n_trials``."""

    n_trials: int = Field(ge=1, description="Tuning trials per cell")
    seed: int = Field(default=0, description="TPE sampler seed (mixed with the cell id)")
    pruner: Literal["race", "median", "hyperband", "none"] = Field(
        default="race", description="race: stop a trial once its clock passes its cell's best TTA x race_margin "
        "(it can no longer win); median / hyperband: Optuna's pruners on the target metric; none")
    race_margin: float = Field(default=1.0, ge=1.0, description="race pruner: the margin over the cell's best TTA")
    params: dict[str, ParamSpec] = Field(min_length=1, description="Tuned parameters by dotted config key")


class AnalysisSpec(_Strict):
    """Settings the report reads (they change no run, so a resumed sweep may change them)."""

    memory_limit_bytes: int | None = Field(
        default=None, gt=0, description="Claim (d), spending the memory saved: the memory one worker may use. Of "
        "the cells that differ only in batch_size and checkpointing.enabled, the report takes for each "
        "checkpointing setting the largest batch_size whose runs' recorded memory (peak_mem_bytes, else "
        "activation_bytes) fits under it, and compares their TTA: whether checkpointing pays for itself. "
        "null = no such comparison")


class SweepSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=100, description="The sweep: its MLflow experiment and "
                      "Optuna study")
    description: str = Field(default="", description="Free text about the sweep")
    base: str = Field(description="The base run config: a path as written, else relative to the spec, else "
                      "the name of a shipped config (`syncbench examples`, e.g. digits_mlp)")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted-key overrides of the base, for every cell")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted key -> values; every "
                                       "combination is a cell")
    seeds: list[int] = Field(min_length=1, description="Each cell runs once per seed")
    tune: TuneSpec | None = Field(default=None, description="Tune each cell first (TPE), then run its seeds "
                                  "with the best values")
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec, description="Settings of the report's analysis")
    slurm: SlurmSpec | None = Field(default=None, description="Where the sweep's jobs run with `--executor slurm` "
                                    "(docs/scaling-out.md); `--slurm KEY=VALUE` overrides a key; ignored by "
                                    "--executor local")

    @field_validator("grid")
    @classmethod
    def _non_empty_distinct(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"{key}: needs at least one value")
            shown = [format_value(v) for v in values]
            if len(set(shown)) != len(shown):
                raise ValueError(f"{key}: repeated values {shown}")
        return grid

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"repeated seeds {seeds}")
        return seeds


@dataclass(frozen=True)
class Cell:
    """One combination of grid values, with its validated run config (seed not yet set)."""

    id: str  # canonical: "key=value" in grid order, joined by ","
    assignment: dict[str, Any]
    raw: dict[str, Any]  # base + set + --set + assignment, before validation
    config: RunConfig

    @property
    def label(self) -> str:
        """Short form for displays: the last part of each key, e.g. 'name=sync workers=4'."""
        return " ".join(f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in self.assignment.items()) or self.id


@dataclass
class Sweep:
    """A validated spec, expanded: what the launcher needs and nothing it must re-check."""

    spec: SweepSpec
    spec_path: Path
    base_path: Path
    base_raw: dict[str, Any]  # after the spec's `set` and the command line's --set
    overrides: dict[str, Any]  # spec `set` then --set, as applied
    cells: list[Cell]
    tune_params: dict[str, dict[str, ParamSpec]] = field(default_factory=dict)  # cell id -> active params

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def seeds(self) -> list[int]:
        return self.spec.seeds

    @property
    def tune(self) -> TuneSpec | None:
        return self.spec.tune

    def fingerprint(self) -> dict[str, Any]:
        """What must not change when a sweep is resumed: the base config (minus the keys the
        grid and the seeds set) and the tuning. Adding grid values or seeds is allowed."""
        owned = [*self.spec.grid, "seed"]
        base = {k: v for k, v in flatten(self.base_raw).items() if not any(_under(k, o) for o in owned)}
        tune = None
        if self.tune:  # keys at their defaults are left out, so sweeps stored before they existed resume
            tune = {k: v for k, v in self.tune.model_dump(mode="json").items()
                    if not (k in TUNE_DEFAULTS and v == TUNE_DEFAULTS[k])}
        return {"base": base, "tune": tune}

    def total_trials(self) -> int:
        per_cell = len(self.seeds) + (self.tune.n_trials if self.tune else 0)
        return per_cell * len(self.cells)


def format_value(value: Any) -> str:
    """A grid value as it appears in a cell id: strings bare, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def cell_id(assignment: dict[str, Any]) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in assignment.items()) or "base"


def task_key(config: RunConfig) -> str:
    """What a calibrated step time depends on: the model, its data, the per-worker batch and
    activation checkpointing (not the seed, the strategy or the cluster)."""
    ident = {"task": config.task.model_dump(mode="json"), "batch_size": config.batch_size,
             "checkpointing": config.checkpointing.model_dump(mode="json")}
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def shipped(kind: str) -> dict[str, Path]:
    """The shipped examples of a kind ("config" or "spec") by name: the file's stem."""
    return {p.stem: p for p in sorted(EXAMPLES[kind][0].glob("*.yaml"))}


def example_name(arg: str | Path) -> str | None:
    """The name a CONFIG or SPEC argument gives a shipped example (``digits_mlp`` or
    ``digits_mlp.yaml``), or None when it is a path (has a directory part)."""
    text = str(arg)
    if not text or "/" in text or "\\" in text:
        return None
    return text[:-len(".yaml")] if text.endswith(".yaml") else text


def resolve_example(arg: str | Path, kind: str) -> Path:
    """A CONFIG (kind "config") or SPEC ("spec") argument: an existing file as given, else a
    shipped example of that name, with or without ``.yaml``. Anything else is bad input: the
    message lists the shipped names, with a did-you-mean."""
    path = Path(arg)
    if path.is_file():
        return path
    _, what, command = EXAMPLES[kind]
    names = shipped(kind)
    name = example_name(arg)
    if name in names:
        return names[name]
    if name is None:  # a path that is not there
        stem = path.name.removesuffix(".yaml")
        hint = f"; the shipped {what} {stem!r} is named without a path: {command} {stem}" if stem in names else ""
        raise ConfigError(f"{arg}: no such file{hint}")
    for other, (_, other_what, other_command) in EXAMPLES.items():
        if other != kind and name in shipped(other):
            raise ConfigError(f"{arg}: a shipped {other_what}, not a {what}: {other_command} {name}")
    guess = closest(name, names)
    hint = f" (did you mean {guess}?)" if guess else ""
    raise ConfigError(f"{arg}: no such file, and no shipped {what} of that name{hint}. Shipped {what}s: "
                      f"{', '.join(names)} (`syncbench examples` describes them)")


def describe_example(path: Path) -> str:
    """One line about a shipped example: its ``description:``, else the first sentence of its
    leading comment (less a leading ``NAME:``), else its ``name:``."""
    text = path.read_text()
    raw = yaml.safe_load(text) or {}
    if isinstance(raw, dict) and raw.get("description"):
        return " ".join(str(raw["description"]).split())
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if not body:
            if comment:
                break
            continue
        comment.append(body)
    if comment:
        first = re.split(r"(?<!\bal\.)(?<!e\.g\.)(?<!i\.e\.)(?<=[.?!])\s+", " ".join(comment), maxsplit=1)[0]
        return first.removeprefix(f"{path.stem}:").strip()
    return str(raw.get("name", "")) if isinstance(raw, dict) else ""


def load_sweep(path: str | Path, cli_overrides: list[str] | None = None,
               profile_overrides: list[str] | None = None) -> Sweep:
    """Read and fully validate a spec (a path, or a shipped spec's name); raises ConfigError
    naming the offending key. ``cli_overrides`` (``--set``) may not touch a key the grid or
    the tuned parameters set (the grid would silently win); ``profile_overrides``
    (``--profile``) come first and may."""
    path = resolve_example(path, "spec")
    raw = read_yaml(path)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_spec_error(exc, path)) from None
    _check_key_overlaps(spec, path)
    base_path = _resolve_base(spec.base, path)
    overrides = dict(spec.set)
    for item in profile_overrides or []:
        key, value = parse_override(item)
        overrides[key] = value
    owners = [("grid", k) for k in spec.grid] + [("tune.params", k) for k in (spec.tune.params if spec.tune else {})]
    for item in cli_overrides or []:
        key, value = parse_override(item)
        for section, owned in owners:
            if _under(key, owned) or _under(owned, key):
                raise ConfigError(f"--set {item}: {key} is also set by the sweep spec's {section}.{owned} "
                                  f"({path}), which would silently override it in every cell: change the spec "
                                  f"(or drop the --set)")
        overrides[key] = value
    if "seed" in overrides:
        raise ConfigError(f"sweep spec {path}: set.seed: the seeds come from `seeds:`, not from an override")
    base_raw = apply_overrides(read_yaml(base_path), overrides)
    cells = _expand_cells(spec, base_raw, path)
    sweep = Sweep(spec, path, base_path, base_raw, overrides, cells)
    if spec.tune:
        sweep.tune_params = _check_tune(spec.tune, cells, path)
    return sweep


def base_config_dir(spec_path: str | Path) -> Path | None:
    """The folder of a spec's base config (its ``task.module`` may sit there, as the docs say),
    or None when the spec or its base does not resolve (``load_sweep`` then says why)."""
    try:
        raw = read_yaml(spec_path)
        return _resolve_base(str(raw["base"]), Path(spec_path)).resolve().parent
    except (ConfigError, KeyError, TypeError, OSError):
        return None


def _resolve_base(base: str, spec_path: Path) -> Path:
    """`base` as written (relative to the current directory), else next to the spec, else the
    name of a shipped config (``digits_mlp``); a path inside the installed package
    (``experiments/configs/digits_mlp.yaml``, as specs once named the shipped configs) also works."""
    candidates = [Path(base), spec_path.parent / base]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    configs = shipped("config")
    name = example_name(base)
    if name in configs:
        return configs[name]
    if (REPO_ROOT / base).is_file():
        return REPO_ROOT / base
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    guess = closest(name or Path(base).name.removesuffix(".yaml"), configs)
    hint = f" (did you mean {guess}?)" if guess else ""
    raise ConfigError(f"sweep spec {spec_path}: base: no such file {base!r} (tried {tried}), and no shipped config "
                      f"of that name{hint}. Shipped configs: {', '.join(configs)}")


def _check_key_overlaps(spec: SweepSpec, path: Path) -> None:
    """Grid and tune keys must be distinct and not nest (the order of overrides would matter)."""
    if "seed" in spec.grid:
        raise ConfigError(f"sweep spec {path}: grid.seed: put seeds under `seeds:`, not in the grid")
    owners = [("grid", k) for k in spec.grid] + [("tune.params", k) for k in (spec.tune.params if spec.tune else {})]
    if spec.tune and "seed" in spec.tune.params:
        raise ConfigError(f"sweep spec {path}: tune.params.seed: seeds are not tuned; list them under `seeds:`")
    for (sa, a), (sb, b) in itertools.combinations(owners, 2):
        if a == b or _under(a, b) or _under(b, a):
            raise ConfigError(f"sweep spec {path}: {sa}.{a} and {sb}.{b} set the same config key")


def _varies_strategy(spec: SweepSpec) -> bool:
    """Whether the grid varies the strategy: then each cell keeps only its strategy's options
    (elsewhere an option the strategy does not read is refused, naming the key)."""
    return any(_under("strategy.name", k) for k in spec.grid)


def _reads(config: RunConfig, key: str) -> bool:
    """Whether ``config``'s strategy reads the dotted ``key`` (any key outside ``strategy:`` is read)."""
    parts = key.split(".")
    return parts[0] != "strategy" or len(parts) < 2 or parts[1] in config.strategy.used_keys()


def _expand_cells(spec: SweepSpec, base_raw: dict[str, Any], path: Path) -> list[Cell]:
    keys = list(spec.grid)
    cells = []
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        assignment = dict(zip(keys, values))
        cid = cell_id(assignment)
        raw = apply_overrides(base_raw, assignment)
        if _varies_strategy(spec):
            raw = without_unread_options(raw)
        try:
            config = validate_config(raw, f"{spec.base} in grid cell {cid}")
        except ConfigError as exc:
            raise ConfigError(f"sweep spec {path}: {exc}") from None
        cells.append(Cell(cid, assignment, raw, config))
    return cells


def _check_tune(tune: TuneSpec, cells: list[Cell], path: Path) -> dict[str, dict[str, ParamSpec]]:
    """Each param's `when` keys exist and match some cell; each sample value validates."""
    flats = {cell.id: cell.config.flat() for cell in cells}
    active: dict[str, dict[str, ParamSpec]] = {cell.id: {} for cell in cells}
    varies = any(_under("strategy.name", k) for k in cells[0].assignment)
    for key, param in tune.params.items():
        where = f"sweep spec {path}: tune.params.{key}"
        for cond_key in param.when:
            if not any(_under(k, cond_key) for flat in flats.values() for k in flat):
                raise ConfigError(f"{where}.when: {cond_key!r} is not a config key")
        matching = [cell for cell in cells if param.applies_to(flats[cell.id])]
        if varies:  # a strategy option is tuned only in the cells whose strategy reads it
            matching = [cell for cell in matching if _reads(cell.config, key)] or matching
        if not matching:
            raise ConfigError(f"{where}.when: {param.when} matches no grid cell")
        for cell in matching:
            active[cell.id][key] = param
            for value in param.samples():
                try:
                    validate_config(apply_overrides(cell.raw, {key: value}), f"with {key}={value!r}")
                except ConfigError as exc:
                    raise ConfigError(f"{where}: value {value!r} makes cell {cell.id} invalid: {exc}") from None
    return active


def _matches(flat: dict[str, Any], key: str, want: Any) -> bool:
    """``when`` semantics: equality with the config value (or a nested mapping); a list
    means any of its values."""
    if key in flat:
        have = flat[key]
    else:
        nested = {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(key + ".")}
        have = nested or None
        if isinstance(want, dict):
            want = flatten(want)
    options = want if isinstance(want, list) else [want]
    return any(have == option for option in options)


def _under(key: str, prefix: str) -> bool:
    """Whether dotted ``key`` is ``prefix`` or lies below it."""
    return key == prefix or key.startswith(prefix + ".")


def _format_spec_error(exc: ValidationError, path: Path) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = {"extra_forbidden": "unknown key", "missing": "required key is missing"}.get(err["type"], err["msg"])
        msg = msg.removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and err["loc"]:
            guess = closest(str(err["loc"][-1]), keys_at(err["loc"][:-1], SweepSpec))
            msg += f"; did you mean {'.'.join(map(str, (*err['loc'][:-1], guess)))}?" if guess else ""
        shown = repr(err.get("input"))
        quiet = err["type"] in ("extra_forbidden", "missing", "value_error") or len(shown) > 80
        got = "" if quiet else f" (got {shown})"
        lines.append(f"  {loc}: {msg}{got}")
    return f"invalid sweep spec {path}:\n" + "\n".join(lines)
