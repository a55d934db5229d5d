"""A study's results as JSON (the seed's save_results shape), CSV, plotly figures and an HTML report."""

from __future__ import annotations

import contextlib
import csv
import html
import io
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

import core

from ._artifacts import ModelStore
from ._finalize import final_html
from ._lifecycle import trial_state
from ._runner import SPEC_ATTR, STATE_ATTR, is_infeasible, progress
from ._storage import rdb

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = [
    "PLOT_KINDS",
    "EXPORT_FORMATS",
    "study_to_json",
    "study_to_csv",
    "make_plot",
    "export_study",
    "best_trial",
    "trained_trials",
]

#: the figures :func:`make_plot` draws, in the order the HTML report shows them
PLOT_KINDS = (
    "history",
    "parallel_coordinate",
    "param_importances",
    "pareto",
    "intermediate",
    "curves",
    "weights",
)
EXPORT_FORMATS = ("json", "csv", "html")
_ATTR_COLUMNS = (
    "val_accuracy", "test_accuracy", "train_accuracy", "val_loss", "test_loss", "train_loss",
    "wall_time", "epochs_run", "seed", "device",
)


@contextlib.contextmanager
def optuna_quiet() -> Iterator[None]:
    """Optuna's INFO lines (a line per trial, per in-memory study) hushed for a while."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


# -- which trials count ----------------------------------------------------------------------
def trained_trials(study: optuna.Study, *, complete_only: bool = False) -> list[FrozenTrial]:
    """Trials that trained a model: COMPLETE, and PRUNED by the pruner (not the over-budget ones)."""
    states = (TrialState.COMPLETE,) if complete_only else (TrialState.COMPLETE, TrialState.PRUNED)
    return [
        t for t in study.get_trials(deepcopy=False, states=states) if not is_infeasible(t)
    ]


def _objectives(study: optuna.Study) -> list[str]:
    names = study.user_attrs.get("dendro.objectives") or study.metric_names
    if names and len(names) == len(study.directions):
        return [str(n) for n in names]
    return ["value"] if len(study.directions) == 1 else [f"value_{i}" for i in range(len(study.directions))]


def _primary(study: optuna.Study) -> tuple[int, bool]:
    """Index of the objective that ranks trials (the first that is not the parameter count)
    and whether it is maximised."""
    names = _objectives(study)
    i = next((k for k, n in enumerate(names) if n != "n_params"), 0)
    return i, study.directions[i] == StudyDirection.MAXIMIZE


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The completed trial with the best primary objective (validation selects), or None.

    For a two-objective study that is the most accurate point of the Pareto front.
    """
    done = trained_trials(study, complete_only=True)
    if not done:
        return None
    i, maximize = _primary(study)

    def key(t: FrozenTrial) -> float:
        return float(t.values[i])

    return max(done, key=key) if maximize else min(done, key=key)


# -- JSON and CSV -----------------------------------------------------------------------------
def _finite(obj: Any) -> Any:
    """Strict JSON has no NaN or infinity: a diverged trial's loss becomes null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _state(t: FrozenTrial) -> str:
    return trial_state(t)  # the one vocabulary (studies.TRIAL_STATES), as REST says it


def _result_entry(t: FrozenTrial) -> dict[str, Any]:
    a = t.user_attrs
    return {
        "number": t.number,
        "state": _state(t),
        "params": dict(t.params),
        "test_accuracy": a.get("test_accuracy"),
        "train_accuracy": a.get("train_accuracy"),
        "val_accuracy": a.get("val_accuracy"),
        "total_params": a.get("n_params"),
        "train_time": a.get("wall_time"),
        "final_test_loss": a.get("test_loss"),
        "final_val_loss": a.get("val_loss"),
        "final_train_loss": a.get("train_loss"),
        "values": list(t.values) if t.values is not None else None,
        "epochs_run": a.get("epochs_run"),
        "seed": a.get("seed"),
        "device": a.get("device"),
        **({"seed_results": a["seed_results"]} if "seed_results" in a else {}),
        "history": a.get("history", []),
    }


def study_to_json(study: optuna.Study) -> dict[str, Any]:
    """The whole study in the seed's ``save_results`` shape, ready for ``json.dumps``.

    ``search_config`` is the study spec; ``results`` holds one entry per trained trial
    (COMPLETE or pruned) with the seed's fields plus validation accuracy; ``infeasible``
    and ``failed`` summarise the trials that never trained or broke. Non-finite numbers
    are null.
    """
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    out: dict[str, Any] = {
        "study_name": study.study_name,
        "state": study.user_attrs.get(STATE_ATTR),
        "objectives": _objectives(study),
        "directions": [d.name.lower() for d in study.directions],
        "search_config": study.user_attrs.get(SPEC_ATTR)
        or study.user_attrs.get("dendro.search_config", {}),
        "progress": progress(study),
        "best": _result_entry(best) if best is not None else None,
        "results": [_result_entry(t) for t in trained_trials(study)],
        "infeasible": [
            {"number": t.number, "params": dict(t.params), "n_params": t.user_attrs.get("n_params"),
             "reason": t.user_attrs.get("reason")}
            for t in trials if is_infeasible(t)
        ],
        "failed": [
            {"number": t.number, "params": dict(t.params), "reason": t.user_attrs.get("fail_reason")}
            for t in trials if t.state == TrialState.FAIL
        ],
    }
    if len(study.directions) > 1:
        out["pareto_front"] = sorted(t.number for t in study.best_trials if not is_infeasible(t))
    return _finite(out)


def study_to_csv(study: optuna.Study) -> str:
    """One row a trial (every state, infeasible ones included); each parameter its own column."""
    trials = study.get_trials(deepcopy=False)
    objectives = _objectives(study)
    params = sorted({p for t in trials for p in t.params})
    header = (
        ["number", "state", "infeasible", "n_params"]
        + [f"value_{o}" if o != "value" else "value" for o in objectives]
        + list(_ATTR_COLUMNS)
        + ["reason"]
        + [f"param_{p}" for p in params]
    )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for t in trials:
        a = t.user_attrs
        values = list(t.values) if t.values is not None else [None] * len(objectives)
        w.writerow(
            [t.number, trial_state(t), is_infeasible(t), a.get("n_params")]
            + values
            + [a.get(k) for k in _ATTR_COLUMNS]
            + [a.get("reason") or a.get("fail_reason")]
            + [t.params.get(p) for p in params]
        )
    return buf.getvalue()


# -- figures ----------------------------------------------------------------------------------
def _empty(title: str, why: str) -> go.Figure:
    """A valid figure that says why there is nothing to draw yet."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=why, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14})
    fig.update_layout(title=title, xaxis={"visible": False}, yaxis={"visible": False}, height=300)
    return fig


