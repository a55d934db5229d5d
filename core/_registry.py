"""Registries of model families (timm style): a plain dict filled by a decorator."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .exceptions import DuplicateNameError, UnknownNameError

__all__ = [
    "ModelFamily",
    "register_model",
    "create_model",
    "list_models",
    "get_family",
    "analytic_parameter_count",
    "count_parameters",
    "data_params",
]


@dataclass(frozen=True)
class ModelFamily:
    """A registered family: how to build it, how to count it, what it accepts.

    ``build(**params)`` returns the module; ``count(**params)`` returns its exact number of
    trainable parameters without building it. ``defaults`` are the builder's keyword
    defaults, so ``accepts`` is the full set of parameters a search may set.
    ``input_kind`` is ``"flat"`` (a vector), ``"image"`` (C, H, W) or ``"sequence"``;
    ``task`` is ``"classification"`` or ``"regression"``.
    """

    name: str
    build: Callable[..., nn.Module]
    count: Callable[..., int]
    defaults: dict[str, Any] = field(default_factory=dict)
    input_kind: str = "flat"
    task: str = "classification"
    description: str = ""

    @property
    def accepts(self) -> frozenset[str]:
        return frozenset(self.defaults)

    def resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - self.accepts)
        if unknown:
            raise ValueError(
                f"model family {self.name!r} does not take {', '.join(map(repr, unknown))}; "
                f"it takes: {', '.join(sorted(self.accepts))}"
            )
        return {**self.defaults, **params}


_MODELS: dict[str, ModelFamily] = {}


def register_model(
    name: str,
    *,
    count: Callable[..., int],
    input_kind: str = "flat",
    task: str = "classification",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a family builder under ``name``; ``count`` gives its analytic parameter count."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise DuplicateNameError(f"model family {name!r} is already registered")
        defaults = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY or p.default is not inspect.Parameter.empty
        }
        doc = (fn.__doc__ or "").strip().splitlines()
        _MODELS[name] = ModelFamily(
            name=name,
            build=fn,
            count=count,
            defaults=defaults,
            input_kind=input_kind,
            task=task,
            description=doc[0] if doc else "",
        )
        return fn

    return deco


def list_models() -> list[str]:
    """Names of all registered model families, sorted."""
    return sorted(_MODELS)


def get_family(name: str) -> ModelFamily:
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown model family {name!r}; known families: {', '.join(list_models())}"
        ) from None


def create_model(name: str, seed: int | None = None, **params: Any) -> nn.Module:
    """Build a registered family; unknown names and parameters are errors that list the allowed.

    With ``seed`` the initial weights (and a dendritic layer's connections) are drawn from
    ``torch.manual_seed(seed)`` without touching the caller's random state: the convention
    every trainer here uses, so a trial re-built with its seed is the same model.
    """
    family = get_family(name)
    resolved = family.resolve(params)
    if seed is None:
        return family.build(**resolved)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return family.build(**resolved)


def analytic_parameter_count(name: str, **params: Any) -> int:
    """Exact trainable-parameter count of ``create_model(name, **params)``, without building it."""
    family = get_family(name)
    return int(family.count(**family.resolve(params)))


def data_params(name: str, input_shape: tuple[int, ...], n_classes: int | None,
                out_dim: int | None = None) -> dict[str, Any]:
    """The arguments a family takes from its dataset (never searched): input and output sizes.

    ``flat`` families get ``in_dim`` (the flattened input) and ``n_classes``; ``image``
    families get ``in_channels`` and ``n_classes``; ``sequence`` families get ``in_dim``
    (features per step) and ``out_dim``.
    """
    family = get_family(name)
    if family.input_kind == "image":
        io: dict[str, Any] = {"in_channels": int(input_shape[0]), "n_classes": n_classes}
    elif family.input_kind == "sequence":
        io = {"in_dim": int(input_shape[-1]), "out_dim": out_dim}
    else:
        io = {"in_dim": int(math.prod(input_shape)), "n_classes": n_classes}
    return {k: v for k, v in io.items() if k in family.accepts}


def count_parameters(model: nn.Module) -> int:
    """Trainable connections of ``model``: parameters with ``requires_grad``, each counted once.

    Buffers (such as a dendritic layer's input indices) and frozen tensors are not counted.
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
