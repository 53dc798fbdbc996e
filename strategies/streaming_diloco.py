"""Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication:
Towards a Distributed Free Lunch").

DiLoCo (``syncbench.strategies.local_sgd`` with ``outer``) synchronises the whole model every H local
steps, and every worker stands still while it crosses the network. Streaming DiLoCo splits the
parameters into P fragments (contiguous slices of the flat parameter vector of equal size, cut at
layer boundaries where those balance: ``fragment_bounds``) and
synchronises one fragment at a time, staggered H/P steps apart, so that each fragment is still
synchronised every H steps but the traffic of a round is 1/P of the model. Each fragment's
reduction overlaps with ``overlap_steps`` (tau) inner steps: it starts, the worker keeps
computing, and tau steps later the arriving average becomes a pseudo-gradient for the outer
optimizer (``apply_outer_step``, DiLoCo's) and the outer result is mixed into the local fragment:
theta_local <- alpha * theta_outer + (1 - alpha) * theta_local (``mixing_alpha``; the paper
writes the same mix with its alpha weighting the local side, alpha_paper = 1 - alpha here).

Floating-point buffers (BatchNorm statistics) travel with the last fragment, whose rounds fall on
DiLoCo's (every H-th step), and are averaged, not mixed. With P = 1, tau = 0, alpha = 1 the
program is DiLoCo's, operation for operation: the same parameters bit for bit.

The global model (evaluated for time-to-accuracy): with ``outer``, the outer parameters, each
fragment as of its last synchronisation; without, the mean of the workers' current
parameters, as for local SGD (docs/strategies.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from syncbench.strategies.local_sgd import apply_outer_step, mean_state_
# the options models live apart from torch (config validation does not import it)
from syncbench.strategies.options import StreamingDiLoCoOptions
from syncbench.strategies.program import (
    Compute,
    ConfigError,
    ParameterServer,
    Program,
    StartReduce,
    Strategy,
    WaitReduce,
    WorkerProgram,
    Step,
)
from syncbench.strategies.tensors import flat_state, load_flat_state_, trainable

BALANCE_TOLERANCE = 0.05  # a cut may sit this share of model/P off the even point (fragments within 10%)


def fragment_bounds(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """Split the flat parameter vector (tensors of ``sizes``, in order) into ``parts``
    contiguous fragments of equal size: returns each fragment's element range [start, stop).

    Each cut is the tensor boundary closest to the even point k/parts of the elements when that
    boundary lies within ``BALANCE_TOLERANCE`` x model/parts of it (whole layers, as the paper
    assigns them, where they balance); otherwise the cut falls inside a tensor, at the even point
    itself. Every fragment therefore holds model/parts within 10%, so each synchronisation carries
    1/P of the model: the paper's P-fold cut in peak bandwidth, whatever the layer sizes (a
    model with one big layer and small ones included)."""
    total = int(sum(sizes))
    if not 1 <= parts <= total:
        raise ConfigError(f"strategy.fragments ({parts}) must be between 1 and the module's number of parameters "
                          f"({total})")
    edges = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    share = total / parts
    cuts = [0]
    for k in range(1, parts):
        even = total * k / parts
        nearest = int(edges[np.argmin(np.abs(edges - even))])
        cut = nearest if abs(nearest - even) <= BALANCE_TOLERANCE * share else int(round(even))
        cuts.append(max(cut, cuts[-1] + 1))  # non-empty (parts <= total keeps the last one non-empty too)
    cuts.append(total)
    return list(zip(cuts, cuts[1:]))


@torch.no_grad()
def mix_(local: torch.Tensor, outer: torch.Tensor, alpha: float) -> None:
    """``local`` <- alpha * outer + (1 - alpha) * local, in place; alpha = 1 copies exactly."""
    if alpha == 1.0:
        local.copy_(outer)
    else:
        local.mul_(1.0 - alpha).add_(outer, alpha=alpha)


class StreamingDiLoCoProgram(WorkerProgram):
    """A local step; after every H/P-th, fragment p starts its reduction; tau steps later its
    average arrives, goes through the outer step and is mixed into the replica."""

    def __init__(self, worker: Any, options: StreamingDiLoCoOptions):
        super().__init__(worker, options)
        params = trainable(worker.module)
        self.bounds = fragment_bounds([p.numel() for p in params], options.fragments)
        self.n_params = self.bounds[-1][1]
        # the global model: outer parameters of each fragment's last synchronisation, mean buffers
        self.global_state = flat_state(worker.module)
        self.momentum = torch.zeros_like(self.global_state[: self.n_params]) if options.outer is not None else None
        self.gap = options.local_steps // options.fragments
        self.local_steps = 0
        self.syncs = 0  # fragment synchronisations applied
        self.pending: tuple[int, int, int] | None = None  # (fragment, handle, local step that applies it)
        self.synced_now = False

    def fragment_due(self, step: int) -> int | None:
        """The fragment whose synchronisation starts after local step ``step`` (1-based): the
        last fragment on every H-th step, the others H/P apart before it."""
        if step % self.gap:
            return None
        return (step // self.gap - 1) % len(self.bounds)

    def _payload(self, fragment: int) -> torch.Tensor:
        state = flat_state(self.worker.module)
        start, stop = self.bounds[fragment]
        if fragment == len(self.bounds) - 1:  # the buffers ride with the last fragment
            return torch.cat([state[start:stop], state[self.n_params :]])
        return state[start:stop].clone()

    @torch.no_grad()
    def _apply(self, fragment: int, mean: torch.Tensor) -> None:
        start, stop = self.bounds[fragment]
        size = stop - start
        outer_part = self.global_state[start:stop]
        if self.options.outer is not None:
            assert self.momentum is not None
            apply_outer_step(outer_part, mean[:size], self.momentum[start:stop], self.options.outer)
        else:
            outer_part.copy_(mean[:size])
        state = flat_state(self.worker.module)
        mix_(state[start:stop], outer_part, self.options.mixing_alpha)
        if fragment == len(self.bounds) - 1 and mean.numel() > size:
            self.global_state[self.n_params :] = mean[size:]
            state[self.n_params :] = mean[size:]
        load_flat_state_(self.worker.module, state)
        self.syncs += 1
        self.synced_now = True

    def step(self) -> Program:
        w = self.worker
        self.synced_now = False
        yield Compute()
        yield Step()
        self.local_steps += 1
        step = self.local_steps
        if self.pending is not None and self.pending[2] == step:  # tau steps have passed: it has arrived
            fragment, handle, _ = self.pending
            self.pending = None
            self._apply(fragment, (yield WaitReduce(handle)))
        fragment = self.fragment_due(step)
        if fragment is None:
            return
        handle = yield StartReduce(self._payload(fragment))
        if self.options.overlap_steps == 0:
            self._apply(fragment, (yield WaitReduce(handle)))
        else:
            self.pending = (fragment, handle, step + self.options.overlap_steps)

    def at_sync_point(self) -> bool:
        return self.synced_now


class StreamingDiLoCo(Strategy):
    name = "streaming_diloco"
    options_model = StreamingDiLoCoOptions
    program_class = StreamingDiLoCoProgram

    @classmethod
    def unsupported_module(cls, options: Any, module: torch.nn.Module) -> str | None:
        numel = sum(p.numel() for p in trainable(module))
        if options.fragments > numel:
            return (f"strategy.fragments ({options.fragments}) is more than the module's {numel} parameters: "
                    "every fragment holds at least one")
        return None

    def load_global(self, target: torch.nn.Module, programs: list[WorkerProgram],
                    server: ParameterServer | None) -> None:
        lead = programs[0]
        assert isinstance(lead, StreamingDiLoCoProgram)
        if lead.options.outer is not None:
            load_flat_state_(target, lead.global_state.to("cpu"))
        elif len({id(p) for p in programs}) == 1:  # dist: rank 0's replica, just after a fragment's average
            load_flat_state_(target, flat_state(lead.worker.module).to("cpu"))
        else:
            mean_state_(target, [p.worker.module for p in programs])

    def counters(self, programs: list[WorkerProgram], server: ParameterServer | None) -> tuple[int, int]:
        local = sum(p.local_steps for p in programs)  # type: ignore[attr-defined]
        return local // self.world, local * self.batch_size

    def summary_metrics(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, float]:
        lead = programs[0]
        assert isinstance(lead, StreamingDiLoCoProgram)
        return {"fragment_syncs": float(lead.syncs), "averaging_rounds": lead.syncs / len(lead.bounds)}
