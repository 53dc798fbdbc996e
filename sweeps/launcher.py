"""The sweep launcher: grid cells × seeds as Optuna trials and MLflow child runs,
optionally tuned first, resumable, safe with several launchers on one storage.

Layout in the stores (the report relies on it):

* Optuna: the study ``<name>`` holds one *eval* trial per cell × seed (user attributes
  ``cell``, ``seed``, ``phase``, ``overrides``; after the run ``outcome``, ``tta_s``,
  ``mlflow_run_id``, ``wall_s``); with ``tune:``, each cell also has a study
  ``<name>/tune/<cell id>`` of ``n_trials`` TPE trials (``phase = tune``). The value is
  ``tta_s`` or a penalty (see :mod:`syncbench.sweeps.trials`); each evaluation of a tuning trial is an
  intermediate value (the target metric) and a trial that ``tune.pruner`` stops is PRUNED
  (its MLflow run ``outcome=pruned``; it counts towards ``n_trials``). Study user attributes keep the spec's
  fingerprint, the calibrated ``step_s`` per task and the MLflow parent run id.
* MLflow: the experiment ``<name>``; one parent run (run name ``<name>``, tags
  ``syncbench.sweep``, ``syncbench.role=parent``; params ``base``, ``grid``, ``seeds``, ``set``,
  ``tune``, ...); one child run per trial (tags ``syncbench.sweep``, ``syncbench.role=trial``,
  ``syncbench.cell``, ``syncbench.seed``, ``syncbench.phase``, ``syncbench.optuna_trial =
  <study>/<number>``; params: the whole flattened config).

Work assignment: every eval trial is enqueued once (``Study.enqueue_trial``) and every
trial is claimed with ``Study.ask()``, both under the storage-wide lock of
:mod:`syncbench.sweeps.storage`, after re-reading the study. So two launchers never enqueue the same
cell × seed twice, never claim the same trial, and never sample more than ``n_trials``
tuning trials per cell. Resume: enqueueing only what has no COMPLETE, RUNNING or WAITING
trial makes a rerun finish what is missing (and retry what failed); a trial whose launcher
died stops beating its heartbeat, and after the grace period the next launcher fails it,
marks its MLflow run KILLED and enqueues a copy (``RetryHeartbeatStaleTrialCallback``).

The launcher's parts: ``syncbench.sweeps.calibration`` (the tasks checked and timed),
``syncbench.sweeps.trial_queue`` (claiming trials), ``syncbench.sweeps.executor`` (running
them), ``syncbench.sweeps.coordinator`` (one launcher's set-up and end).
"""

from __future__ import annotations

import argparse
import sys
import time

from syncbench.experiments import signals
from syncbench.experiments.config import ConfigError
from syncbench.experiments.workspace import check_workspace
from syncbench.sweeps.launch_options import LaunchOptions, SweepResult
from syncbench.sweeps.spec import Sweep, load_sweep


def run_sweep_command(args: argparse.Namespace) -> int:
    """``syncbench sweep``: exit 0 when every trial completed (whatever its outcome), 1 when a
    trial failed, 2 on bad input (raised as ConfigError before anything is created)."""
    sweep = load_sweep(args.spec, args.set, getattr(args, "profile_set", None))
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: must be at least 1")
    executor = getattr(args, "executor", "local")
    if getattr(args, "slurm", None) and executor != "slurm":
        raise ConfigError(f"--slurm {args.slurm[0]}: SLURM settings need --executor slurm")
    progress = not getattr(args, "no_progress", False)
    options = LaunchOptions.from_env(check_workspace(args.workspace), args.storage, args.tracking_uri,
                                     jobs=args.jobs, bar=progress, lines=progress)
    if executor == "slurm":  # launcher jobs on SLURM, followed from here (docs/scaling-out.md)
        from syncbench.sweeps.slurm import slurm_launch

        result = slurm_launch(args, sweep, options)
    else:
        result = run_sweep(sweep, options)
    if result.interrupted and result.signum:
        raise signals.Interrupted(result.signum)  # the command's last word and exit code (syncbench.sweeps.cli.main)
    if result.disk_full:  # one plain paragraph, after the table
        print(f"syncbench: the disk is full: {result.disk_full}", file=sys.stderr)
    return result.exit_code


def run_sweep(sweep: Sweep, options: LaunchOptions) -> SweepResult:
    """Check the tasks, open the stores, set the sweep up, run trials until none is left."""
    # Optuna, MLflow and torch come in with the launcher's working half, once the spec is
    # valid: `syncbench sweep` imports this module before it validates (CLI start-up time)
    from syncbench.sweeps.calibration import preflight
    from syncbench.sweeps.coordinator import Launcher, quiet_optuna

    t0 = time.perf_counter()
    quiet_optuna()
    with signals.armed_section():  # nothing exists yet: a signal simply ends the command
        prepared = preflight(sweep)
    launcher = Launcher(sweep, options)
    try:
        launcher.setup(prepared)
        del prepared
        stopped_by = launcher.run()
        return launcher.finish(time.perf_counter() - t0, stopped_by)
    finally:
        launcher.close()
