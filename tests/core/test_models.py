"""The registry: every family builds, runs, gets gradients everywhere and counts exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core import (
    UnknownNameError,
    analytic_parameter_count,
    count_parameters,
    create_model,
    get_family,
    list_models,
    register_model,
)
from core.exceptions import DuplicateNameError


def _inputs(name: str) -> tuple[torch.Tensor, dict[str, Any]]:
    fam = get_family(name)
    if fam.input_kind == "image":
        return torch.randn(2, 3, 32, 32), {"in_channels": 3, "n_classes": 10}
    if fam.input_kind == "sequence":
        return torch.randn(3, 12, 2), {"in_dim": 2, "out_dim": 1}
    return torch.randn(4, 784), {}


@pytest.mark.parametrize("name", list_models())
def test_family_forward_gradients_and_count(name: str) -> None:
    x, io = _inputs(name)
    io = {k: v for k, v in io.items() if k in get_family(name).accepts}
    model = create_model(name, seed=0, **io)
    out = model(x)
    assert out.shape[0] == x.shape[0]
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert count_parameters(model) == analytic_parameter_count(name, **io)


def _lin(i: int, o: int) -> int:
    return i * o + o


@pytest.mark.parametrize(
    ("name", "params", "formula"),
    [
        ("dendritic_simple", {"n_neurons": 12, "n_dendrites": 6, "n_dendrite_inputs": 96},
         96 * 6 * 12 + 6 * 12 + 6 * 12 + 12 + _lin(12, 10)),
        ("dendritic_simple", {"n_neurons": 5, "n_dendrites": 3, "n_dendrite_inputs": 16, "soma_enabled": False},
         16 * 3 * 5 + 3 * 5 + _lin(15, 10)),
        ("soma_disabled", {"n_neurons": 1, "n_dendrites": 25, "n_dendrite_inputs": 64, "hidden_dim": 20},
         64 * 25 + 25 + _lin(25, 20) + _lin(20, 10)),
        ("dendritic_with_hidden", {"n_neurons": 10, "n_dendrites": 6, "n_dendrite_inputs": 64, "hidden_dim": 8},
         64 * 6 * 10 + 6 * 10 + 6 * 10 + 10 + _lin(10, 8) + _lin(8, 10)),
        ("vanilla_mlp", {"hidden_dim": 64}, _lin(784, 64) + _lin(64, 10)),
        ("vanilla_mlp", {"hidden_dim": 8, "n_hidden_layers": 2}, _lin(784, 8) + _lin(8, 8) + _lin(8, 10)),
        ("dendritic_simple", {"n_neurons": 12, "n_dendrites": 6, "n_dendrite_inputs": 96, "connectivity": "local"},
         96 * 6 * 12 + 6 * 12 + 6 * 12 + 12 + _lin(12, 10)),
        ("dendritic_conv", {"in_channels": 1, "n_units1": 8, "n_units2": 16, "n_dendrites": 4,
                            "n_dendrite_inputs1": 9, "n_dendrite_inputs2": 24, "pool_grid": 2},
         8 * 4 * (9 + 2) + 8 + 16 * 4 * (24 + 2) + 16 + 2 * (8 + 16) + _lin(16 * 2 * 2, 10)),
    ],
)
def test_counts_equal_hand_formulas(name: str, params: dict[str, Any], formula: int) -> None:
    assert analytic_parameter_count(name, **params) == formula
    assert count_parameters(create_model(name, **params)) == formula


def test_unknown_family_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="dendritic_simple"):
        create_model("no_such_family")


def test_unknown_argument_lists_what_the_family_takes() -> None:
    with pytest.raises(ValueError, match="n_dendrite_inputs"):
        create_model("dendritic_simple", n_synapses=3)


def test_bad_sizes_are_value_errors_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="n_neurons"):
        create_model("dendritic_simple", n_neurons=0)
    with pytest.raises(ValueError, match="hidden_dim"):
        analytic_parameter_count("vanilla_mlp", hidden_dim=-1)
    with pytest.raises(ValueError, match="n_dendrite_inputs"):
        analytic_parameter_count("dendritic_simple", in_dim=64, n_dendrite_inputs=65)


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(DuplicateNameError):
        register_model("vanilla_mlp", count=lambda **_: 0)(lambda **_: torch.nn.Identity())


def test_seed_makes_models_identical_without_touching_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = create_model("dendritic_simple", seed=7)
    b = create_model("dendritic_simple", seed=7)
    assert torch.equal(torch.rand(1), expected)
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("name", ["dendritic_simple", "soma_disabled", "dendritic_with_hidden"])
def test_dendritic_families_take_connectivity_without_changing_the_count(name: str) -> None:
    model = create_model(name, seed=0, connectivity="local", resample_reset_adam=False)
    layer = model[0]
    assert layer.connectivity == "local" and layer.image_shape == (1, 28, 28)
    assert not layer.resample_reset_adam
    assert count_parameters(model) == analytic_parameter_count(name, connectivity="local")
    assert analytic_parameter_count(name, connectivity="local") == analytic_parameter_count(name)
    assert torch.isfinite(model(torch.randn(2, 784))).all()
    small = create_model(name, in_dim=64, n_dendrite_inputs=9, connectivity="local",
                         input_shape=[1, 8, 8])
    assert small[0].patch_size == (3, 3)


def test_bad_connectivity_is_refused_by_the_count_before_building() -> None:
    with pytest.raises(ValueError, match="connectivity"):
        analytic_parameter_count("dendritic_simple", connectivity="grid")
    with pytest.raises(ValueError, match="input_shape"):
        analytic_parameter_count("dendritic_simple", in_dim=50, n_dendrite_inputs=8,
                                 connectivity="local")
