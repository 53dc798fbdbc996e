"""Asynchronous SGD on a parameter server as a Lightning strategy over torch.distributed.

Rank 0 hosts the server: a copy of the module (θ), the optimizer of the user's
``configure_optimizers``, the version counter, each worker's SSP clock and the staleness
histogram. A server thread receives pushes from the other ranks with point-to-point gloo
messages on a process group of its own (``recv`` from any source), applies each gradient on
arrival with ``strategies.async_ps.apply_gradient_`` scaled by ``staleness_lr_scale`` (the sim
backend's functions) and replies with θ and its version — the worker's next pull. Rank 0 is
also a worker; its pushes are applied in-process under the same lock.

Bounded staleness (``max_staleness: s``, SSP): a worker whose clock (gradients applied) is
more than s ahead of the slowest worker's is not answered until ``ssp_allows`` says so;
workers never wait for each other otherwise. Staleness = the server's version at apply − the
version the worker pulled.

The workers' optimizers never step (``optimizer.step`` is replaced by the push/pull), so
Lightning's gradient clipping and ``on_before_optimizer_step`` still run on the worker's
gradient before it is pushed. Learning-rate schedulers of the workers have no effect.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import Strategy

from experiments.lightning_bridge import build_optimizer
from strategies.async_ps import apply_gradient_, ssp_allows, staleness_lr_scale
from strategies.base import flat_grads, load_flat_grads_, trainable
from strategies.cluster import point_to_point_s
from strategies.lightning.base import WorkerFailure, WorkerStrategy
from strategies.lightning.tensors import float_buffers, flat_state, load_flat_state_, state_numel

# push header (worker -> server), float64
H_VERSION, H_LOSS_SUM, H_LOSS_N, H_DIVERGED, H_COMPUTE, H_COMM, H_WAIT, H_STEPS = range(8)
HDR_IN = 8
# reply header (server -> worker), float64
R_VERSION, R_STOP, R_HOLD, R_EXCL = range(4)
HDR_OUT = 4


def staleness_summary(counts: Counter) -> dict[str, float]:
    """The same summary the sim backend's ``AsyncPSStrategy.summary_metrics`` records."""
    if not counts:
        return {}
    values = np.repeat(np.array(list(counts.keys())), list(counts.values()))
    return {
        "staleness_mean": float(values.mean()),
        "staleness_max": float(values.max()),
        "staleness_p50": float(np.percentile(values, 50)),
        "staleness_p90": float(np.percentile(values, 90)),
    }


def _push_payload(module: torch.nn.Module) -> torch.Tensor:
    """The gradient (``flat_grads``) followed by the worker's floating-point buffers."""
    grads = flat_grads(module)
    buffers = [b.detach().reshape(-1).to(grads.dtype) for b in float_buffers(module)]
    return torch.cat([grads, *buffers]).cpu() if buffers else grads.cpu()


