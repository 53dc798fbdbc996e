"""Shared pieces of the shipped classification tasks: a LightningModule base that logs
`val_acc`/`val_loss`, and a DataModule over in-memory arrays.

User modules need none of this: any LightningModule that `self.log`s its target metric
in `validation_step` works.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classifier; `optimizer` is 'adam' or 'sgd' (with `momentum`)."""

    def __init__(self, lr: float = 1e-2, optimizer: str = "adam", momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__()
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.lr, self.optimizer_name, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay

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

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class ArrayDataModule(pl.LightningDataModule):
    """Train/validation tensors held in memory; subclasses implement `load_arrays`."""

    def __init__(self, val_batch_size: int = 1000):
        super().__init__()
        self.val_batch_size = val_batch_size
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y, x_val, y_val = self.load_arrays()
        self.train_set = TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))
        self.val_set = TensorDataset(torch.as_tensor(x_val, dtype=torch.float32), torch.as_tensor(y_val, dtype=torch.long))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size)
