"""A sweep with a pinned step_s is reproducible run for run, tuning included, whatever --jobs
is: the same tuned parameters, the same runs, the same summary and verdicts (the demo's
promise: README "What the demo shows")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SPEC = """
name: repro
base: digits_mlp
set:
  cluster.stragglers: {kind: lognormal, sigma: 0.5}
  cluster.compute.step_s: 5.0e-4
  budget.train_time_s: 0.5
  eval.every_s: 0.002
grid:
  strategy.name: [sync, async]
  cluster.workers: [1, 4]
seeds: [0, 1]
tune:
  n_trials: 3
  params:
    task.module_args.lr: {low: 1.0e-3, high: 0.1, log: true}
"""


def sweep_and_report(root: Path, spec: Path, jobs: int) -> tuple[list[str], list[dict]]:
    ws = root / "ws"
    env_args = ["--workspace", str(ws)]
    done = subprocess.run([sys.executable, "-m", "syncbench", "sweep", str(spec), "--jobs", str(jobs),
                           "--no-progress", *env_args], capture_output=True, text=True, timeout=900, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "syncbench", "report", "repro", *env_args],
                          capture_output=True, text=True, timeout=900, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    out = ws / "reports" / "repro"
    claims = json.loads((out / "claims.json").read_text())
    return sorted((out / "summary.csv").read_text().splitlines()), claims


@pytest.mark.heavy
def test_two_fresh_sweeps_give_the_same_summary_and_verdicts_with_any_jobs(tmp_path):
    spec = tmp_path / "repro.yaml"
    spec.write_text(SPEC)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    summary_a, claims_a = sweep_and_report(tmp_path / "a", spec, jobs=2)
    summary_b, claims_b = sweep_and_report(tmp_path / "b", spec, jobs=1)
    assert len(summary_a) == 5  # header + 4 cells
    assert summary_a == summary_b
    assert [(c["key"], c["verdict"], c["comparisons"]) for c in claims_a] == \
        [(c["key"], c["verdict"], c["comparisons"]) for c in claims_b]
