"""What a process of the dist backend reads from its environment: the ``SYNCBENCH_DIST_*``
variables, torchrun's, and the cores it owns. Standard library only: a worker reads these
before it imports torch."""

from __future__ import annotations

import datetime
import os

ENV_WORKER = "SYNCBENCH_DIST_WORKER"

ENV_EMULATE = "SYNCBENCH_DIST_EMULATE"

ENV_DEBUG = "SYNCBENCH_DIST_DEBUG_DIR"

ENV_DEVICE = "SYNCBENCH_DIST_DEVICE"  # auto | cpu | cuda: overrides cluster.device when set

ENV_BUSY = "SYNCBENCH_DIST_BUSY_STRAGGLERS"  # 0: emulated stragglers sleep even when they own their cores

ENV_THREADS = "SYNCBENCH_DIST_THREADS"  # intra-op threads per worker (default: cores owned / local workers)


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")) and ENV_WORKER not in os.environ


def cores_owned() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_worker(local_world: int) -> int:
    """One intra-op thread per core the worker owns (cores of this process's affinity mask
    divided among the workers of this machine); ``SYNCBENCH_DIST_THREADS`` overrides."""
    override = os.environ.get(ENV_THREADS)
    if override:
        return max(1, int(override))
    return max(1, cores_owned() // max(1, local_world))


LOOPBACK = "127.0.0.1"
_LISTENERS: list[object] = []  # rank 0's bound store sockets: the store serves from their descriptors


def loopback_environment() -> dict[str, str]:
    """For the ranks of a single-node run: gloo's and NCCL's sockets on the loopback interface
    (each binds the address its host name resolves to otherwise, which may be an external one).
    Variables the user set are left as they are."""
    import socket

    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:  # pragma: no cover - no interface list
        return {}
    if "lo" not in names:  # pragma: no cover - not Linux
        return {}
    return {k: "lo" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k not in os.environ}


def rendezvous_store(rank: int, world: int, timeout: datetime.timedelta) -> object | None:
    """The rendezvous store of a single-node run, listening on ``MASTER_ADDR`` (127.0.0.1) only,
    for ``init_process_group(store=...)``; None under torchrun (``init_method="env://"``, where
    the user's address applies). torch's ``TCPStore`` binds every interface when it makes its own
    socket (a bare ``TCPStore(addr, port)`` from another machine could read a live run's keys),
    so rank 0 binds the socket itself and hands the store its descriptor."""
    if under_torchrun():
        return None
    import socket

    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR", LOOPBACK), int(os.environ["MASTER_PORT"])
    if rank != 0:
        return dist.TCPStore(host, port, world, False, timeout)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(max(128, 2 * world))
    _LISTENERS.append(listener)  # the store does not own the descriptor: keep the socket open
    return dist.TCPStore(host, port, world, True, timeout, wait_for_workers=False,
                         master_listen_fd=listener.fileno())
