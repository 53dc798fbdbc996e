"""`mnist1d_cnn`: MNIST-1D (Greydanus 2020), generated locally, and the paper's CNN.

The arrays are generated once with `mnist1d.data.make_dataset(get_dataset_args())` (never
`get_dataset`, which downloads) and cached as `.npz` in the workspace (`data_args.root`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from syncbench.experiments.classification import ArrayDataModule, ClassifierModule
from syncbench.experiments.workspace import data_dir


class CNN(ClassifierModule):
    """ConvBase of the MNIST-1D repository: three strided Conv1d layers and a linear head."""

    def __init__(self, channels: int = 25, **optim):
        super().__init__(**optim)
        self.save_hyperparameters()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * 5, 10)

    def forward(self, x):
        x = x.view(-1, 1, x.shape[-1])
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.linear(h.flatten(1))


class MNIST1DData(ArrayDataModule):
    def __init__(self, root: str | None = None, num_samples: int = 10000, **kwargs):
        super().__init__(**kwargs)
        self.root, self.num_samples = root, num_samples

    def load_arrays(self):
        cache = data_dir(self.root) / f"mnist1d-{self.num_samples}.npz"
        if not cache.exists():
            # only to build the cache: the package imports scipy and matplotlib
            from mnist1d.data import get_dataset_args, make_dataset

            args = get_dataset_args()
            args.num_samples = self.num_samples
            data = make_dataset(args)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"])
            tmp.replace(cache)  # atomic: concurrent trials never read half a file
        with np.load(cache) as d:
            return d["x"], d["y"], d["x_test"], d["y_test"]
