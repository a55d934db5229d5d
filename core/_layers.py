"""The dendritic layer: sparse dendrites with synaptic resampling, computed on real connections only."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["DendriticLayer", "register_dendritic_hooks", "resample_layers"]

_SLOPE = 0.1


class DendriticLayer(nn.Module):
    """A layer of neurons whose inputs arrive on dendrites that each see a few inputs.

    Every one of the ``n_neurons * n_dendrites`` dendrites is connected to exactly
    ``n_dendrite_inputs`` distinct inputs, drawn at random (seeded by ``seed``). A dendrite
    computes ``LeakyReLU(0.1)(w . x[idx] + b)``. With the soma enabled each neuron sums its
    own dendrites with learned weights plus a bias and applies LeakyReLU(0.1), so the layer
    outputs ``n_neurons`` values; without it the layer outputs the ``n_neurons *
    n_dendrites`` dendrite activations.

    Only the real connections are stored: ``weight`` has shape ``(n_neurons * n_dendrites,
    n_dendrite_inputs)`` and the ``indices`` buffer says which input each weight reads. So
    ``sum(p.numel() for p in layer.parameters())`` is exactly the number of connections.

    ``impl`` chooses how the connections are computed: ``"gather"`` gathers the inputs of
    each dendrite and reduces them; ``"scatter"`` scatters the compact weights into a dense
    matrix for one matmul (the gradient still reaches only the stored weights). ``"auto"``
    uses the measured faster one for the device (see ``bench/bench_layer.py``).
    """

    def __init__(
        self,
        in_dim: int,
        n_neurons: int,
        n_dendrite_inputs: int,
        n_dendrites: int,
        synaptic_resampling: bool = True,
        percentage_resample: float = 0.25,
        steps_to_resample: int = 128,
        soma_enabled: bool = True,
        seed: int | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("n_neurons", n_neurons),
            ("n_dendrite_inputs", n_dendrite_inputs),
            ("n_dendrites", n_dendrites),
            ("steps_to_resample", steps_to_resample),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if n_dendrite_inputs > in_dim:
            raise ValueError(
                f"n_dendrite_inputs must be at most in_dim={in_dim} (a dendrite's inputs are "
                f"distinct), got {n_dendrite_inputs}"
            )
        if not 0.0 <= percentage_resample <= 1.0:
            raise ValueError(f"percentage_resample must be in [0, 1], got {percentage_resample!r}")
        if impl not in ("auto", "gather", "scatter"):
            raise ValueError(f"impl must be one of 'auto', 'gather', 'scatter', got {impl!r}")
        self.in_dim = in_dim
        self.n_neurons = n_neurons
        self.n_dendrite_inputs = n_dendrite_inputs
        self.n_dendrites = n_dendrites
        self.synaptic_resampling = bool(synaptic_resampling)
        self.percentage_resample = float(percentage_resample)
        self.steps_to_resample = steps_to_resample
        self.soma_enabled = bool(soma_enabled)
        self.impl = impl
        self.n_backward = 0
        self.n_swapped = 0
        self._pending_resample = False
        self._hooked = False  # resampling driven by register_dendritic_hooks
        self._generator = torch.Generator()
        self._generator.manual_seed(
            int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        )

        n_dend = n_neurons * n_dendrites
        # Distinct inputs per dendrite: the first k of a random permutation of the inputs.
        scores = torch.rand(n_dend, in_dim, generator=self._generator)
        indices = scores.topk(n_dendrite_inputs, dim=1, largest=False).indices.contiguous()
        self.register_buffer("indices", indices)
        self.weight = nn.Parameter(torch.empty(n_dend, n_dendrite_inputs))
        self.bias = nn.Parameter(torch.empty(n_dend))
        if self.soma_enabled:
            self.soma_weight = nn.Parameter(torch.empty(n_neurons, n_dendrites))
            self.soma_bias = nn.Parameter(torch.empty(n_neurons))
        else:
            self.register_parameter("soma_weight", None)
            self.register_parameter("soma_bias", None)
        self.reset_parameters()

    # -- initialisation -------------------------------------------------------------------
    def _dendrite_bound(self) -> float:
        return 1.0 / math.sqrt(self.n_dendrite_inputs)

    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear`` over each unit's real fan-in, from the layer's generator."""
        b = self._dendrite_bound()
        g = self._generator
        with torch.no_grad():
            self.weight.copy_(torch.empty_like(self.weight, device="cpu").uniform_(-b, b, generator=g))
            self.bias.copy_(torch.empty_like(self.bias, device="cpu").uniform_(-b, b, generator=g))
            if self.soma_enabled:
                bs = 1.0 / math.sqrt(self.n_dendrites)
                self.soma_weight.copy_(
                    torch.empty_like(self.soma_weight, device="cpu").uniform_(-bs, bs, generator=g)
                )
                self.soma_bias.copy_(
                    torch.empty_like(self.soma_bias, device="cpu").uniform_(-bs, bs, generator=g)
                )

    @property
    def out_dim(self) -> int:
        return self.n_neurons if self.soma_enabled else self.n_neurons * self.n_dendrites

    @staticmethod
    def count(
        n_neurons: int, n_dendrite_inputs: int, n_dendrites: int, soma_enabled: bool = True
    ) -> int:
        """Trainable parameters of a layer with these sizes, without building it."""
        n = n_neurons * n_dendrites * (n_dendrite_inputs + 1)
        if soma_enabled:
            n += n_neurons * n_dendrites + n_neurons
        return n

    # -- forward --------------------------------------------------------------------------
    def _use_gather(self, x: torch.Tensor) -> bool:
        if self.impl != "auto":
            return self.impl == "gather"
        # Measured in bench/bench_layer.py: the scatter-to-dense matmul wins on both CPU and
        # CUDA at the sizes we search, because the gather's backward is a scatter-add over
        # batch * dendrites * k elements while the dense backward is one GEMM.
        return False

    def dendrites(self, x: torch.Tensor) -> torch.Tensor:
        """Dendrite activations, shape ``(batch, n_neurons * n_dendrites)``."""
        if self._use_gather(x):
            z = torch.einsum("bdk,dk->bd", x[:, self.indices], self.weight)
        else:
            dense = self.weight.new_zeros(self.weight.shape[0], self.in_dim)
            dense = dense.scatter(1, self.indices, self.weight)
            z = x @ dense.t()
        return F.leaky_relu(z + self.bias, _SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            x = x.flatten(1)
        d = self.dendrites(x)
        if not self.soma_enabled:
            return d
        d = d.view(-1, self.n_neurons, self.n_dendrites)
        return F.leaky_relu((d * self.soma_weight).sum(-1) + self.soma_bias, _SLOPE)

    # -- synaptic resampling --------------------------------------------------------------
    def n_to_resample(self) -> int:
        k = self.n_dendrite_inputs
        return min(math.floor(k * self.percentage_resample), self.in_dim - k)

    @torch.no_grad()
    def resample(self, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Swap the weakest connections of every dendrite for new random inputs.

        In each dendrite the ``floor(k * percentage_resample)`` weights of smallest
        magnitude are dropped and as many inputs that the dendrite does not use are
        connected, with fresh weights; the optimizer state of the swapped slots is reset.
        Returns the number of swapped connections.
        """
        m = self.n_to_resample()
        if not self.synaptic_resampling or m <= 0:
            return 0
        dev = self.weight.device
        weakest = self.weight.abs().topk(m, dim=1, largest=False).indices  # (D, m)
        scores = torch.rand(self.indices.shape[0], self.in_dim, generator=self._generator)
        scores = scores.to(dev)
        scores.scatter_(1, self.indices, -1.0)  # inputs in use are never drawn
        new_inputs = scores.topk(m, dim=1).indices
        self.indices.scatter_(1, weakest, new_inputs)
        b = self._dendrite_bound()
        fresh = torch.empty(weakest.shape, device="cpu").uniform_(-b, b, generator=self._generator)
        self.weight.scatter_(1, weakest, fresh.to(dev, self.weight.dtype))
        if optimizer is not None:
            state = optimizer.state.get(self.weight, {})
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == self.weight.shape:
                    value.scatter_(1, weakest, 0.0)
        self.n_swapped += weakest.numel()
        return weakest.numel()

    def step_resampling(self, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Count one backward pass; resample when ``steps_to_resample`` have passed."""
        self.n_backward += 1
        if self.synaptic_resampling and self.n_backward % self.steps_to_resample == 0:
            return self.resample(optimizer)
        return 0

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, n_neurons={self.n_neurons}, "
            f"n_dendrite_inputs={self.n_dendrite_inputs}, n_dendrites={self.n_dendrites}, "
            f"soma_enabled={self.soma_enabled}, synaptic_resampling={self.synaptic_resampling}"
        )


def register_dendritic_hooks(
    layer: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> list[Any]:
    """Switch on synaptic resampling for a plain PyTorch training loop.

    Every backward pass through a :class:`DendriticLayer` (``layer`` itself or any inside
    it) is counted by a gradient hook; when ``steps_to_resample`` have passed, the swap is
    made at the next forward pass, which comes after the optimizer's step. Pass the
    optimizer to have the Adam state of swapped slots reset too. Returns the hook handles.
    """
    layers = [m for m in layer.modules() if isinstance(m, DendriticLayer)]
    if not layers:
        raise ValueError("register_dendritic_hooks needs a DendriticLayer or a module containing one")
    handles = []
    for dl in layers:

        def _on_grad(grad: torch.Tensor, dl: DendriticLayer = dl) -> torch.Tensor:
            dl.n_backward += 1
            if dl.synaptic_resampling and dl.n_backward % dl.steps_to_resample == 0:
                dl._pending_resample = True
            return grad

        def _pre_forward(module: nn.Module, args: Any, dl: DendriticLayer = dl) -> None:
            if dl._pending_resample and dl.training:
                dl._pending_resample = False
                dl.resample(optimizer)

        dl._hooked = True
        handles.append(dl.weight.register_hook(_on_grad))
        handles.append(dl.register_forward_pre_hook(_pre_forward))
    return handles


def resample_layers(modules: Iterable[nn.Module], optimizer: torch.optim.Optimizer | None) -> int:
    """Advance the resampling counter of every DendriticLayer in ``modules`` by one step."""
    return sum(m.step_resampling(optimizer) for m in modules if isinstance(m, DendriticLayer))
