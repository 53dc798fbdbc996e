"""The device and collective backend of each rank of the dist backend (docs/scaling-out.md).

``cluster.device`` (auto | cpu | cuda; ``SYNCBENCH_DIST_DEVICE`` overrides it when set): NCCL when
CUDA is available and cpu is not asked for, gloo otherwise; cuda without a GPU is refused.
Under NCCL, local rank r takes ``cuda:r``: NCCL cannot put two ranks on one GPU, so a node
with fewer GPUs than local ranks is refused with a message saying what to do, instead of the
CUDA "invalid device ordinal" a rank would otherwise die of mid-start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from syncbench.experiments.procs.environment import ENV_DEVICE  # overrides cluster.device when set


@dataclass(frozen=True)
class RankDevice:
    backend: str  # "nccl" | "gloo"
    device: str  # "cuda:K" | "cpu"


def cuda_devices() -> int:
    """The GPUs this process can see (0 without CUDA)."""
    import torch  # here: the choice below stays importable without torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def requested_device(config_device: str = "auto") -> str:
    """What the dist backend is asked for: ``SYNCBENCH_DIST_DEVICE`` when set, else ``cluster.device``."""
    return os.environ.get(ENV_DEVICE) or config_device


def collective_backend(cuda_devices: int, requested: str = "auto") -> str:
    """``nccl`` when there are GPUs and ``requested`` (``requested_device``) is not ``cpu``,
    else ``gloo``; the one rule every rank and the run's tags follow."""
    return "gloo" if requested == "cpu" or cuda_devices == 0 else "nccl"


def choose_rank_device(local_rank: int, local_world: int, cuda_devices: int, requested: str = "auto") -> RankDevice:
    """The backend and device of local rank ``local_rank`` of ``local_world`` ranks on a node
    with ``cuda_devices`` GPUs; ``requested`` is ``requested_device`` (auto | cpu | cuda).
    ``ValueError`` when NCCL would need two ranks on one GPU, or cuda is asked for without one."""
    if requested not in ("auto", "cpu", "cuda"):
        # cluster.device is validated with the config: only the environment variable can be wrong here
        raise ValueError(f"SYNCBENCH_DIST_DEVICE={requested!r}: give auto (NCCL on the GPUs there are, gloo "
                         f"without), cuda (NCCL, one GPU per local rank) or cpu (gloo)")
    if requested == "cuda" and cuda_devices == 0:
        raise ValueError("cluster.device=cuda but this node has no CUDA device: use cluster.device=cpu or auto")
    if collective_backend(cuda_devices, requested) == "gloo":
        return RankDevice("gloo", "cpu")
    if local_world > cuda_devices:
        raise ValueError(f"{local_world} ranks on this node but {cuda_devices} GPU(s): NCCL cannot put two ranks on "
                         f"one GPU. Start at most {cuda_devices} rank(s) per node (torchrun --nproc-per-node "
                         f"{cuda_devices}, or cluster.workers <= {cuda_devices} on one machine), or run on the CPU "
                         f"with gloo: SYNCBENCH_DIST_DEVICE=cpu")
    assert 0 <= local_rank < local_world, (local_rank, local_world)
    return RankDevice("nccl", f"cuda:{local_rank}")

