"""The sim's per-replica optimizer steps at the lower Python cost of torch's ``foreach``
implementation, where it computes the same numbers bit for bit.

On the CPU torch defaults to the single-tensor loop (``foreach=None`` picks ``foreach`` only for
CUDA tensors): for a small model at a small batch, each worker's optimizer step then costs about as
much as its forward/backward (Adam on the MNIST-1D CNN: 0.52 ms single-tensor, 0.29 ms foreach,
one thread). The sim takes N such steps per global update, so it asks for ``foreach`` where the
user left the choice to torch and where the two implementations agree bit for bit: the classes
below (checked by tests/test_stacked_sim.py over 20 steps; NAdam and RAdam differ in the last
bit, so they keep torch's choice). A group that sets ``foreach`` or ``fused`` itself is left alone.
"""

from __future__ import annotations

from typing import Any

import torch

# torch.optim classes whose foreach and single-tensor steps are bitwise equal on the CPU
BITWISE_FOREACH = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
                   torch.optim.Adamax, torch.optim.Adadelta)


def prefer_foreach_(optimizer: Any) -> bool:
    """Set ``foreach=True`` on the torch optimizer's groups that leave it to torch, when its exact
    class is in ``BITWISE_FOREACH``; returns whether it did."""
    inner = getattr(optimizer, "optimizer", optimizer)  # a ModuleOptimizer or a torch optimizer
    if type(inner) not in BITWISE_FOREACH:
        return False
    groups = [g for g in inner.param_groups if g.get("foreach") is None and not g.get("fused")
              and not g.get("differentiable")]
    for group in groups:
        group["foreach"] = True
    return bool(groups)
