"""Studies in an Optuna storage: create, ask under the budget, train one trial, tell, run."""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

import core

from . import _fast, _lease
from ._artifacts import ModelStore
from ._keys import UID_ATTR
from ._lifecycle import (  # noqa: F401 - old names
    _BY_OPTUNA,
    TRIAL_STATES,
    TrialOutcome,
    TrialRun,
    _final,
    _mean,
    _objective_values,
    _report_metric,
    _result_attrs,
    is_infeasible,
    trial_seed,
    trial_state,
)
from ._space import grid_of
from ._spec import StudySpec, build_extras, count_point
from ._storage import default_storage_url, open_storage, rdb, study_lock
from .exceptions import StateError, StudyExistsError, StudyNotFoundError

__all__ = [
    "SPEC_ATTR",
    "STATE_ATTR",
    "ERROR_ATTR",
    "UID_ATTR",
    "STATES",
    "TRIAL_STATES",
    "trial_state",
    "set_study_error",
    "create_study",
    "load_study",
    "study_spec",
    "study_state",
    "state_of",
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
#: the reason a study is in state ``error`` (no worker can run it)
ERROR_ATTR = "dendro.error"
STATES = ("queued", "running", "stopped", "done", "error")
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
        if isinstance(base, _fast.FastTPESampler):
            base.feasible = self._fits_whole

    def fits(self, params: dict[str, Any]) -> bool:
        try:
            return count_point(self.spec, params) <= int(self.spec.max_params or 0)
        except ValueError:  # a point that builds no model is as bad as one over budget
            return False

    def _fits_whole(self, params: dict[str, Any]) -> bool:
        """``fits`` for a whole point; a partial one (a grouped space) is left to the redraws."""
        return self.fits(params) if params.keys() >= self._space.keys() else True

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
        return _fast.FastMedianPruner(n_startup_trials=5, n_warmup_steps=max(1, spec.n_epochs // 4))
    if p in ("hyperband", "successive_halving"):
        # Synchronous rungs: a population's members are compared with each other at each
        # rung, not only with trials that finished before them (studies._rungs).
        from ._rungs import RungPruner

        return RungPruner.for_spec(spec)
    return optuna.pruners.NopPruner()


# -- study lifecycle --------------------------------------------------------------------------
def _storage(storage: str | optuna.storages.BaseStorage | None) -> optuna.storages.BaseStorage:
    if storage is None:
        storage = default_storage_url()
    return open_storage(storage, batching=True) if isinstance(storage, str) else storage


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
    study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
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


def state_of(attrs: dict[str, Any]) -> str:
    """A study's state from its user attributes (a study made before states were kept runs)."""
    return str(attrs.get(STATE_ATTR, "running"))


def study_state(study: optuna.Study) -> str:
    return state_of(study._storage.get_study_user_attrs(study._study_id))


def set_study_error(study: optuna.Study, reason: str) -> None:
    """Put a study that no worker can run (its spec or data do not load) in state ``error``,
    with ``reason``; workers skip it from then on."""
    study.set_user_attr(ERROR_ATTR, reason)
    study.set_user_attr(STATE_ATTR, "error")


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


def _kind(t: optuna.trial.FrozenTrial) -> str:
    """What ``progress`` counts a trial as."""
    return trial_state(t)


def _counts(kinds: dict[str, int]) -> dict[str, Any]:
    c = {k: int(kinds.get(k, 0)) for k in TRIAL_STATES}
    c["finished"] = c["complete"] + c["pruned"]
    c["total"] = sum(int(v) for v in kinds.values())
    return c


def progress(study: optuna.Study) -> dict[str, Any]:
    """Counts of trials by state; ``finished`` (complete + pruned, trained) is what n_trials counts."""
    v = _fast.view(study, _kind)
    v.refresh()  # a FastStorage's is incremental: finished trials are counted once, when first read
    return _counts(v.kinds())


def _mark_done_if_finished(
    study: optuna.Study, spec: StudySpec, counts: dict[str, Any], attrs: dict[str, Any] | None = None
) -> bool:
    """Mark the study done when it has its trials or its time is up. ``attrs``: the study's
    user attributes when the caller has just read them."""
    def read() -> dict[str, Any]:  # the attributes, read once and only when needed
        nonlocal attrs
        if attrs is None:
            attrs = study.user_attrs
        return attrs

    if not _over(spec, counts, read):
        return False
    attrs = read()
    stored = attrs.get(SPEC_ATTR)
    if isinstance(stored, dict) and (stored.get("n_trials"), stored.get("timeout")) != (spec.n_trials, spec.timeout):
        # extended while this process ran it with the spec it had read: the stored one decides
        latest = spec.model_copy(update={"n_trials": stored.get("n_trials", spec.n_trials),
                                         "timeout": stored.get("timeout")})
        if not _over(latest, counts, lambda: attrs):
            return False
    if state_of(attrs) == "running":
        study.set_user_attr(STATE_ATTR, "done")
    return True


def _over(spec: StudySpec, counts: dict[str, Any], attrs: Callable[[], dict[str, Any]]) -> bool:
    """Whether the study has its trials or its time is up (``attrs``, the study's user
    attributes, are asked for only when it has a timeout)."""
    if counts["finished"] >= spec.n_trials:
        return True
    if spec.timeout is None:
        return False
    return time.time() - float(attrs().get(STARTED_ATTR, time.time())) > spec.timeout


def _batch_size(spec: StudySpec, counts: dict[str, Any], n: int, live: int) -> int:
    """How many of the ``n`` trials asked for to create: never more than the trials left, and
    for a batch never more than a fair share of them among ``live`` workers (0 or less: none)."""
    k = min(n, spec.n_trials - counts["finished"] - counts["running"])
    if k > 1:
        k = min(k, math.ceil((spec.n_trials - counts["finished"]) / live))
    return k


def _fast_storage(study: optuna.Study) -> _fast.FastStorage | _fast.PlainView:
    """The study's FastStorage, put under it on first use where its sampler and pruner allow;
    else a PlainView of its storage (the same interface: ``_fast.view``).

    The sampler must read the study only through ``get_trials`` and write nothing but the
    asked trial's own attributes: TPE and random, budget-aware or not. (TPE's constant liar,
    Optuna 5's default, writes the trial's relative params as system attributes; they reach
    the database with its params.) Grid, CMA-ES, QMC, NSGA-II and GP keep state of their own
    in the storage: those studies take Optuna's plain path. The pruners must write nothing
    either: median, percentile, none and dendro's rung pruner (successive halving, Hyperband).
    """
    s = study.sampler
    base = s.base if isinstance(s, BudgetAwareSampler) else s
    if type(base) in (optuna.samplers.TPESampler, _fast.FastTPESampler, optuna.samplers.RandomSampler):
        _fast.attach(study, classify=_kind)  # once; None where the storage or pruner do not allow
    return _fast.view(study, _kind)


def draws_at_start(study: optuna.Study) -> bool:
    """Whether a trial this study asks gets its point only when it starts (the worker's
    batching storage: TPE and random), so that an asked trial failed before it started holds
    no point. Samplers on Optuna's plain path may give it one at the ask (a grid id)."""
    return _fast_storage(study).batching


#: (storage id, study id) -> when this process last reaped the study's stale leases
_REAPED: dict[tuple[int, int], float] = {}


def _reap(study: optuna.Study, lease: _lease.Lease | None) -> bool:
    """Fail and re-queue the trials of stale leases (under the study lock); True if any."""
    if lease is None:
        return False
    key = (id(rdb(study._storage)), study._study_id)
    now = time.monotonic()
    if now - _REAPED.get(key, -math.inf) < lease.interval:
        return False
    _REAPED[key] = now
    return bool(_lease.reap_stale(study._storage, study._study_id, lease.grace))


def ask_trial(study: optuna.Study, spec: StudySpec) -> optuna.Trial | None:
    """Ask the next trial, or None when the study is not running or has all its trials.

    Runs under the study lock, so concurrent workers never take more than ``n_trials``.
    Trials of dead workers (stale leases) are failed first and their points re-queued.
    """
    trials = ask_trials(study, spec, 1)
    return trials[0] if trials else None


def ask_trials(study: optuna.Study, spec: StudySpec, n: int) -> list[optuna.Trial]:
    """Ask up to ``n`` trials at once (fewer, or none, near the end of the study).

    The trials are tied to this process's lease (``studies._lease``). With a FastStorage
    (see :func:`_fast_storage`) the checks and the trials' creation are one transaction for
    the batch, and each trial is sampled when its caller draws its params. A batch is never
    more than the trials left nor more than a fair share of them: ``ceil((n_trials -
    finished) / live workers of the study)``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    lease = _lease.lease_for(study._storage)
    if lease is not None:
        lease.update(study_name=study.study_name)
    fs = _fast_storage(study)
    if not isinstance(fs, _fast.FastStorage):  # Optuna's own ask, one trial at a time
        out = []
        for _ in range(n):
            trial = _ask_plain(study, spec, lease)
            if trial is None:
                break
            out.append(trial)
        return out
    fs.lease_id = lease.id if lease is not None else None
    fs.flush()  # tells this worker holds back reach the database before anyone counts
    # Read what other workers finished before taking the lock, so that the read under it
    # is only what changed in the meantime: loading finished trials is most of a read, and
    # every worker loads every other worker's trials once. Under the lock, asks are serial;
    # out of it, these loads run side by side (bench/bench_scale.py's lock columns).
    fs.refresh()
    # the fair-share bound's worker count, read outside the lock too (a count a moment old
    # is as good: workers come and go at heartbeat pace)
    live = max(1, _lease.live_workers(fs._backend.engine, study.study_name, lease.grace)) \
        if n > 1 and lease is not None else 1
    if _fast.row_lock_serialises(study._storage):
        asked = _ask_row_locked(study, spec, fs, lease, n, live)
        if asked is not None:
            return asked
    with study_lock(study._storage, study.study_name):
        counts, attrs = _counts_now(fs)
        if _reap(study, lease):
            counts, attrs = _counts_now(fs)
        if state_of(attrs) != "running":
            return []
        if _mark_done_if_finished(study, spec, counts, attrs):
            return []
        n = _batch_size(spec, counts, n, live)
        if n <= 0:
            return []
        if counts["waiting"]:
            fs.refresh()  # re-queued points (rare): the asks below pop them from the view
        if n > counts["waiting"]:
            fs.reserve(n - counts["waiting"])
        with fs.quiet():
            return [study.ask() for _ in range(n)]


def _ask_row_locked(study: optuna.Study, spec: StudySpec, fs: _fast.FastStorage, lease: _lease.Lease | None,
                    n: int, live: int) -> list[optuna.Trial] | None:
    """The asks of :func:`ask_trials` where the study row's lock serialises every writer that
    numbers its trials (PostgreSQL): the counts, the checks and the creation of the trials are
    one transaction under that lock, which is held for those few statements only. None when
    re-queued points wait: they take the study lock's path (popping them is a second write).

    Stale leases are reaped first, outside any lock: each of their trials is failed and its
    point queued in one transaction, under the row lock, only if it is still RUNNING.
    """
    _reap(study, lease)
    seen: dict[str, Any] = {}

    def decide(by_state: Any, infeasible: Any, attrs: dict[str, Any]) -> int:
        counts, attrs = _counts_of(by_state, infeasible, attrs)
        seen.update(counts=counts, attrs=attrs)
        if state_of(attrs) != "running" or counts["waiting"] \
                or _over(spec, counts, lambda: attrs):
            return 0
        return _batch_size(spec, counts, n, live)

    ids = fs.reserve(n, decide)
    if not ids:
        counts, attrs = seen["counts"], seen["attrs"]
        if state_of(attrs) != "running":
            return []
        if counts["waiting"] and counts["finished"] < spec.n_trials:
            return None
        _mark_done_if_finished(study, spec, counts, attrs)
        return []
    with fs.quiet():
        return [study.ask() for _ in ids]


def _counts_now(fs: _fast.FastStorage) -> tuple[dict[str, Any], dict[str, Any]]:
    """The study's counts (as :func:`progress` gives them) and user attributes, from the
    database as it is now, without loading trials: what the checks under the lock need."""
    return _counts_of(*fs.count_states("infeasible"))


def _counts_of(by_state: Any, infeasible: Any, attrs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    kinds = {name: by_state[state] - infeasible[state] for state, name in _BY_OPTUNA.items()}
    kinds["infeasible"] = sum(infeasible.values())
    return _counts(kinds), attrs


def _ask_plain(study: optuna.Study, spec: StudySpec, lease: _lease.Lease | None) -> optuna.Trial | None:
    with study_lock(study._storage, study.study_name):
        _reap(study, lease)
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
        trial = study.ask()
        if lease is not None:
            # Its own write, under the study lock: a reaper never sees the trial without it
            # unless this process died in between (then it is stale after the grace period).
            study._storage.set_trial_system_attr(trial._trial_id, _lease.LEASE_KEY, lease.id)
        return trial


def _after_tell(study: optuna.Study, spec: StudySpec) -> None:
    """Mark the study done if that tell was its last trial.

    With a FastStorage the lock and a read are taken only when the trials it knows of could
    add up to ``n_trials`` (or the study has a timeout); a study that another worker's tell
    completes unseen is marked done by the next ask, which always reads.
    """
    v = _fast.view(study, _kind)
    if v.batching:  # its counts cost no read
        c = _counts(v.kinds())
        if spec.timeout is None and c["finished"] + c["running"] + c["waiting"] < spec.n_trials:
            return
    with study_lock(study._storage, study.study_name):
        if isinstance(v, _fast.FastStorage):
            # the counts and attributes as the database has them now, no trial loaded: at a
            # study's end every worker comes here, one after another, and a refresh of the
            # view would load every trial it has not seen while the others wait
            _mark_done_if_finished(study, spec, *_counts_now(v))
            return
        # the plain path: _mark_done_if_finished reads the attributes only when the study is
        # over or has a timeout
        v.refresh()
        _mark_done_if_finished(study, spec, _counts(v.kinds()), None)


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


def budget_gate(
    study: optuna.Study, trial: optuna.Trial, spec: StudySpec
) -> tuple[dict[str, Any], int] | TrialOutcome:
    """Draw the trial's point and count it exactly, before anything is built.

    Returns ``(params, n_params)`` for a point that may be trained. A point over the budget,
    or one that builds no model, is told as infeasible (PRUNED, never trained) and its
    outcome returned instead.
    """
    run = TrialRun(study, trial, spec)
    if not run.gate():
        assert run.outcome is not None
        return run.outcome
    return run.params, int(run.n_params or 0)


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
    is failed and its point queued again. The steps are :class:`studies._lifecycle.TrialRun`'s,
    shared with the population executor.
    """
    run = TrialRun(study, trial, spec, worker=worker)
    if not run.gate():
        assert run.outcome is not None
        return run.outcome
    trial.set_user_attr("population_size", 1)  # trained alone (written with its start)
    run.start()
    dev = core.resolve_device(device)
    data = load_data(spec, data_dir, flatten=core.get_family(run.family).input_kind == "flat")
    run.normalization = getattr(data, "normalization", None)

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> bool:
        return run.epoch(epoch, metrics, should_stop)

    results: list[core.TrainResult] = []
    model = None
    try:
        results, model = _train_seeds(spec, trial.number, run.family, run.model_args, run.train_args,
                                      int(run.n_params or 0), data, dev, on_epoch)
    except torch.cuda.OutOfMemoryError as exc:
        return run.fail(f"out of memory on {dev}: {str(exc).splitlines()[0]}")
    except Exception as exc:  # noqa: BLE001 - a broken trial must not take the worker down
        log.exception("trial %s raised", trial.number)
        return run.fail(f"{exc.__class__.__name__}: {exc}")
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out = run.finish(results, dev, model.state_dict() if model is not None else None, model_store)
    if out.state == "complete":
        _after_tell(study, spec)
    return out


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
    # The bio rules and dropout draw from torch's global generator: seed it from the trial, so
    # that a trial repeats exactly and draws what its population twin draws.
    with core.seeded(seed, dev):
        if bio_config is not None:
            model = core.BioConverter(bio_config)(model)
            hooks.append(bio_hook)
        return _train_with(model, data, spec, train_args, dev, seed, on_epoch, hooks, growth)


def _train_with(
    model: torch.nn.Module, data: core.Dataset, spec: StudySpec, train_args: dict[str, Any],
    dev: torch.device, seed: int, on_epoch: Callable[[int, dict[str, Any]], bool] | None,
    hooks: list[Any], growth: Any,
) -> core.TrainResult:
    common = dict(n_epochs=spec.n_epochs, lr=train_args["lr"], weight_decay=train_args["weight_decay"],
                  batch_size=train_args.get("batch_size", spec.batch_size), device=dev, seed=seed,
                  on_epoch=on_epoch, optimizer=train_args["optimizer"], step_hooks=hooks)
    if growth is None:
        return core.train_model(model, data, **common, **recipe_args(train_args))
    res = core.train_with_growth(model, data, growth=growth, max_params=spec.max_params, **common)
    # Growth hands back its best checkpoint: report that epoch's metrics as the result.
    best = max((h.get("best_epoch") or 0 for h in res.history), default=0)
    res.final_epoch = best or None  # type: ignore[attr-defined]
    return res


#: the recipe keys of core.train_model (and of a population member's config) with their defaults
_RECIPE_DEFAULTS: dict[str, Any] = {"lr_schedule": "constant", "warmup_epochs": None,
                                    "label_smoothing": 0.0, "augment": "none"}


def recipe_args(train_args: dict[str, Any]) -> dict[str, Any]:
    """The trial's training recipe beyond lr/weight decay, as core.train_model's keywords."""
    return {k: train_args.get(k, d) for k, d in _RECIPE_DEFAULTS.items()}


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
    population: int | str | None = None,
) -> optuna.Study:
    """Run a whole study in this process (SQLite file ``./dendro.db`` by default).

    The same storage and name resume the study where it stopped. ``n_jobs`` > 1 runs that
    many trials at once in threads (useful on a GPU; on a CPU torch already uses the cores).
    ``population`` (an integer K or ``"auto"``) trains K trials at once, as ``dendro worker
    --population`` does, when the study can (:func:`studies.population_supported`); a study
    that cannot logs why and runs one trial at a time.
    """
    st = _storage(storage)
    name = study_name or spec.name or f"study-{int(time.time())}"
    study = create_study(spec, st, name, load_if_exists=True)
    study, spec = load_study(name, st)
    if study_state(study) == "stopped":
        set_study_state(study, "resume")
    store = ModelStore(rdb(st).engine) if isinstance(rdb(st), optuna.storages.RDBStorage) else None
    bar = _progress_bar(study, spec, show_progress)

    if population is not None:
        from ._population import execute_population, population_supported

        why = population_supported(spec)
        if why is None:
            try:
                while study_state(study) != "done" and execute_population(
                        study, spec, population_size=population, device=device, data_dir=data_dir,
                        model_store=store, worker=f"{os.uname().nodename}:{os.getpid()}"):
                    bar.update(study)
            finally:
                bar.close()
            return study
        log.info("study %s trains one trial at a time: %s", name, why)

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
