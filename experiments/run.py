"""One run, end to end, on the backend its config names (``cluster.backend``): the simulated
cluster (``syncbench.experiments.sim.driver``) or real processes
(``syncbench.experiments.procs.launcher``). Both validate the task before any MLflow run exists
and record the run as docs/metrics.md says."""

from __future__ import annotations

import time
from pathlib import Path

from syncbench.experiments.config import RunConfig
from syncbench.experiments.procs.launcher import execute_dist_run
from syncbench.experiments.result import RunResult
from syncbench.experiments.sim.driver import EvaluationCallback, execute_sim_run
from syncbench.experiments.workspace import default_tracking_uri, workspace_dir


def execute_run(config: RunConfig, *, workspace: str | Path | None = None, tracking_uri: str | None = None,
                experiment: str | None = None, tags: dict[str, str] | None = None,
                parent_run_id: str | None = None, run_name: str | None = None,
                progress: bool = False, on_evaluation: EvaluationCallback | None = None) -> RunResult:
    """Run one config to its outcome and record it. Bad input raises ``ConfigError`` before
    any MLflow run exists; an exception during training marks the run FAILED and re-raises.

    ``on_evaluation(clock_s, metrics)`` (sim backend only) is called after each evaluation;
    returning True at one that does not end the run (target, budget, divergence) stops it
    there with outcome ``pruned`` (MLflow tag ``outcome=pruned``, run FINISHED, no TTA)."""
    wall0 = time.perf_counter()
    ws = workspace_dir(workspace)
    tracking_uri = tracking_uri or default_tracking_uri(ws)
    if config.cluster.backend == "dist":  # real processes
        return execute_dist_run(config, workspace=ws, tracking_uri=tracking_uri, experiment=experiment, tags=tags,
                                parent_run_id=parent_run_id, run_name=run_name, progress=progress)
    return execute_sim_run(config, workspace=ws, tracking_uri=tracking_uri, experiment=experiment, tags=tags,
                           parent_run_id=parent_run_id, run_name=run_name, progress=progress,
                           on_evaluation=on_evaluation, wall0=wall0)
