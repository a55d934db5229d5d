"""Studies in an Optuna storage: create, ask under the budget, train one trial, tell, run."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

import core

from . import _fast
from ._artifacts import ModelStore
from ._space import grid_of, suggest
from ._spec import OBJECTIVES, StudySpec, build_extras, count_point, split_params
from ._storage import default_storage_url, heartbeat, open_storage, rdb, study_lock
from .exceptions import StateError, StudyExistsError, StudyNotFoundError

__all__ = [
    "SPEC_ATTR",
    "STATE_ATTR",
    "STATES",
    "create_study",
    "load_study",
    "study_spec",
    "study_state",
    "set_study_state",
    "progress",
    "ask_trial",
    "execute_trial",
    "ask_trials",
    "run_study",
    "make_sampler",
    "make_pruner",
    "load_data",
    "TrialOutcome",
    "is_infeasible",
    "budget_gate",
    "BudgetAwareSampler",
]

log = logging.getLogger(__name__)

SPEC_ATTR = "dendro.spec"
STATE_ATTR = "dendro.state"
STARTED_ATTR = "dendro.started_at"
STATES = ("queued", "running", "stopped", "done")
_ALLOWED = {
    "stop": {"queued", "running"},
    "resume": {"stopped", "queued"},
}


# -- samplers and pruners ---------------------------------------------------------------------
class BudgetAwareSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler so that its proposals fit under ``spec.max_params``, by rejection.

    Optuna calls it like any sampler. Counts are analytic (microseconds, nothing built), so
    rather than spend trials teaching the sampler where the budget ends, each proposal is
    redrawn from the wrapped sampler, up to ``max_draws`` times, until it fits: random
    startup points come from the feasible region, and TPE proposes its best feasible
    candidate. A point that still does not fit is proposed anyway; the runner records it as
    an infeasible trial and its constraint tells the wrapped sampler. Only for samplers
    whose draws within one trial are independent of each other (TPE, random): CMA-ES, QMC,
    NSGA-II and GP keep per-draw state and are left unwrapped.
    """

    def __init__(self, base: optuna.samplers.BaseSampler, spec: StudySpec, max_draws: int = 30) -> None:
        if spec.max_params is None:
            raise ValueError("BudgetAwareSampler needs a spec with max_params")
        if max_draws < 1:
            raise ValueError(f"max_draws must be >= 1, got {max_draws}")
        self.base = base
        self.spec = spec
        self.max_draws = max_draws
        self._space = {name: p.distribution() for name, p in spec.space.items()}

    def fits(self, params: dict[str, Any]) -> bool:
        try:
            return count_point(self.spec, params) <= int(self.spec.max_params or 0)
        except ValueError:  # a point that builds no model is as bad as one over budget
            return False

    def infer_relative_search_space(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        if "fixed_params" in trial.system_attrs:  # an enqueued point: nothing to draw
            return {}
        return dict(self._space)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        search_space: dict[str, optuna.distributions.BaseDistribution],
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        point: dict[str, Any] = {}
        for _ in range(self.max_draws):
            inner = self.base.infer_relative_search_space(study, trial)
            point = dict(self.base.sample_relative(study, trial, inner)) if inner else {}
            for name, dist in search_space.items():
                if name not in point:
                    point[name] = self.base.sample_independent(study, trial, name, dist)
            if self.fits(point):
                break
        return point

    def sample_independent(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its stop at the end of the grid.

    GridSampler calls ``study.stop()`` after the last point, which raises outside
    ``study.optimize``; our ask-and-tell loops end a grid in :func:`ask_trial` instead.
    """

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        return None


def make_sampler(spec: StudySpec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The spec's sampler. ``seed`` defaults to the spec's; workers pass their own."""
    # The budget reaches the samplers as a constraint set on each trial (set_constraint),
    # so they learn where it ends; TPE and random also draw only feasible points when they
    # can (BudgetAwareSampler): plain constrained TPE wasted 13-29% of its asks on the
    # seed's space at max_params=8000, with these draws 0-6% (bench/bench_budget.py).
    seed = spec.seed if seed is None else seed
    s = spec.sampler
    if s in ("tpe", "random"):
        base: optuna.samplers.BaseSampler = (
            _fast.FastTPESampler(seed=seed, multivariate=True, n_startup_trials=10)
            if s == "tpe"
            else optuna.samplers.RandomSampler(seed=seed)
        )
        return BudgetAwareSampler(base, spec) if spec.max_params is not None else base
    if s == "grid":
        return _AskTellGridSampler(grid_of(spec.space), seed=seed)
    if s == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if s == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False,
                                          warn_asynchronous_seeding=False)
    if s == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if s == "gp":
        return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    raise AssertionError(s)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, spec.n_epochs // 4))
    if p == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.n_epochs)
    if p == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    return optuna.pruners.NopPruner()


