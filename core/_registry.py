"""Registries of model families (timm style): a plain dict filled by a decorator."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .exceptions import DuplicateNameError, UnknownNameError

__all__ = [
    "ModelFamily",
    "register_model",
    "create_model",
    "seeded",
    "list_models",
    "get_family",
    "analytic_parameter_count",
    "count_parameters",
    "data_params",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFamily:
    """A registered family: how to build it, how to count it, what it accepts.

    ``build(**params)`` returns the module; ``count(**params)`` returns its exact number of
    trainable parameters without building it, or is ``None`` when the family registered no
    count: :func:`analytic_parameter_count` then builds it on the meta device (no memory; the
    caller's random state is left alone) and counts that, once per set of arguments.
    ``defaults`` are the builder's keyword defaults, so ``accepts`` is the full set of
    parameters a search may set.
    ``input_kind`` is ``"flat"`` (a vector), ``"image"`` (C, H, W) or ``"sequence"``;
    ``task`` is ``"classification"`` or ``"regression"``. ``population`` names the
    population trainer that can stack the family's members: ``"mlp"``
    (:func:`core.train_population`), ``"recurrent"`` (:func:`core.train_recurrent_population`),
    or ``None`` when its trials train one at a time.
    """

    name: str
    build: Callable[..., nn.Module]
    count: Callable[..., int] | None
    defaults: dict[str, Any] = field(default_factory=dict)
    input_kind: str = "flat"
    task: str = "classification"
    description: str = ""
    population: str | None = None

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
#: the population trainers a family may declare (``register_model(..., population=...)``)
POPULATION_KINDS: tuple[str, ...] = ("mlp", "recurrent")


def register_model(
    name: str,
    *,
    count: Callable[..., int] | None = None,
    input_kind: str = "flat",
    task: str = "classification",
    population: str | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a family builder under ``name``.

    ``count(**params)`` gives its exact parameter count without building it. Leave it out
    and the count comes from building the family on the meta device (see
    :func:`analytic_parameter_count`): exact, costs no memory, and is cached per arguments;
    an analytic count is still faster when a search enumerates many points.
    The builder's keyword arguments (with defaults) are what a search may set; ``in_dim``
    and ``n_classes`` (``in_channels`` for ``input_kind="image"``) come from the dataset.
    ``population`` (``"mlp"`` or ``"recurrent"``) declares which population trainer can
    stack the family's members; leave it out for families trained one at a time.
    """
    if input_kind not in ("flat", "image", "sequence"):
        raise ValueError(f"input_kind must be 'flat', 'image' or 'sequence', got {input_kind!r}")
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    if population is not None and population not in POPULATION_KINDS:
        raise ValueError(
            f"population must be one of {', '.join(map(repr, POPULATION_KINDS))} or None, "
            f"got {population!r}"
        )
    if count is not None and not callable(count):
        raise TypeError(f"count must be a function of the family's arguments or None, got {count!r}")

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
            population=population,
        )
        return fn

    return deco


