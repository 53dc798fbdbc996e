"""Strategies by name: configs, Optuna and MLflow see plain strings. Adding a strategy is one
file under ``strategies/`` and one line here; the contract tests pick it up."""

from __future__ import annotations

from strategies.async_local_sgd import AsyncLocalSGD
from strategies.async_ps import Async
from strategies.local_sgd import LocalSGD
from strategies.program import Strategy
from strategies.streaming_diloco import StreamingDiLoCo
from strategies.sync import Sync

STRATEGIES: dict[str, type[Strategy]] = {
    "sync": Sync,
    "local_sgd": LocalSGD,
    "async": Async,
    "streaming_diloco": StreamingDiLoCo,
    "async_local_sgd": AsyncLocalSGD,
}
