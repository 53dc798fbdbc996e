"""The exchange vector: the small float64 vector of control values that rides along every
collective round of the dist backend (stop decision, evaluation time, divergence, training
losses, step counts and each rank's ledger)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from syncbench.experiments.procs.worker_state import Comm, WorkerState


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

    def build(self, worker: WorkerState) -> torch.Tensor:
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

    def absorb(self, worker: WorkerState, v: torch.Tensor) -> bool:
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
