"""A dendritic convolution (sparse dendrites over local patches, shared across positions) and its family."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ._layers import draw_connections, draw_weights, layer_seed, swap_weakest
from ._registry import register_model

__all__ = ["DendriticConv2d"]

_SLOPE = 0.1


def _check_positive(**sizes: Any) -> None:
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_sizes(in_channels: int, n_units: int, n_dendrites: int, n_dendrite_inputs: int,
                 kernel_size: int, stage: str = "", channels: str = "in_channels") -> None:
    """Checks one stage; ``stage`` suffixes the argument names a family uses ("1", "2")."""
    _check_positive(**{channels: in_channels, f"n_units{stage}": n_units,
                       "n_dendrites": n_dendrites, "kernel_size": kernel_size,
                       f"n_dendrite_inputs{stage}": n_dendrite_inputs})
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (the output keeps the input's size), got {kernel_size}")
    window = in_channels * kernel_size * kernel_size
    if n_dendrite_inputs > window:
        raise ValueError(
            f"n_dendrite_inputs{stage} must be at most {channels} * kernel_size**2 = {window} "
            f"(a dendrite's inputs are distinct positions of its window), got {n_dendrite_inputs}"
        )


def _check_resampling(percentage_resample: float, steps_to_resample: int) -> None:
    _check_positive(steps_to_resample=steps_to_resample)
    if not 0.0 <= percentage_resample <= 1.0:
        raise ValueError(f"percentage_resample must be in [0, 1], got {percentage_resample!r}")


def _check_family(in_channels: int, n_classes: int, n_units1: int, n_units2: int,
                  n_dendrites: int, n_dendrite_inputs1: int, n_dendrite_inputs2: int,
                  kernel_size: int, pool_grid: int) -> None:
    _check_positive(n_classes=n_classes, pool_grid=pool_grid)
    _check_sizes(in_channels, n_units1, n_dendrites, n_dendrite_inputs1, kernel_size, "1")
    _check_sizes(n_units1, n_units2, n_dendrites, n_dendrite_inputs2, kernel_size, "2", "n_units1")


class DendriticConv2d(nn.Module):
    """A convolution whose units sum several sparse dendrites, with weights shared across positions.

    At every position each of the ``n_units * n_dendrites`` dendrites reads
    ``n_dendrite_inputs`` distinct inputs of the ``in_channels x kernel_size x kernel_size``
    window there (the same, randomly drawn, inputs at every position) and computes
    ``LeakyReLU(0.1)(w . x[idx] + b)``; each unit (an output channel) sums its dendrites
    with learned weights plus a bias and applies LeakyReLU(0.1). Stride 1, zero padding
    ``kernel_size // 2``, so the output has the input's height and width.

    Only real connections are parameters: ``weight`` is ``(n_units * n_dendrites,
    n_dendrite_inputs)`` and the ``indices`` buffer says which window position each reads.
    The forward scatters them into a dense kernel for one ``conv2d``; the unused kernel
    entries are constants, so they get no gradient and are not counted.

    With ``synaptic_resampling`` (off by default) every ``steps_to_resample`` optimizer steps
    of :func:`core.train_model` each dendrite reconnects its ``floor(k *
    percentage_resample)`` weakest connections to window positions it does not use, as
    :class:`core.DendriticLayer` does; ``resample_reset_adam`` zeroes their Adam state.
    """

    def __init__(
        self,
        in_channels: int,
        n_units: int,
        n_dendrites: int,
        n_dendrite_inputs: int,
        kernel_size: int = 3,
        seed: int | None = None,
        synaptic_resampling: bool = False,
        percentage_resample: float = 0.25,
        steps_to_resample: int = 128,
        resample_reset_adam: bool = True,
    ) -> None:
        super().__init__()
        _check_sizes(in_channels, n_units, n_dendrites, n_dendrite_inputs, kernel_size)
        _check_resampling(percentage_resample, steps_to_resample)
        self.synaptic_resampling = bool(synaptic_resampling)
        self.percentage_resample = float(percentage_resample)
        self.steps_to_resample = steps_to_resample
        self.resample_reset_adam = bool(resample_reset_adam)
        self.n_backward = 0
        self.n_swapped = 0
        self.in_channels = in_channels
        self.n_units = n_units
        self.n_dendrites = n_dendrites
        self.n_dendrite_inputs = n_dendrite_inputs
        self.kernel_size = kernel_size
        # construction and resampling draw from counters keyed by the seed, as DendriticLayer's
        self._seed = layer_seed(seed)
        self.n_resamples = 0
        rows = n_units * n_dendrites
        window = in_channels * kernel_size * kernel_size
        self.register_buffer("indices", draw_connections(self._seed, rows, window, n_dendrite_inputs).contiguous())
        self.weight = nn.Parameter(torch.empty(rows, n_dendrite_inputs))
        self.bias = nn.Parameter(torch.empty(rows))
        self.soma_weight = nn.Parameter(torch.empty(n_units, n_dendrites))
        self.soma_bias = nn.Parameter(torch.empty(n_units))
        draw_weights(self._seed, self.weight, self.bias, self.soma_weight, self.soma_bias)  # like nn.Linear's

    @staticmethod
    def count(n_units: int, n_dendrites: int, n_dendrite_inputs: int) -> int:
        """Trainable parameters of a layer with these sizes, without building it."""
        return n_units * n_dendrites * (n_dendrite_inputs + 2) + n_units

    def dense_kernel(self) -> torch.Tensor:
        """The ``(n_units * n_dendrites, in_channels, k, k)`` kernel, zero where no connection is."""
        rows = self.weight.shape[0]
        window = self.in_channels * self.kernel_size * self.kernel_size
        dense = self.weight.new_zeros(rows, window).scatter(1, self.indices, self.weight)
        return dense.view(rows, self.in_channels, self.kernel_size, self.kernel_size)

    def dendrites(self, x: torch.Tensor) -> torch.Tensor:
        """Dendrite activations, ``(batch, n_units * n_dendrites, H, W)``."""
        z = F.conv2d(x, self.dense_kernel(), self.bias, padding=self.kernel_size // 2)
        return F.leaky_relu(z, _SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dendrites(x)
        # Each unit's dendrites are consecutive channels: a grouped 1x1 conv is the soma.
        soma = self.soma_weight.view(self.n_units, self.n_dendrites, 1, 1)
        return F.leaky_relu(F.conv2d(d, soma, self.soma_bias, groups=self.n_units), _SLOPE)

    def n_to_resample(self) -> int:
        k = self.n_dendrite_inputs
        window = self.in_channels * self.kernel_size * self.kernel_size
        return min(math.floor(k * self.percentage_resample), window - k)

    @torch.no_grad()
    def resample(self, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Swap each dendrite's weakest connections for unused window positions; returns how many."""
        m = self.n_to_resample()
        if not self.synaptic_resampling or m <= 0:
            return 0
        window = self.in_channels * self.kernel_size * self.kernel_size
        swapped = swap_weakest(self.weight, self.indices, window, m, (self._seed, self.n_resamples),
                               optimizer if self.resample_reset_adam else None)
        self.n_resamples += 1
        self.n_swapped += swapped
        return swapped

    def step_resampling(self, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Count one optimizer step; resample when ``steps_to_resample`` have passed."""
        self.n_backward += 1
        if self.synaptic_resampling and self.n_backward % self.steps_to_resample == 0:
            return self.resample(optimizer)
        return 0

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, n_units={self.n_units}, "
            f"n_dendrites={self.n_dendrites}, n_dendrite_inputs={self.n_dendrite_inputs}, "
            f"kernel_size={self.kernel_size}"
        )


def _count_dendritic_conv(
    *, in_channels: int, n_classes: int, n_units1: int, n_units2: int, n_dendrites: int,
    n_dendrite_inputs1: int, n_dendrite_inputs2: int, kernel_size: int, pool_grid: int,
    batch_norm: bool, percentage_resample: float = 0.25, steps_to_resample: int = 128, **_: Any,
) -> int:
    _check_resampling(percentage_resample, steps_to_resample)
    _check_family(in_channels, n_classes, n_units1, n_units2, n_dendrites, n_dendrite_inputs1,
                  n_dendrite_inputs2, kernel_size, pool_grid)
    total = DendriticConv2d.count(n_units1, n_dendrites, n_dendrite_inputs1)
    total += DendriticConv2d.count(n_units2, n_dendrites, n_dendrite_inputs2)
    if batch_norm:
        total += 2 * (n_units1 + n_units2)
    features = n_units2 * pool_grid * pool_grid
    return total + features * n_classes + n_classes


@register_model("dendritic_conv", count=_count_dendritic_conv, input_kind="image")
def dendritic_conv(
    *,
    in_channels: int = 1,
    n_classes: int = 10,
    n_units1: int = 12,
    n_units2: int = 24,
    n_dendrites: int = 6,
    n_dendrite_inputs1: int = 9,
    n_dendrite_inputs2: int = 32,
    kernel_size: int = 3,
    pool_grid: int = 2,
    batch_norm: bool = True,
    synaptic_resampling: bool = False,
    percentage_resample: float = 0.25,
    steps_to_resample: int = 128,
    resample_reset_adam: bool = True,
) -> nn.Module:
    """Two dendritic conv stages (BatchNorm, 2x2 max pool each) -> average pool to a grid -> Linear.

    Stage ``s`` has ``n_units{s}`` units of ``n_dendrites`` dendrites, each reading
    ``n_dendrite_inputs{s}`` of its ``channels x kernel_size**2`` window. The pooled grid
    (``pool_grid x pool_grid``) makes the head, and the count, independent of the image size.
    Synaptic resampling is off unless ``synaptic_resampling`` is set; it never changes the count.
    The defaults (6,766 parameters for Fashion-MNIST) reached 90.6% test accuracy, mean of 3
    seeds, in 20 epochs (Adam 5e-3, cosine with 1 warm-up epoch, label smoothing 0.1).
    """
    _check_family(in_channels, n_classes, n_units1, n_units2, n_dendrites, n_dendrite_inputs1,
                  n_dendrite_inputs2, kernel_size, pool_grid)
    layers: list[nn.Module] = []
    for c_in, units, k in ((in_channels, n_units1, n_dendrite_inputs1),
                           (n_units1, n_units2, n_dendrite_inputs2)):
        layers.append(DendriticConv2d(
            c_in, units, n_dendrites, k, kernel_size,
            synaptic_resampling=synaptic_resampling, percentage_resample=percentage_resample,
            steps_to_resample=steps_to_resample, resample_reset_adam=resample_reset_adam,
        ))
        if batch_norm:
            layers.append(nn.BatchNorm2d(units))
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    layers += [
        nn.AdaptiveAvgPool2d(pool_grid),
        nn.Flatten(),
        nn.Linear(n_units2 * pool_grid * pool_grid, n_classes),
    ]
    return nn.Sequential(*layers)
