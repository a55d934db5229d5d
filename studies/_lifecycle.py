"""One trial's lifecycle, written once: budget gate -> attributes -> each epoch -> finish.

Both executors drive a :class:`TrialRun`: ``execute_trial`` trains one model at a time,
``execute_population`` many at once; they differ only in how the epochs are run. The trial
states a user sees (REST, exports, the dashboard's ``dendro.state`` attribute) are named here.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

import core

from . import _fast, _lease, _optuna_private
from ._artifacts import ModelStore, Shortlist
from ._keys import TRIAL_STATE_ATTR
from ._space import suggest
from ._spec import StudySpec, count_point, split_params
from ._storage import rdb

__all__ = ["TRIAL_STATES", "TRIAL_STATE_ATTR", "trial_state", "is_infeasible", "TrialOutcome", "TrialRun",
           "trial_seed"]

log = logging.getLogger(__name__)

#: the states of a trial, as REST, the CSV and JSON exports and the dashboard name them
TRIAL_STATES = ("complete", "pruned", "failed", "running", "waiting", "infeasible")
_BY_OPTUNA = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
              TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def is_infeasible(t: FrozenTrial) -> bool:
    return bool(t.user_attrs.get("infeasible", False))


def trial_state(t: FrozenTrial) -> str:
    """The trial's state in :data:`TRIAL_STATES`: Optuna's, with over-budget points ``infeasible``."""
    return "infeasible" if is_infeasible(t) else _BY_OPTUNA[t.state]


@dataclass
class TrialOutcome:
    number: int
    state: str  # complete | pruned | failed | infeasible | stopped | lost
    values: list[float] | None = None
    n_params: int | None = None
    reason: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


def trial_seed(spec: StudySpec, number: int, k: int = 0) -> int:
    return (spec.seed * 1_000_003 + number * 101 + k) % (2**31 - 1)


class TrialRun:
    """One asked trial from its budget check to its tell.

    ``gate()`` draws the point and counts it exactly (an over-budget or unbuildable point is
    told as infeasible and never trained); ``start()`` writes its attributes; ``epoch()`` is
    called after every epoch (report, prune, stop); ``finish()`` tells it and keeps its
    weights. ``outcome`` holds the result once it ended. A trial that was finished elsewhere
    meanwhile (its lease went stale and another worker re-queued it) ends as ``lost``.
    """

    def __init__(self, study: optuna.Study, trial: optuna.Trial, spec: StudySpec, *,
                 worker: str | None = None) -> None:
        self.study, self.trial, self.spec, self.worker = study, trial, spec, worker
        self.number = trial.number
        self.params: dict[str, Any] = {}
        self.n_params: int | None = None
        self.family = spec.model
        self.model_args: dict[str, Any] = {}
        self.train_args: dict[str, Any] = {}
        self.seed = trial_seed(spec, trial.number)
        self.stopped_by: str | None = None
        self.outcome: TrialOutcome | None = None
        #: the training split's input statistics, kept with the weights (set by the executor)
        self.normalization: dict[str, Any] | None = None

    # -- budget gate and attributes --------------------------------------------------------
    def gate(self) -> bool:
        """Draw and count the point; False (and ``outcome`` set) if it is infeasible."""
        spec = self.spec
        params = suggest(self.trial, spec.space)
        try:
            n = count_point(spec, params)
        except ValueError as exc:
            self._infeasible(None, f"the point builds no model: {exc}")
            return False
        if spec.max_params is not None and n > spec.max_params:
            self._infeasible(n, f"{n} parameters exceed max_params={spec.max_params}")
            return False
        self.params, self.n_params = params, n
        self.family, self.model_args, self.train_args = split_params(spec, params)
        return True

    def start(self, flush: bool = True) -> None:
        """Its attributes, written (with its params) in one write when ``flush``."""
        t = self.trial
        t.set_user_attr("n_params", self.n_params)
        self._constraint(self.n_params)
        t.set_user_attr("family", self.family)
        if self.worker:
            t.set_user_attr("worker", self.worker)
        t.set_user_attr(TRIAL_STATE_ATTR, "running")
        if flush:
            _fast.view(t).flush([t._trial_id])

    def _constraint(self, n: int | None) -> None:
        spec, t = self.spec, self.trial
        if spec.max_params is None:
            return
        if "constraints:max_params" in t.storage.get_trial_system_attrs(t._trial_id):
            return  # a retried trial carries its constraint over already
        # <= 0 is feasible; an unbuildable point counts as far over budget.
        t.set_constraint("max_params", float(n - spec.max_params) if n is not None else 1e9)

    def _infeasible(self, n: int | None, reason: str) -> None:
        t = self.trial
        t.set_user_attr("infeasible", True)
        t.set_user_attr("reason", reason)
        if n is not None:
            t.set_user_attr("n_params", n)
        self._constraint(n)
        t.set_user_attr(TRIAL_STATE_ATTR, "infeasible")
        # PRUNED without any report: never trained; the sampler ranks it below every trained
        # point and its constraint (n_params - max_params > 0) marks it infeasible.
        _optuna_private.tell(self.study, t, state=TrialState.PRUNED)
        self.outcome = TrialOutcome(self.number, "infeasible", n_params=n, reason=reason)

    # -- each epoch --------------------------------------------------------------------------
    def epoch(self, epoch: int, metrics: dict[str, Any], should_stop: Callable[[], bool | str] | None) -> bool:
        """Report (single objective), ask the pruner, then ``should_stop``; True stops the trial.

        The pruner is not asked after the last epoch: stopping a trial that has trained all its
        epochs saves nothing and would hide a finished result (in a population whose members
        train in several stacks, the members of a later stack would otherwise be ranked against
        those of an earlier stack that had just completed).
        """
        if len(self.spec.objectives) == 1:
            try:
                self.trial.report(_report_metric(self.spec, metrics), epoch)
                if epoch < self.spec.n_epochs and self.trial.should_prune():
                    self.stopped_by = "pruned"
                    return True
            except UpdateFinishedTrialError:
                self.stopped_by = "lost"
                return True
        reason = should_stop() if should_stop is not None else False
        if reason:
            self.stopped_by = reason if isinstance(reason, str) else "the study was stopped"
            return True
        return False

    # -- finish ------------------------------------------------------------------------------
    def finish(self, results: list[core.TrainResult], dev: torch.device, state_dict: dict[str, Any] | None,
               model_store: ModelStore | None) -> TrialOutcome:
        """Tell the trial from its training results (one per seed) and keep its weights."""
        try:
            self.outcome = self._finish(results, dev, state_dict, model_store)
        except UpdateFinishedTrialError:
            self.outcome = self._lost()
        return self.outcome

    def _finish(self, results: list[core.TrainResult], dev: torch.device, state_dict: dict[str, Any] | None,
                model_store: ModelStore | None) -> TrialOutcome:
        spec, study, trial, n = self.spec, self.study, self.trial, self.n_params
        if self.stopped_by == "lost":
            return self._lost()
        if not results or results[0].status == "failed":
            return self.fail((results[0].error if results else None) or "failed in training")
        attrs = _result_attrs(results, dev, self.worker)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        last = results[-1]
        if last.status == "diverged":
            return self.fail(last.error or "non-finite loss")
        if self.stopped_by == "pruned":
            trial.set_user_attr(TRIAL_STATE_ATTR, "pruned")
            _optuna_private.tell(study, trial, state=TrialState.PRUNED)
            return TrialOutcome(self.number, "pruned", n_params=n, attrs=attrs)
        if self.stopped_by:
            # Cut short from outside: fail it visibly and queue its point again, losing nothing.
            return self.fail(f"stopped: {self.stopped_by}", state="stopped", requeue=True)
        values = self._values(results)
        if not all(math.isfinite(v) for v in values):
            return self.fail(f"non-finite objective {values}")
        trial.set_user_attr(TRIAL_STATE_ATTR, "complete")
        _optuna_private.tell(study, trial, values if len(values) > 1 else values[0])
        if model_store is not None and spec.keep_models > 0 and state_dict:
            try:
                model_store.keep(
                    study.study_name, self.number, values[0],
                    {"family": self.family, "model_args": self.model_args, "params": self.params,
                     "seed": results[0].seed, "n_params": n},
                    state_dict, spec.keep_models,
                    maximize=self._maximize, normalization=self.normalization,
                )
            except Exception as exc:  # noqa: BLE001 - the trial is told; weights are a bonus
                log.warning("could not keep the weights of trial %s: %s", self.number, exc)
        return TrialOutcome(self.number, "complete", values=values, n_params=n, attrs=attrs)

    def _values(self, results: list[core.TrainResult]) -> list[float]:
        """The objective values of these results (one per seed): their final epochs' means."""
        metrics = {
            "val_accuracy": _mean([_final(r).get("val_accuracy") for r in results]),
            "val_loss": _mean([_final(r).get("val_loss") for r in results]),
        }
        return _objective_values(self.spec, metrics, int(self.n_params or 0))

    @property
    def _maximize(self) -> bool:
        return self.spec.directions[0] == "maximize"

    def wants_weights(self, results: list[core.TrainResult], model_store: ModelStore | None,
                      shortlist: Shortlist) -> bool:
        """Whether :meth:`finish` could keep these results' weights: a completed trial among
        the ``keep_models`` best ``shortlist`` was offered (this worker's trials) whose first
        objective may also enter the study's stored best now. A population trainer reads back
        only those (``core.train_population(keep_weights=...)``); a bar that rose meanwhile
        only makes ``finish`` drop them."""
        if (model_store is None or self.spec.keep_models <= 0 or self.stopped_by or not results
                or results[-1].status != "completed"):
            return False
        values = self._values(results)
        return (all(math.isfinite(v) for v in values) and shortlist.offer(values[0], self.number)
                and model_store.may_keep(self.study.study_name, self.number, values[0],
                                         self.spec.keep_models, self._maximize))

    def fail(self, reason: str, state: str = "failed", requeue: bool = False) -> TrialOutcome:
        """Tell it FAIL with ``reason`` in ``fail_reason``; with ``requeue``, its point is
        queued again in the same transaction (nothing is lost if the worker dies between)."""
        log.warning("trial %s failed: %s", self.number, reason)
        study, trial = self.study, self.trial
        try:
            # the batching storage writes the re-queue with the tell
            together = requeue and _fast.view(study).requeue_when_told(trial._trial_id)
            backend = rdb(study._storage)
            if requeue and not together and isinstance(backend, optuna.storages.RDBStorage):
                # Optuna's path: the lease reaper's one transaction
                if not _lease.fail_and_requeue(backend, study._study_id, trial._trial_id, self.number, reason):
                    raise UpdateFinishedTrialError(f"trial {self.number} has already finished")
            else:
                trial.set_user_attr("fail_reason", reason)
                trial.set_user_attr(TRIAL_STATE_ATTR, "failed")
                _optuna_private.tell(study, trial, state=TrialState.FAIL)
                if requeue and not together:
                    # a storage of this process only: no one else sees between the two writes
                    study.enqueue_trial(trial.params, user_attrs={"requeued_from": self.number})
        except UpdateFinishedTrialError:
            self.outcome = self._lost()
            return self.outcome
        self.outcome = TrialOutcome(self.number, state, reason=reason)
        return self.outcome

    def _lost(self) -> TrialOutcome:
        log.warning("trial %s was finished by another worker (its lease went stale); its result "
                    "is dropped", self.number)
        return TrialOutcome(self.number, "lost", n_params=self.n_params,
                            reason="finished elsewhere: its lease went stale")


