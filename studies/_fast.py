"""A worker's storage for one study: its trials cached incrementally, a trial's writes batched.

Plain Optuna on an RDB storage makes a round trip for every ``trial.report``,
``set_user_attr`` and pruning check, and re-reads every unfinished trial whenever the
sampler or the pruner looks at the study. :class:`FastStorage` wraps the study's storage
(it becomes ``study._storage``) and changes only when things reach the database, never what
reaches it:

- The trials this process runs ("owned") live in memory. Their params, attributes and
  intermediate values are kept there and written in one transaction at two points: when the
  trial starts training (:meth:`FastStorage.flush`: params, the attributes set so far, the
  constraint) and when it is told (its state, values, intermediate values and the remaining
  attributes, all at once). The rows are exactly the ones Optuna's own writes produce.
- A trial is created together with its heartbeat row, so a worker that dies at any point
  leaves a trial that the stale-trial callback fails and re-queues; buffered reports of a
  dead trial are lost with it, as its training is.
- Other trials are read incrementally: finished trials never change, so they are fetched
  once; each refresh reads only trials created since and the unfinished ones of other
  workers. The sampler and the pruner read this view; it is refreshed under the study lock
  before every ask and at most :data:`MAX_AGE` seconds old otherwise, and it always includes
  this process's own trials as they are. Pruning therefore runs Optuna's own pruner against
  the same history without touching the database.

- A population asks its free slots' trials in one transaction (:meth:`FastStorage.reserve`)
  and holds its tells back (:meth:`FastStorage.deferring`): they change the view at once and
  reach the database together, at the next ask, the next epoch or the end.

Only samplers and pruners that read the study through ``get_trials`` and write nothing of
their own while a trial runs can use it (the caller decides; see ``studies._runner``).

:class:`FastTPESampler` is TPE with the same proposals for less work per ask: it keeps its
estimators between a budget-aware sampler's redraws, scores each finished trial once, and
memoises TPE's log-CDF exactly.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import optuna
import sqlalchemy as sa
from optuna import distributions as dists
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import orm

from ._storage import rdb

__all__ = ["FastStorage", "FastTPESampler", "attach", "of", "Beats", "tpe_memo", "MAX_AGE", "PRUNERS"]

log = logging.getLogger(__name__)

#: seconds a view of other workers' trials may be reused between asks
MAX_AGE = 1.0
#: pruners that decide from ``study.get_trials`` and the trial alone, writing nothing
PRUNERS: tuple[type[optuna.pruners.BasePruner], ...] = (
    optuna.pruners.MedianPruner, optuna.pruners.PercentilePruner, optuna.pruners.NopPruner,
)
_T = models.TrialModel
_UTC = datetime.UTC


def _utc(value: datetime.datetime) -> datetime.datetime:
    """A local naive datetime as the naive UTC that Optuna's trial table stores."""
    return value.astimezone(_UTC).replace(tzinfo=None)


class _Owned:
    """A trial this process runs: its live FrozenTrial and the rows not yet written."""

    __slots__ = ("live", "params", "user", "system", "ivs", "adopted", "told")

    def __init__(self, live: FrozenTrial, adopted: bool = False) -> None:
        self.live = live
        self.params: dict[str, tuple[float, dists.BaseDistribution]] = {}
        self.user: dict[str, Any] = {}
        self.system: dict[str, Any] = {}
        self.ivs: dict[int, float] = {}
        self.adopted = adopted  # popped from the queue: rows may exist from before
        self.told = False  # finished in memory, the state not yet written

    @property
    def pending(self) -> bool:
        return bool(self.params or self.user or self.system or self.ivs or self.told)


