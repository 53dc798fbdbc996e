"""The sim backend: N worker programs on one virtual clock, in one process.

Each worker has its own replica of the user's module, its optimizer (the module's own
``configure_optimizers``) and its data shard, and runs the strategy's worker program
(``syncbench.strategies.program``). The engine resumes the programs in virtual-time order, the way
SimGrid's SMPI runs unmodified MPI programs on a simulated platform, and charges each
operation on the clock:

* ``Compute``: ``step_s`` x the worker's straggler factor (seeded); the real forward and
  backward run when the computation ends in virtual time.
* ``ReduceGradients`` / ``ReduceState``: a ring all-reduce of the payload,
  2(N-1)*alpha + 2(N-1)/N * S/beta, starting when the last (or the quorum-th) worker arrives;
  the earlier arrivals wait. With a quorum, workers still computing abandon their step.
* With a codec (``syncbench.strategies.compression``), the N workers' exchanges run in lockstep: each
  collective it asks for is charged in turn (ring all-reduce as above; ring all-gather of S
  bytes per worker: (N-1)*alpha + (N-1) * S/beta), plus the encode/decode compute,
  ``codec_s_per_mb`` x the payload's MB (pinned, or measured once at the first exchange).
* ``PushPull``: the push and then the pull, alpha + S/beta each, on the server's one link,
  where transactions (a push and its pull, back to back: the server answers a push before it
  takes the next) queue first come, first served. The server applies a push when it arrives;
  the pull carries the parameters of that moment.
* ``StartReduce`` / ``WaitReduce``: the same ring all-reduce, running on the clock in the
  background from the last worker's start while the workers keep computing; a worker waits
  only for what has not arrived when it asks for it (charged as waiting until the last start,
  communication after).

Events at the same instant resolve in insertion order: a run is reproducible bit for bit.

Batched path (``cluster.sim.batching: auto``, ``batching``): where replicas are identical, all workers
share one replica and optimizer; a ``Compute`` draws the worker's batch when it ends, and the quorum's
``ReduceGradients`` computes the kept workers' mean gradient in one forward/backward. Stacked
path (``syncbench.experiments.sim.stacked``): where replicas differ, each worker keeps its own (a row
of stacked tensors), the gradients of the workers computing together come from one ``vmap`` call,
and the optimizer steps of all N at one instant are one step (``grouped_step``). The path a run
takes: ``syncbench.experiments.sim.compute_mode``.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from syncbench.experiments.cluster_model import (
    NetworkConfig,
    ServerLink,
    StragglerModel,
    point_to_point_s,
    exchange_model_s,
    ring_allreduce_bytes,
    ring_allreduce_s,
)
from syncbench.experiments.sharding import ShardedBatches
from syncbench.experiments.sim.batching import SharedOptimizer, concatenated_batch, move_to
from syncbench.experiments.sim.calibration import measure_codec_s_per_mb
from syncbench.experiments.sim.optimizer_speed import prefer_foreach_
from syncbench.experiments.sim.compute_mode import choose_compute_mode
from syncbench.experiments.sim.stacked import StackedResult
from syncbench.experiments.sim.worker import SimWorker, clip_options
from syncbench.experiments.strategy_setup import scale_lr_
from syncbench.strategies.lightning_bridge import (
    LightningModuleLike,
    TrainerStandIn,
    build_module_optimizer,
    call_hook,
    is_finite,
    training_loss,
)
from syncbench.strategies.program import (
    Compute,
    Op,
    ParameterServer,
    PushPull,
    ReduceGradients,
    ReduceState,
    StartReduce,
    Step,
    Strategy,
    WaitReduce,
    gradient_payload,
    load_gradient_payload_,
    state_payload,
)
from syncbench.strategies.tensors import copy_state_, load_flat_state_, trainable
from syncbench.strategies import compression


class EventQueue:
    """Discrete events in (time, insertion order): ties resolve deterministically."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = 0

    def push(self, time: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self._heap, (time, self._seq, action))
        self._seq += 1

    def peek_time(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def pop(self) -> tuple[float, Callable[[float], None]]:
        time, _, action = heapq.heappop(self._heap)
        return time, action

    def __len__(self) -> int:
        return len(self._heap)


@dataclass
class TimeLedger:
    """Cumulative compute / communication / waiting seconds per worker."""

    n_workers: int
    compute: np.ndarray = field(init=False)
    comm: np.ndarray = field(init=False)
    wait: np.ndarray = field(init=False)
    comm_bytes: int = 0

    def __post_init__(self) -> None:
        self.compute, self.comm, self.wait = (np.zeros(self.n_workers) for _ in range(3))


@dataclass
class _Collective:
    kind: type[Op]
    quorum: int
    arrivals: dict[int, float] = field(default_factory=dict)  # rank -> arrival time
    payloads: dict[int, torch.Tensor] = field(default_factory=dict)
    result: torch.Tensor | None = None
    completed_at: float = 0.0  # when the last (quorum-th) payload arrived
    done_at: float | None = None  # when the reduction has reached every worker
    ops: dict[int, Op] = field(default_factory=dict)  # rank -> its op, when it carries a codec
    results: dict[int, torch.Tensor] = field(default_factory=dict)  # rank -> its result (codec)
    waiters: dict[int, float] = field(default_factory=dict)  # StartReduce: rank -> when it asked to wait
    released: int = 0  # StartReduce: workers that have had the result


class SimEngine:
    """Runs a strategy's programs for N virtual workers; the run loop reads the clock,
    the counters and the global model from here (``syncbench.experiments.sim.run_loop``)."""

    def __init__(self, strategy: Strategy, module: LightningModuleLike, train_set: Dataset, collate: Callable,
                 *, workers: int, batch_size: int, seed: int, step_s: float, stragglers: Any,
                 network: NetworkConfig, lr_factor: float = 1.0, trainer_options: Any = None,
                 codec_s_per_mb: float | None = None, device: str = "cpu", batching: str = "auto"):
        """``device``: where the replicas and batches live (a resolved ``cluster.device``);
        ``batching``: ``cluster.sim.batching`` (auto: the batched or stacked path where exact,
        ``syncbench.experiments.sim.compute_mode``)."""
        self.strategy, self.n, self.step_s, self.net = strategy, workers, step_s, network
        self.device = torch.device(device)
        module.to(self.device)
        self.train_set, self.collate = train_set, collate
        self.codec_s_per_mb = codec_s_per_mb  # None: measured at the first compressed exchange
        self.codec_used = False
        self.stragglers = StragglerModel(stragglers, workers, seed)
        self.latest_metrics: dict[str, float] = {}  # of the last evaluation (ReduceLROnPlateau reads them)
        metrics = lambda: self.latest_metrics  # noqa: E731
        clip = clip_options(trainer_options)
        self.shared: SharedOptimizer | None = None
        self.mode = choose_compute_mode(strategy, module, train_set, collate, workers=workers, batching=batching,
                                        batch_size=batch_size, seed=seed, device=self.device)
        self.batching = self.mode.tag
        shards = [ShardedBatches(train_set, w, workers, batch_size, seed, collate) for w in range(workers)]
        if self.mode.shared:  # one replica, one optimizer, stepped once per update
            trainer = TrainerStandIn(module, num_training_batches=shards[0].steps_per_epoch, **clip).attach()
            self.shared = SharedOptimizer(build_module_optimizer(module, steps_per_epoch=shards[0].steps_per_epoch,
                                                                 metrics=metrics, **clip))
            self.workers = [SimWorker(w, workers, batch_size, module, shards[w], shared=(trainer, self.shared))
                            for w in range(workers)]
        else:
            replicas = [module] + [copy.deepcopy(module) for _ in range(workers - 1)]
            self.workers = [SimWorker(w, workers, batch_size, replicas[w], shards[w], trainer_options, metrics)
                            for w in range(workers)]
        self.server: ParameterServer | None = None
        if strategy.traits.has_parameter_server:
            server_module = copy.deepcopy(module)
            # one epoch of the server = one pass over the training data: every worker's shard
            epoch = workers * self.workers[0].batches.steps_per_epoch
            TrainerStandIn(server_module, num_training_batches=epoch, **clip).attach()
            server = strategy.server(server_module, build_module_optimizer(
                server_module, steps_per_epoch=epoch, metrics=metrics, owns_counters=True, **clip))
            self.server = server
        optimizers = [self.shared.inner] if self.shared is not None else [w.optimizer for w in self.workers]
        for opt in optimizers + ([self.server.optimizer] if self.server else []):
            scale_lr_(opt, lr_factor)
            prefer_foreach_(opt)
        self.replicas = self.mode.link_replicas(self.workers)  # after prefer_foreach_: the grouped step copies it
        self.stepping: list[SimWorker] = []  # workers at a Step this instant (the grouped step)
        factors = [self.stragglers.expected_factor(r) for r in range(workers)]
        for w in self.workers:
            w.step_factors = factors
            w.program = strategy.program(w)
        self.programs = [w.program for w in self.workers]
        self.ledger = TimeLedger(workers)
        self.queue = EventQueue()
        self.link = ServerLink()
        self.collectives: dict[int, _Collective] = {}
        self.reductions: dict[int, _Collective] = {}  # non-blocking ones, by handle
        self.clock = 0.0
        self.diverged = False
        self.recent_losses: list[float] = []
        self.eval_module = copy.deepcopy(module)
        for w in self.replica_workers():
            call_hook(w.module, "on_fit_start")
        for w in self.replica_workers():
            call_hook(w.module, "on_train_start")
        for w in self.workers:
            self._drive(w, 0.0, None)

    def observe_evaluation(self, metrics: dict[str, float]) -> None:
        """The global model's latest evaluation (what ``ReduceLROnPlateau`` monitors)."""
        self.latest_metrics = dict(metrics)
        for w in self.workers:
            w.trainer.callback_metrics = {k: torch.tensor(v) for k, v in metrics.items()}

    def replica_workers(self) -> list[SimWorker]:
        """One worker per replica: every worker, or the first when they share one (its hooks run once)."""
        return self.workers[:1] if self.shared is not None else self.workers

    def finish(self) -> None:
        """The run has ended: ``on_train_end`` on every replica."""
        for w in self.replica_workers():
            spe = w.batches.steps_per_epoch
            if w.steps % spe:  # stopped mid-epoch: the Trainer still closes the epoch
                call_hook(w.module, "on_train_epoch_end")
            w.trainer.current_epoch = -(-w.steps // spe)
            w.trainer.training = False
            call_hook(w.module, "on_train_end")

    # -- the run loop's view --------------------------------------------------------------------
    def next_time(self) -> float:
        return self.queue.peek_time()

    def advance(self) -> None:
        t, action = self.queue.pop()
        self.clock = t
        action(t)

    def counters(self) -> tuple[int, int]:
        return self.strategy.counters(self.programs, self.server)

    def global_model(self) -> LightningModuleLike:
        self.strategy.load_global(self.eval_module, self.programs, self.server)
        return self.eval_module

    def curve_metrics(self) -> dict[str, float]:
        return self.strategy.curve_metrics(self.programs, self.server)

    def summary_metrics(self) -> dict[str, float]:
        extra = {"codec_s_per_mb": float(self.codec_s_per_mb)} if self.codec_used and self.codec_s_per_mb is not None \
            else {}
        return {**self.strategy.summary_metrics(self.programs, self.server), **extra}

    def artifacts(self) -> dict[str, str]:
        return self.strategy.artifacts(self.programs, self.server)

    def take_train_loss(self) -> float | None:
        losses, self.recent_losses = self.recent_losses, []
        return float(np.mean(losses)) if losses else None

    # -- driving the programs ---------------------------------------------------------------------
    def _drive(self, w: SimWorker, t: float, value: Any) -> None:
        """Resume ``w``'s program at ``t`` until it asks for an operation (a new step when
        the last one returned), and schedule that operation."""
        for _ in range(2):
            if w.gen is None:
                assert w.program is not None
                w.gen, value = w.program.step(), None
            try:
                op = w.gen.send(value)
            except StopIteration:
                w.gen = None
                w.completed += 1
                self._end_batch(w)
                continue
            self._dispatch(w, t, op)
            return
        raise AssertionError("a worker program's step asked for no operation (it must at least Compute)")

    def _dispatch(self, w: SimWorker, t: float, op: Op) -> None:
        if isinstance(op, Compute):
            self._compute(w, t)
        elif isinstance(op, Step):
            self._step(w, t)
        elif isinstance(op, (ReduceGradients, ReduceState)):
            self._collective(w, t, op)
        elif isinstance(op, PushPull):
            self._push_pull(w, t, op)
        elif isinstance(op, StartReduce):
            self._start_reduce(w, t, op)
        elif isinstance(op, WaitReduce):
            self._wait_reduce(w, t, op)
        else:
            raise TypeError(f"the sim backend cannot carry out {op!r}")

    def _compute(self, w: SimWorker, t: float) -> None:
        c = self.step_s * self.stragglers.factor(w.rank)
        w.token += 1
        w.computing = (t, w.token)
        token = w.token

        def done(now: float) -> None:
            if w.computing is None or w.computing[1] != token:
                return  # abandoned: a quorum collective completed without this worker
            w.computing = None
            self.ledger.compute[w.rank] += c
            if self.shared is not None:  # the gradient is computed with the round's other kept ones
                w.pending = w.batches.next_indices()
                w.steps += 1
                self._drive(w, now, None)
                return
            self._drive(w, now, self._forward_backward(
                w, self.mode.stacked_result(w, self.workers, self.device) if self.mode.stacked else None))

        self.queue.push(t + c, done)

    def _step(self, w: SimWorker, t: float) -> None:
        """The optimizer step. On the stacked path the torch steps of the workers stepping at this
        instant run after the instant's other events: as one when all N are there (``grouped_step``),
        else one by one; each worker's hooks and clipping before, its schedulers after (as in
        ``ModuleOptimizer.step``). Nothing reads a replica in between (evaluations run between instants)."""
        if self.replicas is None or self.replicas.refusal is not None:
            w.optimizer.step()
            self._drive(w, t, None)
            return
        w.optimizer.prepare_step()
        self.stepping.append(w)
        if len(self.stepping) == 1:
            self.queue.push(t, self._take_steps)

    def _take_steps(self, now: float) -> None:
        ready, self.stepping = self.stepping, []
        if len(ready) < self.n or not self.replicas.step():  # type: ignore[union-attr]
            for w in ready:
                w.optimizer.optimizer.step()
        for w in ready:
            w.optimizer.finish_step()
            self._drive(w, now, None)

    def _forward_backward(self, w: SimWorker, ahead: StackedResult | None = None) -> float:
        """Lightning's closure: the batch hooks, ``training_step``, zero_grad, backward; with
        ``ahead`` (the stacked path), its batch, loss and gradient stand for the step's own."""
        module, trainer, idx = w.module, w.trainer, w.batch_idx()
        trainer.global_step = w.completed
        if idx == 0:
            trainer.current_epoch = w.steps // w.batches.steps_per_epoch
            call_hook(module, "on_train_epoch_start")
        batch = ahead.batch if ahead is not None else move_to(next(w.batches), self.device)
        call_hook(module, "on_train_batch_start", batch, idx)
        loss = ahead.loss if ahead is not None else training_loss(module, batch, idx)
        w.steps += 1
        w.last_batch, w.last_loss = (batch, idx), loss.detach()
        call_hook(module, "on_before_zero_grad", w.optimizer.optimizer)
        self.mode.zero_grad(w)
        value = float(loss.detach())
        self.recent_losses.append(value)
        if not is_finite(value):
            self.diverged = True
            return value
        call_hook(module, "on_before_backward", loss)
        if ahead is not None:
            for p, g in zip(trainable(module), ahead.grads):
                p.grad = g
        else:
            loss.backward()
        call_hook(module, "on_after_backward")
        return value

    def _batched_gradient(self, ranks: list[int]) -> None:
        """The batched path's round: the mean gradient of the kept workers ``ranks`` into the
        shared replica, from one forward/backward over their concatenated batches, with the
        hooks of one step (those of the first kept worker, whose step ends the batch)."""
        assert self.shared is not None
        lead = self.workers[ranks[0]]
        module, trainer = lead.module, lead.trainer
        idx = (lead.steps - 1) % lead.batches.steps_per_epoch  # all kept workers read batch idx now
        trainer.global_step = lead.completed
        if idx == 0:
            trainer.current_epoch = (lead.steps - 1) // lead.batches.steps_per_epoch
            call_hook(module, "on_train_epoch_start")
        indices = []
        for r in ranks:
            w = self.workers[r]
            assert w.pending is not None, f"worker {r} joined a round without a computed batch"
            indices.append(w.pending)
            w.pending = None
        batch = concatenated_batch(self.train_set, indices, self.collate, self.device)
        call_hook(module, "on_train_batch_start", batch, idx)
        loss = training_loss(module, batch, idx)
        lead.last_batch, lead.last_loss = (batch, idx), loss.detach()
        call_hook(module, "on_before_zero_grad", self.shared.inner.optimizer)
        self.shared.zero_grad(set_to_none=True)
        value = float(loss.detach())
        self.recent_losses.append(value)
        if not is_finite(value):
            self.diverged = True
            return
        call_hook(module, "on_before_backward", loss)
        loss.backward()
        call_hook(module, "on_after_backward")
        self.shared.arm()

    def _end_batch(self, w: SimWorker) -> None:
        """A program step has finished: ``on_train_batch_end`` (and the epoch's end)."""
        if w.last_batch is None:
            return
        (batch, idx), loss = w.last_batch, w.last_loss
        w.last_batch = None
        w.trainer.global_step = w.completed
        call_hook(w.module, "on_train_batch_end", {"loss": loss}, batch, idx)
        if idx == w.batches.steps_per_epoch - 1:
            call_hook(w.module, "on_train_epoch_end")

    def _abandon(self, w: SimWorker, t: float) -> None:
        """A dropped backup worker: its batch is consumed, its computation cut short at ``t``."""
        assert w.computing is not None, "a worker missing from a quorum collective must be computing"
        start, _ = w.computing
        w.computing = None
        self.ledger.compute[w.rank] += t - start
        if not self.mode.drop(w.rank):  # its batch was not drawn yet for a stacked gradient
            w.batches.next_indices()
        w.steps += 1
        self._drive(w, t, None)

    def _collective(self, w: SimWorker, t: float, op: ReduceGradients | ReduceState) -> None:
        k = w.collectives
        w.collectives += 1
        quorum = getattr(op, "quorum", None) or self.n
        coll = self.collectives.get(k) or self.collectives.setdefault(k, _Collective(type(op), quorum))
        assert coll.kind is type(op), f"workers disagree on collective {k}: {coll.kind} vs {type(op)}"
        coll.arrivals[w.rank] = t
        if coll.done_at is not None:  # a dropped worker joins a finished round for its result
            self._deliver(w, coll)
        elif self.shared is not None:
            assert isinstance(op, ReduceGradients) and op.codec is None, \
                f"{self.strategy.name}: a shared replica reduces only uncompressed gradients (replicas_shareable)"
            coll.payloads[w.rank] = _COMPUTED  # its batch's gradient is computed with the others' at the quorum
            if len(coll.payloads) == coll.quorum:
                self._complete(coll, t)
        elif op.codec is not None:
            coll.ops[w.rank] = op
            coll.payloads[w.rank] = compression.op_payload(op, w.module)
            if len(coll.payloads) == coll.quorum:
                self._complete(coll, t)
        else:
            coll.payloads[w.rank] = gradient_payload(w.module) if isinstance(op, ReduceGradients) \
                else state_payload(w.module)
            if len(coll.payloads) == coll.quorum:
                self._complete(coll, t)
        if len(coll.arrivals) == self.n:
            self.collectives.pop(k, None)

    def _complete(self, coll: _Collective, t: float) -> None:
        payloads = [coll.payloads[r] for r in sorted(coll.payloads)]
        if self.shared is not None:
            self._batched_gradient(sorted(coll.payloads))
            nbytes = self.workers[0].gradient_bytes
            self.ledger.comm_bytes += ring_allreduce_bytes(self.n, nbytes)
            comm_s = ring_allreduce_s(self.n, nbytes, self.net)
        else:
            nbytes = payloads[0].numel() * payloads[0].element_size()
            if coll.ops:
                comm_s = self._compressed(coll, payloads, nbytes)
            else:
                comm_s = self._all_reduce(coll, payloads, nbytes)
        coll.completed_at, coll.done_at = t, t + comm_s
        for rank in sorted(coll.payloads):
            self.ledger.wait[rank] += t - coll.arrivals[rank]
            self._deliver(self.workers[rank], coll)
        for w in self.workers:
            if w.rank not in coll.arrivals:
                self._abandon(w, t)

    def _all_reduce(self, coll: _Collective, payloads: list[torch.Tensor], nbytes: int) -> float:
        """The exact mean of ``payloads`` (``nbytes`` each) into ``coll.result``, its bytes on the
        ledger; returns the ring all-reduce's seconds."""
        coll.result = mean_payload(payloads)
        self.ledger.comm_bytes += ring_allreduce_bytes(self.n, nbytes)
        return ring_allreduce_s(self.n, nbytes, self.net)

    def _compressed(self, coll: _Collective, payloads: list[torch.Tensor], nbytes: int) -> float:
        """Every worker's codec exchange in lockstep; returns the seconds it takes: its
        collectives on the alpha-beta network plus the encode/decode compute."""
        ranks = sorted(coll.ops)
        self.codec_used = True
        if self.codec_s_per_mb is None:
            op = coll.ops[ranks[0]]
            self.codec_s_per_mb = measure_codec_s_per_mb(op.codec, payloads[0], self.n)  # type: ignore[attr-defined]
        exchanges = [compression.payload_exchange(coll.ops[r].codec, p, self.n)  # type: ignore[attr-defined]
                     for r, p in zip(ranks, payloads)]
        results, collectives = compression.run_lockstep(exchanges)
        coll.results = dict(zip(ranks, results))
        self.ledger.comm_bytes += compression.wire_bytes(collectives, self.n)
        comm_s = exchange_model_s(collectives, self.n, self.net)
        return comm_s + self.codec_s_per_mb * nbytes / 1e6

    def _deliver(self, w: SimWorker, coll: _Collective) -> None:
        assert coll.done_at is not None
        self.ledger.comm[w.rank] += coll.done_at - coll.completed_at
        if self.shared is not None:  # the round's gradient is already in the one replica
            self.queue.push(coll.done_at, lambda now: self._drive(w, now, None))
            return
        if coll.ops:
            op, mean = coll.ops[w.rank], coll.results[w.rank]

            def resume_compressed(now: float) -> None:
                compression.load_op_result_(op, w.module, mean)  # type: ignore[arg-type]
                self._drive(w, now, None)

            self.queue.push(coll.done_at, resume_compressed)
            return
        assert coll.result is not None
        result, gradients = coll.result, coll.kind is ReduceGradients

        def resume(now: float) -> None:
            if gradients:
                load_gradient_payload_(w.module, result)
            else:
                load_flat_state_(w.module, result)
            self._drive(w, now, None)

        self.queue.push(coll.done_at, resume)

    def _start_reduce(self, w: SimWorker, t: float, op: StartReduce) -> None:
        """A non-blocking reduction: numbered like the blocking ones; the worker resumes at once."""
        k = w.collectives
        w.collectives += 1
        coll = self.reductions.get(k) or self.reductions.setdefault(k, _Collective(StartReduce, self.n))
        coll.arrivals[w.rank] = t
        coll.payloads[w.rank] = op.payload
        if len(coll.payloads) == self.n:  # the last start: the transfer begins now
            payloads = [coll.payloads.pop(r) for r in sorted(coll.payloads)]
            coll.completed_at = t
            coll.done_at = t + self._all_reduce(coll, payloads, compression.nbytes(payloads[0]))
            for rank, asked in list(coll.waiters.items()):
                self._release(k, rank, asked)
        self._drive(w, t, k)

    def _wait_reduce(self, w: SimWorker, t: float, op: WaitReduce) -> None:
        coll = self.reductions[op.handle]
        coll.waiters[w.rank] = t
        if coll.done_at is not None:
            self._release(op.handle, w.rank, t)

    def _release(self, handle: int, rank: int, asked: float) -> None:
        """Resume ``rank`` with the mean once it has arrived: waiting until the last start, then
        the rest of the transfer as communication (none when it arrived while computing)."""
        coll = self.reductions[handle]
        assert coll.done_at is not None and coll.result is not None
        w, result = self.workers[rank], coll.result
        resume_at = max(asked, coll.done_at)
        self.ledger.wait[rank] += max(0.0, coll.completed_at - asked)
        self.ledger.comm[rank] += resume_at - max(asked, coll.completed_at)
        coll.released += 1
        if coll.released == self.n:
            del self.reductions[handle]
        self.queue.push(resume_at, lambda now: self._drive(w, now, result))

    def _push_pull(self, w: SimWorker, t: float, op: PushPull) -> None:
        server = self.server
        assert server is not None, "PushPull needs a strategy with a parameter server"
        if op.payload is not None:
            payload: torch.Tensor | torch.nn.Module = op.payload
            nbytes = payload.numel() * payload.element_size()
        else:  # the gradient: the replica itself, which waits unchanged until its pull returns
            payload, nbytes = w.module, w.gradient_bytes
        # push and pull have the same (state) layout. The server answers a push before it takes
        # the next one, so the pull follows the push on the link as one transaction (as the
        # dist backend's server thread serves them); another worker's push waits behind both.
        transfer_s = point_to_point_s(nbytes, self.net)
        start, end = self.link.reserve(t, 2 * transfer_s)
        self.ledger.wait[w.rank] += start - t  # queued behind other transfers on the link
        self.ledger.comm[w.rank] += 2 * transfer_s
        self.ledger.comm_bytes += 2 * nbytes
        pulled = w.pulled_version

        def arrive(_: float) -> None:
            applied = False if self.diverged else server.apply(w.rank, payload, pulled)
            copy_state_(w.module, server.module)  # the pull carries theta as of its start: now
            w.pulled_version = server.version
            self.queue.push(end, lambda later: self._drive(w, later, applied))

        self.queue.push(start + transfer_s, arrive)


_COMPUTED = torch.empty(0)  # the batched path's placeholder for a worker's payload: its gradient comes at the quorum


def mean_payload(payloads: list[torch.Tensor]) -> torch.Tensor:
    """What an all-reduce of these workers' payloads delivers: their mean (the kept ones' with a
    quorum: the divisor is the number reduced, not N)."""
    return torch.stack(payloads).mean(dim=0) if len(payloads) > 1 else payloads[0]
