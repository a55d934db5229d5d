"""The honest final answer of a study: its top trials re-trained with fresh seeds, chosen on validation.

A search's best value is optimistic: it is the luckiest of many draws, seed included. To
finalize, the top ``top_n`` complete trials (by the first objective) are trained again with
``seeds`` new seeds for ``n_epochs`` epochs each, as one population where the family allows,
and the trial with the best mean validation metric is the answer. The test split is only
reported, never used to choose.

The request and the result are study user attributes, so every worker, the API, the page and
the dashboard read the same thing:

* :data:`FINALIZE_ATTR` (``dendro.finalize``): the request, ``{"state": "queued" | "running" |
  "done" | "error", "top_n", "seeds", "n_epochs", "requested_at", ...}``; a worker takes a
  queued one under the study lock (state ``running`` with its id and a beat time), so two
  workers never both run it; a running one whose beat is older than ``stale_after`` seconds
  (its worker died) may be taken again.
* :data:`FINAL_ATTR` (``dendro.final``): the last finished answer (state ``done``).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

import core

from ._spec import OBJECTIVES, build_extras, split_params
from ._storage import study_lock
from .exceptions import SpecError, StateError

if TYPE_CHECKING:
    import torch

    from ._spec import StudySpec

__all__ = [
    "FINALIZE_ATTR",
    "FINAL_ATTR",
    "request_finalize",
    "pending_finalize",
    "take_finalize",
    "run_finalize",
    "serve_finalize",
    "final_of",
]

log = logging.getLogger(__name__)

FINALIZE_ATTR = "dendro.finalize"
FINAL_ATTR = "dendro.final"
#: seconds without a beat after which a running finalize counts as abandoned
STALE_AFTER = 300.0
#: seconds between the beats a running finalize writes
_BEAT_EVERY = 10.0
#: arguments of core.train_model that a study sets per trial or in its spec (the recipe)
_RECIPE_SKIP = frozenset({"model", "data", "n_epochs", "lr", "weight_decay", "batch_size", "device", "seed",
                          "on_epoch", "optimizer", "step_hooks", "eval_test", "name"})


# -- request --------------------------------------------------------------------------------
def _attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's user attributes, read from the storage now (not a cached copy)."""
    return dict(study._storage.get_study_user_attrs(study._study_id))


def _metric(spec: StudySpec) -> tuple[str, int, bool]:
    """(metric name, index of the objective, maximize) that selection uses."""
    for i, o in enumerate(spec.objectives):
        if o != "n_params":
            name = "val_accuracy" if o == "val_accuracy" else "val_loss"
            return name, i, OBJECTIVES[o] == "maximize"
    raise AssertionError("a spec always has a metric objective")


def _candidates(study: optuna.Study, spec: StudySpec, top_n: int) -> list[FrozenTrial]:
    """The top ``top_n`` complete, feasible trials by the (first metric) objective."""
    _, i, maximize = _metric(spec)
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values is not None and not t.user_attrs.get("infeasible") and math.isfinite(t.values[i])]
    done.sort(key=lambda t: ((-t.values[i] if maximize else t.values[i]), t.number))
    return done[:top_n]


def request_finalize(
    study: optuna.Study, top_n: int = 3, seeds: int = 3, n_epochs: int | None = None, *,
    max_epochs: int | None = None,
) -> dict[str, Any]:
    """Store a finalize request on ``study`` for a worker to run; return it.

    ``n_epochs`` defaults to the spec's. A bad value is a :class:`SpecError` naming the field;
    a study without a complete trial, or with a finalize queued or running already, is a
    :class:`StateError`.
    """
    from . import study_spec

    spec = study_spec(study)
    n_epochs = spec.n_epochs if n_epochs is None else n_epochs
    for field, value, low in (("top_n", top_n, 1), ("seeds", seeds, 1), ("n_epochs", n_epochs, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise SpecError(field, f"must be an integer >= {low}, got {value!r}")
    if max_epochs is not None and n_epochs > max_epochs:
        raise SpecError("n_epochs", f"n_epochs={n_epochs} is over this server's limit of {max_epochs}")
    with study_lock(study._storage, study.study_name):
        current = _attrs(study).get(FINALIZE_ATTR)
        if isinstance(current, dict) and current.get("state") in ("queued", "running") and not _stale(current):
            raise StateError(f"study {study.study_name!r} has a finalize {current['state']} already "
                             f"(requested at {_when(current.get('requested_at'))}); wait for its result")
        if not _candidates(study, spec, 1):
            raise StateError(f"study {study.study_name!r} has no complete trial to finalize yet; "
                             "wait until one completes")
        request = {"state": "queued", "top_n": top_n, "seeds": seeds, "n_epochs": n_epochs,
                   "requested_at": time.time()}
        study.set_user_attr(FINALIZE_ATTR, request)
    return request


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(t))) if t else "?"


