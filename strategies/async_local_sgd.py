"""Asynchronous local SGD (Liu et al. 2024, "Asynchronous Local-SGD Training for Language
Modeling"), with delayed Nesterov momentum (DN) and dynamic local updates (DyLU).

Each worker takes H local optimizer steps from the parameters it last pulled, then pushes its
pseudo-gradient Delta = theta_pulled - theta_local to a parameter server, which applies an outer
optimizer to it on arrival (SGD with momentum / Nesterov, DiLoCo's ``apply_pseudo_gradient_``),
and pulls the server's parameters. Nobody waits for anybody: a slow worker's pseudo-gradient
simply arrives later, stale by the pushes applied since its pull. With one worker the server's
parameters follow DiLoCo's outer parameters exactly.

* ``delayed_nesterov: N`` (DN, the paper's Algorithm 3): the outer momentum is updated once
  every N pushes, from their average; each push in between is applied as a plain SGD step of
  lr / N. Over N pushes the parameters move by the outer step of their average, so stale
  pseudo-gradients are not amplified by momentum one by one. N = 1 is the plain outer step.
* ``dynamic_local_updates`` (DyLU, the paper's Eq. 6): worker i takes
  H_i = max(1, floor(H * v_i / max_j v_j)) local steps per push, v the worker's speed, so that
  slow workers push as often as fast ones with fresher, shorter pseudo-gradients. The speed is
  1 / the worker's expected compute-time factor under ``cluster.stragglers`` (``Worker.
  expected_step_factors``): the same on both backends and known before the first step, so it
  separates persistent stragglers (a fixed slow subset) and treats per-step noise (lognormal,
  bimodal), whose expectation is the same for every worker, as no difference in speed.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

from syncbench.strategies.local_sgd import apply_pseudo_gradient_
# the options models live apart from torch (config validation does not import it)
from syncbench.strategies.options import AsyncLocalSGDOptions, OuterConfig
from syncbench.strategies.program import (
    Compute,
    ParameterServer,
    Program,
    PushPull,
    WorkerProgram,
    Step,
)
from syncbench.strategies.server_strategy import ServerStrategy
from syncbench.strategies.tensors import flat_params, flat_state, load_flat_state_

def dynamic_local_steps(h: int, factors: list[float]) -> list[int]:
    """DyLU's local steps per worker: H for the fastest, proportionally fewer (at least 1) for
    slower ones; ``factors`` are the workers' expected compute-time factors."""
    fastest = min(factors)
    return [max(1, math.floor(h * fastest / f + 1e-9)) for f in factors]


@torch.no_grad()
def delayed_nesterov_step_(params: torch.Tensor, delta: torch.Tensor, momentum: torch.Tensor,
                           pending: torch.Tensor, count: int, period: int, outer: OuterConfig) -> None:
    """DN (Liu et al. 2024, Algorithm 3), in place, for the ``count``-th push (1-based): a plain
    SGD step of lr / N on ``delta`` now; at every N-th push the momentum takes the average of the
    N pseudo-gradients and the momentum part of the outer step is applied, so that N pushes
    together move ``params`` by one outer SGD step (torch semantics) on their average."""
    pending.add_(delta)
    params.sub_(delta, alpha=outer.lr / period)
    if count % period:
        return
    average = pending / period
    previous = momentum.clone()
    momentum.mul_(outer.momentum).add_(average)
    # torch's update is average + beta * momentum (Nesterov) or momentum = average + beta * previous
    params.sub_(momentum if outer.nesterov else previous, alpha=outer.lr * outer.momentum)
    pending.zero_()


class AsyncLocalSGDServer(ParameterServer):
    """The global parameters, the outer momentum (and DN's pending sum), version and staleness."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, options: AsyncLocalSGDOptions,
                 world: int):
        super().__init__(module, optimizer, options, world)
        # no outer optimizer: theta <- theta - Delta, i.e. the pushing worker's parameters
        self.outer = options.outer if options.outer is not None else OuterConfig(lr=1.0)
        params = flat_params(module)
        self.n_params = params.numel()
        self.momentum = torch.zeros_like(params)
        self.pending = torch.zeros_like(params) if options.delayed_nesterov else None
        self.pushes_by_rank: Counter = Counter()

    @torch.no_grad()
    def apply(self, rank: int, payload: torch.Tensor, pulled_version: int) -> bool:
        """``payload``: the pseudo-gradient, then the pushing worker's floating-point buffers."""
        state = flat_state(self.module)
        params, delta = state[: self.n_params], payload[: self.n_params]
        if self.pending is not None:
            delayed_nesterov_step_(params, delta, self.momentum, self.pending, self.version + 1,
                                   self.options.delayed_nesterov, self.outer)
        else:
            apply_pseudo_gradient_(params, delta, self.momentum, self.outer)
        state[self.n_params :] = payload[self.n_params :]  # buffers: the pushing worker's, as async SGD
        load_flat_state_(self.module, state)
        self.staleness[self.version - pulled_version] += 1
        self.pushes_by_rank[rank] += 1
        self.version += 1
        return True


class AsyncLocalSGDProgram(WorkerProgram):
    """H_i local steps from the pulled parameters; push theta_pulled - theta_local; pull."""

    def __init__(self, worker: Any, options: AsyncLocalSGDOptions):
        super().__init__(worker, options)
        # every worker's H (the same list on every worker: the server's samples are counted with it)
        self.steps_per_push = [options.local_steps] * worker.world
        if options.dynamic_local_updates:
            self.steps_per_push = dynamic_local_steps(options.local_steps, worker.expected_step_factors())
        self.h = self.steps_per_push[worker.rank]
        self.pulled = flat_params(worker.module).clone()
        self.since_push = 0
        self.local_steps = 0
        self.pushes = 0

    def step(self) -> Program:
        w = self.worker
        yield Compute()
        yield Step()
        self.local_steps += 1
        self.since_push += 1
        if self.since_push < self.h and not w.stop_requested():
            return
        state = flat_state(w.module)
        n = self.pulled.numel()
        yield PushPull(torch.cat([self.pulled - state[:n], state[n:]]))
        self.since_push = 0
        self.pushes += 1
        self.pulled = flat_params(w.module)  # the server's parameters, just pulled

    def at_sync_point(self) -> bool:
        return self.since_push == 0


class AsyncLocalSGD(ServerStrategy):
    name = "async_local_sgd"
    options_model = AsyncLocalSGDOptions
    program_class = AsyncLocalSGDProgram

    def server(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> AsyncLocalSGDServer:
        return AsyncLocalSGDServer(module, optimizer, self.options, self.world)

    def counters(self, programs: list[WorkerProgram], server: ParameterServer | None) -> tuple[int, int]:
        """(pushes applied: the server's updates, the samples they carry: H_i per push of worker i,
        the same count on both backends; a push forced early by the run's stop counts H_i too)."""
        assert isinstance(server, AsyncLocalSGDServer)
        steps = programs[0].steps_per_push  # type: ignore[attr-defined]
        return server.version, self.batch_size * sum(n * steps[r] for r, n in server.pushes_by_rank.items())

    def summary_metrics(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, float]:
        steps = programs[0].steps_per_push  # type: ignore[attr-defined]
        return {**super().summary_metrics(programs, server), "local_steps_min": float(min(steps)),
                "local_steps_max": float(max(steps))}
