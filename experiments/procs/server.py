"""The dist backend's parameter-server transport: ``PushPull`` over torch.distributed.

Rank 0 hosts the strategy's ``ParameterServer`` (its state and update rule, defined in the
strategy's file). A server thread receives pushes from the other ranks with point-to-point
gloo messages on a process group of its own (``recv`` from any source), hands each to
``ParameterServer.apply`` on arrival and replies with the server's state and version -- the
worker's pull. Rank 0 is also a worker; its pushes are applied in-process under the same lock.

The server's one link (network emulation on): every push and every pull occupies the link
for its alpha-beta time, first come first served, as in the sim backend: a transfer that finds
the link busy waits (recorded as waiting), and the reply leaves when the pull's transfer ends.

The worker's side of ``PushPull`` (``PushPullOps``, mixed into
``syncbench.experiments.procs.program_strategy.ProgramStrategy``): rank 0 applies its own
pushes in-process, the other ranks push to the server thread and wait for its reply.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from syncbench.experiments.cluster_model import point_to_point_s
from syncbench.experiments.procs.failures import WorkerFailure
from syncbench.experiments.procs.worker_state import WorkerState
from syncbench.strategies.program import ParameterServer, PushPull, gradient_payload
from syncbench.strategies.tensors import flat_state, load_flat_state_, state_numel

# push header (worker -> server), float64
H_VERSION, H_LOSS_SUM, H_LOSS_N, H_DIVERGED, H_COMPUTE, H_COMM, H_WAIT, H_STEPS, H_SENT = range(9)
HDR_IN = 9
# reply header (server -> worker), float64
R_VERSION, R_STOP, R_QUEUE, R_EXCL, R_APPLIED = range(5)
HDR_OUT = 5


class ServerLink:
    """The server's one link in wall-clock time: transfers are served first come, first served."""

    def __init__(self, transfer_s: float, enabled: bool):
        self.transfer_s, self.enabled = transfer_s, enabled
        self.free_at = 0.0

    def round_trip(self, arrived: float) -> tuple[float, float, float]:
        """A push that reached the server at ``arrived``: (queueing seconds, when the push has
        crossed the link, when the pull has crossed it)."""
        if not self.enabled:
            return 0.0, arrived, arrived
        start = max(arrived, self.free_at)
        pushed = start + self.transfer_s
        self.free_at = pushed + self.transfer_s
        return start - arrived, pushed, self.free_at


def sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


