"""Population training of the recurrent families: many DIRU, LSTM or GRU models trained at once.

The recurrent counterpart of :func:`~core.train_population`, with the same interface. Every
member is built as ``create_model(family, seed=s, ...)`` builds it and trained as
:func:`~core.train_model` would train it alone (same initial weights, same per-epoch data
order, same Adam arithmetic, same per-epoch metrics), but the members' tensors are stacked
along a leading member axis and padded to the population's largest sizes, so one batched
product per time step serves them all.

How the members stay exactly themselves:

* **Cells by hand.** LSTM and GRU run as hand-written cells with PyTorch's gate order and
  both of its biases (``nn.LSTM``/``nn.GRU`` cannot differ in size per member); DIRU runs its
  fused step (every compartment's candidate and local gate plus the global gate in one
  product, then the soma integration).
* **Padding.** Each unit block (a gate's rows, the compartments' local units, the hidden
  state) sits at the start of a block of the population's size. Padded weights, biases and
  Adam moments are zero, so a padded unit's pre-activations are zero: a padded LSTM cell
  state stays ``0.5 * 0``, a padded GRU or DIRU state ``0.5 * 0``, a padded compartment
  outputs ``sigmoid(0) * tanh(0) = 0``. Every path out of a padded unit goes through a zero
  weight, so its gradient, and that of every padded weight, is exactly zero; with zero
  moments and a zero weight Adam's update is zero too, with or without weight decay. Members
  with fewer layers skip the layers they lack.
* **Adam.** One update over the flat ``(K, P)`` buffer with per-member learning rate, weight
  decay and step count, in the operations and order of ``torch.optim.Adam``.
* **Data order.** Each member draws its permutation per epoch from its own
  ``torch.Generator`` seeded with its seed, as train_model does.
* **Continuous batching.** Members end only at epoch boundaries and all share the number of
  steps per epoch, so every running member is at the same step of its own epoch: a slot
  freed by a finished, stopped or diverged member is refilled at the next boundary with the
  next config, and members started at different times train side by side.
* **Out of memory.** As in train_population: the state is copied at the start of every
  epoch; on an out-of-memory error the population goes back to that copy, is halved, and the
  members that no longer fit wait (ahead of new configs) to resume where they were.
* **Bio rules.** A member whose config has ``bio`` (a dict of :class:`~core.BioConfig` and
  :class:`~core.BioStepHook` options, as a study's ``bio`` section) is converted with
  ``BioConverter`` from ``torch.manual_seed(seed)`` and trained as ``train_model`` with that
  ``BioStepHook`` would train it, drawing what it would draw: fuzzy rates (every
  distribution, dynamic ones included), crystallisation, volume-dependent rates and
  homeostatic scaling act on the stacked gradient, Dale's principle on the stacked weights,
  batched over the members with each member's own options; the rare steps that draw random
  numbers after the update (rejuvenation, dynamic rate updates) run the member's own
  BioModule methods on the CPU with its generator (see :class:`core._bio_stack.BioPack`). The
  converted layers are the ``nn.Linear`` ones a lone model has: the readout and, for DIRU,
  each layer's integration and global gate (LSTM and GRU cells are not ``nn.Linear``).
  Weight splitting (``weight_splitting_Gamma`` > 1) is the readout's forward hook in a lone
  model (the only converted layer called as a module), so the stack applies it to the
  readout's outputs; conversion refuses a Gamma that does not divide the output width.

Dropout between stacked layers draws its masks from one generator of the population (seeded
with ``seed``), not from PyTorch's global generator as a lone model does; it is the one
difference from train_model, and only when ``dropout > 0`` and ``num_layers > 1``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from ._bio_stack import BioPack, MemberBio, convert_member
from ._data import Dataset
from ._population import capture_step, settle
from ._recurrent import DIRU, DIRUCell, GRUModel, LSTMModel
from ._registry import count_parameters, get_family, list_models
from ._train import TrainResult, resolve_device

__all__ = ["train_recurrent_population", "RECURRENT_POPULATION_FAMILIES"]

#: Families whose members :func:`train_recurrent_population` can train together: those
#: registered with ``population="recurrent"`` (read from the registry when this module loads).
RECURRENT_POPULATION_FAMILIES: tuple[str, ...] = tuple(list_models(population="recurrent"))

logger = logging.getLogger(__name__)

OnMemberEpoch = Callable[[int, int, dict[str, Any]], Any]
OnResult = Callable[[int, TrainResult], Any]

# torch.optim.Adam's defaults, which make_optimizer (and so train_model) uses.
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8
_TRAIN_KEYS = ("lr", "weight_decay", "seed", "bio")
_GATES = {"lstm": 4, "gru": 3}
_AUTO_CPU = 8
_AUTO_MAX = 1024
_EVAL_BYTES = 1 << 28  # bound on one evaluation chunk's activations

# Test hooks: called with the population size before every training step (raising
# torch.OutOfMemoryError from it exercises the halving path), and with the stack and its
# flat (K, P) gradient after every backward pass (to check that padding gets none).
_step_hook: Callable[[int], None] | None = None
_grad_hook: Callable[[_Stack, torch.Tensor], None] | None = None

Segments = list[list[tuple[int, int]]]  # per dimension: (padded length, own length) blocks


# -- members' architectures -------------------------------------------------------------------
@dataclass(frozen=True)
class _Arch:
    """One member's sizes, read from its built module (``local``: DIRU's compartment units)."""

    in_dim: int
    out_dim: int
    hidden: int
    layers: int
    local: int = 0
    dropout: float = 0.0


@dataclass(frozen=True)
class _Dims:
    """The padded sizes a population's stacked tensors are laid out for."""

    family: str
    in_dim: int
    out_dim: int
    hidden: int
    layers: int
    local: int
    sequences: bool

    @classmethod
    def of(cls, family: str, archs: Iterable[_Arch], sequences: bool) -> _Dims:
        a = list(archs)
        return cls(family, a[0].in_dim, a[0].out_dim, max(x.hidden for x in a),
                   max(x.layers for x in a), max(x.local for x in a), sequences)

    def covers(self, o: _Dims) -> bool:
        return self.hidden >= o.hidden and self.layers >= o.layers and self.local >= o.local

    def as_arch(self) -> _Arch:
        return _Arch(self.in_dim, self.out_dim, self.hidden, self.layers, self.local)

    @property
    def rows(self) -> int:
        """Rows of one layer's input product (pre-activations per step)."""
        if self.family == "diru":
            return 2 * self.local + self.hidden
        return _GATES[self.family] * self.hidden

    def segments(self, arch: _Arch) -> dict[str, Segments]:
        """Name -> how a member's own tensor sits in its padded slot, block by block."""
        H, h = self.hidden, arch.hidden
        out: dict[str, Segments] = {}
        for layer in range(self.layers):
            have = layer < arch.layers
            hh = h if have else 0
            pad_in, own_in = (self.in_dim, self.in_dim) if layer == 0 else (H, hh)
            if self.family == "diru":
                n = arch.local if have else 0
                rows = [(self.local, n), (self.local, n), (H, hh)]
            else:
                rows = [(H, hh)] * _GATES[self.family]
            if self.family == "diru":
                names = {"w_ih": [rows, [(pad_in, own_in if have else 0)]], "w_hh": [rows, [(H, hh)]],
                         "b": [rows], "w_int": [[(H, hh)], [(self.local, n)]], "b_int": [[(H, hh)]]}
            else:
                names = {"w_ih": [rows, [(pad_in, own_in if have else 0)]], "w_hh": [rows, [(H, hh)]],
                         "b_ih": [rows], "b_hh": [rows]}
            out.update({f"{layer}.{k}": v for k, v in names.items()})
        out["wo"] = [[(self.out_dim, self.out_dim)], [(H, h)]]
        out["bo"] = [[(self.out_dim, self.out_dim)]]
        return out

    def layout(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Name -> (offset, shape) of every parameter in one member's flat row."""
        out, off = {}, 0
        for name, segs in self.segments(self.as_arch()).items():
            shape = tuple(sum(p for p, _ in dim) for dim in segs)
            out[name] = (off, shape)
            off += math.prod(shape)
        return out

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.layout().values())


