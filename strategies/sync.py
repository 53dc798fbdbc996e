"""Synchronous all-reduce SGD, with optional backup workers.

Each update averages the gradients of N workers, each on its own batch; with
``backup_workers: k`` it uses the first N-k gradients to arrive and drops the rest
(Chen et al. 2016, "Revisiting Distributed Synchronous SGD"). At equal data, sync at N
workers is the same optimisation as one worker at batch N*b.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from syncbench.strategies.compression import CompressionOptions, make_codec, param_shapes
from syncbench.strategies.program import (
    Compute,
    ParameterServer,
    Program,
    ReduceGradients,
    Strategy,
    WorkerProgram,
)
from syncbench.strategies.tensors import flat_state, load_flat_state_


class SyncOptions(CompressionOptions):
    backup_workers: int = Field(default=0, ge=0, description="sync: each update uses the first N-k gradients "
                                "to arrive and drops the rest (Chen et al. 2016); must be < cluster.workers; "
                                "sim backend only")


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
        self.worker.optimizer.step()
        self.updates += 1

    def reduces_gradients_next(self) -> bool:
        return self.codec is None  # a compressed exchange takes the whole gradient after backward


class Sync(Strategy):
    name = "sync"
    options_model = SyncOptions
    program_class = SyncProgram

    @classmethod
    def unsupported(cls, options: Any, backend: str, world: int) -> str | None:
        if options.backup_workers >= world:
            return (f"strategy.backup_workers ({options.backup_workers}) must be smaller than "
                    f"cluster.workers ({world})")
        if options.backup_workers > 0 and options.compression != "none":
            return ("strategy.compression: a compressed exchange needs every worker (its codec state "
                    "advances at every exchange); set strategy.backup_workers=0 or strategy.compression=none")
        if backend == "dist" and options.backup_workers > 0:
            return ("strategy.backup_workers: backup workers are not supported by cluster.backend=dist "
                    "(dropping the slowest gradients needs a non-blocking reduction that a gloo/NCCL "
                    "all-reduce is not); use cluster.backend=sim or set strategy.backup_workers=0")
        return None

    def lr_batch_factor(self) -> float:
        return float(self.world)

    def load_global(self, target: torch.nn.Module, programs: list[WorkerProgram],
                    server: ParameterServer | None) -> None:
        load_flat_state_(target, flat_state(programs[0].worker.module).to("cpu"))

    def counters(self, programs: list[WorkerProgram], server: ParameterServer | None) -> tuple[int, int]:
        lead = programs[0]
        assert isinstance(lead, SyncProgram)
        return lead.updates, lead.updates * lead.quorum * self.batch_size
