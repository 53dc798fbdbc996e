"""The sim backend's device (``cluster.device``): where its replicas, batches and collectives live."""

from __future__ import annotations

import torch

from syncbench.strategies.options import ConfigError


def resolve_sim_device(requested: str = "auto") -> str:
    """``cluster.device`` on this machine: auto -> ``cuda:0`` when CUDA is available, else ``cpu``;
    cuda -> ``cuda:0``; ``cuda:K`` as given. ``ConfigError`` naming the key when the device asked
    for does not exist here (before anything is recorded)."""
    if requested == "cpu":
        return "cpu"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "auto":
        return "cuda:0" if count else "cpu"
    index = 0 if requested == "cuda" else int(requested.split(":", 1)[1])
    if index >= count:
        raise ConfigError(f"cluster.device={requested}: this machine has {count} CUDA device(s); use "
                          f"cluster.device=cpu or auto" + (f", or cuda:0..cuda:{count - 1}" if count else ""))
    return f"cuda:{index}"
