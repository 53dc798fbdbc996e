"""Small user modules for tests: what a user would bring, including broken ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from syncbench.experiments.digits import MLP


class FailingMLP(MLP):
    """Raises in training_step after `fail_after` steps (a bug in a user's module)."""

    def __init__(self, fail_after: int = 5, **kwargs):
        super().__init__(**kwargs)
        self.fail_after = fail_after
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("boom in the user's training_step")
        return super().training_step(batch, batch_idx)


class SilentMLP(MLP):
    """Logs nothing named `val_acc` (only `accuracy`)."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("accuracy", (self(x).argmax(1) == y).float().mean())


class DictLossMLP(MLP):
    """A training_step returning a dict, and a scheduler in configure_optimizers: Lightning forms."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": F.cross_entropy(self(x), y)}

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1000)}


class SelfKillingMLP(MLP):
    """SIGKILLs its own process in training_step after `kill_after` calls in that process (what
    the OOM killer does to a trial that runs out of memory): the dry run and the first steps
    pass, then the process running the trial -- an inline sweep's launcher -- dies."""

    calls = 0  # per process: shared by the copies a run makes

    def __init__(self, kill_after: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.kill_after = kill_after

    def training_step(self, batch, batch_idx):
        import os
        import signal

        SelfKillingMLP.calls += 1
        if SelfKillingMLP.calls > self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(batch, batch_idx)