class FastStorage(BaseStorage, BaseHeartbeat):
    """``study._storage`` for a worker: see the module's docstring. One study, one process."""

    def __init__(self, inner: BaseStorage, study_id: int,
                 classify: Callable[[FrozenTrial], str] | None = None) -> None:
        backend = rdb(inner)
        if not isinstance(backend, RDBStorage):
            raise ValueError(f"FastStorage needs an RDBStorage, got {type(backend).__name__}")
        self._inner = inner
        self._backend = backend  # studies._storage.rdb() finds the RDBStorage here
        self._study_id = study_id
        self._classify = classify or (lambda t: t.state.name.lower())
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
        self._dists: dict[str, dists.BaseDistribution] = {}
        self._lists: dict[Any, list[FrozenTrial]] = {}
        self._refreshed = -float("inf")
        self._directions: list[StudyDirection] | None = None
        self._stmts: dict[str, Any] | None = None
        self.writes = 0  # transactions written, for tests and benchmarks

    # -- the view ----------------------------------------------------------------------------
    def refresh(self, *, study_attrs: bool = False) -> dict[str, Any] | None:
        """Read trials created since the last read and other workers' unfinished ones.

        With ``study_attrs``, the study's user attributes are read in the same session and
        returned. Raises KeyError if the study was deleted (as Optuna does).
        """
        with self._lock, _create_scoped_session(self._backend.scoped_session) as session:
            conn = session.connection()
            studies_ = models.StudyModel.__table__
            if conn.execute(sa.select(studies_.c.study_id)
                            .where(studies_.c.study_id == self._study_id)).first() is None:
                raise KeyError(models.NOT_FOUND_MSG)
            attrs = None
            if study_attrs:
                ua = models.StudyUserAttributeModel.__table__
                attrs = {k: json.loads(v) for k, v in conn.execute(
                    sa.select(ua.c.key, ua.c.value_json).where(ua.c.study_id == self._study_id))}
            cond = _T.trial_id > self._max_id
            if self._mine:
                cond = sa.and_(cond, _T.trial_id.notin_(self._mine))
            if self._watch:
                cond = sa.or_(cond, _T.trial_id.in_(self._watch))
            # Usually nothing changed: look for ids first, load whole trials only if there are.
            ids = [i for (i,) in conn.execute(
                sa.select(_T.trial_id).where(_T.study_id == self._study_id, cond))]
            query = (
                session.query(_T)
                .options(orm.selectinload(_T.params), orm.selectinload(_T.values),
                         orm.selectinload(_T.user_attributes), orm.selectinload(_T.system_attributes),
                         orm.selectinload(_T.intermediate_values))
                # (a long list of ids would outgrow SQLite's bound parameters: filter again)
                .filter(_T.trial_id.in_(ids) if len(ids) <= 1000 else
                        sa.and_(_T.study_id == self._study_id, cond))
                .order_by(_T.trial_id)
            )
            for model in query.all() if ids else []:
                if model.trial_id not in self._owned:
                    self._put(self._backend._build_frozen_trial_from_trial_model(model))
                self._max_id = max(self._max_id, model.trial_id)
            # Every trial below one this process created was committed before it (trials are
            # created under the study row lock), so this read has them all.
            self._max_id = max([self._max_id, *self._mine])
            self._mine.clear()
            self._refreshed = time.monotonic()
        return attrs

    def _put(self, t: FrozenTrial) -> None:
        self._trials[t.number] = t
        self._numbers[t._trial_id] = t.number
        if t.state.is_finished():
            self._watch.discard(t._trial_id)
            self._finished[self._classify(t)] += 1
            for name, d in t.distributions.items():
                self._dists.setdefault(name, d)
        elif t._trial_id not in self._owned:
            self._watch.add(t._trial_id)
        self._lists.clear()

    def _fresh(self, force: bool = False) -> None:
        if force or time.monotonic() - self._refreshed > MAX_AGE:
            self.refresh()

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
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            o = self._owned.get(trial_id)
            if o is not None:
                return copy.deepcopy(o.live)
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
                return copy.deepcopy(o.live.user_attrs)
        return self.get_trial(trial_id).user_attrs

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        with self._lock:
            o = self._owned.get(trial_id)
            if o is not None:
                return copy.deepcopy(o.live.system_attrs)
        return self.get_trial(trial_id).system_attrs

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        self.flush()  # the database decides, as it does for Optuna (ties included)
        return self._backend.get_best_trial(study_id)

    # -- creating trials ---------------------------------------------------------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if study_id != self._study_id or template_trial is not None:
            # add_trial / enqueue_trial / the stale-trial callback: as Optuna writes them;
            # the next refresh reads them.
            return self._backend.create_new_trial(study_id, template_trial)
        with self._lock:
            if self._reserved:
                return self._reserved.pop(0)
        return self.create_trials(1)[0]

    def reserve(self, n: int) -> None:
        """Create ``n`` trials now, in one transaction, for the next ``create_new_trial`` calls."""
        ids = self.create_trials(n)
        with self._lock:
            self._reserved.extend(ids)

    def create_trials(self, n: int) -> list[int]:
        """Create ``n`` RUNNING trials, with their heartbeat rows, in one transaction.

        Numbers are counted under the study row lock as Optuna counts them: the trials of
        the study with smaller ids.
        """
        beat = bool(self._backend.get_heartbeat_interval())
        with self._lock, _create_scoped_session(self._backend.scoped_session) as session:
            models.StudyModel.find_or_raise_by_id(self._study_id, session, for_update=True)
            now = datetime.datetime.now()
            new = [_T(study_id=self._study_id, number=None, state=TrialState.RUNNING, datetime_start=now)
                   for _ in range(n)]
            session.add_all(new)
            session.flush()
            new.sort(key=lambda m: m.trial_id)
            base = new[0].count_past_trials(session)
            for i, model in enumerate(new):
                model.number = base + i
            if beat:
                session.execute(sa.insert(models.TrialHeartbeatModel),
                                [{"trial_id": m.trial_id} for m in new])
            session.flush()
            out = []
            for model in new:
                live = FrozenTrial(
                    number=model.number, state=TrialState.RUNNING, value=None, values=None,
                    datetime_start=model.datetime_start, datetime_complete=None, params={},
                    distributions={}, user_attrs={}, system_attrs={}, intermediate_values={},
                    trial_id=model.trial_id)
                self._owned[model.trial_id] = _Owned(live)
                self._trials[live.number] = live
                self._numbers[live._trial_id] = live.number
                out.append(model.trial_id)
            self._mine.update(out)  # not to be read back: this process knows them
            self._lists.clear()
            self.writes += 1
        return out

    def _adopt(self, trial_id: int) -> None:
        """A waiting trial this process just set RUNNING: run it as its own from now on."""
        live = self._backend.get_trial(trial_id)
        with self._lock:
            self._owned[trial_id] = _Owned(live, adopted=True)
            self._watch.discard(trial_id)
            self._put(live)
        if self._backend.get_heartbeat_interval():
            self._backend.record_heartbeat(trial_id)

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
            o.user[key] = value
            o.live.user_attrs[key] = value

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._lock:
            o = self._own(trial_id)
            if o is None:
                self._backend.set_trial_system_attr(trial_id, key, value)
                return
            o.system[key] = value
            o.live.system_attrs[key] = value

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        with self._lock:
            o = self._owned.get(trial_id)
            if o is None:
                done = self._backend.set_trial_state_values(trial_id, state, values)
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
                for o in batch:
                    try:
                        self._flush([o])
                    except UpdateFinishedTrialError as exc:
                        log.warning("trial %d was finished elsewhere; dropped what this worker "
                                    "had of it: %s", o.live.number, exc)
            return len(batch)

    def _flush(self, batch: list[_Owned]) -> None:
        try:
            with _create_scoped_session(self._backend.scoped_session) as session:
                self._write(session, batch)
        except UpdateFinishedTrialError:
            if len(batch) == 1:
                self._lost(batch[0])
            raise
        self.writes += 1
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
        with contextlib.suppress(KeyError):
            self._put(self._backend.get_trial(tid))

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
        told = [o for o in batch if o.told]
        running = [o.live._trial_id for o in batch if not o.told]
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
            users += [{"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in o.user.items()]
            systems += [{"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in o.system.items()]
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
                    self._backend._set_trial_attr_without_commit(
                        session, model, row["trial_id"], row["key"], json.loads(row["value_json"]))
            else:
                conn.execute(st[name], rows if len(rows) > 1 else rows[0])

    # -- heartbeats --------------------------------------------------------------------------
    def has_heartbeat(self, trial_id: int) -> bool:
        """Whether this process wrote the trial's heartbeat row (with the trial, or on adopting it)."""
        with self._lock:
            o = self._owned.get(trial_id)
            return o is not None and not o.told

    def beat(self, trial_ids: Sequence[int]) -> None:
        """One heartbeat for many trials whose heartbeat rows exist, in one statement."""
        if not trial_ids:
            return
        hb = models.TrialHeartbeatModel
        with _create_scoped_session(self._backend.scoped_session, True) as session:
            session.execute(sa.update(hb).where(hb.trial_id.in_(list(trial_ids)))
                            .values(heartbeat=sa.func.now()))

    def record_heartbeat(self, trial_id: int) -> None:
        self._backend.record_heartbeat(trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self._backend._get_stale_trial_ids(study_id)

    def get_heartbeat_interval(self) -> int | None:
        return self._backend.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._backend.get_heartbeat_stale_trial_callback()

    # -- the study: straight through -------------------------------------------------------
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self._inner.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self._inner.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self._inner.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._inner.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._inner.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        if study_id != self._study_id:
            return self._inner.get_study_directions(study_id)
        if self._directions is None:  # fixed when the study is created
            self._directions = self._inner.get_study_directions(study_id)
        return self._directions

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._inner.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._inner.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[optuna.study.FrozenStudy]:
        return self._inner.get_all_studies()

    def remove_session(self) -> None:
        self._backend.remove_session()


def of(obj: optuna.Study | optuna.Trial) -> FastStorage | None:
    """The FastStorage behind a study or a trial, if it has one."""
    storage = getattr(obj, "_storage", None) or getattr(obj, "storage", None)
    return storage if isinstance(storage, FastStorage) else None


def attach(study: optuna.Study, classify: Callable[[FrozenTrial], str] | None = None) -> FastStorage | None:
    """Put a FastStorage under ``study`` (once) if its storage and pruner allow; else None.

    The caller vouches for the sampler: it must read the study only through ``get_trials``
    and write nothing but the trial's own params (TPE without constant liar, random).
    """
    fs = of(study)
    if fs is not None:
        return fs
    if not isinstance(rdb(study._storage), RDBStorage) or type(study.pruner) not in PRUNERS:
        return None
    fs = FastStorage(study._storage, study._study_id, classify)
    study._storage = fs
    return fs


class Beats:
    """One thread beating for a set of trials (not one thread per trial).

    ``add(trial_id, now=False)`` trusts that the trial's heartbeat row was just written (a
    FastStorage creates it with the trial); ``now=True`` beats at once, creating the row.
    """

    def __init__(self, storage: BaseStorage) -> None:
        self.fast = storage if isinstance(storage, FastStorage) else None
        self.storage = rdb(storage)
        self.ids: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        interval = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        self.thread = None
        if interval:
            self.thread = threading.Thread(target=self._run, args=(interval,), name="heartbeats",
                                           daemon=True)
            self.thread.start()

    def _run(self, interval: float) -> None:
        while not self.stop.wait(interval):
            with self.lock:
                ids = sorted(self.ids)
            try:
                if self.fast is not None:
                    self.fast.beat(ids)
                else:
                    for tid in ids:
                        self.storage.record_heartbeat(tid)
            except Exception as exc:  # noqa: BLE001 - a lost beat is retried next interval
                log.warning("heartbeat failed: %s", exc.__class__.__name__)

    def add(self, trial_id: int, now: bool = True) -> None:
        with self.lock:
            self.ids.add(trial_id)
        if now and self.thread is not None:
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(trial_id)

    def remove(self, trial_id: int) -> None:
        with self.lock:
            self.ids.discard(trial_id)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def __enter__(self) -> Beats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- TPE's log-CDF, looked up instead of recomputed ----------------------------------------------
class _ExactMemo:
    """A pure float function over arrays: known inputs looked up at once, new ones computed.

    TPE's log-CDF (``optuna.samplers._tpe._truncnorm._log_ndtr``) calls a Python scalar
    function per element: over ten thousand calls per ask at 2,000 trials. Most inputs are
    standardised kernel bounds that recur from ask to ask (the same trials' kernels, the same
    integer grid): about nine in ten were seen before. Each new input is computed by the very
    scalar function Optuna uses and kept in sorted arrays, so the output is the same, bit for
    bit. New inputs collect in a small array that is merged into the large one now and then;
    past ``limit`` inputs the memo starts afresh.
    """

    def __init__(self, fn: Callable[[float], float], limit: int = 1 << 19, merge: int = 1 << 14) -> None:
        self.fn = fn
        self.limit = limit
        self.merge = merge
        self.tables = (np.empty(0), np.empty(0), np.empty(0), np.empty(0))  # large, recent
        self.lock = threading.Lock()

    @staticmethod
    def _find(keys: np.ndarray, values: np.ndarray, x: np.ndarray, out: np.ndarray,
              todo: np.ndarray) -> np.ndarray:
        if not keys.size or not todo.any():
            return todo
        at = np.flatnonzero(todo)
        idx = np.minimum(np.searchsorted(keys, x[at]), keys.size - 1)
        hit = keys[idx] == x[at]  # NaN never hits: it is computed
        out[at[hit]] = values[idx[hit]]
        todo = todo.copy()
        todo[at[hit]] = False
        return todo

    def __call__(self, a: Any) -> np.ndarray:
        x = np.asarray(a, dtype=float)
        flat = x.ravel()
        out = np.empty(flat.shape)
        keys, values, rkeys, rvalues = self.tables
        todo = self._find(keys, values, flat, out, np.ones(flat.shape, dtype=bool))
        todo = self._find(rkeys, rvalues, flat, out, todo)
        if todo.any():
            new, inverse = np.unique(flat[todo], return_inverse=True)
            computed = np.array([self.fn(float(v)) for v in new], dtype=float)
            out[todo] = computed[inverse.ravel()]
            self._add(new, computed)
        return out.reshape(x.shape)

    def _add(self, new: np.ndarray, computed: np.ndarray) -> None:
        ok = ~np.isnan(new)
        new, computed = new[ok], computed[ok]
        with self.lock:
            keys, values, rkeys, rvalues = self.tables
            # another thread may have added some of them meanwhile: keys stay unique
            for k in (keys, rkeys):
                if k.size and new.size:
                    fresh = k[np.minimum(np.searchsorted(k, new), k.size - 1)] != new
                    new, computed = new[fresh], computed[fresh]
            pos = np.searchsorted(rkeys, new)
            rkeys, rvalues = np.insert(rkeys, pos, new), np.insert(rvalues, pos, computed)
            if rkeys.size > self.merge:
                if keys.size + rkeys.size > self.limit:
                    keys, values = np.empty(0), np.empty(0)
                pos = np.searchsorted(keys, rkeys)
                keys, values = np.insert(keys, pos, rkeys), np.insert(values, pos, rvalues)
                rkeys, rvalues = np.empty(0), np.empty(0)
            self.tables = (keys, values, rkeys, rvalues)


_MEMO_LOCK = threading.Lock()
_MEMO_USERS = 0
_MEMO: _ExactMemo | None = None
_ORIGINAL_LOG_NDTR: Any = None


@contextlib.contextmanager
def tpe_memo() -> Iterator[None]:
    """While inside (any thread), TPE's log-CDF is memoised exactly (see :class:`_ExactMemo`).

    ``optuna.samplers._tpe._truncnorm._log_ndtr`` is swapped on the first entry and restored
    on the last exit.
    """
    global _MEMO_USERS, _MEMO, _ORIGINAL_LOG_NDTR
    from optuna.samplers._tpe import _truncnorm

    with _MEMO_LOCK:
        if _MEMO_USERS == 0:
            if _MEMO is None:
                scalar = _truncnorm._log_ndtr_single
                _MEMO = _ExactMemo(getattr(scalar, "__wrapped__", scalar))
            _ORIGINAL_LOG_NDTR = _truncnorm._log_ndtr
            _truncnorm._log_ndtr = _MEMO
        _MEMO_USERS += 1
    try:
        yield
    finally:
        with _MEMO_LOCK:
            _MEMO_USERS -= 1
            if _MEMO_USERS == 0:
                _truncnorm._log_ndtr = _ORIGINAL_LOG_NDTR


# -- TPE that does each ask's work once ---------------------------------------------------------
class FastTPESampler(optuna.samplers.TPESampler):
    """Optuna's TPESampler, proposing the same points with less work per ask.

    Same arguments, same random stream, same proposals (``tests/studies/test_fast.py``
    compares them point by point with TPESampler's). What changes:

    - the split into good and bad trials and both Parzen estimators are kept while the
      trials they came from are the same: a budget-aware sampler's redraws within one ask
      (and an ask after an infeasible point) reuse them, and only draw and score candidates;
    - a finished trial's parameters in the estimators' internal form are computed once;
    - TPE's log-CDF is memoised exactly (:func:`tpe_memo`).
    """

    #: How many trials asked since the estimators were fit may go without their "lie" before
    #: a refit (0: none, TPE's exact proposals). A population sets it while it refills many
    #: slots at once: a burst of K asks then costs K / (max_stale_lies + 1) fits instead of K,
    #: each over every finished and running trial (see ``studies._population``).
    max_stale_lies: int = 0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reprs: dict[tuple[Any, ...], dict[int, tuple[float, ...] | None]] = {}
        self._estimators: tuple[Any, Any] | None = None  # (key, (below, above))
        self._fitted: tuple[Any, frozenset[int]] | None = None  # (finished key, running ids) of the fit
        self._scores: dict[int, dict[int, tuple[float, Any]]] = {}  # study -> trial -> split scores

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, dists.BaseDistribution]) -> dict[str, Any]:
        with tpe_memo():
            return super().sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: dists.BaseDistribution) -> Any:
        with tpe_memo():
            return super().sample_independent(study, trial, param_name, param_distribution)

    def _sample(self, study: optuna.Study, trial: FrozenTrial,
                search_space: dict[str, dists.BaseDistribution]) -> dict[str, Any]:
        liar = self._constant_liar
        states = [TrialState.COMPLETE, TrialState.PRUNED] + ([TrialState.RUNNING] if liar else [])
        trials = study._get_trials(deepcopy=False, states=states, use_cache=not liar)
        if liar:  # the asked trial is no lie to itself
            trials = [t for t in trials if t.number != trial.number]
        cached = self._estimators
        if not (cached is not None and self._stale_ok(study, trials, search_space)):
            key = self._key(study, trials, search_space)
            if cached is None or cached[0] != key:
                cached = self._estimators = (key, self._fit(study, trials, search_space))
                self._fitted = (key[:3], frozenset(t._trial_id for t in trials if t.state == TrialState.RUNNING))
        below, above = cached[1]
        candidates = below.sample(self._rng.rng, self._n_ei_candidates)
        best = self._compare(candidates, self._compute_acquisition_func(candidates, below, above))
        return {name: d.to_external_repr(best[name]) for name, d in search_space.items()}

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
        from optuna.samplers._tpe import sampler as tpe

        if self._gamma is None:
            self._gamma = (tpe.default_gamma if len(study.directions) <= 1
                           else tpe.default_gamma_multiobjective)
        n_done = sum(t.state != TrialState.RUNNING for t in trials)
        if len(study.directions) > 1:
            good, bad = tpe._split_trials(study, trials, self._gamma(n_done))
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
        from optuna.samplers._tpe import sampler as tpe

        scores = self._scores.setdefault(study._study_id, {})
        complete, pruned, infeasible, running = [], [], [], []
        for t in trials:
            if t.state == TrialState.RUNNING:
                running.append(t)
                continue
            score = scores.get(t._trial_id)
            if score is None:  # a finished trial never changes: score it once
                over = tpe._get_infeasible_trial_score(t)
                score = scores[t._trial_id] = (
                    over, tpe._get_pruned_trial_score(t, study) if t.state == TrialState.PRUNED else None)
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