class ParameterServer:
    """θ, the optimizer, versions and SSP clocks on rank 0 (see the module docstring)."""

    def __init__(self, strategy: "AsyncWorkerStrategy", module: pl.LightningModule):
        worker = strategy.worker
        self.strategy, self.worker, self.comm = strategy, worker, worker.comm
        cfg = worker.config.strategy
        self.max_staleness, self.staleness_lr = cfg.max_staleness, cfg.staleness_lr
        self.module = module
        self.optimizer = build_optimizer(module)
        self.n_params = sum(p.numel() for p in trainable(module))
        self.n_state = state_numel(module)
        self.dtype = flat_state(module).dtype
        self.state_bytes = self.n_state * torch.tensor([], dtype=self.dtype).element_size()
        n = self.comm.world
        self.cond = threading.Condition(worker.lock)
        self.version = 0
        self.pulled = np.zeros(n, dtype=np.int64)
        self.clocks = np.zeros(n, dtype=np.int64)
        self.staleness: Counter = Counter()
        self.held: dict[int, tuple[float, float]] = {}  # rank -> (applied at, paused_total then)
        self.in_flight: dict[int, float] = {r: time.perf_counter() for r in range(1, n)}
        self.ledgers: dict[int, tuple[float, float, float]] = {r: (0.0, 0.0, 0.0) for r in range(n)}
        self.steps: dict[int, int] = {r: 0 for r in range(n)}
        self.stopping = False
        self.acked: set[int] = set()
        self.error: BaseException | None = None
        self.diverged = False
        self.paused_total = 0.0
        self.loss_sum, self.loss_n = 0.0, 0
        self._sends: dict[int, tuple[list[Any], list[torch.Tensor]]] = {}
        self.thread: threading.Thread | None = None
        if n > 1:
            self.thread = threading.Thread(target=self._serve, name="syncbench-ps", daemon=True)
            self.thread.start()

    # -- applying ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, rank: int, pulled_version: int, payload: torch.Tensor) -> None:
        """Apply one pushed gradient now (caller holds the lock)."""
        if self.stopping:
            return
        staleness = int(self.version - pulled_version)
        self.staleness[staleness] += 1
        load_flat_grads_(self.module, payload[: self.n_params].to(self.dtype))
        if payload.numel() > self.n_params:
            offset = self.n_params
            for b in float_buffers(self.module):
                b.copy_(payload[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
        apply_gradient_(self.optimizer, staleness_lr_scale(staleness, self.staleness_lr))
        self.version += 1
        self.clocks[rank] += 1

    def allows(self, rank: int) -> bool:
        return ssp_allows(self.clocks, rank, self.max_staleness)

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
                t_recv = time.perf_counter()
                with self.cond:
                    t_locked = time.perf_counter()
                    self._take_header(src, hdr)
                    self.in_flight.pop(src, None)
                    self.worker.comm_bytes += self.state_bytes
                    if not self.diverged:
                        self.apply(src, int(hdr[H_VERSION]), payload)
                    if self.stopping or self.diverged:
                        self._reply(src, hold=0.0, excl=t_locked - t_recv)
                    elif self.allows(src):
                        self._reply(src, hold=0.0, excl=t_locked - t_recv)
                    else:
                        self.held[src] = (time.perf_counter(), self.paused_total)
                    self.release_held()
                    self._check_silent()
                    self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to rank 0's main thread
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def _take_header(self, src: int, hdr: torch.Tensor) -> None:
        self.ledgers[src] = (float(hdr[H_COMPUTE]), float(hdr[H_COMM]), float(hdr[H_WAIT]))
        self.steps[src] = int(hdr[H_STEPS])
        self.loss_sum += float(hdr[H_LOSS_SUM])
        self.loss_n += int(hdr[H_LOSS_N])
        if hdr[H_DIVERGED] > 0:
            self.diverged = True

    def _reply(self, dst: int, hold: float, excl: float) -> None:
        """Send θ and its version to ``dst`` (its pull); non-blocking."""
        stop = self.stopping or self.diverged or self.worker.stop_outcome is not None
        previous = self._sends.pop(dst, None)
        if previous is not None:
            for work in previous[0]:
                work.wait()
        hdr = torch.tensor([float(self.version), 1.0 if stop else 0.0, hold, excl], dtype=torch.float64)
        state = flat_state(self.module).to("cpu", copy=True)
        works = [dist.isend(hdr, dst=dst, group=self.comm.ps), dist.isend(state, dst=dst, group=self.comm.ps)]
        self._sends[dst] = (works, [hdr, state])
        self.pulled[dst] = self.version
        self.worker.comm_bytes += self.state_bytes
        if stop:
            self.acked.add(dst)
        else:
            self.in_flight[dst] = time.perf_counter()

    def release_held(self) -> None:
        for rank in sorted(self.held):
            if self.stopping or self.diverged or self.allows(rank):
                since, paused_then = self.held.pop(rank)
                excl = self.paused_total - paused_then
                self._reply(rank, hold=max(0.0, time.perf_counter() - since - excl), excl=excl)

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
            self.release_held()
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


class _PushInsteadOfStep:
    """Stands in for the worker's optimizer: ``step(closure)`` runs Lightning's closure
    (forward, backward, clipping) and then pushes the gradient instead of stepping."""

    def __init__(self, optimizer: Any, push: Callable[[], None]):
        self._optimizer, self._push = optimizer, push

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        loss = closure() if closure is not None else None
        self._push()
        return loss

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)


class AsyncWorkerStrategy(WorkerStrategy):
    strategy_name = "syncbench_async"

    def _setup_comm(self) -> None:
        import copy

        comm = self.worker.comm
        self.pulled = 0
        self.server: ParameterServer | None = None
        self.n_state = state_numel(self.module)
        self.dtype = flat_state(self.module).dtype
        self.state_bytes = self.n_state * torch.tensor([], dtype=self.dtype).element_size()
        self.model_rtt_s = 2 * point_to_point_s(self.state_bytes, self.worker.config.cluster.network)
        if comm.rank == 0:
            import sys

            # the server thread must get the GIL promptly when a push arrives while this
            # thread runs Lightning's Python loop (the default switch interval is 5 ms)
            sys.setswitchinterval(min(sys.getswitchinterval(), 2e-4))
            monitor = self.worker.monitor
            server_module = monitor.eval_module if monitor is not None else copy.deepcopy(self.module).cpu()
            load_flat_state_(server_module, flat_state(self.module).cpu())
            self.server = ParameterServer(self, server_module)

    # -- one push/pull per step ------------------------------------------------------------------------------
    def _step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        out = Strategy.optimizer_step(self, _PushInsteadOfStep(optimizer, self._push_pull), closure, model, **kwargs)
        self._end_step()
        if self.server is not None and self.worker.stop_outcome is None:
            self._evaluate_if_due()
        return out

    def _push_pull(self) -> None:
        if self.server is not None:
            self._push_pull_local()
        else:
            self._push_pull_remote()

    @torch.no_grad()
    def _push_pull_remote(self) -> None:
        worker, comm = self.worker, self.worker.comm
        payload = _push_payload(self.module)
        loss_sum, loss_n = worker.take_losses()
        compute, comm_s, wait = worker.ledger.vector()
        hdr = torch.tensor([float(self.pulled), loss_sum, float(loss_n), 1.0 if worker.take_diverged() else 0.0,
                            compute, comm_s, wait, float(worker.ledger.steps + 1)], dtype=torch.float64)
        reply = torch.zeros(HDR_OUT, dtype=torch.float64)
        state = torch.empty(self.n_state, dtype=self.dtype)
        t0 = time.perf_counter()
        try:
            dist.send(hdr, dst=0, group=comm.ps)
            dist.send(payload, dst=0, group=comm.ps)
            dist.recv(reply, src=0, group=comm.ps)
            dist.recv(state, src=0, group=comm.ps)
        except RuntimeError as exc:
            raise WorkerFailure(f"rank {comm.rank}: the parameter server (rank 0) did not answer: "
                                f"{str(exc).splitlines()[0][:200]}") from None
        blocked = time.perf_counter() - t0
        load_flat_state_(self.module, state.to(comm.device))
        self.pulled = int(reply[R_VERSION])
        hold, excl = float(reply[R_HOLD]), float(reply[R_EXCL])
        led = worker.ledger
        hold = min(hold, blocked)
        excl = min(excl, blocked - hold)
        measured = blocked - hold - excl
        led.wait += hold
        led.excluded += excl
        led.comm += measured
        led.rounds += 1
        if worker.debug:
            led.events.append((led.steps + 1, blocked))
        pad = worker.emulation.network_pad_s(self.model_rtt_s, measured)
        if pad > 0:
            time.sleep(pad)
            led.comm += pad
            led.pad_comm += pad
        self._exclude(blocked + pad)
        if reply[R_STOP] > 0:
            self._stop_now()

    @torch.no_grad()
    def _push_pull_local(self) -> None:
        server, worker = self.server, self.worker
        assert server is not None
        payload = _push_payload(self.module)
        loss_sum, loss_n = worker.take_losses()
        diverged = worker.take_diverged()
        eval_before = worker.ledger.excluded
        with server.cond:
            server.raise_if_failed()
            server.loss_sum += loss_sum
            server.loss_n += loss_n
            server.steps[0] = worker.ledger.steps + 1
            if diverged:
                server.diverged = True
            if not server.diverged:
                server.apply(0, self.pulled, payload)
            server.release_held()
            server.cond.notify_all()
            t_applied = time.perf_counter()
            while not (server.stopping or server.diverged or worker.stop_outcome or server.allows(0)):
                server.cond.wait(0.02)
                server.raise_if_failed()
                self._evaluate_if_due()  # rank 0 keeps the evaluation schedule while SSP holds it
            server.raise_if_failed()
            self._copy_from_server()
        eval_in_wait = worker.ledger.excluded - eval_before
        hold = max(0.0, time.perf_counter() - t_applied - eval_in_wait)
        worker.ledger.wait += hold
        self._exclude(hold)
        if server.diverged and worker.stop_outcome is None:
            self._evaluate_if_due(force=True)
        if worker.stop_outcome is not None:
            server.stop()
            self._stop_now()

    def _copy_from_server(self) -> None:
        assert self.server is not None
        for mine, theirs in zip(list(self.module.parameters()) + float_buffers(self.module),
                                list(self.server.module.parameters()) + float_buffers(self.server.module)):
            mine.data.copy_(theirs.data)
        self.pulled = self.server.version

    # -- evaluation on rank 0 ------------------------------------------------------------------------------------
    def _evaluate_if_due(self, force: bool = False) -> None:
        server = self.server
        assert server is not None
        with server.cond:  # the server applies nothing while rank 0 evaluates: the clock is paused
            if server.diverged:
                self.worker.peer_diverged = True
            before = self.worker.ledger.excluded
            outcome = self._maybe_evaluate(lambda target: None, self._counters, force=force)
            server.paused_total += self.worker.ledger.excluded - before
            if outcome is not None:
                server.stop()
                self._stop_now()

    def _counters(self) -> dict[str, float]:
        server = self.server
        assert server is not None
        worker = self.worker
        loss_sum, loss_n = server.take_train_loss()
        worker.add_round_losses(loss_sum, loss_n)
        worker.peer_ledgers = [server.ledgers[r] for r in range(worker.comm.world)]
        counters = self.common_counters(server.version, server.version * worker.batch_size)
        counts = server.staleness
        total = sum(counts.values())
        counters["staleness_mean"] = float(sum(s * c for s, c in counts.items()) / total) if total else 0.0
        counters["staleness_max"] = float(max(counts)) if counts else 0.0
        return counters

    # -- end of run ------------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server.join()

    def summary_metrics(self) -> dict[str, float]:
        return staleness_summary(self.server.staleness) if self.server is not None else {}

    def artifacts(self) -> dict[str, str]:
        if self.server is None:
            return {}
        import json

        return {"staleness.json": json.dumps({int(k): int(v) for k, v in sorted(self.server.staleness.items())})}

    def debug_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"final": flat_state(self.module).cpu(), "pulled": self.pulled}
        if self.server is not None:
            state["server"] = flat_state(self.server.module).cpu()
            state["staleness"] = dict(self.server.staleness)
            state["version"] = self.server.version
        return state
