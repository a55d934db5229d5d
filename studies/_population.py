"""Population mode: train many trials of one family together, each through the one trial lifecycle."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import torch

import core

from . import _fast, _lease, _optuna_private
from ._artifacts import ModelStore, Shortlist
from ._lifecycle import TrialOutcome, TrialRun
from ._rungs import RungPruner
from ._runner import (
    BudgetAwareSampler,
    _after_tell,
    _counts,
    _fast_storage,
    _kind,
    ask_trials,
    load_data,
    recipe_args,
)
from ._spec import ARCH_KEY, StudySpec

__all__ = ["execute_population", "population_supported", "fair_share"]

log = logging.getLogger(__name__)

#: the first asks of a population of size "auto" (unknown here) take this many trials, then
#: twice as many each, until the trainer has its K: a few transactions, not K
_FIRST_CHUNK = 8
#: seconds a held-back tell may wait for the next ask before it is written anyway
_FLUSH_EVERY = 1.0
#: seconds within which the members' end-of-epoch checks share one should_stop answer
_STOP_POLL = 0.05


def population_supported(spec: StudySpec) -> str | None:
    """None if ``spec`` can run in population mode, else the reason it cannot.

    Whether a family stacks is its registry entry's ``population`` ("mlp": dendritic MLPs,
    :func:`core.train_population`; "recurrent": DIRU/LSTM/GRU,
    :func:`core.train_recurrent_population`).
    """
    if ARCH_KEY in spec.space:
        return "the architecture is searched (a population trains one family)"
    if spec.growth is not None:
        return "dendrite growth changes a model's shape while it trains: one model at a time"
    if spec.seeds_per_trial != 1:
        return "seeds_per_trial > 1"
    if spec.optimizer != "adam" or "optimizer" in spec.space:
        return "the population trainers implement Adam only"
    kind = core.get_family(spec.model).population
    if kind is None:
        batchable = ", ".join((*core.POPULATION_FAMILIES, *core.RECURRENT_POPULATION_FAMILIES))
        return f"family {spec.model!r} cannot be batched (batchable: {batchable})"
    if spec.bio is not None:
        if kind == "mlp" and not core.bio_stackable(spec.model):
            return (f"family {spec.model!r} has hidden Linear layers; an MLP population stacks bio "
                    "rules on the readout alone")
    if kind == "recurrent":
        recipe = [k for k in (*_RECIPE, "batch_size") if k in spec.space]
        recipe += [k for k, d in _RECIPE.items() if getattr(spec, k) != d]
        if recipe:
            return f"the recurrent population trainer has no {', '.join(sorted(set(recipe)))}"
    return None


#: recipe fields and their defaults (the recurrent population trainer has none of them)
_RECIPE = {"lr_schedule": "constant", "warmup_epochs": None, "label_smoothing": 0.0, "augment": "none"}


def fair_share(study: optuna.Study, spec: StudySpec) -> int:
    """This process's fair share of the study's remaining trials: ``ceil((n_trials - finished)
    / live workers of the study)`` (at least 1). A population is never larger."""
    lease = _lease.lease_for(study._storage)
    v = _fast.view(study, _kind)
    v.refresh()
    finished = _counts(v.kinds())["finished"]
    remaining = max(1, spec.n_trials - finished)
    if lease is None:
        return remaining
    lease.beat(study_name=study.study_name)  # counted among the study's workers from now on
    live = max(1, _lease.live_workers(lease.engine, study.study_name, lease.grace))
    return max(1, math.ceil(remaining / live))


def auto_cap(sampler: optuna.samplers.BaseSampler, n_trials: int, limit: int) -> int:
    """The largest population of "auto" size for a study of ``n_trials`` under ``sampler``.

    TPE proposes from finished trials only, and only once its ``n_startup_trials`` random
    trials have finished. In a population of K, trial k is asked when about k - K + 1 trials
    have finished, so it is proposed from results only if k >= startup + K - 1: the study gets
    n_trials - startup - K + 1 informed proposals where one trial at a time gets
    n_trials - startup. "auto" keeps at least half of them, K <= (n_trials - startup) // 2 + 1;
    a study no longer than the start-up is random search, all of it at once.
    """
    if isinstance(sampler, optuna.samplers.TPESampler):
        startup = _optuna_private.tpe_startup_trials(sampler)
        k = n_trials if n_trials <= startup else (n_trials - startup) // 2 + 1
        return max(1, min(limit, k))
    return max(1, limit)


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

    Trials are asked in batches, each in one transaction with its points drawn from one
    sampler fit and written in one more: first enough for the trainer to start (K for an
    integer K; 8, 16, 32, ... for "auto"), then, as members end, the slots they freed. K is
    never more than this worker's fair share of the study (:func:`fair_share`), so workers
    that start together split it. Each member goes through the trial lifecycle
    (:class:`studies._lifecycle.TrialRun`) exactly as :func:`execute_trial`'s one model does.
    """
    why = population_supported(spec)
    if why is not None:
        raise ValueError(f"population mode is not possible for this study: {why}")
    dev = core.resolve_device(device)
    fam = core.get_family(spec.model)
    recurrent = fam.population == "recurrent"
    data = load_data(spec, data_dir, flatten=fam.input_kind == "flat")
    outcomes: list[TrialOutcome] = []
    fs = _fast_storage(study)
    base = study.sampler.base if isinstance(study.sampler, BudgetAwareSampler) else study.sampler
    tpe = base if isinstance(base, _fast.FastTPESampler) else None
    share = fair_share(study, spec)
    if max_trials is not None:
        share = max(1, min(share, max_trials))
    size: int | str = population_size
    if isinstance(size, int):
        size = max(1, min(size, share))
    else:
        max_population = auto_cap(base, spec.n_trials, max(1, min(max_population or share, share)))
    runs: list[TrialRun] = []  # in the order the trainer read them: its member index
    peaks: list[int] = []  # per member: the most members that trained beside it, itself included
    queue: deque[TrialRun] = deque()  # gated and written, not yet handed to the trainer
    state: dict[str, Any] = {"asked": 0, "ended": 0, "chunk": _FIRST_CHUNK, "training": False,
                             "flushed": time.monotonic(), "results": 0}

    def batch() -> int:
        if not fs.batching:
            return 1  # Optuna's plain path asks one at a time, as ask_trial does
        if not state["training"]:  # filling the first population: up to its K, no more
            n = size if isinstance(size, int) else state["chunk"]
            state["chunk"] *= 2
            n = max(1, min(n, share - len(runs) - len(queue)))
        else:
            n = max(1, state["ended"])
        state["ended"] = 0
        n = min(n, share)
        return n if max_trials is None else max(0, min(n, max_trials - state["asked"]))

    def fill() -> bool:
        """Ask a batch; gate, draw and write its trials. False when the study gave none."""
        n = batch()
        got = ask_trials(study, spec, n) if n > 0 else []
        if not got:
            return False
        state["asked"] += len(got)
        ready = []
        with tpe.one_fit(len(got)) if tpe is not None else contextlib.nullcontext():
            for trial in got:
                run = TrialRun(study, trial, spec, worker=worker)
                run.normalization = getattr(data, "normalization", None)
                if run.gate():
                    run.start(flush=False)
                    ready.append(run)
                else:
                    assert run.outcome is not None
                    outcomes.append(run.outcome)
        if ready:
            fs.flush([r.trial._trial_id for r in ready])  # params and attributes: one write
        queue.extend(ready)
        return True

    def configs() -> Iterator[dict[str, Any]]:
        while True:
            if not queue:
                if should_stop is not None and should_stop():
                    return
                if not fill():
                    return
                continue
            # A trial asked is trained even if a stop came meanwhile: its first epoch stops
            # it, failed and re-queued like any member a stop cuts short.
            run = queue.popleft()
            runs.append(run)
            peaks.append(1)
            if isinstance(study.pruner, RungPruner):
                study.pruner.join(run.number)
            config = {**run.model_args, "lr": run.train_args["lr"],
                      "weight_decay": run.train_args["weight_decay"], "seed": run.seed}
            config["bio"] = run.train_args.get("bio")
            if not recurrent:
                config.update(batch_size=run.train_args.get("batch_size", spec.batch_size),
                              **recipe_args(run.train_args))
            yield config

    asked_stop: list[Any] = [0.0, False]  # when should_stop was last asked, and its answer

    def stop_now() -> bool | str:
        # Members end their epochs together: ask once per epoch of the population (the
        # service's should_stop reads the database), not once per member.
        if should_stop is None:
            return False
        now = time.monotonic()
        if now - asked_stop[0] > _STOP_POLL:
            asked_stop[:] = [now, should_stop()]
        return asked_stop[1]  # type: ignore[no-any-return]

    def on_epoch(i: int, epoch: int, metrics: dict[str, Any]) -> bool:
        state["training"] = True
        peaks[i] = max(peaks[i], len(runs) - state["results"])
        return runs[i].epoch(epoch, metrics, stop_now)

    def on_settle(i: int) -> bool:
        # every member has reported this epoch: a rung's cohort is settled, its losers stop now
        run = runs[i]
        if isinstance(study.pruner, RungPruner) and run.stopped_by is None and study.pruner.doomed(run.number):
            run.stopped_by = "pruned"
            return True
        return False

    shortlist = Shortlist(spec.keep_models, spec.directions[0] == "maximize")

    def keep_weights(i: int, result: core.TrainResult) -> bool:
        # only a trial that may enter the kept few has its weights read back from the stack
        return runs[i].wants_weights([result], model_store, shortlist)

    def on_result(i: int, result: core.TrainResult) -> None:
        state["training"] = True
        state["ended"] += 1
        run = runs[i]
        if isinstance(study.pruner, RungPruner):
            study.pruner.leave(run.number)
        # the population it trained in: the most members that trained beside it in one epoch,
        # itself included (1 = trained alone); not the count left when it ended, which falls
        # to 1 for the last of several members that end at the same epoch
        run.trial.set_user_attr("population_size", peaks[i])
        state["results"] += 1
        out = run.finish([result], dev, getattr(result, "state_dict", None), model_store)
        outcomes.append(out)
        if not fs.batching and out.state == "complete":
            _after_tell(study, spec)
        elif fs.batching and time.monotonic() - state["flushed"] > _FLUSH_EVERY:
            state["flushed"] = time.monotonic()
            fs.flush()  # the held-back tells, when no ask came to write them for a while

    # Tells are held back and written together: at the next ask, the next epoch, or the end.
    try:
        with fs.deferring():
            common: dict[str, Any] = dict(
                batch_size=spec.batch_size, device=dev, seed=spec.seed, on_epoch=on_epoch,
                population_size=size, on_result=on_result, max_population=max_population,
                # asked of every member each epoch: only a rung pruner decides there
                on_settle=on_settle if isinstance(study.pruner, RungPruner) else None)
            if recurrent:
                core.train_recurrent_population(spec.model, configs(), data, spec.n_epochs, **common)
            else:
                core.train_population(spec.model, configs(), data, spec.n_epochs,
                                      precision=spec.precision, keep_weights=keep_weights, **common)
    finally:
        for run in list(queue):  # asked and written, never handed to the trainer (an error)
            run.fail("the population ended before it trained")
    if fs.batching:
        _after_tell(study, spec)
    return outcomes