class ServerThread:
    """Rank 0's side of ``PushPull``: the strategy's server behind a lock, a receiving thread."""

    def __init__(self, worker: WorkerState, server: ParameterServer, network_on: bool):
        self.worker, self.comm, self.server = worker, worker.comm, server
        module = server.module
        self.n_state = state_numel(module)
        self.dtype = flat_state(module).dtype
        self.state_bytes = self.n_state * torch.tensor([], dtype=self.dtype).element_size()
        self.link = ServerLink(point_to_point_s(self.state_bytes, worker.config.cluster.network), network_on)
        n = self.comm.world
        self.cond = threading.Condition(worker.lock)
        self.pulled = [0] * n
        self.in_flight: dict[int, float] = {r: time.perf_counter() for r in range(1, n)}
        self.ledgers: dict[int, tuple[float, float, float]] = {r: (0.0, 0.0, 0.0) for r in range(n)}
        self.stopping = False
        self.acked: set[int] = set()
        self.error: BaseException | None = None
        self.diverged = False
        self.loss_sum, self.loss_n = 0.0, 0
        self._sends: dict[int, tuple[list[Any], list[torch.Tensor]]] = {}
        self.thread: threading.Thread | None = None
        if n > 1:
            self.thread = threading.Thread(target=self._serve, name="syncbench-ps", daemon=True)
            self.thread.start()

    # -- applying ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, rank: int, pulled_version: int, payload: torch.Tensor) -> bool:
        """Apply one push now (caller holds the lock); False when refused or stopping."""
        self.worker.comm_bytes += self.state_bytes
        if self.stopping or self.diverged:
            return False
        return self.server.apply(rank, payload.to(self.dtype), pulled_version)

    # -- the server thread -------------------------------------------------------------------------------
    def _serve(self) -> None:
        comm = self.comm
        remote = set(range(1, comm.world))
        try:
            while True:
                with self.cond:
                    if self.stopping and self.acked >= remote:
                        return
                hdr = torch.zeros(HDR_IN, dtype=torch.float64)
                try:
                    src = dist.recv(hdr, src=None, group=comm.ps)
                except RuntimeError as exc:
                    raise WorkerFailure(self._silence_message(exc)) from None
                payload = torch.empty(self.n_state, dtype=self.dtype)
                dist.recv(payload, src=src, group=comm.ps)
                # when the push left the worker, on this process's clock (same host or NTP-close hosts)
                arrived = min(time.perf_counter(), time.perf_counter() - (time.time() - float(hdr[H_SENT])))
                with self.cond:
                    queued, pushed, pulled = self.link.round_trip(arrived)
                sleep_until(pushed)
                with self.cond:
                    self._take_header(src, hdr)
                    self.in_flight.pop(src, None)
                    applied = self.apply(src, int(hdr[H_VERSION]), payload)
                    state = flat_state(self.server.module).to("cpu", copy=True)
                    version = self.server.version
                    self._check_silent()
                    self.cond.notify_all()
                sleep_until(pulled)
                self._reply(src, state, version, applied, queued)
        except BaseException as exc:  # noqa: BLE001 - handed to rank 0's main thread
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def _take_header(self, src: int, hdr: torch.Tensor) -> None:
        self.ledgers[src] = (float(hdr[H_COMPUTE]), float(hdr[H_COMM]), float(hdr[H_WAIT]))
        self.loss_sum += float(hdr[H_LOSS_SUM])
        self.loss_n += int(hdr[H_LOSS_N])
        if hdr[H_DIVERGED] > 0:
            self.diverged = True

    def _reply(self, dst: int, state: torch.Tensor, version: int, applied: bool, queued: float) -> None:
        """Send theta and its version to ``dst`` (its pull); non-blocking."""
        with self.cond:
            stop = self.stopping or self.diverged or self.worker.stop_outcome is not None
            previous = self._sends.pop(dst, None)
            if previous is not None:
                for work in previous[0]:
                    work.wait()
            hdr = torch.tensor([float(version), 1.0 if stop else 0.0, queued, 0.0, 1.0 if applied else 0.0],
                               dtype=torch.float64)
            works = [dist.isend(hdr, dst=dst, group=self.comm.ps), dist.isend(state, dst=dst, group=self.comm.ps)]
            self._sends[dst] = (works, [hdr, state])
            self.pulled[dst] = version
            self.worker.comm_bytes += self.state_bytes
            if stop:
                self.acked.add(dst)
            else:
                self.in_flight[dst] = time.perf_counter()

    def _check_silent(self) -> None:
        now, limit = time.perf_counter(), self.comm.timeout_s
        silent = {r: now - t for r, t in self.in_flight.items() if now - t > limit}
        if silent:
            rank = max(silent, key=silent.get)
            raise WorkerFailure(f"worker rank {rank} sent no gradient for {silent[rank]:.1f} s "
                                f"(cluster.collective_timeout_s={limit:g}): it died or hangs")

    def _silence_message(self, exc: BaseException) -> str:
        now = time.perf_counter()
        if self.in_flight:
            rank = max(self.in_flight, key=lambda r: now - self.in_flight[r])
            return (f"worker rank {rank} sent no gradient for {now - self.in_flight[rank]:.1f} s "
                    f"(cluster.collective_timeout_s={self.comm.timeout_s:g}): it died or hangs "
                    f"[{str(exc).splitlines()[0][:200]}]")
        return f"parameter server: receive failed: {exc}"

    # -- rank 0's controls ----------------------------------------------------------------------------------
    def raise_if_failed(self) -> None:
        if self.error is not None:
            if isinstance(self.error, WorkerFailure):
                raise WorkerFailure(str(self.error))
            raise WorkerFailure(f"parameter server failed: {type(self.error).__name__}: {self.error}")

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def join(self) -> None:
        if self.thread is None:
            return
        limit = self.comm.timeout_s + 5.0
        self.thread.join(limit)
        if self.thread.is_alive():
            missing = sorted(set(range(1, self.comm.world)) - self.acked)
            raise WorkerFailure(f"worker rank(s) {missing} never came back for the stop signal within {limit:g} s")
        self.raise_if_failed()
        for works, _ in self._sends.values():
            for work in works:
                work.wait()
        self._sends.clear()

    def take_train_loss(self) -> tuple[float, int]:
        out = (self.loss_sum, self.loss_n)
        self.loss_sum, self.loss_n = 0.0, 0
        return out


def push_pull_remote(worker: WorkerState, payload: torch.Tensor, pulled: int, n_state: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A non-zero rank's ``PushPull``: (reply header, server state, seconds blocked)."""
    comm = worker.comm
    loss_sum, loss_n = worker.take_losses()
    compute, comm_s, wait = worker.ledger.vector()
    hdr = torch.tensor([float(pulled), loss_sum, float(loss_n), 1.0 if worker.take_diverged() else 0.0,
                        compute, comm_s, wait, float(worker.ledger.steps + 1), time.time()], dtype=torch.float64)
    reply = torch.zeros(HDR_OUT, dtype=torch.float64)
    state = torch.empty(n_state, dtype=dtype)
    t0 = time.perf_counter()
    try:
        dist.send(hdr, dst=0, group=comm.ps)
        dist.send(payload.cpu(), dst=0, group=comm.ps)
        dist.recv(reply, src=0, group=comm.ps)
        dist.recv(state, src=0, group=comm.ps)
    except RuntimeError as exc:
        raise WorkerFailure(f"rank {comm.rank}: the parameter server (rank 0) did not answer: "
                            f"{str(exc).splitlines()[0][:200]}") from None
    return reply, state, time.perf_counter() - t0


class PushPullOps:
    """``ProgramStrategy``'s executor of ``PushPull`` (see the module docstring), and rank 0's
    evaluation of the server's model."""

    # PushPull ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _push_pull(self, op: PushPull) -> bool:
        payload = op.payload if op.payload is not None else gradient_payload(self.module)
        if self.server is not None:
            return self._push_pull_local(payload)
        return self._push_pull_remote(payload)

    def _push_pull_remote(self, payload: torch.Tensor) -> bool:
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
