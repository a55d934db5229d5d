"""Dendrite growth on any model: zero-initialised dendrite sets on its Linear/Conv2d layers."""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ._data import Dataset
from ._registry import count_parameters
from ._train import StepHook, TrainResult, make_optimizer, resolve_device, train_model

__all__ = [
    "GrowthConfig",
    "DendriteSets",
    "make_growable",
    "grow",
    "growth_cost",
    "n_dendrite_sets",
    "train_with_growth",
]

_log = logging.getLogger(__name__)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
    "identity": _identity,
}
_MODES = ("history", "fixed")


class _DendriteSet(nn.Module):
    """One grown set: a copy-shaped branch, its output weights and its cascade weights."""

    def __init__(self, branch: nn.Module, n_out: int, index: int, like: torch.Tensor) -> None:
        super().__init__()
        self.branch = branch
        self.out_weight = nn.Parameter(like.new_zeros(n_out))
        self.cascade: nn.Parameter | None
        if index:
            self.cascade = nn.Parameter(like.new_zeros(index, n_out))
        else:
            self.register_parameter("cascade", None)


class DendriteSets(nn.Module):
    """The dendrite sets grown on one Linear or Conv2d (its "neuron"), kept as ``layer.dendrites``.

    Set k is a branch b_k of the same type and shape as the neuron layer (same in/out sizes,
    kernel, stride, padding, groups and bias), freshly initialised. It joins the neuron
    through one weight per output channel, a_k, and sees every earlier set's output through
    per-channel cascade weights c_kj; all of these start at zero::

        z_k = act(b_k(x) + sum_{j<k} c_kj * z_j)
        y   = layer(x) + sum_k a_k * z_k

    So right after a set is added the model computes exactly what it computed before, and
    gradient reaches a_k at once (z_k is not zero), then the branch through a_k. Set k adds
    ``set_cost(k)`` = |W| + |b| + n_out * (1 + k) parameters. The sum is added by a forward
    hook on the neuron layer that is registered only once a set exists: a layer with no
    sets runs exactly as before, at no cost. Code that reads ``layer.weight`` directly
    instead of calling the layer (e.g. nn.MultiheadAttention's out_proj) bypasses the hook.
    """

    def __init__(self, layer: nn.Linear | nn.Conv2d, activation: str = "tanh") -> None:
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(
                f"dendrites grow on nn.Linear and nn.Conv2d, got {type(layer).__name__}"
            )
        _check_activation(activation)
        self.activation = activation
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.n_out = int(layer.weight.shape[0])
        bias = layer.bias.numel() if layer.bias is not None else 0
        self.branch_size = layer.weight.numel() + bias
        self.hooked = False
        if isinstance(layer, nn.Conv2d):
            self._spec: dict[str, Any] = dict(
                in_channels=layer.in_channels, out_channels=layer.out_channels,
                kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                padding_mode=layer.padding_mode,
            )
        else:
            self._spec = dict(in_features=layer.in_features, out_features=layer.out_features,
                              bias=layer.bias is not None)
        self.sets = nn.ModuleList()

    def __len__(self) -> int:
        return len(self.sets)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def set_cost(self, index: int) -> int:
        """Exact number of parameters that set number ``index`` (0-based) adds."""
        return self.branch_size + self.n_out * (1 + index)

    def add_set(self, device: torch.device, dtype: torch.dtype) -> int:
        """Append one fresh set; returns the parameters it added.

        The branch is initialised on the CPU, so a seeded growth is the same on every device.
        """
        index = len(self.sets)
        cls: type[nn.Module] = nn.Conv2d if self.is_conv else nn.Linear
        branch = cls(**self._spec).to(device=device, dtype=dtype)
        like = torch.empty(0, device=device, dtype=dtype)
        self.sets.append(_DendriteSet(branch, self.n_out, index, like))
        return self.set_cost(index)

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` sets."""
        del self.sets[n:]

    def _per_channel(self, v: torch.Tensor) -> torch.Tensor:
        # Conv outputs carry channels before (H, W); Linear outputs carry them last.
        return v.view(-1, 1, 1) if self.is_conv else v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.activation]
        outs: list[torch.Tensor] = []
        total: torch.Tensor | None = None
        for s in self.sets:
            assert isinstance(s, _DendriteSet)
            h = s.branch(x)
            if s.cascade is not None:
                for c, z_prev in zip(s.cascade, outs, strict=True):
                    h = h + self._per_channel(c) * z_prev
            z = act(h)
            outs.append(z)
            term = self._per_channel(s.out_weight) * z
            total = term if total is None else total + term
        if total is None:
            raise RuntimeError("DendriteSets has no sets to run; grow(model) adds one")
        return total


def _check_activation(activation: str) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {', '.join(map(repr, _ACTIVATIONS))}, got {activation!r}"
        )


def _add_dendrites(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
    ds = module._modules.get("dendrites")
    if not isinstance(ds, DendriteSets) or not len(ds.sets):
        return None
    return output + ds(args[0])


def _sites(model: nn.Module) -> list[tuple[nn.Module, DendriteSets]]:
    return [
        (m, ds) for m in model.modules()
        if isinstance(ds := m._modules.get("dendrites"), DendriteSets)
    ]


def make_growable(
    model: nn.Module, layers: Sequence[str] | str = ("*",), activation: str = "tanh"
) -> list[str]:
    """Prepare the Linear and Conv2d layers of ``model`` whose names match ``layers`` for growth.

    ``layers`` holds shell-style patterns matched against qualified module names
    (``"*"``: every layer; ``("fc", "layer4.*")``: the classifier and the last stage).
    Each chosen layer gets an empty :class:`DendriteSets`; nothing else changes, so this
    costs nothing until :func:`grow` adds a set. Layers prepared before are kept as they
    are; a grown branch is never itself prepared. Returns the names of all growable layers.
    """
    _check_activation(activation)
    patterns = (layers,) if isinstance(layers, str) else tuple(layers)
    named = list(model.named_modules())
    inside = [f"{n}." if n else "" for n, m in named if isinstance(m, DendriteSets)]
    candidates = [
        (n, m) for n, m in named
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not any(n.startswith(p) for p in inside)
    ]
    chosen = [(n, m) for n, m in candidates if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        shown = ", ".join(repr(n) for n, _ in candidates[:12]) or "(none)"
        raise ValueError(
            f"no Linear or Conv2d layer matches {list(patterns)}; the model's layers are: "
            f"{shown}{' ...' if len(candidates) > 12 else ''}"
        )
    for _, m in chosen:
        if not isinstance(m._modules.get("dendrites"), DendriteSets):
            assert isinstance(m, (nn.Linear, nn.Conv2d))
            m.add_module("dendrites", DendriteSets(m, activation))
    return [n for n, m in named if isinstance(m._modules.get("dendrites"), DendriteSets)]


def grow(model: nn.Module, seed: int | None = None) -> int:
    """Add one dendrite set to every growable layer; returns the parameters added.

    The model's function is unchanged at this moment (new output weights are zero). With
    ``seed`` the new branches are drawn from ``torch.manual_seed(seed)`` without touching the
    caller's random state. Rebuild the optimizer afterwards: the new parameters are not in it.
    """
    sites = _sites(model)
    if not sites:
        raise ValueError("the model has no growable layers; call make_growable(model) first")
    added = 0
    with torch.random.fork_rng(devices=[]) if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        for layer, ds in sites:
            w = layer.weight
            assert isinstance(w, torch.Tensor)
            added += ds.add_set(w.device, w.dtype)
            if not ds.hooked:
                layer.register_forward_hook(_add_dendrites)
                ds.hooked = True
    return added


def growth_cost(model: nn.Module) -> int:
    """Exact number of parameters the next :func:`grow` would add."""
    return sum(ds.set_cost(len(ds)) for _, ds in _sites(model))


def n_dendrite_sets(model: nn.Module) -> int:
    """How many dendrite sets the model's growable layers carry (they grow together)."""
    return max((len(ds) for _, ds in _sites(model)), default=0)


# -- training with growth ------------------------------------------------------------------------
@dataclass(frozen=True)
class GrowthConfig:
    """When and where :func:`train_with_growth` grows dendrite sets.

    The score is ``metric`` of each epoch's metrics (``None``: ``val_accuracy`` for
    classification, ``val_loss`` otherwise; or a callable of the metrics dict), maximised
    unless its name contains "loss" (``maximize`` overrides). An epoch *improves* when its
    score beats the best so far by more than ``improvement_threshold``; only then is the
    best checkpoint replaced.

    ``mode="history"`` grows once ``patience`` epochs have passed without improvement (or
    since the last growth). ``mode="fixed"`` grows after epoch ``fixed_start`` and then every
    ``fixed_every`` epochs. A grown set is kept once the score improves on the best from
    before it; if it has not by the next growth point, it is thrown away and a set with fresh
    weights is tried from the same checkpoint, up to ``max_retries`` times, after which
    training stops. ``max_sets`` caps the number of sets. ``layers`` and ``activation`` go
    to :func:`make_growable` when the model has no growable layers yet.
    """

    mode: str = "history"
    patience: int = 3
    improvement_threshold: float = 1e-4
    fixed_start: int = 5
    fixed_every: int = 5
    max_retries: int = 2
    max_sets: int | None = None
    metric: str | Callable[[dict[str, Any]], float] | None = None
    maximize: bool | None = None
    layers: tuple[str, ...] | str = ("*",)
    activation: str = "tanh"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(
                f"mode must be one of {', '.join(map(repr, _MODES))}, got {self.mode!r}"
            )
        for name, low in (("patience", 1), ("fixed_start", 1), ("fixed_every", 1),
                          ("max_retries", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.max_sets is not None and (not isinstance(self.max_sets, int) or self.max_sets < 1):
            raise ValueError(f"max_sets must be a positive integer or None, got {self.max_sets!r}")
        if not (self.improvement_threshold >= 0 and math.isfinite(self.improvement_threshold)):
            raise ValueError(
                "improvement_threshold must be a finite number >= 0, "
                f"got {self.improvement_threshold!r}"
            )
        if self.metric is not None and not (isinstance(self.metric, str) or callable(self.metric)):
            raise ValueError(
                f"metric must be a metric name, a callable or None, got {self.metric!r}"
            )
        _check_activation(self.activation)
        layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        if not layers:
            raise ValueError("layers must name at least one pattern, e.g. ('*',)")
        object.__setattr__(self, "layers", layers)

    def scorer(self, task: str) -> tuple[Callable[[dict[str, Any]], float], bool]:
        """The score function of one epoch's metrics, and whether higher is better."""
        metric = self.metric
        if metric is None:
            metric = "val_accuracy" if task == "classification" else "val_loss"
        if callable(metric):
            return metric, True if self.maximize is None else self.maximize
        key = metric
        maximize = "loss" not in key if self.maximize is None else self.maximize

        def score(metrics: dict[str, Any]) -> float:
            if metrics.get(key) is None:
                known = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
                raise ValueError(f"metric {key!r} is not reported here; numeric metrics: {known}")
            return float(metrics[key])

        return score, maximize


@dataclass
class _Checkpoint:
    epoch: int
    score: float  # oriented: higher is better
    n_sets: int
    n_params: int
    state: dict[str, torch.Tensor]


def _snapshot(model: nn.Module, epoch: int, score: float) -> _Checkpoint:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _Checkpoint(epoch, score, n_dendrite_sets(model), count_parameters(model), state)


def _restore(model: nn.Module, ckpt: _Checkpoint) -> None:
    for _, ds in _sites(model):
        ds.truncate(ckpt.n_sets)
    while n_dendrite_sets(model) < ckpt.n_sets:
        grow(model)
    model.load_state_dict(ckpt.state)


def train_with_growth(
    model: nn.Module,
    data: Dataset,
    n_epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    *,
    growth: GrowthConfig | None = None,
    max_params: int | None = None,
    on_epoch: Callable[[int, dict[str, Any]], Any] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    optimizer: str = "adam",
    grad_clip: float | None = None,
    step_hooks: Sequence[StepHook] = (),
    eval_test: bool = True,
    name: str = "",
) -> TrainResult:
    """Train ``model`` like :func:`core.train_model`, growing dendrite sets as ``growth`` says.

    Each epoch is one :func:`core.train_model` epoch (same data handling, hooks and
    divergence check). After it, the epoch's score is compared with the best (see
    :class:`GrowthConfig`), and at a growth point the best checkpoint is restored before a
    set is added to every growable layer (preparing the layers matching ``growth.layers``
    first if none are); the optimizer is then rebuilt, so its state restarts. A growth that
    would take the model past ``max_params`` parameters (or past ``growth.max_sets``) is not
    taken, and no later one is tried. No growth happens after the last epoch.

    Every history entry has train_model's keys plus ``n_params`` and ``n_dendrite_sets``
    (of the model trained in that epoch), ``score``, ``best_score``, ``best_epoch``,
    ``retries`` and ``growth``: ``None``, ``"grew"``, ``"retry"``, ``"stop"`` (retries
    exhausted: training ends, status stays ``"completed"``), ``"max_params"`` or
    ``"max_sets"``. ``on_epoch(epoch, metrics)`` sees the entry after the growth step; a
    truthy return stops with status ``"stopped"``. However training ends, ``model`` is left
    holding the best checkpoint, whose metrics are ``history[best_epoch - 1]``;
    ``n_params`` of the result counts that model.
    """
    cfg = growth if growth is not None else GrowthConfig()
    if n_epochs < 1:
        raise ValueError(f"n_epochs must be >= 1, got {n_epochs}")
    if not isinstance(optimizer, str):
        raise ValueError(
            "train_with_growth rebuilds its optimizer after each growth, so optimizer must be "
            f"a name ('adam', 'adamw', 'sgd'), got {type(optimizer).__name__}"
        )
    dev = resolve_device(device)
    model = model.to(dev)
    d = data.to(dev)
    if not _sites(model):
        make_growable(model, cfg.layers, cfg.activation)
    score_of, maximize = cfg.scorer(d.task)
    n_params = count_parameters(model)
    if max_params is not None and n_params > max_params:
        raise ValueError(
            f"the model already has {n_params} parameters, more than max_params={max_params}; "
            f"start from a smaller model or raise the budget"
        )
    opt = make_optimizer(model.parameters(), lr, weight_decay, optimizer)
    result = TrainResult(n_params=n_params, device=str(dev), seed=seed, name=name)
    best: _Checkpoint | None = None
    best_raw = math.nan
    pending = False  # the newest set has not yet beaten the checkpoint it grew from
    retries = 0
    last_growth = 0
    blocked = False
    n_grown = 0
    start = time.perf_counter()
    for epoch in range(1, n_epochs + 1):
        n_sets, n_params = n_dendrite_sets(model), count_parameters(model)
        run = train_model(
            model, d, n_epochs=1, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
            device=dev, seed=seed * 100_003 + epoch, optimizer=opt, grad_clip=grad_clip,
            step_hooks=step_hooks, eval_test=eval_test, name=name,
        )
        if run.status == "diverged":
            result.status = "diverged"
            result.error = (
                f"training loss became non-finite in epoch {epoch} (with {n_sets} dendrite sets)"
            )
            break
        metrics = dict(run.history[0], epoch=epoch, n_params=n_params, n_dendrite_sets=n_sets)
        raw = score_of(metrics)
        oriented = raw if maximize else -raw
        if best is None or oriented > best.score + cfg.improvement_threshold:
            best, best_raw = _snapshot(model, epoch, oriented), raw
            pending, retries = False, 0
        event: str | None = None
        if epoch < n_epochs and not (blocked and not pending):
            if cfg.mode == "history":
                due = epoch - max(best.epoch, last_growth) >= cfg.patience
            else:
                due = epoch >= cfg.fixed_start and (epoch - cfg.fixed_start) % cfg.fixed_every == 0
            if due and pending:
                if retries >= cfg.max_retries:
                    event = "stop"
                else:
                    retries += 1
                    event = "retry"
            elif due:
                after = best.n_params + sum(ds.set_cost(best.n_sets) for _, ds in _sites(model))
                if cfg.max_sets is not None and best.n_sets >= cfg.max_sets:
                    event, blocked = "max_sets", True
                elif max_params is not None and after > max_params:
                    event, blocked = "max_params", True
                else:
                    event, pending = "grew", True
            if event in ("grew", "retry"):
                _restore(model, best)
                n_grown += 1
                grow(model, seed=seed * 1_000_003 + n_grown)
                opt = make_optimizer(model.parameters(), lr, weight_decay, optimizer)
                last_growth = epoch
                _log.info("epoch %d: %s -> %d dendrite sets, %d parameters", epoch, event,
                          n_dendrite_sets(model), count_parameters(model))
        metrics.update(score=raw, best_score=best_raw, best_epoch=best.epoch, retries=retries,
                       growth=event)
        result.history.append(metrics)
        if on_epoch is not None and on_epoch(epoch, metrics):
            result.status = "stopped"
            break
        if event == "stop":
            break
    if best is not None:
        _restore(model, best)
    result.n_params = count_parameters(model)
    result.wall_time = time.perf_counter() - start
    return result