def list_models(population: str | None = None) -> list[str]:
    """Names of the registered model families, sorted.

    With ``population`` (``"mlp"`` or ``"recurrent"``), only the families that population
    trainer can stack.
    """
    if population is None:
        return sorted(_MODELS)
    if population not in POPULATION_KINDS:
        raise ValueError(
            f"population must be one of {', '.join(map(repr, POPULATION_KINDS))}, got {population!r}"
        )
    return sorted(name for name, fam in _MODELS.items() if fam.population == population)


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
    with seeded(seed):
        return family.build(**resolved)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Inside, torch's CPU generator (and ``device``'s, a CUDA device) start from ``seed``;
    after, they are as the caller left them. No other generator is touched.

    The convention of every trainer here: building a model, converting it to bio rules and
    training it (dropout, the rules' draws) take their randomness from the trial's seed, so a
    trial repeats exactly whatever the process did before it.
    """
    cuda = device is not None and device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            assert device is not None
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def analytic_parameter_count(name: str, **params: Any) -> int:
    """Exact trainable-parameter count of ``create_model(name, **params)``.

    From the family's registered ``count`` when it has one (nothing is built); otherwise the
    family is built on the meta device, where tensors have shapes but no storage, and its
    parameters are counted like :func:`count_parameters` (cached per family and arguments).
    A builder that rejects its arguments raises its ``ValueError`` here too.
    """
    family = get_family(name)
    resolved = family.resolve(params)
    if family.count is not None:
        return int(family.count(**resolved))
    return _meta_count(family, resolved)


# -- counts of families without an analytic count: build on the meta device --------------------
_META_CACHE: OrderedDict[tuple[str, str], int] = OrderedDict()
_META_CACHE_SIZE = 4096
_META_LOCK = threading.Lock()


def _device_constructors() -> frozenset[Callable[..., Any]]:
    try:  # the set torch's own ``with torch.device(...)`` redirects
        from torch.utils._device import _device_constructors as ctors

        return frozenset(ctors())
    except Exception:  # noqa: BLE001 - a private torch helper; fall back to the common ones
        return frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand,
                          torch.randn, torch.randint, torch.randperm, torch.arange, torch.tensor,
                          torch.as_tensor, torch.eye, torch.linspace})


class _MetaBuild(TorchFunctionMode):
    """Tensors made without an explicit device go to the meta device while a family builds.

    Tensors of at most one element are made on the CPU instead: a builder may read them
    (``int(torch.randint(...).item())`` to draw a seed, as DendriticLayer does), and they
    cost nothing. Random draws then still move the CPU generator, so the caller forks it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ctors = _device_constructors()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in self.ctors and kwargs.get("device") is None:
            out = func(*args, **{**kwargs, "device": "meta"})
            if isinstance(out, torch.Tensor) and out.numel() <= 1:
                out = func(*args, **{**kwargs, "device": "cpu"})
            return out
        return func(*args, **kwargs)


def _cache_key(family: ModelFamily, resolved: dict[str, Any]) -> tuple[str, str]:
    return family.name, json.dumps(resolved, sort_keys=True, default=repr)


def _meta_count(family: ModelFamily, resolved: dict[str, Any]) -> int:
    key = _cache_key(family, resolved)
    with _META_LOCK:
        if key in _META_CACHE:
            _META_CACHE.move_to_end(key)
            return _META_CACHE[key]
    with torch.random.fork_rng(devices=[]):
        try:
            with _MetaBuild():
                model = family.build(**resolved)
        except Exception as meta_exc:  # noqa: BLE001 - some builders need real tensors
            # The CPU build raises the builder's own error (e.g. a ValueError for bad sizes);
            # only a builder that works on the CPU but not on meta gets here and succeeds.
            log.debug("family %r did not build on the meta device (%s); counting a CPU build",
                      family.name, meta_exc)
            with torch.no_grad():
                model = family.build(**resolved)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model family {family.name!r} built {type(model).__name__}, not an nn.Module")
    n = count_parameters(model)
    with _META_LOCK:
        _META_CACHE[key] = n
        while len(_META_CACHE) > _META_CACHE_SIZE:
            _META_CACHE.popitem(last=False)
    return n


def data_params(name: str, input_shape: tuple[int, ...], n_classes: int | None,
                out_dim: int | None = None) -> dict[str, Any]:
    """The arguments a family takes from its dataset (never searched): input and output sizes.

    ``flat`` families get ``in_dim`` (the flattened input) and ``n_classes``; ``image``
    families get ``in_channels`` and ``n_classes``; ``sequence`` families get ``in_dim``
    (features per step) and ``out_dim``. On a regression dataset ``n_classes`` is the number
    of outputs (``out_dim``), so a classifier family becomes a regressor of that width.
    """
    family = get_family(name)
    if n_classes is None and out_dim is not None:
        n_classes = out_dim
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
