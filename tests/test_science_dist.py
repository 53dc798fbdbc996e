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


def test_dist_training_clock_stops_during_every_evaluation_pause(digits_config):
    """Rank 0's training clock (TTAMonitor, docs/metrics.md) is wall time since the first step
    minus *all* evaluation time: two evaluations that each sleep 0.4 s leave the clock below
    0.4 s after both (the reference: 0.8 s of pauses excluded from a few ms of wall time), and
    each evaluation is stamped with the clock at its start."""
    import time

    from syncbench.experiments.procs.clock import TTAMonitor
    from syncbench.strategies.lightning_bridge import capture_logs

    pause = 0.4
    config = digits_config(SGD, "eval.every_s=0.001", "budget.train_time_s=60", "target.value=1.01")
    task = prepare_task(config)

    class SlowValidation(type(task.module)):  # the same MLP; its validation takes `pause` seconds
        def validation_step(self, batch, batch_idx):
            time.sleep(pause)
            return super().validation_step(batch, batch_idx)

    module = SlowValidation(**config.task.module_args)
    capture_logs(module)  # as the dist worker prepares its evaluation module
    monitor = TTAMonitor(config, module, task.val_batches[:1])
    monitor.start(time.perf_counter())
    spent = [monitor.evaluate(lambda m: None, {"updates": k, "samples": 32 * k})[1] for k in (1, 2)]
    after = monitor.clock()
    assert all(s >= pause for s in spent)
    assert after < pause, f"clock {after:.3f} s after {sum(spent):.3f} s of evaluation"
    clocks = [ev.clock_s for ev in monitor.result.evaluations]
    assert len(clocks) == 2 and clocks[1] < pause and clocks[0] <= clocks[1] <= after
