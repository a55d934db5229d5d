"""DendriticConv2d and the dendritic_conv family: definition, exact counts, budget fit, learning."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn import functional as F

from core import (
    DendriticConv2d,
    analytic_parameter_count,
    count_parameters,
    create_model,
    load_dataset,
    train_model,
)


def _conv(**kw: Any) -> DendriticConv2d:
    args: dict[str, Any] = {"in_channels": 3, "n_units": 4, "n_dendrites": 3,
                            "n_dendrite_inputs": 5, "kernel_size": 3, "seed": 1}
    args.update(kw)
    return DendriticConv2d(**args)


def test_each_dendrite_reads_k_distinct_inputs_of_its_window() -> None:
    layer = _conv()
    assert layer.indices.shape == (12, 5)
    for row in layer.indices.tolist():
        assert len(set(row)) == 5 and min(row) >= 0 and max(row) < 3 * 3 * 3
    assert torch.equal(_conv(seed=2).indices, _conv(seed=2).indices)
    assert not torch.equal(_conv(seed=2).indices, _conv(seed=3).indices)


def test_only_real_connections_are_parameters() -> None:
    layer = _conv()
    assert count_parameters(layer) == 12 * 5 + 12 + 12 + 4 == DendriticConv2d.count(4, 3, 5)
    kernel = layer.dense_kernel().detach().flatten(1)
    assert int((kernel != 0).sum()) == 12 * 5  # the masked entries are constants, not weights
    layer(torch.randn(2, 3, 6, 6)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (12, 5)


def test_forward_matches_the_definition_at_every_position() -> None:
    layer = _conv()
    x = torch.randn(2, 3, 7, 6)
    patches = F.unfold(x, 3, padding=1)  # (B, C*3*3, H*W): every position's window
    windows = patches[:, layer.indices]  # (B, D, k, H*W)
    z = torch.einsum("bdkp,dk->bdp", windows, layer.weight.detach()) + layer.bias.detach()[:, None]
    dend = F.leaky_relu(z, 0.1).view(2, 4, 3, 7 * 6)
    soma = (dend * layer.soma_weight.detach()[None, :, :, None]).sum(2)
    expected = F.leaky_relu(soma + layer.soma_bias.detach()[None, :, None], 0.1).view(2, 4, 7, 6)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def _formula(c: int, u1: int, u2: int, d: int, k1: int, k2: int, grid: int, bn: bool) -> int:
    stage1 = u1 * d * k1 + u1 * d + u1 * d + u1  # dendrite weights and biases, soma weights, soma bias
    stage2 = u2 * d * k2 + u2 * d + u2 * d + u2
    return stage1 + stage2 + (2 * (u1 + u2) if bn else 0) + u2 * grid * grid * 10 + 10


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"in_channels": 3, "n_units1": 12, "n_units2": 16, "n_dendrites": 6,
         "n_dendrite_inputs1": 20, "n_dendrite_inputs2": 40, "kernel_size": 5, "pool_grid": 3},
        {"n_units1": 5, "n_units2": 7, "n_dendrites": 2, "n_dendrite_inputs2": 45,
         "pool_grid": 1, "batch_norm": False},
    ],
)
def test_count_equals_the_hand_formula(params: dict[str, Any]) -> None:
    p = {"in_channels": 1, "n_units1": 12, "n_units2": 24, "n_dendrites": 6,
         "n_dendrite_inputs1": 9, "n_dendrite_inputs2": 32, "kernel_size": 3, "pool_grid": 2,
         "batch_norm": True, **params}
    expected = _formula(p["in_channels"], p["n_units1"], p["n_units2"], p["n_dendrites"],
                        p["n_dendrite_inputs1"], p["n_dendrite_inputs2"], p["pool_grid"],
                        p["batch_norm"])
    assert analytic_parameter_count("dendritic_conv", **params) == expected
    assert count_parameters(create_model("dendritic_conv", seed=0, **params)) == expected


def test_the_defaults_fit_the_fashion_mnist_budget() -> None:
    n = analytic_parameter_count("dendritic_conv", in_channels=1)
    assert n == 6766  # 12 and 24 units of 6 dendrites; 90.6% test on Fashion-MNIST (docstring)
    out = create_model("dendritic_conv", seed=0)(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_bad_sizes_are_value_errors_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="n_dendrite_inputs2"):
        analytic_parameter_count("dendritic_conv", n_units1=2, n_dendrite_inputs2=19)
    with pytest.raises(ValueError, match="n_dendrite_inputs2"):
        create_model("dendritic_conv", n_units1=2, n_dendrite_inputs2=19)
    with pytest.raises(ValueError, match="kernel_size"):
        analytic_parameter_count("dendritic_conv", kernel_size=4)
    with pytest.raises(ValueError, match="n_units1"):
        analytic_parameter_count("dendritic_conv", n_units1=0)


def test_learns_digits_well_above_chance() -> None:
    digits = load_dataset("digits", flatten=False)
    model = create_model("dendritic_conv", seed=0, in_channels=1, n_units1=8, n_units2=8,
                         n_dendrite_inputs2=16, pool_grid=1)
    r = train_model(model, digits, n_epochs=5, lr=1e-2, batch_size=64, seed=0)
    assert r.status == "completed"
    assert r.test_accuracy is not None and r.test_accuracy > 0.7  # chance is 0.1


def test_resampling_is_off_by_default_and_keeps_k_distinct_when_on() -> None:
    layer = _conv()
    assert layer.resample() == 0
    layer = _conv(synaptic_resampling=True, n_dendrite_inputs=8, percentage_resample=0.25)
    before = layer.indices.clone()
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
    weakest = layer.weight.abs().topk(2, dim=1, largest=False).indices
    assert layer.resample() == 12 * 2
    for r, row in enumerate(layer.indices.tolist()):
        assert len(set(row)) == 8 and max(row) < 27
        for slot in range(8):
            moved = slot in weakest[r].tolist()
            assert (row[slot] not in before[r].tolist()) if moved else row[slot] == before[r, slot]
    assert count_parameters(layer) == DendriticConv2d.count(4, 3, 8)


def test_train_model_resamples_conv_dendrites() -> None:
    digits = load_dataset("digits", flatten=False, subset_size=200)
    model = create_model("dendritic_conv", seed=0, n_units1=4, n_units2=4, n_dendrite_inputs2=8,
                         pool_grid=1, synaptic_resampling=True, steps_to_resample=3)
    stage1, stage2 = model[0], model[3]
    idx = stage2.indices.clone()
    train_model(model, digits, n_epochs=1, batch_size=30)  # 6 steps: 2 resamplings
    assert stage1.n_swapped == 0  # its dendrites read their whole 1x3x3 window: nothing to swap
    assert stage2.n_swapped == 2 * (4 * 6) * 2  # resamplings * rows * floor(8 * 0.25)
    assert not torch.equal(stage2.indices.cpu(), idx)
