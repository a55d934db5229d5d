"""train_population with the whole recipe: each key, varied across members, matches train_model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import core
from core import train_population

EPOCHS = 2
BATCH = 128
METRICS = ("train_loss", "val_loss", "test_loss", "train_accuracy", "val_accuracy", "test_accuracy")
# train_model's own arguments; the rest of a config is the family's
RECIPE = ("batch_size", "lr_schedule", "warmup_epochs", "label_smoothing", "augment")
SMALL = dict(n_neurons=4, n_dendrites=3, n_dendrite_inputs=10, steps_to_resample=4)


@pytest.fixture(scope="module")
def data() -> core.Dataset:
    return core.load_dataset("digits")  # 8 x 8 images: shifts and local patches apply


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _solo(family: str, config: dict[str, Any], data: core.Dataset) -> core.TrainResult:
    cfg = dict(config)
    lr, wd, seed = cfg.pop("lr", 1e-3), cfg.pop("weight_decay", 0.0), cfg.pop("seed")
    recipe = {k: cfg.pop(k) for k in RECIPE if k in cfg}
    batch = recipe.pop("batch_size", BATCH)
    model = core.create_model(family, seed=seed, in_dim=data.in_dim, n_classes=data.n_classes, **cfg)
    result = core.train_model(model, data, EPOCHS, lr, wd, batch, device="cpu", seed=seed, **recipe)
    result.state_dict = model.state_dict()
    return result


def _assert_same(got: core.TrainResult, want: core.TrainResult, data: core.Dataset) -> None:
    """The tolerances of tests/core/test_population.py."""
    assert (got.status, got.seed, got.n_params) == (want.status, want.seed, want.n_params)
    assert got.epochs_run == want.epochs_run == EPOCHS
    sizes = {"train": len(data.x_train), "val": len(data.x_val), "test": len(data.x_test)}
    for g, w in zip(got.history, want.history, strict=True):
        for key in METRICS:
            if key.endswith("accuracy"):
                assert g[key] == pytest.approx(w[key], abs=1.5 / sizes[key.split("_")[0]]), key
            else:
                assert g[key] == pytest.approx(w[key], rel=1e-4), key
    assert got.state_dict is not None and want.state_dict is not None
    assert list(got.state_dict) == list(want.state_dict)
    for name, value in want.state_dict.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(got.state_dict[name], value, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(got.state_dict[name], value), name


def _check(family: str, configs: list[dict[str, Any]], data: core.Dataset,
           **kwargs: Any) -> list[core.TrainResult]:
    results = train_population(family, configs, data, EPOCHS, BATCH, device="cpu", **kwargs)
    assert [r.status for r in results] == ["completed"] * len(configs)
    for config, got in zip(configs, results, strict=True):
        _assert_same(got, _solo(family, config, data), data)
    return results


def test_weight_decay_per_member_matches_train_model(data: core.Dataset) -> None:
    _check("dendritic_simple", [
        dict(SMALL, weight_decay=0.0, lr=5e-3, seed=1),
        dict(SMALL, weight_decay=1e-3, lr=5e-3, seed=2),
        dict(SMALL, weight_decay=0.1, lr=5e-3, seed=3),
    ], data)


def test_lr_schedules_with_warm_up_per_member_match_train_model(data: core.Dataset) -> None:
    _check("dendritic_simple", [
        dict(SMALL, lr_schedule="constant", warmup_epochs=0.5, lr=1e-2, seed=1),
        dict(SMALL, lr_schedule="cosine", warmup_epochs=1, lr=1e-2, seed=2),
        dict(SMALL, lr_schedule="onecycle", lr=2e-2, seed=3),  # 30 % warm-up by default
        dict(SMALL, lr=1e-2, seed=4),  # no schedule, in the same stack
    ], data)


def test_label_smoothing_per_member_matches_train_model(data: core.Dataset) -> None:
    results = _check("soma_disabled", [
        dict(SMALL, hidden_dim=8, label_smoothing=0.0, seed=1),
        dict(SMALL, hidden_dim=8, label_smoothing=0.1, lr=5e-3, seed=2),
        dict(SMALL, hidden_dim=6, label_smoothing=0.3, lr=5e-3, seed=3),
    ], data)
    # the training loss is the smoothed one, validation is plain cross-entropy: they differ
    assert results[2].history[-1]["train_loss"] > results[2].history[-1]["val_loss"]


def test_shift_augmentation_per_member_matches_train_model(data: core.Dataset) -> None:
    _check("dendritic_simple", [
        dict(SMALL, augment="shift", lr=5e-3, seed=1),
        dict(SMALL, augment="none", lr=5e-3, seed=2),
        dict(SMALL, n_neurons=5, augment="shift", seed=3),  # padded
    ], data)


def test_local_connectivity_members_resample_within_their_patches(data: core.Dataset) -> None:
    configs = [
        dict(SMALL, connectivity="local", steps_to_resample=2, percentage_resample=0.5, seed=1),
        dict(SMALL, connectivity="random", seed=2),
        dict(SMALL, n_dendrites=4, n_dendrite_inputs=6, connectivity="local", steps_to_resample=3,
             seed=3),
    ]
    results = _check("dendritic_simple", configs, data)
    for i in (0, 2):
        cfg = {k: v for k, v in configs[i].items() if k != "seed"}
        layer = core.create_model("dendritic_simple", seed=configs[i]["seed"], in_dim=64,
                                  n_classes=10, **cfg)[0]
        assert results[i].state_dict is not None
        layer.load_state_dict({k[2:]: v for k, v in results[i].state_dict.items()
                               if k.startswith("0.")})
        inside = layer.patch_mask().gather(1, layer.indices)
        assert bool(inside.all()), "a resampled input left its dendrite's patch"
        assert not torch.equal(layer.indices, core.create_model(
            "dendritic_simple", seed=configs[i]["seed"], in_dim=64, n_classes=10, **cfg)[0].indices)


def test_percentage_resample_per_member_matches_train_model(data: core.Dataset) -> None:
    _check("dendritic_simple", [
        dict(SMALL, percentage_resample=0.1, seed=1),
        dict(SMALL, percentage_resample=0.5, seed=2),
        dict(SMALL, percentage_resample=0.9, lr=5e-3, seed=3),
    ], data)


def test_steps_to_resample_per_member_matches_train_model(data: core.Dataset) -> None:
    _check("dendritic_with_hidden", [
        dict(SMALL, hidden_dim=6, steps_to_resample=2, seed=1),
        dict(SMALL, hidden_dim=6, steps_to_resample=5, seed=2),
        dict(SMALL, hidden_dim=6, steps_to_resample=11, soma_enabled=False, seed=3),
    ], data)


def test_resample_reset_adam_per_member_matches_train_model(data: core.Dataset) -> None:
    results = _check("dendritic_simple", [
        dict(SMALL, resample_reset_adam=True, steps_to_resample=2, lr=5e-3, seed=1),
        dict(SMALL, resample_reset_adam=False, steps_to_resample=2, lr=5e-3, seed=1),
        dict(SMALL, n_neurons=6, resample_reset_adam=False, steps_to_resample=3, seed=3),
    ], data)
    # the same member but for the choice: keeping the moments changes the training
    a, b = results[0].state_dict, results[1].state_dict
    assert a is not None and b is not None
    assert not torch.allclose(a["0.weight"], b["0.weight"])


def test_batch_size_per_member_matches_train_model(data: core.Dataset) -> None:
    stats: dict[str, Any] = {}
    _check("dendritic_simple", [
        dict(SMALL, batch_size=32, seed=1),
        dict(SMALL, batch_size=128, lr=5e-3, seed=2),
        dict(SMALL, batch_size=32, n_neurons=5, seed=3),
        dict(SMALL, seed=4),  # the population's batch size, 128
    ], data, stats=stats)
    assert stats["buckets"] == 2  # one stack per batch size


def test_iterator_members_of_different_batch_sizes_train_in_their_own_stacks(
    data: core.Dataset,
) -> None:
    configs = [
        dict(SMALL, batch_size=64, seed=1),
        dict(SMALL, batch_size=200, lr_schedule="cosine", seed=2),
        dict(SMALL, batch_size=64, augment="shift", seed=3),
        dict(SMALL, batch_size=200, seed=4),
    ]
    stacks: list[tuple[int, int]] = []
    ended: list[int] = []
    results = train_population(
        "dendritic_simple", iter(configs), data, EPOCHS, BATCH, device="cpu", population_size=3,
        stats=(stats := {}), on_result=lambda i, r: ended.append(i),
    )
    stacks = stats["stacks"]
    assert sorted(ended) == [0, 1, 2, 3]
    assert {k for k, *_ in stacks} <= {1, 2}  # never members of two batch sizes in one stack
    for config, got in zip(configs, results, strict=True):
        _assert_same(got, _solo("dendritic_simple", config, data), data)


def test_bad_recipe_values_fail_only_their_member(data: core.Dataset) -> None:
    configs = [
        dict(SMALL, lr_schedule="linear"), dict(SMALL, warmup_epochs=5),
        dict(SMALL, label_smoothing=1.0), dict(SMALL, augment="flip"), dict(SMALL, batch_size=0),
        dict(SMALL),
    ]
    results = train_population("dendritic_simple", configs, data, 1, BATCH, device="cpu")
    assert [r.status for r in results] == ["failed"] * 5 + ["completed"]
    for key, r in zip(("lr_schedule", "warmup_epochs", "label_smoothing", "augment", "batch_size"),
                      results, strict=False):
        assert key in (r.error or "")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recipe_members_match_train_model_on_cuda(data: core.Dataset) -> None:
    """The CUDA paths: captured steps reading the schedule's rates and the shifts, the fused
    head with smoothing, and stacks of two batch sizes taking turns (an iterator)."""
    configs = [
        dict(SMALL, lr_schedule="onecycle", label_smoothing=0.1, augment="shift", seed=1),
        dict(SMALL, batch_size=64, connectivity="local", resample_reset_adam=False,
             steps_to_resample=3, seed=2),
        dict(SMALL, n_neurons=6, lr_schedule="cosine", warmup_epochs=0.5, seed=3),
        dict(SMALL, batch_size=64, augment="shift", label_smoothing=0.2, weight_decay=1e-3, seed=4),
    ]
    results = train_population("dendritic_simple", iter(configs), data, EPOCHS, BATCH,
                               device="cuda", population_size=4)
    for config, got in zip(configs, results, strict=True):
        cfg = dict(config)
        lr, wd, seed = cfg.pop("lr", 1e-3), cfg.pop("weight_decay", 0.0), cfg.pop("seed")
        recipe = {k: cfg.pop(k) for k in RECIPE if k in cfg}
        batch = recipe.pop("batch_size", BATCH)
        model = core.create_model("dendritic_simple", seed=seed, in_dim=data.in_dim,
                                  n_classes=data.n_classes, **cfg)
        want = core.train_model(model, data, EPOCHS, lr, wd, batch, device="cuda", seed=seed,
                                **recipe)
        want.state_dict = {k: v.cpu() for k, v in model.state_dict().items()}
        _assert_same(got, want, data)