# -- study lifecycle --------------------------------------------------------------------------
def _storage(storage: str | optuna.storages.BaseStorage | None) -> optuna.storages.BaseStorage:
    if storage is None:
        storage = default_storage_url()
    return open_storage(storage) if isinstance(storage, str) else storage


def create_study(
    spec: StudySpec,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    *,
    load_if_exists: bool = False,
    state: str = "running",
) -> optuna.Study:
    """Create the Optuna study of ``spec`` and store the spec and its state on it."""
    st = _storage(storage)
    name = study_name or spec.name
    if name is None:
        raise ValueError("the study needs a name: set spec.name or pass study_name")
    if spec.name != name:
        # validate the name the same way a spec's name is validated (model_copy would not)
        spec = StudySpec.model_validate({**spec.model_dump(), "name": name})
    try:
        study = optuna.create_study(
            storage=st,
            study_name=name,
            directions=spec.directions,
            sampler=make_sampler(spec),
            pruner=make_pruner(spec),
            load_if_exists=False,
        )
    except optuna.exceptions.DuplicatedStudyError:
        if not load_if_exists:
            raise StudyExistsError(f"a study named {name!r} exists already") from None
        study, stored = load_study(name, st)
        extendable = {"name", "n_trials", "timeout"}
        if stored.model_dump(exclude=extendable) != spec.model_dump(exclude=extendable):
            raise StudyExistsError(
                f"study {name!r} exists with a different spec; choose another name to start a new one"
            ) from None
        if (stored.n_trials, stored.timeout) != (spec.n_trials, spec.timeout):
            # Asking again with more trials (or time) extends the study: every worker reads
            # the stored spec, so that is what changes.
            study.set_user_attr(
                SPEC_ATTR,
                stored.model_copy(update={"n_trials": spec.n_trials, "timeout": spec.timeout}).public_dict(),
            )
            if study_state(study) == "done" and progress(study)["finished"] < spec.n_trials:
                study.set_user_attr(STATE_ATTR, "running")
        return study
    study.set_user_attr(SPEC_ATTR, spec.public_dict())
    study.set_user_attr(STATE_ATTR, state)
    study.set_user_attr(STARTED_ATTR, time.time())
    study.set_user_attr("dendro.objectives", spec.objectives)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(spec.objectives)
    return study


def study_spec(study: optuna.Study) -> StudySpec:
    raw = study.user_attrs.get(SPEC_ATTR)
    if raw is None:
        raise StudyNotFoundError(f"study {study.study_name!r} was not created by dendro (it has no spec)")
    return StudySpec.model_validate(raw)


def load_study(
    name: str, storage: str | optuna.storages.BaseStorage | None = None, sampler_seed: int | None = None
) -> tuple[optuna.Study, StudySpec]:
    """The study ``name`` with the sampler and pruner its spec asks for."""
    st = _storage(storage)
    try:
        st.get_study_id_from_name(name)
    except KeyError:
        raise StudyNotFoundError(f"no study named {name!r}") from None
    study = optuna.load_study(study_name=name, storage=st)
    spec = study_spec(study)
    study.sampler = make_sampler(spec, sampler_seed)
    study.pruner = make_pruner(spec)
    return study, spec


