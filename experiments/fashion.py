"""`fashion_mlp`: Fashion-MNIST (60k/10k) from Debian's `dataset-fashion-mnist`, an MLP 784-256-10."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from torch import nn

from syncbench.experiments.classification import ArrayDataModule, ClassifierModule

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "x": "train-images-idx3-ubyte.gz",
    "y": "train-labels-idx1-ubyte.gz",
    "x_val": "t10k-images-idx3-ubyte.gz",
    "y_val": "t10k-labels-idx1-ubyte.gz",
}


class MLP(ClassifierModule):
    def __init__(self, hidden: int = 256, **optim):
        super().__init__(**optim)
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzip-compressed."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class FashionData(ArrayDataModule):
    def __init__(self, root: str = DEFAULT_ROOT, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root)

    def prepare_data(self) -> None:
        missing = [name for name in FILES.values() if not (self.root / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST files not found in {self.root} (missing: {', '.join(missing)}). "
                "Install them with `sudo apt-get install dataset-fashion-mnist` (they land in "
                f"{DEFAULT_ROOT}), or point task.data_args.root at a folder holding the four IDX .gz files."
            )

    def load_arrays(self):
        self.prepare_data()
        arrays = {key: read_idx(self.root / name) for key, name in FILES.items()}
        flat = lambda a: (a.reshape(len(a), -1).astype(np.float32) / 255.0 - 0.2860) / 0.3530  # noqa: E731
        labels = lambda a: a.astype(np.int64)  # noqa: E731 - a writable copy of the read-only buffer
        return flat(arrays["x"]), labels(arrays["y"]), flat(arrays["x_val"]), labels(arrays["y_val"])
