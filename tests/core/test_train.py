"""train_model and compare_models: learning, determinism, stopping, divergence, analysis."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core import (
    calculate_eigenvalues,
    compare_models,
    create_model,
    figure_to_html,
    load_dataset,
    plot_dendritic_weights_full_model,
    plot_dendritic_weights_single_image,
    plot_eigenvalues,
    plot_training_curves,
    resolve_device,
    seeded,
    train_model,
)


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_dataset("digits")


def _model(**kw: object) -> torch.nn.Module:
    args = {"in_dim": 64, "n_neurons": 10, "n_dendrites": 4, "n_dendrite_inputs": 16, "seed": 0}
    args.update(kw)
    return create_model("dendritic_simple", **args)  # type: ignore[arg-type]


def test_learns_digits_well_above_chance(digits) -> None:  # type: ignore[no-untyped-def]
    r = train_model(_model(), digits, n_epochs=8, lr=1e-2, batch_size=32)
    assert r.status == "completed" and r.epochs_run == 8
    assert r.test_accuracy > 0.8  # chance is 0.1
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]
    assert r.n_params == 16 * 4 * 10 + 40 + 40 + 10 + 110


def test_same_seed_same_result(digits) -> None:  # type: ignore[no-untyped-def]
    a = train_model(_model(), digits, n_epochs=2, seed=3)
    b = train_model(_model(), digits, n_epochs=2, seed=3)
    c = train_model(_model(), digits, n_epochs=2, seed=4)
    assert a.val_loss == b.val_loss
    assert a.val_loss != c.val_loss


def test_seeded_training_repeats_dropout_and_leaves_the_callers_generator_alone(digits) -> None:  # type: ignore[no-untyped-def]
    # Dropout draws from torch's global generator: under core.seeded(seed) (how studies train
    # a trial) a run repeats whatever the process drew before, and the caller's state comes back.
    def model() -> torch.nn.Module:
        with seeded(0):
            return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                       torch.nn.Linear(32, 10))

    dev = resolve_device(None)  # the CUDA generator draws the masks on a GPU
    torch.manual_seed(123)
    with seeded(3, dev):
        a = train_model(model(), digits, n_epochs=2, seed=3, device=dev)
    caller = torch.rand(3, device=dev)
    torch.manual_seed(999)  # another process, another global state
    with seeded(3, dev):
        b = train_model(model(), digits, n_epochs=2, seed=3, device=dev)
    assert a.val_loss == b.val_loss
    torch.manual_seed(123)
    assert torch.equal(caller, torch.rand(3, device=dev))  # nothing was drawn from the caller's stream
    with seeded(4, dev):
        c = train_model(model(), digits, n_epochs=2, seed=4, device=dev)
    assert c.val_loss != a.val_loss
    torch.manual_seed(5)  # without it, the masks depend on what the process drew before
    d = train_model(model(), digits, n_epochs=2, seed=3, device=dev)
    assert d.val_loss != a.val_loss


def test_training_resamples_synapses_without_hooks(digits) -> None:  # type: ignore[no-untyped-def]
    m = _model(steps_to_resample=5)
    idx = m[0].indices.clone()
    train_model(m, digits, n_epochs=1, batch_size=64)  # 21 steps -> 4 resamplings
    assert m[0].n_swapped == 4 * 40 * 4
    assert not torch.equal(m[0].indices.cpu(), idx)


def test_on_epoch_can_stop_training(digits) -> None:  # type: ignore[no-untyped-def]
    seen: list[int] = []
    r = train_model(_model(), digits, n_epochs=5, on_epoch=lambda e, m: seen.append(e) or e == 2)
    assert seen == [1, 2] and r.status == "stopped" and r.epochs_run == 2


def test_non_finite_loss_ends_with_a_clear_state(digits) -> None:  # type: ignore[no-untyped-def]
    r = train_model(_model(), digits, n_epochs=3, lr=1e12)
    assert r.status == "diverged"
    assert "non-finite" in (r.error or "")


def test_bad_arguments_are_rejected(digits) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="n_epochs"):
        train_model(_model(), digits, n_epochs=0)
    with pytest.raises(ValueError, match="lr"):
        train_model(_model(), digits, lr=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        train_model(_model(), digits, optimizer="adagrad")


def test_compare_models_side_by_side(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m1 = _model()
    m2 = create_model("vanilla_mlp", in_dim=64, hidden_dim=16, seed=0)
    res = compare_models([(m1, torch.optim.Adam(m1.parameters(), lr=1e-2), "dendritic"),
                          (m2, None, "vanilla")], digits, n_epochs=2, batch_size=64)
    assert list(res) == ["dendritic", "vanilla"]
    assert all(r.epochs_run == 2 for r in res.values())
    fig = plot_training_curves(res)
    out = tmp_path / "curves.html"
    figure_to_html(fig, str(out))
    assert "plotly" in out.read_text()[:100_000].lower()


def test_analysis_figures(digits) -> None:  # type: ignore[no-untyped-def]
    m = _model()
    ev = calculate_eigenvalues(m[0])
    assert len(ev) == 40 and all(ev[:-1] >= ev[1:])
    assert len(plot_eigenvalues({"dendritic": m[0], "readout": m[1]}).data) == 2
    img = plot_dendritic_weights_single_image(m[0], neuron=2)
    assert img.data[0].z.shape == (8, 8)
    assert len(plot_dendritic_weights_full_model(m[0]).data) == 10
    with pytest.raises(ValueError, match="neuron"):
        plot_dendritic_weights_single_image(m[0], neuron=99)
