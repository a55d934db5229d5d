"""Studies on real SQLite files: the budget, infeasible points, resume, grids, every sampler and pruner."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import optuna
import pytest
from optuna.trial import TrialState

import core
import studies
from studies import StudySpec, progress, run_study
from studies._runner import BudgetAwareSampler
from studies._spec import split_params

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _trained(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not studies.is_infeasible(t)]


def _assert_within_budget(study: optuna.Study, spec: StudySpec) -> None:
    trained = _trained(study)
    assert trained
    for t in trained:
        n = t.user_attrs["n_params"]
        assert spec.max_params is not None and n <= spec.max_params
        family, args, _ = split_params(spec, t.params)
        assert core.count_parameters(core.create_model(family, **args)) == n


def _assert_infeasible_recorded(study: optuna.Study, spec: StudySpec) -> int:
    bad = [t for t in study.trials if studies.is_infeasible(t)]
    for t in bad:
        assert t.state == TrialState.PRUNED
        assert "history" not in t.user_attrs and not t.intermediate_values  # never trained
        assert t.user_attrs["reason"]
        if "n_params" in t.user_attrs:
            assert spec.max_params is not None and t.user_attrs["n_params"] > spec.max_params
            assert "max_params" in t.user_attrs["reason"]
        assert t.constraints["max_params"] > 0  # the sampler is told
    return len(bad)


def test_no_trained_trial_exceeds_the_budget_and_infeasible_points_are_not_counted(
    sqlite_url: str, tiny_spec: Callable[..., StudySpec],
) -> None:
    # QMC is not budget-aware, and most of this space is over 400 parameters: it asks
    # infeasible points for sure.
    spec = tiny_spec(max_params=400, n_trials=4, sampler="qmc")
    study = run_study(spec, sqlite_url, show_progress=False)
    _assert_within_budget(study, spec)
    c = progress(study)
    assert c["finished"] == spec.n_trials == 4
    assert c["infeasible"] >= 1
    assert _assert_infeasible_recorded(study, spec) == c["infeasible"]
    assert c["total"] == c["finished"] + c["infeasible"]
    assert studies.study_state(study) == "done"


def test_an_unbuildable_point_is_infeasible_with_its_reason(
    sqlite_url: str, tiny_spec: Callable[..., StudySpec],
) -> None:
    # digits has 64 inputs: a dendrite cannot draw 128 distinct ones.
    space = {"n_neurons": [2], "n_dendrites": [2], "n_dendrite_inputs": [8, 128]}
    spec = tiny_spec(search_space=space, sampler="grid", n_trials=2)
    study = run_study(spec, sqlite_url, show_progress=False)
    bad = [t for t in study.trials if studies.is_infeasible(t)]
    assert [t.params["n_dendrite_inputs"] for t in bad] == [128]
    assert "builds no model" in bad[0].user_attrs["reason"] and "n_params" not in bad[0].user_attrs
    assert progress(study)["finished"] == 1


def test_resume_with_more_trials_continues_the_same_study(
    sqlite_url: str, tiny_spec: Callable[..., StudySpec],
) -> None:
    first = run_study(tiny_spec(n_trials=2), sqlite_url, show_progress=False)
    started = {t.number: t.datetime_start for t in first.trials}
    assert studies.study_state(first) == "done"
    again = run_study(tiny_spec(n_trials=4), sqlite_url, show_progress=False)
    assert again._study_id == first._study_id
    assert progress(again)["finished"] == 4
    assert {t.number: t.datetime_start for t in again.trials if t.number in started} == started
    assert studies.study_spec(again).n_trials == 4
    # Running it once more changes nothing: the study has what it asked for.
    assert len(run_study(tiny_spec(n_trials=4), sqlite_url, show_progress=False).trials) == len(again.trials)


def test_the_same_name_with_a_different_spec_is_refused(
    sqlite_url: str, tiny_spec: Callable[..., StudySpec],
) -> None:
    run_study(tiny_spec(), sqlite_url, show_progress=False)
    with pytest.raises(studies.StudyExistsError, match="different spec"):
        run_study(tiny_spec(n_epochs=2), sqlite_url, show_progress=False)


def test_a_study_name_is_validated_wherever_it_comes_from(
    sqlite_url: str, tiny_spec: Callable[..., StudySpec],
) -> None:
    with pytest.raises(ValueError, match="study name"):
        StudySpec.model_validate({**tiny_spec().model_dump(), "name": "ok\n../x"})  # fullmatch
    with pytest.raises(ValueError, match="study name"):
        studies.create_study(tiny_spec(), sqlite_url, study_name="../../etc/passwd")
    assert optuna.get_all_study_names(sqlite_url) == []


def test_grid_search_visits_each_grid_point_once_even_when_some_are_infeasible(
    sqlite_url: str, tiny_spec: Callable[..., StudySpec],
) -> None:
    grid = {"n_neurons": [2, 8], "n_dendrites": [2, 6], "n_dendrite_inputs": [4, 32]}
    # 8 points, 2 of them (8x6x32 and 8x2x32... ) over 700 parameters; ask for more trials
    # than the grid has: the study must end when the grid does.
    spec = tiny_spec(search_space=grid, sampler="grid", max_params=700, n_trials=20)
    study = run_study(spec, sqlite_url, show_progress=False)
    seen = [tuple(t.params[k] for k in grid) for t in study.trials]
    assert sorted(seen) == sorted(itertools.product(*grid.values()))
    assert progress(study)["infeasible"] >= 1
    assert studies.study_state(study) == "done"
    _assert_within_budget(study, spec)


@pytest.mark.parametrize("sampler", studies.SAMPLERS)
def test_every_sampler_runs_a_few_trials_under_the_budget(
    sqlite_url: str, tiny_spec: Callable[..., StudySpec], sampler: str,
) -> None:
    space = dict(tiny_spec().search_space)
    if sampler == "grid":
        space = {"n_neurons": [2, 4], "n_dendrites": [2], "n_dendrite_inputs": [4, 8]}
    spec = tiny_spec(search_space=space, sampler=sampler, n_trials=3, max_params=800)
    study = run_study(spec, sqlite_url, show_progress=False)
    assert progress(study)["finished"] == 3
    _assert_within_budget(study, spec)
    _assert_infeasible_recorded(study, spec)


@pytest.mark.parametrize("pruner", studies.PRUNERS)
def test_every_pruner_runs_a_few_trials(
    sqlite_url: str, tiny_spec: Callable[..., StudySpec], pruner: str,
) -> None:
    spec = tiny_spec(pruner=pruner, n_epochs=2, n_trials=3)
    study = run_study(spec, sqlite_url, show_progress=False)
    assert progress(study)["finished"] == 3
    for t in _trained(study):
        assert set(t.intermediate_values) <= {1, 2} and t.intermediate_values  # reported per epoch


def test_two_objectives_give_a_pareto_front(sqlite_url: str, tiny_spec: Callable[..., StudySpec]) -> None:
    spec = tiny_spec(objective=["val_accuracy", "n_params"], sampler="nsga2", n_trials=3)
    study = run_study(spec, sqlite_url, show_progress=False)
    front = study.best_trials
    assert front
    for t in front:
        assert len(t.values) == 2 and t.values[1] == t.user_attrs["n_params"]
        assert t.values[0] == t.user_attrs["val_accuracy"]


def _ask_many(sampler: optuna.samplers.BaseSampler, spec: StudySpec, n: int) -> int:
    """Asks ``n`` points through the budget gate with a made-up objective; infeasible count."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    bad = 0
    for _ in range(n):
        trial = study.ask()
        params = studies.suggest(trial, spec.space)
        count = studies.count_point(spec, params)
        trial.set_constraint("max_params", count - (spec.max_params or 0))
        if count > (spec.max_params or 0):
            bad += 1
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, math.log(count))
    return bad


def test_budget_aware_draws_avoid_most_infeasible_points(tiny_spec: Callable[..., StudySpec]) -> None:
    spec = tiny_spec(max_params=400, sampler="random")
    plain = _ask_many(optuna.samplers.RandomSampler(seed=0), spec, 30)
    aware = _ask_many(studies.make_sampler(spec), spec, 30)
    assert isinstance(studies.make_sampler(spec), BudgetAwareSampler)
    assert plain >= 8  # a third of the space is over budget ...
    assert aware <= 2  # ... yet nearly every proposal fits


def test_samplers_that_keep_state_are_not_wrapped(tiny_spec: Callable[..., StudySpec]) -> None:
    for sampler in ("cmaes", "qmc", "nsga2", "gp", "grid"):
        space = ({"n_neurons": [2, 4], "n_dendrites": [2], "n_dendrite_inputs": [4]}
                 if sampler == "grid" else tiny_spec().search_space)
        made = studies.make_sampler(tiny_spec(sampler=sampler, search_space=space))
        assert not isinstance(made, BudgetAwareSampler)
