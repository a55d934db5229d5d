"""Kept model weights: the best trials' state dicts, in a table beside Optuna's.

A kept trial is its ``config`` (JSON: family, model arguments, seed, and the dataset's
``normalization`` statistics when given) and its weights; ``GET
/v1/studies/{name}/trials/{n}/model`` serves both as one ``torch.load``-able file
``{"config": ..., "state_dict": ...}``, so ``core.normalize(raw, config["normalization"])``
prepares raw inputs for the rebuilt model.
"""

from __future__ import annotations

import io
import json
import math
import time
from typing import Any

import sqlalchemy as sa
import torch

__all__ = ["ModelStore", "Shortlist"]

#: how long a read of a study's ``keep``-th model answers ``_cannot_enter`` without another
#: read: a population's members end ~1,000 at a time and each asked the database (~1.5 ms).
#: Other workers only make the bar stricter (a better model pushes the ``keep``-th out), so a
#: remembered bar never refuses a trial the database would take, except after a re-keep
#: of a kept trial with a worse value elsewhere: for at most this long.
_BAR_SECONDS = 2.0

_META = sa.MetaData()
_MODELS = sa.Table(
    "dendro_models",
    _META,
    sa.Column("study_name", sa.String(128), primary_key=True),
    sa.Column("trial_number", sa.Integer, primary_key=True),
    sa.Column("value", sa.Float, nullable=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("weights", sa.LargeBinary, nullable=False),
)

#: the kept models' order, best first, for a maximized and a minimized objective
_BEST_FIRST = {True: sa.desc(_MODELS.c.value), False: sa.asc(_MODELS.c.value)}


class ModelStore:
    """Weights of the ``keep`` best trials of each study, in the study's own database.

    Kept in the database rather than on a file system so that a worker on any machine can
    write them and the API can serve them.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        _META.create_all(engine, checkfirst=True)
        # per (study, keep, maximize): the keep-th model's (value, trial number) and when read
        self._bars: dict[tuple[str, int, bool], tuple[float, int, float]] = {}
        self._written: set[tuple[str, int]] = set()  # kept by this store: a re-keep reads

    def keep(
        self,
        study_name: str,
        trial_number: int,
        value: float | None,
        config: dict[str, Any],
        state_dict: dict[str, torch.Tensor],
        keep: int,
        maximize: bool = True,
        normalization: dict[str, Any] | None = None,
    ) -> bool:
        """Store a trial's weights if it is among the ``keep`` best; drop the ones pushed out.

        ``normalization`` is the training split's statistics (``core.Dataset.normalization``)
        the model's inputs were standardised with; it is stored in the config under
        ``"normalization"`` (``None`` when the inputs were used as they are), so a downloaded
        model says how to prepare raw inputs.
        """
        if not self.may_keep(study_name, trial_number, value, keep, maximize):
            return False
        order = _BEST_FIRST[maximize]
        if normalization is not None or "normalization" not in config:
            config = {**config, "normalization": normalization}
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
        # re-ranks in its own transaction: a model kept meanwhile by another worker counts
        self._forget_bars(study_name)  # a write moves the bar, down too when a kept trial re-keeps
        self._written.add((study_name, trial_number))
        with self.engine.begin() as con:
            con.execute(
                _MODELS.delete().where(
                    (_MODELS.c.study_name == study_name) & (_MODELS.c.trial_number == trial_number)
                )
            )
            con.execute(
                _MODELS.insert().values(
                    study_name=study_name,
                    trial_number=trial_number,
                    value=value,
                    created=time.time(),
                    config=json.dumps(config, default=str),
                    weights=buf.getvalue(),
                )
            )
            ranked = con.execute(
                sa.select(_MODELS.c.trial_number)
                .where(_MODELS.c.study_name == study_name)
                .order_by(order, _MODELS.c.trial_number)
            ).scalars().all()
            drop = ranked[keep:]
            if drop:
                con.execute(
                    _MODELS.delete().where(
                        (_MODELS.c.study_name == study_name) & (_MODELS.c.trial_number.in_(drop))
                    )
                )
        return trial_number not in drop

    def may_keep(self, study_name: str, trial_number: int, value: float | None, keep: int,
                 maximize: bool = True) -> bool:
        """Whether :meth:`keep` could store this trial's weights now: false where the study
        already holds ``keep`` models that all rank before it (a population trainer then
        does not read its weights back)."""
        return keep > 0 and not self._cannot_enter(study_name, trial_number, value, keep, maximize,
                                                   _BEST_FIRST[maximize])

    def _cannot_enter(self, study_name: str, trial_number: int, value: float | None, keep: int,
                      maximize: bool, order: Any) -> bool:
        """Whether the study already holds ``keep`` models that all rank before this trial
        (one read, so that most trials of a large study cost no write and no ``torch.save``).

        Only for a number against a number, on SQLite or PostgreSQL (``Float`` is a double
        there, so the stored value compares as the given one does). Where NULL or NaN ranks is
        the database's to say (SQLite puts NULL below every number and stores NaN as NULL;
        PostgreSQL puts NULL and NaN above), and a stored trial kept again replaces itself:
        those go the write path as before.
        """
        if value is None or self.engine.dialect.name not in ("sqlite", "postgresql"):
            return False
        key = (study_name, keep, maximize)
        bar = self._bars.get(key)
        fresh = bar is not None and time.monotonic() - bar[2] < _BAR_SECONDS
        if fresh and (study_name, trial_number) not in self._written and _ranks_after(
            value, trial_number, bar[0], bar[1], maximize  # type: ignore[index]
        ):
            return True  # behind the bar read moments ago; it can only have risen since
        ours = (_MODELS.c.study_name == study_name) & (_MODELS.c.trial_number == trial_number)
        kth = (
            sa.select(_MODELS.c.value, _MODELS.c.trial_number)
            .where(_MODELS.c.study_name == study_name)
            .order_by(order, _MODELS.c.trial_number)
            .limit(1)
            .offset(keep - 1)
            .subquery()
        )
        with self.engine.connect() as con:
            row = con.execute(
                sa.select(kth.c.value, kth.c.trial_number, sa.exists().where(ours))
            ).first()
        if row is None:  # fewer than `keep` models
            return False
        last, last_number, stored = row
        if last is None:
            return False
        if not math.isnan(last):
            self._bars[key] = (float(last), int(last_number), time.monotonic())
        if stored:
            return False
        return _ranks_after(value, trial_number, last, last_number, maximize)

    def _forget_bars(self, study_name: str) -> None:
        for key in [k for k in self._bars if k[0] == study_name]:
            del self._bars[key]

    def get(self, study_name: str, trial_number: int) -> tuple[dict[str, Any], bytes] | None:
        """(config, torch.save bytes) of a kept trial, or None."""
        with self.engine.connect() as con:
            row = con.execute(
                sa.select(_MODELS.c.config, _MODELS.c.weights).where(
                    (_MODELS.c.study_name == study_name) & (_MODELS.c.trial_number == trial_number)
                )
            ).first()
        if row is None:
            return None
        return json.loads(row.config), bytes(row.weights)

    def list(self, study_name: str) -> list[int]:
        with self.engine.connect() as con:
            return list(
                con.execute(
                    sa.select(_MODELS.c.trial_number).where(_MODELS.c.study_name == study_name)
                ).scalars()
            )

    def delete_study(self, study_name: str) -> None:
        self._forget_bars(study_name)
        self._written = {w for w in self._written if w[0] != study_name}
        with self.engine.begin() as con:
            con.execute(_MODELS.delete().where(_MODELS.c.study_name == study_name))


class Shortlist:
    """The ``keep`` best (value, trial number) pairs offered so far, ranked as the store ranks.

    A population's members end ~1,000 at a time, all before the first of them is kept; the
    store's bar, read then, refuses none of them in a study's first cohort. A trial ranking
    after ``keep`` trials already offered can never be kept once those are, so its weights
    need not be read back (a trial offered and then lost keeps its place: the list errs on
    the side of reading fewer).
    """

    def __init__(self, keep: int, maximize: bool) -> None:
        self.keep, self.maximize = keep, maximize
        self.best: list[tuple[float, int]] = []  # best first

    def offer(self, value: float, number: int) -> bool:
        """Whether (value, number) is among the ``keep`` best offered so far, itself included."""
        if self.keep <= 0:
            return False
        if len(self.best) >= self.keep and _ranks_after(value, number, *self.best[-1], self.maximize):
            return False
        at = next((j for j, (v, n) in enumerate(self.best) if _ranks_after(v, n, value, number, self.maximize)),
                  len(self.best))
        self.best.insert(at, (value, number))
        del self.best[self.keep:]
        return True


def _ranks_after(value: float, number: int, last: float, last_number: int, maximize: bool) -> bool:
    """Whether (value, number) ranks after the kept (last, last_number); a NaN on either side
    compares false, so the write path ranks it."""
    worse = value < last if maximize else value > last
    return worse or (value == last and number > last_number)
