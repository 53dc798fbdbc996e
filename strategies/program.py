"""The small communication interface every strategy's worker program is written against.

A strategy is defined once (one file under ``strategies/``): its options, its pure math
functions, and one *worker program* -- a generator that says what a worker does in one
training step and which communication it asks for, by yielding operations:

* ``Compute()``: forward and backward of the worker's next batch on its replica (the backend
  zeroes the gradients first, as Lightning's closure does). Resumes with the loss, or with
  ``None`` when the step was abandoned because a quorum collective completed without it (and
  always on the sim backend's batched path, ``Strategy.replicas_shareable``).
* ``Step()``: the optimizer step, ``worker.optimizer.step()`` (which a program may also call
  itself). Yielded, it lets the sim backend take the steps of the workers that reach it at the
  same instant as one multi-tensor step over their stacked replicas (the same arithmetic;
  docs/performance.md). Resumes with ``None`` once the step is taken.
* ``ReduceGradients(quorum)``: the replica's gradients (and floating-point buffers: BatchNorm
  statistics are averaged, where DDP broadcasts rank 0's; docs/strategies.md) become their mean over the workers -- over the first
  ``quorum`` to arrive when a quorum is given (backup workers, Chen et al. 2016). With a
  ``codec`` (``syncbench.strategies.compression``), the mean of the workers' decoded compressed gradients.
  Resumes with ``None``: the mean is in the replica's ``.grad`` (the program then steps).
* ``ReduceState()``: the replica's parameters and floating-point buffers become their mean;
  with a ``codec``, reference + the compressed mean of (state − ``reference``). Resumes with
  ``None`` on both backends: the result is in the replica, the replica's own values are gone
  (a program that needs them, or the mean of something else, copies them first or averages a
  vector of its own with ``StartReduce`` / ``WaitReduce``).
* ``PushPull(payload=None)``: the replica's gradient goes to the parameter server, which applies
  it on arrival (``ParameterServer.apply``), then the server's state comes back into the replica.
  Resumes with whether the gradient was applied. A ``payload`` (``state_payload``'s layout)
  is pushed instead of the gradient: e.g. asynchronous local SGD's pseudo-gradient.
* ``StartReduce(payload)``: begin averaging ``payload`` over the workers without blocking (a
  fragment of Streaming DiLoCo); resumes at once with a handle, and the worker keeps
  computing while the reduction crosses the network.
* ``WaitReduce(handle)``: block until that reduction has arrived; resumes with the mean (on the
  payload's device; it may reuse the memory of the payload, which the program handed over; the
  replica is untouched). Every worker starts and waits on its reductions in the same order, one
  at a time.

``ReduceGradients``, ``ReduceState`` and ``WaitReduce`` are *rounds*: the dist backend's control
values (rank 0's stop and evaluate-now decisions) ride along with them, and without a parameter
server rank 0 evaluates the global model only at the end of a step that completed one, where
its program must be at a sync point (``WorkerProgram.at_sync_point``).

Both backends run these programs unchanged, the way SimGrid's SMPI runs unmodified MPI code on
a simulated platform: the sim backend resumes N programs in virtual-time order and charges
each operation on its clock (``syncbench.experiments.sim``); the dist backend runs one program per
process inside a Lightning strategy and carries each operation out over torch.distributed
(``syncbench.experiments.procs``). A backend that cannot carry out an operation refuses the config
before anything runs (``Strategy.unsupported``).
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

# the options models and ConfigError live apart from torch (config validation does not import it)
from syncbench.strategies.options import ConfigError, Options, Traits  # noqa: F401 - ConfigError: re-exported
from syncbench.strategies.tensors import (
    copy_gradients_,
    flat_state,
    float_buffers,
    load_flat_grads_,
    load_params_then_buffers_,
    trainable,
)


# ------------------------------------------------------------------------------------------
# operations a program may yield
# ------------------------------------------------------------------------------------------
class Op:
    """A request from a worker program to its backend."""


@dataclass(frozen=True)
class Compute(Op):
    pass


@dataclass(frozen=True)
class Step(Op):
    pass


@dataclass(frozen=True, eq=False)
class ReduceGradients(Op):
    quorum: int | None = None  # None: every worker
    # a per-worker ``syncbench.strategies.compression.Codec``: the mean of the decoded, compressed
    # gradients (None: the exact mean)
    codec: Any = None


@dataclass(frozen=True, eq=False)
class ReduceState(Op):
    # with a codec, the workers exchange ``state - reference`` (every worker's reference is the
    # same: the last synchronised state) compressed, and the state becomes reference + mean
    codec: Any = None
    reference: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class PushPull(Op):
    payload: torch.Tensor | None = None  # None: the gradient payload; else this vector (state layout)


@dataclass(frozen=True, eq=False)
class StartReduce(Op):
    payload: torch.Tensor  # the vector to average over the workers (the program's own copy)


@dataclass(frozen=True)
class WaitReduce(Op):
    handle: int  # what StartReduce resumed with


Program = Generator[Op, Any, None]


class Worker(Protocol):
    """What a program sees of the worker that runs it (both backends provide it)."""

    rank: int
    world: int
    batch_size: int
    module: torch.nn.Module  # this worker's replica (the user's LightningModule)
    optimizer: torch.optim.Optimizer  # built by the module's own configure_optimizers

    def stop_requested(self) -> bool:
        """The run is about to stop: a program holding unsynchronised work should synchronise now."""
        ...

    def expected_step_factors(self) -> list[float]:
        """Every worker's expected compute-time factor by rank (1.0 = nominal), from the run's
        straggler model as the backend applies it (all 1.0 where it applies none): the same
        numbers on both backends, known before the first step."""
        ...


class WorkerProgram(abc.ABC):
    """One worker's side of a strategy; ``step`` is called once per training step."""

    def __init__(self, worker: Worker, options: Any):
        self.worker, self.options = worker, options

    @abc.abstractmethod
    def step(self) -> Program:
        """One training step: yield the operations, update the replica."""

    def reduces_gradients_next(self) -> bool:
        """Whether the next step asks for ``ReduceGradients`` (lets the dist backend overlap
        the reduction with backward, as DDP does; a hint, never needed for correctness)."""
        return False

    def at_sync_point(self) -> bool:
        """Whether this one program can give the global model and the counters right now, as
        ``Strategy.load_global`` and ``counters`` read them from ``programs`` = [this program]
        * N (the dist backend's view, rank 0's program repeated). For a strategy without a
        server the dist backend evaluates only at the end of a step that completed a round
        (the last evaluation at the stop included) and asserts this before each evaluation
        pause; the sim backend, which holds every program, never asks. True (the default)
        when the global model is the program's own copy or the server's; a program whose
        replicas drift apart between rounds returns whether it has just synchronised (local
        SGD: no local step since the last average)."""
        return True


