"""A worker's storage for one study: its trials cached incrementally, a trial's writes batched.

Plain Optuna on an RDB storage makes a round trip for every ``trial.report``,
``set_user_attr`` and pruning check, and re-reads every unfinished trial whenever the
sampler or the pruner looks at the study. :class:`FastStorage` is one study's view of its
trials inside the worker's storage, :class:`BatchingStorage` (what
``studies.open_storage(url, batching=True)`` returns; the calls about a study that has a view
go through it), and changes only when things reach the database, never what reaches it:

- The trials this process runs ("owned") live in memory. Their params, attributes and
  intermediate values are kept there and written in one transaction at two points: when the
  trial starts training (:meth:`FastStorage.flush`: params, the attributes set so far, the
  constraint) and when it is told (its state, values, intermediate values and the remaining
  attributes, all at once). The rows are exactly the ones Optuna's own writes produce.
- A trial is created together with its lease attribute (``studies._lease``), so a worker
  that dies at any point leaves a trial that the next ask fails and re-queues once its
  lease is stale; buffered reports of a dead trial are lost with it, as its training is.
- Other trials are read incrementally: finished trials never change, so they are fetched
  once; each refresh reads the trials created since, and of other workers' unfinished ones
  only their states: a trial is read again only when its state changed or it had no
  params yet. The sampler and the pruner read this view; it is refreshed under the study lock
  before every ask and at most :data:`MAX_AGE` seconds old otherwise, and it always includes
  this process's own trials as they are. Pruning therefore runs Optuna's own pruner against
  the same history without touching the database.

- A write is encoded when it is set (an attribute JSON cannot encode raises there, as it
  does in Optuna's storage), and a batch that the database refuses is written trial by
  trial: the one trial it cannot store is failed with the reason, the others go on.

- A population asks its free slots' trials in one transaction (:meth:`FastStorage.reserve`)
  and holds its tells back (:meth:`FastStorage.deferring`): they change the view at once and
  reach the database together, at the next ask, the next epoch or the end.

Only samplers and pruners that read the study through ``get_trials`` and write nothing of
their own while a trial runs can use it (the caller decides; see ``studies._runner``).

:class:`FastTPESampler` is TPE with the same proposals for less work per ask: it keeps its
estimators between a budget-aware sampler's redraws, scores each finished trial once, and
proposes a whole batch of asks from one fit (:meth:`FastTPESampler.one_fit`). It subclasses
TPESampler's private hooks (``_sample``, ``_get_internal_repr``) and calls its fitting and
scoring helpers; the module-level private names it needs come from ``_optuna_private``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import json
import logging
import math
import sqlite3
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import optuna
import sqlalchemy as sa
from optuna import distributions as dists
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import orm

from . import _lease, _tpe_math
from . import _optuna_private as private
from ._keys import LEASE_KEY, TRIAL_STATE_ATTR, UID_ATTR
from ._optuna_private import create_scoped_session as _create_scoped_session
from ._optuna_private import models
from ._storage import rdb

__all__ = ["BatchingStorage", "FastStorage", "PlainView", "FastTPESampler", "FastMedianPruner", "attach", "of", "view", "row_lock_serialises", "MAX_AGE", "PRUNERS",
           "LEASE_KEY"]

log = logging.getLogger(__name__)

#: seconds a view of other workers' trials may be reused between asks
MAX_AGE = 1.0


class FastMedianPruner(optuna.pruners.MedianPruner):
    """Optuna's MedianPruner, making the same decisions with less work per report.

    Every report at a step is compared with the median of the completed trials' values at
    that step, which Optuna computes over all completed trials on each report. Here it is
    computed once while the completed trials stay the same (as many, the same last one): a
    population's ~1,000 members report the same step one after the other, and each report
    cost a pass over ~1,000 completed trials (0.2 ms; ~0.2 s an epoch).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (which completed trials, {step: percentile over them}): one attribute, replaced
        # whole, so that a thread never writes into the medians of another set of trials
        self._state: tuple[tuple[Any, ...] | None, dict[int, float]] = (None, {})

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        n = len(completed)
        if n == 0 or n < self._n_startup_trials:
            return False
        step = trial.last_step
        if step is None or step < self._n_warmup_steps:
            return False
        first_in_interval, best_so_far, percentile_at = private.percentile_pruner_parts()
        if not first_in_interval(step, trial.intermediate_values.keys(), self._n_warmup_steps,
                                 self._interval_steps):
            return False
        direction = study.direction
        best = best_so_far(trial, direction)
        if math.isnan(best):
            return True
        # completed trials stay completed: the same storage, study, count, first and last
        # completed trial are the same set
        over = (id(study._storage), study._study_id, n, completed[0]._trial_id, completed[-1]._trial_id)
        key, medians = self._state
        if key != over:
            medians = {}
            self._state = (over, medians)
        p = medians.get(step)
        if p is None:
            p = medians[step] = percentile_at(completed, direction, step, self._percentile,
                                              self._n_min_trials)
        if math.isnan(p):
            return False
        return best < p if direction == StudyDirection.MAXIMIZE else best > p


#: pruners that decide from ``study.get_trials`` and the trial alone, writing nothing (``attach``
#: checks ``type(pruner) in PRUNERS``: a subclass must be listed itself)
PRUNERS: tuple[type[optuna.pruners.BasePruner], ...] = (
    optuna.pruners.MedianPruner, FastMedianPruner, optuna.pruners.PercentilePruner,
    optuna.pruners.NopPruner,
)
_T = models.TrialModel
#: ``create_trials``' check: (trials by state, those flagged, the study's attributes) -> how many
Decide = Callable[[Counter[TrialState], Counter[TrialState], dict[str, Any]], int]
_UTC = datetime.UTC


def row_lock_serialises(storage: BaseStorage) -> bool:
    """Whether the study row's ``FOR UPDATE`` lock serialises every writer that numbers the
    study's trials (Optuna's own ``create_new_trial`` takes it): PostgreSQL and MySQL. SQLite
    ignores it (its writers are serialised by the database's write lock, taken at the first
    write, after the reads)."""
    backend = rdb(storage)
    return isinstance(backend, RDBStorage) and backend.engine.dialect.name in ("postgresql", "mysql")


def _pipelines(conn: Any) -> bool:
    """Whether ``conn``'s driver connection can send statements without waiting for each
    answer (psycopg 3's pipeline mode, on libpq 14 or newer)."""
    raw = getattr(conn.connection, "dbapi_connection", None)
    return raw is not None and hasattr(raw, "pipeline") and _libpq_pipelines()


@functools.cache
def _libpq_pipelines() -> bool:
    """libpq's support for pipeline mode, asked once (every ask and every load asks it)."""
    import psycopg

    return bool(psycopg.Pipeline.is_supported())


@contextlib.contextmanager
def _driver_errors(conn: Any) -> Iterator[None]:
    """psycopg's errors from statements sent on ``conn``'s driver connection (the pipelines),
    raised as SQLAlchemy raises them for its own statements (``OperationalError`` for a lock
    timeout, a cancelled query or a lost connection, ...), so that every caller that tells "the
    database is away" from other errors (a worker backs off, the API answers 503) sees the
    same exceptions on both paths. A lost connection is invalidated, not returned to the pool."""
    try:
        yield
    except Exception as exc:
        import psycopg

        if not isinstance(exc, psycopg.Error):
            raise
        gone = bool(conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, None))
        if gone:
            conn.invalidate()
        raise sa.exc.DBAPIError.instance(None, None, exc, psycopg.Error, connection_invalidated=gone,
                                         dialect=conn.dialect) from exc


_SCALARS = (str, int, float, bool, type(None))


def _copy_value(v: Any) -> Any:
    """``copy.deepcopy`` of an attribute value: JSON-like data (what the storages hold) copied
    by hand, several times faster; anything else by deepcopy."""
    if isinstance(v, _SCALARS):
        return v
    if type(v) is dict:
        return {k: _copy_value(x) for k, x in v.items()}
    if type(v) is list:
        return [_copy_value(x) for x in v]
    return copy.deepcopy(v)


def _copy_trial(t: FrozenTrial) -> FrozenTrial:
    """A deep copy of ``t``: Optuna's tell reads a trial three times, each a copy, and a
    population ends ~1,000 trials at once, each holding its epochs' history (copy.deepcopy of a
    15-epoch trial: ~260 us here; this: a fraction of it). Distributions are immutable and
    shared; datetimes are immutable."""
    return FrozenTrial(
        number=t.number, state=t.state, value=None,
        values=list(t.values) if t.values is not None else None,
        datetime_start=t.datetime_start, datetime_complete=t.datetime_complete,
        params=dict(t.params), distributions=dict(t.distributions),
        user_attrs=_copy_value(t.user_attrs), system_attrs=_copy_value(t.system_attrs),
        intermediate_values=dict(t.intermediate_values), trial_id=t._trial_id,
    )


def _state_name(t: FrozenTrial) -> str:
    """The default ``classify`` of a view: Optuna's state, lower case."""
    return t.state.name.lower()


def _utc(value: datetime.datetime) -> datetime.datetime:
    """A local naive datetime as the naive UTC that Optuna's trial table stores."""
    return value.astimezone(_UTC).replace(tzinfo=None)


@functools.cache
def _trial_row_statement() -> Any:
    """A trial's (study id, number, start as stored) by its id (bound as ``t``): what
    :meth:`FastStorage._still_ours` compares."""
    t = _T.__table__
    return sa.select(t.c.study_id, t.c.number, t.c.datetime_start).where(t.c.trial_id == sa.bindparam("t"))


def _trial_row_reader(conn: Any) -> Callable[[int], Any]:
    """:func:`_trial_row_statement` read on ``conn``, by trial id."""
    return lambda tid: conn.execute(_trial_row_statement(), {"t": tid}).first()


