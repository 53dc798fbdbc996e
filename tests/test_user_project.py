"""A user's own project, as a user has it (issue 21): a package named ``experiments`` (the name
of one of syncbench's own folders) holding a LightningModule and a LightningDataModule written
with ``import lightning as L`` or with ``pytorch_lightning``, a run config next to it, and
``python -m syncbench run run.yaml`` run from that directory on both backends. Real processes,
nothing mocked. Also: either Lightning package works when the other cannot be imported, and
bad input (a class of neither flavour, a package that is not importable) exits 2 with a
message and no traceback, before any run is created."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

IMPORTS = {"lightning": "import lightning as L", "pytorch_lightning": "import pytorch_lightning as L"}

# a small MLP on scikit-learn's digits: val_acc 0.9 in well under a second of training. It uses
# what users write: a torchmetrics object logged as the target, a step scheduler in the dict
# form, save_hyperparameters, and a fit hook that reads the Trainer.
MY_TASK = '''\
"""My task: an MLP on scikit-learn's 8x8 digits."""

import numpy as np
import torch
import torch.nn.functional as F
{import_line}
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


class Net(L.LightningModule):
    def __init__(self, lr: float = 0.01, hidden: int = 64):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.batches_per_epoch = None

    def forward(self, x):
        return self.net(x)

    def on_train_start(self):
        self.batches_per_epoch = self.trainer.num_training_batches

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.val_acc(logits.argmax(dim=1), y)
        self.log("val_acc", self.val_acc, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000, gamma=0.5)
        return {{"optimizer": opt, "lr_scheduler": {{"scheduler": sched, "interval": "step"}}}}


class Digits(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.train_set = self.val_set = None

    def setup(self, stage=None):
        if self.train_set is not None:
            return
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.long)
        order = torch.tensor(np.random.default_rng(0).permutation(len(x)))
        self.val_set = TensorDataset(x[order[:360]], y[order[:360]])
        self.train_set = TensorDataset(x[order[360:]], y[order[360:]])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=1000)
