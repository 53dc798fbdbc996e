"""Update strategies, looked up by name: configs, Optuna and MLflow see plain strings.

``STRATEGIES`` maps each name to its simulated-cluster class; the real-process
(Lightning) adapters are registered under the same names by the dist backend.
"""

from strategies.async_ps import AsyncPSStrategy
from strategies.base import SimStrategy
from strategies.local_sgd import LocalSGDStrategy
from strategies.sync import SyncStrategy

STRATEGIES: dict[str, type[SimStrategy]] = {
    "sync": SyncStrategy,
    "local_sgd": LocalSGDStrategy,
    "async": AsyncPSStrategy,
}
