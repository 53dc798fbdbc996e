"""`charlm`: a small GPT-style character language model on the Python standard library's
own source code. The task for activation checkpointing (Chen et al. 2016, "Training Deep
Nets with Sublinear Memory Cost"): a stack of identical transformer blocks whose
activations dwarf its parameters.

The corpus needs no download: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``,
without tests, third-party packages and generated files. Files are split into training
and validation BY FILE (a hash of the relative path), so validation measures how well the
model predicts code it has never seen, not memorised neighbours of training windows.
The encoded arrays are cached as ``.npz`` in the workspace (``data_args.root``).

The module exposes its blocks through ``checkpoint_blocks()``, the protocol of
``syncbench.strategies.checkpointing``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from syncbench.experiments.workspace import data_dir

# --- vocabulary: printable ASCII plus newline and tab; everything else is one "unknown" id.
# Fixed, so that a model and a cache built on any machine agree.
UNKNOWN = 0
_CHARS = "\n\t" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = 1 + len(_CHARS)  # 98
_TABLE = np.full(256, UNKNOWN, dtype=np.uint8)
for _i, _c in enumerate(_CHARS):
    _TABLE[ord(_c)] = _i + 1


def encode(raw: bytes) -> np.ndarray:
    """Bytes -> token ids (uint8), one token per byte; non-ASCII bytes become UNKNOWN."""
    return _TABLE[np.frombuffer(raw, dtype=np.uint8)]


def decode(ids: Sequence[int]) -> str:
    return "".join("\N{REPLACEMENT CHARACTER}" if i == UNKNOWN else _CHARS[i - 1] for i in ids)


# --- model


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2, Radford et al. 2019): causal self-attention
    (``scaled_dot_product_attention``), then a 4x GELU MLP, each on a residual branch."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class CharLM(pl.LightningModule):
    """GPT-style decoder over characters; logs `train_loss` and `val_loss` (nats/char)."""

    def __init__(self, d_model: int = 64, n_layers: int = 4, n_heads: int = 4, context: int = 64,
                 dropout: float = 0.0, lr: float = 3e-3, weight_decay: float = 0.01):
        super().__init__()
        self.save_hyperparameters()
        self.lr, self.weight_decay, self.context = lr, weight_decay, context
        self.tok = nn.Embedding(VOCAB_SIZE, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB_SIZE, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # GPT-2's init: N(0, 0.02) keeps the initial loss near log(V)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def checkpoint_blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks in order (see ``syncbench.strategies.checkpointing``)."""
        return list(self.blocks)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context ({self.context})")
        x = self.drop(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def _loss(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).reshape(-1, VOCAB_SIZE), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), batch_size=int(batch[0].shape[0]))

    def configure_optimizers(self):
        # weight decay on weight matrices only: not on biases, LayerNorm gains or embeddings (nanoGPT)
        named = list(self.named_parameters())
        decays = [p.dim() >= 2 and not n.startswith(("tok.", "pos.")) for n, p in named]
        groups = [{"params": [p for (_, p), d in zip(named, decays) if d], "weight_decay": self.weight_decay},
                  {"params": [p for (_, p), d in zip(named, decays) if not d], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.95))


# --- data

_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data",
                  "__phello__", "lib-dynload"}
_FORMAT = 1  # bump when the selection or encoding changes: invalidates caches


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _digest(text: str) -> bytes:
    return hashlib.sha1(text.encode()).digest()


