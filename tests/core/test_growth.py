"""Dendrite growth, the growth trainer's rules, the image families and the CIFAR readers."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import core
from core import (
    DendriteSets,
    GrowthConfig,
    count_parameters,
    grow,
    growth_cost,
    make_growable,
    n_dendrite_sets,
    train_with_growth,
)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _toy_data(n: int = 48) -> core.Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return core.Dataset(
        name="toy", x_train=x[:n], y_train=y[:n], x_val=x[n:2 * n], y_val=y[n:2 * n],
        x_test=x[2 * n:], y_test=y[2 * n:], n_classes=3, input_shape=(6,),
    )


def _grouped_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(),
                         nn.Conv2d(6, 4, 1, stride=2, bias=False), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5))


# -- growing --------------------------------------------------------------------------------
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (4, 6)),
    "mlp_on_sequences": (_mlp, (2, 5, 6)),  # Linear on the last axis of a 3-d input
    "grouped_cnn": (_grouped_cnn, (2, 4, 8, 8)),
    "small_cnn": (lambda: core.create_model("small_cnn", width=4, hidden_dim=8), (2, 1, 12, 12)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_growth_keeps_outputs_and_adds_exactly_the_counted_parameters(case: str) -> None:
    torch.manual_seed(0)
    build, shape = CASES[case]
    model = build().eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        before = model(x)
    make_growable(model)
    for n_sets in (1, 2):  # the second set also carries cascade weights from the first
        cost, n_params = growth_cost(model), count_parameters(model)
        assert grow(model, seed=n_sets) == cost
        assert count_parameters(model) == n_params + cost
        assert n_dendrite_sets(model) == n_sets
        with torch.no_grad():
            assert torch.equal(model(x), before)


def test_set_cost_formula_counts_branch_output_and_cascade_weights() -> None:
    layer = nn.Conv2d(4, 6, 3, groups=2)  # |W| = 6 * 2 * 9 = 108, |b| = 6
    ds = DendriteSets(layer)
    assert [ds.set_cost(k) for k in range(3)] == [108 + 6 + 6, 108 + 6 + 12, 108 + 6 + 18]
    assert DendriteSets(nn.Linear(5, 3, bias=False)).set_cost(0) == 15 + 3


def test_a_new_set_learns_once_its_output_weights_move() -> None:
    torch.manual_seed(0)
    model = _mlp()
    make_growable(model, layers="2")
    grow(model)
    x = torch.randn(8, 6)
    model(x).pow(2).sum().backward()
    s = model[2].dendrites.sets[0]
    assert s.out_weight.grad.abs().sum() > 0  # reaches the zero-initialised join at once
    assert s.branch.weight.grad.abs().sum() == 0  # and the branch only through it
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    assert s.branch.weight.grad.abs().sum() > 0


def test_make_growable_matches_layer_patterns_and_skips_grown_branches() -> None:
    model = core.create_model("resnet18")
    assert make_growable(model, layers=("fc", "layer4.1.*")) == [
        "layer4.1.conv1", "layer4.1.conv2", "fc"
    ]
    grow(model)
    # The grown branches are Linear/Conv2d too, but never become growth sites themselves.
    assert make_growable(model, layers="*")[-1] == "fc"
    assert "fc.dendrites.sets.0.branch" not in make_growable(model)
    with pytest.raises(ValueError, match="the model's layers are: 'conv1'"):
        make_growable(core.create_model("resnet18"), layers="decoder.*")
    with pytest.raises(ValueError, match="make_growable"):
        grow(_mlp())


def test_a_layer_with_no_sets_runs_without_any_hook() -> None:
    model = _mlp()
    make_growable(model)
    assert all(not m._forward_hooks for m in model.modules())
    grow(model)
    assert len(model[0]._forward_hooks) == 1


# -- the growth trainer --------------------------------------------------------------------
def _fake(scores: list[float]) -> Callable[[dict[str, Any]], float]:
    """A deterministic validation history: epoch e scores ``scores[e - 1]``."""
    return lambda metrics: scores[metrics["epoch"] - 1]


def _probe() -> torch.Tensor:
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(1))


def _outputs(model: nn.Module) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(_probe())
    model.train(was)
    return out


def test_history_mode_restores_the_best_checkpoint_then_grows() -> None:
    model = _mlp()
    seen: dict[int, torch.Tensor] = {}

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        seen[epoch] = _outputs(model)

    n0 = count_parameters(model)
    cost = sum(DendriteSets(m).set_cost(0) for m in (model[0], model[2]))
    scores = [0.1, 0.5, 0.3, 0.3, 0.3]
    result = train_with_growth(
        model, _toy_data(), n_epochs=5, batch_size=16, device="cpu", on_epoch=on_epoch,
        growth=GrowthConfig(patience=2, metric=_fake(scores)),
    )
    events = [h["growth"] for h in result.history]
    assert events == [None, None, None, "grew", None]
    assert torch.equal(seen[4], seen[2])  # restored to epoch 2, and the new set changes nothing
    assert not torch.equal(seen[3], seen[2])
    assert [h["n_params"] for h in result.history] == [n0] * 4 + [n0 + cost]
    assert [h["n_dendrite_sets"] for h in result.history] == [0, 0, 0, 0, 1]
    assert [h["best_epoch"] for h in result.history] == [1, 2, 2, 2, 2]
    # The set never beat epoch 2, so the model handed back is epoch 2's, without it.
    assert n_dendrite_sets(model) == 0 and result.n_params == n0
    assert torch.equal(_outputs(model), seen[2])


def test_a_failing_set_is_retried_then_training_stops_with_the_best_model() -> None:
    model = _mlp()
    seen: dict[int, torch.Tensor] = {}
    scores = [0.1, 0.5] + [0.4] * 18
    result = train_with_growth(
        model, _toy_data(), n_epochs=20, batch_size=16, device="cpu",
        on_epoch=lambda e, m: seen.__setitem__(e, _outputs(model)),
        growth=GrowthConfig(patience=2, max_retries=2, metric=_fake(scores)),
    )
    events = {h["epoch"]: h["growth"] for h in result.history if h["growth"]}
    assert events == {4: "grew", 6: "retry", 8: "retry", 10: "stop"}
    assert result.status == "completed" and result.epochs_run == 10
    assert [h["retries"] for h in result.history][3:] == [0, 0, 1, 1, 2, 2, 2]
    # Each retry starts from epoch 2's weights with a fresh set of the same size.
    assert torch.equal(seen[6], seen[2]) and torch.equal(seen[8], seen[2])
    assert [h["n_dendrite_sets"] for h in result.history][4:] == [1] * 6
    assert n_dendrite_sets(model) == 0 and torch.equal(_outputs(model), seen[2])


def test_a_set_that_improves_is_kept_and_the_next_one_cascades() -> None:
    model = _mlp()
    scores = [0.1, 0.5, 0.5, 0.5, 0.6, 0.6, 0.6, 0.7, 0.7]
    result = train_with_growth(
        model, _toy_data(), n_epochs=9, batch_size=16, device="cpu",
        growth=GrowthConfig(patience=2, metric=_fake(scores)),
    )
    assert [h["growth"] for h in result.history] == [
        None, None, None, "grew", None, None, "grew", None, None
    ]
    assert [h["n_dendrite_sets"] for h in result.history] == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert n_dendrite_sets(model) == 2 and result.n_params == count_parameters(model)
    # The optimizer was rebuilt: the grown sets trained away from their zero start.
    assert model[0].dendrites.sets[1].out_weight.abs().sum() > 0
    assert model[0].dendrites.sets[1].cascade.abs().sum() > 0


def test_growth_that_would_exceed_max_params_is_not_taken() -> None:
    scores = [0.1, 0.5] + [0.4] * 6
    n0 = count_parameters(_mlp())
    cost = sum(DendriteSets(m).set_cost(0) for m in (_mlp()[0], _mlp()[2]))
    for budget, expected in ((n0 + cost - 1, "max_params"), (n0 + cost, "grew")):
        result = train_with_growth(
            _mlp(), _toy_data(), n_epochs=8, batch_size=16, device="cpu", max_params=budget,
            growth=GrowthConfig(patience=2, metric=_fake(scores)),
        )
        events = [h["growth"] for h in result.history if h["growth"]]
        assert events[0] == expected
        assert max(h["n_params"] for h in result.history) <= budget
    with pytest.raises(ValueError, match="more than max_params"):
        train_with_growth(_mlp(), _toy_data(), n_epochs=1, max_params=n0 - 1, device="cpu")


def test_fixed_mode_grows_every_n_epochs_after_the_first_m() -> None:
    result = train_with_growth(
        _mlp(), _toy_data(), n_epochs=9, batch_size=16, device="cpu",
        growth=GrowthConfig(mode="fixed", fixed_start=2, fixed_every=3, max_sets=2,
                            metric=lambda m: m["epoch"] / 10),
    )
    assert [h["epoch"] for h in result.history if h["growth"] == "grew"] == [2, 5]
    assert [h["growth"] for h in result.history][7] == "max_sets"
    assert [h["n_dendrite_sets"] for h in result.history] == [0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_growth_trainer_uses_real_validation_metrics_and_rejects_bad_options() -> None:
    result = train_with_growth(_mlp(), _toy_data(), n_epochs=2, batch_size=16, device="cpu")
    assert all(h["score"] == h["val_accuracy"] for h in result.history)
    assert result.history[-1]["best_score"] == max(h["val_accuracy"] for h in result.history)
    loss_cfg = GrowthConfig(metric="val_loss")
    assert loss_cfg.scorer("classification")[1] is False
    with pytest.raises(ValueError, match="'history', 'fixed'"):
        GrowthConfig(mode="sometimes")
    with pytest.raises(ValueError, match="patience"):
        GrowthConfig(patience=0)
    sgd = torch.optim.SGD(_mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rebuilds its optimizer"):
        train_with_growth(_mlp(), _toy_data(), n_epochs=1, device="cpu",
                          optimizer=sgd)  # type: ignore[arg-type]


# -- image families --------------------------------------------------------------------------
FAMILY_PARAMS = [
    ("resnet18", {}),
    ("resnet18", {"in_channels": 1, "n_classes": 7}),
    ("resnet50", {"n_classes": 100}),
    ("small_cnn", {}),
    ("small_cnn", {"in_channels": 3, "n_classes": 4, "width": 3, "hidden_dim": 5}),
]


@pytest.mark.parametrize(("name", "params"), FAMILY_PARAMS)
def test_image_family_counts_are_exact(name: str, params: dict[str, int]) -> None:
    model = core.create_model(name, seed=0, **params)
    assert core.analytic_parameter_count(name, **params) == count_parameters(model)
    assert core.get_family(name).input_kind == "image"


def test_image_family_counts_match_hand_formulas() -> None:
    assert core.analytic_parameter_count("resnet18") == 11_173_962  # the usual CIFAR ResNet-18
    w, h = 3, 5
    hand = 1 * w * 9 + 2 * w + w * 2 * w * 9 + 4 * w + 2 * w * 16 * h + h + h * 10 + 10
    assert core.analytic_parameter_count("small_cnn", width=w, hidden_dim=h) == hand
    with pytest.raises(ValueError, match="width must be a positive integer"):
        core.analytic_parameter_count("small_cnn", width=0)


@pytest.mark.parametrize(
    ("name", "params", "size", "layers"),
    [
        ("small_cnn", {"width": 4, "hidden_dim": 8}, 28, ("*",)),
        ("resnet18", {"in_channels": 1}, 8, ("*",)),
        ("resnet50", {}, 8, ("layer4.2.*", "fc")),
    ],
)
def test_image_families_run_and_grow(
    name: str, params: dict[str, int], size: int, layers: tuple[str, ...]
) -> None:
    model = core.create_model(name, seed=0, **params).eval()
    x = torch.randn(2, params.get("in_channels", 3 if name != "small_cnn" else 1), size, size)
    with torch.no_grad():
        before = model(x)
    assert before.shape == (2, 10) and torch.isfinite(before).all()
    make_growable(model, layers=layers)
    n_params, cost = count_parameters(model), growth_cost(model)
    grow(model, seed=0)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert count_parameters(model) == n_params + cost


# -- CIFAR readers on tiny files in the real pickle format ----------------------------------
def _write_batch(path: Path, labels: list[int], label_key: bytes) -> None:
    """Images whose red channel grows along columns (plus 2 per label), blue along rows."""
    n = len(labels)
    img = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    cols, rows = np.arange(32)[None, :], np.arange(32)[:, None]
    for i, label in enumerate(labels):
        img[i, 0] = 2 * label + cols
        img[i, 1] = 7 * i % 50
        img[i, 2] = 100 + 2 * rows
    batch = {b"batch_label": b"tiny", label_key: labels, b"data": img.reshape(n, 3072),
             b"filenames": [f"{i}.png".encode() for i in range(n)]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def _check_images(x: torch.Tensor, y: torch.Tensor) -> None:
    assert x.shape[1:] == (3, 32, 32)
    assert (x[:, 0, :, 1:] > x[:, 0, :, :-1]).all()  # red increases along columns
    assert (x[:, 2, 1:, :] > x[:, 2, :-1, :]).all()  # blue increases along rows
    red = x[:, 0].mean(dim=(1, 2))
    order = torch.argsort(red)
    assert (y[order][1:] >= y[order][:-1]).all()  # labels stayed with their images


def test_cifar10_reader_on_tiny_pickle_batches(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for b in range(1, 6):
        _write_batch(root / f"data_batch_{b}", [(b + i) % 10 for i in range(4)], b"labels")
    _write_batch(root / "test_batch", [0, 3, 9], b"labels")
    ds = core.load_dataset("cifar10", data_dir=tmp_path, flatten=False, val_fraction=0.25)
    assert ds.sizes() == {"train": 15, "val": 5, "test": 3}
    assert ds.n_classes == 10 and ds.input_shape == (3, 32, 32)
    for x, y in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        _check_images(x, y)
    assert ds.y_test.tolist() == [0, 3, 9]
    flat = core.load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.25)
    assert flat.x_train.shape == (15, 3072) and torch.equal(flat.x_train.view(-1, 3, 32, 32),
                                                           ds.x_train)


def test_cifar100_reader_uses_fine_labels(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _write_batch(root / "train", [99, 5, 42, 7, 0, 63], b"fine_labels")
    _write_batch(root / "test", [12, 88], b"fine_labels")
    ds = core.load_dataset("cifar100", data_dir=tmp_path, flatten=False, val_fraction=0.34)
    assert ds.n_classes == 100 and ds.sizes() == {"train": 4, "val": 2, "test": 2}
    assert sorted(ds.y_train.tolist() + ds.y_val.tolist()) == [0, 5, 7, 42, 63, 99]
    _check_images(ds.x_test, ds.y_test)
    with pytest.raises(core.DatasetNotFoundError, match="cifar-10-batches-py"):
        core.load_dataset("cifar10", data_dir=tmp_path)


def test_growth_on_an_image_family_trained_on_cifar_files(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for b in range(1, 6):
        _write_batch(root / f"data_batch_{b}", [(b * i) % 10 for i in range(6)], b"labels")
    _write_batch(root / "test_batch", [1, 2, 3, 4], b"labels")
    ds = core.load_dataset("cifar10", data_dir=tmp_path, flatten=False)
    model = core.create_model("small_cnn", seed=0, in_channels=ds.input_shape[0],
                              n_classes=ds.n_classes, width=4, hidden_dim=8)
    result = train_with_growth(
        model, ds, n_epochs=3, batch_size=8, device="cpu",
        growth=GrowthConfig(mode="fixed", fixed_start=1, fixed_every=1,
                            metric=lambda m: m["epoch"]),
    )
    assert [h["n_dendrite_sets"] for h in result.history] == [0, 1, 2]
    assert result.n_params == count_parameters(model) == result.history[-1]["n_params"]
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
