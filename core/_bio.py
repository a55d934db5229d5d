"""Bio-inspired plasticity rules: synaptic diversity, stabilisation, turnover, Dale, homeostasis."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, TypeVar, overload

import torch
from torch import nn

__all__ = [
    "Distribution",
    "BioConfig",
    "BioConverter",
    "BioModule",
    "BioStepHook",
    "bio_layers",
]

_log = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)
Layer = nn.Linear | nn.Conv2d

# Magnitudes below this count as zero when a rule divides by a weight, a spread or an activity.
_TINY = 1e-12
# An output counts as "active" for the activity distribution when its magnitude exceeds this.
_ACTIVE_EPS = 0.01


class Distribution(StrEnum):
    """How the per-weight fuzzy learning-rate factors are drawn (see :class:`BioConfig`)."""

    BASELINE = "baseline"
    UNIFORM = "uniform"
    NORMAL = "normal"
    LOGNORMAL = "lognormal"
    GAMMA = "gamma"
    BETA = "beta"
    LAYER_ADAPTIVE = "layer_adaptive"
    WEIGHT_ADAPTIVE = "weight_adaptive"
    TEMPORAL = "temporal"
    ACTIVITY = "activity"


@dataclass(frozen=True)
class BioConfig:
    """Every option of the bio rules. The seed's options keep the seed's defaults; the
    ``homeostatic_*`` options are new here (the seed documents ``scale_grad`` but has none).

    Fuzzy learning rates (synaptic diversity), with ``nu = fuzzy_learning_rate_factor_nu``;
    every factor is finally clamped to ``[fuzzy_lr_min, fuzzy_lr_max]``:

    - ``baseline``: 1 everywhere. ``uniform``: U[1 - nu, 1 + nu]. ``normal``: 1 + nu * N(0, 1).
    - ``lognormal``: exp(N(-nu^2/2, nu^2)), mean 1. ``gamma``: Gamma with mean 1 and std nu
      (shape = rate = 1/nu^2). ``beta``: 1 + nu * (2B - 1) with B ~ Beta(1/nu, 1/nu).
    - ``layer_adaptive``: uniform with its spread going from nu (first converted layer) down
      to nu/2 (last): deeper layers vary less.
    - ``weight_adaptive``: uniform with a per-weight spread nu * clamp(2 - |w| / mean|w|, 0.5,
      1.5), drawn from the weights at conversion: small synapses vary more.
    - ``temporal``: starts uniform; with ``fuzzy_lr_dynamic``, every ``fuzzy_lr_update_freq``
      steps the factors decay toward 1 (f <- 1 + (f - 1) * fuzzy_lr_decay), and every tenth
      such update adds a 0.1 * U[-nu, nu] jitter.
    - ``activity``: starts at 1; with ``fuzzy_lr_dynamic``, every ``fuzzy_lr_update_freq``
      steps each output unit's row is redrawn as U[1 - s, 1 + s] with
      s = nu * (2 - clamp(1 + 0.1 (r - 1), 0.8, 1.2)), r being the unit's rate of active
      outputs (|y| > 0.01) over the layer's mean rate: busy units get steadier rates.

    Crystallisation multiplies a factor by ``dampening_factor`` where |g|/|w| <
    ``crystal_thresh`` or |g| > mean|w|. Rejuvenation replaces a weight w with probability
    exp(-``rejuvenation_parameter_dre`` * |w| / std(w)). Volume-dependent plasticity uses
    ``base_lr``, ``stability_factor`` and ``lr_variability``. Weight splitting
    (``weight_splitting_Gamma`` > 1) splits each layer's outputs into runs of Gamma
    sub-synapses, applies ``weight_splitting_activation_function`` (``None``: identity), sums
    each run and repeats the sum over it; the last layer of a multi-layer model is exempt.
    It is the one option that changes the forward function; 0 or 1 turns it off.
    ``apply_dales_principle`` records one sign per presynaptic unit at conversion. The
    ``homeostatic_*`` options drive :meth:`BioModule.scale_grad`.
    """

    fuzzy_learning_rate_factor_nu: float = 0.16
    fuzzy_lr_distribution: Distribution | str = Distribution.UNIFORM
    fuzzy_lr_min: float = 0.5
    fuzzy_lr_max: float = 2.0
    fuzzy_lr_dynamic: bool = False
    fuzzy_lr_decay: float = 0.9995
    fuzzy_lr_update_freq: int = 100
    dampening_factor: float = 0.6
    crystal_thresh: float = 4.5e-05
    rejuvenation_parameter_dre: float = 8.0
    weight_splitting_Gamma: int = 0
    weight_splitting_activation_function: Callable[[torch.Tensor], torch.Tensor] | None = field(
        default=None, compare=False
    )
    apply_dales_principle: bool = False
    base_lr: float = 0.1
    stability_factor: float = 2.0
    lr_variability: float = 0.2
    homeostatic_strength: float = 0.01
    homeostatic_target: float | None = None
    homeostatic_momentum: float = 0.9

    def __post_init__(self) -> None:
        try:
            dist = Distribution(self.fuzzy_lr_distribution)
        except ValueError:
            raise ValueError(
                f"fuzzy_lr_distribution must be one of {', '.join(d.value for d in Distribution)}, "
                f"got {self.fuzzy_lr_distribution!r}"
            ) from None
        object.__setattr__(self, "fuzzy_lr_distribution", dist)
        checks: list[tuple[str, bool, str]] = [
            ("fuzzy_learning_rate_factor_nu", self.fuzzy_learning_rate_factor_nu > 0, "> 0"),
            ("fuzzy_lr_min", self.fuzzy_lr_min >= 0, ">= 0"),
            ("fuzzy_lr_max", self.fuzzy_lr_max >= self.fuzzy_lr_min, ">= fuzzy_lr_min"),
            ("fuzzy_lr_decay", 0 < self.fuzzy_lr_decay <= 1, "in (0, 1]"),
            ("fuzzy_lr_update_freq", _is_int(self.fuzzy_lr_update_freq, 1), "an integer >= 1"),
            ("dampening_factor", 0 < self.dampening_factor < 1, "in (0, 1)"),
            ("crystal_thresh", self.crystal_thresh > 0, "> 0"),
            ("rejuvenation_parameter_dre", self.rejuvenation_parameter_dre > 0, "> 0"),
            ("weight_splitting_Gamma", _is_int(self.weight_splitting_Gamma, 0), "an integer >= 0"),
            ("base_lr", self.base_lr > 0, "> 0"),
            ("stability_factor", self.stability_factor >= 0, ">= 0"),
            ("lr_variability", self.lr_variability >= 0, ">= 0"),
            ("homeostatic_strength", self.homeostatic_strength >= 0, ">= 0"),
            ("homeostatic_target",
             self.homeostatic_target is None or self.homeostatic_target > 0, "None or > 0"),
            ("homeostatic_momentum", 0 <= self.homeostatic_momentum < 1, "in [0, 1)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
        fn = self.weight_splitting_activation_function
        if fn is not None and not callable(fn):
            raise ValueError(
                f"weight_splitting_activation_function must be callable or None, got {fn!r}"
            )

    @property
    def distribution(self) -> Distribution:
        return Distribution(self.fuzzy_lr_distribution)


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _replace_config(config: BioConfig, changes: Mapping[str, Any]) -> BioConfig:
    known = {f.name for f in fields(BioConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(
            f"unknown BioConfig option(s) {', '.join(map(repr, unknown))}; "
            f"known options: {', '.join(sorted(known))}"
        )
    return replace(config, **changes)


# -- per-layer state and rules ---------------------------------------------------------------
def _unit_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-output-unit vector shaped to broadcast over a weight-shaped tensor."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def _uniform_around_one(like: torch.Tensor, spread: torch.Tensor | float) -> torch.Tensor:
    return 1.0 + spread * (2.0 * torch.rand_like(like) - 1.0)


def _presynaptic_signs(layer: nn.Linear | nn.Conv2d) -> torch.Tensor:
    """One sign per presynaptic unit (input feature or input channel), broadcastable to W.

    Dale's principle is about a neuron's *outgoing* synapses; in PyTorch's (out, in, ...)
    layout those are a column of W, so the sign is per column. Each column keeps the sign of
    its summed weight, which loses the least mass when the rule is first enforced and leaves
    the weights, and so the forward function, untouched at conversion.
    """
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        s = torch.where(w.sum(0) < 0, -1.0, 1.0).to(w.dtype)
        return s.view(1, -1)
    g = layer.groups
    n_out, cin = w.shape[:2]
    per_group = w.reshape(g, n_out // g, cin, -1).sum(dim=(1, 3))  # (groups, in/groups)
    s = torch.where(per_group < 0, -1.0, 1.0).to(w.dtype)
    if g == 1:
        return s.view(1, cin, 1, 1)
    # In a grouped conv a row only sees its own group's channels, so the sign varies by row.
    return s[:, None, :].expand(g, n_out // g, cin).reshape(n_out, cin, 1, 1).contiguous()


class BioModule(nn.Module):
    """The bio rules' state for one Linear or Conv2d, attached to it as ``layer.bio_mod``.

    Every tensor here is a buffer (moved and saved with the model, never a parameter, so
    :func:`core.count_parameters` is unchanged): ``fuzzy_lr`` (one rate factor per weight),
    ``activity_level`` and ``activity_rate`` (per output unit: moving averages of mean |y|
    and of the share of |y| > 0.01 over training forward passes) and, with Dale's
    principle, ``dale_sign``. The rules act on the layer's ``weight`` and its gradient;
    biases are left alone. Each rule takes the layer as its argument, so that this module
    holds no reference back to its parent (copies and pickles stay simple).
    """

    fuzzy_lr: torch.Tensor
    activity_level: torch.Tensor
    activity_rate: torch.Tensor
    dale_sign: torch.Tensor | None

    def __init__(
        self, layer: nn.Linear | nn.Conv2d, config: BioConfig, layer_index: int = 0,
        n_layers: int = 1, splits: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(
                f"bio rules apply to nn.Linear and nn.Conv2d, got {type(layer).__name__}"
            )
        self.config = config
        self.layer_index = layer_index
        self.n_layers = n_layers
        self.splits = splits
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.steps = 0
        self.observed = 0
        w = layer.weight.detach()
        with torch.no_grad():
            rates = self._initial_rates(w)
        self.register_buffer("fuzzy_lr", rates.to(w.dtype))
        self.register_buffer("activity_level", w.new_zeros(w.shape[0]))
        self.register_buffer("activity_rate", w.new_zeros(w.shape[0]))
        if config.apply_dales_principle:
            self.register_buffer("dale_sign", _presynaptic_signs(layer))
        else:
            self.dale_sign = None

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"distribution={c.distribution.value}, layer={self.layer_index + 1}/{self.n_layers}, "
            f"dale={self.dale_sign is not None}, splits={self.splits}"
        )

    @property
    def tracks_activity(self) -> bool:
        """Whether the layer's outputs are observed (for homeostasis or activity rates)."""
        c = self.config
        return c.homeostatic_strength > 0 or c.distribution is Distribution.ACTIVITY

    @torch.no_grad()
    def observe(self, y: torch.Tensor) -> None:
        """Fold one training batch of the layer's output into the activity averages."""
        y = y.detach().abs()
        if self.is_conv:
            dims = (0, 2, 3) if y.dim() == 4 else (1, 2)
            level = y.mean(dims)
            rate = (y > _ACTIVE_EPS).to(y.dtype).mean(dims)
        else:
            flat = y.reshape(-1, y.shape[-1])
            level = flat.mean(0)
            rate = (flat > _ACTIVE_EPS).to(y.dtype).mean(0)
        if self.observed == 0:
            self.activity_level.copy_(level)
            self.activity_rate.copy_(rate)
        else:
            keep = self.config.homeostatic_momentum
            self.activity_level.lerp_(level, 1.0 - keep)
            self.activity_rate.lerp_(rate, 1.0 - keep)
        self.observed += 1

    # -- fuzzy learning rates ----------------------------------------------------------------
    def _initial_rates(self, w: torch.Tensor) -> torch.Tensor:
        c = self.config
        nu = c.fuzzy_learning_rate_factor_nu
        d = c.distribution
        w = w.float()
        if d in (Distribution.BASELINE, Distribution.ACTIVITY):
            rates = torch.ones_like(w)
        elif d in (Distribution.UNIFORM, Distribution.TEMPORAL):
            rates = _uniform_around_one(w, nu)
        elif d is Distribution.NORMAL:
            rates = 1.0 + nu * torch.randn_like(w)
        elif d is Distribution.LOGNORMAL:
            # exp(N(mu, s^2)) has mean exp(mu + s^2/2): mu = -nu^2/2 centres it on 1.
            rates = torch.exp(nu * torch.randn_like(w) - 0.5 * nu * nu)
        elif d is Distribution.GAMMA:
            k = torch.full_like(w, 1.0 / (nu * nu))
            rates = torch.distributions.Gamma(k, k).sample()
        elif d is Distribution.BETA:
            a = torch.full_like(w, 1.0 / nu)
            rates = 1.0 + nu * (2.0 * torch.distributions.Beta(a, a).sample() - 1.0)
        elif d is Distribution.LAYER_ADAPTIVE:
            depth = self.layer_index / max(1, self.n_layers - 1)
            rates = _uniform_around_one(w, nu * (1.0 - 0.5 * depth))
        else:  # WEIGHT_ADAPTIVE
            mag = w.abs()
            spread = nu * (2.0 - mag / (mag.mean() + _TINY)).clamp(0.5, 1.5)
            rates = _uniform_around_one(w, spread)
        return rates.clamp(c.fuzzy_lr_min, c.fuzzy_lr_max)

    def fuzzy_learning_rates(self, layer: Layer) -> bool:
        """g <- g * f: each weight's gradient times its own rate factor (synaptic diversity).

        Returns whether the weight had a gradient.
        """
        g = layer.weight.grad
        if g is None:
            return False
        g.mul_(self.fuzzy_lr)
        return True

    @torch.no_grad()
    def update_fuzzy_learning_rates(self, layer: Layer) -> None:
        """Count a step; for dynamic ``temporal``/``activity`` rates, update them when due."""
        self.steps += 1
        c = self.config
        if not c.fuzzy_lr_dynamic or self.steps % c.fuzzy_lr_update_freq:
            return
        nu = c.fuzzy_learning_rate_factor_nu
        f = self.fuzzy_lr
        if c.distribution is Distribution.TEMPORAL:
            f.sub_(1.0).mul_(c.fuzzy_lr_decay).add_(1.0)
            if self.steps % (10 * c.fuzzy_lr_update_freq) == 0:
                f.add_(0.1 * nu * (2.0 * torch.rand_like(f) - 1.0))
        elif c.distribution is Distribution.ACTIVITY and self.observed:
            rel = self.activity_rate / (self.activity_rate.mean() + _TINY)
            steadiness = (1.0 + 0.1 * (rel - 1.0)).clamp(0.8, 1.2)
            f.copy_(_uniform_around_one(f, _unit_view(nu * (2.0 - steadiness), f)))
        else:
            return
        f.clamp_(c.fuzzy_lr_min, c.fuzzy_lr_max)

    # -- stabilisation, turnover, volume, Dale, homeostasis ------------------------------------
    @torch.no_grad()
    def crystallize(self, layer: Layer) -> bool:
        """f <- f * dampening_factor where |g| / |w| < crystal_thresh or |g| > mean|w|.

        The first test finds synapses that barely move for their size (settled); the second
        those hit by an outsized gradient. Both become less plastic from the next
        :meth:`fuzzy_learning_rates` on. No clamp here: a synapse that keeps qualifying
        freezes geometrically, which is the point of crystallisation.
        """
        g = layer.weight.grad
        if g is None:
            return False
        w = layer.weight.detach().abs()
        ga = g.abs()
        mask = (ga / w.clamp_min(_TINY) < self.config.crystal_thresh) | (ga > w.mean())
        self.fuzzy_lr.mul_(torch.where(mask, self.config.dampening_factor, 1.0))
        return True

    @torch.no_grad()
    def rejuvenate_weights(self, layer: Layer) -> torch.Tensor:
        """Replace weak synapses by new ones (spine turnover); returns how many were replaced.

        Weight w is replaced with probability p = exp(-dre * |w| / std(w)) (``dre`` =
        ``rejuvenation_parameter_dre``), so weak synapses turn over and strong ones persist.
        A new synapse's magnitude is log-normal with the mean and standard deviation of the
        layer's current |w|, so newcomers look like typical synapses; its sign is the
        presynaptic unit's Dale sign when there is one, else a fair coin. A layer whose
        weights are all equal has no spread to measure and is left alone. The optimizer's
        running moments for replaced weights are kept.
        """
        w = layer.weight
        mag = w.detach().abs()
        spread = w.detach().std() if w.numel() > 1 else w.new_zeros(())
        mean_mag = mag.mean()
        if float(spread) <= _TINY or float(mean_mag) <= _TINY:
            return torch.zeros((), dtype=torch.long, device=w.device)
        p = torch.exp(-self.config.rejuvenation_parameter_dre * mag / spread)
        mask = torch.bernoulli(p).bool()
        # Log-normal parameters (mu, sigma) whose mean and std are those of |w|.
        sigma2 = torch.log1p(mag.var() / mean_mag.square())
        mu = torch.log(mean_mag) - 0.5 * sigma2
        new_mag = torch.exp(mu + sigma2.sqrt() * torch.randn_like(mag))
        if self.dale_sign is not None:
            sign = self.dale_sign.expand_as(mag)
        else:
            sign = torch.where(torch.rand_like(mag) < 0.5, -1.0, 1.0).to(mag.dtype)
        w.copy_(torch.where(mask, sign * new_mag, w))
        return mask.sum()

    def volume_dependent_lr(self, layer: Layer) -> bool:
        """g <- g * |N(m, (lr_variability * m)^2)|, m = base_lr * exp(-stability_factor * v).

        v = |w| / (1 + |w|) is the synapse's relative "volume" in [0, 1): big spines learn
        slowly and steadily, small ones fast and noisily. A fresh factor is drawn every call.
        """
        g = layer.weight.grad
        if g is None:
            return False
        with torch.no_grad():
            c = self.config
            mag = layer.weight.detach().abs()
            mean = c.base_lr * torch.exp(-c.stability_factor * mag / (1.0 + mag))
            factor = (mean * (1.0 + c.lr_variability * torch.randn_like(mean))).abs()
            g.mul_(factor)
        return True

    @torch.no_grad()
    def enforce_dales_principle(self, layer: Layer) -> bool:
        """w <- s * relu(s * w) with s the presynaptic sign: wrong-signed synapses become 0.

        Returns False when the layer was converted without ``apply_dales_principle``.
        """
        if self.dale_sign is None:
            return False
        layer.weight.mul_(self.dale_sign).clamp_(min=0.0).mul_(self.dale_sign)
        return True

    @torch.no_grad()
    def scale_grad(self, layer: Layer) -> bool:
        """Homeostatic synaptic scaling, added to the gradient (Turrigiano-style).

        Rule, per output unit i (a row of a Linear weight, an output channel of a Conv2d)::

            d_i = clip(log((a_i + eps) / (a* + eps)), -1, 1)
            g_ij <- g_ij + homeostatic_strength * d_i * w_ij

        a_i is the unit's activity: the moving average (momentum ``homeostatic_momentum``)
        of its mean |output| over training forward passes. a* is ``homeostatic_target``, or
        the layer's mean activity when that is ``None`` (units are pulled toward their
        peers). The term is the gradient of a per-unit decay whose sign follows the activity
        error, so with plain SGD at learning rate lr a step multiplies all of a unit's
        incoming weights by the same factor (1 - lr * strength * d_i): over-active units
        scale down, silent ones up, and the relative strengths of a unit's synapses, and so
        what it has learned, are kept, as in synaptic scaling. The log makes a unit twice
        too active and one half as active as wanted receive equal and opposite pushes; the
        clip bounds the push for dead or runaway units. With adaptive optimizers the term
        is rescaled per weight like any gradient. It runs after the other gradient rules so
        its size does not depend on the fuzzy factors. Returns whether anything was done
        (a gradient and at least one observed training batch are needed).
        """
        g = layer.weight.grad
        c = self.config
        if g is None or self.observed == 0 or c.homeostatic_strength == 0:
            return False
        a = self.activity_level
        target = a.mean() if c.homeostatic_target is None else a.new_tensor(c.homeostatic_target)
        d = torch.log((a + _TINY) / (target + _TINY)).clamp(-1.0, 1.0)
        g.add_(c.homeostatic_strength * _unit_view(d, g) * layer.weight.detach())
        return True


