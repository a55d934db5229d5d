"""The bio-rules and dendrite-growth presets search their options under the budget."""

from __future__ import annotations

import optuna
import pytest

import studies


def test_growth_preset_compares_growth_with_none_under_one_budget(sqlite_url: str) -> None:
    res = studies.growth_search(max_params=8000, dataset="digits", n_trials=2, n_epochs=3,
                                storage=sqlite_url, show_progress=False, subset_size=400)
    assert [r["variant"] for r in res.table] == ["no growth (lr searched)", "growth (searched)"]
    grown = optuna.load_study(study_name=res.studies[1], storage=sqlite_url)
    for t in grown.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert any(k.startswith("growth.") for k in t.params)
            # growth never takes a model over the budget, at any epoch
            assert all(h["n_params"] <= 8000 for h in t.user_attrs["history"])


def test_bio_preset_searches_bio_options(sqlite_url: str) -> None:
    res = studies.bio_rules_search(max_params=3000, dataset="digits", n_trials=2, n_epochs=2,
                                   storage=sqlite_url, show_progress=False, subset_size=400,
                                   model_params={"n_neurons": 8, "n_dendrites": 4, "n_dendrite_inputs": 16})
    bio = optuna.load_study(study_name=res.studies[1], storage=sqlite_url)
    done = [t for t in bio.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all("bio.fuzzy_lr_distribution" in t.params for t in done)
    assert all(t.user_attrs["n_params"] <= 3000 for t in done)


def test_bio_preset_runs_in_population_mode(sqlite_url: str) -> None:
    res = studies.bio_rules_search(max_params=3000, dataset="digits", n_trials=4, n_epochs=1,
                                   storage=sqlite_url, show_progress=False, subset_size=400, population=4,
                                   model_params={"n_neurons": 8, "n_dendrites": 4, "n_dendrite_inputs": 16})
    for name in res.studies:
        study = optuna.load_study(study_name=name, storage=sqlite_url)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(done) == 4
        assert max(t.user_attrs["population_size"] for t in done) > 1, name


def test_unknown_bio_and_growth_options_name_the_field() -> None:
    with pytest.raises(ValueError, match="bio.no_such_rule"):
        studies.StudySpec(name="x", dataset="digits", bio={"no_such_rule": 1})
    with pytest.raises(ValueError, match="search_space.growth.speed"):
        studies.StudySpec(name="x", dataset="digits", growth={}, search_space={"growth.speed": [1, 2]})
    with pytest.raises(ValueError, match="needs 'bio'"):
        studies.StudySpec(name="x", dataset="digits", search_space={"bio.dampening_factor": [0.5]})
