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

from collections.abc import Mapping
from typing import Any

import torch

from syncbench.strategies.lightning_bridge import scaled_lr
# the options models live apart from torch (config validation does not import it)
from syncbench.strategies.options import AsyncOptions
from syncbench.strategies.program import (
    Compute,
    ParameterServer,
    Program,
    PushPull,
    WorkerProgram,
    load_gradient_payload_,
)
from syncbench.strategies.server_strategy import ServerStrategy


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


class AsyncServer(ParameterServer):
    """theta, the module's own optimizer, the version and the staleness histogram."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, options: AsyncOptions,
                 world: int):
        super().__init__(module, optimizer, options, world)
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


class Async(ServerStrategy):
    name = "async"
    options_model = AsyncOptions
    program_class = AsyncProgram

    @classmethod
    def clock_per_update(cls, options: Any, workers: int, step_s: float, latency_s: float, bytes_per_s: float,
                         payload: Mapping[str, int]) -> float | None:
        """A worker's cycle (a step + a push + a pull) / N, but never less than the server link's
        time per update (push and pull occupy it, first come first served: at steady state with
        equal steps the sim settles on the larger of the two)."""
        link = 2 * latency_s + (payload["gradient_bytes"] + payload["state_bytes"]) / bytes_per_s
        return max((step_s + link) / workers, link)

    def server(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> AsyncServer:
        return AsyncServer(module, optimizer, self.options, self.world)

    def counters(self, programs: list[WorkerProgram], server: ParameterServer | None) -> tuple[int, int]:
        assert server is not None
        return server.version, server.version * self.batch_size

    def curve_metrics(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, float]:
        assert isinstance(server, AsyncServer)
        return {**super().curve_metrics(programs, server), "refused_pushes": float(server.refused)}

    def summary_metrics(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, float]:
        assert isinstance(server, AsyncServer)
        return {**super().summary_metrics(programs, server), "refused_pushes": float(server.refused)}
