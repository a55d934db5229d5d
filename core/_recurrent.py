"""Dendrite-inspired recurrent units (DIRU) and LSTM/GRU baselines for sequence regression.

All three models read batch-first sequences ``(batch, time, features)`` and return
``(batch, output_size)`` from the last step, or ``(batch, time, output_size)`` with
``return_sequences=True`` (for sequence targets).

The registered families ``diru``, ``lstm`` and ``gru`` have ``input_kind="sequence"`` and
``task="regression"``. Their builders take ``in_dim`` (features per time step) and
``out_dim`` (outputs per prediction) instead of ``n_classes``: the studies layer passes
``in_dim=dataset.in_features`` and ``out_dim=dataset.out_dim``. Exact parameter counts,
with ``i`` the layer's input size, ``h`` the hidden size, ``o`` the output size, ``K``
compartments of ``d = ceil(h / K)`` units each:

- DIRU layer: ``2*K*d*(i + h + 1)`` (compartments) ``+ K*d*h + h`` (integration)
  ``+ h*(i + h + 1)`` (global gate)
- LSTM layer: ``4*h*(i + h + 2)``; GRU layer: ``3*h*(i + h + 2)`` (PyTorch keeps two biases)
- readout: ``h*o + o``

where the first layer has ``i = in_dim`` and the stacked ones ``i = h``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, cast

import torch
from torch import nn
from torch.nn import functional as F

from ._registry import register_model

__all__ = ["DendriteCompartment", "DIRUCell", "DIRU", "LSTMModel", "GRUModel"]


def _check_positive(**sizes: Any) -> None:
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_dropout(dropout: float) -> None:
    if not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


def _compartment_size(hidden_size: int, num_compartments: int) -> int:
    # Rounded up so that any (hidden_size, num_compartments) pair is valid: a search space
    # need not tie one to the other, and the compartments together are never narrower than h.
    return math.ceil(hidden_size / num_compartments)


def _check_sequence(x: torch.Tensor, input_size: int) -> None:
    if x.dim() != 3 or x.shape[-1] != input_size or x.shape[1] < 1:
        raise ValueError(
            f"expected a batch-first sequence of shape (batch, time >= 1, {input_size}), got "
            f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0) for one sequence"
        )


class _FusedWeights(NamedTuple):
    w_ih: torch.Tensor
    bias: torch.Tensor
    w_hh_t: torch.Tensor
    w_int_t: torch.Tensor
    b_int: torch.Tensor


class DendriteCompartment(nn.Module):
    """One dendritic compartment: a local candidate under its own local gate.

    From the step's input ``x`` and the previous hidden state ``h`` it computes
    ``sigmoid(gate) * tanh(candidate)`` of width ``size``, where the pre-activations
    ``[candidate, gate] = W_x x + W_h h + b`` come from one weight pair, so that
    :class:`DIRUCell` can stack its compartments' weights into a single matmul.
    Parameters: ``2*size*(input_size + hidden_size + 1)``.
    """

    def __init__(self, input_size: int, hidden_size: int, size: int) -> None:
        super().__init__()
        _check_positive(input_size=input_size, hidden_size=hidden_size, size=size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.size = size
        # Rows [0, size) are the candidate, rows [size, 2*size) the local gate.
        self.weight_ih = nn.Parameter(torch.empty(2 * size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(2 * size, hidden_size))
        self.bias = nn.Parameter(torch.empty(2 * size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The scale PyTorch's own recurrent cells use, so DIRU and the baselines start alike.
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in (self.weight_ih, self.weight_hh, self.bias):
            nn.init.uniform_(p, -bound, bound)

    @staticmethod
    def activate(pre: torch.Tensor) -> torch.Tensor:
        """Gated output from pre-activations whose last dimension is ``[candidate, gate]``."""
        candidate, gate = pre.chunk(2, dim=-1)
        return torch.sigmoid(gate) * torch.tanh(candidate)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        pre = F.linear(x, self.weight_ih, self.bias) + F.linear(h, self.weight_hh)
        return self.activate(pre)


class DIRUCell(nn.Module):
    """One step of a dendrite-inspired recurrent unit.

    ``num_compartments`` :class:`DendriteCompartment` s compute gated local outputs in
    parallel; a learned linear integration (the soma) combines them into a candidate
    state ``s``; a global gate ``g = sigmoid(W_g [x, h] + b_g)`` decides how much of it
    replaces the previous state, which is otherwise carried over unchanged (the residual
    path): ``h' = h + g * (tanh(s) - h)``.

    ``global_gate_bias`` sets the global gate's initial bias (default: PyTorch's uniform
    initialisation, as in the baselines). A negative value such as -2 starts the cell
    retaining its state, which speeds up learning long delays (measured on
    ``delay_recall``) and slows slightly the fit of fast signals.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_compartments: int = 4,
        compartment_size: int | None = None,
        *,
        global_gate_bias: float | None = None,
    ) -> None:
        super().__init__()
        _check_positive(
            input_size=input_size, hidden_size=hidden_size, num_compartments=num_compartments
        )
        if compartment_size is None:
            compartment_size = _compartment_size(hidden_size, num_compartments)
        _check_positive(compartment_size=compartment_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_compartments = num_compartments
        self.compartment_size = compartment_size
        self.compartments = nn.ModuleList(
            DendriteCompartment(input_size, hidden_size, compartment_size)
            for _ in range(num_compartments)
        )
        self.integration = nn.Linear(num_compartments * compartment_size, hidden_size)
        self.global_gate = nn.Linear(input_size + hidden_size, hidden_size)
        if global_gate_bias is not None:
            nn.init.constant_(self.global_gate.bias, global_gate_bias)

    @staticmethod
    def count(input_size: int, hidden_size: int, num_compartments: int = 4,
              compartment_size: int | None = None) -> int:
        """Exact number of parameters of a cell with these sizes."""
        i, h, k = input_size, hidden_size, num_compartments
        d = _compartment_size(h, k) if compartment_size is None else compartment_size
        return 2 * k * d * (i + h + 1) + (k * d * h + h) + h * (i + h + 1)

    def fused_weights(self) -> _FusedWeights:
        """All compartments' and the global gate's weights stacked for :meth:`step`.

        Input rows (and the columns of ``w_hh_t``) are every compartment's candidate, then
        every compartment's local gate, then the global gate, so that one matmul, one tanh
        and one sigmoid per step serve them all. Stacking once per sequence lets
        :class:`DIRU` project the whole input sequence outside its time loop.
        """
        i, d = self.input_size, self.compartment_size
        comps = cast(list[DendriteCompartment], list(self.compartments))
        gate = self.global_gate
        w_ih = torch.cat([c.weight_ih[:d] for c in comps] + [c.weight_ih[d:] for c in comps]
                         + [gate.weight[:, :i]])
        w_hh = torch.cat([c.weight_hh[:d] for c in comps] + [c.weight_hh[d:] for c in comps]
                         + [gate.weight[:, i:]])
        bias = torch.cat([c.bias[:d] for c in comps] + [c.bias[d:] for c in comps] + [gate.bias])
        return _FusedWeights(w_ih, bias, w_hh.t(), self.integration.weight.t(),
                             self.integration.bias)

    def step(self, x_proj: torch.Tensor, h: torch.Tensor, fused: _FusedWeights) -> torch.Tensor:
        """Advance one step given the input's projection ``F.linear(x, fused.w_ih, fused.bias)``."""
        pre = torch.addmm(x_proj, h, fused.w_hh_t)
        n = self.num_compartments * self.compartment_size
        gates = torch.sigmoid(pre[:, n:])
        local = gates[:, :n] * torch.tanh(pre[:, :n])
        soma = torch.addmm(fused.b_int, local, fused.w_int_t)
        return torch.lerp(h, torch.tanh(soma), gates[:, n:])

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """The next hidden state ``(batch, hidden_size)`` from ``x`` ``(batch, input_size)``."""
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        fused = self.fused_weights()
        return self.step(F.linear(x, fused.w_ih, fused.bias), h, fused)


class _SequenceRegressor(nn.Module):
    """A recurrent encoder plus a linear readout of the last step or of every step."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int,
                 dropout: float, return_sequences: bool) -> None:
        super().__init__()
        _check_positive(input_size=input_size, hidden_size=hidden_size,
                        output_size=output_size, num_layers=num_layers)
        _check_dropout(dropout)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.num_layers = num_layers
        self.return_sequences = bool(return_sequences)
        self.readout = nn.Linear(hidden_size, output_size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states of the last layer at every step, ``(batch, time, hidden_size)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_sequence(x, self.input_size)
        states = self.encode(x)
        return self.readout(states if self.return_sequences else states[:, -1])


class DIRU(_SequenceRegressor):
    """Stacked :class:`DIRUCell` layers with a linear readout.

    ``dropout`` applies to each layer's outputs except the last, as in ``nn.LSTM``.
    ``compartment_size`` (default ``ceil(hidden_size / num_compartments)``) and
    ``global_gate_bias`` are passed to every :class:`DIRUCell`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        num_compartments: int = 4,
        num_layers: int = 1,
        dropout: float = 0.0,
        return_sequences: bool = False,
        *,
        compartment_size: int | None = None,
        global_gate_bias: float | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, output_size, num_layers, dropout,
                         return_sequences)
        self.num_compartments = num_compartments
        self.cells = nn.ModuleList(
            DIRUCell(input_size if layer == 0 else hidden_size, hidden_size, num_compartments,
                     compartment_size, global_gate_bias=global_gate_bias)
            for layer in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        seq = x
        for layer, cell in enumerate(cast(list[DIRUCell], list(self.cells))):
            if layer > 0:
                seq = self.dropout(seq)
            fused = cell.fused_weights()
            # The input half of every step's pre-activation at once, outside the time loop;
            # time-major so that each step reads a contiguous block.
            x_proj = F.linear(seq.transpose(0, 1), fused.w_ih, fused.bias).contiguous()
            h = x.new_zeros(x.shape[0], self.hidden_size)
            states = []
            for x_t in x_proj:
                h = cell.step(x_t, h, fused)
                states.append(h)
            seq = torch.stack(states, dim=1)
        return seq


class LSTMModel(_SequenceRegressor):
    """Baseline: ``nn.LSTM`` (batch first) with a linear readout, the interface of :class:`DIRU`."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 1,
                 dropout: float = 0.0, return_sequences: bool = False) -> None:
        super().__init__(input_size, hidden_size, output_size, num_layers, dropout,
                         return_sequences)
        self.rnn = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class GRUModel(_SequenceRegressor):
    """Baseline: ``nn.GRU`` (batch first) with a linear readout, the interface of :class:`DIRU`."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 1,
                 dropout: float = 0.0, return_sequences: bool = False) -> None:
        super().__init__(input_size, hidden_size, output_size, num_layers, dropout,
                         return_sequences)
        self.rnn = nn.GRU(input_size, hidden_size, num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


# -- registered families ------------------------------------------------------------------
def _linear(i: int, o: int) -> int:
    return i * o + o


def _check_family(in_dim: int, out_dim: int, hidden_size: int, num_layers: int) -> None:
    _check_positive(in_dim=in_dim, out_dim=out_dim, hidden_size=hidden_size,
                    num_layers=num_layers)


def _count_diru(*, in_dim: int, out_dim: int, hidden_size: int, num_layers: int,
                num_compartments: int, **_: Any) -> int:
    _check_family(in_dim, out_dim, hidden_size, num_layers)
    _check_positive(num_compartments=num_compartments)
    h = hidden_size
    layers = DIRUCell.count(in_dim, h, num_compartments) + (num_layers - 1) * DIRUCell.count(
        h, h, num_compartments
    )
    return layers + _linear(h, out_dim)


def _count_gated(gates: int, in_dim: int, out_dim: int, hidden_size: int, num_layers: int) -> int:
    _check_family(in_dim, out_dim, hidden_size, num_layers)
    h = hidden_size
    # PyTorch keeps separate input and recurrent biases: 2 per gate row.
    per_layer = [gates * h * (i + h + 2) for i in [in_dim] + [h] * (num_layers - 1)]
    return sum(per_layer) + _linear(h, out_dim)


def _count_lstm(*, in_dim: int, out_dim: int, hidden_size: int, num_layers: int,
                **_: Any) -> int:
    return _count_gated(4, in_dim, out_dim, hidden_size, num_layers)


def _count_gru(*, in_dim: int, out_dim: int, hidden_size: int, num_layers: int,
               **_: Any) -> int:
    return _count_gated(3, in_dim, out_dim, hidden_size, num_layers)


@register_model(
    "diru", count=_count_diru, input_kind="sequence", task="regression", population="recurrent"
)
def diru(
    *,
    in_dim: int = 1,
    out_dim: int = 1,
    hidden_size: int = 32,
    num_layers: int = 1,
    num_compartments: int = 4,
    dropout: float = 0.0,
    global_gate_bias: float | None = None,
    return_sequences: bool = False,
) -> nn.Module:
    """Dendrite-inspired recurrent unit: gated compartments, soma integration, global gate.

    ``dropout`` acts between stacked layers (none with ``num_layers=1``), as in the
    baselines; ``global_gate_bias`` is the global gates' initial bias (None: PyTorch's
    uniform draw). Neither changes the parameter count.
    """
    _check_family(in_dim, out_dim, hidden_size, num_layers)
    _check_positive(num_compartments=num_compartments)
    return DIRU(in_dim, hidden_size, out_dim, num_compartments=num_compartments,
                num_layers=num_layers, dropout=dropout, return_sequences=return_sequences,
                global_gate_bias=global_gate_bias)


@register_model(
    "lstm", count=_count_lstm, input_kind="sequence", task="regression", population="recurrent"
)
def lstm(
    *,
    in_dim: int = 1,
    out_dim: int = 1,
    hidden_size: int = 32,
    num_layers: int = 1,
    dropout: float = 0.0,
    return_sequences: bool = False,
) -> nn.Module:
    """LSTM baseline (nn.LSTM) with a linear readout.

    ``dropout`` acts between stacked layers (none with ``num_layers=1``).
    """
    _check_family(in_dim, out_dim, hidden_size, num_layers)
    return LSTMModel(in_dim, hidden_size, out_dim, num_layers=num_layers, dropout=dropout,
                     return_sequences=return_sequences)


@register_model(
    "gru", count=_count_gru, input_kind="sequence", task="regression", population="recurrent"
)
def gru(
    *,
    in_dim: int = 1,
    out_dim: int = 1,
    hidden_size: int = 32,
    num_layers: int = 1,
    dropout: float = 0.0,
    return_sequences: bool = False,
) -> nn.Module:
    """GRU baseline (nn.GRU) with a linear readout.

    ``dropout`` acts between stacked layers (none with ``num_layers=1``).
    """
    _check_family(in_dim, out_dim, hidden_size, num_layers)
    return GRUModel(in_dim, hidden_size, out_dim, num_layers=num_layers, dropout=dropout,
                    return_sequences=return_sequences)
