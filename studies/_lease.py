"""Worker leases: one row and one heartbeat thread per process; stale leases' trials re-queued once.

A process that asks trials holds one lease for the database: a row in ``dendro_workers``
(the table the API's ``/v1/workers`` lists) whose ``last_heartbeat`` one thread beats
every ``interval`` seconds, in the database's clock. Every trial it asks carries the lease's
id as the system attribute :data:`LEASE_KEY`, written with the trial. A lease is stale when
its row has not been beaten for ``grace`` seconds (or is gone); the next process that asks
a trial of the study, under the study lock, fails each RUNNING trial of a stale lease with
the reason in the user attribute ``fail_reason`` and queues its point again, the failure
and the new WAITING trial in one transaction that only one reaper can win (the trial's
state is changed only if it is still RUNNING). So a point is re-queued exactly once, however
many workers notice together.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import optuna
import sqlalchemy as sa
from optuna import distributions as dists
from optuna.trial import TrialState

from ._keys import LEASE_KEY, TRIAL_STATE_ATTR
from ._optuna_private import create_scoped_session, models
from ._storage import GRACE_PERIOD, HEARTBEAT_INTERVAL, lease_timing, rdb

__all__ = ["Lease", "LEASE_KEY", "lease_for", "hold_lease", "reap_stale", "release_dropped", "live_workers",
           "fail_and_requeue", "queue_again",
           "list_leases", "LEASES_TABLE"]

log = logging.getLogger(__name__)


_META = sa.MetaData()
LEASES_TABLE = sa.Table(
    "dendro_workers",
    _META,
    sa.Column("worker_id", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),  # seconds since the epoch, database clock
    sa.Column("last_heartbeat", sa.Float, nullable=False),  # seconds since the epoch, database clock
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("study_name", sa.String(128), nullable=True),
    sa.Column("trial_number", sa.Integer, nullable=True),
    sa.Column("trials_done", sa.Integer, nullable=False, default=0),
)
_W = LEASES_TABLE
_CREATED: set[str] = set()


def _ensure_table(engine: sa.Engine) -> None:
    key = str(engine.url)
    if key not in _CREATED:
        _META.create_all(engine, checkfirst=True)
        _CREATED.add(key)


def db_now(engine: sa.Engine) -> Any:
    """The database's clock in seconds since the epoch, as an SQL expression: every machine's
    beats and staleness checks are measured against one clock."""
    name = engine.dialect.name
    if name == "postgresql":
        return sa.extract("epoch", sa.func.clock_timestamp())
    if name == "sqlite":
        return (sa.func.julianday("now") - 2440587.5) * 86400.0
    if name == "mysql":
        return sa.func.unix_timestamp(sa.func.now(6))
    return sa.literal(time.time())


class Lease:
    """One process's lease on a database: its row in ``dendro_workers`` and one beating thread.

    ``fields`` (state, study_name, trial_number, trials_done) are written with the next beat;
    :meth:`beat` writes at once.
    """

    def __init__(self, engine: sa.Engine, *, lease_id: str | None = None, interval: float = HEARTBEAT_INTERVAL,
                 grace: float = GRACE_PERIOD, host: str | None = None, pid: int | None = None,
                 device: str = "-") -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        if grace <= interval:
            raise ValueError(f"grace ({grace}) must be longer than the beat interval ({interval})")
        self.engine = engine
        self.id = lease_id or uuid.uuid4().hex[:12]
        self.interval = float(interval)
        self.grace = float(grace)
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.device = device
        self.fields: dict[str, Any] = {"state": "idle"}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.opened = False

    def open(self, thread: bool = True) -> Lease:
        """Write the lease's row (replacing one of the same id) and start beating (``thread``)."""
        _ensure_table(self.engine)
        with self.engine.begin() as con:
            con.execute(_W.delete().where(_W.c.worker_id == self.id))
            con.execute(_W.insert().values(
                worker_id=self.id, host=self.host[:255], pid=self.pid, device=self.device[:64],
                started_at=db_now(self.engine), last_heartbeat=db_now(self.engine), state="idle", trials_done=0))
        self.opened = True
        if thread and self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name=f"lease-{self.id}", daemon=True)
            self._thread.start()
        return self

    def update(self, **fields: Any) -> None:
        """Fields for the row, written with the next beat."""
        with self._lock:
            self.fields.update(fields)

    def beat(self, **fields: Any) -> None:
        """Beat now (with ``fields``); re-creates the row if it was removed."""
        with self._lock:
            self.fields.update(fields)
            values = dict(self.fields)
        with self.engine.begin() as con:
            done = con.execute(_W.update().where(_W.c.worker_id == self.id)
                               .values(last_heartbeat=db_now(self.engine), **values)).rowcount
        if not done:
            # Removed (a clean exit of a process with the same id, or a cleanup): write it again.
            self.open(thread=False)
            if values:
                with self.engine.begin() as con:
                    con.execute(_W.update().where(_W.c.worker_id == self.id).values(**values))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a lost beat is retried next interval
                log.warning("lease %s: beat failed: %s", self.id, exc.__class__.__name__)

    def close(self, remove: bool = True) -> None:
        """Stop beating; ``remove`` deletes the row (its running trials are then stale at once)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if remove and self.opened:
            with contextlib.suppress(Exception):
                with self.engine.begin() as con:
                    con.execute(_W.delete().where(_W.c.worker_id == self.id))


# -- the process's lease per database ------------------------------------------------------------
_LEASES: dict[str, Lease] = {}
_LEASES_LOCK = threading.Lock()


def hold_lease(lease: Lease) -> Lease:
    """Make ``lease`` (opened if it is not) the one this process asks trials under on its database."""
    with _LEASES_LOCK:
        old = _LEASES.get(str(lease.engine.url))
        if old is not None and old is not lease:
            old.close()
        if not lease.opened:
            lease.open()
        _LEASES[str(lease.engine.url)] = lease
    return lease


def lease_for(storage: optuna.storages.BaseStorage) -> Lease | None:
    """The lease this process asks trials of ``storage`` under (one is opened on first use);
    None for storages that are not a database."""
    backend = rdb(storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        return None
    key = str(backend.engine.url)
    with _LEASES_LOCK:
        lease = _LEASES.get(key)
        if lease is None:
            interval, grace = lease_timing(backend)
            lease = _LEASES[key] = Lease(backend.engine, interval=interval, grace=grace).open()
            lease.update(state="running")
    return lease


@atexit.register
def _close_all() -> None:
    for lease in list(_LEASES.values()):
        lease.close()


# -- reading and reaping ---------------------------------------------------------------------------
def list_leases(engine: sa.Engine, live_within: float | None = None) -> list[dict[str, Any]]:
    """The lease rows (oldest first); with ``live_within``, only those beaten that recently.
    ``age`` is the seconds since each one's last beat, in the database's clock."""
    _ensure_table(engine)
    now = db_now(engine)
    q = sa.select(_W, (now - _W.c.last_heartbeat).label("age")).order_by(_W.c.started_at)
    if live_within is not None:
        q = q.where(_W.c.last_heartbeat >= now - live_within)
    with engine.connect() as con:
        return [dict(r._mapping) for r in con.execute(q)]


def live_workers(engine: sa.Engine, study_name: str, grace: float) -> int:
    """Live leases serving ``study_name`` or idle (about to choose one): who shares its trials."""
    _ensure_table(engine)
    q = sa.select(sa.func.count()).select_from(_W).where(
        _W.c.last_heartbeat >= db_now(engine) - grace,
        sa.or_(_W.c.study_name == study_name, _W.c.study_name.is_(None)))
    with engine.connect() as con:
        return int(con.execute(q).scalar() or 0)


_T = models.TrialModel.__table__
_SA = models.TrialSystemAttributeModel.__table__
_UA = models.TrialUserAttributeModel.__table__
_P = models.TrialParamModel.__table__


def reap_stale(storage: optuna.storages.BaseStorage, study_id: int, grace: float) -> list[int]:
    """Fail the RUNNING trials of ``study_id`` whose lease is stale and queue their points again.

    Call it under the study lock. A trial without a lease attribute (its process died between
    creating it and naming its lease) is stale once it started ``grace`` seconds ago. Returns
    the numbers of the trials failed here; a trial that another reaper failed first is left
    alone, so each point is queued exactly once.
    """
    backend = rdb(storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        return []
    engine = backend.engine
    _ensure_table(engine)
    with engine.connect() as con:
        rows = con.execute(
            sa.select(_T.c.trial_id, _T.c.number, _T.c.datetime_start, _SA.c.value_json)
            .select_from(_T.outerjoin(_SA, sa.and_(_SA.c.trial_id == _T.c.trial_id, _SA.c.key == LEASE_KEY)))
            .where(_T.c.study_id == study_id, _T.c.state == TrialState.RUNNING)).all()
        if not rows:
            return []
        live = {json.dumps(w) for (w,) in con.execute(
            sa.select(_W.c.worker_id).where(_W.c.last_heartbeat >= db_now(engine) - grace))}
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    stale = []
    for r in rows:
        if r.value_json is None:
            if r.datetime_start is None or r.datetime_start < cutoff:
                stale.append((r.trial_id, r.number, None))
        elif r.value_json not in live:
            stale.append((r.trial_id, r.number, json.loads(r.value_json)))
    reaped = []
    for trial_id, number, lease_id in stale:
        why = (f"its worker's lease {lease_id} went stale (no beat for {grace:.0f} s): the worker died "
               "or lost the database" if lease_id else "it was never tied to a live worker's lease")
        if fail_and_requeue(backend, study_id, trial_id, number, f"lost: {why}"):
            reaped.append(number)
    if reaped:
        log.warning("failed %d trial(s) of stale leases and queued their points again: %s",
                    len(reaped), reaped)
    return reaped


def release_dropped(storage: optuna.storages.BaseStorage, lease_id: str, reason: str) -> list[int]:
    """Fail the RUNNING trials held under ``lease_id`` and queue their points again, once.

    For a worker whose training was cut short by a lost database: its lease lived on (its
    thread beats again once the database is back), so no other worker would ever count the
    trials it dropped as stale. Call it when the worker trains nothing. Returns their numbers.
    """
    backend = rdb(storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        return []
    with backend.engine.connect() as con:
        rows = con.execute(
            sa.select(_T.c.study_id, _T.c.trial_id, _T.c.number)
            .select_from(_T.join(_SA, sa.and_(_SA.c.trial_id == _T.c.trial_id, _SA.c.key == LEASE_KEY)))
            .where(_T.c.state == TrialState.RUNNING, _SA.c.value_json == json.dumps(lease_id))).all()
    released = [r.number for r in rows
                if fail_and_requeue(backend, r.study_id, r.trial_id, r.number, f"lost: {reason}")]
    if released:
        log.warning("failed %d trial(s) this worker dropped and queued their points again: %s",
                    len(released), released)
    return released


def fail_and_requeue(backend: optuna.storages.RDBStorage, study_id: int, trial_id: int, number: int,
                     reason: str) -> bool:
    """One transaction: RUNNING -> FAIL with the reason, and a WAITING trial with its point.

    False if the trial was no longer RUNNING (another reaper, or the worker's own tell, came
    first): then nothing is written.
    """
    with create_scoped_session(backend.scoped_session) as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        conn = session.connection()
        done = conn.execute(_T.update().where(_T.c.trial_id == trial_id, _T.c.state == TrialState.RUNNING)
                            .values(state=TrialState.FAIL, datetime_complete=datetime.datetime.now())).rowcount
        if done != 1:
            return False
        for key, value in (("fail_reason", reason), (TRIAL_STATE_ATTR, "failed")):
            conn.execute(_UA.delete().where(_UA.c.trial_id == trial_id, _UA.c.key == key))
            conn.execute(_UA.insert().values(trial_id=trial_id, key=key, value_json=json.dumps(value)))
        queue_again(session, study_id, trial_id, number)
    return True


def queue_again(session: Any, study_id: int, trial_id: int, number: int) -> int | None:
    """Queue the point of trial ``trial_id`` (number ``number``) again, in ``session``'s
    transaction, whose caller holds the study's row lock (trial numbers are counted under it).

    As Optuna's retry callback queues a point: a WAITING trial with its params and their
    distributions (the trial shows them while it waits), fixed, so that no sampler draws
    them again, and ``requeued_from``. Returns the new trial's id, or None when the trial has
    no params (never drawn: a fresh trial takes its place).
    """
    conn = session.connection()
    params, rows = {}, []
    for name, value, dist_json in conn.execute(
            sa.select(_P.c.param_name, _P.c.param_value, _P.c.distribution_json).where(_P.c.trial_id == trial_id)):
        params[name] = dists.json_to_distribution(dist_json).to_external_repr(value)
        rows.append({"param_name": name, "param_value": value, "distribution_json": dist_json})
    if not params:
        return None
    new = models.TrialModel(study_id=study_id, number=None, state=TrialState.WAITING, datetime_start=None)
    session.add(new)
    session.flush()
    new.number = new.count_past_trials(session)
    conn.execute(_P.insert(), [{"trial_id": new.trial_id, **r} for r in rows])
    conn.execute(_SA.insert().values(trial_id=new.trial_id, key="fixed_params", value_json=json.dumps(params)))
    conn.execute(_UA.insert().values(trial_id=new.trial_id, key="requeued_from", value_json=json.dumps(number)))
    return int(new.trial_id)
