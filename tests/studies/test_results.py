"""Exports and plots of a study: JSON and CSV that match it, every figure, a self-contained report."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import optuna
import plotly.graph_objects as go
import pytest
from optuna.trial import TrialState

import studies
from studies import StudySpec, run_study
from studies._results import PLOT_KINDS, export_study, make_plot, study_to_csv, study_to_json

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

GRID = {"n_neurons": [2, 6], "n_dendrites": [2, 6], "n_dendrite_inputs": [8, 32]}
MAX_PARAMS = 700


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[optuna.Study, StudySpec]:
    """A finished grid study on digits with trained and infeasible trials and kept weights."""
    url = f"sqlite:///{tmp_path_factory.mktemp('results') / 'dendro.db'}"
    spec = StudySpec(name="exported", model="dendritic_simple", dataset="digits", search_space=GRID,
                     max_params=MAX_PARAMS, sampler="grid", pruner="none", n_trials=8, n_epochs=2,
                     batch_size=64, subset_size=300)
    return run_study(spec, url, show_progress=False), spec


def _numbers(study: optuna.Study, *, infeasible: bool) -> list[int]:
    return sorted(t.number for t in study.trials if studies.is_infeasible(t) == infeasible)


def test_json_export_matches_the_study(finished: tuple[optuna.Study, StudySpec], tmp_path: Path) -> None:
    study, spec = finished
    paths = export_study(study, tmp_path, formats=("json",))
    assert paths == [tmp_path / "exported.json"]
    doc = json.loads(paths[0].read_text())
    assert doc["search_config"] == spec.public_dict()
    assert sorted(r["number"] for r in doc["results"]) == _numbers(study, infeasible=False)
    assert sorted(r["number"] for r in doc["infeasible"]) == _numbers(study, infeasible=True)
    assert doc["infeasible"] and all(r["n_params"] > MAX_PARAMS for r in doc["infeasible"])
    assert doc["progress"] == studies.progress(study)
    by_number = {t.number: t for t in study.trials}
    for r in doc["results"]:
        t = by_number[r["number"]]
        assert r["params"] == t.params and r["total_params"] == t.user_attrs["n_params"] <= MAX_PARAMS
        assert r["val_accuracy"] == t.user_attrs["val_accuracy"] == t.value
        for field in ("test_accuracy", "train_accuracy", "train_time", "final_test_loss", "state"):
            assert r[field] is not None
    best = max(doc["results"], key=lambda r: r["val_accuracy"])
    assert doc["best"]["val_accuracy"] == best["val_accuracy"]  # validation selects


def test_csv_has_one_row_per_trial_and_a_column_per_parameter(
    finished: tuple[optuna.Study, StudySpec],
) -> None:
    study, _ = finished
    rows = list(csv.DictReader(io.StringIO(study_to_csv(study))))
    assert [int(r["number"]) for r in rows] == [t.number for t in study.trials]
    assert {f"param_{k}" for k in GRID} <= set(rows[0])
    for r, t in zip(rows, study.trials, strict=True):
        assert r["infeasible"] == str(studies.is_infeasible(t))
        assert int(r["n_params"]) == t.user_attrs["n_params"]
        assert int(r["param_n_neurons"]) == t.params["n_neurons"]
        if studies.is_infeasible(t):
            assert r["state"] == "infeasible" and r["val_accuracy"] == "" and "max_params" in r["reason"]
        else:
            assert float(r["value_val_accuracy"]) == t.value


def test_html_report_is_one_self_contained_page_with_every_plot(
    finished: tuple[optuna.Study, StudySpec], tmp_path: Path,
) -> None:
    study, _ = finished
    [path] = export_study(study, tmp_path, formats=["html"])
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in page
    assert "<script src=" not in page and 'src="http' not in page  # plotly.js inline: opens offline
    for kind in PLOT_KINDS:
        assert f'id="{kind}"' in page


def test_export_leaves_only_the_finished_files(finished: tuple[optuna.Study, StudySpec], tmp_path: Path) -> None:
    study, _ = finished
    paths = export_study(study, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths) == [
        "exported.csv", "exported.html", "exported.json"]
    with pytest.raises(ValueError, match="json, csv, html"):
        export_study(study, tmp_path / "bad", formats=("json", "xlsx"))
    assert not (tmp_path / "bad").exists()
    # exports get the mode a plain open() would give them, not mkstemp's private 0600
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in paths} == {0o666 & ~umask}


@pytest.mark.parametrize("kind", PLOT_KINDS)
def test_every_plot_kind_draws_the_study(finished: tuple[optuna.Study, StudySpec], kind: str) -> None:
    study, _ = finished
    fig = make_plot(study, kind)
    assert isinstance(fig, go.Figure) and len(fig.data) > 0
    json.loads(fig.to_json())


def test_value_plots_leave_out_infeasible_trials(finished: tuple[optuna.Study, StudySpec]) -> None:
    study, _ = finished
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    pareto = make_plot(study, "pareto")
    xs = list(pareto.data[0].x)
    assert len(xs) == len(complete) and max(xs) <= MAX_PARAMS
    history = make_plot(study, "history")
    assert len(history.data[0].x) == len(complete)


def test_weights_plot_rebuilds_the_best_trial_from_its_kept_weights(
    finished: tuple[optuna.Study, StudySpec],
) -> None:
    study, _ = finished
    best = max((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: float(t.value or 0.0))
    fig = make_plot(study, "weights")
    assert f"trial {best.number}" in fig.layout.title.text
    assert len(fig.data) == best.params["n_neurons"]  # one image per neuron


def test_an_unknown_plot_kind_lists_the_kinds(finished: tuple[optuna.Study, StudySpec]) -> None:
    with pytest.raises(ValueError) as info:
        make_plot(finished[0], "histogram")
    for kind in PLOT_KINDS:
        assert kind in str(info.value)


def test_a_study_without_trained_trials_gives_empty_but_valid_output(
    sqlite_url: str, tiny_spec: Callable[..., StudySpec],
) -> None:
    spec = tiny_spec()
    study = studies.create_study(spec, sqlite_url)
    for kind in PLOT_KINDS:
        fig = make_plot(study, kind)
        assert len(fig.data) == 0 and fig.layout.annotations  # says why it is empty
    doc = study_to_json(study)
    assert doc["results"] == [] and doc["best"] is None
    assert study_to_csv(study).count("\n") == 1  # the header only


def test_two_objective_study_exports_its_pareto_front(sqlite_url: str, tiny_spec: Callable[..., StudySpec]) -> None:
    spec = tiny_spec(objective=["val_accuracy", "n_params"], sampler="nsga2", n_trials=3)
    study = run_study(spec, sqlite_url, show_progress=False)
    doc = study_to_json(study)
    assert doc["pareto_front"] == sorted(t.number for t in study.best_trials)
    for kind in ("history", "parallel_coordinate", "pareto", "curves"):
        assert len(make_plot(study, kind).data) > 0
