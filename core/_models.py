"""The seed projects' model families, registered with their analytic parameter counts.

Every dendritic family takes the layer's ``connectivity`` (``"random"`` or ``"local"``, with
``input_shape`` when the input is not a square 1- or 3-channel image) and
``resample_reset_adam``; neither changes the parameter count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ._layers import (
    CONNECTIVITIES,
    DendriticLayer,
    draw_connections,
    draw_weights,
    resolve_image_shape,
)
from ._registry import register_model

__all__: list[str] = []

_SLOPE = 0.1


def _linear(i: int, o: int) -> int:
    return i * o + o


def _dendritic(
    in_dim: int,
    n_neurons: int,
    n_dendrites: int,
    n_dendrite_inputs: int,
    soma_enabled: bool,
    synaptic_resampling: bool,
    percentage_resample: float,
    steps_to_resample: int,
    connectivity: str,
    input_shape: Sequence[int] | None,
    resample_reset_adam: bool,
) -> DendriticLayer:
    return DendriticLayer(
        in_dim,
        n_neurons,
        n_dendrite_inputs,
        n_dendrites,
        synaptic_resampling=synaptic_resampling,
        percentage_resample=percentage_resample,
        steps_to_resample=steps_to_resample,
        soma_enabled=soma_enabled,
        connectivity=connectivity,
        input_shape=input_shape,
        resample_reset_adam=resample_reset_adam,
    )


def _check_positive(**sizes: Any) -> None:
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_dendritic(
    in_dim: int, n_neurons: int, n_dendrites: int, n_dendrite_inputs: int,
    connectivity: str = "random", input_shape: Sequence[int] | None = None,
) -> None:
    _check_positive(in_dim=in_dim, n_neurons=n_neurons, n_dendrites=n_dendrites,
                    n_dendrite_inputs=n_dendrite_inputs)
    if n_dendrite_inputs > in_dim:
        raise ValueError(
            f"n_dendrite_inputs must be at most in_dim={in_dim} (a dendrite's inputs are "
            f"distinct), got {n_dendrite_inputs}"
        )
    # Checked in the count too, so a budget gate refuses a bad point before anything is built.
    if connectivity not in CONNECTIVITIES:
        raise ValueError(
            f"connectivity must be one of {', '.join(map(repr, CONNECTIVITIES))}, got {connectivity!r}"
        )
    if connectivity == "local":
        resolve_image_shape(input_shape, in_dim)


def _count_dendritic_simple(
    *, in_dim: int, n_classes: int, n_neurons: int, n_dendrites: int, n_dendrite_inputs: int,
    soma_enabled: bool, connectivity: str = "random", input_shape: Sequence[int] | None = None,
    **_: Any,
) -> int:
    _check_dendritic(in_dim, n_neurons, n_dendrites, n_dendrite_inputs, connectivity, input_shape)
    layer = DendriticLayer.count(n_neurons, n_dendrite_inputs, n_dendrites, soma_enabled)
    width = n_neurons if soma_enabled else n_neurons * n_dendrites
    return layer + _linear(width, n_classes)


@register_model("dendritic_simple", count=_count_dendritic_simple, population="mlp")
def dendritic_simple(
    *,
    in_dim: int = 784,
    n_classes: int = 10,
    n_neurons: int = 12,
    n_dendrites: int = 6,
    n_dendrite_inputs: int = 96,
    soma_enabled: bool = True,
    synaptic_resampling: bool = True,
    percentage_resample: float = 0.25,
    steps_to_resample: int = 128,
    connectivity: str = "random",
    input_shape: Sequence[int] | None = None,
    resample_reset_adam: bool = True,
) -> nn.Module:
    """DendriticLayer (with soma) -> Linear to the classes."""
    _check_positive(in_dim=in_dim, n_classes=n_classes)
    layer = _dendritic(in_dim, n_neurons, n_dendrites, n_dendrite_inputs, soma_enabled,
                       synaptic_resampling, percentage_resample, steps_to_resample,
                       connectivity, input_shape, resample_reset_adam)
    return nn.Sequential(layer, nn.Linear(layer.out_dim, n_classes))


def dendritic_simple_tensors(
    *, in_dim: int, n_classes: int, n_neurons: int, n_dendrites: int, n_dendrite_inputs: int,
    soma_enabled: bool, connectivity: str, **_: Any,
) -> tuple[dict[str, torch.Tensor], int, Callable[[], None]] | None:
    """What :func:`dendritic_simple` with these (checked, complete) arguments draws, without
    building the module; the caller seeds the default generator, as for the builder.

    Returns its ``state_dict`` entries by key, the dendritic layer's seed and a closure
    that draws the layer's connections and weights into those entries from the layer's seed,
    as the layer's construction does (until it runs they are uninitialised).
    The population trainer builds members this way: a module costs ~0.4 ms of Python a
    member, these draws a fraction of it. ``None`` for ``connectivity="local"``, whose
    patches the layer's constructor draws. ``tests/core/test_population.py`` holds both
    ways to the same numbers.
    """
    if connectivity != "random":
        return None
    rows, width = n_neurons * n_dendrites, n_neurons if soma_enabled else n_neurons * n_dendrites
    # DendriticLayer's seed, then nn.Linear's initialisation: the builder's only draws from
    # the default generator, in its order
    layer_seed = int(torch.randint(0, 2**62, (1,)).item())
    readout = SimpleNamespace(weight=torch.empty(n_classes, width), bias=torch.empty(n_classes))
    nn.Linear.reset_parameters(readout)  # type: ignore[arg-type]
    out = {"0.weight": torch.empty(rows, n_dendrite_inputs), "0.bias": torch.empty(rows)}
    if soma_enabled:
        out["0.soma_weight"], out["0.soma_bias"] = torch.empty(n_neurons, n_dendrites), torch.empty(n_neurons)
    out["0.indices"] = torch.empty(rows, n_dendrite_inputs, dtype=torch.long)
    out["1.weight"], out["1.bias"] = readout.weight, readout.bias

    def draw() -> None:
        out["0.indices"].copy_(draw_connections(layer_seed, rows, in_dim, n_dendrite_inputs))
        draw_weights(layer_seed, out["0.weight"], out["0.bias"], out.get("0.soma_weight"), out.get("0.soma_bias"))

    return out, layer_seed, draw


def _count_soma_disabled(
    *, in_dim: int, n_classes: int, n_neurons: int, n_dendrites: int, n_dendrite_inputs: int,
    hidden_dim: int, connectivity: str = "random", input_shape: Sequence[int] | None = None,
    **_: Any,
) -> int:
    _check_dendritic(in_dim, n_neurons, n_dendrites, n_dendrite_inputs, connectivity, input_shape)
    _check_positive(hidden_dim=hidden_dim)
    layer = DendriticLayer.count(n_neurons, n_dendrite_inputs, n_dendrites, False)
    return layer + _linear(n_neurons * n_dendrites, hidden_dim) + _linear(hidden_dim, n_classes)


@register_model("soma_disabled", count=_count_soma_disabled, population="mlp")
def soma_disabled(
    *,
    in_dim: int = 784,
    n_classes: int = 10,
    n_neurons: int = 1,
    n_dendrites: int = 25,
    n_dendrite_inputs: int = 64,
    hidden_dim: int = 32,
    synaptic_resampling: bool = True,
    percentage_resample: float = 0.25,
    steps_to_resample: int = 128,
    connectivity: str = "random",
    input_shape: Sequence[int] | None = None,
    resample_reset_adam: bool = True,
) -> nn.Module:
    """DendriticLayer without soma -> Linear -> LeakyReLU -> Linear."""
    _check_positive(in_dim=in_dim, n_classes=n_classes, hidden_dim=hidden_dim)
    layer = _dendritic(in_dim, n_neurons, n_dendrites, n_dendrite_inputs, False,
                       synaptic_resampling, percentage_resample, steps_to_resample,
                       connectivity, input_shape, resample_reset_adam)
    return nn.Sequential(
        layer,
        nn.Linear(layer.out_dim, hidden_dim),
        nn.LeakyReLU(_SLOPE),
        nn.Linear(hidden_dim, n_classes),
    )


def _count_with_hidden(
    *, in_dim: int, n_classes: int, n_neurons: int, n_dendrites: int, n_dendrite_inputs: int,
    hidden_dim: int, soma_enabled: bool, connectivity: str = "random",
    input_shape: Sequence[int] | None = None, **_: Any,
) -> int:
    _check_dendritic(in_dim, n_neurons, n_dendrites, n_dendrite_inputs, connectivity, input_shape)
    _check_positive(hidden_dim=hidden_dim)
    layer = DendriticLayer.count(n_neurons, n_dendrite_inputs, n_dendrites, soma_enabled)
    width = n_neurons if soma_enabled else n_neurons * n_dendrites
    return layer + _linear(width, hidden_dim) + _linear(hidden_dim, n_classes)


@register_model("dendritic_with_hidden", count=_count_with_hidden, population="mlp")
def dendritic_with_hidden(
    *,
    in_dim: int = 784,
    n_classes: int = 10,
    n_neurons: int = 10,
    n_dendrites: int = 6,
    n_dendrite_inputs: int = 64,
    hidden_dim: int = 8,
    soma_enabled: bool = True,
    synaptic_resampling: bool = True,
    percentage_resample: float = 0.25,
    steps_to_resample: int = 128,
    connectivity: str = "random",
    input_shape: Sequence[int] | None = None,
    resample_reset_adam: bool = True,
) -> nn.Module:
    """DendriticLayer -> LeakyReLU -> Linear -> LeakyReLU -> Linear."""
    _check_positive(in_dim=in_dim, n_classes=n_classes, hidden_dim=hidden_dim)
    layer = _dendritic(in_dim, n_neurons, n_dendrites, n_dendrite_inputs, soma_enabled,
                       synaptic_resampling, percentage_resample, steps_to_resample,
                       connectivity, input_shape, resample_reset_adam)
    return nn.Sequential(
        layer,
        nn.LeakyReLU(_SLOPE),
        nn.Linear(layer.out_dim, hidden_dim),
        nn.LeakyReLU(_SLOPE),
        nn.Linear(hidden_dim, n_classes),
    )


def _count_vanilla(
    *, in_dim: int, n_classes: int, hidden_dim: int, n_hidden_layers: int, **_: Any
) -> int:
    _check_positive(in_dim=in_dim, n_classes=n_classes, hidden_dim=hidden_dim,
                    n_hidden_layers=n_hidden_layers)
    widths = [in_dim] + [hidden_dim] * n_hidden_layers + [n_classes]
    return sum(_linear(a, b) for a, b in zip(widths, widths[1:], strict=False))


@register_model("vanilla_mlp", count=_count_vanilla, population="mlp")
def vanilla_mlp(
    *, in_dim: int = 784, n_classes: int = 10, hidden_dim: int = 10, n_hidden_layers: int = 1
) -> nn.Module:
    """The point-neuron baseline: Linear -> LeakyReLU, repeated, -> Linear."""
    _check_positive(in_dim=in_dim, n_classes=n_classes, hidden_dim=hidden_dim,
                    n_hidden_layers=n_hidden_layers)
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(width, hidden_dim), nn.LeakyReLU(_SLOPE)]
        width = hidden_dim
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)
