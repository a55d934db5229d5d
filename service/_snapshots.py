"""One study's rows as the API reads them: concurrent readers share a read, finished trials are kept."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import FrozenTrial

__all__ = ["Snapshot", "Snapshots"]

_STUDY = sa.text("SELECT study_id FROM studies WHERE study_name = :name")
_ATTRS = sa.text("SELECT key, value_json FROM study_user_attributes WHERE study_id = :sid")
_DIRECTIONS = sa.text("SELECT direction FROM study_directions WHERE study_id = :sid ORDER BY objective")
_STATES = sa.text("SELECT trial_id, state FROM trials WHERE study_id = :sid")


#: while a read of a study is under way, a snapshot up to this many ``max_age`` old serves
#: the requests that arrive meanwhile instead of making them wait for the read
_STALE_WHILE_READING = 2


@dataclass(frozen=True)
class Snapshot:
    """One study as read from ``taken`` (monotonic seconds) on: attributes, directions, trials."""

    study_id: int
    name: str
    user_attrs: dict[str, Any]
    directions: list[str]
    trials: list[FrozenTrial]
    taken: float

    @property
    def generation(self) -> Any:
        """What tells this study from another one given its id later (SQLite reuses ids)."""
        return self.user_attrs.get("dendro.started_at")


@dataclass
class _Slot:
    snap: Snapshot | None = None
    reading: bool = False
    read_started: float = field(default=-1.0)
    #: a snapshot taken before this (monotonic seconds) is never served: a write came after it
    not_before: float = field(default=-1.0)


class Snapshots:
    """Reads of one study, shared by the requests that arrive while one is under way.

    Every response reflects the database as of ``max_age`` seconds before its request or
    later (up to 2 x ``max_age`` while a fresher read is under way, rather than queue behind
    it), and always every write made through this API before it (a write calls
    :meth:`forget`): a request takes a snapshot that young, or waits for a read that began
    after it arrived, or begins one. With ``max_age=0`` every response reflects the database
    as of its request. So however many clients poll a study, at most one read of it is under
    way at a time (and at most one every ``max_age`` seconds), and each read
    fetches only what may have changed since the previous one: the trials that are new or
    unfinished (a finished trial never changes), found from one small query of ids and
    states. Before this, each poll loaded every trial of the study through Optuna's ORM, and
    GET /v1/studies/{name} every study of the storage: 50 polling clients saw p99 latencies
    of seconds (bench/bench_load.py).
    """

    def __init__(self, max_age: float = 0.0) -> None:
        self.max_age = max_age
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        # Striped: a condition a name would grow with every name a client asks for.
        self._conds = [threading.Condition(self._lock) for _ in range(32)]

    def get(self, storage: optuna.storages.BaseStorage, name: str) -> Snapshot:
        """The study ``name`` as of now or later; KeyError if there is none."""
        arrived = time.monotonic()
        cond = self._conds[hash(name) % len(self._conds)]
        with cond:
            while True:
                slot = self._slots.setdefault(name, _Slot())
                oldest = max(arrived - self.max_age, slot.not_before)
                if slot.snap is not None and slot.snap.taken >= oldest:
                    return slot.snap
                if not slot.reading:
                    break
                if (self.max_age and slot.snap is not None
                        and slot.snap.taken >= max(arrived - _STALE_WHILE_READING * self.max_age,
                                                   slot.not_before)):
                    return slot.snap  # a fresher one is being read: don't queue behind it
                cond.wait()  # for the read under way; it is ours if it began after we came
            slot.reading, slot.read_started = True, time.monotonic()
            prev = slot.snap
        snap = None
        try:
            snap = _read(storage, name, prev, slot.read_started)
            return snap
        finally:
            with cond:
                slot.reading = False
                if snap is not None:
                    slot.snap = snap
                elif self._slots.get(name) is slot:
                    del self._slots[name]  # no such study (or an error): keep nothing of it
                cond.notify_all()

    def forget(self, name: str) -> None:
        """Drop what is known of ``name`` (deleted or created again through the API)."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None and not slot.reading:
                del self._slots[name]
            elif slot is not None:
                slot.snap = None
                slot.not_before = time.monotonic()  # the read under way began before the write


def _read(storage: optuna.storages.BaseStorage, name: str, prev: Snapshot | None, taken: float) -> Snapshot:
    engine = getattr(storage, "engine", None)
    get_trials = getattr(storage, "_get_trials", None)
    if engine is None or get_trials is None:  # not an RDB storage: Optuna's own calls
        sid = storage.get_study_id_from_name(name)
        return Snapshot(sid, name, storage.get_study_user_attrs(sid),
                        [d.name.lower() for d in storage.get_study_directions(sid)],
                        storage.get_all_trials(sid, deepcopy=False), taken)
    with engine.connect() as con:
        sid = con.execute(_STUDY, {"name": name}).scalar()
        if sid is None:
            raise KeyError(name)
        attrs = {k: json.loads(v) for k, v in con.execute(_ATTRS, {"sid": sid})}
        directions = [str(d).rsplit(".", 1)[-1].lower() for (d,) in con.execute(_DIRECTIONS, {"sid": sid})]
        states = {int(i): str(s).rsplit(".", 1)[-1] for i, s in con.execute(_STATES, {"sid": sid})}
    known: dict[int, FrozenTrial] = {}
    if prev is not None and prev.study_id == sid and prev.generation is not None \
            and prev.generation == attrs.get("dendro.started_at"):
        known = {t._trial_id: t for t in prev.trials}
    # Read again what is new, what changed state, and what runs (its attributes change).
    keep = {i: t for i, t in known.items() if states.get(i) == t.state.name and t.state.is_finished()}
    need = set(states) - set(keep)
    if need:
        last = max(keep, default=-1)
        fresh = get_trials(sid, None, {i for i in need if i <= last}, last)
        keep.update((t._trial_id, t) for t in fresh if t._trial_id in need or t._trial_id > last)
    trials = sorted((t for i, t in keep.items() if i in states), key=lambda t: t.number)
    return Snapshot(sid, name, attrs, directions, trials, taken)

