"""Local SGD (Stich 2019), post-local SGD (Lin et al. 2020) and DiLoCo (Douillard et al. 2023).

Each worker takes ``local_steps`` optimizer steps on its own copy, then the copies are
averaged. The first ``warmup_sync_updates`` updates are synchronous (gradients averaged
every step): post-local SGD. With ``outer``, the average becomes a pseudo-gradient
Delta = theta_global - mean(theta_i) applied by an outer SGD with (Nesterov) momentum; the
outer parameters follow the synchronised parameters through the warm-up, so the first outer
step sees only the local steps after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from syncbench.strategies.compression import make_codec, param_shapes
# the options models live apart from torch (config validation does not import it)
from syncbench.strategies.options import LocalSGDOptions, OuterConfig
from syncbench.strategies.program import (
    Compute,
    ParameterServer,
    Program,
    ReduceGradients,
    ReduceState,
    Strategy,
    WorkerProgram,
    ring_allreduce_time,
    Step,
)
from syncbench.strategies.tensors import flat_params, flat_state, load_flat_params_, load_flat_state_


@torch.no_grad()
def mean_state_(target: torch.nn.Module, sources: list[torch.nn.Module]) -> None:
    """``target``'s parameters and floating-point buffers := the mean over ``sources``."""
    load_flat_state_(target, torch.stack([flat_state(s) for s in sources]).mean(dim=0))


@torch.no_grad()
def apply_outer_step(global_params: torch.Tensor, mean_params: torch.Tensor, momentum_buf: torch.Tensor,
                     outer: OuterConfig) -> None:
    """DiLoCo's outer step, in place: SGD (torch semantics, no dampening) on the pseudo-gradient."""
    apply_pseudo_gradient_(global_params, global_params - mean_params, momentum_buf, outer)


@torch.no_grad()
def apply_pseudo_gradient_(global_params: torch.Tensor, delta: torch.Tensor, momentum_buf: torch.Tensor,
                           outer: OuterConfig) -> None:
    """The outer SGD step on a pseudo-gradient ``delta`` already formed (asynchronous local SGD
    pushes it), in place."""
    momentum_buf.mul_(outer.momentum).add_(delta)
    update = delta.add(momentum_buf, alpha=outer.momentum) if outer.nesterov else momentum_buf
    global_params.sub_(update, alpha=outer.lr)


class LocalSGDProgram(WorkerProgram):
    """Warm-up: sync steps. Then: a local step; every H-th (or when the run stops), average."""

    def __init__(self, worker: Any, options: LocalSGDOptions):
        super().__init__(worker, options)
        self.sync_updates = 0  # warm-up updates
        self.local_steps = 0  # local optimizer steps after the warm-up
        self.since_sync = 0
        self.rounds = 0
        self.global_state: torch.Tensor | None = None  # outer parameters (+ mean buffers), DiLoCo only
        self.momentum: torch.Tensor | None = None
        if options.outer is not None:
            self.global_state = flat_state(worker.module)
            self.momentum = torch.zeros_like(flat_params(worker.module))
        # compression: warm-up gradients and pseudo-gradients keep separate codec states
        # (error feedback residuals); a compressed average exchanges state - reference, the
        # last synchronised state (every worker holds the same one)
        self.grad_codec = make_codec(options, param_shapes(worker.module))
        self.state_codec = make_codec(options, param_shapes(worker.module))
        self.reference: torch.Tensor | None = None
        if self.state_codec is not None and self.global_state is None:
            self.reference = flat_state(worker.module)

    def _in_warmup(self) -> bool:
        return self.sync_updates < self.options.warmup_sync_updates

    def step(self) -> Program:
        w = self.worker
        if self._in_warmup():
            yield Compute()
            yield ReduceGradients(codec=self.grad_codec)
            yield Step()
            self.sync_updates += 1
            if self.global_state is not None:  # the outer model follows the synchronised one
                self.global_state = flat_state(w.module)
            if self.reference is not None:
                self.reference = flat_state(w.module)
            return
        yield Compute()
        yield Step()
        self.local_steps += 1
        self.since_sync += 1
        if self.since_sync < self.options.local_steps and not w.stop_requested():
            return
        if self.state_codec is None:
            yield ReduceState()
        else:
            yield ReduceState(codec=self.state_codec, reference=self._reference())
        self.since_sync = 0
        self.rounds += 1
        if self.global_state is not None:
            outer = self.options.outer
            n = self.momentum.numel()
            global_params = self.global_state[:n]
            apply_outer_step(global_params, flat_params(w.module), self.momentum, outer)
            load_flat_params_(w.module, global_params)
            self.global_state = flat_state(w.module)  # outer parameters, mean buffers
        elif self.reference is not None:
            self.reference = flat_state(w.module)

    def _reference(self) -> torch.Tensor:
        ref = self.global_state if self.global_state is not None else self.reference
        assert ref is not None
        return ref

    def reduces_gradients_next(self) -> bool:
        return self._in_warmup() and self.grad_codec is None

    def at_sync_point(self) -> bool:
        return self.since_sync == 0


class LocalSGD(Strategy):
    name = "local_sgd"
    options_model = LocalSGDOptions
    program_class = LocalSGDProgram

    @classmethod
    def clock_per_update(cls, options: Any, workers: int, step_s: float, latency_s: float, bytes_per_s: float,
                         payload: Mapping[str, int]) -> float | None:
        """A step + a ring all-reduce of the state every H steps (warm-up and outer step aside)."""
        return step_s + ring_allreduce_time(workers, latency_s, bytes_per_s, payload["state_bytes"]) / options.local_steps

    def load_global(self, target: torch.nn.Module, programs: list[WorkerProgram],
                    server: ParameterServer | None) -> None:
        lead = programs[0]
        assert isinstance(lead, LocalSGDProgram)
        if lead.global_state is not None:  # the outer parameters of the last synchronisation
            load_flat_state_(target, lead.global_state.to("cpu"))
        elif all(p.at_sync_point() for p in programs):  # identical replicas: no rounding in a mean
            load_flat_state_(target, flat_state(lead.worker.module).to("cpu"))
        else:
            mean_state_(target, [p.worker.module for p in programs])

    def counters(self, programs: list[WorkerProgram], server: ParameterServer | None) -> tuple[int, int]:
        assert all(isinstance(p, LocalSGDProgram) for p in programs)
        warm = programs[0].sync_updates  # type: ignore[attr-defined]
        local = sum(p.local_steps for p in programs)  # type: ignore[attr-defined]
        return warm + local // self.world, (warm * self.world + local) * self.batch_size

    def summary_metrics(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, float]:
        return {"averaging_rounds": float(programs[0].rounds)}  # type: ignore[attr-defined]
