"""The ``slurm:`` section of a sweep spec and ``--slurm KEY=VALUE`` (docs/scaling-out.md): where
``syncbench sweep SPEC --executor slurm`` sends its launcher jobs and its dist trials.

Light (pydantic and the standard library only): the command line validates these before it
imports anything heavy, and a bad key exits 2 naming ``slurm.<key>`` before any job or store
exists.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from syncbench.experiments.config import ConfigError, closest

# sbatch options syncbench sets itself from the fields below or from the job's shape; giving
# them under `sbatch:` would silently contradict those
RESERVED_SBATCH = {"partition", "p", "time", "t", "nodes", "N", "ntasks", "n", "ntasks-per-node",
                   "ntasks_per_node", "cpus-per-task", "cpus_per_task", "c", "gpus-per-task", "gpus_per_task",
                   "mem", "output", "o", "error", "e", "job-name", "job_name", "J", "signal", "open-mode", "wrap"}
SBATCH_KEY = r"^[A-Za-z][A-Za-z0-9_-]*$"


class SlurmSpec(BaseModel):
    """Where ``--executor slurm`` runs a sweep. Launcher jobs are one task each (one trial at a
    time; ``--jobs K`` submits K of them); a ``cluster.backend: dist`` trial is a job of its own
    with one task per rank (``cluster.workers`` tasks over ``nodes`` nodes)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(default=None, description="SLURM partition (default: the cluster's default)")
    time_min: int = Field(default=60, ge=1, description="Time limit of each job, in minutes (sbatch --time); "
                          "a launcher job stopped by it has its trial retried by the next job")
    cpus_per_task: int = Field(default=1, ge=1, description="CPUs of each task: a launcher job, or one rank of "
                               "a dist trial")
    gpus_per_task: int = Field(default=0, ge=0, description="GPUs of each task (0: none requested)")
    mem_gb: float | None = Field(default=None, gt=0, description="Memory per node of each job, in GB (default: "
                                 "the partition's)")
    nodes: int = Field(default=1, ge=1, description="Nodes of a dist trial's job: its cluster.workers ranks are "
                       "spread evenly over them (must divide cluster.workers)")
    max_resubmits: int = Field(default=3, ge=0, description="Launcher jobs that ended (cancelled, failed, out of "
                               "time) while trials were left are replaced by new ones, this many times in all")
    setup: list[str] = Field(default_factory=list, description="Shell lines each job runs first, e.g. `module "
                             "load cuda` or `source /shared/venv/bin/activate`")
    sbatch: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Further sbatch options by long name without dashes, e.g. {account: lab, "
        "qos: high, constraint: a100}; true for a flag without value")
    folder: str | None = Field(default=None, description="Where the jobs' scripts, logs and results go; on a "
                               "filesystem every node shares (default: <workspace>/slurm)")

    @field_validator("sbatch")
    @classmethod
    def _sbatch_keys(cls, options: dict[str, Any]) -> dict[str, Any]:
        for key in options:
            if not re.match(SBATCH_KEY, key):
                raise ValueError(f"{key!r}: an sbatch option's long name, without the dashes (e.g. account)")
            if key in RESERVED_SBATCH:
                raise ValueError(f"{key}: set by syncbench (use the slurm section's own keys: partition, time_min, "
                                 f"cpus_per_task, gpus_per_task, mem_gb, nodes)")
        return options

    def sbatch_options(self) -> dict[str, Any]:
        """The ``sbatch:`` options as submitit's ``additional_parameters`` (its names use ``_``)."""
        return {key.replace("-", "_"): value for key, value in self.sbatch.items()}


def slurm_settings(section: dict[str, Any] | None, overrides: list[str], where: str) -> SlurmSpec:
    """The spec's ``slurm:`` section with ``--slurm KEY=VALUE`` items applied (``sbatch.account=lab``
    sets one sbatch option), validated; ``ConfigError`` names the key (``where``: the spec file)."""
    merged: dict[str, Any] = json.loads(json.dumps(section or {}))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--slurm {item!r}: expected KEY=VALUE, e.g. partition=gpu or sbatch.account=lab")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--slurm {key}: value {raw!r} is not valid YAML ({exc})") from None
        head, _, rest = key.partition(".")
        if rest and head != "sbatch":
            raise ConfigError(f"--slurm {item}: {head} has no sub-keys (only sbatch.OPTION does)")
        if rest:
            merged.setdefault("sbatch", {})[rest] = value
        else:
            merged[head] = value
    try:
        return SlurmSpec.model_validate(merged)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in ("slurm", *err["loc"]))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                guess = closest(str(err["loc"][-1]), list(SlurmSpec.model_fields))
                msg = "unknown key" + (f"; did you mean slurm.{guess}?" if guess and len(err["loc"]) == 1 else "")
            elif err["type"] != "value_error":
                msg += f" (got {err.get('input')!r})"
            lines.append(f"  {loc}: {msg}")
        raise ConfigError(f"invalid slurm settings ({where} and --slurm):\n" + "\n".join(lines)) from None


def check_dist_cells(settings: SlurmSpec, cells: list[Any], where: str) -> None:
    """A dist trial's ranks are spread evenly over ``slurm.nodes`` nodes: every dist cell's
    ``cluster.workers`` must be a multiple of it (checked before anything is submitted)."""
    for cell in cells:
        cluster = cell.config.cluster
        if cluster.backend == "dist" and cluster.workers % settings.nodes:
            raise ConfigError(f"{where}: slurm.nodes is {settings.nodes}, which does not divide cluster.workers = "
                              f"{cluster.workers} of grid cell {cell.id!r} (a dist trial runs the same number of "
                              f"ranks on each of its nodes)")
