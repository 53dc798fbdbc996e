"""The interface every simulated strategy implements, and flat-parameter helpers.

The run loop (``experiments.run_loop``) owns the training clock, evaluation, the TTA rule
and recording; a strategy only says when its next event happens (``next_time``),
processes it (``advance``) and exposes the global model. Strategies never copy the loop.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from strategies.cluster import SimContext


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainable(module)])


@torch.no_grad()
def load_flat_params_(module: torch.nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in trainable(module):
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p))
        offset += n
    assert offset == flat.numel(), "flat vector does not match the module's parameters"


def flat_grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in trainable(module)
    ])


def load_flat_grads_(module: torch.nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in trainable(module):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


@dataclass
class StrategyStats:
    """Counters the run loop records at each evaluation."""

    updates: int = 0  # global updates (the curves' `step`)
    samples: int = 0  # training samples whose gradients reached the model


class SimStrategy(abc.ABC):
    """A strategy driven by the simulated cluster's virtual clock."""

    name: str = ""

    def __init__(self, ctx: SimContext):
        self.ctx = ctx
        self.stats = StrategyStats()
        self.clock = 0.0  # virtual time of the last processed event

    @abc.abstractmethod
    def next_time(self) -> float:
        """Virtual time of the next event (its effects are visible from then on)."""

    @abc.abstractmethod
    def advance(self) -> None:
        """Process the next event: compute gradients, apply updates, charge the ledger."""

    @abc.abstractmethod
    def global_model(self) -> pl.LightningModule:
        """The model evaluated for time-to-accuracy (DESIGN.md "Strategy semantics")."""

    def extra_metrics(self) -> dict[str, float]:
        """Strategy-specific curve values (e.g. staleness) recorded at each evaluation."""
        return {}

    def summary_metrics(self) -> dict[str, float]:
        """Strategy-specific summary values recorded once at the end."""
        return {}
