"""The shipped tasks: each loads its real data and learns; missing data is a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from syncbench.experiments.config import ConfigError, load_config
from syncbench.experiments.run import execute_run
from syncbench.experiments.task import prepare_task

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("name", ["digits_mlp", "mnist1d_cnn", "fashion_mlp", "charlm"])
def test_shipped_configs_validate_and_keep_eval_resolution(name):
    path = CONFIGS / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path.name} not shipped")
    config = load_config(path)
    assert config.eval.every_s < config.budget.train_time_s


def test_mnist1d_is_generated_locally_and_cached(workspace):
    config = load_config(CONFIGS / "mnist1d_cnn.yaml", ["task.data_args.num_samples=2000"])
    task = prepare_task(config)
    assert len(task.train_set) == 1600
    cached = list((workspace / "data").glob("mnist1d-2000.npz"))
    assert cached, "generated arrays are cached in the workspace"
    with np.load(cached[0]) as d:
        assert d["x"].shape == (1600, 40)


@pytest.mark.heavy
def test_mnist1d_cnn_reaches_its_target(workspace):
    config = load_config(CONFIGS / "mnist1d_cnn.yaml", ["cluster.workers=2", "strategy.name=local_sgd",
                                                        "cluster.compute.step_s=0.0015"])
    result = execute_run(config, workspace=workspace)
    assert result.outcome == "reached" and result.best_val >= 0.90


@pytest.mark.heavy
@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed (.ci/run installs it)")
def test_fashion_mlp_reaches_its_target(workspace):
    config = load_config(CONFIGS / "fashion_mlp.yaml", ["cluster.workers=1", "cluster.compute.step_s=0.003"])
    task = prepare_task(config)
    assert len(task.train_set) == 60000 and sum(len(b[0]) for b in task.val_batches) == 10000
    result = execute_run(config, workspace=workspace)
    assert result.outcome == "reached" and result.best_val >= 0.85


def test_fashion_missing_files_say_how_to_install(tmp_path):
    config = load_config(CONFIGS / "fashion_mlp.yaml", [f"task.data_args.root={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        prepare_task(config)
    message = str(err.value)
    assert "task.data_args" in message and "apt-get install dataset-fashion-mnist" in message
    assert "task.data_args.root" in message
