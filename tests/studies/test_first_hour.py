"""A new user's first hour: Pareto specs, family defaults that do not fit, plots that keep trial
numbers, and extending or resuming a study that is done."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

import studies
from studies import SpecError, StateError, StudySpec
from studies._results import make_plot

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

SPACE = {"n_neurons": [2, 4], "n_dendrites": [2], "n_dendrite_inputs": [8]}


def _spec(**kw: object) -> StudySpec:
    settings: dict[str, object] = {"name": "s", "dataset": "digits", "search_space": SPACE,
                                   "max_params": 3000, "n_trials": 3, "n_epochs": 2}
    settings.update(kw)
    return StudySpec.model_validate(settings)


def test_a_pareto_spec_naming_no_pruner_prunes_nothing() -> None:
    spec = _spec(objective=["val_accuracy", "n_params"])
    assert spec.pruner == "none"
    assert StudySpec.model_validate(spec.model_dump()).pruner == "none"
    assert _spec().pruner == "median", "one objective keeps the default pruner"


def test_a_pareto_spec_that_names_a_pruner_is_still_refused() -> None:
    with pytest.raises(ValueError, match="pruning needs a single objective"):
        _spec(objective=["val_accuracy", "n_params"], pruner="median")


def test_a_family_default_that_does_not_fit_the_dataset_is_named_as_the_default() -> None:
    # dendritic_simple's n_dendrite_inputs defaults to 96; digits has 64 inputs
    with pytest.raises(ValueError) as info:
        StudySpec(name="d", dataset="digits", max_params=5000,
                  search_space={"n_neurons": [4], "n_dendrites": [2]})
    text = str(info.value)
    assert "defaults to n_dendrite_inputs=96" in text and "'digits'" in text
    assert "set n_dendrite_inputs in search_space or model_params" in text


def test_a_misfit_the_user_chose_is_still_reported_as_theirs() -> None:
    with pytest.raises(ValueError) as info:
        StudySpec(name="d", dataset="digits", max_params=5000,
                  search_space={"n_neurons": [4], "n_dendrites": [2], "n_dendrite_inputs": [100]})
    assert "defaults to" not in str(info.value) and "no point of the space builds a model" in str(info.value)


@pytest.fixture
def gappy(sqlite_url: str) -> optuna.Study:
    """A study whose trial 1 failed and trial 3 was pruned: trials 0, 2 and 4 completed."""
    study = studies.create_study(_spec(name="gappy"), sqlite_url)
    dist = {"n_neurons": IntDistribution(2, 4)}
    for number, state, value in [(0, TrialState.COMPLETE, 0.5), (1, TrialState.FAIL, None),
                                 (2, TrialState.COMPLETE, 0.7), (3, TrialState.PRUNED, None),
                                 (4, TrialState.COMPLETE, 0.6)]:
        history = [{"epoch": 1, "val_accuracy": 0.3}, {"epoch": 2, "val_accuracy": value or 0.3}]
        study.add_trial(create_trial(
            state=state, value=value, params={"n_neurons": 2 + number % 3}, distributions=dist,
            user_attrs={"n_params": 100 + number, "val_accuracy": value, "history": history},
            intermediate_values={1: 0.3} if state != TrialState.FAIL else {},
        ))
        assert study.trials[-1].number == number
    return study


def test_the_history_plot_keeps_the_trial_numbers(gappy: optuna.Study) -> None:
    fig = make_plot(gappy, "history")
    points, best = fig.data[0], fig.data[1]
    assert list(points.x) == [0, 2, 4], "trial 2 stays 2 although trial 1 failed"
    assert list(points.y) == [0.5, 0.7, 0.6]
    assert list(best.y) == [0.5, 0.7, 0.7]
    assert fig.layout.xaxis.title.text == "trial number"


def test_the_intermediate_plot_names_each_curve_by_its_trial_number(gappy: optuna.Study) -> None:
    fig = make_plot(gappy, "intermediate")
    assert sorted(tr.name for tr in fig.data) == ["trial 0", "trial 2", "trial 3", "trial 4"]
    assert all(set(tr.customdata) == {int(tr.name.split()[1])} for tr in fig.data)


def test_the_html_report_plots_the_real_trial_numbers(gappy: optuna.Study, tmp_path: Path) -> None:
    (path,) = studies.export_study(gappy, tmp_path / "out", formats=("html",))
    text = path.read_text()
    assert '"x":[0,2,4]' in text.replace(" ", ""), "the report's history plot uses trial numbers"


def _done(sqlite_url: str, n_trials: int = 2, **kw: object) -> optuna.Study:
    study = studies.create_study(_spec(name="ext", n_trials=n_trials, **kw), sqlite_url)
    for i in range(n_trials):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, params={"n_neurons": 2},
                                     distributions={"n_neurons": IntDistribution(2, 4)},
                                     user_attrs={"n_params": 100 + i}))
    study.set_user_attr(studies.STATE_ATTR, "done")
    return study


def test_extending_a_done_study_runs_it_again(sqlite_url: str) -> None:
    study = _done(sqlite_url)
    assert studies.extend_study(study, n_trials=5) == "running"
    assert studies.study_spec(study).n_trials == 5 and studies.study_state(study) == "running"


def test_extending_a_stopped_study_keeps_it_stopped(sqlite_url: str) -> None:
    study = _done(sqlite_url)
    study.set_user_attr(studies.STATE_ATTR, "stopped")
    assert studies.extend_study(study, n_trials=5) == "stopped"
    assert studies.study_spec(study).n_trials == 5


@pytest.mark.parametrize("n_trials", [1, 2])
def test_extending_to_no_more_than_the_finished_trials_is_refused(sqlite_url: str, n_trials: int) -> None:
    study = _done(sqlite_url)
    with pytest.raises(SpecError, match="has 2 finished trials") as info:
        studies.extend_study(study, n_trials=n_trials)
    assert info.value.field == "n_trials"
    assert studies.study_spec(study).n_trials == 2 and studies.study_state(study) == "done"


def test_extending_needs_a_number(sqlite_url: str) -> None:
    with pytest.raises(SpecError, match="give a new n_trials"):
        studies.extend_study(_done(sqlite_url))


def test_a_study_in_error_cannot_be_extended(sqlite_url: str) -> None:
    study = _done(sqlite_url)
    study.set_user_attr(studies.STATE_ATTR, "error")
    study.set_user_attr("dendro.error", "invalid spec: model: unknown model family 'mine'")
    with pytest.raises(StateError, match="unknown model family 'mine'"):
        studies.extend_study(study, n_trials=5)


def test_a_timeout_that_has_passed_must_be_raised_too(sqlite_url: str) -> None:
    study = _done(sqlite_url, timeout=1.0)
    study.set_user_attr("dendro.started_at", 0.0)
    with pytest.raises(SpecError, match="past its timeout") as info:
        studies.extend_study(study, n_trials=5)
    assert info.value.field == "timeout"
    assert studies.extend_study(study, n_trials=5, timeout=1e12) == "running"


def test_resume_restarts_a_done_study_with_trials_left_and_refuses_one_without(sqlite_url: str) -> None:
    study = _done(sqlite_url)
    with pytest.raises(StateError, match="it is done"):
        studies.resume_study(study)
    spec = studies.study_spec(study).model_copy(update={"n_trials": 4})
    study.set_user_attr(studies.SPEC_ATTR, spec.public_dict())
    assert studies.resume_study(study) == "running"
    study.set_user_attr(studies.STATE_ATTR, "stopped")
    assert studies.resume_study(study) == "running"
