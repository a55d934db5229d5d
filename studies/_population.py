"""Population mode: ask trials lazily, train many of one family together, tell each as it ends."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

import core

from ._artifacts import ModelStore
from ._runner import (
    TrialOutcome,
    _fail,
    _mark_done_if_finished,
    _objective_values,
    _record_infeasible,
    _report_metric,
    _result_attrs,
    _set_budget_constraint,
    ask_trial,
    load_data,
    progress,
    trial_seed,
)
from ._space import suggest
from ._spec import ARCH_KEY, OBJECTIVES, StudySpec, count_point, split_params
from ._storage import rdb, study_lock

__all__ = ["execute_population", "population_supported"]

log = logging.getLogger(__name__)


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


class _Beats:
    """One thread beating for every trial in the population (not one thread per trial)."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self.storage = rdb(storage)
        self.ids: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        interval = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        self.thread = None
        if interval:
            self.thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
            self.thread.start()

    def _run(self, interval: float) -> None:
        while not self.stop.wait(interval):
            with self.lock:
                ids = list(self.ids)
            for tid in ids:
                with contextlib.suppress(Exception):
                    self.storage.record_heartbeat(tid)

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.ids.add(trial_id)
        if self.thread is not None:
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(trial_id)

    def remove(self, trial_id: int) -> None:
        with self.lock:
            self.ids.discard(trial_id)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


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
    beats = _Beats(study._storage)
    asked = 0

    def configs() -> Iterator[dict[str, Any]]:
        nonlocal asked
        while max_trials is None or asked < max_trials:
            if should_stop is not None and should_stop():
                return
            trial = ask_trial(study, spec)
            if trial is None:
                return
            asked += 1
            params = suggest(trial, spec.space)
            try:
                n = count_point(spec, params)
            except ValueError as exc:
                outcomes.append(_record_infeasible(study, trial, spec, None, f"the point builds no model: {exc}"))
                continue
            if spec.max_params is not None and n > spec.max_params:
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
            beats.add(trial._trial_id)
            yield {**model_args, "lr": train_args["lr"], "weight_decay": train_args["weight_decay"],
                   "seed": seed}

    def on_epoch(i: int, epoch: int, metrics: dict[str, Any]) -> bool:
        m = members[i]
        if len(spec.objectives) == 1:
            m.trial.report(_report_metric(spec, metrics), epoch)
            if m.trial.should_prune():
                m.stopped_by = "pruned"
                return True
        reason = should_stop() if should_stop is not None else False
        if reason:
            m.stopped_by = reason if isinstance(reason, str) else "the study was stopped"
            return True
        return False

    def on_result(i: int, result: core.TrainResult) -> None:
        m = members[i]
        beats.remove(m.trial._trial_id)
        outcomes.append(_finish(study, spec, m, result, dev, worker, model_store))

    try:
        core.train_population(
            spec.model, configs(), data, spec.n_epochs, batch_size=spec.batch_size, device=dev,
            seed=spec.seed, on_epoch=on_epoch, population_size=population_size, on_result=on_result,
            max_population=max_population,
        )
    finally:
        beats.close()
    return outcomes


def _finish(
    study: optuna.Study, spec: StudySpec, m: _Member, result: core.TrainResult,
    dev: torch.device, worker: str | None, model_store: ModelStore | None,
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
    with study_lock(study._storage, study.study_name):
        _mark_done_if_finished(study, spec, progress(study))
    return TrialOutcome(trial.number, "complete", values=values, n_params=n, attrs=attrs)
