"""`digits_mlp`: scikit-learn's 8x8 digits (1797 images), a small MLP. The fast task for tests."""

from __future__ import annotations

import functools

import numpy as np
from sklearn.datasets import load_digits
from torch import nn

from syncbench.experiments.classification import ArrayDataModule, ClassifierModule


class MLP(ClassifierModule):
    def __init__(self, hidden: int = 64, **optim):
        super().__init__(**optim)
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    return load_digits(return_X_y=True)  # parsed once per process: sweeps run many trials


class DigitsData(ArrayDataModule):
    """A fixed 80/20 split (seeded permutation, independent of the run seed)."""

    def load_arrays(self):
        x, y = _digits()
        x = (x / 16.0).astype(np.float32)
        order = np.random.default_rng(12345).permutation(len(x))
        n_train = int(0.8 * len(x))
        tr, va = order[:n_train], order[n_train:]
        return x[tr], y[tr], x[va], y[va]