def corpus_files(root: Path) -> list[tuple[str, bool]]:
    """(relative path, is_validation) of the eligible ``.py`` files, in a deterministic,
    package-mixing order (by hash of the path) so that a size cap samples all of the library.

    Excluded: test suites (``test``, ``tests``, ``idlelib/idle_test``, ``lib2to3/tests``...),
    installed third-party packages, and generated files (codec tables in ``encodings``,
    ``pydoc_data/topics.py``, ``_sysconfigdata_*``), which would teach the model tables.
    About one file in ten (by hash) is validation.
    """
    chosen = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        # prune in place: os.walk then never enters tests or site-packages (fast)
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS and not (here == root and d.startswith("config-"))]
        for name in names:
            if name.endswith(".py") and not name.startswith(("_sysconfigdata", "test_")):
                chosen.append((here / name).relative_to(root).as_posix())
    chosen.sort(key=_digest)
    return [(rel, _digest("split:" + rel)[0] < 26) for rel in chosen]  # 26/256 ~ 10%


def build_corpus(root: Path, max_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoded training and validation text: files concatenated (each ends with a newline)
    until ``max_chars`` training and ``max_chars // 10`` validation characters."""
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    caps = {False: max_chars, True: max(max_chars // 10, 1)}
    for rel, is_val in corpus_files(root):
        if sizes[is_val] >= caps[is_val]:
            if all(sizes[s] >= caps[s] for s in caps):
                break
            continue
        raw = (root / rel).read_bytes()
        if not raw.endswith(b"\n"):
            raw += b"\n"
        ids = encode(raw)[: caps[is_val] - sizes[is_val]]
        parts[is_val].append(ids)
        sizes[is_val] += len(ids)
    empty = np.zeros(0, dtype=np.uint8)
    return (np.concatenate(parts[False]) if parts[False] else empty,
            np.concatenate(parts[True]) if parts[True] else empty)


class CharData(pl.LightningDataModule):
    """Windows of ``seq_len + 1`` characters: ``x`` is the first ``seq_len``, ``y`` the next
    ones. Training windows tile the training text without overlap (each character is a
    target once per epoch); validation is ``val_windows`` windows evenly spaced over the
    validation text, fixed so that evaluation is cheap and comparable across runs."""

    def __init__(self, root: str | None = None, seq_len: int = 64, max_chars: int = 4_000_000,
                 val_windows: int = 256, val_batch_size: int = 256, batch_size: int = 16):
        super().__init__()
        if seq_len < 1 or max_chars < 10 * (seq_len + 1) or val_windows < 1:
            raise ValueError("CharData: need seq_len >= 1, val_windows >= 1, max_chars >= 10 * (seq_len + 1)")
        self.root, self.seq_len, self.max_chars = root, seq_len, max_chars
        self.val_windows, self.val_batch_size, self.batch_size = val_windows, val_batch_size, batch_size
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def cache_path(self) -> Path:
        src = stdlib_root()
        key = hashlib.sha1(f"{_FORMAT}|{src}|{sys.version}|{self.max_chars}".encode()).hexdigest()[:10]
        return data_dir(self.root) / f"charlm-stdlib-{key}.npz"

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        cache = self.cache_path()
        if not cache.exists():
            train, val = build_corpus(stdlib_root(), self.max_chars)
            if len(val) < self.seq_len + 2:
                raise ValueError(f"the standard library at {stdlib_root()} yielded too little text")
            tmp = cache.with_name(f"{cache.stem}.{os.getpid()}-{id(self)}.tmp.npz")
            np.savez(tmp, train=train, val=val)
            tmp.replace(cache)  # atomic: concurrent trials never read half a file
        with np.load(cache) as d:
            return d["train"], d["val"]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = self.load_arrays()
        t = self.seq_len
        text = torch.from_numpy(train.astype(np.int64))
        n = (len(text) - 1) // t
        # x and y are strided views of one storage: no copy until a batch gathers them
        self.train_set = TensorDataset(text[: n * t].view(n, t), text[1 : n * t + 1].view(n, t))
        vtext = torch.from_numpy(val.astype(np.int64))
        starts = torch.linspace(0, len(vtext) - t - 1, self.val_windows).long()
        offsets = starts[:, None] + torch.arange(t + 1)
        windows = vtext[offsets]
        self.val_set = TensorDataset(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size)
