"""Bio rules: conversion, each rule's formula on a small layer, Dale's principle, the step hook."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import core
from core import BioConfig, BioConverter, BioModule, BioStepHook, Distribution, bio_layers

NU = 0.16


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _bio(layer: nn.Module) -> BioModule:
    bio = layer.bio_mod
    assert isinstance(bio, BioModule)
    return bio


def _linear_with(weight: list[list[float]], grad: list[list[float]], **cfg: object) -> nn.Linear:
    """A bias-free converted Linear whose weight and gradient are exactly the given values."""
    layer = nn.Linear(len(weight[0]), len(weight), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    BioConverter(**cfg).convert(layer)  # type: ignore[arg-type]
    layer.weight.grad = torch.tensor(grad)
    return layer


# -- conversion ------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", [d.value for d in Distribution])
def test_conversion_keeps_count_and_forward_and_adds_only_buffers(distribution: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 3))
    x = torch.randn(3, 2, 5, 5)
    before, n_params = model(x), core.count_parameters(model)
    names = {n for n, _ in model.named_parameters()}
    bio = BioConverter(fuzzy_lr_distribution=distribution, apply_dales_principle=True)(model)
    assert bio is model
    assert torch.equal(model(x), before)
    assert core.count_parameters(model) == n_params
    assert {n for n, _ in model.named_parameters()} == names
    assert {"0.bio_mod.fuzzy_lr", "3.bio_mod.dale_sign"} <= set(model.state_dict())
    assert [n for n, _ in bio_layers(model)] == ["0", "3"]


def test_converting_twice_keeps_the_first_state() -> None:
    model = BioConverter()(_mlp())
    rates = model[0].bio_mod.fuzzy_lr.clone()
    BioConverter(fuzzy_lr_distribution="baseline")(model)
    assert torch.equal(model[0].bio_mod.fuzzy_lr, rates)


def test_class_decorator_converts_every_instance() -> None:
    @BioConverter(fuzzy_lr_distribution="baseline")
    class Net(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc = nn.Linear(3, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    a, b = Net(4), Net(5)
    assert torch.equal(a.fc.bio_mod.fuzzy_lr, torch.ones(4, 3))
    assert b.fc.bio_mod.fuzzy_lr.shape == (5, 3)
    a(torch.randn(2, 3)).sum().backward()
    a.fuzzy_learning_rates()  # a method of the class now


def test_config_defaults_are_the_seed_projects() -> None:
    c = BioConfig()
    assert (c.fuzzy_learning_rate_factor_nu, c.dampening_factor, c.crystal_thresh,
            c.rejuvenation_parameter_dre, c.weight_splitting_Gamma, c.apply_dales_principle,
            c.base_lr, c.stability_factor, c.lr_variability) == (
        0.16, 0.6, 4.5e-05, 8.0, 0, False, 0.1, 2.0, 0.2)
    assert (c.fuzzy_lr_distribution, c.fuzzy_lr_min, c.fuzzy_lr_max, c.fuzzy_lr_dynamic,
            c.fuzzy_lr_decay, c.fuzzy_lr_update_freq) == (
        Distribution.UNIFORM, 0.5, 2.0, False, 0.9995, 100)


def test_converter_options_api() -> None:
    conv = BioConverter(BioConfig(dampening_factor=0.7), crystal_thresh=1e-3)
    assert conv.get_config().dampening_factor == 0.7 and conv.config.crystal_thresh == 1e-3
    conv.update_config(dampening_factor=0.5)
    assert conv.config.dampening_factor == 0.5 and conv.config.crystal_thresh == 1e-3
    from_dict = BioConverter.from_dict({"fuzzy_learning_rate_factor_nu": 0.2,
                                        "fuzzy_lr_distribution": "gamma"})
    assert from_dict.config.fuzzy_lr_distribution is Distribution.GAMMA
    assert BioConfig() == BioConfig()
    with pytest.raises(ValueError, match="known options"):
        BioConverter.from_dict({"dampening": 0.5})
    with pytest.raises(ValueError, match="dampening_factor must be in"):
        BioConverter(dampening_factor=1.5)
    with pytest.raises(ValueError, match="lognormal"):
        BioConfig(fuzzy_lr_distribution="cauchy")
    with pytest.raises(TypeError, match="instance or subclass"):
        BioConverter().convert("model")  # type: ignore[call-overload]


def test_copies_and_pickles_keep_the_methods_on_the_copy() -> None:
    model = BioConverter()(_mlp())
    clone = copy.deepcopy(model)
    clone(torch.randn(2, 6)).sum().backward()
    clone.fuzzy_learning_rates()  # would raise if it still pointed at the gradient-free original
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.crystallize.args[0] is loaded


# -- fuzzy learning rates -----------------------------------------------------------------------
def test_fuzzy_learning_rates_multiply_each_gradient_by_its_factor() -> None:
    torch.manual_seed(0)
    model = BioConverter()(_mlp())
    model(torch.randn(4, 6)).sum().backward()
    grads = [model[i].weight.grad.clone() for i in (0, 2)]
    bias_grad = model[0].bias.grad.clone()
    model.fuzzy_learning_rates()
    for i, g in zip((0, 2), grads, strict=True):
        assert torch.equal(model[i].weight.grad, g * model[i].bio_mod.fuzzy_lr)
    assert torch.equal(model[0].bias.grad, bias_grad)


def _rates(distribution: str, shape: tuple[int, int] = (200, 200), **cfg: object) -> torch.Tensor:
    torch.manual_seed(0)
    converter = BioConverter(fuzzy_lr_distribution=distribution, **cfg)  # type: ignore[arg-type]
    layer = converter(nn.Linear(shape[1], shape[0]))
    return layer.bio_mod.fuzzy_lr


def test_fixed_distributions_have_their_documented_shape() -> None:
    assert torch.equal(_rates("baseline"), torch.ones(200, 200))
    assert torch.equal(_rates("activity"), torch.ones(200, 200))
    for name in ("uniform", "temporal"):
        r = _rates(name)
        assert r.min() >= 1 - NU and r.max() <= 1 + NU and abs(r.mean() - 1) < 0.005
        assert abs(r.std() - NU / math.sqrt(3)) < 0.005
    r = _rates("beta")
    assert r.min() >= 1 - NU and r.max() <= 1 + NU and abs(r.mean() - 1) < 0.005
    for name in ("normal", "lognormal", "gamma"):  # mean 1, spread nu
        r = _rates(name)
        assert abs(r.mean() - 1) < 0.005 and abs(r.std() - NU) < 0.01, name
    assert (_rates("lognormal") > 0).all() and (_rates("gamma") > 0).all()
    wide = _rates("normal", fuzzy_learning_rate_factor_nu=2.0)
    assert wide.min() == 0.5 and wide.max() == 2.0  # clamped to [fuzzy_lr_min, fuzzy_lr_max]


def test_layer_adaptive_spread_halves_from_first_to_last_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(100, 100) for _ in range(3)])
    BioConverter(fuzzy_lr_distribution="layer_adaptive")(model)
    spreads = [float((m.bio_mod.fuzzy_lr - 1).abs().max()) for m in model]
    assert spreads[0] == pytest.approx(NU, rel=0.01)
    assert spreads[1] == pytest.approx(0.75 * NU, rel=0.01)
    assert spreads[2] == pytest.approx(0.5 * NU, rel=0.01)


def test_weight_adaptive_spread_shrinks_with_weight_size() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(100, 100)
    mag = layer.weight.detach().abs()
    rates = BioConverter(fuzzy_lr_distribution="weight_adaptive")(layer).bio_mod.fuzzy_lr
    bound = NU * (2 - mag / mag.mean()).clamp(0.5, 1.5)
    assert ((rates - 1).abs() <= bound + 1e-6).all()
    small, large = mag < 0.3 * mag.mean(), mag > 1.7 * mag.mean()
    assert (rates[small] - 1).abs().max() > 1.4 * NU
    assert (rates[large] - 1).abs().max() <= 0.5 * NU + 1e-6


def test_temporal_rates_decay_toward_one_when_dynamic() -> None:
    layer = BioConverter(fuzzy_lr_distribution="temporal", fuzzy_lr_dynamic=True,
                         fuzzy_lr_update_freq=2, fuzzy_lr_decay=0.5)(nn.Linear(4, 3))
    bio = _bio(layer)
    start = bio.fuzzy_lr.clone()
    bio.update_fuzzy_learning_rates(layer)  # step 1: not due
    assert torch.equal(bio.fuzzy_lr, start)
    bio.update_fuzzy_learning_rates(layer)  # step 2: f <- 1 + (f - 1) * 0.5
    assert torch.allclose(bio.fuzzy_lr, 1 + (start - 1) * 0.5)


def test_activity_rates_give_busy_units_steadier_rates() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(50, 2)
    with torch.no_grad():
        layer.weight[1].zero_()
        layer.bias.zero_()  # unit 1 is never active
    BioConverter(fuzzy_lr_distribution="activity", fuzzy_lr_dynamic=True,
                 fuzzy_lr_update_freq=1)(layer)
    layer(torch.randn(32, 50))
    bio = _bio(layer)
    assert bio.activity_rate[0] > 0.9 and bio.activity_rate[1] == 0
    bio.update_fuzzy_learning_rates(layer)
    # Relative rates are (2, 0): spreads nu * (2 - 1.1) and nu * (2 - 0.9).
    spread = (bio.fuzzy_lr - 1).abs().max(dim=1).values
    assert spread[0] <= 0.9 * NU + 1e-6 and 0.9 * NU < spread[1] <= 1.1 * NU + 1e-6


# -- crystallisation, volume, rejuvenation --------------------------------------------------
def test_crystallize_damps_exactly_the_settled_and_outsized_synapses() -> None:
    # mean|w| = 1; |g|/|w| < 4.5e-5 (settled) or |g| > 1 (outsized) crystallise.
    layer = _linear_with(
        [[1.0, 1.0, 1.0, 1.0], [2.0, 0.5, 1.0, 0.5]],
        [[1e-6, 0.5, 2.0, -0.1], [-1e-4, -1e-5, 0.99, -1.01]],
        fuzzy_lr_distribution="baseline",
    )
    _bio(layer).crystallize(layer)
    expected = torch.tensor([[0.6, 1, 0.6, 1], [1, 0.6, 1, 0.6]])
    assert torch.allclose(_bio(layer).fuzzy_lr, expected)
    _bio(layer).crystallize(layer)  # repeated crystallisation keeps damping: no clamp
    assert torch.allclose(_bio(layer).fuzzy_lr, expected.pow(2))


def test_volume_dependent_lr_mean_follows_volume_and_spread_follows_variability() -> None:
    torch.manual_seed(0)
    weight = torch.linspace(-3, 3, 12).view(3, 4)
    layer = _linear_with(weight.tolist(), torch.ones(3, 4).tolist(), lr_variability=1e-7,
                         base_lr=0.3, stability_factor=1.5)
    _bio(layer).volume_dependent_lr(layer)
    v = weight.abs() / (1 + weight.abs())
    assert torch.allclose(layer.weight.grad, 0.3 * torch.exp(-1.5 * v), rtol=1e-5)

    big = _linear_with(torch.zeros(300, 300).tolist(), torch.ones(300, 300).tolist())
    _bio(big).volume_dependent_lr(big)  # |w| = 0: mean base_lr = 0.1, std 0.2 * 0.1
    f = big.weight.grad
    assert abs(float(f.mean()) - 0.1) < 1e-3 and abs(float(f.std()) - 0.02) < 1e-3
    assert (f >= 0).all()


def test_rejuvenation_replaces_weak_synapses_and_keeps_strong_ones() -> None:
    torch.manual_seed(0)
    w = torch.zeros(20, 10)
    w[:, :5] = 10.0  # p = exp(-8 * 10 / std) ~ 1e-7: kept; zeros have p = 1: replaced
    layer = _linear_with(w.tolist(), w.tolist())
    assert _bio(layer).rejuvenate_weights(layer) == 100
    assert torch.equal(layer.weight[:, :5], w[:, :5])
    new = layer.weight.detach()[:, 5:]
    assert (new != 0).all() and (new > 0).any() and (new < 0).any()
    # Log-normal magnitudes whose mean is that of |w| before (5.0).
    assert 2.0 < float(new.abs().mean()) < 8.0


def test_rejuvenated_synapses_take_their_presynaptic_sign() -> None:
    torch.manual_seed(0)
    w = torch.zeros(30, 4)
    w[:, :2] = torch.tensor([5.0, -5.0])
    w[0, 2:] = torch.tensor([1.0, -1.0])  # columns 2 and 3 get signs + and -
    layer = _linear_with(w.tolist(), w.tolist(), apply_dales_principle=True)
    _bio(layer).rejuvenate_weights(layer)
    new = layer.weight.detach()
    assert (new[1:, 2] > 0).all() and (new[1:, 3] < 0).all()


def test_model_rules_need_gradients_and_say_when_to_run() -> None:
    model = BioConverter()(_mlp())
    with pytest.raises(RuntimeError, match="after loss.backward"):
        model.fuzzy_learning_rates()
    with pytest.raises(RuntimeError, match="apply_dales_principle=True"):
        model.enforce_dales_principle()
    with pytest.raises(RuntimeError, match="convert it with BioConverter"):
        core._bio._run_rule(_mlp(), "crystallize")


# -- Dale's principle --------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2])
def test_dales_principle_holds_after_enforcement(groups: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=groups), nn.Flatten(), nn.Linear(6, 5))
    originals = [m.weight.detach().clone() for m in (model[0], model[2])]
    BioConverter(apply_dales_principle=True)(model)
    assert torch.equal(model[0].weight, originals[0])  # conversion alone changes nothing
    model.enforce_dales_principle()
    conv_w, lin_w = model[0].weight.detach(), model[2].weight.detach()
    # Linear: one sign per input column.
    for j in range(6):
        col = lin_w[:, j]
        assert (col >= 0).all() or (col <= 0).all()
    # Conv: one sign per input channel, i.e. per (group, local channel) across the group's rows.
    per = 6 // groups
    for g in range(groups):
        for c in range(4 // groups):
            block = conv_w[g * per:(g + 1) * per, c]
            assert (block >= 0).all() or (block <= 0).all()
    # The kept weights are exactly the right-signed originals; the others are zero.
    sign = model[2].bio_mod.dale_sign
    assert torch.equal(lin_w, torch.where(originals[1] * sign > 0, originals[1], 0.0).abs() * sign)


# -- homeostatic scaling ---------------------------------------------------------------------
def test_scale_grad_adds_the_homeostatic_term() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x1, x2 = torch.randn(8, 5), 3 * torch.randn(8, 5)
    with torch.no_grad():
        a1 = layer(x1).abs().mean(0)
        a2 = layer(x2).abs().mean(0)
    BioConverter(homeostatic_strength=0.05, homeostatic_momentum=0.5)(layer)
    layer.eval()
    layer(x1)  # evaluation passes do not count
    layer.train()
    layer(x1)
    layer(x2).sum().backward()
    activity = 0.5 * a1 + 0.5 * a2  # first batch taken as is, then the moving average
    assert torch.allclose(_bio(layer).activity_level, activity)
    g = layer.weight.grad.clone()
    _bio(layer).scale_grad(layer)
    d = torch.log(activity / activity.mean()).clamp(-1, 1)
    assert torch.allclose(layer.weight.grad, g + 0.05 * d[:, None] * layer.weight.detach())

    target = 10 * float(activity.max())  # every unit far too quiet: push clipped at -1
    _bio(layer).config = BioConfig(homeostatic_strength=0.05, homeostatic_target=target)
    layer.weight.grad = g.clone()
    _bio(layer).scale_grad(layer)
    assert torch.allclose(layer.weight.grad, g - 0.05 * layer.weight.detach())


def test_scale_grad_scales_each_units_synapses_by_one_factor_under_sgd() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight[0].mul_(10)  # unit 0 is over-active
    BioConverter(homeostatic_strength=0.1)(layer)
    layer(torch.randn(16, 4))
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.zeros_like(before)  # no error signal: homeostasis only
    _bio(layer).scale_grad(layer)
    torch.optim.SGD([layer.weight], lr=0.5).step()
    ratio = layer.weight.detach() / before
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))  # relative strengths kept
    assert ratio[0, 0] < 1 and (ratio[1:, 0] > 1).all()


# -- weight splitting ------------------------------------------------------------------------
def test_weight_splitting_sums_runs_of_gamma_outputs_except_the_output_layer() -> None:
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(3, 6)
    with torch.no_grad():
        raw = model[0](x)
        out_raw = model[2](torch.relu(raw.view(3, 4, 2).sum(2).repeat_interleave(2, 1)))
    BioConverter(weight_splitting_Gamma=2)(model)
    with torch.no_grad():
        split = model[0](x)
        out = model(x)
    assert torch.allclose(split, raw.view(3, 4, 2).sum(2).repeat_interleave(2, 1))
    assert torch.allclose(out, out_raw)  # the last layer is not split
    with pytest.raises(ValueError, match="must divide the 8 outputs"):
        BioConverter(weight_splitting_Gamma=3)(_mlp())


# -- inside core.train_model ----------------------------------------------------------------
def test_step_hook_applies_the_gradient_rules_in_order() -> None:
    torch.manual_seed(0)
    model = BioConverter(homeostatic_strength=0.1)(_mlp())
    model(torch.randn(4, 6)).sum().backward()
    layer, bio = model[0], model[0].bio_mod
    g, rates = layer.weight.grad.clone(), bio.fuzzy_lr.clone()
    w = layer.weight.detach()
    BioStepHook(scale_grad=True).after_backward(model)
    fuzzy = g * rates
    mask = (fuzzy.abs() / w.abs() < bio.config.crystal_thresh) | (fuzzy.abs() > w.abs().mean())
    assert torch.allclose(bio.fuzzy_lr, torch.where(mask, rates * 0.6, rates))
    d = torch.log(bio.activity_level / bio.activity_level.mean()).clamp(-1, 1)
    assert torch.allclose(layer.weight.grad, fuzzy + 0.1 * d[:, None] * w)


def test_train_model_with_bio_hook_keeps_dale_and_rejuvenates_on_schedule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = core.load_dataset("digits", subset_size=200, seed=0)
    model = BioConverter(apply_dales_principle=True)(
        core.create_model("vanilla_mlp", seed=0, in_dim=64, hidden_dim=16)
    )
    hook = BioStepHook(volume_dependent=True, scale_grad=True, rejuvenate_every=2)
    calls: list[int] = []
    original = BioModule.rejuvenate_weights

    def spy(self: BioModule, layer: nn.Module) -> torch.Tensor:
        calls.append(hook.steps)
        return original(self, layer)

    monkeypatch.setattr(BioModule, "rejuvenate_weights", spy)
    result = core.train_model(model, data, n_epochs=2, batch_size=64, step_hooks=[hook],
                              device="cpu")
    assert result.status == "completed" and hook.steps == 2 * 3
    assert calls == [2, 2, 4, 4, 6, 6]  # both layers, every second step
    for _, layer in bio_layers(model):
        signed = layer.weight.detach() * layer.bio_mod.dale_sign
        assert (signed >= 0).all()
    assert result.n_params == core.analytic_parameter_count("vanilla_mlp", in_dim=64, hidden_dim=16)
