"""Bio rules in an MLP population: each member trains as BioConverter + BioStepHook train it alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_population import _assert_same, one_thread  # noqa: F401 - the autouse fixture: one intra-op thread
from test_recurrent_population import _HOOK_KEYS
from test_recurrent_population import BIO_RULES as _RULES

import core
from core._population import train_population

EPOCHS = 2
BATCH = 128
#: the recurrent tests' ten rule sets, and weight splitting of the readout (10 classes)
BIO_RULES: list[dict[str, Any]] = [
    *_RULES,
    dict(fuzzy_lr_distribution="uniform", weight_splitting_Gamma=2),
    dict(fuzzy_lr_distribution="normal", weight_splitting_Gamma=5,
         weight_splitting_activation_function=torch.tanh, scale_grad=True, homeostatic_strength=0.5),
]


@pytest.fixture(scope="module")
def data() -> core.Dataset:
    return core.load_dataset("digits")


def _solo_bio(config: dict[str, Any], data: core.Dataset) -> core.TrainResult:
    """A lone trial with bio rules: conversion and training draw from torch.manual_seed(seed)."""
    cfg = dict(config)
    lr, seed, bio = cfg.pop("lr", 1e-3), cfg.pop("seed"), cfg.pop("bio")
    model = core.create_model("dendritic_simple", seed=seed, in_dim=data.in_dim,
                              n_classes=data.n_classes, **cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        core.BioConverter(core.BioConfig(**{k: v for k, v in bio.items() if k not in _HOOK_KEYS}))(model)
        hook = core.BioStepHook(**{k: v for k, v in bio.items() if k in _HOOK_KEYS})
        result = core.train_model(model, data, EPOCHS, lr, 0.0, BATCH, device="cpu", seed=seed,
                                  step_hooks=[hook])
    result.state_dict = model.state_dict()  # type: ignore[attr-defined]
    return result


@pytest.mark.parametrize("rules", BIO_RULES,
                         ids=[f"{r['fuzzy_lr_distribution']}-{i}" for i, r in enumerate(BIO_RULES)])
def test_one_member_with_bio_rules_matches_bio_converter_and_step_hook(
    rules: dict[str, Any], data: core.Dataset,
) -> None:
    config = dict(n_neurons=6, n_dendrites=3, n_dendrite_inputs=12, seed=3, lr=3e-3, bio=rules)
    got = train_population("dendritic_simple", [config], data, EPOCHS, BATCH, device="cpu")[0]
    assert got.status == "completed", got.error
    _assert_same(got, _solo_bio(config, data), data)  # weights, connections and the rules' buffers


def test_members_of_different_sizes_and_rules_each_match_their_lone_trial(data: core.Dataset) -> None:
    configs = [dict(n_neurons=4 + i % 3, n_dendrites=2 + i % 2, n_dendrite_inputs=8 + 2 * (i % 3),
                    seed=20 + i, lr=3e-3, bio=rules)
               for i, rules in enumerate(BIO_RULES)]
    configs.append(dict(n_neurons=5, n_dendrites=2, n_dendrite_inputs=8, seed=40, lr=3e-3))  # no rules
    results = train_population("dendritic_simple", configs, data, EPOCHS, BATCH, device="cpu",
                               population_size=4)  # members join as others end: the stack changes
    for config, got in zip(configs, results, strict=True):
        assert got.status == "completed", got.error
        want = _solo_bio(config, data) if "bio" in config else _plain(config, data)
        _assert_same(got, want, data)


def _plain(config: dict[str, Any], data: core.Dataset) -> core.TrainResult:
    cfg = dict(config)
    lr, seed = cfg.pop("lr"), cfg.pop("seed")
    model = core.create_model("dendritic_simple", seed=seed, in_dim=data.in_dim, n_classes=data.n_classes, **cfg)
    result = core.train_model(model, data, EPOCHS, lr, 0.0, BATCH, device="cpu", seed=seed)
    result.state_dict = model.state_dict()  # type: ignore[attr-defined]
    return result


def test_dale_signs_hold_and_bad_members_fail_alone_with_the_reason(data: core.Dataset) -> None:
    rules = dict(apply_dales_principle=True, volume_dependent=True, rejuvenate_every=2)
    small = dict(n_neurons=6, n_dendrite_inputs=12, seed=1, lr=3e-3)
    configs = [dict(small, bio=rules), small]
    with_bio, without = train_population("dendritic_simple", configs, data, EPOCHS, BATCH, device="cpu")
    assert with_bio.val_loss != without.val_loss
    sd = with_bio.state_dict  # type: ignore[attr-defined]
    assert ((sd["1.weight"] * sd["1.bio_mod.dale_sign"]) >= 0).all()
    hidden = train_population("dendritic_with_hidden", [dict(n_dendrite_inputs=12, bio={}),
                                                       dict(n_dendrite_inputs=12)], data, 1, BATCH, device="cpu")
    assert hidden[0].status == "failed" and "hidden layer" in (hidden[0].error or "")
    assert hidden[1].status == "completed"
    split = train_population("dendritic_simple", [dict(n_dendrite_inputs=12, bio=dict(weight_splitting_Gamma=3))],
                             data, 1, BATCH, device="cpu")  # 3 does not divide the 10 classes
    assert split[0].status == "failed" and "weight_splitting_Gamma=3" in (split[0].error or "")