def _local(value: Any) -> Any:
    """A naive UTC datetime from the trial table as the local naive one Optuna's reads give
    (its ``TrialModel.datetime_start``/``datetime_complete``); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):  # a driver that hands the column back as text
        value = datetime.datetime.fromisoformat(value)
    return value.replace(tzinfo=_UTC).astimezone().replace(tzinfo=None)


class _Owned:
    """A trial this process runs: its live FrozenTrial and the rows not yet written."""

    __slots__ = ("live", "params", "user", "system", "ivs", "adopted", "told", "requeue")

    def __init__(self, live: FrozenTrial, adopted: bool = False) -> None:
        self.live = live
        self.params: dict[str, tuple[float, dists.BaseDistribution]] = {}
        self.user: dict[str, Any] = {}
        self.system: dict[str, Any] = {}
        self.ivs: dict[int, float] = {}
        self.adopted = adopted  # popped from the queue: rows may exist from before
        self.told = False  # finished in memory, the state not yet written
        self.requeue = False  # its point is queued again in the transaction that writes the tell

    @property
    def pending(self) -> bool:
        return bool(self.params or self.user or self.system or self.ivs or self.told)


def _transient(exc: BaseException) -> bool:
    """Whether a write failed because the database is away or busy (kept for the next flush),
    rather than because it refused what was written."""
    e = exc.__cause__ if isinstance(exc, StorageInternalError) and exc.__cause__ is not None else exc
    return isinstance(e, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.DisconnectionError) or (
        isinstance(e, sa.exc.DBAPIError) and bool(e.connection_invalidated))


def _marks_gone(method: Callable[..., Any]) -> Callable[..., Any]:
    """A FastStorage method that reads or writes the database: a KeyError from it means the
    study (or the trials with it) no longer exists, so the view is dead from then on and its
    BatchingStorage sends the study's calls to the database again."""
    @functools.wraps(method)
    def wrapper(self: FastStorage, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except KeyError:
            self.gone = True
            raise
    return wrapper


class _StudiesThrough(BaseStorage):
    """The study-level calls, straight to the RDBStorage (``self._backend``) underneath."""

    _backend: BaseStorage

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self._backend.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self._backend.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._backend.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._backend.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._backend.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._backend.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._backend.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._backend.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._backend.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[optuna.study.FrozenStudy]:
        return self._backend.get_all_studies()

    def remove_session(self) -> None:
        self._backend.remove_session()


class FastStorage(_StudiesThrough):
    """One study's view in a worker's :class:`BatchingStorage`: see the module's docstring.
    One study, one process."""

    #: asks come in batches, made in one transaction (:meth:`reserve`); tells can be held back
    batching = True

    def __init__(self, inner: BaseStorage, study_id: int,
                 classify: Callable[[FrozenTrial], str] | None = None) -> None:
        backend = rdb(inner)
        if not isinstance(backend, RDBStorage):
            raise ValueError(f"FastStorage needs an RDBStorage, got {type(backend).__name__}")
        self._backend = backend  # studies._storage.rdb() finds the RDBStorage here
        self._study_id = study_id
        self._classify = classify or _state_name
        self._lock = threading.RLock()
        self._trials: dict[int, FrozenTrial] = {}  # number -> trial, every trial seen
        self._numbers: dict[int, int] = {}  # trial_id -> number
        self._watch: set[int] = set()  # other processes' unfinished trials, re-read on refresh
        self._max_id = -1  # every trial with a smaller or equal id has been read
        self._mine: set[int] = set()  # created here since the last read, ids above _max_id
        self._owned: dict[int, _Owned] = {}
        self._deferred: list[int] = []  # owned trials told in memory, not yet written
        self._reserved: list[int] = []  # created by reserve(), handed out by create_new_trial
        self._defer = False
        self._finished: Counter[str] = Counter()
        self._counted: set[int] = set()  # the finished trials counted in _finished
        self._dists: dict[str, dists.BaseDistribution] = {}
        self._lists: dict[Any, list[FrozenTrial]] = {}
        self._refreshed = -float("inf")
        self._quiet = False
        self._directions: list[StudyDirection] | None = None
        self._stmts: dict[str, Any] | None = None
        self._locked: dict[str, Any] | None = None
        self._counts_st: dict[str, Any] | None = None
        self._pipeline: dict[str, str] | None = None
        self._loads: dict[str, Any] | None = None
        self._raw_loads: dict[str, str] | None = None
        self._uid: str | None = None  # the study's creation (UID_ATTR), once read
        self.gone = False  # the study was found deleted (or replaced under its id)
        self.writes = 0  # transactions written, for tests and benchmarks
        #: the lease the trials this process creates are tied to (set by the asker)
        self.lease_id: str | None = None
        self._json_dists: dict[str, dists.BaseDistribution] = {}
        self._settle: dict[str, tuple[int, Counter[TrialState], Counter[TrialState]]] = {}

    # -- the view ----------------------------------------------------------------------------
    @_marks_gone
    def refresh(self) -> None:
        """Read trials created since the last read and other workers' unfinished ones.

        Raises KeyError if the study was deleted (as Optuna does).
        """
        with self._lock, _create_scoped_session(self._backend.scoped_session) as session:
            conn = session.connection()
            self._check_study(conn)
            cond = _T.trial_id > self._max_id
            if self._mine:
                cond = sa.and_(cond, _T.trial_id.notin_(self._mine))
            # Usually nothing changed: look for ids and states first. A finished trial is
            # loaded whole, once; other workers' unfinished ones only by their states and
            # params (what counts and TPE's lies need), again only when they changed.
            full: list[int] = []
            light: dict[int, TrialState] = {}
            max_id = self._max_id  # moved on only once every trial up to it is loaded (below)
            for tid, state in conn.execute(sa.select(_T.trial_id, _T.state)
                                           .where(_T.study_id == self._study_id, cond)):
                if state.is_finished():
                    full.append(tid)
                else:
                    light[tid] = state
                max_id = max(max_id, tid)
            watch = sorted(self._watch)
            for lo in range(0, len(watch), 5000):
                for tid, state in conn.execute(sa.select(_T.trial_id, _T.state)
                                               .where(_T.trial_id.in_(watch[lo:lo + 5000]))):
                    known = self._live(tid)
                    if state.is_finished():
                        full.append(tid)
                    elif known is None or known.state != state or not known.params:
                        light[tid] = state
            full = [tid for tid in full if tid not in self._owned]
            for lo in range(0, len(full), 500):
                self._load_full(conn, full[lo:lo + 500])
            unfinished = sorted(light)
            for lo in range(0, len(unfinished), 500):
                self._load_light(conn, {i: light[i] for i in unfinished[lo:lo + 500]})
            # Every trial below one this process created was committed before it (trials are
            # created under the study row lock), so this read has them all. A read that fails
            # before here leaves _max_id where it was: the next one reads the same trials again
            # (the view and the settled counts rely on holding every trial up to _max_id).
            self._max_id = max([max_id, *self._mine])
            self._mine.clear()
            self._refreshed = time.monotonic()

    def _check_study(self, conn: Any) -> None:
        """Check that the study still exists (KeyError if not, as Optuna raises)."""
        studies_ = models.StudyModel.__table__
        if conn.execute(sa.select(studies_.c.study_id)
                        .where(studies_.c.study_id == self._study_id)).first() is None:
            raise KeyError(models.NOT_FOUND_MSG)

    @_marks_gone
    def count_states(self, flag: str) -> tuple[Counter[TrialState], Counter[TrialState], dict[str, Any]]:
        """The study's trials by state, those of them whose user attribute ``flag`` is true by
        state, and the study's user attributes: two small reads on one connection, none of
        the trials loaded. For the checks under the study lock, which need only the counts:
        the view's own refresh there would read everything that changed while this worker
        waited for the lock, and with many workers that wait is long (bench_scale.py), as is
        every round trip made while holding it. Raises KeyError if the study was deleted (as
        Optuna does)."""
        settled = self._settled(flag)
        with self._backend.engine.connect() as conn:
            return self._count_states(conn, flag, settled=settled)

    def _settled(self, flag: str) -> tuple[int, Counter[TrialState], Counter[TrialState]]:
        """``(w, by_state, flagged)``: the counts of this study's trials with ids up to ``w``,
        every one of them finished and written when the view read it. A finished trial never
        changes, so these counts are final, and a count needs to read only the trials after
        ``w`` (the count under the lock read them all: its time grew with the study, and
        every worker waiting for the lock paid it). No read; taken before the lock."""
        with self._lock:
            upto, by_state, flagged = self._settle.get(flag, (-1, Counter(), Counter()))
            # the view holds every trial of the study with an id up to _max_id (refresh)
            for tid in sorted(i for i in self._numbers if upto < i <= self._max_id):
                t = self._trials[self._numbers[tid]]
                if tid in self._owned or not t.state.is_finished():
                    break  # running, or told here and not yet written
                by_state[t.state] += 1
                if t.user_attrs.get(flag):
                    flagged[t.state] += 1
                upto = tid
            self._settle[flag] = (upto, by_state, flagged)
            return upto, Counter(by_state), Counter(flagged)

    def _count_states(self, conn: Any, flag: str, lock: bool = False,
                      settled: tuple[int, Counter[TrialState], Counter[TrialState]] | None = None,
                      ) -> tuple[Counter[TrialState], Counter[TrialState], dict[str, Any]]:
        """:meth:`count_states` on ``conn``; with ``lock``, the read of the study's attributes
        takes its row's lock too (PostgreSQL's ``FOR UPDATE OF``). ``settled``
        (:meth:`_settled`): counts already known, up to a trial id; only later trials are read."""
        st = self._count_statements()
        rows = conn.execute(st["attrs_locked" if lock else "attrs"], {"sid": self._study_id}).all()
        attrs = self._study_attrs(rows, _trial_row_reader(conn))
        upto = (settled or (-1,))[0]
        counts = conn.execute(st["counts"], {"sid": self._study_id, "upto": upto, "flag": flag}).all()
        return (*self._add_counts(counts, settled), attrs)

    def _study_attrs(self, rows: Sequence[Any], trial_row: Callable[[int], Any]) -> dict[str, Any]:
        """The study's user attributes from the ``attrs`` read's rows; KeyError if the study is
        gone, or is not the one this view was made for.

        A new uid means the study was made anew under this id (SQLite reuses ids), or was
        extended or resumed (which give it a new uid so that workers read its spec again). It
        is the same study if a trial this view holds is still there as it was: ``trial_row``
        reads a trial's (study id, number, start) by its id."""
        if not rows:
            raise KeyError(models.NOT_FOUND_MSG)
        attrs = {k: json.loads(v) for _, k, v in rows if k is not None}
        self._check_uid(attrs.get(UID_ATTR), trial_row)
        return attrs

    def _check_uid(self, uid: str | None, trial_row: Callable[[int], Any]) -> None:
        """Take ``uid``, just read from the database, as this view's study's. KeyError if it is
        another study's: the study this view was made for was deleted, and another created
        under its id, so the trials kept here are not that one's. A new uid is still this
        study (extended or resumed) if a trial this view holds is there as it was."""
        if self._uid is not None and uid != self._uid and not self._still_ours(trial_row):
            raise KeyError(models.NOT_FOUND_MSG)
        self._uid = uid

    def _still_ours(self, trial_row: Callable[[int], Any]) -> bool:
        """Whether a trial this view holds is still in the database as this view has it (one
        read; SQLite may give a deleted trial's id to another study's trial, but not its
        start). A view that holds no trial has nothing to mistake."""
        with self._lock:
            known = next((t for t in self._trials.values() if t.datetime_start is not None), None)
        if known is None:
            return True
        row = trial_row(known._trial_id)
        if row is None:
            return False
        return bool(row[0] == self._study_id and row[1] == known.number and _local(row[2]) == known.datetime_start)

    @staticmethod
    def _add_counts(rows: Iterable[Any], settled: tuple[int, Counter[TrialState], Counter[TrialState]] | None,
                    ) -> tuple[Counter[TrialState], Counter[TrialState]]:
        """The ``counts`` read's rows (every trial after the settled ones, by state and its
        flag's value) added to the settled counts."""
        _, by_state, flagged = settled or (-1, Counter(), Counter())
        for state, value, n in rows:
            state = state if isinstance(state, TrialState) else TrialState[state]  # a raw row: the name
            by_state[state] += int(n)
            if value is not None and json.loads(value):
                flagged[state] += int(n)
        return by_state, flagged

    def _load_statements(self) -> dict[str, Any]:
        """The loads' reads, built once, each for a list of trial ids (bound as ``ids``)."""
        if self._loads is None:
            t, v = _T.__table__, models.TrialValueModel.__table__
            iv = models.TrialIntermediateValueModel.__table__
            ua, sa_ = models.TrialUserAttributeModel.__table__, models.TrialSystemAttributeModel.__table__
            p = models.TrialParamModel.__table__

            def among(table: Any) -> Any:
                return table.c.trial_id.in_(sa.bindparam("ids", expanding=True))

            self._loads = {
                "values": sa.select(v.c.trial_id, v.c.objective, v.c.value, v.c.value_type).where(among(v)),
                "params": sa.select(p.c.trial_id, p.c.param_name, p.c.param_value, p.c.distribution_json)
                .where(among(p)).order_by(p.c.param_id),
                "user": sa.select(ua.c.trial_id, ua.c.key, ua.c.value_json).where(among(ua)).order_by(*ua.primary_key),
                "system": sa.select(sa_.c.trial_id, sa_.c.key, sa_.c.value_json).where(among(sa_))
                .order_by(*sa_.primary_key),
                "ivs": sa.select(iv.c.trial_id, iv.c.step, iv.c.intermediate_value, iv.c.intermediate_value_type)
                .where(among(iv)).order_by(iv.c.trial_intermediate_value_id),
                "trials": sa.select(t.c.trial_id, t.c.number, t.c.state, t.c.datetime_start, t.c.datetime_complete)
                .where(among(t)).order_by(t.c.trial_id),
                "light": sa.select(t.c.trial_id, t.c.number, t.c.datetime_start).where(among(t)),
            }
        return self._loads

    def _reads(self, conn: Any, names: Sequence[str], ids: list[int]) -> list[list[Any]]:
        """The rows of the load statements ``names`` for ``ids``. On PostgreSQL through psycopg's
        pipeline, all in one round trip and without SQLAlchemy's per-statement and per-row work
        (every worker loads every other worker's trials, a few at a time: with many workers
        that was most of the growth in a worker's CPU per trial); enum columns then come back
        as their names."""
        st = self._load_statements()
        if not _pipelines(conn):
            return [conn.execute(st[name], {"ids": ids}).all() for name in names]
        if self._raw_loads is None:
            # the same statements as psycopg SQL, ``IN (...)`` as ``= ANY(array)``: one text
            # whatever the number of ids
            dialect = self._backend.engine.dialect
            self._raw_loads = {}
            for name, stmt in st.items():
                sql = str(stmt.compile(dialect=dialect))
                assert "IN (__[POSTCOMPILE_ids])" in sql, sql
                self._raw_loads[name] = sql.replace("IN (__[POSTCOMPILE_ids])", "= ANY(%(ids)s)")
        raw = conn.connection.dbapi_connection
        with _driver_errors(conn), raw.pipeline():
            cursors = []
            for name in names:
                cur = raw.cursor()
                cur.execute(self._raw_loads[name], {"ids": ids})
                cursors.append(cur)
            return [cur.fetchall() for cur in cursors]

    def _load_full(self, conn: Any, ids: list[int]) -> None:
        """Finished trials, whole: the rows Optuna's ``get_trial`` reads, as it builds them
        (values by objective, params in the order they were written), with one plain query
        per table (on PostgreSQL, all sent at once: :meth:`_reads`). Every worker loads every
        other worker's finished trials once, so this is the read that grows with the number of
        workers: no ORM objects are made for it."""
        v_rows, p_rows, u_rows, s_rows, iv_rows, t_rows = self._reads(
            conn, ("values", "params", "user", "system", "ivs", "trials"), ids)
        value_type = models.TrialValueModel.TrialValueType
        iv_type = models.TrialIntermediateValueModel.TrialIntermediateValueType
        values: dict[int, dict[int, float]] = {}
        for tid, objective, value, kind in v_rows:
            kind = kind if isinstance(kind, value_type) else value_type[kind]
            values.setdefault(tid, {})[objective] = models.TrialValueModel.stored_repr_to_value(value, kind)
        params, distributions = self._params_of(p_rows)
        attrs: list[dict[int, dict[str, Any]]] = [{}, {}]
        for i, rows in enumerate((u_rows, s_rows)):
            for tid, key, value_json in rows:
                attrs[i].setdefault(tid, {})[key] = json.loads(value_json)
        ivs: dict[int, dict[int, float]] = {}
        for tid, step, value, kind in iv_rows:
            kind = kind if isinstance(kind, iv_type) else iv_type[kind]
            ivs.setdefault(tid, {})[step] = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(
                value, kind)
        for tid, number, state, start, complete in t_rows:
            state = state if isinstance(state, TrialState) else TrialState[state]
            vals = values.get(tid)
            self._put(FrozenTrial(
                number=number, state=state, value=None,
                values=[vals[k] for k in sorted(vals)] if vals else None,
                datetime_start=_local(start), datetime_complete=_local(complete), params=params.get(tid, {}),
                distributions=distributions.get(tid, {}), user_attrs=attrs[0].get(tid, {}),
                system_attrs=attrs[1].get(tid, {}), intermediate_values=ivs.get(tid, {}), trial_id=tid))

    def _params_of(self, rows: Iterable[Any]) -> tuple[dict[int, dict[str, Any]],
                                                     dict[int, dict[str, dists.BaseDistribution]]]:
        """The params and distributions in the ``params`` read's rows, in the order written."""
        params: dict[int, dict[str, Any]] = {}
        distributions: dict[int, dict[str, dists.BaseDistribution]] = {}
        for tid, name, value, dj in rows:
            d = self._json_dists.get(dj)
            if d is None:
                d = self._json_dists[dj] = dists.json_to_distribution(dj)
            params.setdefault(tid, {})[name] = d.to_external_repr(value)
            distributions.setdefault(tid, {})[name] = d
        return params, distributions

    def _load_light(self, conn: Any, states: dict[int, TrialState]) -> None:
        """Unfinished trials of other workers: state, number, start and params, nothing more.

        ``states`` are as first read: a trial that finished since stays unfinished here until
        the next refresh loads it whole (each read may see a newer database).
        """
        p_rows, t_rows = self._reads(conn, ("params", "light"), list(states))
        params, distributions = self._params_of(p_rows)
        for tid, number, start in t_rows:
            state = states[tid]
            if tid in self._owned:
                continue
            self._put(FrozenTrial(
                number=number, state=state, value=None, values=None, datetime_start=_local(start),
                datetime_complete=None, params=params.get(tid, {}), distributions=distributions.get(tid, {}),
                user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=tid))

    def _put(self, t: FrozenTrial) -> None:
        self._trials[t.number] = t
        self._numbers[t._trial_id] = t.number
        if t.state.is_finished():
            self._watch.discard(t._trial_id)
            if t._trial_id not in self._counted:  # a read that failed midway loads it again
                self._counted.add(t._trial_id)
                self._finished[self._classify(t)] += 1
            for name, d in t.distributions.items():
                self._dists.setdefault(name, d)
        elif t._trial_id not in self._owned:
            self._watch.add(t._trial_id)
        self._lists.clear()

    def _fresh(self, force: bool = False) -> None:
        if force or (time.monotonic() - self._refreshed > MAX_AGE and not self._quiet):
            self.refresh()

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Inside, reads use the view as it is (no refresh however old): for the asks under
        the study lock, which have just read what they need (``count_states``)."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def kinds(self) -> Counter[str]:
        """Trials by ``classify`` (finished ones counted once, unfinished ones now); no read."""
        with self._lock:
            c = Counter(self._finished)
            for tid in list(self._watch) + list(self._owned):
                t = self._live(tid)
                if t is not None and not t.state.is_finished():
                    c[self._classify(t)] += 1
            return c

    def others_running(self) -> bool:
        """Whether another process's trial was running at the last read (it may be stale)."""
        with self._lock:
            return any(self._trials[self._numbers[i]].state == TrialState.RUNNING
                       for i in self._watch)

    def _live(self, trial_id: int) -> FrozenTrial | None:
        o = self._owned.get(trial_id)
        if o is not None:
            return o.live
        number = self._numbers.get(trial_id)
        return None if number is None else self._trials[number]

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if study_id != self._study_id:
            return self._backend.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        with self._lock:
            # Optuna's own hot paths (sampler, pruner, queue) read without copies; a caller
            # that asks for copies gets the database as it is now.
            self._fresh(force=deepcopy)
            key = None if states is None else tuple(sorted(s.value for s in states))  # type: ignore[attr-defined]
            trials = self._lists.get(key)
            if trials is None:
                everything = self._lists.get(None)
                if everything is None:
                    everything = self._lists[None] = sorted(self._trials.values(), key=lambda t: t.number)
                trials = everything if states is None else [t for t in everything if t.state in states]
                self._lists[key] = trials
        return [_copy_trial(t) for t in trials] if deepcopy else trials

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            o = self._owned.get(trial_id)
            if o is not None:
                return _copy_trial(o.live)
            t = self._live(trial_id)
            if t is not None and t.state.is_finished():
                return t
        return self._backend.get_trial(trial_id)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        with self._lock:
            t = self._trials.get(trial_number) if study_id == self._study_id else None
            if t is not None:
                return t._trial_id
        return self._backend.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return dict(self.get_trial(trial_id).params)

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        with self._lock:
            o = self._owned.get(trial_id)
            if o is not None:
                return _copy_value(o.live.user_attrs)
        return self.get_trial(trial_id).user_attrs

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        with self._lock:
            o = self._owned.get(trial_id)
            if o is not None:
                return _copy_value(o.live.system_attrs)
        return self.get_trial(trial_id).system_attrs

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        self.flush()  # the database decides, as it does for Optuna (ties included)
        return self._backend.get_best_trial(study_id)

    # -- creating trials ---------------------------------------------------------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if study_id != self._study_id or template_trial is not None:
            # add_trial / enqueue_trial: as Optuna writes them; the view is stale from now on,
            # so the next read (an ask popping a waiting trial included) sees them.
            tid = self._backend.create_new_trial(study_id, template_trial)
            self._refreshed = -float("inf")
            return tid
        with self._lock:
            if self._reserved:
                return self._reserved.pop(0)
        return self.create_trials(1)[0]

    def reserve(self, n: int, decide: Decide | None = None) -> list[int]:
        """Create ``n`` trials now, in one transaction, for the next ``create_new_trial`` calls
        (with ``decide``, as many as it says: see :meth:`create_trials`). Returns their ids."""
        ids = self.create_trials(n, decide)
        with self._lock:
            self._reserved.extend(ids)
        return ids

    @_marks_gone
    def create_trials(self, n: int, decide: Decide | None = None) -> list[int]:
        """Create ``n`` RUNNING trials, tied to :attr:`lease_id`, in one transaction.

        Numbers are counted under the study row lock as Optuna counts them: the trials of
        the study with smaller ids. Each round trip here is paid by every worker waiting for
        the lock, so the statements do not grow with ``n``: the row lock, the rows, their
        count, their numbers, their lease (with ``decide`` on PostgreSQL: the row lock with the
        study's attributes, the counts, the rows with their numbers, their lease).

        ``decide(by_state, flagged, attrs)``, given :meth:`count_states`'s answer (flag
        ``"infeasible"``) read under the row lock, says how many to create instead of ``n``
        (none if it says 0 or less). On a database whose row lock serialises every writer
        that numbers trials (PostgreSQL, MySQL) the count, the check and the creation are
        then one transaction: no other lock is needed for a study's asks to never overshoot.

        The commit is synchronous. (Committing this transaction asynchronously shortened the
        lock's hold, but a server crash could then lose the ids' sequence advance as well as
        the rows, and hand the same ids out again while this worker still holds them.) The
        view learns of the new trials only once they are committed.
        """
        settled = self._settled("infeasible") if decide is not None else None
        with self._lock:
            ids, lives = self._create(n, decide, settled)
            for live in lives:  # committed: now the view may hold them
                self._owned[live._trial_id] = _Owned(live)
                self._trials[live.number] = live
                self._numbers[live._trial_id] = live.number
            self._mine.update(ids)  # not to be read back: this process knows them
            self._lists.clear()
            if ids:
                self.writes += 1
        return ids

    def _create(self, n: int, decide: Decide | None,
                settled: tuple[int, Counter[TrialState], Counter[TrialState]] | None,
                ) -> tuple[list[int], list[FrozenTrial]]:
        """:meth:`create_trials`' transaction: the ids and the new trials, once committed."""
        t = _T.__table__
        with _create_scoped_session(self._backend.scoped_session) as session:
            conn = session.connection()
            studies_ = models.StudyModel.__table__
            # PostgreSQL: the row lock is taken by the read of the study's attributes (one
            # round trip less while holding it); the counts are read after it, fresh.
            lock_with_attrs = decide is not None and self._backend.engine.dialect.name == "postgresql"
            if lock_with_attrs and _pipelines(conn):
                assert decide is not None
                return self._create_pipelined(conn, n, decide, settled)
            if not lock_with_attrs and conn.execute(
                    sa.select(studies_.c.study_id).where(studies_.c.study_id == self._study_id)
                    .with_for_update()).first() is None:
                raise KeyError(models.NOT_FOUND_MSG)
            base: int | None = None
            if decide is not None:
                by_state, flagged, attrs = self._count_states(conn, "infeasible", lock=lock_with_attrs,
                                                              settled=settled)
                n = decide(by_state, flagged, attrs)
                if n <= 0:
                    return [], []
                if row_lock_serialises(self._backend):
                    # every writer that numbers this study's trials holds its row lock: the
                    # count now is the count of the trials with smaller ids
                    base = sum(by_state.values())
            now = datetime.datetime.now()
            # With the base known, the rows are written with their numbers: one statement.
            numbered = base is not None
            pg = numbered and conn.dialect.name == "postgresql"
            if pg:
                # statements built once, whatever n (each new statement object cost a compile's
                # worth of Python while holding the lock); row i is the one numbered base + i
                assert base is not None
                got = conn.execute(self._locked_statements()["trials"], {
                    "lo": base, "hi": base + n - 1, "sid": self._study_id, "state": TrialState.RUNNING,
                    "start": _utc(now)}).all()
                inserted = [tid for tid, _ in sorted(got, key=lambda r: r[1])]
            else:
                rows = [{"study_id": self._study_id, "number": base + i if base is not None else None,
                         "state": TrialState.RUNNING, "datetime_start": _utc(now)} for i in range(n)]
                inserted = list(conn.execute(
                    t.insert().returning(t.c.trial_id, sort_by_parameter_order=True), rows).scalars())
            ids = sorted(inserted)
            if base is None:
                base = conn.execute(sa.select(sa.func.count()).select_from(t).where(
                    t.c.study_id == self._study_id, t.c.trial_id < ids[0])).scalar_one()
            numbers = {tid: base + i for i, tid in enumerate(ids)}
            if not numbered or inserted != ids:
                # Optuna's numbering: by id. (A database that gave the rows' ids out of their
                # order would need this too.)
                conn.execute(t.update().where(t.c.trial_id.in_(ids))
                             .values(number=sa.case(numbers, value=t.c.trial_id)))
            if self.lease_id is not None:
                if pg:
                    conn.execute(self._locked_statements()["leases"], {
                        "ids": ids, "key": LEASE_KEY, "value": json.dumps(self.lease_id)})
                else:
                    conn.execute(sa.insert(models.TrialSystemAttributeModel.__table__),
                                 [{"trial_id": tid, "key": LEASE_KEY, "value_json": json.dumps(self.lease_id)}
                                  for tid in ids])
        return ids, self._new_trials(numbers, now)

    def _create_pipelined(self, conn: Any, n: int, decide: Decide,
                          settled: tuple[int, Counter[TrialState], Counter[TrialState]] | None,
                          ) -> tuple[list[int], list[FrozenTrial]]:
        """:meth:`_create` on PostgreSQL through psycopg's pipeline: two round trips, where
        the statements one at a time took five, each paid by every worker waiting for the lock.

        The first sends the read that takes the study row's lock (with the study's attributes)
        and the count together; the server runs them in order, and the count, a statement of
        its own, sees every trial committed before the lock was granted. ``decide`` runs on
        the answer. The second sends the numbered rows with their leases (one statement: the
        leases are a data-modifying ``WITH`` on the inserted rows) and the commit.
        """
        sql = self._pipeline_sql()
        raw = conn.connection.dbapi_connection
        upto = (settled or (-1,))[0]
        with _driver_errors(conn), raw.pipeline():
            locked, counted = raw.cursor(), raw.cursor()
            locked.execute(sql["attrs_locked"], {"sid": self._study_id})
            counted.execute(sql["counts"], {"sid": self._study_id, "upto": upto, "flag": "infeasible"})
            attrs = self._study_attrs(locked.fetchall(), functools.partial(self._trial_row_raw, raw, sql["trial_row"]))
            by_state, flagged = self._add_counts(counted.fetchall(), settled)
            n = decide(by_state, flagged, attrs)
            if n <= 0:
                return [], []
            base = sum(by_state.values())  # the row lock serialises every writer that numbers trials
            now = datetime.datetime.now()
            inserted = raw.cursor()
            params = {"lo": base, "hi": base + n - 1, "sid": self._study_id, "state": TrialState.RUNNING.name,
                      "start": _utc(now), "key": LEASE_KEY, "value": json.dumps(self.lease_id)}
            inserted.execute(sql["trials" if self.lease_id is None else "leased"], params)
            raw.commit()  # sent with the insert; SQLAlchemy's own commit after it finds nothing to do
            got = inserted.fetchall()
        numbers = {tid: number for tid, number in got}
        return sorted(numbers), self._new_trials(numbers, now)

    @staticmethod
    def _trial_row_raw(raw: Any, sql: str, trial_id: int) -> Any:
        """:func:`_trial_row_statement` on the raw psycopg connection (in a pipeline)."""
        cur = raw.cursor()
        cur.execute(sql, {"t": trial_id})
        return cur.fetchone()

    def _new_trials(self, numbers: dict[int, int], now: datetime.datetime) -> list[FrozenTrial]:
        """The view's trials for rows just created (id -> number), RUNNING under this lease."""
        system = {LEASE_KEY: self.lease_id} if self.lease_id is not None else {}
        return [FrozenTrial(
            number=numbers[tid], state=TrialState.RUNNING, value=None, values=None,
            datetime_start=now, datetime_complete=None, params={},
            distributions={}, user_attrs={}, system_attrs=dict(system), intermediate_values={},
            trial_id=tid) for tid in sorted(numbers)]

    def _pipeline_sql(self) -> dict[str, str]:
        """:meth:`_create_pipelined`'s statements as psycopg SQL, compiled once from the same
        Core statements the one-at-a-time path runs."""
        if self._pipeline is None:
            dialect = self._backend.engine.dialect
            counts, locked = self._count_statements(), self._locked_statements()
            trials = str(locked["trials"].compile(dialect=dialect))
            sat = models.TrialSystemAttributeModel.__table__.name
            self._pipeline = {
                "attrs_locked": str(counts["attrs_locked"].compile(dialect=dialect)),
                "counts": str(counts["counts"].compile(dialect=dialect)),
                "trial_row": str(_trial_row_statement().compile(dialect=dialect)),
                "trials": trials,
                "leased": (f"WITH ins AS ({trials}), lease AS (INSERT INTO {sat} (trial_id, key, value_json) "
                           "SELECT ins.trial_id, %(key)s, %(value)s FROM ins) SELECT trial_id, number FROM ins"),
            }
        return self._pipeline

    def _adopt(self, trial_id: int) -> None:
        """A waiting trial this process just set RUNNING: run it as its own from now on."""
        if self.lease_id is not None:
            self._backend.set_trial_system_attr(trial_id, LEASE_KEY, self.lease_id)
        live = self._backend.get_trial(trial_id)
        with self._lock:
            self._owned[trial_id] = _Owned(live, adopted=True)
            self._watch.discard(trial_id)
            self._put(live)

    # -- writing trials ----------------------------------------------------------------------
    def _own(self, trial_id: int) -> _Owned | None:
        o = self._owned.get(trial_id)
        if o is not None and (o.told or o.live.state.is_finished()):
            raise UpdateFinishedTrialError(
                f"Trial#{o.live.number} has already finished and can not be updated.")
        return o

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: dists.BaseDistribution) -> None:
        with self._lock:
            o = self._own(trial_id)
            if o is None:
                self._backend.set_trial_param(trial_id, param_name, param_value_internal, distribution)
                return
            previous = self._dists.get(param_name) or self._stored_distribution(param_name)
            if previous is not None:
                dists.check_distribution_compatibility(previous, distribution)
            else:
                self._dists[param_name] = distribution
            o.params[param_name] = (param_value_internal, distribution)
            o.live.params[param_name] = distribution.to_external_repr(param_value_internal)
            o.live.distributions[param_name] = distribution

    def _stored_distribution(self, name: str) -> dists.BaseDistribution | None:
        """The distribution the study stored first for ``name`` (a read only until one is seen)."""
        with _create_scoped_session(self._backend.scoped_session) as session:
            row = (session.query(models.TrialParamModel.distribution_json)
                   .join(_T).filter(_T.study_id == self._study_id,
                                    models.TrialParamModel.param_name == name).first())
        if row is None:
            return None
        d = dists.json_to_distribution(row[0])
        self._dists[name] = d
        return d

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        with self._lock:
            o = self._own(trial_id)
            if o is None:
                self._backend.set_trial_intermediate_value(trial_id, step, intermediate_value)
                return
            o.ivs[step] = intermediate_value
            o.live.intermediate_values[step] = intermediate_value

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._lock:
            o = self._own(trial_id)
            if o is None:
                self._backend.set_trial_user_attr(trial_id, key, value)
                return
            encoded = private.json_dumps_attr(value)  # a value JSON cannot encode raises here
            o.user[key] = encoded
            o.live.user_attrs[key] = json.loads(encoded)  # as it reads back

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._lock:
            o = self._own(trial_id)
            if o is None:
                self._backend.set_trial_system_attr(trial_id, key, value)
                return
            encoded = private.json_dumps_attr(value)
            o.system[key] = encoded
            o.live.system_attrs[key] = json.loads(encoded)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        with self._lock:
            o = self._owned.get(trial_id)
            if o is None:
                done = self._backend.set_trial_state_values(trial_id, state, values)
                self._refreshed = -float("inf")
                t = self._live(trial_id)
                if done and state == TrialState.RUNNING and t is not None and t.state == TrialState.WAITING:
                    self._adopt(trial_id)
                return done
            self._own(trial_id)  # raises if it is finished
            if state == TrialState.RUNNING:
                return False
            if not state.is_finished():  # back to WAITING: not something a worker does
                self.flush([trial_id])
                self._drop(trial_id)
                self._watch.add(trial_id)
                return self._backend.set_trial_state_values(trial_id, state, values)
            live = o.live
            live.state = state
            live.values = list(values) if values is not None else None
            live.datetime_complete = datetime.datetime.now()
            o.told = True
            self._put(live)
            self._deferred.append(trial_id)
            if not self._defer:
                self.flush()
        return True

    def requeue_when_told(self, trial_id: int) -> bool:
        """Queue this running trial's point again in the transaction that writes its tell (a
        trial cut short from outside: its failure and its point's return are one write).
        False if this is not a trial the view runs (its writes go straight through)."""
        with self._lock:
            o = self._own(trial_id)
            if o is None:
                return False
            o.requeue = True
            return True

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Inside, tells change the view at once and reach the database at the next flush."""
        with self._lock:
            self._defer = True
        try:
            yield
        except BaseException:
            with self._lock:
                self._defer = False
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - the error on its way out matters more
                log.warning("could not write %d held-back tells (kept for the next flush): %s",
                            len(self._deferred), exc)
            raise
        with self._lock:
            self._defer = False
        self.flush()

    @_marks_gone
    def flush(self, trial_ids: Iterable[int] = ()) -> int:
        """Write the told trials and what ``trial_ids`` hold so far, in one transaction.

        Told trials get their rows and final state; running ones (``trial_ids``) the params,
        attributes and intermediate values they have. Returns the number of trials written.
        A told trial that another process finished meanwhile (its heartbeat lapsed) raises
        UpdateFinishedTrialError when it is the only one, else it is logged and dropped.
        """
        with self._lock:
            ids = list(dict.fromkeys([*self._deferred, *trial_ids]))
            batch = [self._owned[i] for i in ids if i in self._owned and self._owned[i].pending]
            if not batch:
                return 0
            try:
                self._flush(batch)
            except UpdateFinishedTrialError:
                if len(batch) == 1:
                    raise
                self._one_by_one(batch)
            except Exception as exc:
                if _transient(exc) or isinstance(exc, KeyError):
                    raise  # the database is away (kept for the next flush), or the study is gone
                # The database refused something in the batch: find whose it is.
                if len(batch) == 1:
                    self._refused(batch[0], exc)
                else:
                    self._one_by_one(batch)
            return len(batch)

    def _one_by_one(self, batch: list[_Owned]) -> None:
        for o in batch:
            try:
                self._flush([o])
            except UpdateFinishedTrialError as exc:
                log.warning("trial %d was finished elsewhere; dropped what this worker "
                            "had of it: %s", o.live.number, exc)
            except Exception as exc:
                if _transient(exc) or isinstance(exc, KeyError):
                    raise
                self._refused(o, exc)

    def _refused(self, o: _Owned, exc: BaseException) -> None:
        """The database refused this trial's rows: fail it there, with the reason, and here."""
        live = o.live
        cause = exc.__cause__ or exc
        reason = f"its results could not be stored: {cause.__class__.__name__}: {str(cause).splitlines()[0][:300]}"
        log.error("trial %d: %s; it is failed, the others go on", live.number, reason)
        was = self._classify(live) if o.told else None
        live.state = TrialState.FAIL
        live.values = None
        live.datetime_complete = datetime.datetime.now()
        live.user_attrs["fail_reason"] = reason
        live.user_attrs[TRIAL_STATE_ATTR] = "failed"
        fail = _Owned(live, adopted=o.adopted)
        fail.told = True
        fail.requeue = o.requeue
        fail.user = {"fail_reason": json.dumps(reason), TRIAL_STATE_ATTR: json.dumps("failed")}
        self._owned[live._trial_id] = fail
        if live._trial_id not in self._deferred:
            self._deferred.append(live._trial_id)
        if was is not None:
            self._finished[was] -= 1
            self._counted.discard(live._trial_id)
        self._put(live)
        try:
            self._flush([fail])
        except UpdateFinishedTrialError:
            pass  # finished elsewhere meanwhile: _lost shows it as the database has it

    def _flush(self, batch: list[_Owned]) -> None:
        try:
            with _create_scoped_session(self._backend.scoped_session) as session:
                self._write(session, batch)
        except UpdateFinishedTrialError:
            if len(batch) == 1:
                self._lost(batch[0])
            raise
        self.writes += 1
        if any(o.requeue for o in batch):
            self._refreshed = -float("inf")  # the next read sees the points queued again
        for o in batch:
            o.params.clear()
            o.user.clear()
            o.system.clear()
            o.ivs.clear()
            if o.told:
                self._drop(o.live._trial_id)

    def _drop(self, trial_id: int) -> None:
        self._owned.pop(trial_id, None)
        with contextlib.suppress(ValueError):
            self._deferred.remove(trial_id)

    def _lost(self, o: _Owned) -> None:
        """Another process finished this owned trial: show it as the database has it."""
        tid = o.live._trial_id
        self._drop(tid)
        if o.told:
            self._finished[self._classify(o.live)] -= 1
            self._counted.discard(tid)
        with contextlib.suppress(KeyError):
            self._put(self._backend.get_trial(tid))

    def _count_statements(self) -> dict[str, Any]:
        """:meth:`_count_states`' reads, built once (they run under the lock: a statement built
        for each call cost its construction there)."""
        if self._counts_st is None:
            studies_ = models.StudyModel.__table__
            sua = models.StudyUserAttributeModel.__table__
            t = _T.__table__
            tua = models.TrialUserAttributeModel.__table__
            attrs = (sa.select(studies_.c.study_id, sua.c.key, sua.c.value_json)
                     .select_from(studies_.outerjoin(sua, sua.c.study_id == studies_.c.study_id))
                     .where(studies_.c.study_id == sa.bindparam("sid")))
            counts = (sa.select(t.c.state, tua.c.value_json, sa.func.count())
                      .select_from(t.outerjoin(tua, sa.and_(tua.c.trial_id == t.c.trial_id,
                                                            tua.c.key == sa.bindparam("flag"))))
                      .where(t.c.study_id == sa.bindparam("sid"), t.c.trial_id > sa.bindparam("upto"))
                      .group_by(t.c.state, tua.c.value_json))
            self._counts_st = {"attrs": attrs, "attrs_locked": attrs.with_for_update(of=studies_),
                               "counts": counts}
        return self._counts_st

    def _locked_statements(self) -> dict[str, Any]:
        """PostgreSQL's statements of :meth:`create_trials`, built once, the same whatever the
        number of trials: the numbered rows (``generate_series``) and their leases (``unnest``)."""
        if self._locked is None:
            from sqlalchemy.dialects import postgresql

            t = _T.__table__
            sat = models.TrialSystemAttributeModel.__table__
            n = sa.func.generate_series(sa.bindparam("lo", type_=sa.Integer),
                                        sa.bindparam("hi", type_=sa.Integer)).column_valued("n")
            trials = t.insert().from_select(
                ["number", "study_id", "state", "datetime_start"],
                sa.select(n, sa.bindparam("sid", type_=sa.Integer), sa.bindparam("state", type_=t.c.state.type),
                          sa.bindparam("start", type_=t.c.datetime_start.type)).order_by(n),
            ).returning(t.c.trial_id, t.c.number)
            tid = sa.func.unnest(sa.bindparam("ids", type_=postgresql.ARRAY(sa.Integer)))
            leases = sa.insert(sat).from_select(
                ["trial_id", "key", "value_json"],
                sa.select(tid, sa.bindparam("key", type_=sat.c.key.type),
                          sa.bindparam("value", type_=sat.c.value_json.type)))
            self._locked = {"trials": trials, "leases": leases}
        return self._locked

    def _statements(self) -> dict[str, Any]:
        """The write statements, built once: Core tables, no ORM unit of work."""
        if self._stmts is None:
            trials = _T.__table__
            st: dict[str, Any] = {
                "tell": trials.update()
                .where(trials.c.trial_id == sa.bindparam("b_id"), trials.c.state == TrialState.RUNNING)
                .values(state=sa.bindparam("b_state"), datetime_complete=sa.bindparam("b_done")),
                "states": sa.select(trials.c.trial_id, trials.c.state)
                .where(trials.c.trial_id.in_(sa.bindparam("ids", expanding=True))),
                "uid": sa.select(models.StudyUserAttributeModel.__table__.c.value_json).where(
                    models.StudyUserAttributeModel.__table__.c.study_id == sa.bindparam("sid"),
                    models.StudyUserAttributeModel.__table__.c.key == UID_ATTR),
            }
            for name, model in (("params", models.TrialParamModel),
                                ("ivs", models.TrialIntermediateValueModel),
                                ("values", models.TrialValueModel)):
                st[name] = sa.insert(model.__table__)
            engine = self._backend.engine.name
            for name, model in (("user", models.TrialUserAttributeModel),
                                ("system", models.TrialSystemAttributeModel)):
                table = model.__table__
                if engine == "postgresql" or (engine == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0)):
                    if engine == "postgresql":
                        from sqlalchemy.dialects.postgresql import insert
                    else:
                        from sqlalchemy.dialects.sqlite import insert
                    up = insert(table)
                    st[name] = up.on_conflict_do_update(index_elements=[table.c.trial_id, table.c.key],
                                                        set_={"value_json": up.excluded.value_json})
                elif engine == "mysql":
                    from sqlalchemy.dialects.mysql import insert as mysql_insert

                    up_m = mysql_insert(table)
                    st[name] = up_m.on_duplicate_key_update(value_json=up_m.inserted.value_json)
                else:
                    st[name] = None  # row by row, as Optuna writes them
            self._stmts = st
        return self._stmts

    def _write(self, session: orm.Session, batch: list[_Owned]) -> None:
        st = self._statements()
        conn = session.connection()
        if self._uid is not None:
            # Still the study this view was made for? SQLite gives a deleted study's id, and its
            # trials' ids and numbers, to the next ones created: without this read, a trial of
            # the deleted study would be written into the new study's trial of the same id.
            row = conn.execute(st["uid"], {"sid": self._study_id}).first()
            self._check_uid(json.loads(row[0]) if row is not None else None, _trial_row_reader(conn))
        told = [o for o in batch if o.told]
        running = [o.live._trial_id for o in batch if not o.told]
        requeue = [o for o in told if o.requeue]
        if requeue:
            # The study row first, as every writer that numbers trials takes it (the lease
            # reaper included): taken after the trials' rows, it could deadlock with one.
            models.StudyModel.find_or_raise_by_id(self._study_id, session, for_update=True)
        if told:
            # The state first: it takes the write lock, and a trial that someone else has
            # finished meanwhile is not overwritten.
            rows = [{"b_id": o.live._trial_id, "b_state": o.live.state,
                     "b_done": _utc(o.live.datetime_complete or datetime.datetime.now())} for o in told]
            result = conn.execute(st["tell"], rows if len(rows) > 1 else rows[0])
            if result.rowcount != len(told):
                ids = [o.live._trial_id for o in told]
                found = {i for i, _ in conn.execute(st["states"], {"ids": ids})}
                if len(found) < len(ids):
                    raise KeyError(models.NOT_FOUND_MSG)
                raise UpdateFinishedTrialError("a trial being told has already finished")
        if running:
            states = dict(conn.execute(st["states"], {"ids": running}).all())
            for tid in running:
                if tid not in states:
                    raise KeyError(models.NOT_FOUND_MSG)
                if states[tid].is_finished():
                    raise UpdateFinishedTrialError(f"trial {tid} has already finished")
        adopted = [o.live._trial_id for o in batch if o.adopted]
        params, users, systems, ivs, values = [], [], [], [], []
        for o in batch:
            tid = o.live._trial_id
            params += [{"trial_id": tid, "param_name": name, "param_value": v,
                        "distribution_json": dists.distribution_to_json(d)}
                       for name, (v, d) in o.params.items()]
            users += [{"trial_id": tid, "key": k, "value_json": v} for k, v in o.user.items()]
            systems += [{"trial_id": tid, "key": k, "value_json": v} for k, v in o.system.items()]
            for step, v in o.ivs.items():
                stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(v)
                ivs.append({"trial_id": tid, "step": step, "intermediate_value": stored,
                            "intermediate_value_type": kind})
            if o.told:
                for i, v in enumerate(o.live.values or []):
                    stored_v, kind_v = models.TrialValueModel.value_to_stored_repr(v)
                    values.append({"trial_id": tid, "objective": i, "value": stored_v, "value_type": kind_v})
        if adopted:
            # A re-queued trial may hold rows already: replace them, as Optuna updates them.
            iv = models.TrialIntermediateValueModel.__table__
            for row in ivs:
                if row["trial_id"] in adopted:
                    conn.execute(sa.delete(iv).where(iv.c.trial_id == row["trial_id"], iv.c.step == row["step"]))
            tv = models.TrialValueModel.__table__
            conn.execute(sa.delete(tv).where(tv.c.trial_id.in_([o.live._trial_id for o in told if o.adopted])))
        for name, rows in (("params", params), ("user", users), ("system", systems), ("ivs", ivs),
                           ("values", values)):
            if not rows:
                continue
            if st[name] is None:
                model = (models.TrialUserAttributeModel if name == "user"
                         else models.TrialSystemAttributeModel)
                for row in rows:
                    private.set_trial_attr_without_commit(
                        self._backend, session, model, row["trial_id"], row["key"], json.loads(row["value_json"]))
            else:
                conn.execute(st[name], rows if len(rows) > 1 else rows[0])
        for o in requeue:
            _lease.queue_again(session, self._study_id, o.live._trial_id, o.live.number)

    # -- the study: straight through (_StudiesThrough), its directions kept ------------------
    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        if study_id != self._study_id:
            return self._backend.get_study_directions(study_id)
        if self._directions is None:  # fixed when the study is created
            self._directions = self._backend.get_study_directions(study_id)
        return self._directions


