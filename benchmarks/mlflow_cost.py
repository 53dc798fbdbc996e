"""MLflow cost (issue 2): time spent logging as a fraction of run wall time, for
`mnist1d_cnn` at 8 workers on the SQLite store (target ≤ 2%).

The recorder times every call it makes to MLflow (run creation, params, batched
metrics, tags, artifacts, termination); the run's own wall time is measured around it.

    python -m benchmarks.mlflow_cost
"""

from __future__ import annotations

import argparse
import tempfile

from syncbench.experiments.config import load_config
from syncbench.experiments.run import execute_run
from syncbench.strategies.registry import OPTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/configs/mnist1d_cnn.yaml")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as ws:
        # a first run creates the store (schema migrations): not part of any run's logging cost
        execute_run(load_config(args.config, ["cluster.workers=1", "budget.train_time_s=0.2"]), workspace=ws)
        print(f"{'strategy':<16} {'wall s':>8} {'mlflow s':>9} {'fraction':>9} {'evals':>6}")
        for name in OPTIONS:  # every registered strategy, with its default options
            config = load_config(args.config, [f"strategy.name={name}", f"cluster.workers={args.workers}"])
            result = execute_run(config, workspace=ws)
            evals = round(result.clock_s / config.eval.every_s)
            print(f"{name:<16} {result.wall_s:>8.2f} {result.mlflow_log_s:>9.3f} "
                  f"{result.mlflow_log_s / result.wall_s:>9.2%} {evals:>6}")


if __name__ == "__main__":
    main()
