"""DIRU and the LSTM/GRU baselines, their exact counts, and the seeded time-series generators."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import core
from core import (
    DIRU,
    DendriteCompartment,
    DIRUCell,
    GRUModel,
    LSTMModel,
    analytic_parameter_count,
    count_parameters,
    create_model,
    evaluate,
    get_family,
    load_dataset,
    train_model,
)
from core._timeseries import _lorenz_rk4

FAMILIES = ["diru", "lstm", "gru"]
TASKS = ["multi_sine", "delay_recall", "lorenz"]


def _small(name: str, **kw: Any) -> core.Dataset:
    return load_dataset(name, seed=0, n_samples=60, n_test=20, seq_len=12, **kw)


# -- models ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_forward_shape_is_last_step_or_every_step(
    family: str, num_layers: int, return_sequences: bool
) -> None:
    model = create_model(family, seed=0, in_dim=3, out_dim=2, hidden_size=8,
                         num_layers=num_layers, return_sequences=return_sequences)
    out = model(torch.randn(5, 7, 3))
    assert out.shape == ((5, 7, 2) if return_sequences else (5, 2))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("return_sequences", [False, True])
def test_every_parameter_gets_a_gradient(family: str, return_sequences: bool) -> None:
    model = create_model(family, seed=0, in_dim=2, out_dim=3, hidden_size=6, num_layers=2,
                         return_sequences=return_sequences)
    model(torch.randn(4, 5, 2)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "params",
    [
        {"in_dim": 1, "out_dim": 1, "hidden_size": 1},
        {"in_dim": 3, "out_dim": 2, "hidden_size": 13, "num_layers": 2},
        {"in_dim": 5, "out_dim": 4, "hidden_size": 10, "num_layers": 3, "return_sequences": True},
    ],
)
def test_count_parameters_equals_analytic_count(family: str, params: dict[str, int]) -> None:
    model = create_model(family, **params)
    assert count_parameters(model) == analytic_parameter_count(family, **params)


@pytest.mark.parametrize("num_compartments", [1, 3, 4, 7, 20])
def test_diru_count_equals_analytic_count_for_any_compartment_number(
    num_compartments: int,
) -> None:
    params = {"in_dim": 2, "out_dim": 3, "hidden_size": 10, "num_layers": 2,
              "num_compartments": num_compartments}
    model = create_model("diru", **params)
    assert count_parameters(model) == analytic_parameter_count("diru", **params)


def test_diru_count_matches_hand_formula() -> None:
    i, h, k, o = 3, 10, 4, 2
    d = 3  # ceil(10 / 4)
    compartments = k * (2 * d * i + 2 * d * h + 2 * d)
    integration = k * d * h + h
    global_gate = h * (i + h) + h
    readout = h * o + o
    first = compartments + integration + global_gate
    second = k * (2 * d * h + 2 * d * h + 2 * d) + integration + h * (h + h) + h
    assert analytic_parameter_count("diru", in_dim=i, out_dim=o, hidden_size=h,
                                    num_compartments=k) == first + readout == 628
    assert analytic_parameter_count("diru", in_dim=i, out_dim=o, hidden_size=h,
                                    num_compartments=k, num_layers=2) == first + second + readout


@pytest.mark.parametrize(("family", "gates"), [("lstm", 4), ("gru", 3)])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_lstm_and_gru_counts_match_pytorch_hand_formula(
    family: str, gates: int, num_layers: int
) -> None:
    i, h, o = 3, 11, 2
    # PyTorch stores weight_ih, weight_hh, bias_ih and bias_hh for every gate.
    per_layer = [gates * (h * (n_in + h) + 2 * h) for n_in in [i] + [h] * (num_layers - 1)]
    expected = sum(per_layer) + h * o + o
    params = {"in_dim": i, "out_dim": o, "hidden_size": h, "num_layers": num_layers}
    assert analytic_parameter_count(family, **params) == expected
    assert count_parameters(create_model(family, **params)) == expected


def test_recurrent_families_are_registered_as_sequence_regression() -> None:
    for family in FAMILIES:
        fam = get_family(family)
        assert fam.input_kind == "sequence" and fam.task == "regression"
        assert {"in_dim", "out_dim", "hidden_size", "num_layers", "return_sequences"} <= fam.accepts
        assert "n_classes" not in fam.accepts
    assert "num_compartments" in get_family("diru").accepts
    assert "num_compartments" not in get_family("lstm").accepts


def test_same_seed_builds_the_same_model() -> None:
    a = create_model("diru", seed=3, in_dim=2, hidden_size=8)
    b = create_model("diru", seed=3, in_dim=2, hidden_size=8)
    c = create_model("diru", seed=4, in_dim=2, hidden_size=8)
    x = torch.randn(2, 4, 2)
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), c(x))


def test_diru_cell_is_its_compartments_integrated_under_the_global_gate() -> None:
    torch.manual_seed(0)
    cell = DIRUCell(input_size=3, hidden_size=7, num_compartments=3)
    x, h = torch.randn(4, 3), torch.randn(4, 7)
    local = torch.cat([c(x, h) for c in cell.compartments], dim=1)
    candidate = torch.tanh(cell.integration(local))
    gate = torch.sigmoid(cell.global_gate(torch.cat([x, h], dim=1)))
    expected = (1 - gate) * h + gate * candidate
    torch.testing.assert_close(cell(x, h), expected)


def test_diru_runs_its_cells_step_by_step() -> None:
    torch.manual_seed(0)
    model = DIRU(input_size=2, hidden_size=5, output_size=1, num_layers=2,
                 return_sequences=True)
    x = torch.randn(3, 6, 2)
    seq = x
    for cell in model.cells:
        h = torch.zeros(3, 5)
        states = []
        for t in range(x.shape[1]):
            h = cell(seq[:, t], h)
            states.append(h)
        seq = torch.stack(states, dim=1)
    torch.testing.assert_close(model(x), model.readout(seq))


def test_negative_global_gate_bias_starts_the_cell_retaining_its_state() -> None:
    torch.manual_seed(0)
    model = DIRU(2, 6, 1, num_layers=2, global_gate_bias=-4.0)
    for cell in model.cells:
        assert isinstance(cell, DIRUCell)
        assert torch.equal(cell.global_gate.bias, torch.full((6,), -4.0))
    x, h = torch.randn(100, 6), torch.randn(100, 6)
    cell = model.cells[1]
    assert isinstance(cell, DIRUCell)
    gate = torch.sigmoid(cell.global_gate(torch.cat([x, h], dim=1)))
    assert gate.mean() < 0.1  # sigmoid(-4) ~ 0.02: mostly the previous state is kept


def test_compartment_output_is_gated_candidate() -> None:
    comp = DendriteCompartment(input_size=2, hidden_size=3, size=4)
    out = comp(torch.randn(5, 2), torch.randn(5, 3))
    assert out.shape == (5, 4)
    assert out.abs().max() < 1  # sigmoid(.) * tanh(.)
    assert count_parameters(comp) == 2 * 4 * (2 + 3 + 1)


def test_baselines_take_the_diru_interface() -> None:
    x = torch.randn(2, 5, 3)
    for cls in (DIRU, LSTMModel, GRUModel):
        model = cls(input_size=3, hidden_size=4, output_size=2, num_layers=2, dropout=0.1,
                    return_sequences=True)
        assert model(x).shape == (2, 5, 2)


@pytest.mark.parametrize(
    ("family", "params", "named"),
    [
        ("diru", {"hidden_size": 0}, "hidden_size"),
        ("diru", {"num_compartments": 0}, "num_compartments"),
        ("diru", {"in_dim": 0}, "in_dim"),
        ("lstm", {"out_dim": -1}, "out_dim"),
        ("gru", {"num_layers": 0}, "num_layers"),
        ("gru", {"hidden_size": 2.5}, "hidden_size"),
    ],
)
def test_invalid_family_arguments_raise_value_error_naming_them(
    family: str, params: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        create_model(family, **params)
    with pytest.raises(ValueError, match=named):
        analytic_parameter_count(family, **params)


def test_invalid_model_arguments_and_inputs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="dropout"):
        DIRU(2, 4, 1, dropout=1.0)
    with pytest.raises(ValueError, match="num_compartments"):
        DIRUCell(2, 4, num_compartments=0)
    with pytest.raises(ValueError, match=r"\(batch, time >= 1, 2\)"):
        DIRU(2, 4, 1)(torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"\(batch, time >= 1, 2\)"):
        LSTMModel(2, 4, 1)(torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match="time >= 1"):
        GRUModel(2, 4, 1)(torch.randn(1, 0, 2))


# -- generators ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TASKS)
def test_generators_are_deterministic_under_a_seed_and_differ_across_seeds(name: str) -> None:
    a, b = _small(name), _small(name)
    c = load_dataset(name, seed=1, n_samples=60, n_test=20, seq_len=12)
    for split in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, split), getattr(b, split)), split
        assert not torch.equal(getattr(a, split), getattr(c, split)), split


# Lorenz is left out: it is standardised with each split's own training statistics.
@pytest.mark.parametrize("name", ["multi_sine", "delay_recall"])
def test_data_seed_fixes_the_data_while_seed_only_reshuffles_the_split(name: str) -> None:
    a = load_dataset(name, seed=0, data_seed=7, n_samples=60, n_test=20, seq_len=12)
    b = load_dataset(name, seed=1, data_seed=7, n_samples=60, n_test=20, seq_len=12)
    assert torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_val, b.x_val)
    pool_a = torch.cat([a.x_train, a.x_val]).flatten(1)
    pool_b = torch.cat([b.x_train, b.x_val]).flatten(1)
    assert sorted(map(tuple, pool_a.tolist())) == sorted(map(tuple, pool_b.tolist()))


@pytest.mark.parametrize(
    ("name", "features", "out"), [("multi_sine", 1, 1), ("delay_recall", 3, 1), ("lorenz", 3, 3)]
)
@pytest.mark.parametrize("sequence_targets", [False, True])
def test_splits_are_disjoint_with_the_documented_shapes(
    name: str, features: int, out: int, sequence_targets: bool
) -> None:
    d = load_dataset(name, seed=0, n_samples=50, n_test=20, seq_len=12, val_fraction=0.2,
                     sequence_targets=sequence_targets)
    assert d.task == "regression"
    assert d.sizes() == {"train": 40, "val": 10, "test": 20}
    assert d.input_shape == (12, features)
    assert d.in_features == features and d.out_dim == out
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)):
        assert x.dtype == y.dtype == torch.float32
        assert x.shape[1:] == (12, features)
        assert y.shape[1:] == ((12, out) if sequence_targets else (out,))
        assert len(x) == len(y)
    rows = [{tuple(x.flatten(1)[i].tolist()) for i in range(len(x))}
            for x in (d.x_train, d.x_val, d.x_test)]
    assert sum(map(len, rows)) == 70  # no sequence repeats within or across splits
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])


@pytest.mark.parametrize("name", TASKS)
def test_registered_info_matches_the_loaded_defaults(name: str) -> None:
    info = core.dataset_info(name)
    d = load_dataset(name, n_samples=10, n_test=2)
    assert info.input_shape == d.input_shape and info.out_dim == d.out_dim
    assert info.task == d.task == "regression"


def test_subset_size_keeps_that_many_training_examples() -> None:
    d = load_dataset("multi_sine", n_samples=100, n_test=5, subset_size=30, val_fraction=0.2)
    assert d.sizes() == {"train": 24, "val": 6, "test": 5}


@pytest.mark.parametrize("name", ["multi_sine", "lorenz"])
def test_forecast_targets_are_the_next_horizon_observations(name: str) -> None:
    last = _small(name, horizon=3)
    seq = _small(name, horizon=3, sequence_targets=True)
    f = last.in_features
    assert last.out_dim == 3 * f
    torch.testing.assert_close(seq.y_train[:, -1], last.y_train)
    # Step t's first target is the input at step t + 1.
    torch.testing.assert_close(seq.y_train[:, :-1, :f], seq.x_train[:, 1:])
    torch.testing.assert_close(seq.y_train[:, :-3, f : 2 * f], seq.x_train[:, 2:-1])


def test_multi_sine_noise_touches_inputs_only() -> None:
    clean, noisy = _small("multi_sine"), _small("multi_sine", noise=0.1)
    assert torch.equal(clean.y_train, noisy.y_train)
    assert 0.05 < (noisy.x_train - clean.x_train).std() < 0.2


@pytest.mark.parametrize("sequence_targets", [False, True])
def test_delay_recall_target_is_the_marked_value_at_the_cue(sequence_targets: bool) -> None:
    d = load_dataset("delay_recall", n_samples=200, n_test=2, seq_len=20, min_delay=3,
                     max_delay=9, sequence_targets=sequence_targets)
    x, y = d.x_train, d.y_train
    rows = torch.arange(len(x))
    assert (x[:, :, 1].sum(1) == 1).all() and (x[:, :, 2].sum(1) == 1).all()
    mark, cue = x[:, :, 1].argmax(1), x[:, :, 2].argmax(1)
    delay = cue - mark
    assert delay.min() == 3 and delay.max() == 9
    marked = x[rows, mark, 0]
    if sequence_targets:
        assert torch.equal(y[rows, cue, 0], marked)
        assert (y.abs().sum((1, 2)) == marked.abs()).all()  # zero away from the cue
        assert mark.max() > 20 - 1 - 9  # the mark can come late, followed by the cue
    else:
        assert (cue == 19).all()
        assert torch.equal(y[:, 0], marked)


def test_lorenz_integrator_keeps_a_fixed_point_and_data_are_standardised() -> None:
    sigma, rho, beta = 10.0, 28.0, 8.0 / 3.0
    c = math.sqrt(beta * (rho - 1))
    fixed = np.array([[c, c, rho - 1], [-c, -c, rho - 1]])
    np.testing.assert_allclose(_lorenz_rk4(fixed, 0.01, 100, sigma, rho, beta), fixed, atol=1e-9)
    moved = _lorenz_rk4(fixed + 1.0, 0.01, 100, sigma, rho, beta)
    assert np.abs(moved - fixed).max() > 1.0
    d = load_dataset("lorenz", n_samples=100, n_test=10, seq_len=20)
    flat = d.x_train.reshape(-1, 3)
    torch.testing.assert_close(flat.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(0), torch.ones(3), atol=1e-4, rtol=0)


def test_bad_generator_arguments_raise_value_error_naming_them() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        load_dataset("multi_sine", seq_len=0)
    with pytest.raises(ValueError, match="horizon"):
        load_dataset("lorenz", horizon=0)
    with pytest.raises(ValueError, match="max_delay"):
        load_dataset("delay_recall", seq_len=10, max_delay=10)
    with pytest.raises(ValueError, match="noise"):
        load_dataset("multi_sine", noise=-1.0)
    with pytest.raises(ValueError, match="n_samples"):
        load_dataset("lorenz", n_samples=1)


# -- short trainings --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs", "return_sequences", "bound"),
    [
        ("multi_sine", {"seq_len": 20}, False, 0.25),
        ("multi_sine", {"seq_len": 20, "sequence_targets": True}, True, 0.25),
        ("lorenz", {"seq_len": 20}, False, 0.1),
        # Short delays, so that a few epochs can learn to remember rather than to predict
        # the mean; the bound is well below the value's variance (1/3).
        ("delay_recall", {"seq_len": 10, "min_delay": 1, "n_samples": 1000}, False, 0.05),
    ],
)
def test_short_diru_training_lowers_validation_mse(
    name: str, kwargs: dict[str, Any], return_sequences: bool, bound: float
) -> None:
    kwargs = {"n_samples": 400, "n_test": 20, **kwargs}
    d = load_dataset(name, seed=0, **kwargs)
    model = create_model("diru", seed=0, in_dim=d.in_features, out_dim=d.out_dim,
                         hidden_size=16, return_sequences=return_sequences)
    before, _ = evaluate(model, d.x_val, d.y_val, "regression")
    result = train_model(model, d, n_epochs=10, lr=1e-2, batch_size=64, device="cpu",
                         eval_test=False)
    assert result.status == "completed" and result.val_loss is not None
    if name == "delay_recall":
        assert result.val_loss < bound
    else:
        assert result.val_loss < bound * before
