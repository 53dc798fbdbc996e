"""Where the embedded defaults live: one workspace directory (docs/scaling-out.md; README.md, "Commands")."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEFAULT_WORKSPACE = "syncbench-runs"


def workspace_dir(override: str | os.PathLike | None = None) -> Path:
    """`--workspace`, else $SYNCBENCH_WORKSPACE, else ./syncbench-runs (absolute)."""
    raw = override or os.environ.get("SYNCBENCH_WORKSPACE") or DEFAULT_WORKSPACE
    return Path(raw).expanduser().resolve()


TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variable
STORAGE_ENV = "SYNCBENCH_STORAGE"
TRACKING_URI_HELP = (f"MLflow tracking URI where runs are recorded (sqlite:///FILE, postgresql://..., http://server); "
                     f"precedence: this option, then ${TRACKING_URI_ENV}, then the workspace's mlflow.db")
STORAGE_HELP = (f"Optuna storage URL of the sweep's studies (sqlite:///FILE, postgresql://...); precedence: this "
                f"option, then ${STORAGE_ENV}, then the workspace's optuna.db")


def workspace_tracking_uri(workspace: Path) -> str:
    """The workspace's own MLflow store (SQLite)."""
    return f"sqlite:///{workspace / 'mlflow.db'}"


def default_tracking_uri(workspace: Path) -> str:
    """Where runs are recorded when no ``--tracking-uri`` is given, by MLflow's convention:
    ``$MLFLOW_TRACKING_URI``, else the workspace's SQLite store. Every command (run, sweep,
    report, ui) and ``execute_run`` choose their default here."""
    return os.environ.get(TRACKING_URI_ENV) or workspace_tracking_uri(workspace)


def default_optuna_storage(workspace: Path) -> str:
    """The Optuna storage when no ``--storage`` is given: ``$SYNCBENCH_STORAGE``, else the
    workspace's SQLite file."""
    return os.environ.get(STORAGE_ENV) or f"sqlite:///{workspace / 'optuna.db'}"


def redact_uri(uri: str) -> str:
    """A tracking URI or storage URL without its password, for messages."""
    try:
        parts = urlsplit(uri)
        if parts.password is None:
            return uri
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparseable URI>"


def ui_link(tracking_uri: str, run_id: str | None = None, experiment_id: str | None = None,
            workspace: str | os.PathLike | None = None) -> str:
    """How to look at a run: the tracking server's page for it when the URI is http(s), else
    the ``syncbench ui`` command line that serves this store."""
    if tracking_uri.startswith(("http://", "https://")):
        base = redact_uri(tracking_uri).rstrip("/")
        if run_id and experiment_id:
            return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        return base
    ws = workspace_dir(workspace)
    if tracking_uri == workspace_tracking_uri(ws):
        explicit = workspace or os.environ.get("SYNCBENCH_WORKSPACE")
        return "syncbench ui" + (f" --workspace {ws}" if explicit else "")
    return f"syncbench ui --tracking-uri {redact_uri(tracking_uri)}"


def artifacts_dir(workspace: Path) -> Path:
    return workspace / "artifacts"


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """Cache for generated datasets: `data_args.root` if given, else <workspace>/data."""
    path = Path(root).expanduser() if root else workspace_dir() / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


# A workspace with less free space than this is refused before anything is created: a store
# that fills mid-write leaves runs RUNNING and results half-recorded.
MIN_FREE_BYTES = 8 * 2**20
RESERVE_BYTES = 4 * 2**20  # what a sweep keeps aside to record its stop when the disk fills
RESERVE_NAME = ".syncbench-reserve"
STORE_FILES = ("mlflow.db", "optuna.db")


