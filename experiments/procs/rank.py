"""One rank of a dist run, end to end (``run_worker``): the task prepared and warmed up, the
process groups joined, the Lightning Trainer run with the strategy's worker program
(``syncbench.experiments.procs.program_strategy``) to rank 0's stop decision, then the ledgers
gathered and, on rank 0, the run recorded (``syncbench.experiments.procs.rank_recording``). A
rank that fails reports it: rank 0 under torchrun marks its run FAILED, and a rank whose rank 0
died marks rank 0's run."""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from syncbench.experiments import signals
from syncbench.experiments.procs.clock import TTAMonitor
from syncbench.experiments.procs.control import write_json
from syncbench.experiments.procs.devices import (
    RankDevice,
    choose_rank_device,
    collective_backend,
    cuda_devices,
    requested_device,
)
from syncbench.experiments.procs.emulation import Emulation
from syncbench.experiments.procs.environment import ENV_BUSY, cores_owned, rendezvous_store
from syncbench.experiments.procs.failures import DistRunFailed, WorkerFailure, is_comm_error
from syncbench.experiments.procs.heartbeat import FileHeartbeat, StoreHeartbeat
from syncbench.experiments.procs.program_strategy import program_strategy_class
from syncbench.experiments.procs.rank_recording import (
    dump_debug,
    final_outcome,
    gather_ledgers,
    open_recorder,
    record_run,
    result_to_json,
)
from syncbench.experiments.procs.validation import check_shards
from syncbench.experiments.procs.worker_state import Comm, WorkerState
from syncbench.experiments.recording import open_client
from syncbench.experiments.result import RunResult, record_stopped_run
from syncbench.experiments.sharding import ShardedBatches
from syncbench.experiments.strategy_setup import build_strategy, lr_factor
from syncbench.experiments.task import measure_activation_bytes, measure_peak_mem_bytes, prepare_task, seed_everything
from syncbench.strategies.checkpointing import release_deepspeed_process_group
from syncbench.strategies.lightning_bridge import build_optimizer, take_logged, training_loss
from syncbench.strategies.lightning_flavour import flavour_of


def comm_backend(config_device: str = "auto") -> str:
    """The collective backend of the main group: NCCL on CUDA (unless ``cluster.device`` or
    ``SYNCBENCH_DIST_DEVICE`` is ``cpu``), else gloo."""
    return collective_backend(cuda_devices(), requested_device(config_device))


def rank_device(local_world: int, config_device: str = "auto") -> RankDevice:
    """This rank's backend and device (``procs/devices.py``): one GPU per local rank under NCCL;
    more local ranks than GPUs is refused (``WorkerFailure``, naming the fix) before any group."""
    cuda = cuda_devices()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_world))
    try:
        return choose_rank_device(local_rank, max(local_world, local_rank + 1), cuda,
                                  requested_device(config_device))
    except ValueError as exc:
        raise WorkerFailure(f"rank {local_rank}: {exc}") from None


def keep_metrics_local(module: Any) -> None:
    """torchmetrics objects sync over torch.distributed's default group when computed, which
    Lightning does on every rank at once. Here each rank trains its own replica and rank 0
    evaluates alone, so a synced ``compute()`` waited for ranks that never came (a 30-s gloo
    timeout that failed every dist async run of a module logging a Metric object). Each rank's
    metrics are its own, as in the single-process run Lightning sees."""
    for m in module.modules():
        if hasattr(m, "sync_on_compute") and hasattr(m, "_to_sync"):
            m.sync_on_compute = False
            m._to_sync = False  # torchmetrics copies sync_on_compute here at construction and forward


