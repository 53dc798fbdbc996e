"""How a dist run fails: the errors a rank and the launcher raise, and which failure messages
are a peer's communication breaking (a symptom, so the launcher looks for the rank that caused it)."""

from __future__ import annotations


class WorkerFailure(RuntimeError):
    """A peer, the parameter server or a collective failed; the message names the rank when known."""


class DistRunFailed(RuntimeError):
    """A dist run ended ``failed`` (a worker died, hung or raised); the run is marked FAILED."""

    def __init__(self, message: str, run_id: str | None = None):
        super().__init__(message)
        self.run_id = run_id


def is_comm_error(message: str) -> bool:
    text = message.lower()
    return any(s in text for s in ("connection closed", "connection reset", "timed out", "timeout", "broken pipe",
                                   "did not answer", "sent no gradient", "gloo", "socket", "never came back"))
