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

import collections
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import Strategy

from experiments.config import RunConfig
from experiments.lightning_bridge import evaluate, is_finite
from experiments.run_loop import Evaluation, TTATracker
from strategies.cluster import StragglerModel


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
        if self.store is not None and rank != 0:
            threading.Thread(target=self._wait, name="syncbench-stop", daemon=True).start()

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
        self._closed = True


# ------------------------------------------------------------------------------------------
# emulation
# ------------------------------------------------------------------------------------------
class Emulation:
    """Pads real compute and communication with sleeps so that a small machine can show
    what a slow worker or a slow network does.

    * compute: a step of a worker with straggler factor f sleeps (f - 1) x the median of its
      recent measured compute steps (the factor is drawn per step from the config's
      straggler model, seeded exactly as in the sim backend). The sleep is placed between
      forward and backward, before any gradient leaves the worker, so that peers really wait.
    * network: a transfer whose alpha-beta model time (``ring_allreduce_s`` /
      ``point_to_point_s`` of the config's network) exceeds the measured time sleeps the
      difference; a real network slower than the model is never sped up.
    """

    def __init__(self, config: RunConfig, rank: int, world: int, stragglers: bool, network: bool):
        self.stragglers_on = stragglers and config.cluster.stragglers.kind != "none"
        self.network_on = network
        self.net = config.cluster.network
        self.model = StragglerModel(config.cluster.stragglers, world, config.seed)
        self.rank = rank
        self.recent: collections.deque[float] = collections.deque(maxlen=9)

    def record_compute(self, seconds: float) -> None:
        if seconds > 0:
            self.recent.append(seconds)

    def compute_pad_s(self) -> float:
        if not self.stragglers_on:
            return 0.0
        factor = self.model.factor(self.rank)
        if factor <= 1.0 or not self.recent:
            return 0.0
        return (factor - 1.0) * statistics.median(self.recent)

    def network_pad_s(self, model_s: float, measured_s: float) -> float:
        if not self.network_on:
            return 0.0
        return max(0.0, model_s - measured_s)


# ------------------------------------------------------------------------------------------
# the exchange vector
# ------------------------------------------------------------------------------------------
F_STOP, F_DIVERGED, F_EVAL_S, F_LOSS_SUM, F_LOSS_N, F_STEPS = range(6)
N_FIXED = 6


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
            led.settle(min(values[N_FIXED : N_FIXED + n]), excluded)
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

    def __init__(self, config: RunConfig, eval_module: pl.LightningModule, val_batches: list[Any],
                 on_eval: Callable[[Evaluation], None] | None = None):
        self.config = config
        self.eval_module = eval_module
        self.val_batches = val_batches
        self.on_eval = on_eval
        self.t0: float | None = None
        self.eval_total = 0.0
        self.next_eval = config.eval.every_s
        self.tracker = TTATracker(config)
        self.result = self.tracker.result  # experiments.run_loop.LoopResult

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

    def evaluate(self, load: Callable[[pl.LightningModule], None], counters: dict[str, float],
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
# the Lightning face
# ------------------------------------------------------------------------------------------
class WorkerStrategy(Strategy):
    """Base Lightning strategy: rank 0 of 1 for Lightning, real ranks for us.

    Subclasses implement ``_setup_comm`` (after the initial broadcast), ``_after_backward``
    and ``_step`` (the optimizer step and any communication round), and call
    ``_end_step``."""

    strategy_name = "syncbench"

    def __init__(self, worker: WorkerState):
        super().__init__()
        self.worker = worker
        self._root_device = worker.comm.device
        self.global_rank = 0
        self.local_rank = 0
        self.node_rank = 0
        self.world_size = 1
        self.num_nodes = 1
        self._step_begin = 0.0
        self._step_excluded = 0.0  # blocked / padding / evaluation seconds inside the current step
        self._last_loss: float | None = None

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

    # our own communication ------------------------------------------------------------------------
    @property
    def module(self) -> pl.LightningModule:
        assert self.lightning_module is not None
        return self.lightning_module

    def on_train_start(self) -> None:
        super().on_train_start()
        self._broadcast_initial_state()
        self._setup_comm()

    @torch.no_grad()
    def _broadcast_initial_state(self) -> None:
        """Every replica starts from rank 0's parameters and buffers (also a start barrier)."""
        comm = self.worker.comm
        if comm.world == 1:
            return
        from strategies.lightning.tensors import flat_state, load_flat_state_

        flat = flat_state(self.module).cpu()
        dist.broadcast(flat, src=0, group=comm.ctrl)
        load_flat_state_(self.module, flat.to(comm.device))

    def _setup_comm(self) -> None:
        pass

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
        self._last_loss = value
        self.worker.record_loss(value)
        pad = self.worker.emulation.compute_pad_s()
        if pad > 0:
            time.sleep(pad)
            self.worker.ledger.pad_compute += pad
            self._step_excluded += pad  # the padding is not part of the measured compute step
        self._before_backward()
        out = super().backward(closure_loss, optimizer, *args, **kwargs)
        self._after_backward()
        return out

    def _before_backward(self) -> None:
        pass

    def _after_backward(self) -> None:
        pass

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        return self._step(optimizer, closure, model, **kwargs)

    def _step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        raise NotImplementedError

    def _exclude(self, seconds: float) -> None:
        """Seconds inside the current step that are not measured compute (blocking, padding,
        evaluation): what the straggler padding's measurement leaves out."""
        self._step_excluded += seconds

    def _end_step(self) -> None:
        """Per-step bookkeeping: count the step and feed the straggler padding its measurement."""
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

    # rank 0 ------------------------------------------------------------------------------------------
    def _maybe_evaluate(self, load: Callable[[pl.LightningModule], None], counters: Callable[[], dict[str, float]],
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

    def common_counters(self, updates: int, samples: int) -> dict[str, float]:
        worker = self.worker
        counters: dict[str, float] = {"updates": float(updates), "samples": float(samples)}
        counters.update(worker.ledger_metrics())
        counters["comm_bytes"] = float(worker.comm_bytes)
        loss = worker.take_train_loss()
        if loss is not None:
            counters["train_loss"] = loss
        return counters

    # end of run -----------------------------------------------------------------------------------------
    def summary_metrics(self) -> dict[str, float]:
        return {}

    def artifacts(self) -> dict[str, str]:
        return {}

    def shutdown(self) -> None:
        """After ``trainer.fit`` returned: stop background threads (async server)."""

    def debug_state(self) -> dict[str, Any]:
        return {}
