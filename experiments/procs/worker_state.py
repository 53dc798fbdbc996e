"""One worker process's state, shared by its Lightning strategy and the run: the process
groups it talks on (``Comm``), its ledger, emulation, loss buffer, rank 0's monitor and the
stop decision (``WorkerState``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from syncbench.experiments.config import RunConfig
from syncbench.experiments.procs.clock import RankLedger, TTAMonitor
from syncbench.experiments.procs.emulation import Emulation
from syncbench.strategies.lightning_bridge import is_finite


@dataclass
class Comm:
    rank: int
    world: int
    device: torch.device
    main: Any  # default process group (None = the default group)
    ctrl: Any  # gloo group: exchange vector, initial broadcast, final gather
    ps: Any  # gloo group: parameter-server point-to-point
    timeout_s: float


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
