"""What a user reads of an error raised inside a library: its words, without the library's
decorations -- gloo's source locations and its "GLHF!" sign-off, SQLAlchemy's echoed SQL,
parameters and "Background on this error at: https://sqlalche.me/..." help link, and its autoflush
advice. The first line of a message stays whole; only those decorations go."""

from __future__ import annotations

import re

_GLOO_LOCATION = re.compile(r"\[[^\]\s]*(?:gloo|c10d|torch)[^\]\s]*\.(?:cc|cpp|h):\d+\]\s*")
# gloo's sign-off ("GLHF!" and an emoji) and its advice to read logs before reporting to it
_GLOO_CHATTER = re.compile(r"\s*(?:Check the logs of the remote worker before reporting an error\.|GLHF![^\w\[(]*)")
_DROP_LINES = re.compile(r"^\s*(\[SQL:|\[parameters:|\(Background on this error at:)")
_SQLALCHEMY_ADVICE = re.compile(r"\(raised as a result of Query-invoked autoflush;[^)]*\)\s*")


def plain(text: str) -> str:
    """``text`` less the decorations above; blank lines left by them are dropped."""
    text = _GLOO_CHATTER.sub("", _GLOO_LOCATION.sub("", text))
    text = _SQLALCHEMY_ADVICE.sub("", text)
    lines = [line.rstrip() for line in text.splitlines() if not _DROP_LINES.match(line)]
    return "\n".join(line for line in lines if line.strip()).strip()


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, in plain words."""
    return plain(f"{type(exc).__name__}: {exc}")
