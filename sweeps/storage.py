"""Optuna storage for sweeps: SQLite in the workspace by default, PostgreSQL at scale.

Two properties the launcher relies on, and why they need more than Optuna gives:

* **Heartbeats.** A trial left RUNNING by a killed launcher is failed once its heartbeat is
  older than the grace period, and retried (``RetryHeartbeatStaleTrialCallback``). Only
  ``RDBStorage`` has heartbeats, and only ``Study.optimize`` records them, so the launcher
  records them itself (``Heartbeat``) for the trials it runs with ask/tell.
* **One claim per trial.** Measured here with two processes popping 300 enqueued trials:
  on SQLite, ``Study.ask()`` handed 5 trials to both (the WAITING→RUNNING update has no
  row lock there), and on both SQLite and PostgreSQL "are there WAITING trials? then ask()"
  created a stray sampled trial when the other process took the last one. So every claim
  (and every enqueue) happens under ``StorageLock``: an OS file lock next to a SQLite file
  (launchers sharing a SQLite file share a machine), a session-level advisory lock on
  PostgreSQL. Both are released by the OS or the server when the holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from syncbench.experiments.config import ConfigError
from syncbench.experiments.workspace import check_not_locked, corrupt_store_message, is_corrupt_store

# SQLAlchemy and Optuna are imported by the functions that open a store: `syncbench sweep`
# imports this module before it validates the spec (CLI start-up time); psycopg is optional

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 60  # concurrent launchers and heartbeat threads wait rather than fail
ADVISORY_LOCK_KEY = zlib.crc32(b"syncbench.sweeps.launcher")  # one lock per PostgreSQL database


def normalize_url(url: str) -> str:
    """Bare ``postgresql://`` means psycopg 3 to SQLAlchemy 2.1 (the driver syncbench depends on); where only
    psycopg2 is installed, the URL is given that driver."""
    from sqlalchemy.engine import make_url  # lazy: see the imports

    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad argument
        raise ConfigError(f"--storage {url!r}: not a database URL ({exc})") from None
    if parsed.drivername == "postgresql":
        try:
            import psycopg  # noqa: F401 - optional: which PostgreSQL driver is installed
        except ImportError:
            parsed = parsed.set(drivername="postgresql+psycopg2")
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(f"--storage {redact(url)}: only sqlite:///FILE and postgresql://… are supported")
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError("--storage: an in-memory SQLite database cannot be resumed; give a file (sqlite:///FILE)")
    return parsed.render_as_string(hide_password=False)


def redact(url: str) -> str:
    """The URL without its password, for messages and MLflow params."""
    try:
        from sqlalchemy.engine import make_url  # lazy: see the imports

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<unparseable URL>"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_path(url: str) -> Path:
    from sqlalchemy.engine import make_url  # lazy: see the imports

    return Path(make_url(url).database).expanduser().resolve()


class StorageLock:
    """A mutex shared by every launcher on one storage; re-entrant within a process."""

    def __init__(self, url: str):
        self.url = url
        self._local = threading.RLock()
        self._depth = 0
        self._file = None
        self._conn = None
        if is_sqlite(url):
            path = sqlite_path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path.with_name(path.name + ".lock"), "a+")  # noqa: SIM115 - held for the launcher's life
        else:
            self._conn = _advisory_connection(url)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._local:
            if self._depth == 0:
                self._acquire()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._release()

    def _acquire(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_EX)
        else:
            self._advisory("SELECT pg_advisory_lock(:k)")

    def _release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        else:
            self._advisory("SELECT pg_advisory_unlock(:k)")

    def _advisory(self, sql: str) -> None:
        from sqlalchemy import text  # lazy: see the imports

        self._conn.execute(text(sql), {"k": ADVISORY_LOCK_KEY})
        self._conn.commit()  # end the implicit transaction: session-level locks outlive it

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._conn is not None:
            self._conn.close()


def _advisory_connection(url: str):
    import sqlalchemy  # lazy: see the imports
    from sqlalchemy.pool import NullPool

    try:
        engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        return engine.connect()
    except Exception as exc:  # noqa: BLE001 - an unreachable store is bad input (exit 2)
        raise ConfigError(f"--storage {redact(url)}: cannot connect ({_first_line(exc)})") from None


def use_wal(url: str) -> None:
    """Put a SQLite store (Optuna's or MLflow's) in write-ahead-log mode, once: the mode is
    kept in the file. Measured here, WAL made MLflow's first-use migrations 1.9x and each
    write 3.4x faster (one fsync per commit instead of several), and readers no longer
    block the writer, which matters with ``--jobs K`` processes logging at once. Best
    effort: a file busy in another mode keeps it. Not for network filesystems."""
    if not is_sqlite(url):
        return
    path = sqlite_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)) as con:
            con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        if is_corrupt_store(exc):
            raise ConfigError(corrupt_store_message("store", str(path), exc)) from None
        log.warning("could not switch %s to WAL mode: %s", path, exc)


def open_storage(url: str, *, heartbeat_s: int, grace_s: int,
                 stale_callback: Callable[[Any, Any], None]):
    """An ``RDBStorage`` with heartbeats, a busy timeout on SQLite and our stale-trial hook.
    Call it under ``StorageLock``: two launchers creating the tables at once would race."""
    import optuna  # lazy: see the imports

    engine_kwargs: dict[str, Any] = {}
    if is_sqlite(url):
        check_not_locked(sqlite_path(url), "--storage")
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True  # survive a server restart between trials
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                             grace_period=grace_s, heartbeat_stale_trial_callback=stale_callback)
    except Exception as exc:  # noqa: BLE001
        if is_corrupt_store(exc):
            raise ConfigError(corrupt_store_message("--storage", redact(url), exc)) from None
        raise ConfigError(f"--storage {redact(url)}: cannot open the Optuna storage ({_first_line(exc)})") from None
    if is_sqlite(url):
        _relax_sqlite_sync(storage.engine)
    return storage


def _relax_sqlite_sync(engine) -> None:
    """``synchronous=NORMAL`` on every connection: in WAL mode a commit then needs no fsync
    (a launcher's ~10 writes per trial cost ~10 ms each with one). A power cut may lose the
    last commits but never corrupts the file; a lost claim or result is simply rerun."""
    from sqlalchemy import event  # lazy: see the imports

    @event.listens_for(engine, "connect")
    def _pragma(dbapi_connection, _record) -> None:
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    engine.dispose()  # connections opened during set-up predate the hook


class Heartbeat:
    """Records a trial's heartbeat every ``interval_s`` in a thread until stopped.

    Optuna only does this inside ``Study.optimize``; with ask/tell it is the caller's job.
    A failed write is logged and retried on the next beat: a missed beat or two is what the
    grace period is for.
    """

    def __init__(self, storage, trial_id: int, interval_s: float):
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # noqa: BLE001 - keep beating; the next write may succeed
                log.warning("heartbeat of trial id %s failed: %s", self.trial_id, _first_line(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
