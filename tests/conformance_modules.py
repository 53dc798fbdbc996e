"""Small LightningModules as people write them, one per item of "The user's module, as
Lightning runs it" (docs/lightning-modules.md): LR schedules in Lightning's return forms, torchmetrics,
BatchNorm, hooks, and the refused ones. Each records the lr of every optimizer step it takes
(``on_before_optimizer_step``), so a run can be compared with Lightning's Trainer."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from syncbench.experiments.classification import ArrayDataModule, ClassifierModule
from syncbench.experiments.digits import _digits


class SmallDigits(ArrayDataModule):
    """256 training images (8 steps of 32 per epoch on one worker), 200 for validation."""

    def load_arrays(self):
        x, y = _digits()
        x = (x / 16.0).astype(np.float32)
        order = np.random.default_rng(12345).permutation(len(x))
        tr, va = order[:256], order[256:456]
        return x[tr], y[tr], x[va], y[va]

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=64)  # several batches: reductions matter


class Base(ClassifierModule):
    """MLP on digits, SGD; ``lrs`` = the lr of each optimizer step."""

    def __init__(self, lr: float = 0.1, hidden: int = 16, **kw):
        super().__init__(lr=lr, optimizer="sgd", **kw)
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.lrs: list[float] = []

    def forward(self, x):
        return self.net(x)

    def on_before_optimizer_step(self, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


class WarmupLambda(Base):
    """The issue's case: a bare per-step LambdaLR, lr 0 at step 0 and lr afterwards (returned
    as two lists, the default interval being epoch: Lightning steps it once per epoch)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s == 0 else 1.0)]


class StepIntervalLambda(Base):
    """The dict form, interval step, frequency 3."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s == 0 else 0.9 ** s)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 3}}


class EpochStepLR(Base):
    """A bare scheduler object in the dict, plus a second one in a list of configs: StepLR per
    epoch (every 2nd epoch) and a chainable ExponentialLR per step."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5), "frequency": 2},
                       {"scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, 0.97), "interval": "step"}]


class Plateau(Base):
    """ReduceLROnPlateau on the validation loss, once per epoch."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_acc"}}


class PlateauUnlogged(Plateau):
    def configure_optimizers(self):
        conf = super().configure_optimizers()
        conf["lr_scheduler"]["monitor"] = "val_nothing"
        return conf


class Metrics(Base):
    """torchmetrics objects logged as objects (and one MetricCollection through log_dict)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        from torchmetrics import MetricCollection
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        self.val_accuracy = MulticlassAccuracy(num_classes=10)
        self.val_macro = MetricCollection({"val_f1": MulticlassF1Score(num_classes=10)})

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        x, y = batch
        preds = self(x).argmax(dim=1)
        self.val_accuracy(preds, y)
        self.log("val_accuracy", self.val_accuracy, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.val_macro.update(preds, y)
        self.log_dict(self.val_macro)
        self.log("val_max_loss", F.cross_entropy(self(x), y), reduce_fx="max")


class BatchNorm(Base):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


class RecordsFitHooks:
    """Mixin (either Lightning flavour): records the training fit hooks it sees in ``calls``,
    with what it reads of the Trainer."""

    def _rec(self, name, *extra):
        self.calls.append((name, self.global_step, self.current_epoch, *extra))

    def on_fit_start(self):
        self._rec("on_fit_start", str(self.device), self.trainer.world_size, self.trainer.is_global_zero)

    def on_train_start(self):
        self._rec("on_train_start", self.trainer.num_training_batches)

    def on_train_epoch_start(self):
        self._rec("on_train_epoch_start")

    def on_train_epoch_end(self):
        self._rec("on_train_epoch_end")

    def on_train_batch_start(self, batch, batch_idx):
        self._rec("on_train_batch_start", batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._rec("on_train_batch_end", batch_idx, sorted(outputs) if isinstance(outputs, dict) else None)

    def on_before_backward(self, loss):
        self._rec("on_before_backward")

    def on_after_backward(self):
        self._rec("on_after_backward")


class Hooks(RecordsFitHooks, Base):
    """Records the fit hooks it sees and what it reads of the Trainer."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list[tuple] = []

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self._rec("on_before_optimizer_step")

    def on_validation_epoch_start(self):
        self._rec("on_validation_epoch_start")

    def on_validation_epoch_end(self):
        self._rec("on_validation_epoch_end")

    def on_train_end(self):
        self._rec("on_train_end")


class Manual(Base):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False


class TwoOptimizers(Base):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


class BatchNormEpochLR(BatchNorm):
    """BatchNorm with a per-epoch StepLR and a per-step ExponentialLR (two-worker comparisons)."""

    configure_optimizers = EpochStepLR.configure_optimizers


# ------------------------------------------------------------------------------------------
# one module written both ways: with pytorch_lightning and with `import lightning as L`
# ------------------------------------------------------------------------------------------
def written_with(L):
    """A module and its data, the same source written against ``L`` (``pytorch_lightning`` or
    ``lightning.pytorch``: separate class hierarchies, each driven by its own Trainer). It
    combines what the classes above test one by one: a per-epoch StepLR (every 2nd epoch) and a
    per-step ExponentialLR, BatchNorm, a torchmetrics object, the fit hooks it sees and what it
    reads of the Trainer."""
    from torchmetrics.classification import MulticlassAccuracy

    class Flavoured(RecordsFitHooks, L.LightningModule):
        def __init__(self, lr: float = 0.1, hidden: int = 16):
            super().__init__()
            self.lr = lr
            self.net = nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 10))
            self.val_accuracy = MulticlassAccuracy(num_classes=10)
            self.lrs: list[float] = []
            self.calls: list[tuple] = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())
            self.val_accuracy(logits.argmax(dim=1), y)
            self.log("val_accuracy", self.val_accuracy, on_epoch=True)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=self.lr)
            return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5), "frequency": 2},
                           {"scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, 0.97), "interval": "step"}]

        # the fit hooks (training only: the Trainer validates this module, the harness a copy) come
        # from RecordsFitHooks; this one also records the lr each optimizer step uses

        def on_before_optimizer_step(self, optimizer):
            self.lrs.append(optimizer.param_groups[0]["lr"])
            self._rec("on_before_optimizer_step")

        def on_train_end(self):
            self._rec("on_train_end")

    class FlavouredDigits(L.LightningDataModule):
        """SmallDigits, on ``L``."""

        def __init__(self):
            super().__init__()
            self.train_set = self.val_set = None

        def setup(self, stage=None):
            if self.train_set is None:
                x_tr, y_tr, x_va, y_va = SmallDigits().load_arrays()
                self.train_set = torch.utils.data.TensorDataset(torch.as_tensor(x_tr), torch.as_tensor(y_tr))
                self.val_set = torch.utils.data.TensorDataset(torch.as_tensor(x_va), torch.as_tensor(y_va))

        def train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_set, batch_size=64, shuffle=True)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(self.val_set, batch_size=64)

    return Flavoured, FlavouredDigits


def _named(prefix: str, classes: tuple[type, ...]) -> tuple[type, ...]:
    for cls in classes:  # importable (and picklable) by name from this module
        cls.__name__ = cls.__qualname__ = prefix + cls.__name__
        cls.__module__ = __name__
    return classes


def _flavour_classes():
    import lightning.pytorch
    import pytorch_lightning

    return (_named("PL", written_with(pytorch_lightning)), _named("L", written_with(lightning.pytorch)))


(PLFlavoured, PLFlavouredDigits), (LFlavoured, LFlavouredDigits) = _flavour_classes()
