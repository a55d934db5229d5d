"""The study spec and search spaces: the issue's JSON as is, seed formats, and errors that name the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import optuna
import pydantic
import pytest

import core
import studies
from studies import (
    BudgetError,
    SpecError,
    StudySpec,
    count_point,
    parse_space,
    smallest_point,
    suggest,
)
from studies._spec import split_params

ISSUE_3_JSON = """
{"name": "fmnist-8k", "model": "dendritic_simple", "dataset": "fashion-mnist",
 "max_params": 8000, "n_trials": 50, "n_epochs": 15, "batch_size": 256,
 "search_space": {
   "n_neurons": {"type": "int", "low": 5, "high": 20},
   "n_dendrites": {"type": "int", "low": 3, "high": 15},
   "n_dendrite_inputs": {"type": "int", "low": 16, "high": 256, "log": true},
   "lr": {"type": "float", "low": 0.0001, "high": 0.01, "log": true},
   "synaptic_resampling": [true, false]},
 "sampler": "tpe", "pruner": "median"}
"""


def _error(fn: Callable[[], Any]) -> tuple[str, Exception | None]:
    """The message of the spec error ``fn`` raises, and the studies error inside it."""
    with pytest.raises((pydantic.ValidationError, SpecError)) as info:
        fn()
    exc = info.value
    if isinstance(exc, pydantic.ValidationError):
        inner = (exc.errors()[0].get("ctx") or {}).get("error")
        return str(exc), inner
    return str(exc), exc


def test_issue_3_json_is_accepted_as_is_and_means_what_it_says() -> None:
    spec = StudySpec.model_validate(json.loads(ISSUE_3_JSON))
    assert (spec.name, spec.model, spec.dataset) == ("fmnist-8k", "dendritic_simple", "fashion-mnist")
    assert (spec.max_params, spec.n_trials, spec.n_epochs, spec.batch_size) == (8000, 50, 15, 256)
    assert (spec.sampler, spec.pruner) == ("tpe", "median")
    assert spec.objectives == ["val_accuracy"] and spec.directions == ["maximize"]
    space = spec.space
    assert (space["n_neurons"].kind, space["n_neurons"].low, space["n_neurons"].high) == ("int", 5, 20)
    assert space["n_dendrite_inputs"].log and space["n_dendrite_inputs"].kind == "int"
    assert space["lr"].kind == "float" and space["lr"].log
    assert space["synaptic_resampling"].choices == (True, False)
    # The stored form is the same spec again (it travels through the database as JSON).
    assert StudySpec.model_validate(json.loads(json.dumps(spec.public_dict()))) == spec


def test_unknown_top_level_key_is_an_error_naming_it(tiny_spec: Callable[..., StudySpec]) -> None:
    msg, _ = _error(lambda: tiny_spec(n_trails=5))
    assert "n_trails" in msg


def test_unknown_key_inside_a_parameter_is_an_error_naming_both(tiny_spec: Callable[..., StudySpec]) -> None:
    space = {"n_neurons": {"type": "int", "low": 2, "high": 4, "stepp": 1}}
    msg, inner = _error(lambda: tiny_spec(search_space=space))
    assert "stepp" in msg
    assert isinstance(inner, SpecError) and inner.field == "search_space.n_neurons"


@pytest.mark.parametrize(
    "definition",
    [{"type": "int", "low": 10, "high": 5}, (9, 3), {"type": "float", "low": 0.5, "high": 0.1}, []],
)
def test_empty_range_or_choice_list_is_an_error_naming_the_parameter(
    tiny_spec: Callable[..., StudySpec], definition: Any
) -> None:
    msg, inner = _error(lambda: tiny_spec(search_space={"n_neurons": definition}))
    assert "search_space.n_neurons" in msg
    assert isinstance(inner, SpecError) and inner.field == "search_space.n_neurons"


def test_a_family_that_does_not_take_a_searched_parameter_is_named(
    tiny_spec: Callable[..., StudySpec],
) -> None:
    msg, inner = _error(lambda: tiny_spec(search_space={**tiny_spec().search_space, "hidden_dim": [4, 8]}))
    assert isinstance(inner, SpecError) and inner.field == "search_space.hidden_dim"
    assert "dendritic_simple" in msg and "hidden_dim" in msg


def test_a_parameter_taken_by_one_searched_architecture_is_allowed(
    tiny_spec: Callable[..., StudySpec],
) -> None:
    spec = tiny_spec(search_space={**tiny_spec().search_space,
                                   "architecture": ["dendritic_simple", "soma_disabled"],
                                   "hidden_dim": [4, 8], "soma_enabled": [True, False]})
    assert spec.families == ["dendritic_simple", "soma_disabled"]
    family, args, _ = split_params(spec, {"architecture": "dendritic_simple", "hidden_dim": 4,
                                          "soma_enabled": False})
    assert family == "dendritic_simple" and "hidden_dim" not in args and args["soma_enabled"] is False


def test_impossible_budget_names_max_params_the_smallest_count_and_its_point(
    tiny_spec: Callable[..., StudySpec],
) -> None:
    n, point = smallest_point(tiny_spec(max_params=None))
    # by hand: 2*2*4 dendrite weights + 2*2 biases + 2*2 soma weights + 2 soma biases + (2*10+10)
    assert n == 16 + 4 + 4 + 2 + 30 == 56
    assert point == {"n_neurons": 2, "n_dendrites": 2, "n_dendrite_inputs": 4}
    msg, inner = _error(lambda: tiny_spec(max_params=50))
    assert isinstance(inner, BudgetError) and inner.field == "max_params"
    assert inner.min_params == 56 and inner.min_point == point
    assert "max_params" in msg and "56" in msg and str(point) in msg


def test_grid_over_a_float_range_without_step_is_an_error(tiny_spec: Callable[..., StudySpec]) -> None:
    space = {**tiny_spec().search_space, "lr": {"type": "float", "low": 1e-3, "high": 1e-2}}
    msg, inner = _error(lambda: tiny_spec(search_space=space, sampler="grid"))
    assert isinstance(inner, SpecError) and inner.field == "search_space.lr" and "step" in msg


def test_two_objectives_give_two_directions_and_refuse_a_pruner(tiny_spec: Callable[..., StudySpec]) -> None:
    spec = tiny_spec(objective=["val_accuracy", "n_params"])
    assert spec.directions == ["maximize", "minimize"]
    _, inner = _error(lambda: tiny_spec(objective=["val_accuracy", "n_params"], pruner="median"))
    assert isinstance(inner, SpecError) and inner.field == "pruner"


def test_seed_formats_parse_to_the_right_kinds() -> None:
    space = parse_space({
        "n_neurons": (8, 15),
        "percentage_resample": (0.1, 0.5),
        "n_dendrites": [4, 6, 8, 10],
        "n_dendrite_inputs": {"type": "randint", "low": 32, "high": 200},
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    })
    kinds = {name: (p.kind, p.log) for name, p in space.items()}
    assert kinds == {
        "n_neurons": ("int", False), "percentage_resample": ("float", False),
        "n_dendrites": ("categorical", False), "n_dendrite_inputs": ("int", False),
        "lr": ("float", True),
    }


def test_a_search_space_is_a_pure_function_of_the_trial() -> None:
    space = parse_space({
        "n_neurons": (8, 15),
        "n_dendrites": [4, 6, 8],
        "n_dendrite_inputs": {"type": "int", "low": 16, "high": 256, "log": True},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "synaptic_resampling": [True, False],
    })
    point = {"n_neurons": 9, "n_dendrites": 6, "n_dendrite_inputs": 100, "lr": 3e-3,
             "synaptic_resampling": False}
    first = suggest(optuna.trial.FixedTrial(point), space)
    again = suggest(optuna.trial.FixedTrial(point), space)
    assert first == again == point
    with pytest.raises(ValueError):  # a value outside the choices is not silently accepted
        suggest(optuna.trial.FixedTrial({**point, "n_dendrites": 5}), space)


@pytest.mark.parametrize("family", ["dendritic_simple", "soma_disabled", "dendritic_with_hidden"])
def test_count_point_is_the_built_models_exact_count(family: str) -> None:
    spec = StudySpec(model=family, dataset="digits")
    for point in ({"n_neurons": 3, "n_dendrites": 4, "n_dendrite_inputs": 16},
                  {"n_neurons": 7, "n_dendrites": 2, "n_dendrite_inputs": 64}):
        fam, args, _ = split_params(spec, point)
        assert count_point(spec, point) == core.count_parameters(core.create_model(fam, **args))


def test_samplers_and_pruners_listed_are_the_issues() -> None:
    assert set(studies.SAMPLERS) == {"tpe", "random", "grid", "cmaes", "qmc", "nsga2", "gp"}
    assert set(studies.PRUNERS) == {"median", "hyperband", "successive_halving", "none"}
