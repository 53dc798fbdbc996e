"""Wrong science the dist backend could hide (issue 15), on 2 real gloo processes: sync is one
worker at N times the batch (torch.optim.SGD without momentum, so summing the ranks' gradients
instead of averaging them doubles every step), and each evaluation sees exactly the updates it
counts (the evaluated model is the reference model after that many steps)."""

from __future__ import annotations

import pytest
import torch

from syncbench.experiments.procs.launcher import execute_dist_run
from syncbench.experiments.task import prepare_task
from tests.test_science import SGD, plain_sgd_trajectory


@pytest.mark.heavy
def test_dist_sync_is_plain_sgd_at_n_times_the_batch_and_evaluations_are_causal(digits_config, tmp_path):
    config = digits_config(SGD, "strategy.name=sync", "cluster.workers=2", "cluster.backend=dist", "batch_size=16",
                           "target.value=1.01", "budget.train_time_s=60", "eval.every_s=0.002")
    task = prepare_task(config)
    steps = 25
    reference = plain_sgd_trajectory(task.module, task, 2, 16, config.seed, steps, lr=0.1)
    debug = tmp_path / "debug"
    result = execute_dist_run(config, workspace=tmp_path / "ws", debug_dir=debug, max_steps=steps, emulate="none")
    for rank in (0, 1):
        final = torch.load(debug / f"rank{rank}.pt", weights_only=False)["final"]
        torch.testing.assert_close(final[: reference[steps][0].numel()], reference[steps][0], atol=1e-5, rtol=0)
    evaluations = [ev for ev in result.evaluations if 0 < ev.updates < steps]
    assert len(evaluations) >= 2, [ev.updates for ev in result.evaluations]
    for ev in result.evaluations:
        assert ev.metrics["val_loss"] == pytest.approx(reference[ev.updates][1], abs=1e-5), ev.updates
