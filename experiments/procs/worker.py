"""What every real-process strategy shares: the Lightning face, the per-rank time ledger, the
exchange vector that rides along each collective round, straggler/network emulation and the
time-to-accuracy monitor of rank 0.

Lightning sees each worker as a single process (rank 0 of 1): ``reduce``/``broadcast``/
``all_gather`` are identity and ``barrier`` is a no-op, as the former ``HivemindStrategy``
did. Lightning therefore never issues a collective of its own (no per-batch broadcast, no
barrier, no ``sync_dist`` reduction) and the strategy owns all communication, on process
groups of its own:

* ``main``: the default group (gloo on CPU, NCCL when the module is on CUDA) — gradient
  buckets (sync) and parameter averages (local SGD);
* ``ctrl``: a gloo group for the small float64 exchange vector, the initial broadcast of
  rank 0's parameters and the final gather of the ledgers;
* ``ps``: a gloo group of its own for the asynchronous parameter server's point-to-point
  traffic.

Time accounting per rank (seconds since the rank's first training step):
``compute = elapsed - comm - wait - excluded``; ``comm`` includes emulated network padding,
``compute`` includes emulated straggler padding; ``excluded`` is rank 0's evaluation time
(the training clock is paused during evaluation) and, on the other ranks, the part of their
blocking that only waited for rank 0's evaluation.

A blocking collective round is split into communication and waiting after the fact: the
rank that arrives last waits for nobody, so the smallest blocked time over the ranks is the
round's communication time and each rank's excess over it is waiting. Each rank's blocked
time rides in the next round's exchange vector (and the final gather), so the split costs
no extra message.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import functools

import torch
import torch.distributed as dist

from syncbench.experiments.cluster_model import StragglerModel, exchange_model_s, ring_allreduce_bytes, ring_allreduce_s
from syncbench.experiments.config import RunConfig
from syncbench.experiments.procs.buckets import GradBuckets
from syncbench.experiments.run_loop import Evaluation, TTATracker
from syncbench.experiments.sim.engine import scale_lr_
from syncbench.strategies.lightning_bridge import LightningModuleLike, ModuleOptimizer, TrainerStandIn, build_module_optimizer, evaluate, is_finite
from syncbench.strategies.program import (
    Compute,
    PushPull,
    ReduceGradients,
    ReduceState,
    StartReduce,
    WaitReduce,
    WorkerProgram,
    gradient_payload,
    load_gradient_payload_,
)
from syncbench.strategies.program import Strategy as StrategyDef
from syncbench.strategies.tensors import flat_state, float_buffers, load_flat_state_, state_numel, trainable


class WorkerFailure(RuntimeError):
    """A peer, the parameter server or a collective failed; the message names the rank when known."""


# ------------------------------------------------------------------------------------------
# communication context and ledger
# ------------------------------------------------------------------------------------------
@dataclass
class Comm:
    rank: int
    world: int
    device: torch.device
    main: Any  # default process group (None = the default group)
    ctrl: Any  # gloo group: exchange vector, initial broadcast, final gather
    ps: Any  # gloo group: parameter-server point-to-point
    timeout_s: float


@dataclass
class RankLedger:
    """Cumulative seconds of one rank since its first training step."""

    t_first: float | None = None
    comm: float = 0.0
    wait: float = 0.0
    excluded: float = 0.0
    pad_compute: float = 0.0
    pad_comm: float = 0.0
    steps: int = 0  # local optimizer steps (or gradients pushed, async)
    unsettled: float | None = None  # blocked seconds of the last round, not yet split
    rounds: int = 0
    events: list[tuple[int, float]] = field(default_factory=list)  # (step, blocked_s) per blocking round
    step_times: list[float] = field(default_factory=list)  # wall seconds of each step (debug only)
    step_starts: list[float] = field(default_factory=list)  # perf_counter at each step's start (debug only)

    def elapsed(self, now: float | None = None) -> float:
        if self.t_first is None:
            return 0.0
        return (now or time.perf_counter()) - self.t_first

    def compute(self, now: float | None = None) -> float:
        return max(0.0, self.elapsed(now) - self.comm - self.wait - self.excluded)

    def vector(self) -> tuple[float, float, float]:
        return self.compute(), self.comm, self.wait

    def block(self, blocked_s: float, keep_events: bool) -> None:
        """A blocking round ended: keep its blocked time until the other ranks' are known."""
        self.unsettled = blocked_s
        self.rounds += 1
        if keep_events:
            self.events.append((self.steps + 1, blocked_s))  # 1-based number of the step it ended

    def settle(self, comm_s: float, excluded_s: float) -> None:
        """Split the last round's blocked time: ``comm_s`` is the round's communication time
        (the last arrival's blocked time); the excess is waiting, less what only waited for
        rank 0's evaluation (``excluded_s``)."""
        if self.unsettled is None:
            return
        blocked, self.unsettled = self.unsettled, None
        comm = min(blocked, max(comm_s, 0.0))
        wait = blocked - comm
        skip = min(wait, max(excluded_s, 0.0))
        self.comm += comm
        self.wait += wait - skip
        self.excluded += skip


class StopNotice:
    """Out-of-band "stop now" from rank 0, for strategies whose ranks may not meet in a
    collective for a long time (local SGD with a large H): each other rank keeps a daemon
    thread blocked in ``TCPStore.wait`` on the job's rendezvous store (its own client
    connection, ``MASTER_ADDR:MASTER_PORT``) and the training loop polls an Event; rank 0
    sets the key. Without a reachable store the notice is simply never raised and ranks
    learn the stop at their next collective round."""

    def __init__(self, rank: int, timeout_s: float):
        import datetime
        import os

        self.rank, self.event = rank, threading.Event()
        self.key = "syncbench/stop/" + os.environ.get("TORCHELASTIC_RUN_ID", "") + "/" + \
            os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = None
        self._closed = False
        try:
            self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        except Exception:  # noqa: BLE001 - no store: stops arrive with the next round
            self.store = None
        self._thread: threading.Thread | None = None
        if self.store is not None and rank != 0:
            self._thread = threading.Thread(target=self._wait, name="syncbench-stop", daemon=True)
            self._thread.start()

    def _wait(self) -> None:
        import datetime

        while not self._closed:
            try:
                self.store.wait([self.key], datetime.timedelta(seconds=1))
                self.event.set()
                return
            except Exception:  # noqa: BLE001 - timeout: wait again
                time.sleep(0.01)

    def send(self) -> None:
        if self.store is not None and not self.event.is_set():
            self.event.set()
            try:
                self.store.set(self.key, "1")
            except Exception:  # noqa: BLE001
                pass

    def is_set(self) -> bool:
        return self.event.is_set()

    def close(self) -> None:
        """Let the waiting thread leave ``TCPStore.wait`` (within its 1 s poll) before the
        interpreter exits: a thread still inside the C++ wait at exit aborts the process."""
        self._closed = True
        if self._thread is not None:
            self._thread.join(timeout=2.5)


