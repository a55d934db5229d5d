"""Synchronous successive halving and Hyperband: stop the weaker members of a population at rungs.

A rung is an epoch ``r * eta**k`` (k = 0, 1, ...). When trials reach a rung they are ranked
together with every other trial's value at that epoch (Optuna intermediate values of finished
or running trials) and those outside the best ``max(1, n // eta)`` stop. Trials tied with a
survivor survive, and a non-finite value always stops. Hyperband runs several such ladders
(brackets) side by side, each starting ``eta`` times later than the one before; a trial's
bracket is its number modulo the number of brackets.

Two ways in:

* :meth:`RungPruner.prune` is an Optuna pruner for single-trial mode: the trial that just
  reported is ranked against the others' values at that epoch (asynchronous successive
  halving, as Optuna's own pruner does, but with its rungs at fixed epochs).
* In a population, members end their epochs together, so they can be ranked together. The
  executor calls :meth:`RungPruner.join` when it hands a member to the trainer and
  :meth:`RungPruner.leave` when it ends; from then on ``prune`` answers for that member as
  one of its cohort (the members that reach the rung in the same step): a member is stopped
  at the rung as soon as its fate no longer depends on members that have not reported yet;
  the others are stopped at the rung too, once the whole cohort has reported (the population
  trainers ask :meth:`RungPruner.doomed` for every member after each epoch, through their
  ``on_settle`` callback). :meth:`RungPruner.decide` is the rule itself, for executors that
  hold all values at once.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from ._spec import StudySpec

__all__ = ["RungPruner"]

#: the trial states whose intermediate values count at a rung
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


@dataclass
class _Cohort:
    """The members expected to report one epoch in the same step, and what they reported."""

    expected: set[int]
    others: dict[int, float]
    values: dict[int, float] = field(default_factory=dict)
    settled: bool = False


class RungPruner(optuna.pruners.BasePruner):
    """Successive halving (or Hyperband) at fixed epochs, for single trials and populations.

    Args:
        min_resource: the first rung's epoch ``r``.
        reduction_factor: ``eta``; at each rung the best ``1/eta`` go on.
        max_resource: the study's epochs; rungs at or beyond it stop nothing (the trial is
            finishing anyway). Needed for Hyperband, optional otherwise.
        hyperband: run the brackets ``s = 0 .. floor(log_eta(max_resource / r))``, bracket
            ``s`` starting at ``r * eta**s``.
        direction: ``"maximize"`` or ``"minimize"``; ``prune`` uses the study's direction.
        bootstrap_count: a rung stops nothing until it holds at least this many values.
    """

    def __init__(
        self,
        min_resource: int = 1,
        reduction_factor: int = 3,
        max_resource: int | None = None,
        *,
        hyperband: bool = False,
        direction: str = "maximize",
        bootstrap_count: int = 0,
    ) -> None:
        if not isinstance(min_resource, int) or min_resource < 1:
            raise ValueError(f"min_resource must be an integer >= 1, got {min_resource!r}")
        if not isinstance(reduction_factor, int) or reduction_factor < 2:
            raise ValueError(f"reduction_factor must be an integer >= 2, got {reduction_factor!r}")
        if max_resource is not None and (not isinstance(max_resource, int) or max_resource < 1):
            raise ValueError(f"max_resource must be an integer >= 1 or None, got {max_resource!r}")
        if hyperband and max_resource is None:
            raise ValueError("hyperband needs max_resource (the study's number of epochs)")
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
        if not isinstance(bootstrap_count, int) or bootstrap_count < 0:
            raise ValueError(f"bootstrap_count must be an integer >= 0, got {bootstrap_count!r}")
        self.min_resource = min_resource
        self.reduction_factor = reduction_factor
        self.max_resource = max_resource
        self.direction = direction
        self.bootstrap_count = bootstrap_count
        self.n_brackets = 1
        if hyperband:
            assert max_resource is not None
            s_max = 0
            while min_resource * reduction_factor ** (s_max + 1) <= max_resource:
                s_max += 1
            self.n_brackets = s_max + 1
        self._lock = threading.Lock()
        self._members: dict[int, int] = {}  # member -> its last reported epoch
        self._cohorts: dict[int, _Cohort] = {}  # epoch -> the cohort reporting it
        self._doomed: set[int] = set()  # members found below the cut after their rung

    @classmethod
    def for_spec(cls, spec: StudySpec, reduction_factor: int = 3) -> RungPruner:
        """The pruner of a spec whose ``pruner`` is ``successive_halving`` or ``hyperband``:
        rungs at epochs 1, eta, eta**2, ... below ``n_epochs``, on the first objective."""
        if spec.pruner not in ("successive_halving", "hyperband"):
            raise ValueError(f"RungPruner.for_spec: the spec's pruner is {spec.pruner!r}, "
                             "not 'successive_halving' or 'hyperband'")
        return cls(min_resource=1, reduction_factor=reduction_factor, max_resource=spec.n_epochs,
                   hyperband=spec.pruner == "hyperband" and spec.n_epochs > 1,
                   direction=spec.directions[0])

    # -- the rule ---------------------------------------------------------------------------
    def bracket(self, number: int) -> int:
        return number % self.n_brackets

    def rungs(self, bracket: int = 0, up_to: int | None = None) -> list[int]:
        """The rung epochs of ``bracket`` below ``up_to`` (default ``max_resource``)."""
        end = up_to if up_to is not None else self.max_resource
        if end is None:
            raise ValueError("give up_to: this pruner has no max_resource")
        out, e = [], self.min_resource * self.reduction_factor**bracket
        while e < end:
            out.append(e)
            e *= self.reduction_factor
        return out

    def is_rung(self, epoch: int, bracket: int = 0) -> bool:
        if self.max_resource is not None and epoch >= self.max_resource:
            return False
        e = self.min_resource * self.reduction_factor**bracket
        while e < epoch:
            e *= self.reduction_factor
        return e == epoch

    def _score(self, v: float) -> float:
        if not math.isfinite(v):
            return -math.inf
        return v if self.direction == "maximize" else -v

    def _verdict(self, value: float, pool: list[float], unseen: int) -> bool | None:
        """True: stopped; False: goes on; None: depends on the ``unseen`` values to come.

        ``pool`` holds every value known at the rung, ``value`` included.
        """
        if not math.isfinite(value):
            return True
        n = len(pool) + unseen
        if n < self.bootstrap_count:
            return False  # too few values to rank, even once every member has reported
        keep = max(1, n // self.reduction_factor)
        s = self._score(value)
        better = sum(1 for x in pool if self._score(x) > s)
        if better >= keep:
            return True
        if better + unseen < keep:
            return False
        return None

    def decide(
        self, epoch: int, members_values: Mapping[int, float], finished_history: Mapping[int, float] | None = None
    ) -> set[int]:
        """The members to stop after ``epoch``, all values known.

        ``members_values``: trial number -> value at ``epoch`` of the members that just reached
        it; ``finished_history``: trial number -> value at ``epoch`` of other trials (finished,
        or running elsewhere). Each member is ranked within its bracket.
        """
        others = {n: v for n, v in (finished_history or {}).items() if n not in members_values}
        stop: set[int] = set()
        for b in range(self.n_brackets):
            if not self.is_rung(epoch, b):
                continue
            mine = {n: float(v) for n, v in members_values.items() if self.bracket(n) == b}
            pool = list(mine.values()) + [float(v) for n, v in others.items() if self.bracket(n) == b]
            stop |= {n for n, v in mine.items() if self._verdict(v, pool, 0)}
        return stop

    # -- single-trial mode (Optuna) -----------------------------------------------------------
    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        if len(study.directions) != 1:
            return False  # pruning needs one objective; the spec never pairs them
        self.direction = "maximize" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"
        value = float(trial.intermediate_values[step])
        with self._lock:
            if trial.number in self._members:
                return self._member_epoch(trial.number, step, value, lambda cohort: _values_at(study, step, cohort))
        if not self.is_rung(step, self.bracket(trial.number)):
            return False
        return trial.number in self.decide(step, {trial.number: value}, _values_at(study, step, {trial.number}))

    # -- population mode ----------------------------------------------------------------------
    def join(self, number: int) -> None:
        """Trial ``number`` trains from now on as a member of this process's population."""
        with self._lock:
            self._members[number] = 0

    def leave(self, number: int) -> None:
        """The member ended (completed, stopped, failed)."""
        with self._lock:
            self._members.pop(number, None)
            self._doomed.discard(number)
            for epoch, c in list(self._cohorts.items()):
                c.expected.discard(number)
                if not c.settled and c.expected <= set(c.values):
                    self._settle(epoch, c)
            self._forget_settled()

    def doomed(self, number: int) -> bool:
        """Whether member ``number``'s cohort has settled and stopped it: the population asks
        once all its members have reported an epoch, so the stop lands on the rung itself."""
        with self._lock:
            return number in self._doomed

    def _member_epoch(self, number: int, epoch: int, value: float,
                      others: Callable[[set[int]], dict[int, float]]) -> bool:
        self._members[number] = epoch
        for e, c in list(self._cohorts.items()):
            if e < epoch and number in c.expected and not c.settled:
                # its cohort moved on without hearing from everyone (a member was set aside,
                # e.g. when the population shrank): decide with the values that came
                self._settle(e, c)
        self._forget_settled()
        if number in self._doomed:
            return True
        if not self.is_rung(epoch, self.bracket(number)):
            return False
        c = self._cohorts.get(epoch)
        if c is None:
            expected = {n for n, e in self._members.items() if e == epoch - 1} | {number}
            expected = {n for n in expected if self.is_rung(epoch, self.bracket(n))}
            c = self._cohorts[epoch] = _Cohort(expected, others(expected))
        c.values[number] = value
        c.expected.add(number)
        if c.expected <= set(c.values):
            return number in self._settle(epoch, c)
        b = self.bracket(number)
        unseen = sum(1 for n in c.expected - set(c.values) if self.bracket(n) == b)
        pool = [v for n, v in {**c.others, **c.values}.items() if self.bracket(n) == b]
        return bool(self._verdict(value, pool, unseen))

    def _settle(self, epoch: int, c: _Cohort) -> set[int]:
        c.settled = True
        stop = self.decide(epoch, c.values, c.others)
        self._doomed |= {n for n in stop if n in self._members}
        return stop

    def _forget_settled(self) -> None:
        live = set(self._members.values())
        for e in [e for e, c in self._cohorts.items() if c.settled and e not in live]:
            del self._cohorts[e]


def _values_at(study: optuna.Study, step: int, exclude: set[int]) -> dict[int, float]:
    """Other trials' intermediate values at ``step`` (finished, or running elsewhere)."""
    out: dict[int, float] = {}
    for t in study.get_trials(deepcopy=False, states=_COUNTED):
        if t.number in exclude:
            continue
        v = t.intermediate_values.get(step)
        if v is not None:
            out[t.number] = float(v)
    return out
