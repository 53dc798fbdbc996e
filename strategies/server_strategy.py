"""What the strategies with a parameter server share (``Traits.has_parameter_server``): the
global model is the server's parameters, and the staleness of the pushes it applies --
``ParameterServer.staleness``, counted by its ``apply`` -- is recorded as the curves
``staleness_mean`` / ``staleness_max``, summary percentiles and ``staleness.json``."""

from __future__ import annotations

import abc
import json
from collections import Counter

import numpy as np
import torch

from syncbench.strategies.program import ParameterServer, Strategy, WorkerProgram
from syncbench.strategies.tensors import flat_state, load_flat_state_


def staleness_summary(counts: Counter) -> dict[str, float]:
    if not counts:
        return {}
    values = np.repeat(np.array(list(counts.keys())), list(counts.values()))
    return {
        "staleness_mean": float(values.mean()),
        "staleness_max": float(values.max()),
        "staleness_p50": float(np.percentile(values, 50)),
        "staleness_p90": float(np.percentile(values, 90)),
    }


def staleness_curve(counts: Counter) -> dict[str, float]:
    """The staleness so far, as a curve point: mean and max (0 before any push)."""
    total = sum(counts.values())
    return {"staleness_mean": float(sum(s * c for s, c in counts.items()) / total) if total else 0.0,
            "staleness_max": float(max(counts)) if counts else 0.0}


def staleness_artifact(counts: Counter) -> dict[str, str]:
    """``staleness.json``: the histogram, staleness -> applied pushes."""
    return {"staleness.json": json.dumps({int(k): int(v) for k, v in sorted(counts.items())})}


class ServerStrategy(Strategy):
    """A strategy whose programs ``PushPull`` to a parameter server: subclasses give the server
    (``server``) and the counters; the global model and the staleness records are here."""

    @abc.abstractmethod
    def server(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> ParameterServer:
        """The parameter server: ``module`` is its own copy of the model, ``optimizer`` the
        module's own optimizer on it (with its schedulers)."""

    def load_global(self, target: torch.nn.Module, programs: list[WorkerProgram],
                    server: ParameterServer | None) -> None:
        assert server is not None
        if target is not server.module:
            load_flat_state_(target, flat_state(server.module).to("cpu"))

    def curve_metrics(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, float]:
        assert server is not None
        return staleness_curve(server.staleness)

    def summary_metrics(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, float]:
        assert server is not None
        return staleness_summary(server.staleness)

    def artifacts(self, programs: list[WorkerProgram], server: ParameterServer | None) -> dict[str, str]:
        assert server is not None
        return staleness_artifact(server.staleness)