def study_state(study: optuna.Study) -> str:
    return str(study._storage.get_study_user_attrs(study._study_id).get(STATE_ATTR, "running"))


def set_study_state(study: optuna.Study, action: str) -> str:
    """Apply ``stop`` or ``resume``; a change the state does not allow is a StateError."""
    state = study_state(study)
    if action not in _ALLOWED:
        raise ValueError(f"action must be one of {sorted(_ALLOWED)}, got {action!r}")
    if state not in _ALLOWED[action]:
        raise StateError(f"cannot {action} study {study.study_name!r}: it is {state}")
    new = "stopped" if action == "stop" else "running"
    study.set_user_attr(STATE_ATTR, new)
    return new


def is_infeasible(t: optuna.trial.FrozenTrial) -> bool:
    return bool(t.user_attrs.get("infeasible", False))


_KINDS = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def _kind(t: optuna.trial.FrozenTrial) -> str:
    """What ``progress`` counts a trial as."""
    return "infeasible" if is_infeasible(t) else _KINDS[t.state]


def _counts(kinds: dict[str, int]) -> dict[str, Any]:
    c = {k: int(kinds.get(k, 0)) for k in ("complete", "pruned", "failed", "running", "waiting", "infeasible")}
    c["finished"] = c["complete"] + c["pruned"]
    c["total"] = sum(int(v) for v in kinds.values())
    return c


def progress(study: optuna.Study) -> dict[str, Any]:
    """Counts of trials by state; ``finished`` (complete + pruned, trained) is what n_trials counts."""
    fs = _fast.of(study)
    if fs is not None:
        fs.refresh()  # incremental: finished trials are counted once, when first read
        return _counts(fs.kinds())
    kinds: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        k = _kind(t)
        kinds[k] = kinds.get(k, 0) + 1
    return _counts(kinds)


def _mark_done_if_finished(
    study: optuna.Study, spec: StudySpec, counts: dict[str, Any], attrs: dict[str, Any] | None = None
) -> bool:
    """Mark the study done when it has its trials or its time is up. ``attrs``: the study's
    user attributes when the caller has just read them."""
    timed_out = False
    if spec.timeout is not None:
        started = float((study.user_attrs if attrs is None else attrs).get(STARTED_ATTR, time.time()))
        timed_out = time.time() - started > spec.timeout
    if counts["finished"] >= spec.n_trials or timed_out:
        state = study_state(study) if attrs is None else str(attrs.get(STATE_ATTR, "running"))
        if state == "running":
            study.set_user_attr(STATE_ATTR, "done")
        return True
    return False


def _fast_storage(study: optuna.Study) -> _fast.FastStorage | None:
    """The study's FastStorage, put under it on first use where its sampler and pruner allow.

    The sampler must read the study only through ``get_trials`` and write nothing but the
    asked trial's own attributes: TPE and random, budget-aware or not. (TPE's constant liar,
    Optuna 5's default, writes the trial's relative params as system attributes; they reach
    the database with its params.) Grid, CMA-ES, QMC, NSGA-II and GP keep state of their own
    in the storage, and Hyperband and successive halving write rungs while trials run: those
    studies take Optuna's plain path.
    """
    fs = _fast.of(study)
    if fs is not None:
        return fs
    s = study.sampler
    base = s.base if isinstance(s, BudgetAwareSampler) else s
    if type(base) not in (optuna.samplers.TPESampler, _fast.FastTPESampler, optuna.samplers.RandomSampler):
        return None
    return _fast.attach(study, classify=_kind)