# ------------------------------------------------------------------------------------------
# payloads: what a reduction or a push carries
# ------------------------------------------------------------------------------------------
def gradient_payload(module: torch.nn.Module) -> torch.Tensor:
    """The gradients, then the floating-point buffers, as one vector (a copy)."""
    params = trainable(module)
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    dtype = parts[0].dtype
    parts += [b.detach().reshape(-1).to(dtype) for b in float_buffers(module)]
    return torch.cat(parts)


def load_gradient_payload_(module: torch.nn.Module, payload: torch.Tensor | torch.nn.Module) -> None:
    """Gradients and floating-point buffers from ``gradient_payload``'s layout, or -- within one
    process (the sim backend), where a pushing replica waits unchanged until its pull returns --
    straight from that replica, without the flat copy."""
    if isinstance(payload, torch.nn.Module):
        copy_gradients_(module, payload)
        return
    load_params_then_buffers_(module, payload, load_flat_grads_)


def state_payload(module: torch.nn.Module) -> torch.Tensor:
    return flat_state(module)


# ------------------------------------------------------------------------------------------
# the parameter server (strategies that push and pull)
# ------------------------------------------------------------------------------------------
class ParameterServer(abc.ABC):
    """State and update rule of a parameter server; the backend owns its transport."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, options: Any, world: int):
        self.module, self.optimizer, self.options, self.world = module, optimizer, options, world
        self.version = 0
        # staleness (version at apply - version the push was computed on) -> applied pushes:
        # ``apply`` counts each push it applies here; ``ServerStrategy`` records it
        self.staleness: Counter = Counter()

    @abc.abstractmethod
    def apply(self, rank: int, payload: torch.Tensor | torch.nn.Module, pulled_version: int) -> bool:
        """A push arrived: apply it (returns True) or refuse it (False). A gradient push is
        read with ``load_gradient_payload_`` (the sim hands over the pushing replica itself)."""


# ------------------------------------------------------------------------------------------
# the strategy: registry entry, global model, counters
# ------------------------------------------------------------------------------------------
def ring_allreduce_time(workers: int, latency_s: float, bytes_per_s: float, nbytes: float) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` on the alpha-beta model (what the sim charges):
    2(N-1)·α + 2(N-1)/N · S/β; for ``Strategy.clock_per_update``."""
    n = workers
    return 2 * (n - 1) * latency_s + 2 * (n - 1) / n * nbytes / bytes_per_s