def _blocks(segs: Segments) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(padded slices, own slices) of every non-empty block of one tensor."""
    per_dim = []
    for dim in segs:
        pairs, po, mo = [], 0, 0
        for p, m in dim:
            if m:
                pairs.append((slice(po, po + m), slice(mo, mo + m)))
            po, mo = po + p, mo + m
        per_dim.append(pairs)
    return [(tuple(c[0] for c in combo), tuple(c[1] for c in combo))
            for combo in itertools.product(*per_dim)]


def _own_shape(segs: Segments) -> tuple[int, ...]:
    return tuple(sum(m for _, m in dim) for dim in segs)


def _not_batchable(name: str, why: str) -> ValueError:
    return ValueError(
        f"model family {name!r} cannot be trained as a recurrent population ({why}); families "
        f"that can: {', '.join(list_models(population='recurrent'))}. Train its trials one at a time "
        f"with train_model."
    )


def _parse(net: nn.Module, family: str) -> _Arch:
    for p in net.parameters():
        if p.dtype != torch.float32:
            raise _not_batchable(family, f"parameters of dtype {p.dtype}, only float32 is stacked")
    if family == "diru" and isinstance(net, DIRU):
        cells = cast(list[DIRUCell], list(net.cells))
        return _Arch(net.input_size, net.output_size, net.hidden_size, net.num_layers,
                     local=cells[0].num_compartments * cells[0].compartment_size,
                     dropout=float(net.dropout.p))
    if (family == "lstm" and isinstance(net, LSTMModel)) or (family == "gru" and isinstance(net, GRUModel)):
        rnn = cast(nn.RNNBase, net.rnn)
        if rnn.bidirectional or rnn.proj_size or not rnn.bias:
            raise _not_batchable(family, "only unidirectional cells with biases are stacked")
        return _Arch(net.input_size, net.output_size, net.hidden_size, net.num_layers,
                     dropout=float(rnn.dropout))
    raise _not_batchable(family, f"unexpected module {type(net).__name__}")


@torch.no_grad()
def _read(net: nn.Module, family: str, arch: _Arch) -> dict[str, torch.Tensor]:
    """The member's parameters in its own (unpadded) stacked layout, as copies."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(net, DIRU):
        for layer, cell in enumerate(cast(list[DIRUCell], list(net.cells))):
            fused = cell.fused_weights()
            out[f"{layer}.w_ih"] = fused.w_ih.clone()
            out[f"{layer}.w_hh"] = fused.w_hh_t.t().clone()
            out[f"{layer}.b"] = fused.bias.clone()
            out[f"{layer}.w_int"] = cell.integration.weight.clone()
            out[f"{layer}.b_int"] = cell.integration.bias.clone()
    else:
        rnn = net.rnn
        for layer in range(arch.layers):
            for key in ("w_ih", "w_hh", "b_ih", "b_hh"):
                kind, part = key.split("_")
                out[f"{layer}.{key}"] = getattr(rnn, f"{'weight' if kind == 'w' else 'bias'}_{part}_l{layer}").clone()
    readout = cast(nn.Linear, net.readout)
    out["wo"], out["bo"] = readout.weight.clone(), readout.bias.clone()
    return out


