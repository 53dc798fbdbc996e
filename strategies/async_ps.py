"""Asynchronous SGD on a parameter server (Dean et al. 2012, "Downpour SGD"), with bounded
delay (Li et al. 2014) and staleness-dependent learning rates (Zhang et al. 2016,
lr / (1 + staleness)).

Each worker computes a gradient on the parameters it last pulled (version v) and pushes it;
the server applies it on arrival and the worker pulls the new parameters. Staleness = the
server's version at apply - v. With ``max_staleness: s`` no gradient staler than s is
applied: the server refuses it and the worker recomputes on the fresh parameters it pulls,
so the recorded staleness never exceeds s.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from syncbench.strategies.lightning_bridge import scaled_lr
from syncbench.strategies.program import (
    Compute,
    Options,
    ParameterServer,
    Program,
    PushPull,
    Strategy,
    WorkerProgram,
    load_gradient_payload_,
)
from syncbench.strategies.tensors import flat_state, load_flat_state_


class AsyncOptions(Options):
    max_staleness: int | None = Field(default=None, ge=0, description="async: bound on a gradient's staleness "
                                      "(server version at apply − version it was computed on): a staler push is "
                                      "refused and the worker recomputes on fresh parameters (bounded delay, Li et "
                                      "al. 2014); null = unbounded")
    staleness_lr: Literal["none", "inverse"] = Field(default="none", description="async: none, or inverse = "
                                                     "scale each gradient's lr by 1 / (1 + staleness)")


def staleness_lr_scale(staleness: int, mode: str) -> float:
    """The factor applied to the learning rate of a gradient with this staleness."""
    return 1.0 / (1.0 + staleness) if mode == "inverse" else 1.0


def within_bound(staleness: int, max_staleness: int | None) -> bool:
    return max_staleness is None or staleness <= max_staleness


@torch.no_grad()
def apply_gradient_(optimizer: Any, lr_scale: float) -> None:
    """One optimizer step with every group's lr scaled by ``lr_scale`` (then restored). The
    server's optimizer is the module's, with its schedulers (``ModuleOptimizer``): they step
    after the restore, once per server update."""
    if hasattr(optimizer, "schedulers"):  # syncbench.strategies.lightning_bridge.ModuleOptimizer
        optimizer.step(lr_scale=lr_scale)
        return
    with scaled_lr(optimizer, lr_scale):
        optimizer.step()


def staleness_summary(counts: Counter) -> dict[str, float]:
    if not counts:
        return {}
    values = np.repeat(np.array(list(counts.keys())), list(counts.values()))
    return {
        "staleness_mean": float(values.mean()),
        "staleness_max": float(values.max()),
        "staleness_p50": float(np.percentile(values, 50)),
        "staleness_p90": float(np.percentile(values, 90)),
    }


def staleness_curve(counts: Counter) -> dict[str, float]:
    """The staleness so far, as a curve point: mean and max (0 before any push)."""
    total = sum(counts.values())
    return {"staleness_mean": float(sum(s * c for s, c in counts.items()) / total) if total else 0.0,
            "staleness_max": float(max(counts)) if counts else 0.0}


def staleness_artifact(counts: Counter) -> dict[str, str]:
    """``staleness.json``: the histogram, staleness -> applied pushes."""
    return {"staleness.json": json.dumps({int(k): int(v) for k, v in sorted(counts.items())})}


class AsyncServer(ParameterServer):
    """theta, the module's own optimizer, the version and the staleness histogram."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, options: AsyncOptions,
                 world: int):
        super().__init__(module, optimizer, options, world)
        self.staleness: Counter = Counter()
        self.refused = 0

    def apply(self, rank: int, payload: torch.Tensor, pulled_version: int) -> bool:
        staleness = self.version - pulled_version
        if not within_bound(staleness, self.options.max_staleness):
            self.refused += 1
            return False
        load_gradient_payload_(self.module, payload)  # the pushing worker's buffers come along
        apply_gradient_(self.optimizer, staleness_lr_scale(staleness, self.options.staleness_lr))
        self.staleness[staleness] += 1
        self.version += 1
        return True


class AsyncProgram(WorkerProgram):
    """Compute a gradient on the last pulled parameters; push it, pull the new ones."""

    def __init__(self, worker: Any, options: AsyncOptions):
        super().__init__(worker, options)
        self.pushed = 0

    def step(self) -> Program:
        yield Compute()
        yield PushPull()
        self.pushed += 1


class Async(Strategy):
    name = "async"
    options_model = AsyncOptions
    program_class = AsyncProgram
    server_based = True

    def server(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> AsyncServer:
        return AsyncServer(module, optimizer, self.options, self.world)

    def load_global(self, target: torch.nn.Module, programs: list[WorkerProgram],
                    server: ParameterServer | None) -> None:
        assert server is not None
        if target is not server.module:
            load_flat_state_(target, flat_state(server.module).to("cpu"))

    def counters(self, programs: list[WorkerProgram], server: ParameterServer | None) -> tuple[int, int]:
        assert server is not None
        return server.version, server.version * self.batch_size

    def curve_metrics(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, float]:
        assert isinstance(server, AsyncServer)
        return {**staleness_curve(server.staleness), "refused_pushes": float(server.refused)}

    def summary_metrics(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, float]:
        assert isinstance(server, AsyncServer)
        return {**staleness_summary(server.staleness), "refused_pushes": float(server.refused)}

    def artifacts(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, str]:
        assert isinstance(server, AsyncServer)
        return staleness_artifact(server.staleness)