class Strategy(abc.ABC):
    """A registered strategy: its name, options model and program, and the views the run
    needs of a set of workers (global model, counters, metrics). ``programs`` holds every
    worker's program in the sim backend and rank 0's, repeated, in the dist backend, where
    the global model and counters are read only at a sync point (``at_sync_point``).

    What the strategy *is* -- plain SGD at one worker, identical replicas, a parameter server,
    its colour and place in the report -- is ``traits``: its options model's ``Traits``
    (``syncbench.strategies.options``), declared there so that the report and config
    validation read it without importing this file's torch."""

    name: ClassVar[str]
    options_model: ClassVar[type[Options]]
    program_class: ClassVar[type[WorkerProgram]]
    traits: ClassVar[Traits]  # = options_model.traits, set for every subclass that names its options model

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        options_model = getattr(cls, "options_model", None)
        if options_model is not None:
            cls.traits = options_model.traits

    def __init__(self, options: Any, world: int, batch_size: int):
        self.options, self.world, self.batch_size = options, world, batch_size

    @classmethod
    def clock_per_update(cls, options: Any, workers: int, step_s: float, latency_s: float, bytes_per_s: float,
                         payload: Mapping[str, int]) -> float | None:
        """The sim's training clock per global update without stragglers, in closed form, or
        None: no closed form (``syncbench calibrate`` then skips this strategy, saying so).
        ``latency_s`` and ``bytes_per_s`` are the alpha and beta of the link the strategy's
        communication crosses: the all-reduce's, or the parameter server's for a strategy that
        has one; ``payload`` holds the task's ``gradient_bytes`` and ``state_bytes``."""
        return None

    @classmethod
    def unsupported(cls, options: Any, backend: str, world: int) -> str | None:
        """Why this backend cannot run these options (the config is refused), or None: the
        options model's own ``unsupported`` (``strategies/options.py``), which config
        validation asks without importing torch."""
        return options.unsupported(backend, world)

    @classmethod
    def unsupported_module(cls, options: Any, module: torch.nn.Module) -> str | None:
        """Why these options cannot train this module (the config is refused), or None."""
        return None

    def lr_batch_factor(self) -> float:
        """Effective batch of one update / one worker's batch (``strategy.lr_scaling``)."""
        return 1.0

    def replicas_shareable(self) -> bool:
        """Whether one replica can stand for every worker's for the whole run (the sim backend's
        batched path, ``cluster.sim.batching``): every replica, optimizer state and trainer
        counter stays identical, each program step is ``Compute`` then an uncompressed
        ``ReduceGradients`` then ``worker.optimizer.step()``, and the program does not read
        ``Compute``'s loss (there it resumes with None: the loss comes with the round's batched
        gradient). Default: ``traits.keeps_replicas_identical``."""
        return self.traits.keeps_replicas_identical

    def program(self, worker: Worker) -> WorkerProgram:
        return self.program_class(worker, self.options)

    def server(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> ParameterServer | None:
        """The parameter server, for strategies that push and pull (``Traits.has_parameter_server``;
        derive from ``syncbench.strategies.server_strategy.ServerStrategy``)."""
        return None

    @abc.abstractmethod
    def load_global(self, target: torch.nn.Module, programs: list[WorkerProgram],
                    server: ParameterServer | None) -> None:
        """Copy the global model (docs/strategies.md: the model evaluated for time-to-accuracy)
        into ``target``."""

    @abc.abstractmethod
    def counters(self, programs: list[WorkerProgram], server: ParameterServer | None) -> tuple[int, int]:
        """(global updates, training samples whose gradients reached the model)."""

    def curve_metrics(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, float]:
        return {}

    def summary_metrics(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, float]:
        return {}

    def artifacts(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, str]:
        return {}