@torch.no_grad()
def _write(net: nn.Module, arch: _Arch, own: dict[str, torch.Tensor]) -> None:
    """Put trained tensors in the member's own layout back into its module."""
    if isinstance(net, DIRU):
        for layer, cell in enumerate(cast(list[DIRUCell], list(net.cells))):
            d, n, i = cell.compartment_size, arch.local, cell.input_size
            gate = cell.global_gate
            for key, name in (("w_ih", "weight_ih"), ("w_hh", "weight_hh"), ("b", "bias")):
                t = own[f"{layer}.{key}"]
                for c, comp in enumerate(cell.compartments):
                    dst = getattr(comp, name)
                    dst[:d].copy_(t[c * d : (c + 1) * d])
                    dst[d:].copy_(t[n + c * d : n + (c + 1) * d])
                if key == "b":
                    gate.bias.copy_(t[2 * n :])
                else:
                    cols = slice(None, i) if key == "w_ih" else slice(i, None)
                    gate.weight[:, cols].copy_(t[2 * n :])
            cell.integration.weight.copy_(own[f"{layer}.w_int"])
            cell.integration.bias.copy_(own[f"{layer}.b_int"])
    else:
        rnn = net.rnn
        for layer in range(arch.layers):
            for key in ("w_ih", "w_hh", "b_ih", "b_hh"):
                kind, part = key.split("_")
                getattr(rnn, f"{'weight' if kind == 'w' else 'bias'}_{part}_l{layer}").copy_(
                    own[f"{layer}.{key}"])
    readout = cast(nn.Linear, net.readout)
    readout.weight.copy_(own["wo"])
    readout.bias.copy_(own["bo"])


@dataclass
class _State:
    """A member's tensors in its own layout while it is outside a stack."""

    params: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]


@dataclass(eq=False)
class _Member:
    index: int
    arch: _Arch
    seed: int
    lr: float
    weight_decay: float
    data_gen: torch.Generator
    result: TrainResult
    net: nn.Module | None
    state: _State | None = None  # set while the member waits outside a stack
    epoch: int = 0  # epochs finished
    steps: int = 0  # optimizer steps at the last finished epoch
    perm: torch.Tensor | None = None  # the data order of the epoch in progress (kept for a retry)
    start: float = 0.0
    bio: MemberBio | None = None


# -- bio rules ----------------------------------------------------------------------------------
def _role(name: str) -> str:
    """The stacked name of a converted layer: the readout, or a DIRU cell's integration/gate."""
    if name == "readout":
        return "wo"
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "cells" and parts[2] in ("integration", "global_gate"):
        return f"{parts[1]}.{'int' if parts[2] == 'integration' else 'gate'}"
    raise ValueError(f"bio rules on layer {name!r} are not stacked")


def _role_positions(dims: _Dims, arch: _Arch) -> dict[str, torch.Tensor]:
    """Where each convertible layer's weight sits in a member's flat row, in the layer's shape."""
    segs = dims.segments(arch)
    pos: dict[str, torch.Tensor] = {}
    for name, (off, shape) in dims.layout().items():
        slot = torch.arange(off, off + math.prod(shape)).view(shape)
        own = torch.empty(_own_shape(segs[name]), dtype=torch.long)
        for ps, ms in _blocks(segs[name]):
            own[ms] = slot[ps]
        pos[name] = own
    roles = {"wo": pos["wo"]}
    if dims.family == "diru":
        for layer in range(arch.layers):
            n = arch.local
            roles[f"{layer}.int"] = pos[f"{layer}.w_int"]
            # nn.Linear(i + h, h) whose columns are split between the input and recurrent products
            roles[f"{layer}.gate"] = torch.cat([pos[f"{layer}.w_ih"][2 * n :],
                                                pos[f"{layer}.w_hh"][2 * n :]], 1)
    return roles


def _convert(net: nn.Module, options: dict[str, Any], seed: int) -> MemberBio:
    return convert_member(net, options, seed, _role)