def ask_trial(study: optuna.Study, spec: StudySpec) -> optuna.Trial | None:
    """Ask the next trial, or None when the study is not running or has all its trials.

    Runs under the study lock, so concurrent workers never take more than ``n_trials``.
    Trials of dead workers (no heartbeat) are failed first and re-queued.
    """
    trials = ask_trials(study, spec, 1)
    return trials[0] if trials else None


def ask_trials(study: optuna.Study, spec: StudySpec, n: int) -> list[optuna.Trial]:
    """Ask up to ``n`` trials at once (fewer, or none, near the end of the study).

    With a FastStorage (see :func:`_fast_storage`) the checks and the trials' creation are
    done once for the batch, each trial is sampled when its caller draws its params, and
    every trial is created with its heartbeat.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    fs = _fast_storage(study)
    if fs is None:
        out = []
        for _ in range(n):
            trial = _ask_plain(study, spec)
            if trial is None:
                break
            out.append(trial)
        return out
    fs.flush()  # tells this worker holds back reach the database before anyone counts
    with study_lock(study._storage, study.study_name):
        attrs = fs.refresh(study_attrs=True) or {}
        if fs.get_heartbeat_interval() and fs.others_running():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            attrs = fs.refresh(study_attrs=True) or {}
        if attrs.get(STATE_ATTR, "running") != "running":
            return []
        counts = _counts(fs.kinds())
        if _mark_done_if_finished(study, spec, counts, attrs):
            return []
        n = min(n, spec.n_trials - counts["finished"] - counts["running"])
        if n <= 0:
            return []
        if n > counts["waiting"]:
            fs.reserve(n - counts["waiting"])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            return [study.ask() for _ in range(n)]


def _ask_plain(study: optuna.Study, spec: StudySpec) -> optuna.Trial | None:
    with study_lock(study._storage, study.study_name):
        backend = rdb(study._storage)
        if isinstance(backend, optuna.storages.RDBStorage) and backend.get_heartbeat_interval():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        if study_state(study) != "running":
            return None
        counts = progress(study)
        if _mark_done_if_finished(study, spec, counts):
            return None
        if counts["finished"] + counts["running"] >= spec.n_trials:
            return None
        if _grid_exhausted(study, spec):
            # Infeasible grid points are visited but not counted, so a grid can end short
            # of n_trials.
            if counts["running"] == 0:
                study.set_user_attr(STATE_ATTR, "done")
            return None
        with warnings.catch_warnings():
            # We beat ourselves (storage.heartbeat) instead of going through Study.optimize.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            return study.ask()


def _after_tell(study: optuna.Study, spec: StudySpec) -> None:
    """Mark the study done if that tell was its last trial.

    With a FastStorage the lock and a read are taken only when the trials it knows of could
    add up to ``n_trials`` (or the study has a timeout); a study that another worker's tell
    completes unseen is marked done by the next ask, which always reads.
    """
    fs = _fast.of(study)
    if fs is not None:
        c = _counts(fs.kinds())
        if spec.timeout is None and c["finished"] + c["running"] + c["waiting"] < spec.n_trials:
            return
    with study_lock(study._storage, study.study_name):
        if fs is None:
            _mark_done_if_finished(study, spec, progress(study))
        else:
            attrs = fs.refresh(study_attrs=True) or {}
            _mark_done_if_finished(study, spec, _counts(fs.kinds()), attrs)


def _grid_exhausted(study: optuna.Study, spec: StudySpec) -> bool:
    """Every grid point is taken (finished or running) and no re-queued point waits."""
    if spec.sampler != "grid":
        return False
    size = math.prod(len(v) for v in grid_of(spec.space).values())
    taken: set[int] = set()
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            return False
        if "grid_id" in t.system_attrs and (t.state.is_finished() or t.state == TrialState.RUNNING):
            taken.add(int(t.system_attrs["grid_id"]))
    return len(taken) >= size


# -- one trial ------------------------------------------------------------------------------
@dataclass
class TrialOutcome:
    number: int
    state: str  # complete | pruned | failed | infeasible | stopped
    values: list[float] | None = None
    n_params: int | None = None
    reason: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _cached_data(
    name: str, data_dir: str | None, subset: int | None, val: float, seed: int, flatten: bool
) -> core.Dataset:
    return core.load_dataset(name, data_dir=data_dir, subset_size=subset, val_fraction=val,
                             seed=seed, flatten=flatten)


def load_data(spec: StudySpec, data_dir: str | None = None, flatten: bool = True) -> core.Dataset:
    """The spec's dataset (cached per process: trials of one study share it)."""
    return _cached_data(spec.dataset, data_dir, spec.subset_size, spec.val_fraction,
                        spec.data_seed, flatten)


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