# ------------------------------------------------------------------------------------------
# emulation
# ------------------------------------------------------------------------------------------
WARM_STEPS = 9  # unpadded steps whose median compute fixes the straggler emulation's base step


class Emulation:
    """Pads real compute and communication (sleeping, or busy for stragglers) so that a small
    machine can show what a slow worker or a slow network does, with the sim backend's cost
    model.

    * compute: a step of a worker with straggler factor f (drawn per step from the config's
      straggler model, seeded exactly as in the sim backend) is padded to f x a base step.
      The base step is ``cluster.compute.step_s`` when pinned at or above the worker's measured
      step (a profile from ``syncbench calibrate`` on a straggler config writes the
      compute-only step over the factors' 1st percentile there, so the sim and this emulation
      pad around one base); otherwise it is the measured step over the factor
      distribution's 1st percentile (``StragglerModel.low_factor``), so that even fast steps
      (f < 1) can be padded to exactly f x base: the mean factor is 1, as in the sim (padding
      only slow steps made it E[max(f, 1)] = 1.12 at sigma 0.3). The measured step is the median
      of the first ``WARM_STEPS`` steps (unpadded), then fixed: a step measured after padding,
      or with a peer's wait inside backward, runs slower, and a base that followed the
      measurements grew with the padding (2-4x the real step in a 3-s run instead of 2.1x). A
      sync step's measurement includes the gradient all-reduce's work inside backward (1.6x the
      compute-only step for the digits MLP on 2 cores), which is why a pinned base comes first.
      The padding (``straggle``: busy when the worker owns its cores) is placed between forward
      and backward, before any gradient leaves the worker.
    * network: after a collective, every rank sleeps the alpha-beta model time less the real
      communication time (the last arrival's blocked time), so the emulated transfer starts
      after the last arrival, as the sim charges it; a real network slower than the model is
      never sped up. Parameter-server transfers queue on one emulated link
      (``syncbench.experiments.procs.server.ServerLink``).
    """

    def __init__(self, config: RunConfig, rank: int, world: int, stragglers: bool, network: bool,
                 hold_core: bool = False):
        self.stragglers_on = stragglers and config.cluster.stragglers.kind != "none"
        self.hold_core = hold_core
        self.network_on = network
        self.net = config.cluster.network
        self.model = StragglerModel(config.cluster.stragglers, world, config.seed)
        self.pinned_step_s = config.cluster.compute.step_s
        self.rank = rank
        self.warm: list[float] = []  # the first WARM_STEPS measured computes (no padding yet)
        self.measured_s: float | None = None  # their median, fixed once they are in
        self.overruns = 0  # steps whose real compute already exceeded f x base

    def record_compute(self, seconds: float) -> None:
        if seconds > 0 and self.measured_s is None:
            self.warm.append(seconds)
            if len(self.warm) == WARM_STEPS:
                self.measured_s = statistics.median(self.warm)

    def base_step_s(self) -> float | None:
        """A pinned ``cluster.compute.step_s`` that this worker's measured step can reach, else
        the measured step over the lowest factor, so that f x base can be reached by padding."""
        if self.measured_s is None:
            return None
        if self.pinned_step_s is not None and self.pinned_step_s >= self.measured_s:
            return self.pinned_step_s
        return self.measured_s / self.model.low_factor()  # low_factor <= 1: above any unreachable pin

    def compute_pad_s(self) -> float:
        """Seconds to sleep in this step: f x base less the measured compute."""
        if not self.stragglers_on:
            return 0.0
        factor = self.model.factor(self.rank)  # drawn every step, the warm-up's too, as in the sim
        base = self.base_step_s()
        if base is None:  # the warm-up steps run unpadded
            return 0.0
        assert self.measured_s is not None  # base_step_s has one only once measured_s is set
        pad = factor * base - self.measured_s
        if pad < 0:
            self.overruns += 1
        return max(0.0, pad)

    def straggle(self, seconds: float) -> None:
        """A straggler's extra compute time. When the worker owns its core(s) it keeps them busy,
        as a slow worker computing would: a thread that sleeps comes back to a cold core, and on
        this 2-core machine the step after a 1 ms sleep ran 3x slower (650 vs 200 us for the
        digits MLP), so sleeping made emulated stragglers slower than their factor. Workers
        sharing cores sleep instead, leaving the cores to the others. Either way the GIL is let
        go (rank 0's parameter-server thread keeps serving)."""
        if not self.hold_core:
            time.sleep(seconds)
            return
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            time.sleep(0)

    def network_pad_s(self, model_s: float, real_comm_s: float) -> float:
        if not self.network_on:
            return 0.0
        return max(0.0, model_s - real_comm_s)


# ------------------------------------------------------------------------------------------
# the exchange vector
# ------------------------------------------------------------------------------------------
F_STOP, F_DIVERGED, F_EVAL_S, F_LOSS_SUM, F_LOSS_N, F_STEPS, F_EVAL_NOW = range(7)
N_FIXED = 7


