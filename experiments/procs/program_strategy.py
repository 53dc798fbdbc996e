"""The Lightning face of the dist backend: one Lightning ``Strategy`` that runs any registered
strategy's worker program in a real process (the executors of its ops are in
``syncbench.experiments.procs.collectives`` and ``syncbench.experiments.procs.server``).

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
"""

from __future__ import annotations

import copy
import functools
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from syncbench.experiments.procs.buckets import GradBuckets
from syncbench.experiments.procs.collectives import CollectiveOps, Overlapped
from syncbench.experiments.procs.exchange import Exchange
from syncbench.experiments.procs.server import PushPullOps, ServerThread
from syncbench.experiments.procs.stop_notice import StopNotice
from syncbench.experiments.procs.worker_state import WorkerState
from syncbench.experiments.strategy_setup import scale_lr_
from syncbench.strategies.lightning_bridge import (
    LightningModuleLike,
    ModuleOptimizer,
    TrainerStandIn,
    build_module_optimizer,
)
from syncbench.strategies.program import (
    Compute,
    PushPull,
    ReduceGradients,
    ReduceState,
    StartReduce,
    Step,
    WaitReduce,
    WorkerProgram,
)
from syncbench.strategies.program import Strategy as StrategyDef
from syncbench.strategies.tensors import flat_state, float_buffers, load_flat_state_, state_numel


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


class ProgramStrategy(CollectiveOps, PushPullOps):
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
        self._reductions: dict[int, Overlapped] = {}  # StartReduce handles in flight
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
                if self.definition.traits.has_parameter_server else None
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
        return self.definition.traits.has_parameter_server

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
            elif isinstance(op, Step):
                program.worker.optimizer.step()
                value = None
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
        if self.program is None or (self.definition.traits.has_parameter_server and self.server is None):
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
