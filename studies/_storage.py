"""Optuna RDB storage set-up (SQLite WAL or PostgreSQL), lease timings, and a per-study ask lock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from .exceptions import StorageError

__all__ = [
    "open_storage",
    "default_storage_url",
    "sqlite_path",
    "study_lock",
    "rdb",
    "lease_timing",
    "delete_study",
    "HEARTBEAT_INTERVAL",
    "GRACE_PERIOD",
]

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 5
GRACE_PERIOD = 20
_STORAGES: dict[tuple[str, int, int], optuna.storages.RDBStorage] = {}
_BATCHING: dict[tuple[str, int, int], optuna.storages.BaseStorage] = {}  # a worker's, around the one above
_LOCK = threading.Lock()


def default_storage_url(directory: str | Path = ".") -> str:
    return f"sqlite:///{Path(directory).resolve() / 'dendro.db'}"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL, or None for other databases."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return None
    if not u.database or u.database == ":memory:":
        raise StorageError("an in-memory SQLite database cannot be shared; give a file path")
    return Path(u.database)


#: how long a SQLite connection waits for another writer before "database is locked"
_SQLITE_BUSY_MS = 60_000


def _engine_kwargs(url: str) -> dict[str, Any]:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        # Readers and one writer at a time: wait for the lock instead of failing at once.
        return {"connect_args": {"timeout": _SQLITE_BUSY_MS / 1000}}
    return {"pool_pre_ping": True, "pool_recycle": 300}


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
    grace_period: int | None = GRACE_PERIOD,
    max_retry: int = 3,
    batching: bool = False,
) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage for ``url``, with heartbeats so that dead workers' trials are retried.

    ``batching=True`` is a worker's storage (``studies._fast.BatchingStorage`` over the same
    RDBStorage): the studies whose trials the engine asks keep a cached view of their trials
    and write each trial's rows in batches. Reads and writes of everything else, and the
    rows written, are the RDBStorage's.

    SQLite files are switched to WAL mode (readers never block the writer) and wait up to a
    minute for locks; PostgreSQL connections are checked before use so that a restarted
    server is reconnected. A trial whose worker stops beating for ``grace_period`` seconds
    is failed by the next worker that asks, and re-queued up to ``max_retry`` times.
    One storage object per URL and process.
    """
    key = (url, heartbeat_interval or 0, grace_period or 0)
    if batching:
        from ._fast import BatchingStorage

        plain = open_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                             max_retry=max_retry)
        with _LOCK:
            if key not in _BATCHING:
                _BATCHING[key] = BatchingStorage(plain)
            return _BATCHING[key]
    with _LOCK:
        if key in _STORAGES:
            return _STORAGES[key]
        check_url(url)
        try:
            path = sqlite_path(url)
            if path is not None:
                with contextlib.closing(sqlite3.connect(path, timeout=60)) as con:
                    con.execute("PRAGMA journal_mode=WAL")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = _make_rdb(url, heartbeat_interval, grace_period, max_retry)
            if path is not None:
                _sqlite_foreign_keys(storage.engine)
        except StorageError:
            raise
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as exc:
            raise StorageError(f"storage URL {url!r} cannot be used: {exc}") from exc
        except (sa.exc.OperationalError, sa.exc.DBAPIError, sqlite3.Error) as exc:
            raise StorageError(f"cannot reach the database at {_redact(url)}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from exc
        _STORAGES[key] = storage
        return storage


_URL_EXAMPLES = "use e.g. sqlite:///path/to/dendro.db or postgresql+psycopg://user@host:5432/db"


def check_url(url: str) -> None:
    """Raise StorageError for a URL that can never work, before anything is created.

    Malformed URLs, unknown databases, drivers that are not installed, and SQLite files whose
    folder does not exist. A database that does not answer is not checked here: it may come back.
    """
    if not isinstance(url, str) or "://" not in url:
        raise StorageError(f"storage URL {url!r} is not a database URL; {_URL_EXAMPLES}")
    try:
        u = make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise StorageError(f"storage URL {_redact(url)!r} is malformed ({exc}); {_URL_EXAMPLES}") from None
    try:
        dialect = u.get_dialect()
    except sa.exc.NoSuchModuleError:
        raise StorageError(f"storage URL {_redact(url)!r} names an unknown database or driver "
                           f"{u.drivername!r}; {_URL_EXAMPLES}") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise StorageError(
            f"storage URL {_redact(url)!r} needs the database driver {dialect.driver!r}, which is not "
            f"installed ({exc}); install it, or name an installed driver in the URL "
            "(e.g. postgresql+psycopg://...)") from None
    path = sqlite_path(url)
    if path is not None and not path.parent.is_dir():
        raise StorageError(f"the SQLite database {path} cannot be created: the folder {path.parent} "
                           "does not exist; create it first or give another path")


def _sqlite_foreign_keys(engine: sa.Engine) -> None:
    """Enforce foreign keys on SQLite as PostgreSQL does.

    Without it a heartbeat that lands just after its study was deleted leaves an orphan row,
    SQLite reuses the trial id, and every later ask of that id fails.
    """

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_con: Any, record: Any) -> None:
        cur = dbapi_con.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    engine.dispose()  # connections opened before the listener reconnect with it


def _make_rdb(
    url: str, heartbeat_interval: int | None, grace_period: int | None, max_retry: int
) -> optuna.storages.RDBStorage:
    # No Optuna heartbeats: a process's trials are kept alive by its one lease
    # (studies._lease), beaten by one thread, and a stale lease's trials are failed and
    # re-queued once by the next ask. ``heartbeat_interval`` and ``grace_period`` are the
    # lease's timings for this storage; ``max_retry`` is kept for the callers' signature.
    storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    _TIMINGS[id(storage)] = (float(heartbeat_interval or HEARTBEAT_INTERVAL),
                             float(grace_period or GRACE_PERIOD))
    return storage


