"""The dist backend's compressed exchange: one worker's codec exchange
(``syncbench.strategies.compression``) carried out over torch.distributed.

Each ``AllReduce`` is a real ``dist.all_reduce`` (sum) of the yielded tensor in its own dtype
(fp16/bf16 travel as such), each ``AllGather`` a real ``dist.all_gather``; the sim backend
drives the same generators in lockstep, so both backends compute the same arithmetic and
count the same bytes."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from syncbench.strategies import compression


def run_exchange(exchange: compression.Exchange, group: Any, world: int) -> tuple[torch.Tensor, float,
                                                                                   list[compression.Collective]]:
    """Drive ``exchange`` over ``group``; returns (the mean, seconds blocked in collectives,
    the collectives it asked for)."""
    value: Any = None
    blocked = 0.0
    log: list[compression.Collective] = []
    while True:
        try:
            request = exchange.send(value)
        except StopIteration as stop:
            return stop.value, blocked, log
        log.append(request)
        t0 = time.perf_counter()
        if isinstance(request, compression.AllReduce):
            value = request.tensor.clone()
            if world > 1:
                dist.all_reduce(value, group=group)
        else:
            if world > 1:
                value = [torch.empty_like(request.tensor) for _ in range(world)]
                dist.all_gather(value, request.tensor.contiguous(), group=group)
            else:
                value = [request.tensor.clone()]
        blocked += time.perf_counter() - t0