# -- forward hooks: read-only activity tracking, and weight splitting ---------------------------
def _record_activity(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    bio = module._modules.get("bio_mod")
    if module.training and isinstance(bio, BioModule) and bio.tracks_activity:
        bio.observe(output)


def _split_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    bio = module._modules["bio_mod"]
    assert isinstance(bio, BioModule)
    gamma = bio.config.weight_splitting_Gamma
    act = bio.config.weight_splitting_activation_function
    y = act(output) if act is not None else output
    dim = (1 if y.dim() == 4 else 0) if bio.is_conv else y.dim() - 1
    runs = y.unflatten(dim, (y.shape[dim] // gamma, gamma)).sum(dim + 1)
    return runs.repeat_interleave(gamma, dim=dim)


# -- model level ---------------------------------------------------------------------------------
_GRAD_RULES = ("fuzzy_learning_rates", "crystallize", "volume_dependent_lr", "scale_grad")
_MODEL_METHODS = (
    "fuzzy_learning_rates",
    "crystallize",
    "rejuvenate_weights",
    "volume_dependent_lr",
    "enforce_dales_principle",
    "scale_grad",
    "update_fuzzy_learning_rates",
)


def bio_layers(model: nn.Module) -> list[tuple[str, Layer]]:
    """The converted layers of ``model`` as ``(qualified name, layer)``, in module order."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and isinstance(m._modules.get("bio_mod"), BioModule)
    ]


def _bio(layer: nn.Module) -> BioModule:
    bio = layer._modules["bio_mod"]
    assert isinstance(bio, BioModule)
    return bio


def _run_rule(model: nn.Module, rule: str) -> int | None:
    layers = bio_layers(model)
    if not layers:
        raise RuntimeError(
            f"{type(model).__name__} has no converted layers; convert it with BioConverter "
            f"before calling {rule}()"
        )
    results = [getattr(_bio(layer), rule)(layer) for _, layer in layers]
    if rule in _GRAD_RULES and rule != "scale_grad" and not any(results):
        raise RuntimeError(
            f"{rule}() found no gradients: call it after loss.backward() and before "
            f"optimizer.step()"
        )
    if rule == "enforce_dales_principle" and not any(results):
        raise RuntimeError(
            "enforce_dales_principle() needs signs recorded at conversion: convert with "
            "BioConverter(apply_dales_principle=True)"
        )
    if rule == "rejuvenate_weights":
        return int(sum(int(n) for n in results))
    return None


def _model_method(rule: str) -> Callable[[nn.Module], int | None]:
    def method(self: nn.Module) -> int | None:
        return _run_rule(self, rule)

    method.__name__ = rule
    method.__qualname__ = rule
    method.__doc__ = f"Apply :meth:`BioModule.{rule}` to every converted layer."
    return method


class BioConverter:
    """Attach the bio rules to every nn.Linear and nn.Conv2d of a model, or of a model class.

    ``converter(model)`` (or ``converter.convert(model)``) converts an instance in place and
    returns it; ``@converter`` on an nn.Module subclass converts every instance at the end of
    its ``__init__``, with the converter's configuration at that moment (a subclass's own
    later layers are not seen). The converted model gains ``fuzzy_learning_rates()``,
    ``crystallize()``, ``rejuvenate_weights()`` (returns how many weights it replaced),
    ``volume_dependent_lr()``, ``enforce_dales_principle()``, ``scale_grad()`` and
    ``update_fuzzy_learning_rates()``, each applied to every converted layer. Conversion adds
    buffers and read-only hooks only: parameters, their count and (unless weight splitting
    is on) the forward function are unchanged. Converting twice leaves converted layers as
    they are. Keyword arguments override fields of ``config``.
    """

    def __init__(self, config: BioConfig | None = None, **kwargs: Any) -> None:
        self.config = _replace_config(config if config is not None else BioConfig(), kwargs)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> BioConverter:
        """A converter from a plain dict of :class:`BioConfig` fields (unknown keys are errors)."""
        return cls(_replace_config(BioConfig(), options))

    def get_config(self) -> BioConfig:
        return self.config

    def update_config(self, **kwargs: Any) -> None:
        """Change some options; layers converted from now on use the new configuration."""
        self.config = _replace_config(self.config, kwargs)

    @overload
    def convert(self, target: type[M]) -> type[M]: ...

    @overload
    def convert(self, target: M) -> M: ...

    def convert(self, target: nn.Module | type[nn.Module]) -> nn.Module | type[nn.Module]:
        if isinstance(target, nn.Module):
            self._convert_layers(target)
            for rule in _MODEL_METHODS:
                # A partial of a module-level function survives deepcopy and pickling.
                setattr(target, rule, functools.partial(_run_rule, target, rule))
            return target
        if isinstance(target, type) and issubclass(target, nn.Module):
            return self._convert_class(target)
        raise TypeError(
            f"BioConverter converts an nn.Module instance or subclass, got {type(target).__name__}"
        )

    __call__ = convert

    def _convert_class(self, cls: type[M]) -> type[M]:
        converter = self
        original_init = cls.__init__

        @functools.wraps(original_init)
        def __init__(module: nn.Module, *args: Any, **kwargs: Any) -> None:
            original_init(module, *args, **kwargs)
            converter._convert_layers(module)

        # setattr: type checkers reject assigning to a method of a class.
        setattr(cls, "__init__", __init__)  # noqa: B010
        for rule in _MODEL_METHODS:
            setattr(cls, rule, _model_method(rule))
        return cls

    def _convert_layers(self, model: nn.Module) -> None:
        c = self.config
        targets = [
            (name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))
        ]
        n = len(targets)
        gamma = c.weight_splitting_Gamma
        plan: list[tuple[int, nn.Linear | nn.Conv2d, bool]] = []
        for i, (name, layer) in enumerate(targets):
            if isinstance(layer._modules.get("bio_mod"), BioModule):
                continue
            # The output layer keeps its width: splitting it would tie class scores together.
            splits = gamma > 1 and not (n > 1 and i == n - 1)
            if splits and layer.weight.shape[0] % gamma:
                raise ValueError(
                    f"weight_splitting_Gamma={gamma} must divide the {layer.weight.shape[0]} "
                    f"outputs of layer {name or '(model)'!r}; choose a divisor, or 0 to turn "
                    f"weight splitting off"
                )
            plan.append((i, layer, splits))
        for i, layer, splits in plan:
            bio = BioModule(layer, c, layer_index=i, n_layers=n, splits=splits)
            layer.add_module("bio_mod", bio)
            if bio.tracks_activity:
                layer.register_forward_hook(_record_activity)
            if splits:
                layer.register_forward_hook(_split_output)
        _log.debug("converted %d of %d layers of %s", len(plan), n, type(model).__name__)


@dataclass
class BioStepHook:
    """Applies the bio rules inside :func:`core.train_model` (pass it in ``step_hooks``).

    ``after_backward`` (gradients exist, the step has not happened), per layer in this order:
    ``volume_dependent_lr`` (if ``volume_dependent``), ``fuzzy_learning_rates`` (if
    ``fuzzy``), ``crystallize`` (if ``crystallize``: it reads this step's gradient and damps
    the factors used from the next step on), ``scale_grad`` (if ``scale_grad``: last, so the
    homeostatic term is not itself rescaled). Gradient clipping, when asked for, comes after.

    ``after_step`` (weights updated): ``update_fuzzy_learning_rates`` (if ``update_rates``;
    only dynamic temporal/activity rates change), ``rejuvenate_weights`` every
    ``rejuvenate_every`` optimizer steps (``None``: never; the seed rejuvenates once per
    epoch, i.e. every ceil(n_train / batch_size) steps), then ``enforce_dales_principle``
    last, so every step ends on weights that obey it. ``dales=None`` enforces it exactly on
    layers converted with ``apply_dales_principle``.
    """

    fuzzy: bool = True
    crystallize: bool = True
    volume_dependent: bool = False
    scale_grad: bool = False
    dales: bool | None = None
    update_rates: bool = True
    rejuvenate_every: int | None = None
    steps: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.rejuvenate_every is not None and not _is_int(self.rejuvenate_every, 1):
            raise ValueError(
                f"rejuvenate_every must be a positive number of steps or None, "
                f"got {self.rejuvenate_every!r}"
            )

    def _layers(self, model: nn.Module) -> list[tuple[Layer, BioModule]]:
        layers = [(layer, _bio(layer)) for _, layer in bio_layers(model)]
        if not layers:
            raise RuntimeError(
                f"BioStepHook got a {type(model).__name__} without converted layers; convert "
                f"the model with BioConverter first"
            )
        return layers

    def after_backward(self, model: nn.Module) -> None:
        for layer, bio in self._layers(model):
            if self.volume_dependent:
                bio.volume_dependent_lr(layer)
            if self.fuzzy:
                bio.fuzzy_learning_rates(layer)
            if self.crystallize:
                bio.crystallize(layer)
            if self.scale_grad:
                bio.scale_grad(layer)

    def after_step(self, model: nn.Module) -> None:
        self.steps += 1
        layers = self._layers(model)
        if self.dales and not any(bio.dale_sign is not None for _, bio in layers):
            raise RuntimeError(
                "BioStepHook(dales=True) needs a model converted with apply_dales_principle=True"
            )
        rejuvenate = self.rejuvenate_every is not None and self.steps % self.rejuvenate_every == 0
        for layer, bio in layers:
            if self.update_rates:
                bio.update_fuzzy_learning_rates(layer)
            if rejuvenate:
                bio.rejuvenate_weights(layer)
            if self.dales is not False:
                bio.enforce_dales_principle(layer)
