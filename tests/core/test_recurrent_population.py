"""train_recurrent_population: every DIRU, LSTM or GRU member trains exactly as train_model would."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import core
from core import _recurrent_population as _rp
from core._recurrent_population import (
    RECURRENT_POPULATION_FAMILIES,
    _Population,
    _Stack,
    train_recurrent_population,
)

EPOCHS = 2
BATCH = 32
FAMILIES = list(RECURRENT_POPULATION_FAMILIES)


@pytest.fixture(scope="module")
def data() -> core.Dataset:
    return core.load_dataset("multi_sine", seed=0, n_samples=240, n_test=40, seq_len=10)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: intra-op threads only wait on each other on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sizes(family: str) -> list[dict[str, Any]]:
    """Three members of different widths (one of them two layers deep), lr and weight decay."""
    extra: list[dict[str, Any]] = (
        [dict(num_compartments=2), dict(num_compartments=3), dict(num_compartments=4)]
        if family == "diru" else [{}, {}, {}]
    )
    return [
        dict(hidden_size=6, lr=3e-3, seed=11, **extra[0]),
        dict(hidden_size=9, lr=1e-3, weight_decay=1e-3, seed=12, **extra[1]),
        dict(hidden_size=4, num_layers=2, lr=2e-3, seed=13, **extra[2]),
    ]


def _solo(
    family: str, config: dict[str, Any], data: core.Dataset, n_epochs: int = EPOCHS,
    stop_at: int | None = None,
) -> core.TrainResult:
    cfg = dict(config)
    lr, wd, seed = cfg.pop("lr", 1e-3), cfg.pop("weight_decay", 0.0), cfg.pop("seed")
    cfg.setdefault("return_sequences", data.y_train.dim() == 3)
    model = core.create_model(family, seed=seed, in_dim=data.in_features, out_dim=data.out_dim, **cfg)
    on_epoch = None if stop_at is None else (lambda epoch, _m: epoch >= stop_at)
    result = core.train_model(model, data, n_epochs, lr, wd, BATCH, device="cpu", seed=seed,
                              on_epoch=on_epoch)
    result.state_dict = model.state_dict()
    return result


def _assert_same(got: core.TrainResult, want: core.TrainResult) -> None:
    assert got.status == want.status
    assert got.seed == want.seed
    assert got.n_params == want.n_params
    assert got.epochs_run == want.epochs_run
    for g, w in zip(got.history, want.history, strict=True):
        assert g["epoch"] == w["epoch"]
        for key in ("train_loss", "val_loss", "test_loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), key
        for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
            assert g[key] is None and w[key] is None
    if want.status != "diverged":
        got_sd, want_sd = got.state_dict, want.state_dict
        assert got_sd is not None and want_sd is not None
        assert list(got_sd) == list(want_sd)
        for name, value in want_sd.items():
            torch.testing.assert_close(got_sd[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_members_of_different_sizes_match_train_model(family: str, data: core.Dataset) -> None:
    configs = _sizes(family)
    results = train_recurrent_population(family, configs, data, EPOCHS, BATCH, device="cpu")
    assert [r.status for r in results] == ["completed"] * 3
    for config, got in zip(configs, results, strict=True):
        _assert_same(got, _solo(family, config, data))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bio", [None, dict(apply_dales_principle=True, volume_dependent=True,
                                            rejuvenate_every=2, scale_grad=True)])
def test_padding_holds_zeros_and_receives_no_gradient(
    family: str, bio: dict[str, Any] | None, data: core.Dataset, monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked: list[int] = []
    seen_real: list[bool] = []

    def inspect(stack: _Stack, grad: torch.Tensor) -> None:
        pad = ~stack.real_mask()
        assert torch.count_nonzero(grad[pad]) == 0
        for buf in (stack.p, stack.m, stack.v):
            assert torch.count_nonzero(buf[pad]) == 0
        seen_real.append(bool(torch.count_nonzero(grad[~pad]) > 0))
        checked.append(stack.K)

    monkeypatch.setattr(_rp, "_grad_hook", inspect)
    configs = [{**c, "bio": bio} for c in _sizes(family)]
    results = train_recurrent_population(family, configs, data, EPOCHS, BATCH, device="cpu")
    assert [r.status for r in results] == ["completed"] * 3
    assert checked and set(checked) == {3} and all(seen_real)


def test_padding_layout_is_what_each_member_owns() -> None:
    # A 3-member DIRU stack: real entries are exactly the members' own parameter counts.
    data = core.load_dataset("multi_sine", seed=0, n_samples=20, n_test=4, seq_len=4)
    configs = _sizes("diru")
    pop = _Population("diru", configs, data, 1, BATCH, torch.device("cpu"), 0, 3, None, None, 3)
    members = [pop._take() for _ in configs]
    pop._restack([m for m in members if m is not None])
    assert pop.stack is not None
    counts = pop.stack.real_mask().sum(1).tolist()
    assert counts == [r.n_params for r in pop.results]


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_hidden_units_stay_exactly_zero(family: str, data: core.Dataset) -> None:
    configs = _sizes(family)
    pop = _Population(family, configs, data, 1, BATCH, torch.device("cpu"), 0, 3, None, None, 3)
    pop._restack([m for m in (pop._take() for _ in configs) if m is not None])
    stack = pop.stack
    assert stack is not None
    with torch.no_grad():
        stack.p.add_(0.3 * torch.randn_like(stack.p) * stack.real_mask())  # any real weights
        x = data.x_train[:16].expand(3, 16, -1, -1)
        z = stack._project(x.transpose(1, 2), 0, shared=False)
        states = stack._recur(z, 0, keep=True)  # (K, T, B, H)
    for k, config in enumerate(configs):
        assert torch.count_nonzero(states[k, ..., config["hidden_size"]:]) == 0
        assert torch.count_nonzero(states[k, ..., : config["hidden_size"]]) > 0


def test_sequence_targets_train_every_step_like_train_model() -> None:
    data = core.load_dataset("delay_recall", seed=0, n_samples=160, n_test=30, seq_len=8,
                             min_delay=2, sequence_targets=True)
    configs = [dict(hidden_size=5, num_compartments=2, seed=1, lr=5e-3),
               dict(hidden_size=7, num_compartments=3, num_layers=2, seed=2)]
    results = train_recurrent_population("diru", configs, data, EPOCHS, BATCH, device="cpu")
    for config, got in zip(configs, results, strict=True):
        _assert_same(got, _solo("diru", config, data))


def test_iterator_of_six_configs_with_two_slots_refills_each_freed_slot(data: core.Dataset) -> None:
    n_epochs = 3
    stop_at = [1, 3, 2, 1, 3, 2]  # pruning at different epochs frees slots at different times
    configs = [dict(hidden_size=3 + i, seed=100 + i, lr=2e-3) for i in range(6)]
    finished: list[int] = []
    live_when_read: list[int] = []

    def lazily() -> Iterator[dict[str, Any]]:
        for i, cfg in enumerate(configs):
            live_when_read.append(i - len(finished))  # members running when this one is read
            yield cfg

    def prune(index: int, epoch: int, metrics: dict[str, Any]) -> bool:
        return epoch >= stop_at[index] < n_epochs

    results = train_recurrent_population(
        "gru", lazily(), data, n_epochs, BATCH, device="cpu", on_epoch=prune,
        population_size=2, on_result=lambda index, result: finished.append(index),
    )
    assert [r.seed for r in results] == [100 + i for i in range(6)]
    # read only when a slot is free: 0 ends (2 joins), then 1 and 2 end together (3 and 4
    # join), then 3 ends (5 joins)
    assert live_when_read == [0, 1, 1, 0, 1, 1]
    assert sorted(finished) == list(range(6))
    for i, r in enumerate(results):
        assert r.epochs_run == stop_at[i]
        assert r.status == ("completed" if stop_at[i] == n_epochs else "stopped")
        stop = stop_at[i] if stop_at[i] < n_epochs else None
        _assert_same(r, _solo("gru", configs[i], data, n_epochs, stop))


def test_non_finite_member_diverges_alone_and_bad_config_fails_alone(data: core.Dataset) -> None:
    configs = [
        dict(hidden_size=5, seed=1),
        dict(hidden_size=5, lr=1e30, seed=2),
        dict(hidden_size=5, hiden_size=3, seed=3),  # a typo: fails without stopping the others
        dict(hidden_size=7, seed=4),
    ]
    ended: list[tuple[int, str]] = []
    results = train_recurrent_population("lstm", configs, data, EPOCHS, BATCH, device="cpu",
                                         on_result=lambda i, r: ended.append((i, r.status)))
    assert [r.status for r in results] == ["completed", "diverged", "failed", "completed"]
    assert "non-finite" in (results[1].error or "")
    assert "hiden_size" in (results[2].error or "")
    assert ended[0] == (2, "failed")
    assert results[1].state_dict is None
    want = _solo("lstm", configs[1], data)
    assert want.status == "diverged" and want.epochs_run == results[1].epochs_run
    for i in (0, 3):
        _assert_same(results[i], _solo("lstm", configs[i], data))


def test_out_of_memory_halves_population_and_loses_no_member(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch,
) -> None:
    configs = [dict(hidden_size=3 + i, num_compartments=1 + i % 3, seed=i) for i in range(4)]
    sizes: list[int] = []

    def fault(k: int) -> None:
        sizes.append(k)
        if len(sizes) == 4:  # mid-epoch, after some steps changed the weights
            raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(_rp, "_step_hook", fault)
    results = train_recurrent_population("diru", configs, data, EPOCHS, BATCH, device="cpu",
                                         population_size=4)
    monkeypatch.setattr(_rp, "_step_hook", None)
    assert sizes[0] == 4 and max(sizes[4:]) == 2
    assert [r.status for r in results] == ["completed"] * 4
    for cfg, r in zip(configs, results, strict=True):
        _assert_same(r, _solo("diru", cfg, data))


def test_member_seed_defaults_to_population_seed_plus_index(data: core.Dataset) -> None:
    results = train_recurrent_population("gru", [dict(hidden_size=4)] * 2, data, 1, BATCH,
                                         device="cpu", seed=7)
    assert [r.seed for r in results] == [7, 8]
    _assert_same(results[1], _solo("gru", dict(hidden_size=4, seed=8), data, 1))


def test_dropout_member_trains_beside_members_that_stay_exact(data: core.Dataset) -> None:
    configs = [dict(hidden_size=5, num_layers=2, dropout=0.3, seed=1),
               dict(hidden_size=6, num_layers=2, seed=2), dict(hidden_size=4, seed=3)]
    results = train_recurrent_population("lstm", configs, data, EPOCHS, BATCH, device="cpu")
    assert results[0].status == "completed"
    assert all(h["train_loss"] > 0 for h in results[0].history)
    for i in (1, 2):  # dropout draws from the population's generator, never from theirs
        _assert_same(results[i], _solo("lstm", configs[i], data))


def test_auto_population_size_on_cpu_runs_a_few_members_at_once(
    data: core.Dataset, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sizes: list[int] = []
    monkeypatch.setattr(_rp, "_step_hook", sizes.append)
    configs = [dict(hidden_size=2)] * 10
    small = core.load_dataset("multi_sine", seed=0, n_samples=40, n_test=4, seq_len=4)
    results = train_recurrent_population("gru", iter(configs), small, 1, BATCH, device="cpu")
    assert len(results) == 10 and max(sizes) == _rp._AUTO_CPU
    sizes.clear()
    results = train_recurrent_population("gru", iter(configs), small, 1, BATCH, device="cpu",
                                         max_population=3)
    assert len(results) == 10 and max(sizes) == 3


def test_every_stackable_family_is_a_registered_sequence_regressor() -> None:
    for name in RECURRENT_POPULATION_FAMILIES:
        family = core.get_family(name)
        assert (family.input_kind, family.task) == ("sequence", "regression")


def test_wrong_family_or_data_is_a_value_error_that_says_what_to_do(data: core.Dataset) -> None:
    with pytest.raises(ValueError, match="diru, gru, lstm"):
        train_recurrent_population("vanilla_mlp", [{}], data, 1)
    flat = torch.zeros(8, 3)
    labels = torch.zeros(8, dtype=torch.long)
    classes = core.Dataset("toy", flat, labels, flat, labels, flat, labels, n_classes=2)
    with pytest.raises(ValueError, match="train_population"):
        train_recurrent_population("lstm", [{}], classes, 1)
    with pytest.raises(ValueError, match="max_population"):
        train_recurrent_population("lstm", [{}], data, 1, population_size=4, max_population=2)
    res = train_recurrent_population("lstm", [dict(out_dim=3)], data, 1, device="cpu")
    assert res[0].status == "failed" and "out_dim" in (res[0].error or "")


# -- bio rules ------------------------------------------------------------------------------------
BIO_RULES: list[dict[str, Any]] = [
    dict(fuzzy_lr_distribution="uniform"),
    dict(fuzzy_lr_distribution="normal", volume_dependent=True),
    dict(fuzzy_lr_distribution="lognormal", rejuvenate_every=3),
    dict(fuzzy_lr_distribution="gamma", apply_dales_principle=True),
    dict(fuzzy_lr_distribution="beta", scale_grad=True, homeostatic_strength=0.5),
    dict(fuzzy_lr_distribution="layer_adaptive", crystallize=False),
    dict(fuzzy_lr_distribution="weight_adaptive", apply_dales_principle=True, rejuvenate_every=4,
         volume_dependent=True),
    dict(fuzzy_lr_distribution="temporal", fuzzy_lr_dynamic=True, fuzzy_lr_update_freq=2),
    dict(fuzzy_lr_distribution="activity", fuzzy_lr_dynamic=True, fuzzy_lr_update_freq=3),
    dict(fuzzy_lr_distribution="baseline", fuzzy=False),
]
_HOOK_KEYS = {"fuzzy", "crystallize", "volume_dependent", "scale_grad", "dales", "update_rates",
              "rejuvenate_every"}


def _solo_bio(family: str, config: dict[str, Any], data: core.Dataset) -> core.TrainResult:
    """A lone trial with bio rules: conversion and training draw from torch.manual_seed(seed)."""
    cfg = dict(config)
    lr, seed, bio = cfg.pop("lr", 1e-3), cfg.pop("seed"), cfg.pop("bio")
    model = core.create_model(family, seed=seed, in_dim=data.in_features, out_dim=data.out_dim, **cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        core.BioConverter(core.BioConfig(**{k: v for k, v in bio.items() if k not in _HOOK_KEYS}))(model)
        hook = core.BioStepHook(**{k: v for k, v in bio.items() if k in _HOOK_KEYS})
        result = core.train_model(model, data, EPOCHS, lr, 0.0, BATCH, device="cpu", seed=seed,
                                  step_hooks=[hook])
    result.state_dict = model.state_dict()
    return result


@pytest.mark.parametrize("rules", BIO_RULES, ids=[r["fuzzy_lr_distribution"] for r in BIO_RULES])
def test_one_member_with_bio_rules_matches_bio_converter_and_step_hook(
    rules: dict[str, Any], data: core.Dataset,
) -> None:
    # two DIRU layers: the readout, both integrations and both global gates are converted
    config = dict(hidden_size=5, num_layers=2, num_compartments=2, seed=3, lr=3e-3, bio=rules)
    got = train_recurrent_population("diru", [config], data, EPOCHS, BATCH, device="cpu")[0]
    _assert_same(got, _solo_bio("diru", config, data))  # weights and the rules' buffers


@pytest.mark.parametrize("family", FAMILIES)
def test_members_with_different_bio_rules_each_match_their_lone_trial(
    family: str, data: core.Dataset,
) -> None:
    configs = [dict(hidden_size=3 + i % 4, num_layers=1 + i % 2, seed=20 + i, lr=3e-3, bio=rules)
               for i, rules in enumerate(BIO_RULES)]
    results = train_recurrent_population(family, configs, data, EPOCHS, BATCH, device="cpu",
                                         population_size=4)  # members join as others end
    for config, got in zip(configs, results, strict=True):
        _assert_same(got, _solo_bio(family, config, data))


def test_bio_rules_change_training_and_dale_signs_hold(data: core.Dataset) -> None:
    plain = dict(hidden_size=5, seed=3, lr=3e-3)
    rules = dict(apply_dales_principle=True, volume_dependent=True, rejuvenate_every=2)
    with_bio, without = train_recurrent_population("diru", [{**plain, "bio": rules}, plain], data,
                                                   EPOCHS, BATCH, device="cpu")
    assert with_bio.val_loss != without.val_loss
    sd = with_bio.state_dict
    assert sd is not None
    for layer in ("readout", "cells.0.integration", "cells.0.global_gate"):
        signed = sd[f"{layer}.weight"] * sd[f"{layer}.bio_mod.dale_sign"]
        assert (signed >= 0).all(), layer


def test_weight_splitting_fails_only_that_member_with_a_reason(data: core.Dataset) -> None:
    configs = [dict(hidden_size=4, bio=dict(weight_splitting_Gamma=2)), dict(hidden_size=4)]
    results = train_recurrent_population("gru", configs, data, 1, BATCH, device="cpu")
    assert results[0].status == "failed" and "weight_splitting_Gamma" in (results[0].error or "")
    assert results[1].status == "completed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_members_with_captured_steps_match_train_model(family: str, data: core.Dataset) -> None:
    # On CUDA every full-batch step is a replayed CUDA graph; members still train as alone.
    configs = [c for c in _sizes(family) if c.get("num_layers", 1) == 1]  # no dropout draws
    results = train_recurrent_population(family, configs, data, EPOCHS, BATCH, device="cuda")
    for config, got in zip(configs, results, strict=True):
        cfg = dict(config)
        lr, wd, seed = cfg.pop("lr", 1e-3), cfg.pop("weight_decay", 0.0), cfg.pop("seed")
        model = core.create_model(family, seed=seed, in_dim=data.in_features, out_dim=data.out_dim,
                                  return_sequences=data.y_train.dim() == 3, **cfg)
        want = core.train_model(model, data, EPOCHS, lr, wd, BATCH, device="cuda", seed=seed)
        assert got.status == "completed"
        for g, w in zip(got.history, want.history, strict=True):
            for key in ("train_loss", "val_loss", "test_loss"):
                assert g[key] == pytest.approx(w[key], rel=1e-3), (key, g[key], w[key])


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_splitting_of_the_readout_matches_the_lone_trial(family: str) -> None:
    # Lorenz has three outputs: Gamma=3 ties them into one run, as the lone readout's hook does.
    lorenz = core.load_dataset("lorenz", seed=0, n_samples=120)
    rules = [dict(weight_splitting_Gamma=3), dict(weight_splitting_Gamma=3, fuzzy_lr_distribution="normal",
                                                  weight_splitting_activation_function=torch.tanh)]
    configs = [dict(hidden_size=6 + 3 * i, seed=30 + i, lr=3e-3, bio=r) for i, r in enumerate(rules)]
    configs.append(dict(hidden_size=5, seed=40, lr=3e-3))
    results = train_recurrent_population(family, configs, lorenz, EPOCHS, BATCH, device="cpu")
    for config, got in zip(configs, results, strict=True):
        if "bio" in config:
            want = _solo_bio(family, config, lorenz)
        else:
            want = _solo(family, config, lorenz)
        assert got.status == "completed", got.error
        for g, w in zip(got.history, want.history, strict=True):
            assert g["val_loss"] == pytest.approx(w["val_loss"], rel=1e-5)