class Exchange:
    """A float64 vector summed over the ranks at every collective round (one small
    all-reduce on the gloo ``ctrl`` group, launched together with the round's data):
    rank 0's stop decision and evaluation time, every rank's divergence flag, training-loss
    sums and step count, and per-rank slots for the previous round's blocked time and the
    cumulative compute / comm / wait seconds."""

    def __init__(self, comm: Comm):
        self.comm = comm
        self.size = N_FIXED + 4 * comm.world

    def slot(self, kind: int, rank: int) -> int:
        return N_FIXED + kind * self.comm.world + rank

    def build(self, worker: "WorkerState") -> torch.Tensor:
        c, n = self.comm, self.comm.world
        values = [0.0] * self.size
        if c.rank == 0:
            values[F_STOP] = 1.0 if (worker.stop_outcome or worker.stop_pending) else 0.0
            values[F_EVAL_S] = worker.take_eval_s()
            monitor = worker.monitor
            due = monitor is not None and worker.stop_outcome is None and (monitor.due() or worker.diverged_locally)
            values[F_EVAL_NOW] = 1.0 if due else 0.0
        values[F_DIVERGED] = 1.0 if worker.take_diverged() else 0.0
        values[F_LOSS_SUM], values[F_LOSS_N] = worker.take_losses()
        led = worker.ledger
        values[F_STEPS] = float(led.steps)
        compute, comm_s, wait = led.vector()
        base = N_FIXED + c.rank
        values[base] = led.unsettled or 0.0
        values[base + n] = compute
        values[base + 2 * n] = comm_s
        values[base + 3 * n] = wait
        return torch.tensor(values, dtype=torch.float64)

    def launch(self, v: torch.Tensor):
        if self.comm.world == 1:
            return None
        return dist.all_reduce(v, group=self.comm.ctrl, async_op=True)

    def absorb(self, worker: "WorkerState", v: torch.Tensor) -> bool:
        """Apply a reduced vector; returns whether rank 0 asked everyone to stop.

        Call it after the round's wait and before ``ledger.block`` of this round: the vector
        carries every rank's blocked time of the previous round, which is settled here."""
        n = self.comm.world
        values = v.tolist()
        led = worker.ledger
        if led.unsettled is not None:
            excluded = worker.prev_eval_s if self.comm.rank != 0 else 0.0
            worker.last_round_comm_s = min(values[N_FIXED : N_FIXED + n])
            led.settle(worker.last_round_comm_s, excluded)
        worker.eval_now = values[F_EVAL_NOW] > 0
        worker.prev_eval_s = values[F_EVAL_S]
        if values[F_DIVERGED] > 0:
            worker.peer_diverged = True
        worker.add_round_losses(values[F_LOSS_SUM], int(values[F_LOSS_N]))
        worker.total_steps = int(values[F_STEPS])
        if self.comm.rank == 0:  # only rank 0 reports the ranks' ledgers
            worker.peer_ledgers = [(values[N_FIXED + n + r], values[N_FIXED + 2 * n + r], values[N_FIXED + 3 * n + r])
                                   for r in range(n)]
        return values[F_STOP] > 0


# ------------------------------------------------------------------------------------------
# rank 0: the training clock, evaluation and the stop decision
# ------------------------------------------------------------------------------------------
class TTAMonitor:
    """The training clock of DESIGN.md on rank 0: wall seconds since the first training
    step, evaluation (and its recording) excluded. The global model is evaluated at the first
    step boundary at or after each multiple of ``eval.every_s`` at which the strategy can
    produce it (and once the clock passes the budget); the TTA rules are the run loop's
    ``TTATracker``, the same in both backends."""

    def __init__(self, config: RunConfig, eval_module: LightningModuleLike, val_batches: list[Any],
                 on_eval: Callable[[Evaluation], None] | None = None):
        self.config = config
        self.eval_module = eval_module
        self.val_batches = val_batches
        self.on_eval = on_eval
        self.t0: float | None = None
        self.eval_total = 0.0
        self.next_eval = config.eval.every_s
        self.tracker = TTATracker(config)
        self.result = self.tracker.result  # syncbench.experiments.run_loop.LoopResult

    def start(self, now: float) -> None:
        if self.t0 is None:
            self.t0 = now

    def clock(self, now: float | None = None) -> float:
        if self.t0 is None:
            return 0.0
        return (now or time.perf_counter()) - self.t0 - self.eval_total

    def due(self) -> bool:
        c = self.clock()
        return c >= self.next_eval or c >= self.config.budget.train_time_s

    def evaluate(self, load: Callable[[LightningModuleLike], None], counters: dict[str, float],
                 diverged: bool = False) -> tuple[str | None, float]:
        """Evaluate the global model (``load`` copies it into the evaluation module);
        returns (outcome or None, seconds spent, to be excluded from the clock)."""
        t_start = time.perf_counter()
        clock = self.clock(t_start)
        load(self.eval_module)
        metrics = evaluate(self.eval_module, self.val_batches)
        metrics.update(counters)
        metrics["clock_s"] = clock
        updates = int(counters.get("updates", 0))
        samples = int(counters.get("samples", 0))
        metrics.pop("updates", None)
        ev = Evaluation(clock, updates, samples, metrics)
        outcome = self.tracker.observe(ev, diverged=diverged)
        every = self.config.eval.every_s
        self.next_eval = (math.floor(clock / every) + 1) * every
        if self.on_eval:
            self.on_eval(ev)
        spent = time.perf_counter() - t_start
        self.eval_total += spent
        return outcome, spent


