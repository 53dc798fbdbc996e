"""The device and collective backend of each rank of the dist backend (docs/scaling-out.md).

NCCL when CUDA is available (and ``SYNCBENCH_DIST_DEVICE`` is not ``cpu``), gloo otherwise.
Under NCCL, local rank r takes ``cuda:r``: NCCL cannot put two ranks on one GPU, so a node
with fewer GPUs than local ranks is refused with a message saying what to do, instead of the
CUDA "invalid device ordinal" a rank would otherwise die of mid-start.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankDevice:
    backend: str  # "nccl" | "gloo"
    device: str  # "cuda:K" | "cpu"


def cuda_devices() -> int:
    """The GPUs this process can see (0 without CUDA)."""
    import torch  # here: the choice below stays importable without torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def collective_backend(cuda_devices: int, requested: str = "auto") -> str:
    """``nccl`` when there are GPUs and ``requested`` (``SYNCBENCH_DIST_DEVICE``) is not ``cpu``,
    else ``gloo``; the one rule every rank and the run's tags follow."""
    return "gloo" if requested == "cpu" or cuda_devices == 0 else "nccl"


def choose_rank_device(local_rank: int, local_world: int, cuda_devices: int, requested: str = "auto") -> RankDevice:
    """The backend and device of local rank ``local_rank`` of ``local_world`` ranks on a node
    with ``cuda_devices`` GPUs; ``requested`` is ``SYNCBENCH_DIST_DEVICE`` (auto | cpu).
    ``ValueError`` when NCCL would need two ranks on one GPU."""
    if requested not in ("auto", "cpu"):
        raise ValueError(f"SYNCBENCH_DIST_DEVICE={requested!r}: give auto (NCCL on the GPUs there are, gloo "
                         f"without) or cpu (gloo)")
    if collective_backend(cuda_devices, requested) == "gloo":
        return RankDevice("gloo", "cpu")
    if local_world > cuda_devices:
        raise ValueError(f"{local_world} ranks on this node but {cuda_devices} GPU(s): NCCL cannot put two ranks on "
                         f"one GPU. Start at most {cuda_devices} rank(s) per node (torchrun --nproc-per-node "
                         f"{cuda_devices}, or cluster.workers <= {cuda_devices} on one machine), or run on the CPU "
                         f"with gloo: SYNCBENCH_DIST_DEVICE=cpu")
    assert 0 <= local_rank < local_world, (local_rank, local_world)
    return RankDevice("nccl", f"cuda:{local_rank}")
