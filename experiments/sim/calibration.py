"""What the sim backend measures on this machine before it simulates: the seconds of a worker
step of the prepared module (``calibrate_step``; a sweep pins it for all its sim cells) and the
encode/decode seconds per MB of a gradient codec (``cluster.compute.codec_s_per_mb``)."""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from syncbench.experiments.config import RunConfig
from syncbench.experiments.sharding import ShardedBatches
from syncbench.experiments.sim.batching import move_to
from syncbench.experiments.task import PreparedTask
from syncbench.strategies import compression
from syncbench.strategies.compression import make_codec, param_shapes
from syncbench.strategies.lightning_bridge import build_optimizer, take_logged, training_loss
from syncbench.strategies.program import gradient_payload


CALIBRATION_BLOCKS = 8  # medians of blocks of steps: the step time and its measured variability

CALIBRATION_BLOCK_STEPS = 8


@dataclass
class StepCalibration:
    """A calibrated step time: ``samples`` are the medians of ``len(samples)`` blocks of
    steps (the variability of repeated real measurements, which claim (d) tests with), and
    ``step_s`` is the least of them (a burst of load from other processes inflates a median;
    an inflated step_s stretches every simulated clock)."""

    step_s: float
    samples: list[float]


def calibrate_step(task: PreparedTask, config: RunConfig, blocks: int = CALIBRATION_BLOCKS,
                   block_steps: int = CALIBRATION_BLOCK_STEPS, warmup: int = 3, device: str = "cpu") -> StepCalibration:
    """Time real training steps (forward, backward, optimizer step) of the prepared module
    (``prepare_task``: checkpointing applied) at the per-worker batch size, on a copy so the
    run's state is untouched: ``warmup`` steps, then ``blocks`` blocks of ``block_steps``.

    Timed with the thread's CPU clock: with one intra-op thread the step runs on this
    thread, and CPU time does not count the time other processes (a parallel sweep, a
    busy machine) hold the core, which inflated wall-clock medians 3-6x here under load.
    On a CUDA ``device`` (``cluster.device``) the step runs there and is timed by the wall clock
    between two synchronisations (the CPU thread only queues kernels)."""
    return calibrate_steps([(task, config)], blocks, block_steps, warmup, device)[0]


def calibrate_steps(models: list[tuple[PreparedTask, RunConfig]], blocks: int = CALIBRATION_BLOCKS,
                    block_steps: int = CALIBRATION_BLOCK_STEPS, warmup: int = 3,
                    device: str = "cpu") -> list[StepCalibration]:
    """``calibrate_step`` for several models at once, their blocks interleaved (block 1 of
    each, then block 2 of each, ...): the speed of a virtual machine drifts within minutes
    (here: the same loop 1.0 then 1.7 ms), and CPU time does not see a host taking the core
    away, so models timed one after the other (a checkpointed cell and its plain twin) could
    differ by the drift alone; interleaved, the drift hits them all alike."""
    cuda = torch.device(device).type == "cuda"

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return time.thread_time()

    timers = []
    rng_state = torch.get_rng_state()
    for task, config in models:
        module = copy.deepcopy(task.module).to(device)
        batches = ShardedBatches(task.train_set, 0, 1, config.batch_size, config.seed + 1, task.collate)
        timers.append((module, build_optimizer(module), batches, []))

    def step(timer: tuple[Any, Any, Any, list[float]], i: int, timed: bool) -> None:
        module, optimizer, batches, times = timer
        batch = move_to(next(batches), device)
        t0 = clock()
        optimizer.zero_grad(set_to_none=True)
        training_loss(module, batch, i).backward()
        optimizer.step()
        if timed:
            times.append(clock() - t0)

    for timer in timers:
        for i in range(warmup):
            step(timer, i, timed=False)
    for b in range(blocks):
        for timer in timers:
            for i in range(block_steps):
                step(timer, warmup + b * block_steps + i, timed=True)
    torch.set_rng_state(rng_state)
    out = []
    for module, _, _, times in timers:
        take_logged(module)
        samples = [statistics.median(times[b * block_steps:(b + 1) * block_steps]) for b in range(blocks)]
        out.append(StepCalibration(min(samples), samples))
    return out


def calibrate_step_s(task: PreparedTask, config: RunConfig) -> float:
    """The calibrated seconds per worker step (``calibrate_step``)."""
    return calibrate_step(task, config).step_s


STEP_SAMPLES_TAG = "syncbench.step_time_samples"  # JSON list of the calibration's block medians


def step_samples_tag(samples: list[float]) -> str:
    return json.dumps([float(f"{x:.6g}") for x in samples])


def calibrate_codec_s_per_mb(task: PreparedTask, config: RunConfig) -> float:
    """Encode + decode seconds per MB of the configured codec on this machine, on a payload the
    size of the task's gradients (``cluster.compute.codec_s_per_mb``; what a sweep pins)."""
    codec = make_codec(config.strategy.options(), param_shapes(task.module))
    if codec is None:
        return 0.0
    payload = torch.randn(gradient_payload(task.module).numel(), generator=torch.Generator().manual_seed(0))
    return measure_codec_s_per_mb(codec, payload, config.cluster.workers)


def measure_codec_s_per_mb(codec: Any, payload: torch.Tensor, world: int, repeats: int = 5) -> float:
    """Encode + decode seconds per MB charged to one worker of a ``world``-worker exchange
    (``compression.codec_seconds_per_mb``: one encode and, for all-gather codecs, N decodes)."""
    return compression.codec_seconds_per_mb(codec, payload, world, repeats)