def trial_seed(spec: StudySpec, number: int, k: int = 0) -> int:
    return (spec.seed * 1_000_003 + number * 101 + k) % (2**31 - 1)


def _set_budget_constraint(trial: optuna.Trial, spec: StudySpec, n: int | None) -> None:
    if spec.max_params is not None:
        if "constraints:max_params" in trial.storage.get_trial_system_attrs(trial._trial_id):
            return  # a retried trial carries its constraint over already
        # <= 0 is feasible; an unbuildable point counts as far over budget.
        trial.set_constraint("max_params", float(n - spec.max_params) if n is not None else 1e9)


def _record_infeasible(
    study: optuna.Study, trial: optuna.Trial, spec: StudySpec, n: int | None, reason: str
) -> TrialOutcome:
    trial.set_user_attr("infeasible", True)
    trial.set_user_attr("reason", reason)
    if n is not None:
        trial.set_user_attr("n_params", n)
    _set_budget_constraint(trial, spec, n)
    # PRUNED without any report: never trained; the sampler ranks it below every trained
    # point and its constraint (n_params - max_params > 0) marks it infeasible.
    study.tell(trial, state=TrialState.PRUNED)
    return TrialOutcome(trial.number, "infeasible", n_params=n, reason=reason)


def budget_gate(
    study: optuna.Study, trial: optuna.Trial, spec: StudySpec
) -> tuple[dict[str, Any], int] | TrialOutcome:
    """Draw the trial's point and count it exactly, before anything is built.

    Returns ``(params, n_params)`` for a point that may be trained. A point over the budget,
    or one that builds no model, is told as infeasible (PRUNED, never trained) and its
    outcome returned instead.
    """
    params = suggest(trial, spec.space)
    try:
        n = count_point(spec, params)
    except ValueError as exc:
        return _record_infeasible(study, trial, spec, None, f"the point builds no model: {exc}")
    if spec.max_params is not None and n > spec.max_params:
        return _record_infeasible(
            study, trial, spec, n, f"{n} parameters exceed max_params={spec.max_params}"
        )
    return params, n