# ------------------------------------------------------------------------------------------
# per-process state shared by the strategy and the run
# ------------------------------------------------------------------------------------------
class WorkerState:
    """One worker process's view of the run: its ledger, emulation, loss buffer, the
    monitor (rank 0 only) and the stop decision."""

    def __init__(self, config: RunConfig, comm: Comm, emulation: Emulation, monitor: TTAMonitor | None,
                 debug: bool = False):
        self.config, self.comm, self.emulation, self.monitor, self.debug = config, comm, emulation, monitor, debug
        self.ledger = RankLedger()
        self.batch_size = config.batch_size
        self.stop_outcome: str | None = None  # rank 0: the decided outcome
        self.stop_pending = False  # rank 0: stop at the next round, outcome decided after it
        self.stopped = False  # this rank has been told to stop
        self.peer_diverged = False
        self.prev_eval_s = 0.0
        self.last_round_comm_s = 0.0  # communication time of the last settled round
        self.eval_now = False  # rank 0 evaluates right after this round; every rank pauses
        self.total_steps = 0
        self.peer_ledgers: list[tuple[float, float, float]] = []
        self.comm_bytes = 0.0
        self._losses: list[float] = []
        self._round_loss_sum = 0.0
        self._round_loss_n = 0
        self._diverged = False
        self._eval_s = 0.0
        self.lock = threading.RLock()

    # losses --------------------------------------------------------------------------------
    def record_loss(self, value: float) -> None:
        self._losses.append(value)
        if not is_finite(value):
            self._diverged = True

    def take_losses(self) -> tuple[float, int]:
        losses, self._losses = self._losses, []
        finite = [v for v in losses if is_finite(v)]
        return float(sum(finite)), len(finite)

    def add_round_losses(self, total: float, n: int) -> None:
        self._round_loss_sum += total
        self._round_loss_n += n

    def take_train_loss(self) -> float | None:
        if self._round_loss_n == 0:
            return None
        value = self._round_loss_sum / self._round_loss_n
        self._round_loss_sum, self._round_loss_n = 0.0, 0
        return value

    def take_diverged(self) -> bool:
        value, self._diverged = self._diverged, False
        return value

    @property
    def diverged_locally(self) -> bool:
        return self._diverged

    # rank 0's evaluation time ----------------------------------------------------------------
    def add_eval_s(self, seconds: float) -> None:
        self._eval_s += seconds
        self.ledger.excluded += seconds

    def take_eval_s(self) -> float:
        value, self._eval_s = self._eval_s, 0.0
        return value

    # ledger views -------------------------------------------------------------------------------
    def ledgers_now(self) -> list[tuple[float, float, float]]:
        """Latest known (compute, comm, wait) of every rank, this rank's own being current."""
        rows = list(self.peer_ledgers) if len(self.peer_ledgers) == self.comm.world else [
            (0.0, 0.0, 0.0)] * self.comm.world
        rows[self.comm.rank] = self.ledger.vector()
        return rows

    def ledger_metrics(self) -> dict[str, float]:
        rows = self.ledgers_now()
        out: dict[str, float] = {}
        for i, name in enumerate(("compute", "comm", "wait")):
            values = [r[i] for r in rows]
            out[f"time_{name}_s"] = float(sum(values) / len(values))
            out[f"time_{name}_max_s"] = float(max(values))
        return out


# ------------------------------------------------------------------------------------------
# the Lightning face: one strategy that runs any registered strategy's worker program
# ------------------------------------------------------------------------------------------
@dataclass
class _Overlapped:
    """A ``StartReduce`` in flight: its buffer (the payload, the exchange vector packed after it
    when the dtypes allow), the work handles, and the MAX of the ranks' start times (emulation)."""

    payload: torch.Tensor
    flags: torch.Tensor
    nbytes: int
    buf: torch.Tensor = field(init=False)  # what is all-reduced: the payload, or payload + flags
    works: list[Any] = field(default_factory=list)
    started: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.buf = self.payload


class DistWorker:
    """The ``syncbench.strategies.program.Worker`` a program sees in a real process."""

    def __init__(self, face: "ProgramStrategy", optimizer: torch.optim.Optimizer):
        comm = face.worker.comm
        self.rank, self.world, self.batch_size = comm.rank, comm.world, face.worker.batch_size
        self.module = face.module
        self.optimizer = optimizer
        self._face = face

    def stop_requested(self) -> bool:
        return self._face.stop_requested()

    def expected_step_factors(self) -> list[float]:
        emulation = self._face.worker.emulation  # the factors this backend pads steps to, if it does
        return [emulation.model.expected_factor(r) if emulation.stragglers_on else 1.0 for r in range(self.world)]


