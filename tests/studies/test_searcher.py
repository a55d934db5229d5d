"""The seed's search API and presets on real SQLite files: grids, seed formats, resume, results, tuning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

import core
import studies
from studies._presets import (
    PRESETS,
    budget_space,
    compare_architectures,
    get_preset,
    register_preset,
    run_preset,
    thorough_optimization,
)
from studies._searcher import HyperparameterSearcher, SearchResult, hyperparameter_tuning

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

SIZES = {"n_neurons": [2, 4], "n_dendrites": [2], "n_dendrite_inputs": [8]}


def _searcher(url: str, **kw: Any) -> HyperparameterSearcher:
    settings: dict[str, Any] = {"dataset": "digits", "subset_size": 300, "max_params": 2000,
                                   "n_epochs": 1, "batch_size": 64, "verbose": False, "storage": url}
    settings.update(kw)
    return HyperparameterSearcher(**settings)


def test_grid_search_over_architecture_and_soma_enabled_trains_each_point_once(sqlite_url: str) -> None:
    s = _searcher(sqlite_url)
    architectures = ["dendritic_simple", "dendritic_with_hidden"]
    grid = {**SIZES, "soma_enabled": [True, False], "architecture": architectures}
    results = s.grid_search(grid)
    assert len(results) == 8
    combos = {(r.params["n_neurons"], r.params["soma_enabled"], r.params["architecture"]) for r in results}
    assert len(combos) == 8
    # soma_enabled reached the models: it changes their parameter counts
    by = {(r.params["n_neurons"], r.params["soma_enabled"], r.params["architecture"]): r.total_params
          for r in results}
    for arch in architectures:
        assert "soma_enabled" in core.get_family(arch).accepts
        assert by[(4, True, arch)] != by[(4, False, arch)]


def test_grid_search_with_max_trials_stops_there_and_resumes_the_rest(sqlite_url: str) -> None:
    grid = {"n_neurons": [2, 4, 6], "n_dendrites": [2], "n_dendrite_inputs": [8]}
    assert len(_searcher(sqlite_url).grid_search(grid, max_trials=2)) == 2
    rest = _searcher(sqlite_url).grid_search(grid)
    assert sorted(r.params["n_neurons"] for r in rest) == [2, 4, 6]


def test_random_search_accepts_the_seeds_formats(sqlite_url: str) -> None:
    s = _searcher(sqlite_url)
    results = s.random_search({
        "n_neurons": (2, 6),
        "n_dendrites": [2, 3, 4],
        "n_dendrite_inputs": {"type": "randint", "low": 8, "high": 16},
    }, n_trials=3)
    assert len(results) == 3
    for r in results:
        assert isinstance(r, SearchResult)
        assert isinstance(r.params["n_neurons"], int) and 2 <= r.params["n_neurons"] <= 6
        assert r.params["n_dendrites"] in (2, 3, 4) and 8 <= r.params["n_dendrite_inputs"] <= 16
        assert r.total_params <= 2000


def test_same_storage_and_study_name_resume_the_search(sqlite_url: str) -> None:
    space = {"n_neurons": (2, 6), "n_dendrites": [2, 3], "n_dendrite_inputs": [8, 16]}
    first = _searcher(sqlite_url, study_name="resumed")
    first.optimize(space, n_trials=2)
    study_id = first.studies["resumed"]._study_id
    second = _searcher(sqlite_url, study_name="resumed")
    second.optimize(space, n_trials=4)
    study = second.studies["resumed"]
    assert study._study_id == study_id
    assert studies.progress(study)["finished"] == 4
    assert len(second.get_best_results(10)) == studies.progress(study)["complete"]


def test_results_are_ranked_by_validation_and_saved_in_the_seeds_shape(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    s = _searcher(sqlite_url)
    s.grid_search({"n_neurons": [2, 4, 6], "n_dendrites": [2, 3], "n_dendrite_inputs": [8]})
    best = s.get_best_results(4)
    assert len(best) == 4
    assert [r.val_accuracy for r in best] == sorted((r.val_accuracy for r in s.results), reverse=True)[:4]
    s.print_results(3)
    lines = capsys.readouterr().out.strip().splitlines()
    assert "val acc" in lines[0] and len(lines) == 4
    path = s.save_results(tmp_path / "out" / "results.json")
    doc = json.loads(path.read_text())
    assert doc["search_config"]["max_params"] == 2000 and doc["search_config"]["dataset"] == "digits"
    assert len(doc["results"]) == 6
    assert set(doc["results"][0]) == {"params", "test_accuracy", "train_accuracy", "total_params",
                                      "train_time", "final_test_loss", "val_accuracy"}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left


def test_searcher_defaults_to_adamw_for_the_seeds_weight_decay(sqlite_url: str) -> None:
    spec = _searcher(sqlite_url).make_spec(SIZES, "random", 1)
    assert (spec.optimizer, spec.weight_decay, spec.lr) == ("adamw", 0.01, 0.0005)


def test_wrong_n_classes_or_dataset_is_an_error(sqlite_url: str) -> None:
    with pytest.raises(ValueError, match="n_classes"):
        _searcher(sqlite_url, n_classes=5)
    with pytest.raises(ValueError, match="digits"):
        _searcher(sqlite_url, dataset="digitz")


def test_hyperparameter_tuning_trains_each_grid_point_of_a_factory_once(sqlite_url: str) -> None:
    def factory(lr: float, n_dendrites: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = torch.nn.Sequential(core.DendriticLayer(64, 4, 8, n_dendrites), torch.nn.LeakyReLU(0.1),
                                    torch.nn.Linear(4, 10))
        return model, torch.optim.Adam(model.parameters(), lr=lr)

    grid: dict[str, list[Any]] = {"lr": [1e-3, 1e-2], "n_dendrites": [2, 3]}
    kw: dict[str, Any] = {"dataset": "digits", "n_epochs": 1, "metric": "val_accuracy", "subset_size": 300,
          "storage": sqlite_url, "study_name": "tuning"}
    best = hyperparameter_tuning(factory, grid, **kw)
    study = optuna.load_study(study_name="tuning", storage=sqlite_url)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted((t.params["lr"], t.params["n_dendrites"]) for t in done) == [
        (1e-3, 2), (1e-3, 3), (1e-2, 2), (1e-2, 3)]
    assert best == max(done, key=lambda t: t.user_attrs["val_accuracy"]).params
    assert hyperparameter_tuning(factory, grid, **kw) == best
    assert len(optuna.load_study(study_name="tuning", storage=sqlite_url).trials) == 4  # resumed, not re-run
    with pytest.raises(ValueError, match="val_accuracy"):
        hyperparameter_tuning(factory, grid, "digits", 1, metric="accuracy")


def test_presets_are_found_by_either_spelling_and_unknown_names_list_them() -> None:
    assert {"quick-prototype", "optimize-budget", "compare-architectures", "thorough"} <= set(PRESETS)
    assert get_preset("optimize-budget") is get_preset("optimize_for_budget") is get_preset("Optimize_Budget")
    assert get_preset("quick_prototype_search").name == "quick-prototype"
    with pytest.raises(studies.SpecError) as info:
        get_preset("fastest")
    for name in PRESETS:
        assert name in str(info.value)
    with pytest.raises(core.DuplicateNameError):
        register_preset("thorough")(thorough_optimization)


def test_budget_space_fits_the_budget_and_the_data() -> None:
    small = budget_space(2000, "fashion-mnist")
    assert small["architecture"] == ["dendritic_simple"]
    assert small["n_dendrite_inputs"]["high"] < 256  # lowered to what fits
    spec = studies.StudySpec(model="dendritic_simple", dataset="fashion-mnist")
    lows = {k: small[k]["low"] for k in ("n_neurons", "n_dendrites", "n_dendrite_inputs")}
    for k in lows:
        assert studies.count_point(spec, {**lows, k: small[k]["high"]}) <= 2000
    assert budget_space(8000, "digits")["n_dendrite_inputs"]["high"] == 64
    assert len(budget_space(8000, "digits")["architecture"]) == 3


def test_compare_architectures_gives_each_the_same_budget_and_trials(sqlite_url: str, tmp_path: Path) -> None:
    result = compare_architectures(max_params=3000, dataset="digits", n_trials=2, n_epochs=1,
                                   subset_size=300, storage=sqlite_url, out_dir=tmp_path,
                                   show_progress=False)
    assert [r["architecture"] for r in result.table] == list(studies._presets.SEED_ARCHITECTURES)
    assert all(r["trials"] == 2 and r["total_params"] <= 3000 for r in result.table)
    assert len(result.studies) == 3
    names = {p.name for p in tmp_path.iterdir()}
    assert "compare-architectures-summary.json" in names
    assert {f"{s}.{ext}" for s in result.studies for ext in ("json", "csv", "html")} <= names


def test_thorough_optimization_retrains_the_best_with_several_seeds(sqlite_url: str) -> None:
    result = thorough_optimization(max_params=3000, dataset="digits", n_trials=3, n_epochs=1,
                                   subset_size=300, storage=sqlite_url, show_progress=False, n_seeds=2)
    assert result.best is not None and result.seeds is not None
    tests = [r["test_accuracy"] for r in result.seeds["per_seed"]]
    assert len(tests) == 2 and len({r["seed"] for r in result.seeds["per_seed"]}) == 2
    assert result.seeds["test_accuracy_mean"] == pytest.approx(sum(tests) / 2)
    assert result.seeds["params"] == result.best.params
    assert len(result.studies) == 3  # broad, narrow, seeds


def test_run_preset_returns_a_json_ready_summary(sqlite_url: str) -> None:
    out = run_preset("quick_prototype", max_params=3000, dataset="digits", n_trials=2, n_epochs=1,
                     subset_size=300, storage=sqlite_url, show_progress=False)
    doc = json.loads(json.dumps(out))
    assert doc["preset"] == "quick-prototype" and doc["best"]["total_params"] <= 3000