def execute_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    spec: StudySpec,
    *,
    device: str | torch.device | None = None,
    data_dir: str | None = None,
    model_store: ModelStore | None = None,
    should_stop: Callable[[], bool | str] | None = None,
    worker: str | None = None,
) -> TrialOutcome:
    """Budget check, build, train with per-epoch reports, then tell. Never trains over budget.

    The trial ends COMPLETE (values = the objectives), PRUNED (by the pruner; or, marked
    ``infeasible``, over budget and never trained) or FAIL with the reason in the user
    attribute ``fail_reason`` (non-finite loss, out of memory, stopped). ``should_stop`` is
    asked after every epoch; a truthy answer (a string is the reason) stops the trial, which
    is failed and its point queued again.
    """
    gate = budget_gate(study, trial, spec)
    if isinstance(gate, TrialOutcome):
        return gate
    params, n = gate
    family, model_args, train_args = split_params(spec, params)
    trial.set_user_attr("n_params", n)
    _set_budget_constraint(trial, spec, n)
    trial.set_user_attr("family", family)
    if worker:
        trial.set_user_attr("worker", worker)
    fs = _fast.of(trial)
    if fs is not None:
        fs.flush([trial._trial_id])  # its params and attributes, in one write, before training
    dev = core.resolve_device(device)
    data = load_data(spec, data_dir, flatten=core.get_family(family).input_kind == "flat")
    stopped_by: list[str] = []

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> bool:
        if len(spec.objectives) == 1:
            trial.report(_report_metric(spec, metrics), epoch)
            if trial.should_prune():
                stopped_by.append("pruned")
                return True
        reason = should_stop() if should_stop is not None else False
        if reason:
            stopped_by.append(reason if isinstance(reason, str) else "the study was stopped")
            return True
        return False

    results: list[core.TrainResult] = []
    model = None
    try:
        with _beating(study, trial):
            results, model = _train_seeds(spec, trial.number, family, model_args, train_args, n,
                                          data, dev, on_epoch)
    except torch.cuda.OutOfMemoryError as exc:
        return _fail(study, trial, f"out of memory on {dev}: {str(exc).splitlines()[0]}")
    except Exception as exc:  # noqa: BLE001 - a broken trial must not take the worker down
        log.exception("trial %s raised", trial.number)
        return _fail(study, trial, f"{exc.__class__.__name__}: {exc}")
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    last = results[-1]
    first = results[0]
    attrs = _result_attrs(results, dev, worker)
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    if last.status == "diverged":
        return _fail(study, trial, last.error or "non-finite loss")
    if stopped_by == ["pruned"]:
        study.tell(trial, state=TrialState.PRUNED)
        return TrialOutcome(trial.number, "pruned", n_params=n, attrs=attrs)
    if stopped_by:
        # Cut short from outside: fail it visibly and queue its point again, losing nothing.
        out = _fail(study, trial, f"stopped: {stopped_by[0]}", state="stopped")
        study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
        return out
    metrics = {
        "val_accuracy": _mean([_final(r).get("val_accuracy") for r in results]),
        "val_loss": _mean([_final(r).get("val_loss") for r in results]),
    }
    values = _objective_values(spec, metrics, n)
    if not all(math.isfinite(v) for v in values):
        return _fail(study, trial, f"non-finite objective {values}")
    study.tell(trial, values if len(values) > 1 else values[0])
    if model_store is not None and spec.keep_models > 0 and model is not None:
        try:
            model_store.keep(
                study.study_name, trial.number, values[0],
                {"family": family, "model_args": model_args, "params": params,
                 "seed": first.seed, "n_params": n},
                model.state_dict(), spec.keep_models,
                maximize=OBJECTIVES[spec.objectives[0]] == "maximize",
            )
        except Exception as exc:  # noqa: BLE001 - the trial is told; weights are a bonus
            log.warning("could not keep the weights of trial %s: %s", trial.number, exc)
    _after_tell(study, spec)
    return TrialOutcome(trial.number, "complete", values=values, n_params=n, attrs=attrs)


