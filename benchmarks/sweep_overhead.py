"""What the sweep launcher costs on top of the trials it runs, and how long the demo takes.

    python -m benchmarks.sweep_overhead [--seeds 3] [--skip-demo] [--demo-jobs 2]

1. Per-trial overhead for sim trials: a digits sweep (3 strategies × 4 worker counts ×
   ``--seeds`` seeds) run by ``run_sweep`` in this process with ``--jobs 1``;
   overhead = (sweep wall time − Σ trials' own wall time) / trials, where a trial's own
   wall time is ``execute_run``'s ``wall_s``. Target: ≤ 0.5 s. The same sweep as a
   separate ``syncbench sweep`` process shows the one-time costs too (interpreter start,
   imports, creating the stores), and a second run of it the cost of a resume that finds
   nothing to do. The same sweep with ``--jobs 2`` gives the pool's speed-up.
2. The demo (``sweeps/specs/demo.yaml``) as ``make demo`` runs it, timed end to end.

Every number comes from this run, on this machine; nothing is compared across runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def digits_spec(folder: Path, name: str, seeds: int) -> Path:
    spec = {"name": name, "base": str(REPO / "experiments/configs/digits_mlp.yaml"),
            "grid": {"strategy.name": ["sync", "local_sgd", "async"], "cluster.workers": [1, 2, 4, 8]},
            "seeds": list(range(seeds))}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trial_walls(name: str, workspace: Path) -> list[float]:
    """The trials' own wall times, as the launcher recorded them in the study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{workspace / 'optuna.db'}")
    return [t.user_attrs["wall_s"] for t in study.trials if t.state.name == "COMPLETE"]


def cli(spec: Path, workspace: Path, *args: str, timeout: float = 1800) -> float:
    """Wall time of ``syncbench sweep`` as its own process."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "syncbench.sweeps.cli", "sweep", str(spec), "--workspace", str(workspace),
                           "--no-progress", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"sweep {spec} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return wall


def in_process(spec: Path, workspace: Path) -> tuple[float, int, float]:
    """(launcher wall, trials, Σ trial wall) for a sweep run by ``run_sweep`` here."""
    from syncbench.sweeps.launcher import LaunchOptions, run_sweep
    from syncbench.sweeps.spec import load_sweep

    sweep = load_sweep(spec)
    options = LaunchOptions.from_env(workspace, None, None, bar=False, lines=False, table=False)
    t0 = time.perf_counter()
    result = run_sweep(sweep, options)
    return time.perf_counter() - t0, result.trials_run, result.trials_wall_s


def overhead_rows(tmp: Path, seeds: int) -> list[tuple[str, str]]:
    from syncbench.experiments.recording import open_client

    rows = []
    # in-process: the stores exist and torch is imported before the clock starts
    ws = tmp / "in-process"
    spec = digits_spec(tmp, "overhead-inproc", seeds)
    open_client(f"sqlite:///{ws / 'mlflow.db'}")
    wall, n, trials = in_process(spec, ws)
    rows.append(("trials (digits, sim, --jobs 1)", f"{n}"))
    rows.append(("launcher wall, in-process", f"{wall:.1f} s"))
    rows.append(("Σ trials' own wall time", f"{trials:.1f} s"))
    rows.append(("overhead per trial, in-process (target ≤ 0.5 s)", f"{(wall - trials) / n:.3f} s"))

    # as a command: interpreter start, imports, creating both stores are in the wall time
    ws = tmp / "cli"
    spec = digits_spec(tmp, "overhead-cli", seeds)
    wall = cli(spec, ws)
    walls = trial_walls("overhead-cli", ws)
    rows.append(("`syncbench sweep` wall, fresh workspace", f"{wall:.1f} s"))
    rows.append(("overhead per trial incl. start-up", f"{(wall - sum(walls)) / len(walls):.3f} s"))
    rows.append(("same command again (resume, nothing to run)", f"{cli(spec, ws):.1f} s"))

    ws = tmp / "cli-jobs2"
    spec = digits_spec(tmp, "overhead-jobs2", seeds)
    wall2 = cli(spec, ws, "--jobs", "2")
    rows.append(("`syncbench sweep --jobs 2` wall, fresh workspace", f"{wall2:.1f} s"))
    rows.append(("speed-up of --jobs 2 over --jobs 1 (whole command)", f"{wall / wall2:.2f}x"))
    return rows


def demo_rows(tmp: Path, jobs: int) -> list[tuple[str, str]]:
    import optuna

    ws = tmp / "demo"
    wall = cli(REPO / "sweeps/specs/demo.yaml", ws, "--jobs", str(jobs))
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{ws / 'optuna.db'}")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    outcomes = {o: sum(t.user_attrs["outcome"] == o for t in done) for o in ("reached", "budget", "diverged")}
    return [(f"demo wall, `syncbench sweep demo.yaml --jobs {jobs}` (target ≤ 300 s)", f"{wall:.0f} s"),
            ("demo trials complete / outcomes", f"{len(done)} / " + ", ".join(f"{k} {v}" for k, v in outcomes.items())),
            ("demo Σ trials' own wall time", f"{sum(t.user_attrs['wall_s'] for t in done):.0f} s"),
            ("demo slowest trial", f"{max(t.user_attrs['wall_s'] for t in done):.0f} s")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the 12-cell digits sweep")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--demo-jobs", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("SYNCBENCH_SWEEP_HEARTBEAT_S", "5")
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp:
        os.environ["SYNCBENCH_WORKSPACE"] = str(Path(tmp) / "data")  # shared dataset cache
        rows += overhead_rows(Path(tmp), args.seeds)
        if not args.skip_demo:
            rows += demo_rows(Path(tmp), args.demo_jobs)
    width = max(len(k) for k, _ in rows)
    print(f"sweep launcher overhead ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
