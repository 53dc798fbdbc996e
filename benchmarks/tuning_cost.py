"""Training clock spent tuning one MNIST-1D cell with the race pruner vs without it.

    python -m benchmarks.tuning_cost [--trials 10] [--workers 1] [--budget 8] [--jobs 1]

Both sweeps tune the same cell (sync at ``--workers`` workers, ``cluster.compute.step_s``
pinned so both run on one clock scale) over the *same* sampled trials: ``--trials``
learning rates drawn once, log-uniform in [3e-4, 3e-2], and enqueued in the same order in
each sweep's tuning study, so the sampler never picks. One sweep has ``tune.pruner: race``
(the default), the other ``tune.pruner: none``. Each trial's training clock is read from its
MLflow run (``clock_s`` at its last evaluation). Target: race / none <= 0.4.

The benchmark also checks what the pruner must never do: the trial that wins without
pruning wins with it too, at the same TTA. Every number comes from this run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.4
STEP_S = 0.0015  # pinned: both sweeps on one clock scale (about this machine's one-worker step)


def tune_sweep(folder: Path, name: str, pruner: str, lrs: list[float], args: argparse.Namespace) -> dict:
    import optuna
    import yaml

    from syncbench.experiments.workspace import default_optuna_storage
    from syncbench.sweeps.launcher import LaunchOptions, run_sweep
    from syncbench.sweeps.spec import load_sweep

    spec = {"name": name, "base": str(REPO / "experiments/configs/mnist1d_cnn.yaml"),
            "set": {"budget.train_time_s": args.budget, "cluster.compute.step_s": STEP_S},
            "grid": {"strategy.name": ["sync"], "cluster.workers": [args.workers]}, "seeds": [0],
            "tune": {"n_trials": len(lrs), "pruner": pruner,
                     "params": {"task.module_args.lr": {"low": 3.0e-4, "high": 3.0e-2, "log": True}}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    workspace = folder / name
    workspace.mkdir()
    sweep = load_sweep(path)
    (cell,) = sweep.cells
    storage = default_optuna_storage(workspace)
    study = optuna.create_study(study_name=f"{name}/tune/{cell.id}", storage=storage, direction="minimize")
    for lr in lrs:  # the same trials, in the same order, in both sweeps
        study.enqueue_trial({"task.module_args.lr": lr})
    options = LaunchOptions.from_env(workspace, None, None, jobs=args.jobs, bar=False, lines=False, table=False)
    t0 = time.perf_counter()
    result = run_sweep(sweep, options)
    wall = time.perf_counter() - t0
    if result.exit_code != 0:
        raise SystemExit(f"sweep {name} exited {result.exit_code}")
    return {"study": optuna.load_study(study_name=study.study_name, storage=storage),
            "clock": tuning_clock(name, workspace), "wall": wall}


def tuning_clock(name: str, workspace: Path) -> dict[float, tuple[float, str]]:
    """lr -> (training clock at the run's last evaluation, outcome) of each tuning trial."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`syncbench.phase` = 'tune'", max_results=1000)
    return {float(r.data.params["task.module_args.lr"]): (float(r.data.metrics["clock_s"]), r.data.tags["outcome"])
            for r in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--budget", type=float, default=8.0, help="budget.train_time_s of each trial")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    lrs = [float(v) for v in np.exp(rng.uniform(np.log(3e-4), np.log(3e-2), size=args.trials))]
    with tempfile.TemporaryDirectory(prefix="tuning-cost-") as tmp:
        folder = Path(tmp)
        race = tune_sweep(folder, "tc-race", "race", lrs, args)
        none = tune_sweep(folder, "tc-none", "none", lrs, args)
    print(f"{'lr':>10} {'no pruner: clock s, outcome':>30} {'race: clock s, outcome':>28}")
    for lr in lrs:
        (cn, on), (cr, orr) = none["clock"][lr], race["clock"][lr]
        print(f"{lr:10.3g} {cn:22.2f} {on:>8} {cr:20.2f} {orr:>8}")
    total_none = sum(c for c, _ in none["clock"].values())
    total_race = sum(c for c, _ in race["clock"].values())
    pruned = sum(o == "pruned" for _, o in race["clock"].values())
    best_none, best_race = none["study"].best_trial, race["study"].best_trial
    same_winner = best_none.params == best_race.params and abs(best_none.value - best_race.value) < 1e-9
    ratio = total_race / total_none
    print(f"\ntuning one cell (sync, N={args.workers}, {args.trials} trials, budget {args.budget:g} s, "
          f"step_s {STEP_S} s pinned, --jobs {args.jobs}):")
    print(f"  training clock, no pruner: {total_none:.2f} s; race pruner: {total_race:.2f} s ({pruned} pruned)")
    print(f"  wall time of the sweeps:   no pruner {none['wall']:.1f} s; race pruner {race['wall']:.1f} s "
          f"(seed run included)")
    print(f"  same best trial: {same_winner} (lr {best_race.params['task.module_args.lr']:.3g}, "
          f"TTA {best_race.value:.2f} s)")
    print(f"  ratio race / none = {ratio:.3f}  (target <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'NOT met'})")


if __name__ == "__main__":
    main()