def check_workspace(override: str | os.PathLike | None = None, min_free: int = MIN_FREE_BYTES) -> Path:
    """The workspace, usable: a directory (created if missing) that can be written, whose
    stores can be opened for writing and whose disk has ``min_free`` bytes free. Anything
    else is bad input (``ConfigError``, exit 2) with one paragraph naming the path, within
    seconds -- instead of a traceback from the storage lock, or MLflow retrying a read-only
    database for minutes."""
    # the config module (pydantic models) only here: `syncbench --help` reads this module's help texts
    from syncbench.experiments.config import ConfigError

    ws = workspace_dir(override)
    how = "(--workspace, $SYNCBENCH_WORKSPACE or ./syncbench-runs)"
    if ws.exists() and not ws.is_dir():
        raise ConfigError(f"workspace {ws}: exists and is not a directory {how}; syncbench keeps its stores "
                          f"(mlflow.db, optuna.db, artifacts/) in a directory: give another path")
    try:
        ws.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"workspace {ws}: cannot be created ({exc.strerror or exc}) {how}") from None

    def refuse(what: str, exc: OSError) -> ConfigError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return ConfigError(f"workspace {ws}: the disk is full ({what}: {exc.strerror}); free space or give "
                               f"another --workspace")
        if exc.errno == errno.EROFS:
            return ConfigError(f"workspace {ws}: on a read-only filesystem ({what}: {exc.strerror}); give a "
                               f"writable --workspace")
        return ConfigError(f"workspace {ws}: not writable ({what}: {exc.strerror or exc}); give a writable "
                           f"--workspace or fix its permissions")

    try:
        fd, probe = tempfile.mkstemp(dir=ws, prefix=".syncbench-probe-")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise refuse("writing a file there failed", exc) from None
    for name in STORE_FILES:
        store = ws / name
        if store.exists():
            try:
                with open(store, "r+b"):
                    pass
            except OSError as exc:
                raise refuse(f"{name} cannot be opened for writing", exc) from None
    free = shutil.disk_usage(ws).free
    reserve = ws / RESERVE_NAME
    if reserve.exists():  # a sweep's reserve is free space held for this program
        free += reserve.stat().st_size
    if free < min_free:
        raise ConfigError(f"workspace {ws}: the disk is full ({free / 2**20:.1f} MiB free; syncbench needs at least "
                          f"{min_free / 2**20:.0f} MiB to record runs safely); free space or give another --workspace")
    return ws


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) says the disk or quota is full:
    ENOSPC/EDQUOT from the OS, or SQLite's "database or disk is full" through SQLAlchemy,
    MLflow or Optuna."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc).lower()
        if "database or disk is full" in text or "no space left on device" in text or "disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class SpaceReserve:
    """A file of ``RESERVE_BYTES`` in the workspace, written when a sweep starts and deleted
    when the disk fills: the space it frees lets the launcher record the stop (fail the
    trials in flight, end their MLflow runs) instead of leaving them RUNNING."""

    def __init__(self, ws: Path, size: int = RESERVE_BYTES):
        self.path = ws / RESERVE_NAME
        self.size = size

    def hold(self) -> bool:
        """Write the reserve (best effort: False when the disk has no room for it)."""
        try:
            if self.path.exists() and self.path.stat().st_size >= self.size:
                return True
            with open(self.path, "wb") as fh:
                chunk = b"\0" * 2**20
                for _ in range(self.size // len(chunk)):
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            return True
        except OSError:
            self.release()
            return False

    def release(self) -> bool:
        """Delete the reserve; True if there was one."""
        try:
            self.path.unlink()
            return True
        except OSError:
            return False


def is_corrupt_store(exc: BaseException | None) -> bool:
    """Whether an exception (or its cause) says a SQLite file is not a database or is damaged."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if "file is not a database" in text or "database disk image is malformed" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def corrupt_store_message(option: str, path: str, exc: BaseException) -> str:
    return (f"{option} {path}: the database is corrupt ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); move it away (a new one is created) "
            f"or restore it from a backup")


LOCK_WAIT_S = 20.0  # how long a store's write lock may be held by another process before we give up


def check_not_locked(path: str | os.PathLike, option: str, wait_s: float = LOCK_WAIT_S) -> None:
    """A SQLite store whose write lock another process holds for ``wait_s`` (a hung process, an
    open ``sqlite3`` shell in a transaction) is bad input, said in one line (exit 2) before
    anything is recorded -- not a run that fails later with the SQL statement that waited."""
    import sqlite3

    from syncbench.strategies.options import ConfigError

    if not Path(path).is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=wait_s, isolation_level=None)) as con:
            con.execute("BEGIN IMMEDIATE")  # the write lock, as the first write would take it
            con.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc).lower() and "busy" not in str(exc).lower():
            return  # not a lock: the store's own open reports it
        raise ConfigError(f"{option} {path}: the store is locked: another process has held its write lock for "
                          f"over {wait_s:.0f} s (a hung syncbench, or a sqlite3 shell inside a transaction?); end "
                          f"it, or use another workspace (--workspace)") from None


def release_reserve(override: str | os.PathLike | None = None) -> bool:
    """Give up the workspace's reserve (see ``SpaceReserve``); True if there was one."""
    return SpaceReserve(workspace_dir(override)).release()


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo (what can be allocated without swapping), or None
    where there is none (not Linux): the sim's replica check and a sweep's ``--jobs`` cap."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