def _stale(request: dict[str, Any], stale_after: float = STALE_AFTER) -> bool:
    if request.get("state") != "running":
        return False
    return time.time() - float(request.get("beat_at") or request.get("taken_at") or 0.0) > stale_after


def pending_finalize(study: optuna.Study, stale_after: float = STALE_AFTER) -> bool:
    """Whether ``study`` has a queued finalize (or a running one whose worker went silent)."""
    r = _attrs(study).get(FINALIZE_ATTR)
    return isinstance(r, dict) and (r.get("state") == "queued" or _stale(r, stale_after))


def final_of(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """What a study shows as ``final``: a request in flight (or failed), else the last result."""
    request, final = attrs.get(FINALIZE_ATTR), attrs.get(FINAL_ATTR)
    if isinstance(request, dict) and request.get("state") in ("queued", "running", "error"):
        return request
    return final if isinstance(final, dict) else None


def take_finalize(study: optuna.Study, worker: str, stale_after: float = STALE_AFTER) -> dict[str, Any] | None:
    """Mark the study's pending finalize as running by ``worker`` (under the study lock); the
    request, or None if there is none to take (another worker was first)."""
    with study_lock(study._storage, study.study_name):
        r = _attrs(study).get(FINALIZE_ATTR)
        if not isinstance(r, dict) or not (r.get("state") == "queued" or _stale(r, stale_after)):
            return None
        now = time.time()
        if r.get("state") == "running":
            log.warning("study %s: the finalize of worker %s went silent; taking it over",
                        study.study_name, r.get("worker"))
        r = {**r, "state": "running", "worker": worker, "taken_at": now, "beat_at": now}
        study.set_user_attr(FINALIZE_ATTR, r)
        return r


# -- run -------------------------------------------------------------------------------------
def _seed(spec: StudySpec, number: int, k: int) -> int:
    # Fresh seeds, apart from the search's own (studies._lifecycle.trial_seed): the point of
    # finalizing is to see the trial again with luck it was not selected for.
    return (spec.seed * 7_919 + 500_009 + number * 1_009 + k) % (2**31 - 1)


def _final_metrics(r: core.TrainResult) -> dict[str, Any]:
    return r.history[-1] if r.history else {}


def _recipe(spec: StudySpec, train_args: dict[str, Any]) -> dict[str, Any]:
    """The training settings of ``core.train_model`` beyond lr and weight decay (schedule,
    label smoothing, augmentation, ...) that the trial or its spec set."""
    out = {}
    for name in inspect.signature(core.train_model).parameters:
        if name in _RECIPE_SKIP:
            continue
        if name in train_args:
            out[name] = train_args[name]
        elif name in type(spec).model_fields:
            out[name] = getattr(spec, name)
    return out


def _recipe_changes(spec: StudySpec, train_args: dict[str, Any]) -> dict[str, Any]:
    """The recipe settings that differ from train_model's defaults, and a batch size of the
    trial's own: what a population member's config must carry to train as the trial did."""
    params = inspect.signature(core.train_model).parameters
    out = {k: v for k, v in _recipe(spec, train_args).items() if v != params[k].default}
    batch = int(train_args.get("batch_size", spec.batch_size))
    if batch != spec.batch_size:
        out["batch_size"] = batch
    return out


def _train_one(spec: StudySpec, family: str, model_args: dict[str, Any], train_args: dict[str, Any],
               data: core.Dataset, dev: torch.device, seed: int, n_epochs: int,
               beat: Callable[[], None]) -> core.TrainResult:
    model = core.create_model(family, seed=seed, **model_args)
    bio_config, bio_hook, growth = build_extras(train_args)
    hooks = []
    if bio_config is not None:
        model = core.BioConverter(bio_config)(model)
        hooks.append(bio_hook)

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> bool:
        beat()
        return False

    common = dict(n_epochs=n_epochs, lr=train_args["lr"], weight_decay=train_args["weight_decay"],
                  batch_size=int(train_args.get("batch_size", spec.batch_size)), device=dev, seed=seed,
                  on_epoch=on_epoch, optimizer=train_args.get("optimizer", spec.optimizer), step_hooks=hooks)
    if growth is not None:
        res = core.train_with_growth(model, data, growth=growth, max_params=spec.max_params, **common)
        best = max((h.get("best_epoch") or 0 for h in res.history), default=0)
        if best:  # growth hands back its best checkpoint: report that epoch
            res.history = res.history[:best]
        return res
    return core.train_model(model, data, **common, **_recipe(spec, train_args))


def _summary(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return float(statistics.fmean(vals)), (float(statistics.stdev(vals)) if len(vals) > 1 else 0.0)


def run_finalize(
    study: optuna.Study, spec: StudySpec | None = None, *, device: str | torch.device | None = None,
    data_dir: str | None = None, worker: str | None = None, request: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the study's finalize request and store the answer as :data:`FINAL_ATTR`; return it.

    ``request`` defaults to the one stored on the study (taken here if it is still queued). The
    top trials are re-trained in one population when ``studies.population_supported(spec)`` is
    None and the task is classification, else one model at a time. On an error the request is
    left in state ``error`` with the reason, and the error is raised.
    """
    from . import load_data, population_supported, study_spec

    if request is None:
        request = _attrs(study).get(FINALIZE_ATTR)
        if not isinstance(request, dict):
            raise StateError(f"study {study.study_name!r} has no finalize request")
        if request.get("state") != "running":
            taken = take_finalize(study, worker or "local")
            if taken is None:
                raise StateError(f"study {study.study_name!r}: the finalize request is {request.get('state')}")
            request = taken
    top_n, n_seeds, n_epochs = int(request["top_n"]), int(request["seeds"]), int(request["n_epochs"])
    last_beat = [time.monotonic()]

    def beat() -> None:
        if time.monotonic() - last_beat[0] > _BEAT_EVERY:
            last_beat[0] = time.monotonic()
            try:
                study.set_user_attr(FINALIZE_ATTR, {**request, "beat_at": time.time()})
            except Exception as exc:  # noqa: BLE001 - a missed beat only risks a double run
                log.warning("study %s: finalize beat not written: %s", study.study_name, exc)

    try:
        spec = spec or study_spec(study)
        final = _run(study, spec, top_n, n_seeds, n_epochs, device, data_dir, beat, load_data,
                     population_supported)
    except Exception as exc:
        reason = f"{exc.__class__.__name__}: {exc}"[:500]
        log.exception("study %s: finalize failed", study.study_name)
        study.set_user_attr(FINALIZE_ATTR, {**request, "state": "error", "reason": reason,
                                            "finished_at": time.time()})
        raise
    with study_lock(study._storage, study.study_name):
        current = _attrs(study).get(FINALIZE_ATTR)
        study.set_user_attr(FINAL_ATTR, final)
        if not isinstance(current, dict) or current.get("requested_at") == request.get("requested_at"):
            # (a newer request that came meanwhile stays queued)
            study.set_user_attr(FINALIZE_ATTR, {**request, "state": "done", "finished_at": final["finished_at"]})
    return final


def _run(study: optuna.Study, spec: StudySpec, top_n: int, n_seeds: int, n_epochs: int,
         device: str | torch.device | None, data_dir: str | None, beat: Callable[[], None],
         load_data: Callable[..., core.Dataset], population_supported: Callable[[StudySpec], str | None]) -> dict[str, Any]:
    metric, _, maximize = _metric(spec)
    classify = spec.info.task == "classification"
    trials = _candidates(study, spec, top_n)
    if not trials:
        raise StateError(f"study {study.study_name!r} has no complete trial to finalize")
    dev = core.resolve_device(device)
    t0 = time.time()
    jobs = []  # (trial, k, family, model_args, train_args, seed)
    for t in trials:
        family, model_args, train_args = split_params(spec, t.params)
        for k in range(n_seeds):
            jobs.append((t, k, family, model_args, train_args, _seed(spec, t.number, k)))
    flat = core.get_family(jobs[0][2]).input_kind == "flat"
    data = load_data(spec, data_dir, flatten=flat)
    results: list[core.TrainResult] | None = None
    mode = "single"
    if population_supported(spec) is None and classify and len(jobs) > 1:
        # Each member carries its trial's recipe where it differs from train_model's defaults
        # (the population trainer takes the same keys per member).
        configs = [{**m, "lr": a["lr"], "weight_decay": a["weight_decay"], "seed": s,
                    **_recipe_changes(spec, a), **({"bio": a["bio"]} if a.get("bio") is not None else {})}
                   for _, _, _, m, a, s in jobs]
        try:
            results = core.train_population(
                spec.model, configs, data, n_epochs, batch_size=spec.batch_size, device=dev, seed=spec.seed,
                on_epoch=lambda i, e, m: beat() or False, precision=spec.precision,
            )
            mode = "population"
        except ValueError as exc:  # not batchable after all: one at a time
            log.info("study %s: finalize trains one model at a time (%s)", study.study_name, exc)
    if results is None:
        results = [_train_one(spec, f, m, a, data, dev, s, n_epochs, beat) for _, _, f, m, a, s in jobs]
    keys = ("val_accuracy", "test_accuracy", "val_loss", "test_loss") if classify else ("val_loss", "test_loss")
    candidates = []
    for t in trials:
        runs = [(k, s, r) for (tt, k, _, _, _, s), r in zip(jobs, results, strict=True) if tt is t]
        ok = [r for _, _, r in runs if r.status == "completed" and r.history]
        entry: dict[str, Any] = {
            "trial": t.number, "params": t.params, "n_params": t.user_attrs.get("n_params"),
            "search_value": t.values[_metric(spec)[1]] if t.values else None,
            "seeds_completed": len(ok),
            "runs": [{"seed": s, "status": r.status, **{key: _final_metrics(r).get(key) for key in keys}}
                     for _, s, r in runs],
        }
        for key in keys:
            mean, std = _summary([_final_metrics(r).get(key) for r in ok])
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean, std
        if not ok:
            entry["error"] = "; ".join(sorted({str(r.error or r.status) for _, _, r in runs}))
        candidates.append(entry)
    ranked = [(i, c) for i, c in enumerate(candidates) if c.get(f"{metric}_mean") is not None]
    if not ranked:
        raise RuntimeError("no candidate trained to the end: " + "; ".join(
            f"trial {c['trial']}: {c.get('error')}" for c in candidates))
    # A tie goes to the trial the search ranked higher.
    ranked.sort(key=lambda ic: ((-ic[1][f"{metric}_mean"] if maximize else ic[1][f"{metric}_mean"]), ic[0]))
    best = ranked[0][1]
    final: dict[str, Any] = {
        "state": "done",
        "trial": best["trial"],
        "params": best["params"],
        "n_params": best["n_params"],
        "selected_by": f"{metric}_mean",
        **{k: best[k] for k in best if k.endswith("_mean") or k.endswith("_std")},
        "seeds": n_seeds,
        "n_epochs": n_epochs,
        "top_n": top_n,
        "mode": mode,
        "device": str(dev),
        "seconds": round(time.time() - t0, 3),
        "candidates": [{k: v for k, v in c.items() if k != "params"} for c in candidates],
        "finished_at": time.time(),
    }
    log.info("study %s: finalized trial %s (%s mean %s) from %d candidates x %d seeds in %s mode",
             study.study_name, final["trial"], metric, final.get(f"{metric}_mean"), len(trials), n_seeds, mode)
    return _json_safe(final)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


# -- the worker's job ---------------------------------------------------------------------------
def serve_finalize(
    storage: optuna.storages.BaseStorage, device: str | torch.device | None = None, data_dir: str | None = None,
    worker_id: str = "worker", *, study_names: list[str] | None = None, stale_after: float = STALE_AFTER,
) -> bool:
    """Find a pending finalize in ``storage``, take it and run it; True if one ran (or failed).

    For a worker's idle path: one call does the whole job. An error is stored on the request
    (state ``error``) and logged; it does not propagate, so the worker lives on.
    """
    from . import SPEC_ATTR, study_spec

    for s in storage.get_all_studies():
        if study_names and s.study_name not in study_names:
            continue
        attrs = s.user_attrs
        r = attrs.get(FINALIZE_ATTR)
        if SPEC_ATTR not in attrs or not isinstance(r, dict):
            continue
        if not (r.get("state") == "queued" or _stale(r, stale_after)):
            continue
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        request = take_finalize(study, worker_id, stale_after)
        if request is None:
            continue
        try:
            run_finalize(study, study_spec(study), device=device, data_dir=data_dir, worker=worker_id,
                         request=request)
        except Exception:  # noqa: BLE001 - stored on the request by run_finalize; the worker goes on
            pass
        return True
    return False


# -- the HTML report's section ------------------------------------------------------------------
def final_html(attrs: dict[str, Any]) -> str:
    """The "Final answer" section of a study's HTML report ("" when it was never finalized)."""
    import html

    final = attrs.get(FINAL_ATTR)
    if not isinstance(final, dict) or final.get("state") != "done":
        return ""
    esc = html.escape

    def pct(v: Any) -> str:
        return f"{100 * v:.2f}%" if isinstance(v, int | float) else "–"

    def num(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, int | float) else "–"

    classify = final.get("test_accuracy_mean") is not None
    head = ("<tr><th>trial</th><th>params</th><th>val accuracy</th><th>test accuracy</th></tr>" if classify
            else "<tr><th>trial</th><th>params</th><th>val loss</th><th>test loss</th></tr>")
    rows = []
    for c in final.get("candidates", []):
        if classify:
            cells = (f"{pct(c.get('val_accuracy_mean'))} ± {pct(c.get('val_accuracy_std'))}",
                     f"{pct(c.get('test_accuracy_mean'))} ± {pct(c.get('test_accuracy_std'))}")
        else:
            cells = (f"{num(c.get('val_loss_mean'))} ± {num(c.get('val_loss_std'))}",
                     f"{num(c.get('test_loss_mean'))} ± {num(c.get('test_loss_std'))}")
        mark = " (chosen)" if c.get("trial") == final.get("trial") else ""
        rows.append(f"<tr><td>{c.get('trial')}{mark}</td><td>{c.get('n_params')}</td>"
                    f"<td>{cells[0]}</td><td>{cells[1]}</td></tr>")
    if classify:
        headline = (f"test accuracy {pct(final['test_accuracy_mean'])} ± {pct(final.get('test_accuracy_std'))} "
                    f"(validation {pct(final.get('val_accuracy_mean'))})")
    else:
        headline = f"test loss {num(final.get('test_loss_mean'))} ± {num(final.get('test_loss_std'))}"
    return (
        '<section id="final"><h2>Final answer</h2>'
        f"<p>Trial {final.get('trial')}, {final.get('n_params')} parameters: <b>{headline}</b>. "
        f"The top {final.get('top_n')} trials were re-trained with {final.get('seeds')} fresh seeds for "
        f"{final.get('n_epochs')} epochs each and the best mean validation value chose; the test split "
        f"was only reported. Params <code>{esc(json.dumps(final.get('params')))}</code></p>"
        f"<table border=\"1\" cellpadding=\"4\" style=\"border-collapse: collapse\">{head}{''.join(rows)}</table>"
        "</section>"
    )
