"""Population mode: ask trials lazily, train many of one family together, tell each as it ends."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

import core

from . import _fast
from ._artifacts import ModelStore
from ._runner import (
    BudgetAwareSampler,
    TrialOutcome,
    _after_tell,
    _fail,
    _fast_storage,
    _objective_values,
    _record_infeasible,
    _report_metric,
    _result_attrs,
    _set_budget_constraint,
    ask_trials,
    load_data,
    trial_seed,
)
from ._space import suggest
from ._spec import ARCH_KEY, OBJECTIVES, StudySpec, count_point, split_params

__all__ = ["execute_population", "population_supported"]

log = logging.getLogger(__name__)

#: a burst of n asks (slots freed together) fits TPE about this many times, not n times
_BURST_FITS = 32
#: seconds within which the members' end-of-epoch checks share one should_stop answer
_STOP_POLL = 0.05


def population_supported(spec: StudySpec) -> str | None:
    """None if ``spec`` can run in population mode, else the reason it cannot."""
    if ARCH_KEY in spec.space:
        return "the architecture is searched (a population trains one family)"
    if spec.bio is not None or spec.growth is not None:
        return "bio rules and dendrite growth train one model at a time"
    if spec.seeds_per_trial != 1:
        return "seeds_per_trial > 1"
    if spec.optimizer != "adam" or "optimizer" in spec.space:
        return "the population trainer implements Adam only"
    batchable = getattr(core, "POPULATION_FAMILIES", ())
    if spec.model not in batchable:
        return f"family {spec.model!r} cannot be batched (batchable: {', '.join(batchable)})"
    return None


@dataclass
class _Member:
    trial: optuna.Trial
    params: dict[str, Any]
    n_params: int
    model_args: dict[str, Any]
    seed: int
    stopped_by: str | None = None


def execute_population(
    study: optuna.Study,
    spec: StudySpec,
    *,
    population_size: int | str = "auto",
    device: str | torch.device | None = None,
    data_dir: str | None = None,
    model_store: ModelStore | None = None,
    should_stop: Callable[[], bool | str] | None = None,
    worker: str | None = None,
    max_trials: int | None = None,
    max_population: int | None = None,
) -> list[TrialOutcome]:
    """Run trials of ``study`` K at a time with :func:`core.train_population`.

    Trials are asked only when a slot frees (continuous batching), so the study never gets
    more than ``n_trials`` and a stop takes effect at once. Each member is reported,
    pruned and told on its own, exactly as :func:`execute_trial` would.
    """
    why = population_supported(spec)
    if why is not None:
        raise ValueError(f"population mode is not possible for this study: {why}")
    dev = core.resolve_device(device)
    data = load_data(spec, data_dir, flatten=True)
    members: list[_Member] = []
    outcomes: list[TrialOutcome] = []
    fs = _fast_storage(study)
    beats = _fast.Beats(study._storage)
    base = study.sampler.base if isinstance(study.sampler, BudgetAwareSampler) else study.sampler
    tpe = base if isinstance(base, _fast.FastTPESampler) else None
    queue: deque[optuna.Trial] = deque()  # asked, not yet drawn
    started: list[int] = []  # drawn since the last write of their params
    ended = 0  # members ended since the last ask: the slots the next ask fills
    asked = 0

    def batch() -> int:
        """How many trials to ask: the slots that freed (all of them at first, for an int K)."""
        nonlocal ended
        n = ended if asked else (population_size if isinstance(population_size, int) else 1)
        ended = 0
        n = max(1, n)
        return n if max_trials is None else min(n, max_trials - asked)

    def configs() -> Iterator[dict[str, Any]]:
        nonlocal asked
        while True:
            if not queue:
                if max_trials is not None and asked >= max_trials:
                    return
                if should_stop is not None and should_stop():
                    return
                # Without a FastStorage this asks one trial at a time, as ask_trial does.
                got = ask_trials(study, spec, batch() if fs is not None else 1)
                if not got:
                    return
                if tpe is not None:  # a burst of asks shares its TPE fits (one per 32 draws)
                    tpe.max_stale_lies = len(got) // _BURST_FITS
                asked += len(got)
                if fs is not None:  # created with their heartbeat rows; beaten while they wait
                    for t in got:
                        beats.add(t._trial_id, now=False)
                queue.extend(got)
            # A trial asked is drawn and trained even if a stop came meanwhile: its first
            # epoch stops it, failed and re-queued like any member a stop cuts short.
            trial = queue.popleft()
            params = suggest(trial, spec.space)
            try:
                n = count_point(spec, params)
            except ValueError as exc:
                beats.remove(trial._trial_id)
                outcomes.append(_record_infeasible(study, trial, spec, None, f"the point builds no model: {exc}"))
                continue
            if spec.max_params is not None and n > spec.max_params:
                beats.remove(trial._trial_id)
                outcomes.append(_record_infeasible(
                    study, trial, spec, n, f"{n} parameters exceed max_params={spec.max_params}"))
                continue
            _, model_args, train_args = split_params(spec, params)
            trial.set_user_attr("n_params", n)
            _set_budget_constraint(trial, spec, n)
            trial.set_user_attr("family", spec.model)
            if worker:
                trial.set_user_attr("worker", worker)
            seed = trial_seed(spec, trial.number)
            members.append(_Member(trial, params, n, model_args, seed))
            if fs is None:
                beats.add(trial._trial_id)
            started.append(trial._trial_id)
            yield {**model_args, "lr": train_args["lr"], "weight_decay": train_args["weight_decay"],
                   "seed": seed}

    asked_stop: list[Any] = [0.0, False]  # when should_stop was last asked, and its answer

    def stop_now() -> bool | str:
        # Members end their epochs together: ask once per epoch of the population (the
        # service's should_stop reads the database), not once per member.
        if should_stop is None:
            return False
        now = time.monotonic()
        if now - asked_stop[0] > _STOP_POLL:
            asked_stop[:] = [now, should_stop()]
        return asked_stop[1]

    def on_epoch(i: int, epoch: int, metrics: dict[str, Any]) -> bool:
        if fs is not None and started:
            # The members drawn since the last epoch start training: their params and
            # attributes, and the tells held back, in one write.
            fs.flush(started)
            started.clear()
        m = members[i]
        if len(spec.objectives) == 1:
            m.trial.report(_report_metric(spec, metrics), epoch)
            if m.trial.should_prune():
                m.stopped_by = "pruned"
                return True
        reason = stop_now()
        if reason:
            m.stopped_by = reason if isinstance(reason, str) else "the study was stopped"
            return True
        return False

    def on_result(i: int, result: core.TrainResult) -> None:
        nonlocal ended
        m = members[i]
        beats.remove(m.trial._trial_id)
        ended += 1
        outcomes.append(_finish(study, spec, m, result, dev, worker, model_store, fs is None))

    # Tells are held back and written together: at the next ask, the next epoch, or the end.
    deferring = fs.deferring() if fs is not None else contextlib.nullcontext()
    try:
        with deferring:
            core.train_population(
                spec.model, configs(), data, spec.n_epochs, batch_size=spec.batch_size, device=dev,
                seed=spec.seed, on_epoch=on_epoch, population_size=population_size, on_result=on_result,
                max_population=max_population,
            )
    finally:
        beats.close()
        if tpe is not None:
            tpe.max_stale_lies = 0
    if fs is not None:
        _after_tell(study, spec)
    return outcomes


def _finish(
    study: optuna.Study, spec: StudySpec, m: _Member, result: core.TrainResult,
    dev: torch.device, worker: str | None, model_store: ModelStore | None, check_done: bool = True,
) -> TrialOutcome:
    trial, n = m.trial, m.n_params
    if result.status == "failed":
        return _fail(study, trial, result.error or "failed in the population")
    attrs = _result_attrs([result], dev, worker)
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    if result.status == "diverged":
        return _fail(study, trial, result.error or "non-finite loss")
    if m.stopped_by == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        return TrialOutcome(trial.number, "pruned", n_params=n, attrs=attrs)
    if m.stopped_by:
        out = _fail(study, trial, f"stopped: {m.stopped_by}", state="stopped")
        study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
        return out
    values = _objective_values(
        spec, {"val_accuracy": result.val_accuracy, "val_loss": result.val_loss}, n)
    if not all(math.isfinite(v) for v in values):
        return _fail(study, trial, f"non-finite objective {values}")
    study.tell(trial, values if len(values) > 1 else values[0])
    state_dict = getattr(result, "state_dict", None)
    if model_store is not None and spec.keep_models > 0 and state_dict:
        try:
            model_store.keep(
                study.study_name, trial.number, values[0],
                {"family": spec.model, "model_args": m.model_args, "params": m.params,
                 "seed": m.seed, "n_params": n},
                state_dict, spec.keep_models,
                maximize=OBJECTIVES[spec.objectives[0]] == "maximize",
            )
        except Exception as exc:  # noqa: BLE001 - the trial is told; weights are a bonus
            log.warning("could not keep the weights of trial %s: %s", trial.number, exc)
    if check_done:
        _after_tell(study, spec)
    return TrialOutcome(trial.number, "complete", values=values, n_params=n, attrs=attrs)