'''

RUN_YAML = """\
name: my-project
task:
  module: experiments.my_task:Net
  data: experiments.my_task:Digits
  module_args: {lr: 0.01}
target: {metric: val_acc, value: 0.9, mode: max}
budget: {train_time_s: 10}
eval: {every_s: 0.02}
batch_size: 32
seed: 0
strategy: {name: sync}
cluster:
  backend: sim
  workers: 2
  compute: {step_s: 0.001}
"""


def write_project(root: Path, flavour: str) -> Path:
    """The user's directory: ``experiments/__init__.py``, ``experiments/my_task.py``, ``run.yaml``."""
    package = root / "experiments"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""My experiments."""\n')
    (package / "my_task.py").write_text(MY_TASK.format(import_line=IMPORTS[flavour]))
    (root / "run.yaml").write_text(RUN_YAML)
    return root


def syncbench(project: Path, *args: str, prelude: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m syncbench ARGS`` run from the project's directory, as the user runs it (no
    PYTHONPATH of ours: syncbench is the installed package). ``prelude``: Python code run first
    in the same interpreter (``-c``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SYNCBENCH_WORKSPACE"] = str(project.parent / "ws")
    if prelude is None:
        command = [sys.executable, "-m", "syncbench", *args]
    else:
        code = prelude + "\nimport runpy, sys\nsys.argv = ['syncbench', *sys.argv[1:]]\n" \
                         "runpy.run_module('syncbench', run_name='__main__', alter_sys=True)\n"
        command = [sys.executable, "-c", code, *args]
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


def assert_reached(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "outcome=reached" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("flavour", ["lightning", pytest.param("pytorch_lightning", marks=pytest.mark.heavy)])
def test_a_users_experiments_package_runs_on_sim(flavour, tmp_path):
    project = write_project(tmp_path / "proj", flavour)
    assert_reached(syncbench(project, "run", "run.yaml", "--no-progress"))


@pytest.mark.heavy
def test_a_users_experiments_package_written_with_lightning_runs_on_dist(tmp_path):
    """Real worker processes, each driving the module with ``lightning.pytorch``'s own Trainer."""
    project = write_project(tmp_path / "proj", "lightning")
    done = syncbench(project, "run", "run.yaml", "--no-progress", "--set", "cluster.backend=dist",
                     "--set", "cluster.workers=2")
    assert_reached(done)


# ------------------------------------------------------------------------------------------
# one Lightning package absent: modules of the other still work
# ------------------------------------------------------------------------------------------
BLOCK = """\
import atexit, importlib.abc, sys
BLOCKED, TRIED = {blocked!r}, []

class _Absent(importlib.abc.MetaPathFinder):
    # as if the package were not installed: importing it or any submodule fails
    def find_spec(self, name, path=None, target=None):
        if name == BLOCKED or name.startswith(BLOCKED + "."):
            TRIED.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Absent())
atexit.register(lambda: print("blocked-imports:", sorted(set(TRIED)),
                              sorted(m for m in sys.modules if m == BLOCKED or m.startswith(BLOCKED + ".")),
                              file=sys.stderr))
"""


@pytest.mark.heavy
@pytest.mark.parametrize("flavour,blocked", [("lightning", "pytorch_lightning"), ("pytorch_lightning", "lightning")])
def test_either_package_works_without_the_other(flavour, blocked, tmp_path):
    """The user's module is the user's own (the shipped tasks import pytorch_lightning): with the
    other package unimportable, nothing on the run's path (config, CLI, sim backend, recording)
    imports it, and the run reaches its target."""
    project = write_project(tmp_path / "proj", flavour)
    done = syncbench(project, "run", "run.yaml", "--no-progress", prelude=BLOCK.format(blocked=blocked))
    assert_reached(done)
    report = [line for line in done.stderr.splitlines() if line.startswith("blocked-imports:")]
    assert report == ["blocked-imports: [] []"], done.stderr[-3000:]  # nobody even tried


# ------------------------------------------------------------------------------------------
# bad input: exit 2, one message, no traceback, before any run is created
# ------------------------------------------------------------------------------------------
def assert_refused(done: subprocess.CompletedProcess, workspace: Path) -> str:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    runs = [p for p in (workspace / "artifacts").glob("*")] if (workspace / "artifacts").exists() else []
    assert not runs, runs
    if (workspace / "mlflow.db").exists():
        import sqlite3

        with sqlite3.connect(workspace / "mlflow.db") as db:
            assert db.execute("select count(*) from runs").fetchone() == (0,)
    return done.stderr


@pytest.mark.heavy  # a CLI subprocess or real signals: seconds each; `make test` and CI run it
def test_a_module_of_neither_flavour_is_refused_naming_it_and_its_bases(tmp_path):
    project = write_project(tmp_path / "proj", "lightning")
    (project / "experiments" / "plain.py").write_text(
        "import torch\n\n\nclass Mixin:\n    pass\n\n\nclass Net(Mixin, torch.nn.Module):\n    pass\n")
    done = syncbench(project, "run", "run.yaml", "--no-progress", "--set", "task.module=experiments.plain:Net")
    message = assert_refused(done, tmp_path / "ws")
    assert "task.module" in message and "experiments.plain.Net is not a LightningModule subclass" in message
    assert "experiments.plain.Mixin" in message and "torch.nn.modules.module.Module" in message  # its bases
    assert "lightning.pytorch.LightningModule" in message and "pytorch_lightning.LightningModule" in message


@pytest.mark.heavy  # a CLI subprocess or real signals: seconds each; `make test` and CI run it
def test_a_package_that_is_not_importable_is_refused_naming_where_it_was_looked_for(tmp_path):
    project = write_project(tmp_path / "proj", "lightning")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SYNCBENCH_WORKSPACE"] = str(tmp_path / "ws")
    done = subprocess.run([sys.executable, "-m", "syncbench", "run", str(project / "run.yaml"), "--no-progress",
                           "--set", "task.module=my_experiments.my_task:Net"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    message = assert_refused(done, tmp_path / "ws")
    assert "task.module" in message and "'my_experiments.my_task'" in message, message
    assert "no module 'my_experiments'" in message, message
    for tried in (project, elsewhere):  # the config's directory and the current directory
        assert str(tried) in message, message
    # the package exists but the module in it does not: say which package was found, and where
    done = syncbench(project, "run", "run.yaml", "--no-progress", "--set", "task.module=experiments.nope:Net")
    message = assert_refused(done, tmp_path / "ws")
    assert f"package 'experiments' (from {project / 'experiments'}) has no module 'nope'" in message, message
