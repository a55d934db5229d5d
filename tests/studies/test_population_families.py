"""Population mode through the studies layer: recurrent families, bio rules, the training recipe."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

import studies


def _run(spec: studies.StudySpec, tmp_path: Path, k: int = 4) -> tuple[object, list[studies.TrialOutcome]]:
    url = f"sqlite:///{tmp_path / 'pop.db'}"
    studies.create_study(spec, url)
    study, spec = studies.load_study(spec.name, url)
    assert studies.population_supported(spec) is None
    return study, studies.execute_population(study, spec, population_size=k, device="cpu")


def test_a_recurrent_study_trains_as_a_population_with_bio_rules(tmp_path: Path) -> None:
    spec = studies.StudySpec(
        name="diru-pop", model="diru", dataset="multi_sine", objective="val_mse", pruner="none",
        n_trials=4, n_epochs=1, batch_size=64, subset_size=200, sampler="random",
        bio={"fuzzy": True, "crystallize": True},
        search_space={"hidden_size": {"type": "int", "low": 4, "high": 12},
                      "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}})
    study, outs = _run(spec, tmp_path)
    assert [o.state for o in outs].count("complete") == 4, outs
    sizes = [t.user_attrs["population_size"] for t in study.trials]
    # the four trained together and ended together: each records the population it trained
    # in, not how many were left when its result was written
    assert sizes == [4, 4, 4, 4], sizes


def test_an_mlp_study_with_searched_bio_rules_trains_as_a_population(tmp_path: Path) -> None:
    spec = studies.StudySpec(
        name="bio-pop", model="dendritic_simple", dataset="digits", max_params=3000, pruner="none",
        n_trials=4, n_epochs=1, subset_size=300, sampler="random", bio={},
        model_params={"n_neurons": 6, "n_dendrites": 3, "n_dendrite_inputs": 12},
        search_space={"bio.fuzzy_lr_distribution": ["uniform", "gamma", "temporal"],
                      "bio.apply_dales_principle": [False, True],
                      "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}})
    study, outs = _run(spec, tmp_path)
    assert [o.state for o in outs].count("complete") == 4, outs
    sizes = [t.user_attrs["population_size"] for t in study.trials]
    assert max(sizes) > 1, sizes


def test_population_refuses_what_it_cannot_train_and_says_why() -> None:
    bio_hidden = studies.StudySpec(model="dendritic_with_hidden", dataset="digits", bio={"fuzzy": True})
    assert "hidden Linear layers" in (studies.population_supported(bio_hidden) or "")
    bio_simple = studies.StudySpec(model="dendritic_simple", dataset="digits", bio={"fuzzy": True})
    assert studies.population_supported(bio_simple) is None
    scheduled_rnn = studies.StudySpec(model="lstm", dataset="multi_sine", lr_schedule="cosine")
    assert "lr_schedule" in (studies.population_supported(scheduled_rnn) or "")
    conv = studies.StudySpec(model="dendritic_conv", dataset="digits")
    assert "cannot be batched" in (studies.population_supported(conv) or "")


def test_the_searched_recipe_reaches_each_population_member(tmp_path: Path) -> None:
    spec = studies.StudySpec(
        name="recipe-pop", model="dendritic_simple", dataset="digits", max_params=3000, pruner="none",
        n_trials=4, n_epochs=2, subset_size=300, sampler="random",
        search_space={"n_neurons": {"type": "int", "low": 4, "high": 8},
                      "n_dendrites": [2, 4], "n_dendrite_inputs": [8, 16],
                      "lr_schedule": ["cosine", "onecycle"], "label_smoothing": [0.0, 0.1],
                      "batch_size": [32, 64], "augment": ["none", "shift"]})
    study, outs = _run(spec, tmp_path)
    assert [o.state for o in outs].count("complete") == 4, outs
    for t in study.trials:
        assert t.params["lr_schedule"] in ("cosine", "onecycle")
        assert t.user_attrs["population_size"] >= 1


@pytest.mark.parametrize("bad", [{"lr_schedule": ["linear"]}, {"augment": ["flip"]},
                                 {"batch_size": [0, 32]}, {"label_smoothing": [0.5, 1.0]}])
def test_a_bad_recipe_choice_names_the_field(bad: dict[str, list[object]]) -> None:
    key = next(iter(bad))
    with pytest.raises(ValueError, match=rf"search_space\.{key}: {key} "):
        studies.StudySpec(model="dendritic_simple", dataset="digits", search_space=bad)


def test_a_single_trial_records_population_size_one(tmp_path: Path) -> None:
    spec = studies.StudySpec(
        name="single", model="dendritic_simple", dataset="digits", max_params=3000, n_trials=1,
        n_epochs=1, subset_size=200, label_smoothing=0.1, lr_schedule="cosine", warmup_epochs=0.5,
        search_space={"n_neurons": [4], "n_dendrites": [2], "n_dendrite_inputs": [8]})
    study = studies.run_study(spec, f"sqlite:///{tmp_path / 's.db'}", show_progress=False, device="cpu")
    (t,) = study.trials
    assert t.user_attrs["population_size"] == 1 and t.value is not None


def test_run_study_with_population_runs_a_study_that_cannot_stack_one_trial_at_a_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    spec = studies.StudySpec(
        name="conv-single", model="dendritic_conv", dataset="digits", max_params=3000, n_trials=2,
        n_epochs=1, subset_size=200, sampler="random", pruner="none",
        model_params={"n_units1": 4, "n_units2": 8, "n_dendrites": 2, "n_dendrite_inputs2": 8},
        search_space={"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}})
    with caplog.at_level("INFO", logger="studies._runner"):
        study = studies.run_study(spec, f"sqlite:///{tmp_path / 'c.db'}", show_progress=False,
                                  device="cpu", population="auto")
    done = [t for t in study.trials if t.state.is_finished()]
    assert len(done) == 2 and all(t.user_attrs["population_size"] == 1 for t in done)
    assert "one trial at a time" in caplog.text and "cannot be batched" in caplog.text


def test_auto_population_keeps_half_of_tpes_proposals_from_results() -> None:
    from studies._population import auto_cap

    tpe = optuna.samplers.TPESampler(n_startup_trials=10)
    # half of the one-trial path's proposals from results: 200 - 10 - 96 + 1 = 95 of 190
    assert auto_cap(tpe, 200, 1024) == 96
    assert auto_cap(tpe, 20, 8) == 6  # 5 of 10 (a population of 8 left 3)
    assert auto_cap(tpe, 12, 12) == 2
    assert auto_cap(tpe, 8, 12) == 8  # within TPE's random start-up: random search, all at once
    assert auto_cap(tpe, 200, 40) == 40  # the worker's own limit (its fair share) still holds
    assert auto_cap(optuna.samplers.RandomSampler(), 200, 1024) == 1024  # random search: no feedback to wait for