def of(obj: optuna.Study | optuna.Trial) -> FastStorage | None:
    """The FastStorage of a study or a trial, if its study has one (see :func:`attach`)."""
    study = obj if isinstance(obj, optuna.Study) else getattr(obj, "study", None)
    storage = getattr(study, "_storage", None)
    return storage.view_of(study) if isinstance(storage, BatchingStorage) else None


class PlainView:
    """The batching storage's interface over Optuna's own storage, where a study cannot have
    a :class:`FastStorage` (its sampler or pruner keeps state in the storage: grid, CMA-ES,
    QMC, ...; or nothing asked through the engine yet): each write goes straight to the
    database, so there is nothing to hold back or flush, and each read reads it.

    :func:`view` returns one or the other, so the lifecycle, the population and the counts
    are written once, against this interface, whichever storage is underneath.
    """

    #: a study with a PlainView is asked one trial at a time, through Optuna's own ask
    batching = False
    lease_id: str | None = None

    def __init__(self, storage: BaseStorage, study_id: int,
                 classify: Callable[[FrozenTrial], str] | None = None) -> None:
        self._storage, self._study_id = storage, study_id
        self._classify = classify or _state_name

    def refresh(self) -> None:
        """Nothing is cached: nothing to read."""

    def kinds(self) -> Counter[str]:
        """Trials by ``classify``, read now."""
        return Counter(self._classify(t) for t in self._storage.get_all_trials(self._study_id, deepcopy=False))

    def flush(self, trial_ids: Iterable[int] = ()) -> int:
        return 0  # every write was made when it was set

    def requeue_when_told(self, trial_id: int) -> bool:
        return False  # a tell here is Optuna's own write: the re-queue is the caller's

    def deferring(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def view(obj: optuna.Study | optuna.Trial,
         classify: Callable[[FrozenTrial], str] | None = None) -> FastStorage | PlainView:
    """The storage interface that a study's (or a trial's) lifecycle writes through: its
    FastStorage if it has one (see :func:`attach`), else a :class:`PlainView` of its storage."""
    fs = of(obj)
    if fs is not None:
        return fs
    if isinstance(obj, optuna.Study):
        return PlainView(obj._storage, obj._study_id, classify)
    return PlainView(obj.storage, obj.study._study_id, classify)


def attach(study: optuna.Study, classify: Callable[[FrozenTrial], str] | None = None) -> FastStorage | None:
    """Give ``study`` its FastStorage (once) if its storage and pruner allow; else None.

    A worker's storage is a :class:`BatchingStorage` (``open_storage(url, batching=True)``),
    which keeps the study's view. A study opened on a plain RDBStorage by a caller of the
    Python API is moved onto a BatchingStorage around it first.
    The caller vouches for the sampler: it must read the study only through ``get_trials``
    and write nothing but the trial's own params (TPE without constant liar, random).
    """
    fs = of(study)
    if fs is not None:
        return fs
    from ._rungs import RungPruner  # writes nothing either: it ranks the trials it reads

    if not isinstance(rdb(study._storage), RDBStorage) or type(study.pruner) not in (*PRUNERS, RungPruner):
        return None
    if not isinstance(study._storage, BatchingStorage):
        study._storage = BatchingStorage(study._storage)
    return study._storage.view_for(study, classify)


class BatchingStorage(_StudiesThrough):
    """A worker's storage: what ``studies.open_storage(url, batching=True)`` returns.

    Every call goes to the RDBStorage underneath, except those of the studies this process
    asks trials of through the engine (:func:`attach`): each of those has a
    :class:`FastStorage`, its cached view with batched writes, and the calls about that
    study or its trials go there. So a study loaded from this storage is the study the
    engine runs; no caller swaps or wraps its storage.
    """

    def __init__(self, inner: BaseStorage) -> None:
        self._backend = rdb(inner)  # studies._storage.rdb() finds the RDBStorage here
        #: study id -> the view its trials go through. A view lives as long as a Study object
        #: that attached to it (``_given`` holds it): a worker that lets go of a study (it
        #: finished, was stopped or deleted) lets go of its view and the trials it cached.
        self._views: weakref.WeakValueDictionary[int, FastStorage] = weakref.WeakValueDictionary()
        #: the Study objects that attached, each to the view it was given (checked by of())
        self._given: weakref.WeakKeyDictionary[optuna.Study, FastStorage] = weakref.WeakKeyDictionary()
        self._lock = threading.RLock()  # _current, under it, drops views through _live

    @property
    def database(self) -> BaseStorage:
        """The RDBStorage underneath: the database as it is, no view in between."""
        return self._backend

    @property
    def engine(self) -> sa.engine.Engine:
        return self._backend.engine  # type: ignore[attr-defined, no-any-return]

    @property
    def url(self) -> str:
        return self._backend.url  # type: ignore[attr-defined, no-any-return]

    # -- the views ---------------------------------------------------------------------------
    def view_of(self, study: optuna.Study) -> FastStorage | None:
        """The view ``study`` attached to, while it is still its study's view."""
        fs = self._given.get(study)
        return fs if fs is not None and self._live(study._study_id) is fs else None

    def _live(self, study_id: int) -> FastStorage | None:
        """The study's view unless it found its study gone (then it is dropped)."""
        fs = self._views.get(study_id)
        if fs is not None and fs.gone:
            with self._lock:
                if self._views.get(study_id) is fs:
                    del self._views[study_id]
            return None
        return fs

    def view_for(self, study: optuna.Study, classify: Callable[[FrozenTrial], str] | None) -> FastStorage:
        """The study's view, made on first use. A view made for a study that was deleted
        since, and another created under its id (SQLite reuses ids), is replaced: its trials
        are not this study's."""
        with self._lock:
            before = self._given.get(study)
            fs = self._current(study._study_id)
            if before is not None and before is not fs:
                # this Study object's study is gone (deleted; what is under its id now is
                # another study, or nothing): as Optuna answers for a deleted study
                raise KeyError(models.NOT_FOUND_MSG)
            if fs is None:
                fs = FastStorage(self._backend, study._study_id, classify)
                self._views[study._study_id] = fs
            self._given[study] = fs
            return fs

    def _current(self, study_id: int, check: bool = False) -> FastStorage | None:
        """The study's view, dropped first if the study it was made for is gone (deleted; or
        another was created under its id, as SQLite reuses ids: its trials are not this
        study's). ``check``: look even if the view has not read its study's uid yet."""
        fs = self._live(study_id)
        if fs is None or (fs._uid is None and not check):
            return fs
        try:
            uid = self._backend.get_study_user_attrs(study_id).get(UID_ATTR)
        except KeyError:
            del self._views[study_id]
            return None
        if fs._uid is None:
            return fs
        try:
            fs._check_uid(uid, self._trial_row)
        except KeyError:
            del self._views[study_id]
            return None
        return fs

    def _trial_row(self, trial_id: int) -> Any:
        """(study id, number, start as stored) of a trial, read now."""
        with self.engine.connect() as conn:
            return _trial_row_reader(conn)(trial_id)

    def _on(self, target: BaseStorage, name: str, *args: Any, **kwargs: Any) -> Any:
        """``target.name(*args, **kwargs)``; a view that says its study does not exist
        (KeyError) is dropped if that is so, so that the next call reads the database."""
        try:
            return getattr(target, name)(*args, **kwargs)
        except KeyError:
            if isinstance(target, FastStorage):
                with self._lock:
                    if self._views.get(target._study_id) is target:
                        self._current(target._study_id, check=True)
            raise

    def forget(self) -> None:
        """Drop every study's view with the writes it holds back. A worker whose database went
        away does this: the trials it held are failed and re-queued when the database is back
        (``studies.release_dropped``), so nothing of theirs may be written after that; the
        studies it loads again get fresh views."""
        with self._lock:
            for fs in list(self._views.values()):
                fs.gone = True
            self._views.clear()

    def _study(self, study_id: int) -> BaseStorage:
        return self._live(study_id) or self._backend

    def _trial(self, trial_id: int) -> BaseStorage:
        """Where a call about this trial goes: the view that runs it (it created or adopted
        it), else a view that has read it, else the database. (SQLite reuses the ids of a
        deleted study's trials: a view kept from such a study may still hold an id that is
        now another study's trial, which the view of that study runs.) A trial this process
        writes is always run by a view: it was created or adopted through one; a waiting trial
        is adopted after the view that pops it has read it."""
        views = [fs for fs in list(self._views.values()) if not fs.gone]
        for fs in views:
            if trial_id in fs._owned:
                return fs
        for fs in views:
            if trial_id in fs._numbers:
                return fs
        return self._backend

    # -- the study (the rest: _StudiesThrough) -------------------------------------------------
    def delete_study(self, study_id: int) -> None:
        self._backend.delete_study(study_id)
        with self._lock:
            fs = self._views.pop(study_id, None)
            if fs is not None:
                fs.gone = True

    def get_study_id_from_name(self, study_name: str) -> int:
        study_id = self._backend.get_study_id_from_name(study_name)
        if study_id in self._views:  # a study loaded by name may be a new one under an old id
            with self._lock:
                self._current(study_id)
        return study_id

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._on(self._study(study_id), "get_study_directions", study_id)  # type: ignore[no-any-return]

    # -- trials: through the study's view where it has one ---------------------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._on(self._study(study_id), "create_new_trial", study_id, template_trial)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._on(self._study(study_id), "get_all_trials", study_id, deepcopy=deepcopy, states=states)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._on(self._study(study_id), "get_trial_id_from_study_id_trial_number", study_id, trial_number)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._on(self._study(study_id), "get_best_trial", study_id)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._on(self._trial(trial_id), "get_trial", trial_id)

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self._on(self._trial(trial_id), "get_trial_params", trial_id)

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._on(self._trial(trial_id), "get_trial_user_attrs", trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._on(self._trial(trial_id), "get_trial_system_attrs", trial_id)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: dists.BaseDistribution) -> None:
        self._on(self._trial(trial_id), "set_trial_param", trial_id, param_name, param_value_internal, distribution)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._on(self._trial(trial_id), "set_trial_intermediate_value", trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._on(self._trial(trial_id), "set_trial_user_attr", trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._on(self._trial(trial_id), "set_trial_system_attr", trial_id, key, value)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        return self._on(self._trial(trial_id), "set_trial_state_values", trial_id, state, values)


# -- TPE that does each ask's work once ---------------------------------------------------------
class _RunningSafeIntersection(optuna.search_space.IntersectionSearchSpace):
    """Optuna's ``IntersectionSearchSpace``, with a cache that running trials do not hold back.

    The same result: the parameters whose distribution every finished trial of interest
    (COMPLETE, and PRUNED with ``include_pruned``) shares. Optuna's cache stops at the oldest
    running trial, so with a population's ~1,000 trials running every ask went over all of
    them again through Optuna's generic loop (2 ms an ask, profiled, on a 2-core machine).
    Here the trials below the oldest unfinished one are settled for good; above it, the
    finished trials already counted are remembered by number, and one tight pass finds the
    newly finished. ``tests/studies/test_fast.py`` compares it with Optuna's as trials start,
    fail, get pruned and finish out of order.
    """

    def __init__(self, include_pruned: bool = False) -> None:
        super().__init__(include_pruned)
        self._finished = ((TrialState.COMPLETE, TrialState.PRUNED) if include_pruned
                          else (TrialState.COMPLETE,))
        self._floor = 0  # every trial before this index is counted or of no interest
        self._counted: set[int] = set()  # finished trials at or after the floor, counted
        self._space: dict[str, dists.BaseDistribution] | None = None
        self._sorted: dict[str, dists.BaseDistribution] = {}

    def calculate(self, study: optuna.Study, use_cache: bool = False) -> dict[str, dists.BaseDistribution]:
        if self._study_id is None:
            self._study_id = study._study_id
        elif self._study_id != study._study_id:
            raise ValueError("`IntersectionSearchSpace` cannot handle multiple studies.")
        trials = study._get_trials(deepcopy=False, use_cache=use_cache)
        finished, pending = self._finished, (TrialState.RUNNING, TrialState.WAITING)
        counted, changed, settled = self._counted, False, True
        for i in range(self._floor, len(trials)):
            t = trials[i]
            state = t.state
            if state in finished and t.number not in counted:
                counted.add(t.number)
                changed = True
                if self._space is None:
                    self._space = dict(t.distributions)
                else:
                    self._space = {name: d for name, d in self._space.items()
                                   if t.distributions.get(name) == d}
            elif state in pending:
                settled = False
            if settled:  # everything up to here is final: move the floor past it
                self._floor = i + 1
                counted.discard(t.number)
        if changed:
            self._sorted = dict(sorted((self._space or {}).items(), key=lambda x: x[0]))
        return copy.deepcopy(self._sorted)


class FastTPESampler(optuna.samplers.TPESampler):
    """Optuna's TPESampler, proposing the same points with less work per ask.

    Same arguments, same random stream, same proposals (``tests/studies/test_fast.py``
    compares them point by point with TPESampler's). What changes:

    - the split into good and bad trials and both Parzen estimators are kept while the
      trials they came from are the same: a budget-aware sampler's redraws within one ask
      (and an ask after an infeasible point) reuse them, and only draw and score candidates;
    - a finished trial's parameters in the estimators' internal form are computed once;
    - inside :meth:`one_fit`, a batch of asks is proposed from one fit over the finished and
      running trials (each draw is still TPE's best of its own candidates): the many trials
      a population or a batch ask takes at once cost one fit, not one each; their candidates
      are drawn and scored in one array-wise pass (the same candidates as one at a time), and
      the search space and the start-up check are computed once for the block.
    """

    #: How many trials asked since the estimators were fit may go without their "lie" before
    #: a refit (0: none, TPE's exact proposals). A population sets it while it refills many
    #: slots at once: a burst of K asks then costs K / (max_stale_lies + 1) fits instead of K,
    #: each over every finished and running trial (see ``studies._population``).
    max_stale_lies: int = 0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._search_space = _RunningSafeIntersection(include_pruned=True)
        self._reprs: dict[tuple[Any, ...], dict[int, tuple[float, ...] | None]] = {}
        self._estimators: tuple[Any, Any] | None = None  # (key, (below, above))
        self._fitted: tuple[Any, frozenset[int]] | None = None  # (finished key, running ids) of the fit
        self._scores: dict[int, dict[int, tuple[float, Any]]] = {}  # study -> trial -> split scores

    @contextlib.contextmanager
    def one_fit(self, asks: int = 0) -> Iterator[None]:
        """Inside, every ask reuses the fit of the block's first ask (for the same study and
        space). That first ask fits on the trials as they are now: a block never reuses an
        earlier block's fit, which saw none of the trials finished since.

        ``asks``: how many asks the block expects. With more than one, the block's candidates
        are drawn and scored together, ``asks`` x ``n_ei_candidates`` in one array-wise pass
        instead of one small pass an ask (Python's per-call costs were most of an ask's time):
        the same candidates and points as one ask at a time, and the generator left where those
        asks would leave it (rows drawn ahead and not used are given back)."""
        self._give_back_unused()
        self._frozen, self._batch_fit, self._expected = True, None, asks
        self._block = {}
        try:
            yield
        finally:
            self._give_back_unused()
            self._frozen, self._batch_fit, self._expected = False, None, 0
            self._block = {}

    #: what a one_fit block computes once for all its asks, by study: its relative search space
    #: and whether TPE is still in its random start-up. A trial told inside the block (an ask
    #: that its gate finds infeasible is told pruned at once) clears them (:meth:`after_trial`):
    #: the next ask sees it, as one ask at a time would
    _block: dict[tuple[str, int], Any] = {}

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._block = {}
        super().after_trial(study, trial, state, values)

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: FrozenTrial) -> dict[str, dists.BaseDistribution]:
        if not self._frozen:
            return super().infer_relative_search_space(study, trial)
        key = ("space", study._study_id)
        if key not in self._block:
            self._block[key] = super().infer_relative_search_space(study, trial)
        return dict(self._block[key])

    def _in_startup(self, study: optuna.Study) -> bool:
        """Whether fewer than ``n_startup_trials`` trials have finished (TPE draws at random),
        counted once a one_fit block."""
        key = ("startup", study._study_id)
        if key not in self._block:
            finished = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED),
                                         use_cache=True)
            self._block[key] = len(finished) < self._n_startup_trials
        return bool(self._block[key])

    def _sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                         search_space: dict[str, dists.BaseDistribution]) -> dict[str, Any]:
        if not self._frozen or not search_space:
            return super()._sample_relative(study, trial, search_space)
        return {} if self._in_startup(study) else self._sample(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: dists.BaseDistribution) -> Any:
        if self._frozen and self._in_startup(study):  # Optuna's branch: random during the start-up
            return self._random_sampler.sample_independent(study, trial, param_name, param_distribution)
        return super().sample_independent(study, trial, param_name, param_distribution)

    _frozen: bool = False
    #: the estimators the current one_fit block's first ask fitted (or found up to date)
    _batch_fit: tuple[Any, Any] | None = None
    #: asks the one_fit block still expects, and its candidates drawn ahead: [estimators,
    #: candidates (asks, n_ei_candidates) per parameter, acquisition (asks, n_ei_candidates), next
    #: row, the generator's state before the draw, the doubles one ask draws]
    _expected: int = 0
    _pool: list[Any] | None = None
    #: candidates scored at once when drawing ahead (bounds the (candidates, kernels) temporaries)
    _SCORE_CHUNK = 4096
    #: if set, ``feasible(point)`` says whether a proposed point is acceptable: each draw is
    #: then TPE's best acceptable candidate (BudgetAwareSampler sets its budget check here)
    feasible: Callable[[dict[str, Any]], bool] | None = None

    def _sample(self, study: optuna.Study, trial: FrozenTrial,
                search_space: dict[str, dists.BaseDistribution]) -> dict[str, Any]:
        cached = self._estimators
        if self._frozen and cached is not None and cached is self._batch_fit \
                and cached[0][:2] == (study._study_id, tuple(search_space.items())):
            pass  # this block's fit, for the rest of its batch (the trials are not read)
        else:
            liar = self._constant_liar
            states = [TrialState.COMPLETE, TrialState.PRUNED] + ([TrialState.RUNNING] if liar else [])
            trials = study._get_trials(deepcopy=False, states=states, use_cache=not liar)
            if liar:  # the asked trial is no lie to itself
                trials = [t for t in trials if t.number != trial.number]
            if not (cached is not None and self._stale_ok(study, trials, search_space)):
                key = self._key(study, trials, search_space)
                if cached is None or cached[0] != key:
                    cached = self._estimators = (key, self._fit(study, trials, search_space))
                    self._fitted = (key[:3], frozenset(t._trial_id for t in trials
                                                       if t.state == TrialState.RUNNING))
        if self._frozen:
            self._batch_fit = cached
        candidates, acquisition = self._candidates(cached)
        if self.feasible is not None:
            # The best candidate that the caller accepts (a budget-aware sampler's budget):
            # one acquisition for the draw instead of one per rejected draw.
            for i in np.argsort(-acquisition, kind="stable"):
                point = {name: d.to_external_repr(candidates[name][i]) for name, d in search_space.items()}
                if self.feasible(point):
                    return point
        best = self._compare(candidates, acquisition)
        return {name: d.to_external_repr(best[name]) for name, d in search_space.items()}

    def _candidates(self, cached: tuple[Any, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """One ask's candidates and their acquisition, log l(x) - log g(x) (the tail mass
        computed array-wise); where a one_fit block expects more asks, from the block's draws
        ahead: each ask's candidates are the ones it would have drawn alone (``_tpe_math.sample``)."""
        below, above = cached[1]
        n = self._n_ei_candidates
        pool = self._pool
        ahead = pool is not None and pool[0] is cached and pool[3] < len(pool[2])
        if not ahead and pool is not None and pool[3] < len(pool[2]):
            # another estimator took over mid-block (a conditional space's independent draws,
            # or group=True): one ask at a time from here, instead of drawing the rest of the
            # block again at every switch
            self._expected = 0
        if not ahead and not (self._frozen and self._expected > 1):
            self._give_back_unused()
            candidates = _tpe_math.sample(below, self._rng.rng, n)
            return candidates, _tpe_math.log_pdf(below, candidates) - _tpe_math.log_pdf(above, candidates)
        if not ahead:
            self._give_back_unused()
            asks, rng = self._expected, self._rng.rng
            state = rng.get_state()
            drawn = _tpe_math.sample(below, rng, n, asks)
            acq = np.empty(asks * n)
            for a in range(0, asks * n, self._SCORE_CHUNK):
                part = {k: v[a : a + self._SCORE_CHUNK] for k, v in drawn.items()}
                acq[a : a + self._SCORE_CHUNK] = _tpe_math.log_pdf(below, part) - _tpe_math.log_pdf(above, part)
            per_ask = n * (1 + len(below._mixture_distribution.distributions))
            pool = self._pool = [cached, {k: v.reshape(asks, n) for k, v in drawn.items()},
                                 acq.reshape(asks, n), 0, state, per_ask]
        assert pool is not None
        i = pool[3]
        pool[3] += 1
        self._expected = max(0, self._expected - 1)
        return {k: v[i] for k, v in pool[1].items()}, pool[2][i]

    def _give_back_unused(self) -> None:
        """Leave the generator where the asks that took the draws ahead would have left it alone:
        restored to before the draw, then advanced by the rows they used."""
        pool, self._pool = self._pool, None
        if pool is not None and pool[3] < len(pool[2]):
            rng = self._rng.rng
            rng.set_state(pool[4])
            rng.random_sample((pool[3], pool[5]))

    def _stale_ok(self, study: optuna.Study, trials: list[FrozenTrial],
                  search_space: dict[str, dists.BaseDistribution]) -> bool:
        """Whether the last fit may serve this ask: the same finished trials, and at most
        ``max_stale_lies`` running trials that it has not seen (see the class attribute)."""
        if not self.max_stale_lies or self._fitted is None:
            return False
        finished = (study._study_id, tuple(search_space.items()),
                    tuple(t._trial_id for t in trials if t.state != TrialState.RUNNING))
        if finished != self._fitted[0]:
            return False
        unseen = sum(t.state == TrialState.RUNNING and t._trial_id not in self._fitted[1] for t in trials)
        return unseen <= self.max_stale_lies

    def _key(self, study: optuna.Study, trials: list[FrozenTrial],
             search_space: dict[str, dists.BaseDistribution]) -> tuple[Any, ...]:
        """What the estimators depend on: finished trials never change; running ones by their lies."""
        running = tuple(
            (t._trial_id, json.dumps(self._get_params(t, study), sort_keys=True, default=str))
            for t in trials if t.state == TrialState.RUNNING)
        return (study._study_id, tuple(search_space.items()),
                tuple(t._trial_id for t in trials if t.state != TrialState.RUNNING), running)

    def _fit(self, study: optuna.Study, trials: list[FrozenTrial],
             search_space: dict[str, dists.BaseDistribution]) -> tuple[Any, Any]:
        if self._gamma is None:
            single, multi = private.tpe_default_gammas()
            self._gamma = single if len(study.directions) <= 1 else multi
        n_done = sum(t.state != TrialState.RUNNING for t in trials)
        if len(study.directions) > 1:
            good, bad = private.tpe_split_trials(study, trials, self._gamma(n_done))
        else:
            good, bad = self._split(study, trials, self._gamma(n_done))
        return (self._build_parzen_estimator(study, search_space, good, handle_below=True),
                self._build_parzen_estimator(study, search_space, bad, handle_below=False))

    def _split(self, study: optuna.Study, trials: list[FrozenTrial],
               n_good: int) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
        """TPE's single-objective split into good and bad trials, each trial scored once.

        Feasible complete trials rank first by value, then pruned ones by how far they got
        and their last report, then infeasible ones by how far over their constraints they
        are; running trials are bad. Ties keep trial order, as Optuna's stable sorts do.
        """
        scores = self._scores.setdefault(study._study_id, {})
        complete, pruned, infeasible, running = [], [], [], []
        for t in trials:
            if t.state == TrialState.RUNNING:
                running.append(t)
                continue
            score = scores.get(t._trial_id)
            if score is None:  # a finished trial never changes: score it once
                over = private.tpe_infeasible_score(t)
                score = scores[t._trial_id] = (
                    over, private.tpe_pruned_score(t, study) if t.state == TrialState.PRUNED else None)
            if score[0] > 0:
                infeasible.append((t, score[0]))
            elif t.state == TrialState.COMPLETE:
                complete.append(t)
            else:
                pruned.append((t, score[1]))
        complete.sort(key=lambda t: t.value, reverse=study.direction == StudyDirection.MAXIMIZE)
        pruned.sort(key=lambda p: p[1])
        infeasible.sort(key=lambda p: p[1])
        # each group gives what is still missing from the good ones, best first
        good: list[FrozenTrial] = []
        bad: list[FrozenTrial] = []
        for group in (complete, [t for t, _ in pruned], [t for t, _ in infeasible]):
            k = max(0, min(n_good - len(good), len(group)))
            good += group[:k]
            bad += group[k:]
        bad += running
        good.sort(key=lambda t: t.number)
        bad.sort(key=lambda t: t.number)
        return good, bad

    def _get_internal_repr(self, trials: list[FrozenTrial], search_space: dict[str, dists.BaseDistribution],
                           study: optuna.Study) -> dict[str, np.ndarray]:
        memo = self._reprs.setdefault((study._study_id, tuple(search_space.items())), {})
        rows = []
        for t in trials:
            finished = t.state.is_finished()
            if finished and t._trial_id in memo:
                row = memo[t._trial_id]
            else:
                params = self._get_params(t, study)
                row = (tuple(d.to_internal_repr(params[name]) for name, d in search_space.items())
                       if search_space.keys() <= params.keys() else None)
                if finished:
                    memo[t._trial_id] = row
            if row is not None:
                rows.append(row)
        # one contiguous float64 array per parameter, as Optuna builds them
        return {name: np.asarray([r[i] for r in rows]) for i, name in enumerate(search_space)}
