"""Strategies by name: configs, Optuna and MLflow see plain strings. Adding a strategy is one
file under ``strategies/`` and one line here; the contract tests pick it up."""

from __future__ import annotations

from syncbench.strategies.async_local_sgd import AsyncLocalSGD
from syncbench.strategies.async_ps import Async
from syncbench.strategies.local_sgd import LocalSGD
from syncbench.strategies.program import Strategy
from syncbench.strategies.streaming_diloco import StreamingDiLoCo
from syncbench.strategies.sync import Sync

STRATEGIES: dict[str, type[Strategy]] = {
    "sync": Sync,
    "local_sgd": LocalSGD,
    "async": Async,
    "streaming_diloco": StreamingDiLoCo,
    "async_local_sgd": AsyncLocalSGD,
}