#: (beat interval, grace period) of each storage open_storage made, by id
_TIMINGS: dict[int, tuple[float, float]] = {}


def lease_timing(storage: optuna.storages.BaseStorage) -> tuple[float, float]:
    """The lease beat interval and grace period, in seconds, that ``storage`` was opened with."""
    return _TIMINGS.get(id(rdb(storage)), (float(HEARTBEAT_INTERVAL), float(GRACE_PERIOD)))


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return "<storage>"


def rdb(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """The RDBStorage under Optuna's per-study cache wrapper (or the storage itself)."""
    return getattr(storage, "_backend", storage)


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """Serialise asks for one study across processes and machines.

    PostgreSQL: a transaction-scoped advisory lock keyed by the study name. SQLite (one
    machine by nature): an exclusive ``flock`` on a file beside the database. Two workers
    racing for the last trials therefore never overshoot ``n_trials``, and a grid point is
    never handed out twice.
    """
    storage = rdb(storage)
    url = str(getattr(storage, "url", ""))
    if not url:
        yield
        return
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        path = sqlite_path(url)
        assert path is not None
        digest = hashlib.sha1(study_name.encode()).hexdigest()[:16]
        lock_path = path.with_name(f".{path.name}.{digest}.lock")
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif backend == "postgresql":
        key = int.from_bytes(hashlib.sha1(study_name.encode()).digest()[:8], "big", signed=True)
        with storage.engine.connect() as con, con.begin():
            con.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            yield
    elif backend == "mysql":
        name = f"dendro:{study_name}"[:64]
        with storage.engine.connect() as con:
            con.execute(sa.text("SELECT GET_LOCK(:n, 60)"), {"n": name})
            try:
                yield
            finally:
                con.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": name})
    else:
        yield


#: words of the driver errors that mean "another transaction holds it": retried
_CONTENTION = ("locked", "deadlock", "busy", "lock timeout", "could not obtain lock")


def delete_study(storage: str | optuna.storages.BaseStorage, study_name: str, timeout: float = 10.0) -> None:
    """Delete a study and every row of it in one transaction, even while workers write to it.

    ``optuna.delete_study`` reads the study's rows, then deletes them one by one; a row a
    worker inserts in between (a heartbeat, a report) makes the last delete fail, and Optuna
    rolls back and returns as if it had succeeded. Here the study is locked first (SQLite:
    the database's write lock, taken by the first statement; PostgreSQL: the study's and its
    trials' rows, ``FOR UPDATE``, which a new child row waits for), then each table is
    emptied of the study's rows with one statement. Workers' writes wait for the commit and
    then fail as writes to a deleted study do. Raises KeyError if there is no such study and
    StorageError if it could not be done within ``timeout`` seconds (retried meanwhile).
    """
    backend = rdb(storage if not isinstance(storage, str) else open_storage(storage))
    if not isinstance(backend, optuna.storages.RDBStorage):
        optuna.delete_study(study_name=study_name, storage=backend)
        return
    deadline = time.monotonic() + timeout
    pause = 0.02
    while True:
        try:
            _delete_rows(backend.engine, study_name, deadline)
            return
        except sa.exc.DBAPIError as exc:  # a deadlock or a busy database: try again
            if not any(w in str(exc.orig).lower() for w in _CONTENTION):
                raise  # the database is down or refused the statement: not ours to retry
            if time.monotonic() + pause > deadline:
                raise StorageError(f"could not delete study {study_name!r} within {timeout:.0f} s: "
                                   f"{type(exc.orig).__name__}") from exc
            log.info("deleting study %s: %s; retrying", study_name, type(exc.orig).__name__)
            time.sleep(pause)
            pause = min(0.5, pause * 2)


def _delete_rows(engine: sa.Engine, study_name: str, deadline: float) -> None:
    from ._optuna_private import models

    tables = models.BaseModel.metadata.tables
    studies_t, trials_t = tables["studies"], tables["trials"]
    pg = engine.dialect.name == "postgresql"
    # wait for other writers no longer than the time left
    wait_ms = max(1, int(1000 * (deadline - time.monotonic())))
    with engine.connect() as con:
        if not pg:
            con.exec_driver_sql(f"PRAGMA busy_timeout = {wait_ms}")
            con.commit()
        try:
            with con.begin():
                if pg:
                    con.exec_driver_sql(f"SET LOCAL lock_timeout = {wait_ms}")
                by_name = studies_t.c.study_name == study_name
                if not pg:  # a write first: from here on no one else writes until the commit
                    con.execute(sa.update(studies_t).where(by_name).values(study_name=studies_t.c.study_name))
                find = sa.select(studies_t.c.study_id).where(by_name)
                sid = con.execute(find.with_for_update() if pg else find).scalar()
                if sid is None:
                    raise KeyError(f"no study named {study_name!r}")
                trial_ids = sa.select(trials_t.c.trial_id).where(trials_t.c.study_id == sid)
                if pg:
                    con.execute(trial_ids.with_for_update()).all()
                for t in reversed(models.BaseModel.metadata.sorted_tables):
                    parents = {fk.column.table.name: fk.parent for fk in t.foreign_keys}
                    if "trials" in parents:
                        con.execute(t.delete().where(parents["trials"].in_(trial_ids)))
                    elif "studies" in parents:
                        con.execute(t.delete().where(parents["studies"] == sid))
                con.execute(studies_t.delete().where(studies_t.c.study_id == sid))
        finally:
            if not pg:
                with contextlib.suppress(Exception):
                    con.exec_driver_sql(f"PRAGMA busy_timeout = {_SQLITE_BUSY_MS}")
                    con.commit()