@contextlib.contextmanager
def _beating(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Heartbeats for the trial while it trains; a FastStorage wrote its first with the trial."""
    fs = _fast.of(trial)
    if fs is None:
        with heartbeat(study._storage, trial._trial_id):
            yield
        return
    with _fast.Beats(fs) as beats:
        beats.add(trial._trial_id, now=not fs.has_heartbeat(trial._trial_id))
        yield


def _train_seeds(
    spec: StudySpec, number: int, family: str, model_args: dict[str, Any], train_args: dict[str, Any],
    n: int, data: core.Dataset, dev: torch.device, on_epoch: Callable[[int, dict[str, Any]], bool],
) -> tuple[list[core.TrainResult], torch.nn.Module | None]:
    """Build and train the trial's model once per seed (reports from the first); the last model."""
    results: list[core.TrainResult] = []
    model = None
    for k in range(spec.seeds_per_trial):
        seed = trial_seed(spec, number, k)
        model = core.create_model(family, seed=seed, **model_args)
        exact = core.count_parameters(model)
        if exact != n:
            raise AssertionError(f"analytic count {n} != built model's {exact} for {family}")
        res = _train(model, data, spec, train_args, dev, seed, on_epoch if k == 0 else None)
        results.append(res)
        if res.status != "completed":
            break
    return results, model


def _train(
    model: torch.nn.Module, data: core.Dataset, spec: StudySpec, train_args: dict[str, Any],
    dev: torch.device, seed: int, on_epoch: Callable[[int, dict[str, Any]], bool] | None,
) -> core.TrainResult:
    """core.train_model, with the spec's bio rules and dendrite growth when it asks for them."""
    bio_config, bio_hook, growth = build_extras(train_args)
    hooks = []
    if bio_config is not None:
        model = core.BioConverter(bio_config)(model)
        hooks.append(bio_hook)
    common = dict(n_epochs=spec.n_epochs, lr=train_args["lr"], weight_decay=train_args["weight_decay"],
                  batch_size=spec.batch_size, device=dev, seed=seed, on_epoch=on_epoch,
                  optimizer=train_args["optimizer"], step_hooks=hooks)
    if growth is None:
        return core.train_model(model, data, **common)
    res = core.train_with_growth(model, data, growth=growth, max_params=spec.max_params, **common)
    # Growth hands back its best checkpoint: report that epoch's metrics as the result.
    best = max((h.get("best_epoch") or 0 for h in res.history), default=0)
    res.final_epoch = best or None  # type: ignore[attr-defined]
    return res


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


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str, state: str = "failed") -> TrialOutcome:
    log.warning("trial %s failed: %s", trial.number, reason)
    trial.set_user_attr("fail_reason", reason)
    study.tell(trial, state=TrialState.FAIL)
    return TrialOutcome(trial.number, state, reason=reason)


# -- in-process runs --------------------------------------------------------------------------
def run_study(
    spec: StudySpec,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    n_jobs: int = 1,
    show_progress: bool = True,
    *,
    device: str | None = None,
    data_dir: str | None = None,
) -> optuna.Study:
    """Run a whole study in this process (SQLite file ``./dendro.db`` by default).

    The same storage and name resume the study where it stopped. ``n_jobs`` > 1 runs that
    many trials at once in threads (useful on a GPU; on a CPU torch already uses the cores).
    """
    st = _storage(storage)
    name = study_name or spec.name or f"study-{int(time.time())}"
    study = create_study(spec, st, name, load_if_exists=True)
    study, spec = load_study(name, st)
    if study_state(study) == "stopped":
        set_study_state(study, "resume")
    store = ModelStore(st.engine) if isinstance(st, optuna.storages.RDBStorage) else None
    bar = _progress_bar(study, spec, show_progress)

    def loop() -> None:
        while True:
            trial = ask_trial(study, spec)
            if trial is None:
                return
            execute_trial(study, trial, spec, device=device, data_dir=data_dir, model_store=store,
                          worker=f"{os.uname().nodename}:{os.getpid()}")
            bar.update(study)

    try:
        if n_jobs <= 1:
            loop()
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(n_jobs) as pool:
                for f in [pool.submit(loop) for _ in range(n_jobs)]:
                    f.result()
    finally:
        bar.close()
    return study


class _progress_bar:
    """tqdm bar of finished trials with the best value in its postfix."""

    def __init__(self, study: optuna.Study, spec: StudySpec, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=spec.n_trials, desc=study.study_name, unit="trial")
            self.update(study)

    def update(self, study: optuna.Study) -> None:
        if self.bar is None:
            return
        c = progress(study)
        self.bar.n = c["finished"]
        post = {"infeasible": c["infeasible"], "failed": c["failed"]}
        if len(study.directions) == 1:
            try:
                post["best"] = round(study.best_value, 4)
            except ValueError:
                pass
        self.bar.set_postfix(post)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