def _view(study: optuna.Study, trials: Sequence[FrozenTrial]) -> optuna.Study:
    """An in-memory study of ``trials`` only, so Optuna's plots never see infeasible points."""
    with optuna_quiet():
        view = optuna.create_study(directions=study.directions)
    view.add_trials(list(trials))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        view.set_metric_names(_objectives(study))
    return view


def _target(study: optuna.Study) -> tuple[Callable[[FrozenTrial], float] | None, str]:
    i, _ = _primary(study)
    name = _objectives(study)[i]
    if len(study.directions) == 1:
        return None, name
    return (lambda t: float(t.values[i])), name


def _metric_key(trials: Iterable[FrozenTrial]) -> str:
    """Accuracy for classification, loss for regression (where accuracy is None)."""
    return "val_accuracy" if any(t.user_attrs.get("val_accuracy") is not None for t in trials) else "val_loss"


def _plot_history(study: optuna.Study) -> go.Figure:
    import plotly.graph_objects as go

    done = sorted(trained_trials(study, complete_only=True), key=lambda t: t.number)
    if not done:
        return _empty("Optimisation history", "no completed trial yet")
    # Drawn here rather than by Optuna on an in-memory copy: the copy renumbers its trials,
    # and the x axis must be the study's own trial numbers (trial 6 stays 6 when 5 failed).
    i, maximize = _primary(study)
    name = _objectives(study)[i]
    pts = [(t.number, float(t.values[i])) for t in done if math.isfinite(float(t.values[i]))]
    best: list[float] = []
    for _, v in pts:
        best.append(v if not best else (max if maximize else min)(best[-1], v))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[n for n, _ in pts], y=[v for _, v in pts], mode="markers", name=name,
                             text=[f"trial {n}" for n, _ in pts], hovertemplate="%{text}: %{y}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[n for n, _ in pts], y=best, mode="lines", name="best so far",
                             line={"shape": "hv"}))
    fig.update_layout(title=f"Optimisation history ({name})", xaxis_title="trial number", yaxis_title=name)
    return fig


def _plot_parallel(study: optuna.Study) -> go.Figure:
    done = trained_trials(study, complete_only=True)
    if not done:
        return _empty("Parallel coordinates", "no completed trial yet")
    target, name = _target(study)
    fig = optuna.visualization.plot_parallel_coordinate(_view(study, done), target=target,
                                                        target_name=name)
    fig.update_layout(title=f"Parallel coordinates ({name})")
    return fig


def _plot_importances(study: optuna.Study) -> go.Figure:
    done = trained_trials(study, complete_only=True)
    title = "Parameter importances"
    varied = [p for p in {p for t in done for p in t.params}
              if len({repr(t.params.get(p)) for t in done}) > 1]
    if len(done) < 2 or not varied:
        return _empty(title, "needs at least two completed trials that differ in a parameter")
    target, name = _target(study)
    try:
        fig = optuna.visualization.plot_param_importances(_view(study, done), target=target,
                                                          target_name=name)
    except (ValueError, RuntimeError) as exc:  # e.g. a constant objective
        return _empty(title, f"importances cannot be computed yet: {exc}")
    fig.update_layout(title=f"{title} ({name})")
    return fig


