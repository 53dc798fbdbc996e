"""torch's own PowerSGD comm hook under DDP on gloo: the reference ``tests/test_compression.py``
compares our codec with. A module of its own so that spawned ranks import only torch."""

from __future__ import annotations

import os

import torch


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # W1 30x40 is compressed at rank 2 ((30+40)*2*2 < 1200); W2 1x30 and the biases are not
    return torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 1))


def batch(rank: int, it: int) -> torch.Tensor:
    return torch.randn(8, 40, generator=torch.Generator().manual_seed(100 * rank + it)) + rank


def ddp_powersgd_rank(rank: int, port: int, out: str, iters: int) -> None:
    """One DDP rank with ``powerSGD_hook`` (rank 2); rank 0 saves the averaged gradients."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = tiny_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    # the hook's minimum with error feedback and warm start: iterations 0 and 1 are plain all-reduces
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2)
    ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    averaged = []
    for it in range(iters):
        ddp(batch(rank, it)).pow(2).sum().backward()
        averaged.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
        ddp.zero_grad()
    if rank == 0:
        torch.save(averaged, out)
    dist.barrier()
    del ddp
    dist.destroy_process_group()