class ProgramStrategy:
    """The Lightning ``Strategy`` of a worker, for either Lightning package: combined with that
    package's ``Strategy`` base by ``program_strategy_class``. Lightning sees a single process (rank 0 of 1); we run the strategy's worker program
    over our own process groups (see the module docstring).

    Control rides with the program's own communication: strategies that reduce (sync, local
    SGD) carry the exchange vector in each collective; strategies with a parameter server
    carry it in the push and pull headers, and rank 0 evaluates the server's model."""

    strategy_name = "syncbench"

    def __init__(self, worker: WorkerState, strategy: StrategyDef, lr_factor: float = 1.0):
        super().__init__()
        self.worker, self.definition, self.lr_factor = worker, strategy, lr_factor
        self._root_device = worker.comm.device
        self.global_rank = 0
        self.local_rank = 0
        self.node_rank = 0
        self.world_size = 1
        self.num_nodes = 1
        self._step_begin = 0.0
        self._step_excluded = 0.0  # blocked / padding / evaluation seconds inside the current step
        self.program: WorkerProgram | None = None
        self.server: Any = None  # syncbench.experiments.procs.server.ServerThread on rank 0
        self.pulled = 0
        self._round_done = False
        self._stop_flag = False
        self._flags: torch.Tensor | None = None
        self._flags_work: Any = None
        self._armed = False
        self.rounds = 0
        self._reductions: dict[int, _Overlapped] = {}  # StartReduce handles in flight
        self._handles = 0

    # Lightning's seven abstract members: a single process ----------------------------------------
    @property
    def root_device(self) -> torch.device:
        return self._root_device

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @property
    def is_global_zero(self) -> bool:
        return True

    def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False) -> torch.Tensor:
        return tensor

    @property
    def module(self) -> LightningModuleLike:
        assert self.lightning_module is not None
        return self.lightning_module

    # set-up --------------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        self._broadcast_initial_state()
        comm = self.worker.comm
        optimizers = self.lightning_module.trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"{type(self.module).__name__}.configure_optimizers must return exactly one optimizer "
                             f"(got {len(optimizers)})")
        # the program's optimizer step is ours (as in the sim backend): on_before_optimizer_step,
        # clipping, the step, then the schedulers bound to this optimizer; Lightning steps none of them
        trainer = self.lightning_module.trainer
        configs, self.lr_scheduler_configs = list(self.lr_scheduler_configs), []
        clip = self.worker.config.trainer
        steps_per_epoch = trainer.num_training_batches
        self.latest_metrics: dict[str, float] = {}  # rank 0's latest evaluation (ReduceLROnPlateau)
        optimizer = ModuleOptimizer(self.module, optimizers[0], configs, steps_per_epoch=steps_per_epoch,
                                    gradient_clip_val=clip.gradient_clip_val,
                                    gradient_clip_algorithm=clip.gradient_clip_algorithm,
                                    metrics=self._plateau_metrics)
        self.plateau_monitors = sorted({c.monitor for c in configs if c.reduce_on_plateau})
        scale_lr_(optimizer, self.lr_factor)
        self.program = self.definition.program(DistWorker(self, optimizer))
        self.exchange = Exchange(comm)
        # the exchange vector and the float buffers (BatchNorm statistics, final once forward
        # has run) ride in the last gradient bucket: no extra round trip per step
        self.n_buffer = sum(b.numel() for b in float_buffers(self.module))
        self.buckets = GradBuckets(self.module, comm.main, comm.world, extra=self.exchange.size + self.n_buffer) \
            if comm.world > 1 else None
        if self.buckets is not None:
            self.buckets.active = False
        self.n_state = state_numel(self.module)
        self.dtype = flat_state(self.module).dtype
        self.state_bytes = self.n_state * torch.tensor([], dtype=self.dtype).element_size()
        self.notice: StopNotice | None = None  # created by the first stop_requested (local SGD)
        if comm.rank == 0:
            import copy
            import sys

            from syncbench.experiments.procs.server import ServerThread

            monitor = self.worker.monitor
            server_module = monitor.eval_module if monitor is not None else copy.deepcopy(self.module).cpu()
            load_flat_state_(server_module, flat_state(self.module).cpu())
            # one epoch of the server = one pass over the training data: every worker's shard
            epoch = comm.world * steps_per_epoch
            TrainerStandIn(server_module, num_training_batches=epoch, gradient_clip_val=clip.gradient_clip_val,
                           gradient_clip_algorithm=clip.gradient_clip_algorithm).attach()
            server_optimizer = build_module_optimizer(
                server_module, steps_per_epoch=epoch, metrics=self._plateau_metrics, owns_counters=True,
                gradient_clip_val=clip.gradient_clip_val, gradient_clip_algorithm=clip.gradient_clip_algorithm) \
                if self.definition.server_based else None
            server = self.definition.server(server_module, server_optimizer)
            if server is not None:
                scale_lr_(server.optimizer, self.lr_factor)
                # the server thread must get the GIL promptly when a push arrives while this
                # thread runs Lightning's Python loop (the default switch interval is 5 ms)
                sys.setswitchinterval(min(sys.getswitchinterval(), 2e-4))
                self.server = ServerThread(self.worker, server, self.worker.emulation.network_on)

    def _plateau_metrics(self) -> dict[str, float]:
        """The latest evaluation of the global model: rank 0's own; the other ranks', as rank 0
        sent it with the evaluation pause."""
        monitor = self.worker.monitor
        if monitor is not None and monitor.result.evaluations:
            return monitor.result.evaluations[-1].metrics
        return self.latest_metrics

    @torch.no_grad()
    def _broadcast_initial_state(self) -> None:
        """Every replica starts from rank 0's parameters and buffers (also a start barrier)."""
        comm = self.worker.comm
        if comm.world == 1:
            return
        flat = flat_state(self.module).cpu()
        dist.broadcast(flat, src=0, group=comm.ctrl)
        load_flat_state_(self.module, flat.to(comm.device))

    @property
    def uses_server(self) -> bool:
        return self.definition.server_based

    # one step ---------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        now = time.perf_counter()
        led = self.worker.ledger
        if led.t_first is None:
            led.t_first = now
            if self.worker.monitor is not None:
                self.worker.monitor.start(now)
        self._step_begin = now
        self._step_excluded = 0.0
        if self.worker.debug:
            led.step_starts.append(now)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        value = float(closure_loss.detach())
        self.worker.record_loss(value)
        pad = self.worker.emulation.compute_pad_s()
        if pad > 0:  # before any gradient leaves the worker, so that peers really wait
            self.worker.emulation.straggle(pad)
            self.worker.ledger.pad_compute += pad
            self._step_excluded += pad  # the padding is not part of the measured compute step
        if self._armed:
            self._launch_flags()
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        self._round_done = False
        # Lightning's closure (training_step, zero_grad, backward) is the program's Compute; the
        # precision plugin's wrapper (on_before_optimizer_step, clipping) is not used: the
        # program's optimizer step runs them after the gradients are reduced (ModuleOptimizer)
        out = self._run_program(closure)
        self._end_step()
        if self.uses_server:
            if self.server is not None and self.worker.stop_outcome is None:
                self._evaluate_server_if_due()
            return out
        if not self._round_done:
            return out
        if self.worker.eval_now or self.worker.peer_diverged:
            self._pause_for_evaluation()
            if self.worker.stopped:
                return out
        if self._stop_flag:
            if self.worker.stop_pending and self.worker.stop_outcome is None:
                # rank 0 stopped early (budget, divergence): evaluate the state of this last round
                self._maybe_evaluate(self._load_global, self._counters, force=True)
                self.worker.stop_outcome = self.worker.stop_outcome or "budget"
            self._stop_now()
            return out
        return out

    def _pause_for_evaluation(self) -> None:
        """Rank 0 evaluates the global model of the round just ended while every rank waits:
        evaluation pauses the training clock of all ranks, not only rank 0's. One small
        all-reduce ends the pause and carries rank 0's stop decision."""
        worker, comm = self.worker, self.worker.comm
        assert self.program is not None and self.program.at_sync_point(), "evaluation off a sync point"
        t0 = time.perf_counter()
        stop, evaluated_s = 0.0, 0.0
        monitor = worker.monitor
        if monitor is not None and worker.stop_outcome is None:
            diverged = worker.peer_diverged or worker.diverged_locally
            outcome, evaluated_s = monitor.evaluate(self._load_global, self._counters(), diverged=diverged)
            if outcome:
                worker.stop_outcome = outcome
        if comm.rank == 0 and worker.stop_outcome is not None:
            stop = 1.0
        monitors = self.plateau_monitors
        if monitor is not None and monitor.result.evaluations:
            self.latest_metrics = dict(monitor.result.evaluations[-1].metrics)
        if comm.world > 1:
            # rank 0's stop decision, and the monitored metrics every rank's ReduceLROnPlateau reads
            values = [stop] + [0.0] * (2 * len(monitors))
            if comm.rank == 0:
                for i, name in enumerate(monitors):
                    if name in self.latest_metrics:
                        values[1 + 2 * i], values[2 + 2 * i] = 1.0, float(self.latest_metrics[name])
            flag = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(flag, group=comm.ctrl)
            stop = float(flag[0])
            if comm.rank != 0:
                for i, name in enumerate(monitors):
                    if flag[1 + 2 * i] > 0:
                        self.latest_metrics[name] = float(flag[2 + 2 * i])
        spent = time.perf_counter() - t0
        if monitor is not None:  # the monitor has excluded the evaluation itself, not the rest of the pause
            monitor.eval_total += spent - evaluated_s
        worker.ledger.excluded += spent
        self._exclude(spent)
        if stop > 0:
            self._stop_now()

    def _run_program(self, closure: Callable[[], Any]) -> Any:
        program = self.program
        assert program is not None
        self._armed = self.buckets is not None and program.reduces_gradients_next()
        if self.buckets is not None:
            self.buckets.active = self._armed
        gen = program.step()
        value: Any = None
        loss: Any = None
        while True:
            try:
                op = gen.send(value)
            except StopIteration:
                break
            if isinstance(op, Compute):
                loss = closure()
                if loss is None:
                    raise RuntimeError(f"{type(self.module).__name__}.training_step returned no loss; every worker "
                                       "must produce a gradient at every step")
                value = float(loss.detach()) if isinstance(loss, torch.Tensor) else loss
            elif isinstance(op, (ReduceGradients, ReduceState)) and op.codec is not None:
                value = self._reduce_compressed(op)
            elif isinstance(op, ReduceGradients):
                if op.quorum is not None and op.quorum < self.worker.comm.world:
                    raise RuntimeError("a quorum reduction cannot run on the dist backend (config validation "
                                       "should have refused it)")
                value = self._reduce_gradients()
            elif isinstance(op, ReduceState):
                value = self._reduce_state()
            elif isinstance(op, PushPull):
                value = self._push_pull(op)
            elif isinstance(op, StartReduce):
                value = self._start_reduce(op)
            elif isinstance(op, WaitReduce):
                value = self._wait_reduce(op)
            else:
                raise TypeError(f"the dist backend cannot carry out {op!r}")
        self._armed = False
        return loss

    # ReduceGradients / ReduceState: the exchange vector rides along -------------------------------------
    def _launch_flags(self) -> None:
        self._flags = self.exchange.build(self.worker)
        assert self.buckets is not None
        extra = self.buckets.extra_view
        if extra is not None:  # rides in the last gradient bucket, the float buffers after it
            extra[: self.exchange.size].copy_(self._flags)
            offset = self.exchange.size
            for b in float_buffers(self.module):
                extra[offset : offset + b.numel()].copy_(b.detach().reshape(-1))
                offset += b.numel()
            self._flags_work = None
        else:
            self._flags_work = self.exchange.launch(self._flags)

    @torch.no_grad()
    def _reduce_gradients(self) -> None:
        comm, worker = self.worker.comm, self.worker
        payload_bytes = sum(p.numel() * p.element_size() for p in trainable(self.module))
        if comm.world == 1:
            self._flags = self.exchange.build(worker)
            self._finish_round(0.0, 0.0, 0)
            return
        if self._armed and self._flags is not None:
            assert self.buckets is not None
            blocked, _ = self.buckets.finish()
            t0 = time.perf_counter()
            if self._flags_work is not None:
                self._flags_work.wait()
            # BatchNorm statistics averaged in the same round, as in the sim backend
            extra = self.buckets.extra_view
            buffers = float_buffers(self.module)
            if extra is None and buffers:
                flat = torch.cat([b.detach().reshape(-1) for b in buffers])
                dist.all_reduce(flat, group=comm.main)
            elif extra is not None:
                self._flags.copy_(extra[: self.exchange.size])
                flat = extra[self.exchange.size :]
            offset = 0
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b) / comm.world)
                offset += b.numel()
            blocked += time.perf_counter() - t0
            for p in self.buckets.params:
                if p.grad is not None:
                    p.grad.div_(comm.world)
        else:  # not announced in advance: one flat reduction after backward
            payload = gradient_payload(self.module)
            blocked = self._all_reduce_with_flags(payload)
            load_gradient_payload_(self.module, payload.div_(comm.world))
        model_s = ring_allreduce_s(comm.world, payload_bytes, worker.config.cluster.network)
        self._finish_round(blocked, model_s, ring_allreduce_bytes(comm.world, payload_bytes))

    @torch.no_grad()
    def _reduce_state(self) -> None:
        comm = self.worker.comm
        flat = flat_state(self.module)
        if self.worker.debug:
            self.last_pre = flat.detach().cpu().clone()
        blocked = self._all_reduce_with_flags(flat) if comm.world > 1 else 0.0
        if comm.world == 1:
            self._flags = self.exchange.build(self.worker)
        load_flat_state_(self.module, flat.div_(comm.world))
        if self.worker.debug:
            self.last_post = flat_state(self.module).detach().cpu().clone()
        self.rounds += 1
        model_s = ring_allreduce_s(comm.world, self.state_bytes, self.worker.config.cluster.network)
        self._finish_round(blocked, model_s, ring_allreduce_bytes(comm.world, self.state_bytes))

    @torch.no_grad()
    def _reduce_compressed(self, op: ReduceGradients | ReduceState) -> None:
        """A ReduceGradients / ReduceState with a codec: the whole payload after backward (no
        bucket overlap), the codec's collectives on the main group, the exchange vector on
        the control group alongside."""
        from syncbench.experiments.procs.compressed import run_exchange
        from syncbench.strategies import compression

        comm, worker = self.worker.comm, self.worker
        payload = compression.op_payload(op, self.module)
        self._flags = self.exchange.build(worker)
        flags_work = self.exchange.launch(self._flags)
        mean, blocked, collectives = run_exchange(compression.payload_exchange(op.codec, payload, comm.world),
                                                  comm.main, comm.world)
        if flags_work is not None:
            t0 = time.perf_counter()
            flags_work.wait()
            blocked += time.perf_counter() - t0
        compression.load_op_result_(op, self.module, mean)
        if isinstance(op, ReduceState):
            self.rounds += 1
        model_s = exchange_model_s(collectives, comm.world, worker.config.cluster.network)
        self._finish_round(blocked if comm.world > 1 else 0.0, model_s, compression.wire_bytes(collectives, comm.world))

    def _all_reduce_with_flags(self, flat: torch.Tensor) -> float:
        """All-reduce ``flat`` (summed, in place) with the exchange vector riding along; returns
        the seconds blocked."""
        comm = self.worker.comm
        self._flags = self.exchange.build(self.worker)
        packed = flat.dtype in (torch.float32, torch.float64)
        buf = torch.cat([flat, self._flags.to(flat.dtype)]) if packed else flat
        t0 = time.perf_counter()
        flags_work = None if packed else self.exchange.launch(self._flags)
        work = dist.all_reduce(buf, group=comm.main, async_op=True)
        if flags_work is not None:
            flags_work.wait()
        work.wait()
        blocked = time.perf_counter() - t0
        if packed:
            self._flags.copy_(buf[-self.exchange.size :])
            flat.copy_(buf[: -self.exchange.size])
        return blocked

    def _finish_round(self, blocked: float, model_s: float, nbytes: int, pad_s: float | None = None) -> None:
        worker = self.worker
        assert self._flags is not None
        self._stop_flag = self.exchange.absorb(worker, self._flags)
        # the emulated network is charged after the last arrival: every rank leaves the
        # collective together and pads by the same amount, the model time less the real
        # communication of the last settled round (the last arrival's blocked time)
        if pad_s is not None:  # an overlapped reduction computed its own (``_wait_reduce``)
            pad = pad_s
        else:
            pad = worker.emulation.network_pad_s(model_s, worker.last_round_comm_s) if worker.comm.world > 1 else 0.0
        if pad > 0:
            time.sleep(pad)
            worker.ledger.comm += pad
            worker.ledger.pad_comm += pad
        self._exclude(blocked + pad)
        worker.ledger.block(blocked, worker.debug)
        worker.comm_bytes += nbytes
        self._round_done = True
        self._flags = None

    # StartReduce / WaitReduce: an all-reduce in flight while the worker computes -----------------------------
    @torch.no_grad()
    def _start_reduce(self, op: StartReduce) -> int:
        """Launch the reduction of ``op.payload`` (the exchange vector packed with it) and return at
        once. With network emulation on, a MAX all-reduce of the ranks' start times finds the last
        start, from which the emulated transfer is timed, as the sim backend times it."""
        comm, worker = self.worker.comm, self.worker
        handle, self._handles = self._handles, self._handles + 1
        flags = self.exchange.build(worker)
        payload = op.payload.to(comm.device)
        pending = _Overlapped(payload, flags, payload.numel() * payload.element_size())
        self._reductions[handle] = pending
        if comm.world == 1:
            return handle
        packed = payload.dtype in (torch.float32, torch.float64)
        if packed:
            pending.buf = torch.cat([payload, flags.to(payload.dtype)])
        pending.works.append(dist.all_reduce(pending.buf, group=comm.main, async_op=True))
        if not packed:
            pending.works.append(self.exchange.launch(flags))
        if worker.emulation.network_on:
            pending.started = torch.tensor([time.time()], dtype=torch.float64)
            pending.works.append(dist.all_reduce(pending.started, op=dist.ReduceOp.MAX, group=comm.ctrl,
                                                 async_op=True))
        return handle

    @torch.no_grad()
    def _wait_reduce(self, op: WaitReduce) -> torch.Tensor:
        """Block until the reduction has arrived; the emulated network pads up to the last start
        plus the alpha-beta time of the payload, never below the real transfer. Returns the mean."""
        comm, worker = self.worker.comm, self.worker
        pending = self._reductions.pop(op.handle)
        t0 = time.perf_counter()
        for work in pending.works:
            work.wait()
        blocked = time.perf_counter() - t0
        n = pending.payload.numel()
        if pending.buf is not pending.payload:
            pending.flags.copy_(pending.buf[n:])
        self._flags = pending.flags
        result = pending.buf[:n].div_(comm.world)
        model_s = ring_allreduce_s(comm.world, pending.nbytes, worker.config.cluster.network)
        pad = 0.0
        if pending.started is not None:
            pad = max(0.0, float(pending.started[0]) + model_s - time.time())
        self.rounds += 1
        self._finish_round(blocked, model_s, ring_allreduce_bytes(comm.world, pending.nbytes), pad_s=pad)
        return result

    # PushPull ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _push_pull(self, op: PushPull) -> bool:
        payload = op.payload if op.payload is not None else gradient_payload(self.module)
        if self.server is not None:
            return self._push_pull_local(payload)
        return self._push_pull_remote(payload)

    def _push_pull_remote(self, payload: torch.Tensor) -> bool:
        from syncbench.experiments.procs.server import R_APPLIED, R_QUEUE, R_STOP, R_VERSION, push_pull_remote

        worker = self.worker
        reply, state, blocked = push_pull_remote(worker, payload, self.pulled, self.n_state, self.dtype)
        load_flat_state_(self.module, state.to(worker.comm.device))
        self.pulled = int(reply[R_VERSION])
        queued = min(float(reply[R_QUEUE]), blocked)
        led = worker.ledger
        led.wait += queued
        led.comm += blocked - queued
        led.rounds += 1
        if worker.debug:
            led.events.append((led.steps + 1, blocked))
        self._exclude(blocked)
        if reply[R_STOP] > 0:
            self._stop_now()
        return bool(reply[R_APPLIED] > 0)

    def _push_pull_local(self, payload: torch.Tensor) -> bool:
        from syncbench.experiments.procs.server import sleep_until

        server, worker = self.server, self.worker
        loss_sum, loss_n = worker.take_losses()
        diverged = worker.take_diverged()
        t0 = time.perf_counter()
        with server.cond:
            server.raise_if_failed()
            server.loss_sum += loss_sum
            server.loss_n += loss_n
            if diverged:
                server.diverged = True
            queued, pushed, pulled = server.link.round_trip(t0)
        sleep_until(pushed)
        with server.cond:
            applied = server.apply(0, self.pulled, payload)
            state = flat_state(server.server.module).to(self.worker.comm.device, copy=True)
            version = server.server.version
            worker.comm_bytes += server.state_bytes  # rank 0's pull, as ``ServerThread._reply`` counts the others'
            server.cond.notify_all()
        sleep_until(pulled)
        load_flat_state_(self.module, state)
        self.pulled = version
        blocked = time.perf_counter() - t0
        worker.ledger.wait += min(queued, blocked)
        worker.ledger.comm += blocked - min(queued, blocked)
        self._exclude(blocked)
        if server.diverged and worker.stop_outcome is None:
            self._evaluate_server_if_due(force=True)
        if worker.stop_outcome is not None:
            server.stop()
            self._stop_now()
        return applied

    def _evaluate_server_if_due(self, force: bool = False) -> None:
        server = self.server
        assert server is not None
        with server.cond:  # the server applies nothing while rank 0 evaluates: the clock is paused
            if server.diverged:
                self.worker.peer_diverged = True
            outcome = self._maybe_evaluate(self._load_global, self._counters, force=force)
            if outcome is not None:
                server.stop()
                self._stop_now()

    # stopping ---------------------------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        """Synchronise now rather than at the program's next round: rank 0 has decided to stop
        (or its clock passed the budget / its loss diverged), or rank 0 said so out of band."""
        worker = self.worker
        if self.notice is None and worker.comm.world > 1:
            self.notice = StopNotice(worker.comm.rank, worker.comm.timeout_s)
        if worker.comm.rank != 0:
            return self.notice is not None and self.notice.is_set()
        if worker.stop_outcome is not None or worker.stop_pending:
            return True
        monitor = worker.monitor
        if monitor is not None and (monitor.clock() >= worker.config.budget.train_time_s
                                    or worker.diverged_locally):
            worker.stop_pending = True
            if self.notice is not None:
                self.notice.send()
            return True
        return False

    def _exclude(self, seconds: float) -> None:
        """Seconds inside the current step that are not measured compute (blocking, padding,
        evaluation): what the straggler padding's measurement leaves out."""
        self._step_excluded += seconds

    def _end_step(self) -> None:
        now = time.perf_counter()
        self.worker.ledger.steps += 1
        wall = now - self._step_begin
        self.worker.emulation.record_compute(wall - self._step_excluded)
        if self.worker.debug:
            self.worker.ledger.step_times.append(wall)

    def _stop_now(self) -> None:
        self.worker.stopped = True
        if self.lightning_module is not None and self.lightning_module._trainer is not None:
            self.lightning_module.trainer.should_stop = True

    # rank 0: evaluation ------------------------------------------------------------------------------------
    def _programs(self) -> list[WorkerProgram]:
        assert self.program is not None
        return [self.program] * self.worker.comm.world

    def _server_state(self) -> Any:
        return self.server.server if self.server is not None else None

    def _load_global(self, target: torch.nn.Module) -> None:
        self.definition.load_global(target, self._programs(), self._server_state())

    def _counters(self) -> dict[str, float]:
        worker = self.worker
        if self.server is not None:
            loss_sum, loss_n = self.server.take_train_loss()
            worker.add_round_losses(loss_sum, loss_n)
            worker.peer_ledgers = [self.server.ledgers.get(r, (0.0, 0.0, 0.0)) for r in range(worker.comm.world)]
        updates, samples = self.definition.counters(self._programs(), self._server_state())
        counters: dict[str, float] = {"updates": float(updates), "samples": float(samples)}
        counters.update(worker.ledger_metrics())
        counters["comm_bytes"] = float(worker.comm_bytes)
        loss = worker.take_train_loss()
        if loss is not None:
            counters["train_loss"] = loss
        counters.update(self.definition.curve_metrics(self._programs(), self._server_state()))
        return counters

    def _maybe_evaluate(self, load: Callable[[LightningModuleLike], None], counters: Callable[[], dict[str, float]],
                        force: bool = False) -> str | None:
        """On rank 0, evaluate when due (or forced by divergence); returns the outcome once decided."""
        worker, monitor = self.worker, self.worker.monitor
        if monitor is None or worker.stop_outcome is not None:
            return worker.stop_outcome
        diverged = worker.peer_diverged or worker.diverged_locally
        if not (force or diverged or monitor.due()):
            return None
        outcome, spent = monitor.evaluate(load, counters(), diverged=diverged)
        worker.add_eval_s(spent)
        self._exclude(spent)
        if outcome:
            worker.stop_outcome = outcome
        return outcome

    # end of run -----------------------------------------------------------------------------------------
    def summary_metrics(self) -> dict[str, float]:
        if self.program is None:
            return {}
        return self.definition.summary_metrics(self._programs(), self._server_state())

    def artifacts(self) -> dict[str, str]:
        if self.program is None or (self.definition.server_based and self.server is None):
            return {}
        return self.definition.artifacts(self._programs(), self._server_state())

    def shutdown(self) -> None:
        """After ``trainer.fit`` returned: stop the server thread and the stop notice."""
        if self.server is not None:
            self.server.stop()
            self.server.join()
        if getattr(self, "notice", None) is not None:
            self.notice.close()

    def debug_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"final": flat_state(self.module).cpu(), "pulled": self.pulled, "rounds": self.rounds,
                                 "last_pre": getattr(self, "last_pre", None), "last_post": getattr(self, "last_post", None)}
        if self.program is not None:
            state["lr"] = float(self.program.worker.optimizer.param_groups[0]["lr"])
        if self.server is not None:
            state["server"] = flat_state(self.server.server.module).cpu()
            state["version"] = self.server.server.version
            state["staleness"] = dict(getattr(self.server.server, "staleness", {}))
        return state


@functools.cache
def program_strategy_class(flavour: Any) -> type:
    """``ProgramStrategy`` on ``flavour.strategies.Strategy``: a module written against
    ``lightning.pytorch`` is trained by that package's Trainer and needs its Strategy class
    (the two packages' class hierarchies are separate; strategies/lightning_flavour.py)."""
    return type("ProgramStrategy", (ProgramStrategy, flavour.strategies.Strategy), {"__module__": __name__})