def run_worker(config: Any, *, rank: int, world: int, local_world: int, wall0: float, emulate: tuple[bool, bool],
               debug_dir: Any = None, attach: dict[str, Any] | None = None, create: dict[str, Any] | None = None,
               control: Path | None = None, heartbeat: FileHeartbeat | None = None, progress: bool = False,
               activation_bytes: int | None = None, validate_task: bool = False, max_steps: int | None = None,
               tracking_uri: str | None = None) -> Any:
    """Train this rank to the outcome. Rank 0 records the run (``attach``: into the
    launcher's run; ``create``: a new run, under torchrun) and returns its ``RunResult``;
    other ranks return a ``RunResult`` without a run id."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning")  # lightning_fabric, lightning.pytorch, lightning.fabric

    task = prepare_task(config)  # checkpointing applied, as in every other caller
    if validate_task:
        check_shards(task, config, world)
    if rank == 0 and activation_bytes is None and create is not None:
        activation_bytes = measure_activation_bytes(task, config)
    _warm_up(task, config, rank, world)
    if config.checkpointing.enabled:  # DeepSpeed made a one-process group for the steps above;
        release_deepspeed_process_group()  # it joins the real one next
    seed_everything(config.seed)

    timeout = datetime.timedelta(seconds=config.cluster.collective_timeout_s)
    chosen = rank_device(local_world, config.cluster.device)
    backend, device = chosen.backend, torch.device(chosen.device)
    local_rank = device.index if device.type == "cuda" else int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    peak = measure_peak_mem_bytes(task, config, device) if rank == 0 else None  # CUDA only
    store = rendezvous_store(rank, world, timeout)  # single node: listening on 127.0.0.1 only
    if store is None:  # torchrun: the address the user gave
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    ctrl = dist.new_group(backend="gloo", timeout=timeout)
    ps = dist.new_group(backend="gloo", timeout=timeout)
    comm = Comm(rank=rank, world=world, device=device, main=None, ctrl=ctrl, ps=ps,
                timeout_s=config.cluster.collective_timeout_s)
    store_hb = None
    if heartbeat is None:
        with contextlib.suppress(Exception):
            store_hb = StoreHeartbeat(dist.distributed_c10d._get_default_store(), rank)

    recorder = None
    torchrun_run_id: list[str | None] = [None]
    monitor = strategy = None

    def strategy_summary() -> dict[str, float]:
        with contextlib.suppress(Exception):
            return dict(strategy.summary_metrics()) if strategy is not None else {}
        return {}

    try:
        if rank == 0:
            recorder = open_recorder(attach, create)
            torchrun_run_id[0] = recorder.run_id
        if attach is None and world > 1:
            # torchrun: every rank learns rank 0's run id, to mark it FAILED should rank 0 die
            # (the job's store may die with rank 0, so it travels in a collective)
            dist.broadcast_object_list(torchrun_run_id, src=0, group=ctrl)
        keep_metrics_local(task.module)
        if rank == 0:
            if create is not None:
                recorder.log_params({**config.flat(), "backend": "dist"})
            eval_module = copy.deepcopy(task.module).cpu()
            monitor = TTAMonitor(config, eval_module, task.val_batches,
                                 on_eval=_on_eval(recorder, control if progress else None))
        # a worker that owns its cores keeps them busy while it straggles (Emulation.straggle)
        hold_core = cores_owned() >= local_world and os.environ.get(ENV_BUSY, "1") != "0"
        emulation = Emulation(config, rank, world, *emulate, hold_core=hold_core)
        worker = WorkerState(config, comm, emulation, monitor, debug=bool(debug_dir))
        definition = build_strategy(config)
        lightning = flavour_of(task.module)  # the module's own Lightning drives it
        strategy = program_strategy_class(lightning)(worker, definition, lr_factor(definition, config.strategy.lr_scaling))
        batches = ShardedBatches(task.train_set, rank, world, config.batch_size, config.seed, task.collate)

        class _Stream(Dataset):  # one epoch = this rank's shard (Lightning counts epochs as the sim does)
            def __len__(self):
                return batches.steps_per_epoch

            def __getitem__(self, index):
                if heartbeat is not None:
                    heartbeat.steps += 1
                return next(batches)

        trainer = lightning.Trainer(
            accelerator="cuda" if device.type == "cuda" else "cpu", devices=[local_rank] if device.type == "cuda" else 1,
            strategy=strategy, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_epochs=-1, max_steps=max_steps or -1,
            use_distributed_sampler=False, log_every_n_steps=0,
        )
        trainer.fit(task.module, train_dataloaders=DataLoader(_Stream(), batch_size=None))
        if not worker.stopped:
            if not max_steps:
                raise WorkerFailure(f"rank {rank}: training ended without a stop decision")
            worker.stopped, worker.stop_outcome = True, worker.stop_outcome or "budget"  # the step cap
        strategy.shutdown()
        rows = gather_ledgers(worker, comm)
        if debug_dir:
            dump_debug(Path(debug_dir), rank, worker, strategy, rows)
        outcome = final_outcome(worker, comm)
        if rank != 0:
            return RunResult(run_id=None, outcome=outcome)
        assert monitor is not None and recorder is not None
        with signals.deferred():  # the finished run is recorded whole; a signal here stops after it
            result = record_run(config, recorder, monitor, worker, strategy, rows, wall0, activation_bytes,
                                {"peak_mem_bytes": float(peak)} if peak is not None else {})
            if control is not None:
                write_json(control / "result.json", result_to_json(result))
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        return result
    except BaseException as exc:
        signum = signals.received()
        if recorder is not None and recorder.finished:
            raise  # recorded whole before the signal was raised (signals.deferred above)
        if recorder is not None and signum is not None and (attach is not None
                                                            or isinstance(exc, signals.Interrupted)):
            # stopped by the launcher (which passed a SIGTERM/SIGINT on): record what was
            # measured, the run KILLED; the launcher leaves a run that is no longer RUNNING alone.
            # (Under torchrun SIGTERM keeps its meaning, _Terminated: torchrun stops the job
            # when a peer failed.)
            with contextlib.suppress(Exception):
                record_stopped_run(recorder, config, monitor.result if monitor is not None else None, signum,
                                   activation_bytes=activation_bytes, extra=strategy_summary(),
                                   wall_s=time.time() - wall0)
            raise
        if recorder is not None:
            if create is not None:  # torchrun: nobody else will mark the run
                message = _failure_message(exc, rank, store_hb, world)
                with contextlib.suppress(Exception):
                    recorder.fail(message)
                raise DistRunFailed(message, recorder.run_id) from exc
            with contextlib.suppress(Exception):
                recorder.flush()  # keep the curve measured so far; the launcher marks the run
        elif attach is None and create is None and tracking_uri and torchrun_run_id[0]:
            # torchrun, a rank other than 0: if rank 0 died, nobody else would end its run
            _fail_orphaned_run(torchrun_run_id[0], store_hb, world, tracking_uri,
                               _failure_message(exc, rank, store_hb, world))
        raise
    finally:
        if store_hb is not None:
            store_hb.stop()


def _fail_orphaned_run(run_id: str, store_hb: "StoreHeartbeat | None", world: int, tracking_uri: str,
                       message: str, grace_s: float = 3.0) -> None:
    """Under torchrun, mark rank 0's run FAILED when rank 0 is gone: its heartbeat in the job's
    store stopped (or the store, which rank 0 may host, is gone) and the run is still RUNNING
    after a grace period in which a live rank 0 would have marked it itself."""
    if store_hb is not None:
        alive = [r for r in range(world) if r not in store_hb.silent_ranks(world, window_s=1.0)]
        store_reachable = True
        try:
            store_hb.store.add("syncbench/probe", 0)
        except Exception:  # noqa: BLE001
            store_reachable = False
        if store_reachable and 0 in alive:
            return  # rank 0 is alive and marks its own run
    time.sleep(grace_s)
    with contextlib.suppress(Exception):
        client = open_client(tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "outcome", "failed")
            client.set_tag(run_id, "syncbench.error", f"worker rank 0 died or hangs (no heartbeat); {message}"[:5000])
            client.set_terminated(run_id, "FAILED")


def _warm_up(task: Any, config: Any, rank: int, world: int, steps: int = 2) -> None:
    """Untimed forward/backward/optimizer steps on a copy of the module, so that one-time
    costs (autograd engine threads, optimizer state, lazy imports) are paid before the
    training clock starts, as the sim backend's calibration pays them; rank skew at the
    first step would otherwise land in the first round's waiting and in TTA."""


    rng = torch.get_rng_state()
    module = copy.deepcopy(task.module)
    optimizer = build_optimizer(module)
    batches = ShardedBatches(task.train_set, rank, world, config.batch_size, config.seed + 3, task.collate)
    for i in range(steps):
        optimizer.zero_grad(set_to_none=True)
        training_loss(module, next(batches), i).backward()
        optimizer.step()
    take_logged(module)
    torch.set_rng_state(rng)


def _failure_message(exc: BaseException, rank: int, store_hb: StoreHeartbeat | None, world: int) -> str:
    message = f"{type(exc).__name__}: {exc}"
    if store_hb is not None and is_comm_error(message):
        silent = store_hb.silent_ranks(world)
        if silent:
            return f"worker rank {silent[0]} died or hangs (no heartbeat); rank {rank} saw: {message.splitlines()[0]}"
    return message


def _on_eval(recorder: Any, control: Path | None):
    state = {"last": 0.0}

    def on_eval(ev: Any) -> None:
        recorder.metrics(ev.metrics, step=ev.updates, clock_s=ev.clock_s)
        if control is not None and time.time() - state["last"] > 0.2:
            state["last"] = time.time()
            with contextlib.suppress(OSError):
                write_json(control / "progress.json", {"clock_s": ev.clock_s, "updates": ev.updates,
                                                       "samples": ev.samples, "metrics": ev.metrics})

    return on_eval
