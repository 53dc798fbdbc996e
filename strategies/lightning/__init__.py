"""Real-process strategies for the dist backend: Lightning ``Strategy`` adapters that present
each worker to Lightning as a single process and own their communication over
torch.distributed (see ``strategies.lightning.base``). Looked up by the same names as the
sim backend's ``strategies.STRATEGIES``."""

from strategies.lightning.async_ps import AsyncWorkerStrategy
from strategies.lightning.base import WorkerFailure, WorkerState, WorkerStrategy
from strategies.lightning.local_sgd import LocalSGDWorkerStrategy
from strategies.lightning.sync import SyncWorkerStrategy

ADAPTERS: dict[str, type[WorkerStrategy]] = {
    "sync": SyncWorkerStrategy,
    "local_sgd": LocalSGDWorkerStrategy,
    "async": AsyncWorkerStrategy,
}

__all__ = ["ADAPTERS", "WorkerFailure", "WorkerState", "WorkerStrategy", "SyncWorkerStrategy",
           "LocalSGDWorkerStrategy", "AsyncWorkerStrategy"]
