"""Straggler and network emulation on real processes, with the sim backend's cost model."""

from __future__ import annotations

import statistics
import time

from syncbench.experiments.cluster_model import StragglerModel
from syncbench.experiments.config import RunConfig


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
