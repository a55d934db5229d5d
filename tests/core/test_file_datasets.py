"""File datasets (npz:, folder:): shapes, tasks, train-only normalisation, errors that advise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import sqlalchemy as sa
import torch
from pydantic import ValidationError

import core
import studies
from core import DatasetNotFoundError, UnknownNameError, dataset_info, load_dataset, normalize


def _npz(path: Path, **arrays: Any) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def _images(tmp_path: Path, n_train: int = 60, n_test: int = 12, shape: tuple[int, ...] = (6, 5),
            n_classes: int = 3) -> str:
    rng = np.random.default_rng(0)
    return _npz(
        tmp_path / "images.npz",
        x_train=rng.integers(0, 256, (n_train, *shape)).astype(np.uint8),
        y_train=rng.integers(0, n_classes, n_train),
        x_test=rng.integers(0, 256, (n_test, *shape)).astype(np.uint8),
        y_test=rng.integers(0, n_classes, n_test),
    )


# -- npz --------------------------------------------------------------------------------------------
def test_npz_grayscale_images_are_a_classification_dataset(tmp_path: Path) -> None:
    name = _images(tmp_path, n_classes=3)
    d = load_dataset(name, val_fraction=0.25)
    assert d.task == "classification" and d.n_classes == 3
    assert d.sizes() == {"train": 45, "val": 15, "test": 12}
    assert d.input_shape == (1, 6, 5) and d.x_train.shape == (45, 30)
    assert d.y_train.dtype == torch.long and d.x_train.dtype == torch.float32
    assert load_dataset(name, flatten=False).x_train.shape[1:] == (1, 6, 5)
    info = dataset_info(name)
    assert (info.input_shape, info.n_classes, info.task) == ((1, 6, 5), 3, "classification")


def test_npz_channels_first_images_are_standardised_per_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3, 4, 4)).astype(np.float32) * np.array([1, 10, 100]).reshape(1, 3, 1, 1)
    name = _npz(tmp_path / "rgb.npz", x_train=x, y_train=rng.integers(0, 2, 40),
                x_test=x[:5], y_test=np.array([0, 1, 0, 1, 1]))
    d = load_dataset(name, flatten=False)
    assert d.input_shape == (3, 4, 4) and d.normalization is not None
    assert d.normalization["shape"] == [3, 1, 1] and len(d.normalization["std"]) == 3
    per_channel_std = d.x_train.std(dim=(0, 2, 3))
    assert torch.allclose(per_channel_std, torch.ones(3), atol=1e-4)


def test_npz_vectors_are_standardised_per_feature_and_constant_features_stay_finite(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(5.0, 3.0, size=(50, 4))
    x[:, 2] = 7.0  # constant in training
    x_test = rng.normal(size=(6, 4))
    name = _npz(tmp_path / "vec.npz", x_train=x, y_train=rng.integers(0, 2, 50),
                x_test=x_test, y_test=rng.integers(0, 2, 6))
    d = load_dataset(name)
    assert d.input_shape == (4,) and d.x_train.shape[1] == 4
    stats = d.normalization
    assert stats is not None and stats["shape"] == [4]
    assert stats["std"][2] == 1.0 and torch.isfinite(d.x_test).all()


def test_npz_float_targets_are_a_regression_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    one = _npz(tmp_path / "r1.npz", x_train=rng.normal(size=(30, 5)), y_train=rng.normal(size=30),
               x_test=rng.normal(size=(6, 5)), y_test=rng.normal(size=6))
    d = load_dataset(one)
    assert d.task == "regression" and d.n_classes is None and d.out_dim == 1
    assert d.y_train.dtype == torch.float32
    np.savez_compressed(tmp_path / "r2.npz", x_train=rng.normal(size=(30, 5)),
                        y_train=rng.normal(size=(30, 2)).astype(np.float32),
                        x_test=rng.normal(size=(6, 5)), y_test=rng.normal(size=(6, 2)))
    two = f"npz:{tmp_path / 'r2.npz'}"
    info = dataset_info(two)
    assert info.task == "regression" and info.out_dim == 2
    small = load_dataset(two, subset_size=10, val_fraction=0.2)
    assert small.sizes() == {"train": 8, "val": 2, "test": 6} and small.y_train.shape == (8, 2)
    # a flat classifier family becomes a regressor with one output per target
    assert core.data_params("dendritic_simple", info.input_shape, info.n_classes, info.out_dim) == {
        "in_dim": 5, "n_classes": 2}
    spec = studies.StudySpec(dataset=two, model_params={"n_dendrite_inputs": 3})
    assert spec.objectives == ["val_loss"]
    with pytest.raises(ValidationError, match="regression"):
        studies.StudySpec(dataset=two, model_params={"n_dendrite_inputs": 3}, objective="val_accuracy")


def test_normalisation_is_fitted_on_the_training_split_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, size=(80, 3)).astype(np.float32)
    x_test = rng.normal(100.0, 1.0, size=(20, 3)).astype(np.float32)  # far from the training data
    name = _npz(tmp_path / "shift.npz", x_train=x, y_train=rng.integers(0, 2, 80),
                x_test=x_test, y_test=rng.integers(0, 2, 20))
    d = load_dataset(name, val_fraction=0.25, seed=5)
    xtr, _, xva, _ = core.split_train_val(torch.from_numpy(x), torch.zeros(80), None, 0.25, 5)
    assert d.normalization is not None
    assert np.allclose(d.normalization["mean"], xtr.mean(0).numpy(), atol=1e-5)
    assert not np.allclose(d.normalization["mean"], x.mean(0), atol=1e-3)  # not the whole pool
    assert abs(float(d.x_train.mean())) < 1e-5 and float(d.x_test.mean()) > 50
    # the stored statistics turn raw inputs into exactly what the model saw
    assert torch.allclose(normalize(x_test, d.normalization), d.x_test, atol=1e-4)
    assert torch.allclose(normalize(xva.numpy(), d.normalization), d.x_val, atol=1e-5)


def test_builtin_datasets_expose_their_statistics_in_raw_units(tmp_path: Path) -> None:
    digits = load_dataset("digits", subset_size=200)
    stats = digits.normalization
    assert stats is not None and stats["input_shape"] == [1, 8, 8]
    from sklearn.datasets import load_digits

    raw = load_digits().data.astype(np.float32).reshape(-1, 1, 8, 8)  # pixel values 0..16
    assert 2.0 < stats["mean"][0] < 8.0  # in the 0..16 units of the raw data
    out = normalize(raw[:5], stats)
    assert out.shape == (5, 1, 8, 8) and torch.isfinite(out).all()
    # a single example, and flattened batches, work the same way
    assert torch.allclose(normalize(raw[0], stats), out[0])
    assert torch.allclose(normalize(raw[:5].reshape(5, 64), stats), out.reshape(5, 64))
    with pytest.raises(ValueError, match="do not hold examples of shape"):
        normalize(np.zeros((5, 63)), stats)
    assert normalize(np.ones(3), None).dtype == torch.float32


def test_npz_errors_name_the_problem_and_what_is_allowed(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    ok = {"x_train": rng.normal(size=(10, 3)), "y_train": rng.integers(0, 2, 10),
          "x_test": rng.normal(size=(4, 3)), "y_test": rng.integers(0, 2, 4)}

    with pytest.raises(DatasetNotFoundError, match="no file .*missing.npz.*x_train, y_train, x_test"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a .npz file"):
        dataset_info(f"npz:{tmp_path / 'text.npz'}")

    cases: list[tuple[dict[str, Any], str]] = [
        ({"x_train": ok["x_train"], "y_train": ok["y_train"], "inputs": ok["x_test"]},
         "missing arrays x_test, y_test; the file holds inputs, x_train, y_train"),
        ({**ok, "y_train": ok["y_train"][:9]}, "x_train has 10 examples but y_train has 9"),
        ({**ok, "x_test": rng.normal(size=(4, 2))}, r"x_train examples have shape \(3,\) but x_test"),
        ({**ok, "x_train": np.array(["a"] * 10).reshape(10, 1)}, "x_train has dtype <U1, which is not numeric"),
        ({**ok, "x_train": rng.normal(size=(10, 8, 8, 3)), "x_test": rng.normal(size=(4, 8, 8, 3))},
         r"channels-last .*transpose\(0, 3, 1, 2\)"),
        ({**ok, "x_train": rng.normal(size=10), "x_test": rng.normal(size=4)}, r"reshape it to \(N, 1\)"),
        ({**ok, "y_test": rng.normal(size=4)}, "must both be integer labels"),
        ({**ok, "y_train": -ok["y_train"] - 1}, "class labels must be 0 .. n_classes - 1"),
        ({**ok, "x_train": np.full((10, 3), np.nan)}, "x_train holds NaN"),
    ]
    for i, (arrays, message) in enumerate(cases):
        name = _npz(tmp_path / f"bad{i}.npz", **arrays)
        with pytest.raises(ValueError, match=message):
            load_dataset(name)


def test_a_spec_accepts_file_datasets_and_stores_their_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _images(tmp_path, shape=(4, 4))
    monkeypatch.chdir(tmp_path)
    spec = studies.StudySpec(dataset="npz:images.npz", model_params={"n_dendrite_inputs": 4})
    assert spec.dataset == f"npz:{tmp_path / 'images.npz'}"
    assert spec.info.n_classes == 3 and spec.objectives == ["val_accuracy"]
    with pytest.raises(ValidationError) as err:
        studies.StudySpec(dataset="npz:nowhere.npz")
    (e,) = err.value.errors()
    assert e["loc"] == ("dataset",) and "no file" in e["msg"]
    with pytest.raises(ValidationError, match="npz:/path/file.npz"):
        studies.StudySpec(dataset="imagenet")  # the unknown-name error shows the file forms
    with pytest.raises(UnknownNameError, match="known: .*digits"):
        load_dataset("imagenet")


# -- image folders ----------------------------------------------------------------------------------
def _png(path: Path, value: int, size: tuple[int, int] = (5, 4), mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color: Any = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, color).save(path)


def test_an_image_folder_is_a_classification_dataset_with_a_fixed_test_split(tmp_path: Path) -> None:
    for c, cls in enumerate(["cat", "ant", "bee"]):
        for i in range(5):
            _png(tmp_path / "pics" / cls / f"{i}.png", 40 * c + i)
    (tmp_path / "pics" / "ant" / "notes.txt").write_text("not an image")
    name = f"folder:{tmp_path / 'pics'}"
    d = load_dataset(name, flatten=False, val_fraction=0.25, seed=1)
    assert d.classes == ("ant", "bee", "cat") and d.n_classes == 3
    assert d.input_shape == (1, 4, 5) and d.sizes()["test"] == 3  # one in five per class
    assert sum(d.sizes().values()) == 15
    other = load_dataset(name, flatten=False, val_fraction=0.25, seed=2)
    assert d.normalization is not None and d.normalization["input_shape"] == [1, 4, 5]
    assert other.normalization is not None

    def raw(data: core.Dataset) -> torch.Tensor:
        stats = data.normalization
        assert stats is not None
        return data.x_test * stats["std"][0] + stats["mean"][0]

    # the test split does not move with the seed (the training statistics do)
    assert torch.allclose(raw(d), raw(other), atol=1e-3) and torch.equal(d.y_test, other.y_test)
    assert dataset_info(name).input_shape == (1, 4, 5)
    # raw uint8 pixels, normalised with the stored statistics, are what the model saw
    from PIL import Image

    raw = np.stack([np.asarray(Image.open(tmp_path / "pics" / c / "0.png")) for c in ("ant", "bee")])
    assert normalize(raw, d.normalization).shape == (2, 4, 5)


def test_an_image_folder_with_train_and_test_uses_them_and_rgb_gives_three_channels(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("no", "yes"):
            for i in range(n):
                _png(tmp_path / "set" / split / cls / f"{i}.png", 100 + i, mode="RGB")
    d = load_dataset(f"folder:{tmp_path / 'set'}", flatten=False)
    assert d.input_shape == (3, 4, 5) and d.sizes()["test"] == 4
    assert d.sizes()["train"] + d.sizes()["val"] == 8
    assert d.normalization is not None and d.normalization["shape"] == [3, 1, 1]


def test_image_folder_errors_name_the_file_or_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="no folder"):
        dataset_info(f"folder:{tmp_path / 'none'}")
    for i in range(3):
        _png(tmp_path / "mixed" / "a" / f"{i}.png", i)
        _png(tmp_path / "mixed" / "b" / f"{i}.png", i, size=(5, 4) if i < 2 else (6, 6))
    with pytest.raises(ValueError, match=r"image .*b/2.png is 6x6 but .*a/0.png is 5x4"):
        load_dataset(f"folder:{tmp_path / 'mixed'}")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    _png(tmp_path / "empty" / "b" / "0.png", 1)
    with pytest.raises(ValueError, match="class folder .*a holds no images"):
        dataset_info(f"folder:{tmp_path / 'empty'}")
    _png(tmp_path / "one" / "only" / "0.png", 1)
    with pytest.raises(ValueError, match="1 class sub-folder"):
        dataset_info(f"folder:{tmp_path / 'one'}")


# -- end to end ---------------------------------------------------------------------------------------
def test_an_npz_study_runs_two_trials_and_keeps_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    centers = rng.normal(size=(3, 12)) * 3
    y = rng.integers(0, 3, 150)
    x = (centers[y] + rng.normal(size=(150, 12))).astype(np.float32) * 50 + 10
    name = _npz(tmp_path / "blobs.npz", x_train=x[:120], y_train=y[:120], x_test=x[120:], y_test=y[120:])
    spec = studies.StudySpec(
        name="npz-e2e", dataset=name, model="dendritic_simple", n_trials=2, n_epochs=1,
        batch_size=32, pruner="none", max_params=400, keep_models=2,
        model_params={"n_dendrite_inputs": 4},
        search_space={"n_neurons": {"type": "int", "low": 2, "high": 6}},
    )
    url = f"sqlite:///{tmp_path / 'dendro.db'}"
    study = studies.run_study(spec, url, show_progress=False, device="cpu")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and all(0.0 <= t.value <= 1.0 for t in done)
    assert all(t.user_attrs["n_params"] <= 400 for t in done)
    store = studies.ModelStore(sa.create_engine(url))
    kept = store.get("npz-e2e", done[0].number)
    assert kept is not None
    config, _ = kept
    expected = load_dataset(name).normalization
    assert config["normalization"] == expected


def test_kept_weights_carry_the_normalization_they_were_given(tmp_path: Path) -> None:
    store = studies.ModelStore(sa.create_engine(f"sqlite:///{tmp_path / 'm.db'}"))
    stats = load_dataset("digits", subset_size=50).normalization
    weights = {"w": torch.ones(2)}
    store.keep("s", 0, 0.5, {"family": "f"}, weights, keep=3, normalization=stats)
    store.keep("s", 1, 0.4, {"family": "f"}, weights, keep=3)  # as callers did before
    config, _ = store.get("s", 0)  # type: ignore[misc]
    assert config["normalization"] == stats and config["family"] == "f"
    assert store.get("s", 1)[0]["normalization"] is None  # type: ignore[index]


def test_an_npz_regression_study_minimises_the_validation_loss(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x @ rng.normal(size=6)).astype(np.float32)
    name = _npz(tmp_path / "reg.npz", x_train=x[:100] * 10 + 3, y_train=y[:100], x_test=x[100:] * 10 + 3,
                y_test=y[100:])
    spec = studies.StudySpec(name="npz-reg", dataset=name, model="vanilla_mlp", n_trials=2, n_epochs=1,
                             pruner="none", search_space={"hidden_dim": [4, 8]})
    assert spec.objectives == ["val_loss"] and spec.directions == ["minimize"]
    study = studies.run_study(spec, f"sqlite:///{tmp_path / 'r.db'}", show_progress=False, device="cpu")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # one output per target: vanilla_mlp's n_classes is the regression width (1)
    assert len(done) == 2 and {t.user_attrs["n_params"] for t in done} <= {6 * 4 + 4 + 4 + 1, 6 * 8 + 8 + 8 + 1}