# -- the stacked population ---------------------------------------------------------------------
class _Stack:
    """The population's tensors: one row per member, each padded to ``dims``.

    Parameters and Adam's moments live in flat ``(K, P)`` buffers; ``views`` are the
    per-parameter leaves the forward pass differentiates (they share the buffer's storage).
    """

    def __init__(self, dims: _Dims, members: list[_Member], p: torch.Tensor, m: torch.Tensor,
                 v: torch.Tensor, steps: torch.Tensor) -> None:
        self.dims, self.members = dims, members
        self.p, self.m, self.v, self.steps = p, m, v, steps
        self.K = len(members)
        dev = p.device
        self.layout = dims.layout()
        self.plain: dict[str, torch.Tensor] = {}
        self.views: dict[str, torch.Tensor] = {}
        for name, (off, shape) in self.layout.items():
            self.plain[name] = p[:, off : off + math.prod(shape)].view(self.K, *shape)
            self.views[name] = self.plain[name].detach().requires_grad_(True)
        self.lr = torch.tensor([x.lr for x in members], dtype=torch.float64, device=dev)
        self.wd = torch.tensor([x.weight_decay for x in members], device=dev).unsqueeze(1)
        self.any_wd = any(x.weight_decay != 0 for x in members)
        depth = [x.arch.layers for x in members]
        self.active = torch.tensor([[j < d for j in range(dims.layers)] for d in depth], device=dev)
        self.full = [all(j < d for d in depth) for j in range(dims.layers)]
        drop = [x.arch.dropout if x.arch.layers > 1 else 0.0 for x in members]
        self.drop = torch.tensor(drop, device=dev) if any(drop) else None
        self.bio = (BioPack(self, functools.partial(_role_positions, dims), dims.out_dim)
                    if any(x.bio is not None for x in members) else None)

    def flush(self) -> None:
        """The bio rules' state back into the members' modules, before the stack changes."""
        if self.bio is not None:
            self.bio.flush([m.steps for m in self.members])

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, dims: _Dims, members: list[_Member], states: list[_State],
              device: torch.device) -> _Stack:
        """Stack members' own tensors into padded rows (built on the states' device)."""
        K, P = len(states), dims.numel
        # On the CPU when every state is there (one transfer at the end), else on the device.
        on_cpu = all(t.device.type == "cpu" for st in states for t in st.params.values())
        at = torch.device("cpu") if on_cpu else device
        bufs = [torch.zeros(K, P, device=at) for _ in range(3)]
        layout = dims.layout()
        for i, (mem, st) in enumerate(zip(members, states, strict=True)):
            segs = dims.segments(mem.arch)
            for name, (off, shape) in layout.items():
                blocks = _blocks(segs[name])
                if not blocks:
                    continue
                for buf, src in zip(bufs, (st.params, st.exp_avg, st.exp_avg_sq), strict=True):
                    slot, own = buf[i, off : off + math.prod(shape)].view(shape), src[name]
                    for ps, ms in blocks:
                        slot[ps] = own[ms]
        steps = torch.tensor([float(x.steps) for x in members], dtype=torch.float64)
        return cls(dims, members, *(t.to(device) for t in (*bufs, steps)))

    def states(self, rows: list[int], moments: bool = True, cpu: bool = False) -> list[_State]:
        """Rows back in the members' own layouts (one gather per buffer)."""
        if not rows:
            return []
        self.flush()
        r = torch.tensor(rows, dtype=torch.long, device=self.p.device)
        bufs = [t.index_select(0, r) for t in ((self.p, self.m, self.v) if moments else (self.p,))]
        if cpu:
            bufs = [b.cpu() for b in bufs]
        out = []
        for j, i in enumerate(rows):
            segs = self.dims.segments(self.members[i].arch)
            parts: list[dict[str, torch.Tensor]] = [{}, {}, {}]
            for name, (off, shape) in self.layout.items():
                blocks = _blocks(segs[name])
                if not blocks:
                    continue
                for d, buf in zip(parts, bufs, strict=False):
                    slot = buf[j, off : off + math.prod(shape)].view(shape)
                    own = slot.new_empty(_own_shape(segs[name]))
                    for ps, ms in blocks:
                        own[ms] = slot[ps]
                    d[name] = own
            out.append(_State(parts[0], parts[1], parts[2]))
        return out

    def select(self, rows: list[int]) -> _Stack:
        if rows == list(range(self.K)):
            return self
        self.flush()
        r = torch.tensor(rows, dtype=torch.long, device=self.p.device)
        pick = [t.index_select(0, r) for t in (self.p, self.m, self.v, self.steps)]
        return _Stack(self.dims, [self.members[i] for i in rows], *pick)

    def cat(self, other: _Stack) -> _Stack:
        if not self.K:
            return other
        self.flush()
        other.flush()
        both = [torch.cat([a, b]) for a, b in zip((self.p, self.m, self.v, self.steps),
                                                   (other.p, other.m, other.v, other.steps), strict=True)]
        return _Stack(self.dims, self.members + other.members, *both)

    def snapshot(self) -> tuple[Any, ...]:
        bio = self.bio.snapshot() if self.bio is not None else None
        return (*(t.clone() for t in (self.p, self.m, self.v, self.steps)), bio)

    @torch.no_grad()
    def restore(self, snap: tuple[Any, ...]) -> None:
        for t, s in zip((self.p, self.m, self.v, self.steps), snap[:4], strict=True):
            t.copy_(s)
        if self.bio is not None:
            self.bio.restore(snap[4])

    def real_mask(self) -> torch.Tensor:
        """True where a flat parameter entry belongs to its member (padding is False)."""
        mask = torch.zeros(self.p.shape, dtype=torch.bool)
        for i, mem in enumerate(self.members):
            segs = self.dims.segments(mem.arch)
            for name, (off, shape) in self.layout.items():
                slot = mask[i, off : off + math.prod(shape)].view(shape)
                for ps, _ in _blocks(segs[name]):
                    slot[ps] = True
        return mask.to(self.p.device)

    # -- forward ----------------------------------------------------------------------------
    def _project(self, seq: torch.Tensor, layer: int, shared: bool) -> torch.Tensor:
        """The input half of every step's pre-activations, ``(K, T, B, rows)`` (maybe strided).

        ``seq`` is ``(B, T, F)`` shared by all members, or ``(K, T, B, I)``. One product for
        the whole sequence, outside the time loop; each step then reads ``[:, t]``, which the
        step's baddbmm takes as it is (no copy to a time-major layout, none back in backward).
        """
        P, K, G = self.views, self.K, self.dims.rows
        w = P[f"{layer}.w_ih"]
        b = P[f"{layer}.b" if self.dims.family == "diru" else f"{layer}.b_ih"]
        if self.dims.family == "lstm":  # both biases enter once, before the time loop
            b = b + P[f"{layer}.b_hh"]
        elif self.dims.family == "gru":  # the candidate's recurrent bias sits inside r * (.)
            b_hh = P[f"{layer}.b_hh"]
            r_z = 2 * self.dims.hidden
            b = b + torch.cat([b_hh[:, :r_z], torch.zeros_like(b_hh[:, r_z:])], 1)
        if shared:
            B, T, n_in = seq.shape
            z = torch.addmm(b.reshape(K * G), seq.reshape(B * T, n_in), w.reshape(K * G, n_in).t())
            return z.view(B, T, K, G).permute(2, 1, 0, 3)
        _, T, B, n_in = seq.shape
        z = torch.baddbmm(b.unsqueeze(1), seq.reshape(K, T * B, n_in), w.transpose(1, 2))
        return z.view(K, T, B, G)

    def _recur(self, z: torch.Tensor, layer: int, keep: bool) -> torch.Tensor:
        """Run one layer over time from its projections; all states ``(K, T, B, H)`` or the last."""
        P, d = self.views, self.dims
        H = d.hidden
        w_hh_t = P[f"{layer}.w_hh"].transpose(1, 2)
        h = z.new_zeros(z.shape[0], z.shape[2], H)
        steps = z.unbind(1)  # its backward is one stack, where indexing would be one per step
        states: list[torch.Tensor] = []
        if d.family == "diru":
            n = d.local
            w_int_t = P[f"{layer}.w_int"].transpose(1, 2)
            b_int = P[f"{layer}.b_int"].unsqueeze(1)
            for z_t in steps:
                pre = torch.baddbmm(z_t, h, w_hh_t)
                gates = torch.sigmoid(pre[..., n:])
                local = gates[..., :n] * torch.tanh(pre[..., :n])
                soma = torch.baddbmm(b_int, local, w_int_t)
                h = torch.lerp(h, torch.tanh(soma), gates[..., n:])
                if keep:
                    states.append(h)
        elif d.family == "lstm":
            c = torch.zeros_like(h)
            for z_t in steps:
                pre = torch.baddbmm(z_t, h, w_hh_t)
                gates = torch.sigmoid(pre)  # one kernel for i, f and o (its g block is unused)
                i, f, o = gates[..., :H], gates[..., H : 2 * H], gates[..., 3 * H :]
                c = f * c + i * torch.tanh(pre[..., 2 * H : 3 * H])
                h = o * torch.tanh(c)
                if keep:
                    states.append(h)
        else:  # gru
            b_n = P[f"{layer}.b_hh"][:, 2 * H :].unsqueeze(1)
            for z_t in steps:
                hh = torch.bmm(h, w_hh_t)
                rz = torch.sigmoid(z_t[..., : 2 * H] + hh[..., : 2 * H])
                r, u = rz[..., :H], rz[..., H:]
                cand = torch.tanh(z_t[..., 2 * H :] + r * (hh[..., 2 * H :] + b_n))
                h = cand + u * (h - cand)
                if keep:
                    states.append(h)
        return torch.stack(states, 1) if keep else h

    def outputs(self, x: torch.Tensor, shared: bool, train: bool,
                gen: torch.Generator | None = None) -> torch.Tensor:
        """Outputs ``(K, B, out)`` or ``(K, B, T, out)`` for member batches ``x`` ``(K, B, T, F)``
        or one shared ``x`` ``(B, T, F)``. Inside, sequences are laid out ``(K, T, B, .)``."""
        d, P = self.dims, self.views
        seq = x if shared else x.transpose(1, 2)
        last: torch.Tensor | None = None
        for layer in range(d.layers):
            if layer > 0 and train and self.drop is not None:
                keep_p = 1.0 - self.drop.view(-1, 1, 1, 1)
                mask = torch.rand(seq.shape, generator=gen, device=seq.device) < keep_p
                seq = seq * mask / keep_p
            every_step = layer < d.layers - 1 or d.sequences
            z = self._project(seq, layer, shared and layer == 0)
            new = self._recur(z, layer, every_step)
            if not every_step:
                last = new
            elif layer == 0 or self.full[layer]:
                seq = new
            else:  # members without this layer pass their last layer's states on
                seq = torch.where(self.active[:, layer, None, None, None], new, seq)
        if last is not None and not self.full[-1]:  # members with fewer layers read their own
            last = torch.where(self.active[:, -1, None, None], last, seq[:, -1])
        wo, bo = P["wo"], P["bo"].unsqueeze(1)
        if d.sequences:
            K, T, B, H = seq.shape
            out = torch.baddbmm(bo, seq.reshape(K, T * B, H), wo.transpose(1, 2))
            return out.view(K, T, B, -1).transpose(1, 2)
        assert last is not None
        return torch.baddbmm(bo, last, wo.transpose(1, 2))

    # -- training ---------------------------------------------------------------------------
    def train_step(self, xb: torch.Tensor, yb: torch.Tensor, gen: torch.Generator | None,
                   steps: list[int]) -> torch.Tensor:
        """Forward, backward, bio rules and Adam for every member; returns the mean losses ``(K,)``.

        ``steps`` are the members' optimizer step counts once this step is taken.
        """
        out = self.outputs(xb, shared=False, train=True, gen=gen)
        if self.bio is not None:
            self.bio.observe(out)  # before weight splitting, as a lone trial's hooks run
            out = self.bio.split(out)
        K = out.shape[0]
        loss = F.mse_loss(out, yb.view_as(out), reduction="none").reshape(K, -1).mean(1)
        leaves = list(self.views.values())
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
        with torch.no_grad():
            g = torch.cat([
                (gr if gr is not None else torch.zeros_like(lf)).reshape(K, -1)
                for gr, lf in zip(grads, leaves, strict=True)
            ], dim=1)
            if self.bio is not None:
                self.bio.after_backward(g, self.p)
            if _grad_hook is not None:
                _grad_hook(self, g)
            self._adam(g)
            if self.bio is not None:
                self.bio.after_step(self.p, steps)
        return loss.detach()

    @torch.no_grad()
    def _adam(self, g: torch.Tensor) -> None:
        """torch.optim.Adam's update, with per-member learning rate, decay and step count."""
        self.steps += 1
        bc1 = 1 - torch.pow(_BETA1, self.steps)
        step_size = (self.lr / bc1).float().unsqueeze(1)
        bc2_sqrt = torch.sqrt(1 - torch.pow(_BETA2, self.steps)).float().unsqueeze(1)
        if self.any_wd:
            g = torch.addcmul(g, self.wd, self.p)
        self.m.lerp_(g, 1 - _BETA1)
        self.v.mul_(_BETA2).addcmul_(g, g, value=1 - _BETA2)
        denom = (self.v.sqrt() / bc2_sqrt).add_(_EPS)
        self.p.sub_((self.m / denom).mul_(step_size))

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed loss of every member on a shared ``(x, y)``, ``(K,)``."""
        d = self.dims
        T = x.shape[1] if x.dim() == 3 else 1
        width = d.rows + 3 * d.hidden + d.out_dim
        budget = _EVAL_BYTES * (4 if x.device.type == "cuda" else 1)
        chunk = max(1, min(4096, budget // (self.K * T * width * 4 * 2)))
        total = torch.zeros(self.K, device=x.device)
        for i in range(0, len(x), chunk):
            xb, yb = x[i : i + chunk], y[i : i + chunk]
            out = self.outputs(xb, shared=True, train=False)
            if self.bio is not None:
                out = self.bio.split(out)
            K, B = out.shape[:2]
            target = yb.reshape(out.shape[1:]).unsqueeze(0)
            total += F.mse_loss(out, target.expand_as(out), reduction="none").reshape(K, -1).mean(1) * B
        return total


class _CaptureFailed(RuntimeError):
    """The CUDA graph of a step could not be captured here: the epoch runs again without."""


class _StepGraph:
    """A stack's full-batch training step captured as a CUDA graph and replayed every step.

    A recurrent step is hundreds of small kernels (a Python loop over the time steps, forward
    and backward), so on a GPU its cost is launching them, whatever K is; one replay launches
    them all at once. The step reads the members' batch indices from ``idx`` (copied in before
    each replay) and adds its losses to ``loss_sum``; parameters, moments and step counts are
    updated in place. Made with the first full step of an epoch, which it runs for real as the
    capture's warm-up (:func:`core._population.capture_step`; its losses count). Stacks with
    bio rules (host-side draws between backward and Adam) never use one. Dropout's generator
    is registered with the graph, so each replay draws new masks.
    """

    def __init__(self, stack: _Stack, x: torch.Tensor, y: torch.Tensor, cols: torch.Tensor,
                 gen: torch.Generator | None) -> None:
        self.stack, self.x, self.y, self.gen = stack, x, y, gen
        self.K, self.B = cols.shape
        dev = x.device
        self.idx = cols.reshape(-1).clone()
        self.loss_sum = torch.zeros(self.K, device=dev)
        gens = [gen] if stack.drop is not None and gen is not None else []
        self.graph = capture_step(self._body, dev, gens)

    def _body(self) -> None:
        xb = self.x.index_select(0, self.idx).view(self.K, self.B, *self.x.shape[1:])
        yb = self.y.index_select(0, self.idx).view(self.K, self.B, *self.y.shape[1:])
        self.loss_sum.add_(self.stack.train_step(xb, yb, self.gen, []), alpha=self.B)

    def replay(self, cols: torch.Tensor) -> None:
        self.idx.view(self.K, self.B).copy_(cols)
        self.graph.replay()


# -- the scheduler -------------------------------------------------------------------------------
class _Population:
    """Keeps up to ``size`` members training; refills, evaluates, reports and recovers."""

    def __init__(
        self, family: str, configs: Iterable[dict[str, Any]], data: Dataset, n_epochs: int,
        batch_size: int, device: torch.device, seed: int, size: int | str,
        on_epoch: OnMemberEpoch | None, on_result: OnResult | None, max_size: int,
    ) -> None:
        self.family, self.data, self.n_epochs, self.batch_size = family, data, n_epochs, batch_size
        self.device, self.seed, self.on_epoch, self.on_result = device, seed, on_epoch, on_result
        self.on_settle: Callable[[int], Any] | None = None
        self.configs: Iterator[dict[str, Any]] = iter(configs)
        self.n_configs = len(configs) if isinstance(configs, Sequence) else None
        self.size_arg, self.size, self.max_size = size, 0, max_size
        self.n_train = len(data.x_train)
        self.n_steps = math.ceil(self.n_train / batch_size)
        self.sequences = data.y_train.dim() == 3
        self.results: list[TrainResult] = []
        self.pending: deque[_Member] = deque()  # requeued after an out-of-memory error
        self.exhausted = False
        self.stack: _Stack | None = None
        self.dropout_gen = torch.Generator(device=device).manual_seed(seed)
        self.graphs = device.type == "cuda"  # capture each stack's training step once
        self.graph: _StepGraph | None = None

    # -- members --------------------------------------------------------------------------
    def _new_member(self, config: dict[str, Any]) -> _Member | None:
        """Build the member of the next config, or record it as failed if the config is wrong."""
        index = len(self.results)
        try:
            return self._build_member(index, config)
        except (ValueError, TypeError) as exc:
            seed = config.get("seed", self.seed + index) if isinstance(config, dict) else None
            result = TrainResult(status="failed", error=f"config {index}: {exc}",
                                 device=str(self.device), seed=seed if isinstance(seed, int) else 0)
            logger.warning("train_recurrent_population: member %d failed to build: %s", index, exc)
            self.results.append(result)
            if self.on_result is not None:
                self.on_result(index, result)
            return None

    def _build_member(self, index: int, config: dict[str, Any]) -> _Member:
        if not isinstance(config, dict):
            raise TypeError(f"a config must be a dict of parameters, got {type(config).__name__}")
        params = {k: v for k, v in config.items() if k not in _TRAIN_KEYS}
        lr = float(config.get("lr", 1e-3))
        wd = float(config.get("weight_decay", 0.0))
        mseed = int(config.get("seed", self.seed + index))
        if lr <= 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if wd < 0 or not math.isfinite(wd):
            raise ValueError(f"weight_decay must be >= 0, got {wd!r}")
        d = self.data
        for key, value in (("in_dim", d.in_features), ("out_dim", d.out_dim),
                           ("return_sequences", self.sequences)):
            if params.setdefault(key, value) != value:
                raise ValueError(
                    f"{key}={params[key]!r} does not match the dataset's {value}; leave it out "
                    f"and it is taken from the data"
                )
        family = get_family(self.family)
        resolved = family.resolve(params)  # unknown parameters: a ValueError listing the known
        # As create_model(family, seed=mseed): only the CPU generator draws the weights.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mseed)
            net = family.build(**resolved)
        arch = _parse(net, self.family)
        own = _read(net, self.family, arch)
        state = _State(own, {k: torch.zeros_like(v) for k, v in own.items()},
                       {k: torch.zeros_like(v) for k, v in own.items()})
        bio = _convert(net, config["bio"], mseed) if config.get("bio") is not None else None
        result = TrainResult(n_params=count_parameters(net), device=str(self.device), seed=mseed)
        self.results.append(result)
        return _Member(index=index, arch=arch, seed=mseed, lr=lr, weight_decay=wd,
                       data_gen=torch.Generator().manual_seed(mseed), result=result, net=net,
                       state=state, bio=bio)

    def _take(self) -> _Member | None:
        if self.pending:
            return self.pending.popleft()
        if self.exhausted:
            return None
        while True:
            try:
                config = next(self.configs)
            except StopIteration:
                self.exhausted = True
                return None
            mem = self._new_member(config)
            if mem is not None:
                return mem

    # -- sizing ---------------------------------------------------------------------------
    def _member_bytes(self, dims: _Dims) -> int:
        """A generous estimate of one member's device memory during an epoch."""
        B, T = self.batch_size, self.data.x_train.shape[1]
        per_step = dims.rows * 3 + dims.hidden * 6 + dims.local * 3  # saved for backward
        total = 4 * 8 * dims.numel  # parameters, gradient, moments, the epoch's copy, Adam temps
        total += 4 * B * T * dims.layers * per_step
        total += 4 * 2 * B * T * (dims.in_dim + dims.out_dim) + 8 * self.n_train
        return int(total)

    def _initial_size(self, first: _Member) -> int:
        if isinstance(self.size_arg, int):
            size = self.size_arg
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            dims = _Dims.of(self.family, [first.arch], self.sequences)
            size = max(1, min(self.max_size, int(0.6 * free) // max(1, 2 * self._member_bytes(dims))))
        else:
            size = min(_AUTO_CPU, self.max_size)
        return min(size, self.n_configs) if self.n_configs is not None else size

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> list[TrainResult]:
        first = self._take()
        if first is None:
            return self.results
        self.size = self._initial_size(first)
        incoming = [first]
        while True:
            survivors = self.stack.members if self.stack is not None else []
            while len(survivors) + len(incoming) < self.size:
                mem = self._take()
                if mem is None:
                    break
                incoming.append(mem)
            if not survivors and not incoming:
                return self.results
            self._restack(incoming)
            incoming = []
            assert self.stack is not None
            ended = self._epoch(self.stack)
            if ended is None:  # out of memory: the population was halved, retry
                continue
            keep = [i for i, mem in enumerate(self.stack.members) if mem not in ended]
            self.stack = self.stack.select(keep)

    def _restack(self, incoming: list[_Member]) -> None:
        stack = self.stack
        if not incoming and stack is not None:
            return
        everyone = (stack.members if stack is not None else []) + incoming
        needed = _Dims.of(self.family, (m.arch for m in everyone), self.sequences)
        states = cast(list[_State], [m.state for m in incoming])
        # Rebuilt when the newcomers do not fit, or when the padding has become wasteful.
        if stack is None or not stack.dims.covers(needed) or stack.dims.numel > 1.25 * needed.numel:
            old = stack.states(list(range(stack.K))) if stack is not None else []
            self.stack = _Stack.build(needed, everyone, old + states, self.device)
        else:
            self.stack = stack.cat(_Stack.build(stack.dims, incoming, states, self.device))
        now = time.perf_counter()
        for m in incoming:
            m.state = None
            if not m.start:
                m.start = now

    def _shrink(self, stack: _Stack) -> None:
        """After an out-of-memory error: halve the population, requeue who no longer fits."""
        if stack.K <= 1:
            raise torch.OutOfMemoryError(
                "train_recurrent_population ran out of device memory with a single member; "
                "use a smaller batch_size or model"
            )
        self.size = max(1, min(self.size, stack.K) // 2)
        evicted = list(range(self.size, stack.K))
        for i, st in reversed(list(zip(evicted, stack.states(evicted), strict=True))):
            mem = stack.members[i]
            mem.state = st
            self.pending.appendleft(mem)
        self.stack = stack.select(list(range(self.size)))
        logger.warning(
            "train_recurrent_population: out of device memory with %d members; continuing with "
            "%d (the others wait for a free slot and resume where they were)", stack.K, self.size,
        )

    def _train(self, stack: _Stack) -> torch.Tensor:
        """Run one epoch's steps and the evaluations; returns the (3, K) loss sums on the CPU."""
        d = self.data
        x, y = d.x_train, d.y_train
        B, K = self.batch_size, stack.K
        for mem in stack.members:
            if mem.perm is None:  # drawn once per epoch, so a retry after halving reuses it
                mem.perm = torch.randperm(self.n_train, generator=mem.data_gen)
        order = torch.stack([cast(torch.Tensor, m.perm) for m in stack.members]).to(self.device)
        loss_sum = torch.zeros(K, device=self.device)
        graph = self.graph if self.graph is not None and self.graph.stack is stack else None
        if graph is not None:
            graph.loss_sum.zero_()
        capture = self.graphs and stack.bio is None and _grad_hook is None
        for t in range(self.n_steps):
            if _step_hook is not None:
                _step_hook(K)
            cols = order[:, t * B : (t + 1) * B]
            b = cols.shape[1]
            if graph is not None and b == B:
                graph.replay(cols)
                continue
            if capture and graph is None and b == B:
                self.graph = None  # the old stack's graph and its memory go first
                try:
                    graph = self.graph = _StepGraph(stack, x, y, cols, self.dropout_gen)
                    continue  # the warm-up step's losses are in graph.loss_sum
                except torch.OutOfMemoryError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a capture that fails: eager steps
                    raise _CaptureFailed(str(exc)) from exc
            idx = cols.reshape(-1)
            xb = x.index_select(0, idx).view(K, b, *x.shape[1:])
            yb = y.index_select(0, idx).view(K, b, *y.shape[1:])
            loss = stack.train_step(xb, yb, self.dropout_gen, [m.steps + t + 1 for m in stack.members])
            loss_sum += loss * b
        if graph is not None:
            loss_sum += graph.loss_sum
        val = stack.evaluate(d.x_val, d.y_val)
        test = stack.evaluate(d.x_test, d.y_test)
        return torch.stack([loss_sum, val, test]).cpu()

    def _epoch(self, stack: _Stack) -> set[_Member] | None:
        """One epoch of every member; returns those that ended, or None after halving."""
        t0 = time.perf_counter()
        snap = None
        table = None
        try:
            snap = stack.snapshot()
            try:
                table = self._train(stack)
            except _CaptureFailed as exc:  # the epoch again from its start, without graphs
                logger.warning("train_recurrent_population: CUDA graph capture failed (%s); "
                               "running steps eagerly", exc)
                self.graphs, self.graph = False, None
                stack.restore(snap)
                table = self._train(stack)
        except torch.OutOfMemoryError:
            pass  # handled below, once the failed step's tensors are released
        if table is None:
            self.graph = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if snap is not None:
                stack.restore(snap)
            del snap
            self._shrink(stack)
            return None
        del snap
        seconds = time.perf_counter() - t0
        now = time.perf_counter()
        d = self.data
        sizes = (self.n_train, len(d.x_val), len(d.x_test))
        rows = [[v / max(1, n) for v in row] for row, n in zip(table.tolist(), sizes, strict=True)]
        ended: list[int] = []
        for i, mem in enumerate(stack.members):
            mem.perm = None
            mem.epoch += 1
            mem.steps += self.n_steps
            res = mem.result
            tl, vl, sl = (row[i] for row in rows)
            stop = False
            if not math.isfinite(tl):
                res.status = "diverged"
                res.error = f"training loss became non-finite ({tl}) in epoch {mem.epoch}"
                stop = True
            else:
                metrics = {
                    "epoch": mem.epoch, "train_loss": tl, "train_accuracy": None,
                    "val_loss": vl, "val_accuracy": None, "test_loss": sl, "test_accuracy": None,
                    "seconds": seconds, "n_params": res.n_params,
                }
                res.history.append(metrics)
                if self.on_epoch is not None and self.on_epoch(mem.index, mem.epoch, metrics):
                    res.status, stop = "stopped", True
                elif mem.epoch >= self.n_epochs:
                    res.status, stop = "completed", True
            if stop:
                ended.append(i)
        ended = settle(stack.members, ended, self.on_settle)  # every member has reported
        for i in ended:
            stack.members[i].result.wall_time = now - stack.members[i].start
        self._keep_weights(stack, [i for i in ended if stack.members[i].result.status != "diverged"])
        for i in ended:
            mem = stack.members[i]
            mem.net = None
            if self.on_result is not None:
                self.on_result(mem.index, mem.result)
        return {stack.members[i] for i in ended}

    @torch.no_grad()
    def _keep_weights(self, stack: _Stack, rows: list[int]) -> None:
        """Write these rows into their members' modules; attach each ``state_dict`` to the result."""
        for i, st in zip(rows, stack.states(rows, moments=False, cpu=True), strict=True):
            mem = stack.members[i]
            if mem.net is None:
                continue
            _write(mem.net, mem.arch, st.params)
            mem.result.state_dict = mem.net.state_dict()
            mem.net = None


def train_recurrent_population(
    model: str,
    configs: Sequence[dict[str, Any]] | Iterator[dict[str, Any]],
    data: Dataset,
    n_epochs: int,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    seed: int = 0,
    on_epoch: OnMemberEpoch | None = None,
    *,
    population_size: int | str | None = None,
    on_result: OnResult | None = None,
    max_population: int | None = None,
    on_settle: Callable[[int], Any] | None = None,
) -> list[TrainResult]:
    """Train many DIRU, LSTM or GRU models at once, each exactly as :func:`train_model` would.

    The interface of :func:`~core.train_population`, for the sequence-regression families in
    ``RECURRENT_POPULATION_FAMILIES``. ``configs`` holds one dict per member: the family's
    parameters (``hidden_size``, ``num_layers``, ``num_compartments``, ...; ``in_dim``,
    ``out_dim`` and ``return_sequences`` are taken from the data) plus ``lr`` (default 1e-3),
    ``weight_decay`` (default 0) and ``seed`` (default ``seed + index``). Member ``i`` is
    ``create_model(model, seed=s, **params)`` trained like ``train_model(it, data, n_epochs,
    lr, weight_decay, batch_size, seed=s)``: the same initial weights, data order, Adam
    updates and per-epoch metrics, within floating-point tolerance (dropout between stacked
    layers excepted: see the module's docstring).

    ``configs`` may be an iterator, read lazily whenever a slot is free. Up to
    ``population_size`` members train at once (an int, or ``"auto"``/``None``: sized from
    the device's free memory on CUDA, 8 on the CPU, never more than a sequence's length or
    ``max_population``). ``on_epoch(index, epoch, metrics)`` after each of a member's epochs
    stops it when it returns a truthy value (``"stopped"``); a non-finite training loss ends
    only that member (``"diverged"``); a config that cannot be built ends only that member
    (``"failed"``). ``on_settle(index)``, if given, is asked for every member still training
    once all have reported an epoch; truthy stops it there (as in :func:`~core.train_population`).
    ``on_result(index, result)`` is called as soon as a member ends. Returns
    one :class:`TrainResult` per config in the order read; members that did not diverge or
    fail carry ``result.state_dict`` (CPU tensors, with the bio rules' buffers when it has some).

    A config's ``bio`` (a dict of BioConfig and BioStepHook options) trains that member with
    the bio rules, as ``BioConverter`` and ``BioStepHook`` in ``train_model`` would after
    ``torch.manual_seed(seed)``; ``weight_splitting_Gamma > 1`` splits the readout's outputs
    as the lone model's forward hook does.
    """
    family = get_family(model)  # unknown names list the known ones
    if family.population != "recurrent":
        raise _not_batchable(family.name, "it is not a recurrent family")
    if data.task != "regression" or data.x_train.dim() != 3:
        raise ValueError(
            f"train_recurrent_population trains sequence regressors on (N, T, F) inputs; "
            f"dataset {data.name!r} is a {data.task} task with inputs of shape "
            f"{tuple(data.x_train.shape)}. Use train_model or train_population for it."
        )
    if not isinstance(n_epochs, int) or isinstance(n_epochs, bool) or n_epochs < 1:
        raise ValueError(f"n_epochs must be an integer >= 1, got {n_epochs!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    size: int | str = "auto" if population_size is None else population_size
    if size != "auto" and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ValueError(f"population_size must be a positive integer or 'auto', got {population_size!r}")
    if max_population is not None and (
        not isinstance(max_population, int) or isinstance(max_population, bool) or max_population < 1
    ):
        raise ValueError(f"max_population must be a positive integer, got {max_population!r}")
    if isinstance(size, int) and max_population is not None and size > max_population:
        raise ValueError(f"population_size={size} is over max_population={max_population}")
    dev = resolve_device(device)
    pop = _Population(family.name, configs, data.to(dev), n_epochs, batch_size, dev, seed, size,
                      on_epoch, on_result, max_population if max_population is not None else _AUTO_MAX)
    pop.on_settle = on_settle
    return pop.run()
