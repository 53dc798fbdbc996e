"""Rank 0's out-of-band "stop now" to the other ranks, through the job's rendezvous store."""

from __future__ import annotations

import datetime
import os
import threading
import time

import torch.distributed as dist


class StopNotice:
    """Out-of-band "stop now" from rank 0, for strategies whose ranks may not meet in a
    collective for a long time (local SGD with a large H): each other rank keeps a daemon
    thread blocked in ``TCPStore.wait`` on the job's rendezvous store (its own client
    connection, ``MASTER_ADDR:MASTER_PORT``) and the training loop polls an Event; rank 0
    sets the key. Without a reachable store the notice is simply never raised and ranks
    learn the stop at their next collective round."""

    def __init__(self, rank: int, timeout_s: float):
        self.rank, self.event = rank, threading.Event()
        self.key = "syncbench/stop/" + os.environ.get("TORCHELASTIC_RUN_ID", "") + "/" + \
            os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = None
        self._closed = False
        try:
            self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        except Exception:  # noqa: BLE001 - no store: stops arrive with the next round
            self.store = None
        self._thread: threading.Thread | None = None
        if self.store is not None and rank != 0:
            self._thread = threading.Thread(target=self._wait, name="syncbench-stop", daemon=True)
            self._thread.start()

    def _wait(self) -> None:
        while not self._closed:
            try:
                self.store.wait([self.key], datetime.timedelta(seconds=1))
                self.event.set()
                return
            except Exception:  # noqa: BLE001 - timeout: wait again
                time.sleep(0.01)

    def send(self) -> None:
        if self.store is not None and not self.event.is_set():
            self.event.set()
            try:
                self.store.set(self.key, "1")
            except Exception:  # noqa: BLE001
                pass

    def is_set(self) -> bool:
        return self.event.is_set()

    def close(self) -> None:
        """Let the waiting thread leave ``TCPStore.wait`` (within its 1 s poll) before the
        interpreter exits: a thread still inside the C++ wait at exit aborts the process."""
        self._closed = True
        if self._thread is not None:
            self._thread.join(timeout=2.5)