def _pareto_front(points: Sequence[tuple[float, float, FrozenTrial]], maximize: bool) -> list[int]:
    """Indices of the points no other point beats: fewer parameters and a metric as good."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if maximize else points[i][1]))
    front: list[int] = []
    best: float | None = None
    for i in order:
        y = points[i][1]
        if best is None or (y > best if maximize else y < best):
            front.append(i)
            best = y
    return front


def _plot_pareto(study: optuna.Study) -> go.Figure:
    import plotly.graph_objects as go

    done = [t for t in trained_trials(study, complete_only=True) if t.user_attrs.get("n_params") is not None]
    title = "Accuracy against parameter count"
    if not done:
        return _empty(title, "no completed trial yet")
    key = _metric_key(done)
    maximize = key == "val_accuracy"
    pts = [(float(t.user_attrs["n_params"]), float(t.user_attrs[key]), t) for t in done
           if t.user_attrs.get(key) is not None and math.isfinite(float(t.user_attrs[key]))]
    if not pts:
        return _empty(title, f"no completed trial has a finite {key}")
    front = _pareto_front(pts, maximize)
    hover = [f"trial {t.number}<br>{t.user_attrs['n_params']} params<br>"
             + "<br>".join(f"{k}={v}" for k, v in t.params.items()) for _, _, t in pts]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers",
                             name="trials", marker={"color": "#9aa5b1", "size": 8},
                             text=hover, hoverinfo="text"))
    fig.add_trace(go.Scatter(x=[pts[i][0] for i in front], y=[pts[i][1] for i in front],
                             mode="lines+markers", name="Pareto front", line={"shape": "hv"},
                             marker={"color": "#d62728", "size": 10},
                             text=[hover[i] for i in front], hoverinfo="text"))
    budget = (study.user_attrs.get(SPEC_ATTR) or {}).get("max_params")
    if budget:
        fig.add_vline(x=budget, line_dash="dash", line_color="#444",
                      annotation_text=f"max_params={budget}")
    fig.update_layout(title=title, xaxis_title="parameters", yaxis_title=key.replace("_", " "))
    return fig


def _plot_intermediate(study: optuna.Study) -> go.Figure:
    import plotly.graph_objects as go

    trials = [t for t in trained_trials(study) if t.user_attrs.get("history")]
    title = "Per-epoch validation curves"
    if not trials:
        return _empty(title, "no trained trial yet")
    key = _metric_key(trials)
    fig = go.Figure()
    for t in trials:
        hist = t.user_attrs["history"]
        fig.add_trace(go.Scatter(
            x=[h.get("epoch") for h in hist], y=[h.get(key) for h in hist], mode="lines",
            name=f"trial {t.number}", line={"dash": "dot" if t.state == TrialState.PRUNED else "solid"},
            customdata=[t.number] * len(hist), hovertemplate=f"trial {t.number}, epoch %{{x}}: %{{y}}<extra></extra>",
        ))
    fig.update_layout(title=f"{title} (dotted: pruned)", xaxis_title="epoch",
                      yaxis_title=key.replace("_", " "))
    return fig


def _plot_curves(study: optuna.Study) -> go.Figure:
    best = best_trial(study)
    if best is None or not best.user_attrs.get("history"):
        return _empty("Training curves", "no completed trial yet")
    result = core.TrainResult(history=list(best.user_attrs["history"]), name=f"trial {best.number}")
    fig = core.plot_training_curves(result)
    fig.update_layout(title=f"Training curves of the best trial ({best.number})")
    return fig


def _image_shape(study: optuna.Study) -> tuple[int, int] | None:
    dataset = (study.user_attrs.get(SPEC_ATTR) or {}).get("dataset")
    if dataset is None:
        return None
    shape = tuple(core.dataset_info(dataset).input_shape)
    if len(shape) == 3 and shape[0] == 1:
        return int(shape[1]), int(shape[2])
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else None


def _plot_weights(study: optuna.Study, model_store: ModelStore | None) -> go.Figure:
    import torch

    title = "Dendritic weights of the best trial"
    best = best_trial(study)
    if best is None:
        return _empty(title, "no completed trial yet")
    if model_store is None:
        backend = rdb(study._storage)
        if not isinstance(backend, optuna.storages.RDBStorage):
            return _empty(title, "weights are kept only in a database storage")
        model_store = ModelStore(backend.engine)
    kept = model_store.list(study.study_name)
    if not kept:
        return _empty(title, "no trial's weights were kept (keep_models=0?)")
    number = best.number
    if number not in kept:
        # The store ranks by the first objective; show the best trial it kept instead.
        i, maximize = _primary(study)
        cands = [t for t in trained_trials(study, complete_only=True) if t.number in kept]
        if not cands:
            return _empty(title, "the kept weights belong to no completed trial")
        pick = max if maximize else min
        number = pick(cands, key=lambda t: float(t.values[i])).number
    row = model_store.get(study.study_name, number)
    if row is None:
        return _empty(title, f"the weights of trial {number} are no longer kept")
    config, blob = row
    model = core.create_model(config["family"], **config["model_args"])
    model.load_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
    layer = next((m for m in model.modules() if isinstance(m, core.DendriticLayer)), None)
    if layer is None:
        return _empty(title, f"family {config['family']!r} has no dendritic layer")
    try:
        fig = core.plot_dendritic_weights_full_model(layer, _image_shape(study))
    except ValueError:  # inputs that are not an image (e.g. after a convolution)
        fig = core.plot_dendritic_weights_full_model(layer, (1, layer.in_dim))
    fig.update_layout(title=f"Dendritic input weights of trial {number} ({config['family']})")
    return fig


def make_plot(study: optuna.Study, kind: str, *, model_store: ModelStore | None = None) -> go.Figure:
    """A plotly figure of ``study``; ``kind`` is one of :data:`PLOT_KINDS`.

    Infeasible (over-budget) trials never appear. A study with nothing to draw yet (no
    trained trial, or weights not kept) gives a valid figure whose text says why, so a
    dashboard can poll a study from its first second. ``weights`` rebuilds the best
    trial from the weights kept in the study's database (``model_store`` overrides).
    """
    if kind not in PLOT_KINDS:
        raise ValueError(f"unknown plot kind {kind!r}; kinds: {', '.join(PLOT_KINDS)}")
    if kind == "history":
        return _plot_history(study)
    if kind == "parallel_coordinate":
        return _plot_parallel(study)
    if kind == "param_importances":
        return _plot_importances(study)
    if kind == "pareto":
        return _plot_pareto(study)
    if kind == "intermediate":
        return _plot_intermediate(study)
    if kind == "curves":
        return _plot_curves(study)
    return _plot_weights(study, model_store)


# -- files ------------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the export the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _report_html(study: optuna.Study, model_store: ModelStore | None) -> str:
    import plotly.offline

    c = progress(study)
    best = best_trial(study)
    esc = html.escape
    rows = [
        f"<li>{esc(k)}: {v}</li>" for k, v in c.items()
    ]
    if best is not None:
        a = best.user_attrs
        summary = (
            f"<p>Best trial {best.number} (selected on validation): "
            f"val accuracy {a.get('val_accuracy')}, test accuracy {a.get('test_accuracy')}, "
            f"{a.get('n_params')} parameters; params <code>{esc(json.dumps(best.params))}</code></p>"
        )
    else:
        summary = "<p>No completed trial yet.</p>"
    summary += final_html(study.user_attrs)
    divs = []
    for kind in PLOT_KINDS:
        fig = make_plot(study, kind, model_store=model_store)
        divs.append(f'<section id="{kind}">'
                    + fig.to_html(full_html=False, include_plotlyjs=False) + "</section>")
    # plotly.js inlined once: the report opens offline.
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{esc(study.study_name)}</title>"
        f"<script type=\"text/javascript\">{plotly.offline.get_plotlyjs()}</script>"
        "</head><body style=\"font-family: sans-serif; max-width: 1200px; margin: auto\">"
        f"<h1>Study {esc(study.study_name)}</h1><ul>{''.join(rows)}</ul>{summary}"
        + "".join(divs)
        + "</body></html>\n"
    )


def export_study(
    study: optuna.Study,
    out_dir: str | Path,
    formats: Sequence[str] = EXPORT_FORMATS,
    *,
    model_store: ModelStore | None = None,
) -> list[Path]:
    """Write ``<study>.json``, ``.csv`` and ``.html`` (a self-contained plotly report) to
    ``out_dir`` and return their paths.

    Everything is rendered in memory first and each file replaces its old version
    atomically, so a failed export leaves no half-written file.
    """
    formats = [f.strip().lower() for f in formats]
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown export format(s) {unknown}; formats: {', '.join(EXPORT_FORMATS)}")
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", study.study_name)
    texts: dict[str, str] = {}
    for f in dict.fromkeys(formats):
        if f == "json":
            texts[f] = json.dumps(study_to_json(study), indent=2, default=str) + "\n"
        elif f == "csv":
            texts[f] = study_to_csv(study)
        else:
            texts[f] = _report_html(study, model_store)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f, text in texts.items():
        path = out / f"{stem}.{f}"
        _atomic_write(path, text)
        paths.append(path)
    return paths
