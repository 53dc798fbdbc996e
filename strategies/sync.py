"""Synchronous all-reduce SGD, with optional backup workers.

Each update averages the gradients of N workers, each on its own batch; with
``backup_workers: k`` it uses the first N-k gradients to arrive and drops the rest
(Chen et al. 2016, "Revisiting Distributed Synchronous SGD"). At equal data, sync at N
workers is the same optimisation as one worker at batch N*b.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from syncbench.strategies.compression import make_codec, param_shapes
# the options models live apart from torch (config validation does not import it)
from syncbench.strategies.options import SyncOptions
from syncbench.strategies.program import (
    Compute,
    ParameterServer,
    Program,
    ReduceGradients,
    Strategy,
    WorkerProgram,
    ring_allreduce_time,
    Step,
)
from syncbench.strategies.tensors import flat_state, load_flat_state_


class SyncProgram(WorkerProgram):
    """Compute a gradient, average it with every worker's (or the first N-k), step."""

    def __init__(self, worker: Any, options: SyncOptions):
        super().__init__(worker, options)
        self.quorum = worker.world - options.backup_workers
        self.updates = 0
        self.codec = make_codec(options, param_shapes(worker.module))  # None: uncompressed

    def step(self) -> Program:
        yield Compute()
        yield ReduceGradients(self.quorum if self.quorum < self.worker.world else None, codec=self.codec)
        yield Step()
        self.updates += 1

    def reduces_gradients_next(self) -> bool:
        return self.codec is None  # a compressed exchange takes the whole gradient after backward


class Sync(Strategy):
    name = "sync"
    options_model = SyncOptions
    program_class = SyncProgram

    @classmethod
    def clock_per_update(cls, options: Any, workers: int, step_s: float, latency_s: float, bytes_per_s: float,
                         payload: Mapping[str, int]) -> float | None:
        """A step + a ring all-reduce of the gradients."""
        return step_s + ring_allreduce_time(workers, latency_s, bytes_per_s, payload["gradient_bytes"])

    def replicas_shareable(self) -> bool:
        # a codec keeps per-worker state (error feedback) and needs each worker's own gradient
        return self.options.compression == "none"

    def lr_batch_factor(self) -> float:
        # an update averages the first N - k gradients (backup workers): its batch is (N - k) b
        return float(self.world - self.options.backup_workers)

    def load_global(self, target: torch.nn.Module, programs: list[WorkerProgram],
                    server: ParameterServer | None) -> None:
        load_flat_state_(target, flat_state(programs[0].worker.module).to("cpu"))

    def counters(self, programs: list[WorkerProgram], server: ParameterServer | None) -> tuple[int, int]:
        lead = programs[0]
        assert isinstance(lead, SyncProgram)
        return lead.updates, lead.updates * lead.quorum * self.batch_size
