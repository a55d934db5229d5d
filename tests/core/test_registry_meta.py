"""Families registered without a count: exact counts from a meta-device build, and budgets."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import core
from core import _registry


@pytest.fixture
def register() -> Iterator[Callable[..., Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]]]:
    """core.register_model, undone after the test so the registry stays as the suite found it."""
    names: list[str] = []

    def reg(name: str, **kw: object) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
        names.append(name)
        return core.register_model(name, **kw)  # type: ignore[arg-type]

    yield reg
    for name in names:
        _registry._MODELS.pop(name, None)
        for key in [k for k in _registry._META_CACHE if k[0] == name]:
            _registry._META_CACHE.pop(key)


def _two_dendrites(calls: list[str] | None = None) -> Callable[..., nn.Module]:
    def two_dendritic_layers(
        *, in_dim: int = 64, n_classes: int = 10, n1: int = 8, n2: int = 4, k: int = 8,
        n_dendrites: int = 3, soma: bool = True,
    ) -> nn.Module:
        """DendriticLayer -> LeakyReLU -> DendriticLayer -> Linear: a user's family, no count."""
        if calls is not None:
            calls.append("built")
        first = core.DendriticLayer(in_dim, n1, k, n_dendrites, soma_enabled=soma)
        second = core.DendriticLayer(first.out_dim, n2, min(k, first.out_dim), n_dendrites)
        return nn.Sequential(first, nn.LeakyReLU(0.1), second, nn.Linear(second.out_dim, n_classes))

    return two_dendritic_layers


def _hand_count(in_dim: int, n_classes: int, n1: int, n2: int, k: int, d: int, soma: bool) -> int:
    first = n1 * d * (k + 1) + (n1 * d + n1 if soma else 0)
    width = n1 if soma else n1 * d
    k2 = min(k, width)
    second = n2 * d * (k2 + 1) + n2 * d + n2
    return first + second + n2 * n_classes + n_classes


@pytest.mark.parametrize("args", [
    {}, {"in_dim": 784, "n1": 12, "k": 32}, {"soma": False, "n_dendrites": 5}, {"n2": 1, "k": 2},
])
def test_a_family_without_count_is_counted_exactly(register: Callable[..., object], args: dict) -> None:
    register("meta_two_dendrites")(_two_dendrites())
    full = {"in_dim": 64, "n_classes": 10, "n1": 8, "n2": 4, "k": 8, "n_dendrites": 3, "soma": True, **args}
    n = core.analytic_parameter_count("meta_two_dendrites", **args)
    assert n == core.count_parameters(core.create_model("meta_two_dendrites", **args))
    assert n == _hand_count(full["in_dim"], full["n_classes"], full["n1"], full["n2"], full["k"],
                            full["n_dendrites"], full["soma"])
    assert core.get_family("meta_two_dendrites").count is None


def test_meta_counts_are_cached_cost_no_memory_and_leave_the_random_state_alone(
    register: Callable[..., object],
) -> None:
    calls: list[str] = []
    register("meta_cached")(_two_dendrites(calls))
    state = torch.random.get_rng_state()
    start = time.perf_counter()
    big = core.analytic_parameter_count("meta_cached", in_dim=20_000, n1=1000, k=100)
    assert time.perf_counter() - start < 1.0  # nothing of the 240 MB a real build draws
    assert big == _hand_count(20_000, 10, 1000, 4, 100, 3, True)
    assert torch.equal(state, torch.random.get_rng_state())
    core.analytic_parameter_count("meta_cached", in_dim=20_000, n1=1000, k=100)
    assert calls == ["built"]


def test_a_builder_error_is_raised_by_the_count(register: Callable[..., object]) -> None:
    register("meta_errors")(_two_dendrites())
    with pytest.raises(ValueError, match="n_dendrite_inputs must be at most in_dim=4"):
        core.analytic_parameter_count("meta_errors", in_dim=4, k=8)
    with pytest.raises(ValueError, match="does not take 'width'"):
        core.analytic_parameter_count("meta_errors", width=3)


def test_a_builder_that_needs_real_tensors_is_counted_on_the_cpu(register: Callable[..., object]) -> None:
    @register("meta_needs_values")
    def needs_values(*, in_dim: int = 6, n_classes: int = 2) -> nn.Module:
        widths = (torch.arange(3) + 2).tolist()  # reads values: impossible on meta
        layers = [nn.Linear(in_dim if i == 0 else widths[i - 1], w) for i, w in enumerate(widths)]
        return nn.Sequential(*layers, nn.Linear(widths[-1], n_classes))

    expected = (6 * 2 + 2) + (2 * 3 + 3) + (3 * 4 + 4) + (4 * 2 + 2)
    assert core.analytic_parameter_count("meta_needs_values") == expected


def test_registration_checks_its_arguments(register: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match="input_kind must be"):
        register("meta_bad_kind", input_kind="graph")
    with pytest.raises(TypeError, match="count must be a function"):
        register("meta_bad_count", count=5)
    register("meta_dup")(_two_dendrites())
    with pytest.raises(core.DuplicateNameError):
        core.register_model("meta_dup")(_two_dendrites())


def test_the_budget_gate_works_with_a_count_less_family(register: Callable[..., object]) -> None:
    from pydantic import ValidationError

    import studies

    register("meta_budget")(_two_dendrites())
    space = {"n1": {"type": "int", "low": 2, "high": 16}, "k": [2, 4, 8], "n2": [1, 2, 4]}
    spec = studies.StudySpec(model="meta_budget", dataset="digits", search_space=space, max_params=2000)
    n, point = studies.smallest_point(spec)
    assert point == {"n1": 2, "k": 2, "n2": 1}
    assert n == _hand_count(64, 10, 2, 1, 2, 3, True)
    with pytest.raises(ValidationError, match=f"smallest model has {n} parameters"):
        studies.StudySpec(model="meta_budget", dataset="digits", search_space=space, max_params=n - 1)
    # ~170 distinct points, each counted as its model would be built (no wall-clock bound here:
    # it failed at 3.1 s on a loaded 2-core CI machine; speed belongs in bench/)
    points = [(n1, k) for n1 in range(2, 60) for k in (2, 4, 8)]
    counts = [studies.count_point(spec, {"n1": n1, "k": k, "n2": 2}) for n1, k in points]
    assert counts == [_hand_count(64, 10, n1, 2, k, 3, True) for n1, k in points]