# -- metrics ------------------------------------------------------------------------------------
def _objective_values(spec: StudySpec, metrics: dict[str, Any], n_params: int) -> list[float]:
    out = []
    for o in spec.objectives:
        if o == "n_params":
            out.append(float(n_params))
        elif o in ("val_loss", "val_mse"):
            out.append(float(metrics["val_loss"]))
        else:
            out.append(float(metrics["val_accuracy"]))
    return out


def _report_metric(spec: StudySpec, metrics: dict[str, Any]) -> float:
    o = spec.objectives[0]
    return float(metrics["val_loss"] if o in ("val_loss", "val_mse") else metrics["val_accuracy"])


def _final(r: core.TrainResult) -> dict[str, Any]:
    """The metrics of the model a run hands back: its last epoch, or growth's restored best."""
    if not r.history:
        return {}
    best = getattr(r, "final_epoch", None)
    return r.history[best - 1] if best else r.history[-1]


def _mean(xs: list[float | None]) -> float:
    vals = [x for x in xs if x is not None]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def _result_attrs(results: list[core.TrainResult], dev: torch.device, worker: str | None) -> dict[str, Any]:
    r = results[0]
    f = _final(r)
    attrs: dict[str, Any] = {
        "val_accuracy": f.get("val_accuracy"),
        "test_accuracy": f.get("test_accuracy"),
        "train_accuracy": f.get("train_accuracy"),
        "val_loss": f.get("val_loss"),
        "test_loss": f.get("test_loss"),
        "train_loss": f.get("train_loss"),
        "wall_time": sum(x.wall_time for x in results),
        "seconds_per_epoch": r.seconds_per_epoch,
        "epochs_run": r.epochs_run,
        "device": str(dev),
        "seed": r.seed,
        "final_epoch": getattr(r, "final_epoch", None) or r.epochs_run,
        # growth adds parameters while training (never beyond max_params)
        "n_params_final": (r.history[-1].get("n_params") if r.history else None),
        "history": [
            {k: (round(v, 6) if isinstance(v, float) else v) for k, v in h.items()} for h in r.history
        ],
    }
    if len(results) > 1:
        attrs["seed_results"] = [
            {"seed": x.seed, **{k: _final(x).get(k) for k in ("val_accuracy", "test_accuracy", "val_loss", "test_loss")}}
            for x in results
        ]
        attrs["test_accuracy_mean"] = _mean([_final(x).get("test_accuracy") for x in results])
        attrs["test_loss_mean"] = _mean([_final(x).get("test_loss") for x in results])
    # Optuna keeps user attributes as JSON: make sure nothing else slips in.
    return json.loads(json.dumps(attrs, default=float))
