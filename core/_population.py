"""Population training: many small models of one family trained at once as stacked tensors.

Every member of a population is built and trained exactly as ``create_model`` and
:func:`~core.train_model` would build and train it alone (same initial weights and
connections, same per-epoch data order, same Adam arithmetic, same synaptic resampling, same
metrics), but the members' tensors are stacked along a leading member axis and padded to the
population's largest sizes, so one batched matrix product serves them all.

How the members stay exactly themselves:

* **Padding.** Each weight is stored in a slot of the population's padded shape; a member's
  own values sit in one corner (a dendritic layer's rows on a padded (neuron, dendrite)
  grid). Padded weights, biases and Adam moments are zero and stay zero: a padded
  connection of a dendrite points at a sink element outside the dense matrix, so it adds
  nothing and its gradient is exactly zero; every other padded unit sees zero weights,
  produces LeakyReLU(0) = 0 and receives a zero gradient. A zero gradient, zero moments and a zero
  weight give an Adam update of exactly zero, with or without weight decay. Members of
  different depth (``vanilla_mlp``) skip the layers they lack; a population that mixes
  dendritic layers with and without a soma selects each member's path.
* **Adam.** One update over the flat parameter buffer of all members, with each member's
  learning rate, weight decay and step count as vectors. It does the operations of
  ``torch.optim.Adam`` (single-tensor and foreach paths) in the same order.
* **Resampling.** A layer's resampling draws come from a counter-based generator (a hash of
  its seed, the resampling's number, the dendrite and the input: ``core._layers.swap_weakest``),
  so the population computes them on the device, batched, for the members due at a step, and
  gets the numbers each lone layer gets: the scores of every input of every real dendrite
  (one Triton kernel on CUDA), the ``m`` best of those a row does not use, then the swap
  (weakest magnitudes, new inputs, fresh weights, Adam slots reset). Each member's data
  order is drawn ahead of time on the CPU from its own ``torch.Generator``, in background
  threads, as train_model draws it.
* **Recipe.** A member's ``batch_size``, ``lr_schedule`` (with ``warmup_epochs``),
  ``label_smoothing`` and ``augment`` are train_model's: the schedule's rates are computed
  per member and step in double precision and written into the learning-rate vector before
  each step; smoothing is per member in the training loss only (the fused head takes it
  too); shifts are drawn right after each epoch's order from the member's data generator and
  applied to its batch rows (members that do not augment get the identity shift). A
  ``connectivity="local"`` member's resampling scores are masked to its patches as the layer
  masks them, and ``resample_reset_adam=False`` members keep the swapped slots' moments.
  Members of different batch sizes never share a stack (their steps differ).
* **Continuous batching.** Members end only at epoch boundaries, so all running members are
  always at the same step of their epochs even though their epoch counters differ: a slot
  freed by a finished, pruned or diverged member is refilled at once with the next config.
* **Out of memory.** The population's state is copied at the start of every epoch (on the
  device: a few megabytes per hundred members). If the device runs out of memory in that
  epoch, every member goes back to that copy (its last consistent state), the population
  size is halved, and the members that no longer fit are requeued, ahead of new configs,
  to resume from that state when a slot frees. No member is lost or restarted; their
  callbacks see each epoch once. (Only the training epoch is guarded: running out of memory
  while the population is being rebuilt at an epoch boundary is raised.)
* **Speed paths (CUDA).** Each stack's full-batch step is captured once as a CUDA graph, and
  so are 16 of them in a row (``_CHUNK_STEPS``) and its recurring resamplings: an epoch is a
  few dozen replays, queued ahead of the device; ``dendritic_simple`` stacks compute everything
  after the dendrite product in one Triton kernel (``core/_kernels.py``, no autograd); the next
  epoch's data orders are drawn and stacked by threads once this epoch's steps are queued,
  while the device works through them. A stack's members are
  sorted by their dendrite tile and neurons (:func:`_band_key`) and its fused step runs in
  bands (:func:`_bands`), each band's products and head on its own (neurons, dendrites) grid,
  the padding of its smaller members skipped; where real connections fill less than half the
  padded slots, Adam reads their gradient itself and skips the padding
  (``_kernels.adam_connections``). ``precision="tf32"`` or ``"bf16"`` changes only the
  dendrite products' arithmetic. Sequences of configs of very different sizes are split into
  size buckets (:func:`size_buckets`).
* **Results.** A member that did not diverge gets ``result.state_dict``: its module's
  trained weights and connections (CPU tensors), as ``train_model`` would have left the
  model. A config that cannot be built ends as status ``"failed"`` with the reason in
  ``error`` and does not stop the others.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import logging
import math
import os
import subprocess
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import _kernels
from ._bio_stack import BioPack, MemberBio, convert_member
from ._data import Dataset
from ._layers import (
    _FRESH,
    _SCORES,
    INIT_DENDRITES,
    INIT_SOMAS,
    DendriticLayer,
    connection_scores,
    deferred_connections,
    draw_rows,
    fresh_weights,
    initial_weights,
    input_scores,
    int32_scores,
    seed_int64,
    weakest_slots,
)
from ._models import dendritic_simple, dendritic_simple_tensors
from ._registry import ModelFamily, count_parameters, get_family, list_models
from ._train import (
    AUGMENTS,
    LR_SCHEDULES,
    MAX_SHIFT,
    TrainResult,
    _image_view,
    lr_multiplier,
    resolve_device,
    schedule_steps,
    shift_images,
)

__all__ = ["train_population", "POPULATION_FAMILIES", "PRECISIONS", "check_precision", "size_buckets",
           "bio_stackable"]

#: The arithmetic a population can train in (``train_population(precision=...)``).
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


def check_precision(precision: object) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ValueError naming them."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {', '.join(repr(p) for p in PRECISIONS)}, got {precision!r}; "
            f"'fp32' is exact float32 (the default), 'tf32' and 'bf16' trade a little accuracy "
            f"for speed on CUDA"
        )
    return precision

#: Families whose members :func:`train_population` can train together: those registered
#: with ``population="mlp"`` (read from the registry when this module loads).
POPULATION_FAMILIES: tuple[str, ...] = tuple(list_models(population="mlp"))

logger = logging.getLogger(__name__)

OnMemberEpoch = Callable[[int, int, dict[str, Any]], Any]
OnResult = Callable[[int, TrainResult], Any]

_SLOPE = 0.1
# torch.optim.Adam's defaults, which make_optimizer (and so train_model) uses.
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8
# A config's keys that are the trainer's, not the family's (train_model's arguments).
_TRAIN_KEYS = ("lr", "weight_decay", "seed", "batch_size", "lr_schedule", "warmup_epochs",
               "label_smoothing", "augment", "bio")
_AUTO_CPU = 8
# "auto" never goes past this: 1024 default-sized members already keep an H100 busy (see
# bench/bench_population.py), and a study learns sooner from fewer concurrent trials.
_AUTO_MAX = 1024
_EVAL_BYTES = 1 << 28  # bound on one evaluation chunk's activations
_DRAW_BYTES = 1 << 28  # bound on the connections' scores made on the device at once (_draw_on_device)
_PICK_ON = ("cuda",)  # device types whose module-free members are drawn there, all at once (_draw_on_device)
_KEEP_PINNED = True  # _keep_weights: the weights read back through a waiting pinned staging buffer

# Test hook: called with the population size before every training step. Raising
# torch.OutOfMemoryError from it exercises the halving path without filling a device.
_step_hook: Callable[[int], None] | None = None


# -- members' architectures -------------------------------------------------------------------
@dataclass(frozen=True)
class _Arch:
    """One member's layer sizes, read from its built module."""

    in_dim: int
    n_classes: int
    n: int = 0  # neurons, dendrites per neuron, inputs per dendrite; 0: no dendritic layer
    d: int = 0
    k: int = 0
    soma: bool = False
    post_act: bool = False  # a LeakyReLU straight after the dendritic layer
    hidden: tuple[int, ...] = ()  # widths of the Linear layers before the last
    m: int = 0  # connections swapped per dendrite at each resampling (0: never)
    every: int = 1  # optimizer steps between resamplings
    reset: bool = True  # a swapped connection's Adam moments are zeroed (resample_reset_adam)

    @property
    def width(self) -> int:
        """What the first Linear reads."""
        if not self.n:
            return self.in_dim
        return self.n if self.soma else self.n * self.d


def _not_batchable(name: str, why: str) -> ValueError:
    return ValueError(
        f"model family {name!r} cannot be trained as a population ({why}); families that "
        f"can: {', '.join(list_models(population='mlp'))}. Train its trials one at a time "
        f"with train_model."
    )


def _parse(net: nn.Module, name: str) -> tuple[_Arch, DendriticLayer | None, list[nn.Linear]]:
    """Read ``[DendriticLayer [LeakyReLU]] Linear (LeakyReLU Linear)*`` out of a built member."""
    mods = list(net.children()) if isinstance(net, nn.Sequential) else []
    layer: DendriticLayer | None = None
    post_act = False
    i = 0

    def leaky(mod: nn.Module) -> bool:
        return isinstance(mod, nn.LeakyReLU) and mod.negative_slope == _SLOPE

    if mods and isinstance(mods[0], DendriticLayer):
        layer, i = mods[0], 1
        if i < len(mods) and leaky(mods[i]):
            post_act, i = True, i + 1
    linears: list[nn.Linear] = []
    while i < len(mods):
        lin = mods[i]
        if not isinstance(lin, nn.Linear) or lin.bias is None:
            raise _not_batchable(name, f"unexpected layer {type(lin).__name__}")
        linears.append(lin)
        i += 1
        if i < len(mods):
            if not leaky(mods[i]) or i + 1 == len(mods):
                raise _not_batchable(name, f"unexpected layer {type(mods[i]).__name__}")
            i += 1
    if not linears:
        raise _not_batchable(name, "no Linear readout")
    for p in net.parameters():
        if p.dtype != torch.float32:
            raise _not_batchable(name, f"parameters of dtype {p.dtype}, only float32 is stacked")
    first = linears[0].in_features
    arch = _Arch(
        in_dim=layer.in_dim if layer is not None else first,
        n_classes=linears[-1].out_features,
        hidden=tuple(lin.out_features for lin in linears[:-1]),
        post_act=post_act,
    )
    if layer is not None:
        m = layer.n_to_resample() if layer.synaptic_resampling else 0
        arch = _Arch(
            in_dim=arch.in_dim, n_classes=arch.n_classes, hidden=arch.hidden, post_act=post_act,
            n=layer.n_neurons, d=layer.n_dendrites, k=layer.n_dendrite_inputs,
            soma=layer.soma_enabled, m=max(0, m), every=layer.steps_to_resample,
            reset=layer.resample_reset_adam,
        )
    if arch.width != first:
        raise _not_batchable(name, "the first Linear does not read the layer before it")
    return arch, layer, linears


@dataclass(frozen=True)
class _Dims:
    """The padded sizes a population's stacked tensors are laid out for."""

    in_dim: int
    n_classes: int
    n: int
    d: int
    k: int
    soma_on: bool  # some member has a soma
    soma_off: bool  # some member has none
    post_act: bool
    hidden: int
    depth: int

    @classmethod
    def of(cls, archs: Iterable[_Arch]) -> _Dims:
        a = list(archs)
        dend = [x for x in a if x.n]
        return cls(
            in_dim=a[0].in_dim,
            n_classes=a[0].n_classes,
            n=max((x.n for x in dend), default=0),
            d=max((x.d for x in dend), default=0),
            k=max((x.k for x in dend), default=0),
            soma_on=any(x.soma for x in dend),
            soma_off=any(not x.soma for x in dend),
            post_act=a[0].post_act,
            hidden=max((h for x in a for h in x.hidden), default=0),
            depth=max(len(x.hidden) for x in a),
        )

    @property
    def rows(self) -> int:
        return self.n * self.d

    @property
    def feat(self) -> int:
        if not self.n:
            return self.in_dim
        return self.rows if self.soma_off else self.n

    def covers(self, o: _Dims) -> bool:
        return (
            self.n >= o.n and self.d >= o.d and self.k >= o.k and self.hidden >= o.hidden
            and self.depth >= o.depth and self.soma_on >= o.soma_on
            and self.soma_off >= o.soma_off
        )

    def layout(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Name -> (offset, shape) of every parameter in one member's flat row."""
        shapes: list[tuple[str, tuple[int, ...]]] = []
        if self.n:
            shapes += [("dw", (self.rows, self.k)), ("db", (self.rows,))]
            if self.soma_on:
                shapes += [("sw", (self.n, self.d)), ("sb", (self.n,))]
        width = self.feat
        for j in range(self.depth):
            shapes += [(f"w{j}", (self.hidden, width)), (f"b{j}", (self.hidden,))]
            width = self.hidden
        shapes += [("wo", (self.n_classes, width)), ("bo", (self.n_classes,))]
        out, off = {}, 0
        for name, shape in shapes:
            out[name] = (off, shape)
            off += math.prod(shape)
        return out

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.layout().values())

    @property
    def stride(self) -> int:
        """Length of a member's flat row: ``numel`` rounded up to a multiple of 16.

        Triton specializes a kernel on whether each integer argument is divisible by 16; with
        rows of any length, every stack of a new size compiled the fused Adam and head again (a
        new cohort's first epoch of the 2,000-trial study took ~2.5 s longer on the H200). The
        last ``stride - numel`` entries belong to no parameter.
        """
        return -(-self.numel // 16) * 16

    @property
    def volume(self) -> int:
        """Per-member work of a step, roughly: flat parameters plus the dense dendrite matrix."""
        return self.numel + self.rows * self.in_dim

    def macs(self, n: int | None = None, d: int | None = None) -> int:
        """Multiply-adds of one example's forward pass on a grid of ``n`` neurons by ``d``
        dendrites (the stack's own by default): the dense dendrite matrix, the somas and the
        Linear layers. The compact connections, the biases and Adam are per step, not per
        example (a step of 256 examples does ~150 of these for each of Adam's)."""
        n = self.n if n is None else n
        d = self.d if d is None else d
        if not self.n:
            width, total = self.in_dim, 0
        else:
            total = n * d * self.in_dim + (n * d if self.soma_on else 0)
            width = n if self.soma_on and not self.soma_off else n * d
        for _ in range(self.depth):
            total += width * self.hidden
            width = self.hidden
        return total + width * self.n_classes


#: A fused band's dendrite rows are padded to a multiple of this (zero rows): they are the
#: leading dimension of its bf16 products' outputs, and cuBLAS runs those several times slower
#: at one that is not a multiple of 8 (one H200, K = 996, B = 256, 784 inputs: 187 rows 1.0 +
#: 1.09 ms for the two products, 192 rows 0.23 + 0.23 ms; bench/bmm_align_probe.py).
_ROW_ALIGN = 8


def _aligned(rows: int, align: int = _ROW_ALIGN) -> int:
    """``rows`` rounded up to a multiple of ``align``."""
    return -(-rows // align) * align


def executed_macs(dims: _Dims, bands: Sequence[tuple[int, int, int, int]], align: int = _ROW_ALIGN) -> int:
    """Multiply-adds of one example's forward pass (``_Dims.macs``) summed over a stack's
    members, as its step executes them: each band ``(start, stop, neurons, dendrites)`` on its
    own grid, its dendrite rows padded to a multiple of ``align`` (a fused step's bands:
    ``_ROW_ALIGN``; 1 for the plain step's one band), padding included.
    ``bench/padding_probe.py`` reports the same count."""
    return sum((b - a) * (dims.macs(n, d) + (_aligned(n * d, align) - n * d) * dims.in_dim)
               for a, b, n, d in bands)


def useful_macs(archs: Iterable[_Arch]) -> int:
    """:func:`executed_macs` of members at their own sizes, without padding."""
    return sum(n * _Dims.of([a]).macs() for a, n in Counter(archs).items())  # once an architecture


def _connection_mask(sizes: list[tuple[int, int, int]], dims: _Dims, device: torch.device) -> torch.Tensor:
    """``(K, rows, k)``: 1.0 where a member's connection is real on the padded grid, 0.0 on
    padding (its neurons, dendrites and inputs per dendrite: ``sizes``, one per member), made
    on ``device``; :func:`_region`'s ``"didx"`` part of every member, filled with ones."""
    n, d, k = torch.tensor(sizes, dtype=torch.long).reshape(-1, 3).to(device).unbind(1)
    def under(size: int, bound: torch.Tensor) -> torch.Tensor:
        return torch.arange(size, device=device) < bound.unsqueeze(1)
    real = (under(dims.n, n)[:, :, None, None] & under(dims.d, d)[:, None, :, None]
            & under(dims.k, k)[:, None, None, :])
    return real.reshape(len(sizes), dims.rows, dims.k).float()


def _region(
    t: torch.Tensor, name: str, arch: _Arch, dims: _Dims
) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """The part of a padded slot ``t`` that holds a member's tensor ``name``, and its own shape."""
    n, d = arch.n, arch.d
    if name in ("dw", "didx"):  # a dendrite's row sits on the padded (neuron, dendrite) grid
        return t.view(dims.n, dims.d, -1)[:n, :d, : arch.k], (n * d, arch.k)
    if name == "db":
        return t.view(dims.n, dims.d)[:n, :d], (n * d,)
    if name == "sw":
        return (t[:n, :d], (n, d)) if arch.soma else None
    if name == "sb":
        return (t[:n], (n,)) if arch.soma else None
    if name[1:] == "o":
        rows, first = arch.n_classes, not arch.hidden
        cols = arch.hidden[-1] if arch.hidden else arch.width
    else:
        j = int(name[1:])
        if j >= len(arch.hidden):
            return None
        rows, first = arch.hidden[j], j == 0
        cols = arch.hidden[j - 1] if j else arch.width
    if name[0] == "b":
        return t[:rows], (rows,)
    if first and arch.n and not arch.soma:  # reads dendrites, which sit on the grid
        return t.view(t.shape[0], dims.n, dims.d)[:rows, :n, :d], (rows, n * d)
    return t[:rows, :cols], (rows, cols)


@functools.cache
def bio_stackable(family: str) -> bool:
    """Whether :func:`train_population` can apply bio rules to ``family``'s members: its one
    Linear layer is the readout (hidden Linear layers train with bio rules one model at a time)."""
    fam = get_family(family)
    if fam.population != "mlp":
        return False
    with torch.random.fork_rng(devices=[]):
        _, _, linears = _parse(fam.build(**fam.resolve({})), family)
    return len(linears) == 1


def _bio_positions(dims: _Dims, arch: _Arch) -> dict[str, torch.Tensor]:
    """Where the readout's weight sits in a member's flat row, in the layer's shape."""
    off, shape = dims.layout()["wo"]
    slot = torch.arange(off, off + math.prod(shape)).view(shape)
    reg = _region(slot, "wo", arch, dims)
    assert reg is not None and off > 0  # position 0 (a dendrite weight) is BioPack's padding
    return {"wo": reg[0].reshape(reg[1])}


def _bio_role(readout: str) -> Callable[[str], str]:
    def role(name: str) -> str:
        if name == readout:
            return "wo"
        raise ValueError(f"bio rules on the hidden layer {name!r} are not stacked (the population "
                         f"stacks them on the readout alone); train this trial with train_model")
    return role


# -- members ---------------------------------------------------------------------------------
@dataclass
class _State:
    """A member's tensors in its own shapes while it is outside a stack."""

    params: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]  # empty: zeros (a member that has not trained yet)
    exp_avg_sq: dict[str, torch.Tensor]
    indices: torch.Tensor | None


@dataclass
class _Plan:
    """A member's random draws for one epoch (its data order, shifts) and when it resamples."""

    perm: torch.Tensor  # int32, (n_train,)
    events: dict[int, int]  # step -> the layer's resampling number then (its draws' counter)
    shifts: torch.Tensor | None = None  # uint8 (n_train, 2): augment="shift", in visiting order
    lr_factors: torch.Tensor | None = None  # float64 (n_steps,): the schedule's multipliers


@dataclass
class _Flight:
    """An epoch queued ahead of the one before it (:meth:`_Population._launch_ahead`)."""

    stack: _Stack
    table: torch.Tensor  # its (6, K) sums on the device
    snap: tuple[Any, ...]  # the stack's state before it (:meth:`_Stack.snapshot`)
    t0: float  # when it was queued


@dataclass(frozen=True)
class _Recipe:
    """A member's training recipe beyond lr and weight decay (train_model's keyword arguments)."""

    batch_size: int
    lr_schedule: str = "constant"
    warmup_epochs: float | None = None
    label_smoothing: float = 0.0
    augment: str = "none"
    total_steps: int = 0  # of the schedule (schedule_steps)
    warmup_steps: int = 0

    @property
    def scheduled(self) -> bool:
        return self.lr_schedule != "constant" or self.warmup_steps > 0


def _numbered(counts: torch.Tensor) -> torch.Tensor:
    """``0 .. c - 1`` for each count ``c`` of ``counts``, one run after another."""
    starts = counts.cumsum(0) - counts
    return torch.arange(int(counts.sum())) - starts.repeat_interleave(counts)


def _draw_all(draws: list[Callable[[], None]]) -> None:
    for draw in draws:
        draw()


def _make_plan(
    data_gen: torch.Generator, arch: _Arch, n: int, n_steps: int, steps0: int,
    recipe: _Recipe | None = None,
) -> _Plan:
    """Draw what train_model draws from its generator, in the same order, and say when the
    layer resamples.

    The data generator gives the epoch's order, then (``augment="shift"``) its shifts, as
    train_model draws them. A resampling's draws come from a counter (its number, see
    ``core._layers.swap_weakest``): they are made on the device at its step (``_Group.draw``).
    ``steps0`` is the member's optimizer steps before this epoch.
    """
    perm = torch.randperm(n, generator=data_gen).to(torch.int32)
    shifts = factors = None
    if recipe is not None and recipe.augment == "shift":
        shifts = torch.randint(0, 2 * MAX_SHIFT + 1, (n, 2), generator=data_gen).to(torch.uint8)
    if recipe is not None and recipe.scheduled:
        factors = torch.tensor(
            [lr_multiplier(recipe.lr_schedule, steps0 + t, recipe.total_steps, recipe.warmup_steps)
             for t in range(n_steps)], dtype=torch.float64)
    events: dict[int, int] = {}
    if arch.m > 0:  # the layer resamples after every ``every``-th step, counting from 0
        events = {t: (steps0 + t) // arch.every - 1 for t in range(1, n_steps + 1)
                  if (steps0 + t) % arch.every == 0}
    return _Plan(perm, events, shifts, factors)


#: A fused stack whose real connections fill less than this share of its padded slots has
#: Adam gather their gradient itself (``_kernels.adam_connections``); a fuller one takes a
#: dense pass over every slot.
_GATHER_BELOW = 0.5
#: The most bands a fused stack's step is split into (see :func:`_bands`).
_MAX_BANDS = 6
#: A band's fixed cost (its extra launches, smaller products), in members of the full grid.
_BAND_OVERHEAD = 16
#: The fused head's cost per padded (neuron, dendrite) slot of its power-of-2 tile, relative to
#: the dendrite products' per row (their step times at the seed space's 20 x 15 grid, one H200).
_HEAD_WEIGHT = 0.35
#: The most places where the members' band key changes that :func:`_bands` splits at.
_MAX_CUTS = 96


def _band_key(arch: _Arch) -> tuple[int, int]:
    """The order a fused stack's members are sorted in for :func:`_bands`: by the head's
    power-of-2 tile of dendrites, then by neurons (members of similar size run side by side)."""
    return _shape_key(arch.n, arch.d)


def _shape_key(n: int, d: int) -> tuple[int, int]:
    """:func:`_band_key` of a member of ``n`` neurons and ``d`` dendrites each."""
    return ((d - 1).bit_length() if d else 0, n)


def _bands(shapes: Sequence[tuple[int, int]], d: int) -> list[tuple[int, int, int, int]]:
    """Split a fused stack's members into ``(start, stop, neurons, dendrites)`` bands for its step.

    ``shapes`` are the members' (neurons, dendrites), in stack order; ``d`` the stack's padded
    dendrites. A band of consecutive members runs its dendrite products and its fused head on
    its own (neurons, dendrites) grid, its largest ``n`` by its largest ``d``: the rows a
    member does not use are padding the band skips. With the members sorted by
    :func:`_band_key` (as a stack is built), a few bands remove most of the padding of a mixed
    population. The split minimizes the products' rows (aligned, as the step pads them:
    ``_ROW_ALIGN``) plus the head's power-of-2 tile plus a
    fixed cost per band, over the points where the key changes (one band when there are too
    many such points: an unsorted stack).
    """
    K = len(shapes)
    if not K:
        return []
    keys = [_shape_key(n, dd) for n, dd in shapes]
    cuts = [i for i in range(1, K) if keys[i] != keys[i - 1]]
    if not cuts or len(cuts) > _MAX_CUTS:  # one band, on the members' own largest grid
        return [(0, K, max(n for n, _ in shapes), max(dd for _, dd in shapes))]
    pts = [0, *cuts, K]
    m = len(pts)
    # top[a][b]: the largest (n, d) from pts[a] to pts[b]
    top = [[(0, 0)] * m for _ in range(m)]
    for a in range(m - 1):
        for b in range(a + 1, m):
            seg = shapes[pts[b - 1]:pts[b]]
            top[a][b] = (max(top[a][b - 1][0], max(n for n, _ in seg)),
                         max(top[a][b - 1][1], max(dd for _, dd in seg)))
    fixed = _BAND_OVERHEAD * top[0][m - 1][0] * d

    def cost(a: int, b: int) -> float:
        n, dd = top[a][b]
        tile = (1 << (n - 1).bit_length()) * (1 << max(0, (dd - 1).bit_length()))
        return (pts[b] - pts[a]) * (_aligned(n * dd) + _HEAD_WEIGHT * tile) + fixed

    inf = float("inf")
    # best[j][b]: the cheapest split of the members before pts[b] into j bands, and where
    # its last band starts
    best = [[(inf, -1)] * m for _ in range(_MAX_BANDS + 1)]
    best[0][0] = (0.0, -1)
    for j in range(1, _MAX_BANDS + 1):
        for b in range(1, m):
            best[j][b] = min(((best[j - 1][a][0] + cost(a, b), a) for a in range(b)
                              if best[j - 1][a][0] < inf), default=(inf, -1))
    j = min(range(1, _MAX_BANDS + 1), key=lambda j: best[j][m - 1][0])
    out, b = [], m - 1
    while j:
        a = best[j][b][1]
        out.append((pts[a], pts[b], *top[a][b]))
        b, j = a, j - 1
    return out[::-1]


@dataclass(eq=False)
class _Member:
    index: int
    arch: _Arch
    seed: int
    lr: float
    weight_decay: float
    data_gen: torch.Generator
    layer_seed: int | None  # its dendritic layer's: the key of its resampling draws
    result: TrainResult
    recipe: _Recipe
    n_steps: int  # optimizer steps in one of its epochs (its batch size's)
    patch: torch.Tensor | None = None  # connectivity="local": the inputs each dendrite may read
    state: _State | None = None  # set while the member waits outside a stack
    epoch: int = 0  # epochs finished
    steps: int = 0  # optimizer steps at the last finished epoch
    plans: deque[Future[_Plan]] = field(default_factory=deque)
    plan_steps: int = 0  # steps at the start of the next plan to draw
    current: _Plan | None = None  # the plan of the epoch in progress (kept for a retry)
    next: _Plan | None = None  # the plan of the epoch launched ahead of it (_Population._launch_ahead)
    start: float = 0.0
    net: nn.Module | None = None  # the built module, which receives the trained weights
    own: dict[str, torch.Tensor] = field(default_factory=dict)
    bio: MemberBio | None = None  # its bio rules (the readout's), if its config has ``bio``
    draws: list[Callable[[], None]] = field(default_factory=list)  # its layer's, not drawn yet
    template: _Template | None = None  # built without a module: its state_dict comes from here


#: a dendritic layer's parameters by the stack's names
_LAYER_PARAMS = {"weight": "dw", "bias": "db", "soma_weight": "sw", "soma_bias": "sb"}


def _own_tensors(layer: DendriticLayer | None, linears: list[nn.Linear]) -> dict[str, torch.Tensor]:
    """A built member's parameters by the stack's names (``dw``, ``db``, ``sw``, ``sb``, ``w0``,
    ``b0``, ..., ``wo``, ``bo``)."""
    own: dict[str, torch.Tensor] = {}
    if layer is not None:
        for name in ("weight", "bias") + (("soma_weight", "soma_bias") if layer.soma_enabled else ()):
            own[_LAYER_PARAMS[name]] = getattr(layer, name)
    for j, lin in enumerate(linears):
        tag = "o" if j == len(linears) - 1 else str(j)
        own[f"w{tag}"], own[f"b{tag}"] = lin.weight, lin.bias
    return own


@dataclass(frozen=True)
class _Template:
    """What the members of one architecture share, read once from one module built with
    their arguments: members built without a module (``dendritic_simple_tensors``) take
    their layout, parameter count and ``state_dict`` form from it."""

    arch: _Arch
    n_params: int
    keys: tuple[tuple[str, str], ...]  # the module's state_dict keys, in order, with the stack's names
    metadata: Any  # the state_dict's ``_metadata`` (each module's version)

    def state_dict(self, st: _State) -> OrderedDict[str, torch.Tensor]:
        """The ``state_dict`` the member's module would give with the state ``st``: the same
        keys, order and metadata, each tensor contiguous and alone in its storage. A tensor of
        ``st`` that already is (``_Stack.states`` copies each out) becomes the state_dict's
        own, so ``st`` is the member's last state, used for nothing else."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for key, name in self.keys:
            t = st.indices if name == "indices" else st.params[name]
            assert t is not None
            alone = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            out[key] = t if alone else t.clone(memory_format=torch.contiguous_format)
        if self.metadata is not None:  # each module's {"version": ...}, a copy per state_dict
            out._metadata = OrderedDict((k, dict(v)) for k, v in self.metadata.items())  # type: ignore[attr-defined]
        return out


# -- the stacked population ---------------------------------------------------------------------
class _DendriteMatmul(torch.autograd.Function):
    """``x @ dense^T + b`` where ``dense`` holds each dendrite's weights at its inputs.

    ``dense`` lives in a flat buffer whose last element is a sink: padded connections point
    there (``flat_t``), so their gradient is that of the sink, zero. Only the real connections
    are written (``real``, see :func:`_put`); the caller keeps the buffer zero wherever no
    connection points (see ``_Stack.resample``).
    The backward is one batched product for the dense gradient, laid out ``(K, in, rows)``
    as autograd's baddbmm backward lays it out (cuBLAS is a third faster on it than on the
    other orientation, measured on an H100), and a flat ``take`` of the connected entries
    (``flat_t``: the same connections in that layout).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, flat_t: torch.Tensor,
        buf: torch.Tensor, real: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        K, rows = b.shape
        _put(buf, w, real)
        dense = buf[: K * rows * x.shape[2]].view(K, rows, -1)
        ctx.save_for_backward(x, flat_t)
        ctx.shape = (K, rows, dense.shape[2])
        if buf.dtype == torch.float32:
            return torch.baddbmm(b.unsqueeze(1), x, dense.transpose(1, 2))
        # bf16 operands, float32 accumulation inside the product; the bias is added in float32
        return torch.bmm(x, dense.transpose(1, 2)).float().add_(b.unsqueeze(1))

    @staticmethod
    def backward(ctx: Any, gz: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, flat_t = ctx.saved_tensors
        K, rows, n_in = ctx.shape
        gd = gz.new_empty(K * n_in * rows + 1, dtype=x.dtype)
        gd[-1:].zero_()
        torch.bmm(x.transpose(1, 2), gz.to(x.dtype), out=gd[:-1].view(K, n_in, rows))
        return None, gd.take(flat_t).float(), gz.sum(1), None, None, None


def _machine_error(exc: Exception) -> bool:
    """Whether ``exc`` says that Triton cannot build or run its kernels on this machine (its
    compiler, a missing toolchain or driver, an unsupported GPU) rather than that our code
    called it wrongly: Triton's own errors, any error raised inside Triton's code (Triton 3.8
    asserts that it finds libcuda), and the runtime, OS, import and subprocess errors its
    compilation raises."""
    if any(t.__module__.split(".")[0] == "triton" for t in type(exc).__mro__):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0] == "triton":
        return True  # raised in Triton's own code: its driver asserts that libcuda is found
    return isinstance(exc, (RuntimeError, OSError, ImportError, subprocess.SubprocessError))


def _without_triton(exc: Exception, kernel: str) -> None:
    """After a fused Triton kernel failed: re-raise what must not be hidden, else switch the
    kernels off for the process (the caller then takes its PyTorch path).

    Re-raised: a failure inside a CUDA graph capture; one while compiling ahead
    (:meth:`_Stack.compile_ahead`, whose step meets it again); running out of memory,
    which the population answers by halving (Triton stays on); and anything that is not the
    machine's (:func:`_machine_error`: a TypeError or an AssertionError is a bug to see, not
    a reason to train every later population on the slower path).
    """
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if (capturing or _kernels.ahead() or isinstance(exc, torch.OutOfMemoryError)
            or not _machine_error(exc)):
        raise exc
    logger.warning("train_population: fused Triton %s unavailable (%s); using PyTorch", kernel, exc)
    _kernels.disable()


def _put(buf: torch.Tensor, w: torch.Tensor, real: tuple[torch.Tensor, ...]) -> None:
    """Write the real connections' weights ``w`` (K, rows, k) into the dense buffer ``buf``.

    ``real`` (``_Stack.real``) holds, per real connection, its position in ``buf`` (kept
    up to date by ``_Stack._index``), its member and its column among the member's rows * k.
    Padded entries are skipped: writing them all to the sink made one address take most of
    the writes, which serialized the scatter (at the seed space's padding, ~2 ms of a ~7 ms
    bf16 step on an H200).
    """
    at, member, col = real
    K = w.shape[0]
    buf.index_put_((at,), w.reshape(K, -1)[member, col].to(buf.dtype))


class _Stack:
    """The population's tensors: one row per member, each padded to ``dims``.

    Parameters and Adam's moments live in flat ``(K, P)`` buffers; ``views`` are the
    per-parameter leaves the forward pass differentiates. Dendritic connections live in
    ``idx`` with ``kmask`` marking the real ones.
    """

    def __init__(
        self, dims: _Dims, members: list[_Member], p: torch.Tensor, m: torch.Tensor,
        v: torch.Tensor, idx: torch.Tensor | None, kmask: torch.Tensor | None, steps: torch.Tensor,
        lowp: torch.dtype = torch.float32,
    ) -> None:
        self.dims, self.members = dims, members
        self.lowp = lowp  # dtype of the dense dendrite matrix and of the inputs it multiplies
        self.p, self.m, self.v, self.idx, self.kmask, self.steps = p, m, v, idx, kmask, steps
        self.K = len(members)
        dev = p.device
        self.layout = dims.layout()
        self.views: dict[str, torch.Tensor] = {}
        self.plain: dict[str, torch.Tensor] = {}
        for name, (off, shape) in self.layout.items():
            size = math.prod(shape)
            self.plain[name] = p[:, off : off + size].view(self.K, *shape)
            self.views[name] = self.plain[name].detach().requires_grad_(True)
        f64 = dict(dtype=torch.float64, device=dev)
        self.base_lr = torch.tensor([x.lr for x in members], **f64)
        self.lr = self.base_lr.clone()  # this step's: the schedule rewrites it in place
        self.scheduled = any(x.recipe.scheduled for x in members)
        self.smooth = torch.tensor([x.recipe.label_smoothing for x in members], device=dev)
        self.any_smooth = any(x.recipe.label_smoothing for x in members)
        self.shift = any(x.recipe.augment == "shift" for x in members)
        self.wd = torch.tensor([x.weight_decay for x in members], device=dev).unsqueeze(1)
        self.any_wd = any(x.weight_decay != 0 for x in members)
        self.soma = torch.tensor([x.arch.soma for x in members], device=dev)
        depth = [len(x.arch.hidden) for x in members]
        self.active = torch.tensor([[j < h for j in range(dims.depth)] for h in depth], device=dev)
        self.full = [all(j < h for h in depth) for j in range(dims.depth)]
        self.flat_t: torch.Tensor | None = None
        # where each band's block starts, in the dense gradient and in the dense dendrite
        # matrix alike (a band's members x rows x inputs in both)
        self.grad_at: list[int] = []
        self.grad_size = 0  # the dense gradient's length, its sink excluded
        self._band: tuple[torch.Tensor, ...] = ()  # per real connection: its offsets in the two layouts
        self.buf: torch.Tensor | None = None
        self.real: tuple[torch.Tensor, ...] = ()
        self._real_at: torch.Tensor | None = None  # the real connections among K * rows * k
        self.bio = (BioPack(self, functools.partial(_bio_positions, dims), dims.n_classes)
                    if any(x.bio is not None for x in members) else None)
        # dendrites -> soma -> readout (dendritic_simple): the fused Triton head on CUDA, unless
        # bio rules must act between backward and Adam
        self.fused = bool(
            dims.n and dims.soma_on and not dims.soma_off and not dims.depth and not dims.post_act
            and self.K and self.bio is None and _kernels.available(dev)
        )
        # the fused step's bands of members (see _bands); one band of the whole grid otherwise
        self.bands = (_bands([(x.arch.n, x.arch.d) for x in members], dims.d) if self.fused
                      else [(0, self.K, dims.n, dims.d)])
        # a band's rows in the dense buffer and gradient: aligned for the fused step's products
        # (_ROW_ALIGN); the plain step's one band is the (K, rows, in) grid itself
        self.align = _ROW_ALIGN if self.fused else 1
        # each member's neurons, dendrites and inputs, where the fused step's Adam gathers the
        # connections' gradient itself and skips the padded slots: a stack mostly padding (a
        # real slot's gather costs several times a dense pass over one; rows padded to a
        # multiple of 4 keep each row's pointer 16-byte aligned, as Triton compiles for)
        own = [x.arch.n * x.arch.d * x.arch.k for x in members]  # each member's connections
        self.sizes = (F.pad(torch.tensor([[x.arch.n for x in members], [x.arch.d for x in members],
                                          [x.arch.k for x in members]], dtype=torch.int32),
                            (0, -self.K % 4)).to(dev)
                      if self.fused and sum(own) < _GATHER_BELOW * self.K * dims.rows * dims.k else None)
        # the most connections a member has: the connections' Adam grid covers that many per member
        self._slots = max(own, default=0)
        if dims.n and self.K:
            assert kmask is not None
            # large enough for the bands' aligned blocks and for the whole grid (_unband)
            rows = max(self.K * dims.rows, sum((b - a) * self._rows(n, d) for a, b, n, d in self.bands))
            self.buf = torch.zeros(rows * dims.in_dim + 1, device=dev, dtype=lowp)
            # the real connections (resampling moves them, never adds or drops one)
            self._real_at = (kmask.reshape(-1) > 0).nonzero().squeeze(1)
            self._index()
        self.fast_adam = bool(self.K and _kernels.available(dev))
        # resamplings captured as CUDA graphs (_Population._resample), by their groups' keys;
        # they read and write this stack's tensors, so they live and die with it
        self.resample_graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, list[_Group]]] = {}
        self.resample_seen: set[tuple[Any, ...]] = set()
        self.resample_pool: Any = None  # their shared memory pool (they never run at once)
        # the epoch's evaluation captured as a CUDA graph (_Population._evaluate), with the
        # tensors its replays write; captured at the stack's second epoch
        self.eval_graph: tuple[torch.cuda.CUDAGraph, list[torch.Tensor]] | None = None
        self.evaluated = False  # whether this stack was evaluated once (eagerly)
        self.offsets = {name: self.layout[name][0] for name in ("db", "sw", "sb", "wo", "bo")
                        if name in self.layout}
        self.offsets["C"] = dims.n_classes

    def _rows(self, n: int, d: int) -> int:
        """A band of ``n`` neurons by ``d`` dendrites: its rows in the dense buffer and gradient."""
        return _aligned(n * d, self.align)

    def flush(self) -> None:
        """The bio rules' state back into the members' modules, before the stack changes."""
        if self.bio is not None:
            self.bio.flush([m.steps for m in self.members])

    def _index(self) -> None:
        """Flat positions of the connections in the dense buffer (``real``) and in the dense
        gradient (``flat_t``; padding: the sink), both laid out band by band (``bands``): a
        band's members as ``(members, band rows, in)`` in the buffer and ``(members, in, band
        rows)`` in the gradient, a member's dendrite (i, j) being the band grid's row
        ``i * dendrites + j``. A band's rows are aligned (:meth:`_rows`): the rows past its
        grid are zero in the buffer and never read in the gradient. One band of the whole grid,
        unaligned, is the ``(K, rows, in)`` and ``(K, in, rows)`` layouts.

        Made with the stack, where every padded slot points at the sink for good; after a
        resampling only the real connections' entries are computed again, in place (a
        captured training step reads these very tensors): the (K, rows, k) expressions over
        every padded slot cost ~1 ms an event at K = 996 of the seed space.
        """
        assert self.idx is not None and self.buf is not None and self._real_at is not None
        R, D, n_in = self.dims.rows, self.dims.d, self.dims.in_dim
        if self.flat_t is None:
            cols = R * self.dims.k
            member, col = self._real_at // cols, self._real_at % cols
            self.real = (torch.empty_like(self._real_at), member, col)
            row = col // self.dims.k  # on the stack's (n, d) grid
            # each member's band: where its blocks start (the same in both layouts), its place
            # in the band, the band's rows and dendrites
            base, local, rows, dends, at = [], [], [], [], 0
            self.grad_at = []
            for start, stop, n, d in self.bands:
                self.grad_at.append(at)
                base += [at] * (stop - start)
                local += range(stop - start)
                rows += [self._rows(n, d)] * (stop - start)
                dends += [d] * (stop - start)
                at += (stop - start) * n_in * self._rows(n, d)
            self.grad_size = at
            dev = self.idx.device
            base_t, local_t, rows_t, dends_t = (
                torch.tensor(v, dtype=torch.long, device=dev).index_select(0, member)
                for v in (base, local, rows, dends))
            band_row = (row // D) * dends_t + row % D
            # per real connection: its position in each layout, less its input's share
            self._band = (base_t + (local_t * rows_t + band_row) * n_in,
                          base_t + local_t * n_in * rows_t + band_row, rows_t)
            self.flat_t = torch.full_like(self.idx, at)
        inputs = self.idx.view(-1).index_select(0, self._real_at)
        dense_base, grad_base, rows_t = self._band
        torch.add(dense_base, inputs, out=self.real[0])
        self.flat_t.view(-1).index_copy_(0, self._real_at, grad_base + inputs * rows_t)

    @property
    def whole_grid(self) -> bool:
        """Whether the stack runs as one band of its whole (neurons, dendrites) grid (a fused
        one's rows may still be aligned past the grid's: :meth:`_rows`)."""
        return self.bands == [(0, self.K, self.dims.n, self.dims.d)]

    def _unband(self) -> None:
        """One band of the whole grid (the plain path's layout), indexed anew."""
        self.bands = [(0, self.K, self.dims.n, self.dims.d)]
        self.align = 1
        self.resample_graphs.clear()  # they write the index tensors replaced below
        self.eval_graph = None  # it reads the bands' layout
        if self.buf is not None:
            self.buf.zero_()  # the connections move: their old places must read zero
            self.flat_t = None
            self._index()

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def build(
        cls, dims: _Dims, members: list[_Member], states: list[_State], device: torch.device,
        lowp: torch.dtype = torch.float32,
    ) -> _Stack:
        """Stack members' own tensors (on the CPU, a newcomer's connections maybe on ``device``)
        into padded rows on ``device``."""
        K, P = len(states), dims.stride
        layout = dims.layout()
        if K and all(_Dims.of([a]) == dims for a in {m.arch for m in members}):  # no padding: plain stacking
            bufs = []
            for ds in ([st.params for st in states], [st.exp_avg for st in states],
                       [st.exp_avg_sq for st in states]):
                if not any(ds):  # moments of members that have not trained yet
                    bufs.append(torch.zeros(K, P, device=device))
                    continue
                ds = [d or {k: torch.zeros_like(v) for k, v in st.params.items()}
                      for d, st in zip(ds, states, strict=True)]
                bufs.append(F.pad(torch.cat([torch.stack([d[name] for d in ds]).reshape(K, -1)
                                             for name in layout], 1), (0, P - dims.numel)))
            idx = kmask = None
            if dims.n:  # (connections picked on the device are there: _draw_on_device)
                on_cpu = all(st.indices.device.type == "cpu" for st in states)  # type: ignore[union-attr]
                idx = torch.stack([st.indices if on_cpu else st.indices.to(device)  # type: ignore[misc, union-attr]
                                   for st in states])
                kmask = torch.ones(K, dims.rows, dims.k, device=device)
            steps = torch.tensor([float(x.steps) for x in members], dtype=torch.float64)
            moved = [t.to(device) if t is not None else None for t in (*bufs, idx, kmask, steps)]
            return cls(dims, members, *moved, lowp=lowp)  # type: ignore[arg-type, misc]
        # Padded rows are written on the CPU and moved at once; what is zeros or a mask is made
        # on the device: newcomers' moments (a whole cohort's) and the real connections' mask.
        # For a cohort of the seed space (K = 996, rows of 76,736) each such CPU buffer was
        # ~300 MB zeroed, paged in and copied over (bench/NOTES_population.md, v19).
        moments = any(st.exp_avg or st.exp_avg_sq for st in states)
        # (without moments the two buffers are never written below: each member's are empty)
        bufs = [torch.zeros(K, P)] + [torch.zeros(K, P, device=None if moments else device) for _ in range(2)]
        idx = kmask = None
        if dims.n:  # on the device where some connections were picked there (_draw_on_device)
            on_cpu = all(st.indices is None or st.indices.device.type == "cpu" for st in states)
            idx = torch.zeros(K, dims.rows, dims.k, dtype=torch.long, device="cpu" if on_cpu else device)
            sizes = [(m.arch.n, m.arch.d, m.arch.k) if st.indices is not None else (0, 0, 0)
                     for m, st in zip(members, states, strict=True)]
            kmask = _connection_mask(sizes, dims, device)
        for i, (mem, st) in enumerate(zip(members, states, strict=True)):
            for name, (off, shape) in layout.items():
                for buf, src in zip(bufs, (st.params, st.exp_avg, st.exp_avg_sq), strict=True):
                    if name not in src:  # moments not kept yet: the buffer's zeros
                        continue
                    reg = _region(buf[i, off : off + math.prod(shape)].view(shape), name, mem.arch, dims)
                    if reg is not None:
                        reg[0].copy_(src[name].reshape(reg[0].shape))
            if idx is not None and st.indices is not None:
                reg = _region(idx[i], "didx", mem.arch, dims)
                assert reg is not None
                reg[0].copy_(st.indices.reshape(reg[0].shape))
        steps = torch.tensor([float(x.steps) for x in members], dtype=torch.float64)
        moved = [t.to(device) if t is not None else None for t in (*bufs, idx, kmask, steps)]
        return cls(dims, members, *moved, lowp=lowp)  # type: ignore[arg-type, misc]

    def states(self, rows: list[int], moments: bool = True, pinned: _PinnedBuffers | None = None) -> list[_State]:
        """Rows back in the members' own shapes, on the CPU (one transfer per buffer). With
        ``pinned``, through a waiting pinned buffer that holds them all, if one does (the
        members' own tensors are copied out of it below in any case)."""
        if not rows:
            return []
        self.flush()
        r = torch.tensor(rows, dtype=torch.long, device=self.p.device)
        picked = [t.index_select(0, r) for t in ((self.p, self.m, self.v) if moments else (self.p,))]
        if self.idx is not None:
            picked.append(self.idx.index_select(0, r))
        through = pinned.try_take(sum(_padded_bytes(t) for t in picked)) if pinned is not None else None
        try:
            if through is None:
                back = [t.cpu() for t in picked]
            else:  # one pinned transfer each, no fresh pageable memory to fault in
                back, at = [], 0
                for t in picked:
                    back.append(through[at : at + t.numel() * t.element_size()].view(t.dtype).view(t.shape))
                    back[-1].copy_(t)
                    at += _padded_bytes(t)
            return self._own_states(rows, back[: len(back) - (self.idx is not None)],
                                    back[-1] if self.idx is not None else None)
        finally:
            if through is not None:
                assert pinned is not None
                pinned.give(through)

    def _own_states(self, rows: list[int], bufs: list[torch.Tensor], idx: torch.Tensor | None) -> list[_State]:
        """:meth:`states` from the rows read back: ``bufs`` of ``p`` (and ``m``, ``v``), ``idx``'s."""
        # A member of the stack's own sizes with no hidden layer (no padding) has each tensor
        # in its whole slot: viewed in its own shape once for all rows and copied out row by
        # row. At K = 1,024 the per-member regions below took ~0.18 s of the 0.24 s the
        # members' weights took to keep.
        whole: dict[str, list[torch.Tensor]] | None = None
        unpadded: dict[_Arch, bool] = {}
        out = []
        for j, i in enumerate(rows):
            arch = self.members[i].arch
            if arch not in unpadded:
                unpadded[arch] = not arch.hidden and _Dims.of([arch]) == self.dims
            if unpadded[arch]:
                if whole is None:
                    whole = self._whole_views(bufs, arch)
                params, exp_avg, exp_avg_sq = ([{name: views[b][j].clone() for name, views in whole.items()}
                                                for b in range(len(bufs))] + [{}, {}])[:3]
                out.append(_State(params, exp_avg, exp_avg_sq,
                                  idx[j].clone() if idx is not None and arch.n else None))
                continue
            parts: list[dict[str, torch.Tensor]] = [{}, {}, {}]
            for name, (off, shape) in self.layout.items():
                for d, buf in zip(parts, bufs, strict=False):
                    reg = _region(buf[j, off : off + math.prod(shape)].view(shape), name, arch, self.dims)
                    if reg is not None:
                        d[name] = reg[0].reshape(reg[1]).clone()
            indices = None
            if idx is not None and arch.n:
                reg = _region(idx[j], "didx", arch, self.dims)
                assert reg is not None
                indices = reg[0].reshape(reg[1]).clone()
            out.append(_State(parts[0], parts[1], parts[2], indices))
        return out

    def _whole_views(self, bufs: list[torch.Tensor], arch: _Arch) -> dict[str, list[torch.Tensor]]:
        """Each tensor of ``arch``, a member without padding, as ``(rows, *own shape)`` views of
        the rows ``bufs`` (one per buffer)."""
        views = {}
        for name, (off, shape) in self.layout.items():
            reg = _region(torch.empty(shape, device="meta"), name, arch, self.dims)
            if reg is not None:
                assert math.prod(reg[1]) == math.prod(shape), (name, shape, reg[1])
                views[name] = [buf[:, off : off + math.prod(shape)].view(len(buf), *reg[1]) for buf in bufs]
        return views

    def select(self, rows: list[int]) -> _Stack:
        if rows == list(range(self.K)):
            return self
        self.flush()
        r = torch.tensor(rows, dtype=torch.long, device=self.p.device)
        pick = [t.index_select(0, r) if t is not None else None
                for t in (self.p, self.m, self.v, self.idx, self.kmask, self.steps)]
        return _Stack(self.dims, [self.members[i] for i in rows], *pick, lowp=self.lowp)  # type: ignore[arg-type, misc]

    def cat(self, other: _Stack) -> _Stack:
        if not self.K:
            return other
        self.flush()
        other.flush()
        both = [torch.cat([a, b]) if a is not None and b is not None else None
                for a, b in zip((self.p, self.m, self.v, self.idx, self.kmask, self.steps),
                                (other.p, other.m, other.v, other.idx, other.kmask, other.steps),
                                strict=True)]
        return _Stack(self.dims, self.members + other.members, *both, lowp=self.lowp)  # type: ignore[arg-type, misc]

    def snapshot(self) -> tuple[Any, ...]:
        return (*(t.clone() if t is not None else None
                  for t in (self.p, self.m, self.v, self.idx, self.steps)),
                self.bio.snapshot() if self.bio is not None else None)

    @torch.no_grad()
    def restore(self, snap: tuple[Any, ...]) -> None:
        for t, s in zip((self.p, self.m, self.v, self.idx, self.steps), snap[:5], strict=True):
            if t is not None and s is not None:
                t.copy_(s)
        if self.bio is not None and snap[5] is not None:
            self.bio.restore(snap[5])
        if self.buf is not None:
            self.buf.zero_()
            self._index()

    @property
    def macs(self) -> int:
        """Multiply-adds of one example's forward pass, as executed (:func:`executed_macs`)."""
        return executed_macs(self.dims, self.bands, self.align)

    @functools.cached_property
    def useful_macs(self) -> int:
        """:attr:`macs` of the members' own sizes, without padding (computed once)."""
        return useful_macs(m.arch for m in self.members)

    def real_mask(self) -> torch.Tensor:
        """True where a flat parameter entry belongs to its member (padding is False)."""
        mask = torch.zeros(self.p.shape, dtype=torch.bool)
        for i, mem in enumerate(self.members):
            for name, (off, shape) in self.layout.items():
                reg = _region(mask[i, off : off + math.prod(shape)].view(shape), name, mem.arch, self.dims)
                if reg is not None:
                    reg[0].fill_(True)
        return mask.to(self.p.device)

    # -- forward ----------------------------------------------------------------------------
    @torch.no_grad()
    def _dense(self) -> torch.Tensor:
        """The current dense dendrite matrices, written into the buffer; returned as the whole
        grid's ``(K, rows, in_dim)`` (the plain step's layout; a fused stack's bands are
        :meth:`_band_dense`'s views of the same buffer)."""
        assert self.buf is not None
        _put(self.buf, self.plain["dw"], self.real)
        dims = self.dims
        return self.buf[: self.K * dims.rows * dims.in_dim].view(self.K, dims.rows, dims.in_dim)

    def _band_bias(self, band: int) -> torch.Tensor:
        """Band ``band``'s dendrite biases on its own grid, ``(members, aligned band rows)``
        (:meth:`_rows`; zero past the grid)."""
        a, b, n, d = self.bands[band]
        bias = self.plain["db"].view(self.K, self.dims.n, self.dims.d)[a:b, :n, :d].reshape(b - a, n * d)
        return F.pad(bias, (0, self._rows(n, d) - n * d))

    def _band_dense(self, band: int) -> torch.Tensor:
        """Band ``band``'s dense matrices, ``(members, aligned band rows, in_dim)`` (:meth:`_rows`;
        the rows past the band's grid are zero), contiguous (a view of the buffer that
        :meth:`_dense` writes)."""
        assert self.buf is not None
        a, b, n, d = self.bands[band]
        rows = self._rows(n, d)
        at, size = self.grad_at[band], (b - a) * rows * self.dims.in_dim
        return self.buf[at : at + size].view(b - a, rows, self.dims.in_dim)

    @staticmethod
    def _first(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, shared: bool) -> torch.Tensor:
        """``x @ w^T + b`` per member of ``w`` (members, rows, in); a shared ``x`` (evaluation)
        is one large product."""
        if not shared:
            return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
        K, rows = w.shape[:2]
        z = x @ w.reshape(K * rows, -1).t()
        return z.view(len(x), K, rows).transpose(0, 1) + b.unsqueeze(1)

    @staticmethod
    def _soma(h: torch.Tensor, sw: torch.Tensor, sb: torch.Tensor, n: int, d: int) -> torch.Tensor:
        """The somas of ``n`` neurons from their dendrites' activations ``h`` (K, B, n * d)."""
        K, B = h.shape[:2]
        s = (h.reshape(K, B, n, d) * sw.unsqueeze(1)).sum(-1)
        return F.leaky_relu(s + sb.unsqueeze(1), _SLOPE)

    def logits(self, x: torch.Tensor, shared: bool, dense: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs ``(K, batch, classes)`` for member batches ``x`` (K, B, in) or one shared ``x``."""
        dims, P = self.dims, self.views
        if dims.n:
            if shared:
                z = self._first(x, self._dense() if dense is None else dense, P["db"], True)
            else:
                assert self.flat_t is not None and self.buf is not None
                z = _DendriteMatmul.apply(x, P["dw"], P["db"], self.flat_t, self.buf, self.real)
            h = F.leaky_relu(z, _SLOPE)
            if dims.soma_on:
                s = self._soma(h, P["sw"], P["sb"], dims.n, dims.d)
                if dims.soma_off:
                    s = F.pad(s, (0, dims.rows - dims.n))
                    h = torch.where(self.soma[:, None, None], s, h)
                else:
                    h = s
            if dims.post_act:
                h = F.leaky_relu(h, _SLOPE)
            start = 0
        else:
            h = F.leaky_relu(self._first(x, P["w0"], P["b0"], shared), _SLOPE)
            start = 1
        for j in range(start, dims.depth):
            y = F.leaky_relu(torch.baddbmm(P[f"b{j}"].unsqueeze(1), h, P[f"w{j}"].transpose(1, 2)), _SLOPE)
            h = y if self.full[j] else torch.where(self.active[:, j, None, None], y, h)
        return torch.baddbmm(P["bo"].unsqueeze(1), h, P["wo"].transpose(1, 2))

    # -- training ---------------------------------------------------------------------------
    def train_step(self, xb: torch.Tensor, yb: torch.Tensor,
                   steps: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward, bio rules and Adam for every member; returns (mean losses, correct
        counts). ``steps`` are the members' optimizer step counts once this step is taken (read
        by the bio rules only)."""
        if self.fused:
            return self._train_step_fused(xb, yb)
        out = self.logits(xb, shared=False)
        if self.bio is not None:
            self.bio.observe(out)  # before weight splitting, as a lone trial's hooks run
            out = self.bio.split(out)
        K, B, C = out.shape
        if self.any_smooth:
            # cross_entropy(label_smoothing=e): (1 - e) * NLL + e * mean over classes of -log p
            logp = F.log_softmax(out, 2)
            nll = -logp.gather(2, yb.unsqueeze(2)).squeeze(2).mean(1)
            uniform = -logp.sum(2).mean(1)
            loss = (1 - self.smooth) * nll + uniform * (self.smooth / C)
        else:
            ce = F.cross_entropy(out.reshape(K * B, C), yb.reshape(-1), reduction="none")
            loss = ce.view(K, B).mean(1)
        leaves = list(self.views.values())
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
        with torch.no_grad():
            g = F.pad(torch.cat([
                (gr if gr is not None else torch.zeros_like(lf)).reshape(K, -1)
                for gr, lf in zip(grads, leaves, strict=True)
            ], dim=1), (0, self.p.shape[1] - self.dims.numel))
            if self.bio is not None:
                self.bio.after_backward(g, self.p)
            self._adam(g)
            if self.bio is not None:
                assert steps is not None
                self.bio.after_step(self.p, steps)
            correct = (out.argmax(2) == yb).sum(1)
        return loss.detach(), correct

    @torch.no_grad()
    def _train_step_fused(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """train_step without autograd: the dendrite product, the fused head, the weight gradient.

        The same arithmetic as the autograd path (its sums in another order): ``z`` from the
        dense dendrite matrix, then :func:`core._kernels.soma_head` for the loss, the counts and
        every gradient but the dendrites', which is the batched product of the inputs with
        ``dL/dz`` read back at the connections (as ``_DendriteMatmul.backward`` does). Each
        band of members (``bands``) runs these on its own (neurons, dendrites) grid, laid out
        band by band in the dense buffer and the gradient (:meth:`_index`).
        """
        dims, K = self.dims, self.K
        assert self.flat_t is not None
        self._dense()
        lowp = self.lowp != torch.float32
        D, n_in = dims.d, dims.in_dim
        gd = xb.new_empty(self.grad_size + 1)
        gd[-1:].zero_()
        # the gradient from db on: db, sw, sb, wo, bo and the row's tail, zero past a band's
        # neurons; the dendrite weights' too, unless Adam reads it from gd itself (sizes)
        gather = self.sizes is not None
        db = self.layout["db"][0]
        first = db if gather else 0
        g = torch.empty(K, self.p.shape[1] - first, device=self.p.device)
        g[:, db - first :].zero_()
        views = {name: g[:, off - first : off - first + math.prod(shape)].view(K, *shape)
                 for name, (off, shape) in self.layout.items() if off >= first}
        views["db"] = views["db"].view(K, dims.n, D)
        losses, rights = [], []
        for band, ((a, b, n, d), at) in enumerate(zip(self.bands, self.grad_at, strict=True)):
            R, x = self._rows(n, d), xb[a:b]
            w = self._band_dense(band).transpose(1, 2)  # the band's own (n, d) grid of rows, aligned
            if lowp:  # the head adds the bias to the product in float32, as .float().add_(db) did
                z = torch.bmm(x, w)
            else:
                z = torch.baddbmm(self._band_bias(band).unsqueeze(1), x, w)
            try:
                loss, right, gz, gsw, gsb, gwo, gbo, gdb = _kernels.soma_head(
                    z, self.p, self.offsets, n, d, yb, self.smooth, add_bias=lowp,
                    grad_dtype=xb.dtype, n_stored=dims.n, first=a, d_stored=D)
            except Exception as exc:  # a Triton that cannot build the kernel here: the plain path
                _without_triton(exc, "head")
                self.fused = False
                self._unband()
                with torch.enable_grad():
                    return self.train_step(xb, yb)
            torch.bmm(x.transpose(1, 2), gz, out=gd[at : at + (b - a) * n_in * R].view(b - a, n_in, R))
            views["db"][a:b, :n, :d].copy_(gdb.view(b - a, n, d))
            views["sw"][a:b, :n, :d].copy_(gsw)
            views["sb"][a:b, :n].copy_(gsb)
            views["wo"][a:b, :, :n].copy_(gwo)
            views["bo"][a:b].copy_(gbo)
            losses.append(loss)
            rights.append(right)
        if not gather:  # a dense pass: the take of every slot (padding reads the sink)
            views["dw"].view(K, -1).copy_(gd.take(self.flat_t).view(K, -1))
        loss = losses[0] if len(losses) == 1 else torch.cat(losses)
        correct = rights[0] if len(rights) == 1 else torch.cat(rights)
        self._adam(g, gd if gather else None)
        return loss, correct

    def compile_ahead(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Compile the fused step's Triton kernels for this stack all at once, in threads
        (:func:`core._kernels.compiling_ahead`), before its first step: that step's launches
        compiled them one after another, a head per band and both Adams, ~1.3 s each from a
        cold cache. The step is traced on the first example of the batch ``xb`` (K, B, in),
        ``yb`` (K, B), launching nothing of Triton's and changing nothing: the dense matrix is
        written from the weights as the step writes it, Adam's step count stays. The first
        resampling's scores kernel (``core._kernels.input_scores``) is compiled with them. A
        kernel that cannot be built raises here, and again where it is launched, which falls
        back as before."""
        if not (self.fused and self.fast_adam):
            return
        with _kernels.compiling_ahead() as on:
            if on:
                self._train_step_fused(xb[:, :1], yb[:, :1])  # (the evaluation runs its heads' kernels)
                if any(mem.arch.m for mem in self.members) and int32_scores(self.dims.in_dim):
                    _kernels.input_scores(torch.zeros(1, dtype=torch.long, device=xb.device), self.dims.in_dim)

    @torch.no_grad()
    def _adam(self, g: torch.Tensor, gd: torch.Tensor | None = None) -> None:
        """torch.optim.Adam's update, with per-member learning rate, decay and step count.

        ``g`` is the gradient of every column of the rows; with ``gd`` (the fused step), of the
        columns after the dendrite weights, whose gradient is read from the dense gradient
        ``gd`` at the connections (``flat_t``) by the same kernel that updates them.
        """
        if not _kernels.ahead():  # compile_ahead's trace changes nothing
            self.steps += 1
        bc1 = 1 - torch.pow(_BETA1, self.steps)
        step_size = (self.lr / bc1).float().unsqueeze(1)
        bc2_sqrt = torch.sqrt(1 - torch.pow(_BETA2, self.steps)).float().unsqueeze(1)
        wd = self.wd.view(-1) if self.any_wd else None
        lo = self.p.shape[1] - g.shape[1]  # the columns g starts at
        done = 0  # the columns updated before a kernel failed
        if self.fast_adam:  # one Triton pass over the rows (CUDA), the same operations
            try:
                if gd is not None:
                    assert self.flat_t is not None and self.sizes is not None
                    _kernels.adam_connections(self.p, self.m, self.v, gd, self.flat_t, self.sizes,
                                              self.dims.d, step_size.view(-1), bc2_sqrt.view(-1), wd,
                                              _BETA1, _BETA2, _EPS, slots=self._slots)
                    done = lo
                _kernels.adam_rows(self.p, self.m, self.v, g, step_size.view(-1), bc2_sqrt.view(-1),
                                   wd, _BETA1, _BETA2, _EPS, col0=lo)
                return
            except Exception as exc:  # a Triton that cannot build the kernel here: PyTorch's ops
                _without_triton(exc, "Adam")
                self.fast_adam = False
        if gd is not None and not done:  # the connections' gradient, read back as the plain path does
            assert self.flat_t is not None
            g = torch.cat([gd.take(self.flat_t).view(self.K, -1).float(), g], 1)
        p, m, v = (t[:, done:] for t in (self.p, self.m, self.v))
        if self.any_wd:
            g = torch.addcmul(g, self.wd, p)
        m.lerp_(g, 1 - _BETA1)
        v.mul_(_BETA2).addcmul_(g, g, value=1 - _BETA2)
        denom = (v.sqrt() / bc2_sqrt).add_(_EPS)
        p.sub_((m / denom).mul_(step_size))

    @torch.no_grad()
    def resample(self, groups: list[_Group]) -> None:
        """DendriticLayer.resample for the members due now, one batched pass per group.

        The members due at a step are grouped by a power-of-2 range of their inputs per
        dendrite (``_stage``: a few groups where there were as many as (inputs, swaps) pairs,
        156 at K = 996 of the seed space). Each member's rows are padded to its group's
        largest inputs and swaps per dendrite: its padded slots weigh ``inf`` (never the
        weakest), so the stable sort of :func:`weakest_slots` puts its own slots first, in the
        order a lone layer finds them, and its draws (:meth:`_Group.draw`) are its lone
        layer's, best first; the columns past its own swaps write back what was there.
        """
        assert self.idx is not None
        off, shape = self.layout["dw"]
        size = math.prod(shape)
        views = [t[:, off : off + size].view(self.K, *shape) for t in (self.p, self.m, self.v)]
        for grp in groups:
            r, K_, M_ = grp.rows, grp.kmax, grp.mmax
            dev = r.device
            cols = [t[:, :, :K_] for t in (*views, self.idx)]  # the first K_ slots, as views
            w = cols[0][r]
            pad = torch.arange(K_, device=dev) >= grp.k.view(-1, 1, 1)  # (g, 1, K_)
            weakest = weakest_slots(w.abs().masked_fill_(pad, math.inf), M_)
            ind = cols[3][r]
            # a padded slot's index stands in for the row's first input, which is in use anyway
            used = torch.where(pad, ind[..., :1], ind)
            own = torch.arange(M_, device=dev) < grp.m.view(-1, 1, 1)  # (g, 1, M_): its own swaps
            new, fresh = grp.draw(used, self.dims.d, self.dims.in_dim)
            ind.scatter_(2, weakest, torch.where(own, new, ind.gather(2, weakest)))
            cols[3][r] = ind
            w.scatter_(2, weakest, torch.where(own, fresh, w.gather(2, weakest)))
            cols[0][r] = w
            zero = own if grp.reset is None else own & grp.reset  # resample_reset_adam=False keeps them
            for col in cols[1:3]:
                st = col[r]
                st.scatter_(2, weakest, st.gather(2, weakest).masked_fill_(zero, 0.0))
                col[r] = st
        if self.buf is not None:  # connections moved: their old positions must read zero
            self.buf.index_fill_(0, self.real[0], 0)  # the real ones are all it holds
            self._index()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss and number correct of every member on a shared ``(x, y)``."""
        dims = self.dims
        total = torch.zeros(self.K, device=x.device)
        correct = torch.zeros(self.K, device=x.device)
        if self.fused:
            try:  # (its one activation, the product, held to _EVAL_BYTES a chunk)
                self._evaluate_fused(x, y, total, correct, _EVAL_BYTES)
                return total, correct
            except Exception as exc:  # a Triton that cannot build the kernel here: the plain path
                _without_triton(exc, "head")
                self.fused = False
                self._unband()
                total.zero_()
                correct.zero_()
        forward = functools.partial(self.logits, shared=True, dense=self._dense() if dims.n else None)
        budget = _EVAL_BYTES * (4 if x.device.type == "cuda" else 1)  # four float32 copies
        width = max(dims.rows, dims.feat, dims.hidden, dims.n_classes, 1)  # the widest activation
        chunk = max(1, min(4096, budget // (self.K * width * 4 * 4)))
        for i in range(0, len(x), chunk):
            xb, yb = x[i : i + chunk], y[i : i + chunk]
            out = forward(xb)
            if self.bio is not None:
                out = self.bio.split(out)
            K, B, C = out.shape
            ce = F.cross_entropy(out.reshape(K * B, C), yb.repeat(K), reduction="none")
            total += ce.view(K, B).sum(1)
            correct += (out.argmax(2) == yb).sum(1)
        return total, correct

    def _evaluate_fused(self, x: torch.Tensor, y: torch.Tensor, total: torch.Tensor, correct: torch.Tensor,
                        budget: int) -> None:
        """:meth:`evaluate`'s sums for a fused stack, added to ``total`` and ``correct``: band by
        band, a chunk of examples is one product of the band's dense matrices side by side
        (``(examples, members * aligned rows)``) and one launch of the step's own head kernel
        with its gradients off (:func:`core._kernels.soma_eval`), which reads that product
        once. The plain path's activations made several passes over (members, examples, rows)
        floats: at the seed space's cohorts ~0.05-0.08 s an epoch on an H200
        (bench/NOTES_population.md, v20)."""
        lowp = self.lowp != torch.float32
        self._dense()  # the bands' views read what it writes
        for band, (a, b, n, d) in enumerate(self.bands):
            w = self._band_dense(band)
            rows = w.shape[1]
            wt = w.reshape((b - a) * rows, -1).t()
            # float32: the bias in the product, as the step's baddbmm adds it; low precision:
            # the head adds it in float32, as the step's does
            bias = None if lowp else self._band_bias(band).reshape(-1)
            # a multiple of 16 examples keeps the labels' pointer as aligned as the step's
            chunk = max(16, min(16384, budget // ((b - a) * rows * w.element_size())) // 16 * 16)
            for i in range(0, len(x), chunk):
                xb = x[i : i + chunk]
                z = xb @ wt if bias is None else torch.addmm(bias, xb, wt)
                loss, right = _kernels.soma_eval(
                    z, self.p, self.offsets, n, d, y[i : i + chunk], rows, add_bias=lowp, grad_dtype=self.lowp,
                    n_stored=self.dims.n, first=a, d_stored=self.dims.d)
                total[a:b] += loss
                correct[a:b] += right


def capture_step(body: Callable[[], None], device: torch.device,
                 generators: Sequence[torch.Generator] = (), pool: Any = None) -> torch.cuda.CUDAGraph:
    """Run ``body`` once for real on a side stream (the warm-up a capture needs), then record
    it as a CUDA graph. ``generators`` (custom ones ``body`` draws from) are registered with
    the graph, so that each replay draws anew; ``pool`` is a memory pool shared with other
    graphs that never run at the same time. Shared by both population trainers."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        body()  # the real step, and the warm-up the capture needs
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        graph.register_generator_state(gen)
    with torch.cuda.graph(graph, pool=pool, stream=side):
        body()  # recorded, not run
    return graph


def settle(members: Sequence[Any], ended: list[int], on_settle: Callable[[int], Any] | None) -> list[int]:
    """``ended`` (the stack rows whose members end this epoch) with the rows ``on_settle``
    stops once every member has reported the epoch, sorted; those members get status
    ``"stopped"``. Shared by both population trainers."""
    if on_settle is None:
        return ended
    done = set(ended)
    for i, mem in enumerate(members):
        if i not in done and on_settle(mem.index):
            mem.result.status = "stopped"
            done.add(i)
    return sorted(done)


class _StepGraph:
    """``steps`` consecutive full-batch training steps of a stack captured as one CUDA graph.

    The steps read the members' batch indices from ``idx`` (copied in before each replay, one
    copy for all of them) and add their losses and correct counts to ``loss_sum`` and
    ``correct``; everything else they touch (parameters, moments, connections, step counts)
    is updated in place, by the replays and by the resampling between them. Made with the
    first full steps it covers, which it runs for real on a side stream as the capture's
    warm-up. A graph of several steps is one launch from the host where each step was one.
    """

    def __init__(
        self, stack: _Stack, x: torch.Tensor, y: torch.Tensor, cols: torch.Tensor,
        image: tuple[int, ...] | None = None, shifts: torch.Tensor | None = None, steps: int = 1,
    ) -> None:
        self.stack, self.x, self.y, self.steps = stack, x, y, steps
        # the stack's layout when captured: a stack that leaves the fused step (_Stack._unband,
        # as its evaluation may after this capture) replaces the index tensors the graph reads
        self.fused = stack.fused
        self.K, self.B = cols.shape[0], cols.shape[1] // steps
        dev = x.device
        self.idx = torch.empty(steps, self.K * self.B, dtype=torch.long, device=dev)
        self.image = image
        self.shifts = (torch.empty(steps, self.K, self.B, 2, dtype=torch.long, device=dev)
                       if shifts is not None else None)
        self._load(cols, shifts)
        self.loss_sum = torch.zeros(self.K, device=dev)
        self.correct = torch.zeros(self.K, device=dev)
        self.chunk: _StepGraph | None = None  # a one-step graph's: the stack's chunk of steps
        self.graph = capture_step(self._body, dev)

    def _load(self, cols: torch.Tensor, shifts: torch.Tensor | None) -> None:
        """``cols`` ``(K, steps * B)`` (and ``shifts`` ``(K, steps * B, 2)``) into the step-major buffers."""
        S, K, B = self.steps, self.K, self.B
        self.idx.view(S, K, B).copy_(cols.view(K, S, B).transpose(0, 1))
        if self.shifts is not None and shifts is not None:
            self.shifts.copy_(shifts.view(K, S, B, 2).transpose(0, 1))

    def _body(self) -> None:
        for j in range(self.steps):
            xb = self.x.index_select(0, self.idx[j]).view(self.K, self.B, -1)
            yb = self.y.index_select(0, self.idx[j]).view(self.K, self.B)
            if self.shifts is not None and self.image is not None:
                xb = _shift_batch(xb, self.shifts[j], self.image)
            loss, right = self.stack.train_step(xb, yb)
            self.loss_sum.add_(loss, alpha=self.B)
            self.correct.add_(right)

    def replay(self, cols: torch.Tensor, shifts: torch.Tensor | None = None) -> None:
        self._load(cols, shifts)
        self.graph.replay()


def _shift_batch(xb: torch.Tensor, shifts: torch.Tensor, image: tuple[int, ...]) -> torch.Tensor:
    """Members' batches ``(K, B, in)`` moved by ``shifts`` ``(K, B, 2)`` as train_model moves them."""
    K, B, n_in = xb.shape
    return shift_images(xb.reshape(K * B, *image), shifts.reshape(K * B, 2)).view(K, B, n_in)


@dataclass
class _Group:
    """Members that resample at one step, padded to the largest of them (see _Stack.resample).

    Member ``j`` (stack row ``rows[j]``) swaps ``m[j]`` of its ``k[j]`` connections per
    dendrite. Its draws are made on the device (:meth:`draw`) from its layer's seed and
    resampling number, for its own ``n[j] * d[j]`` rows only (``n_real`` in all). The per-member
    numbers are the rows of one device tensor, ``meta``: one copy to stage, and one copy into
    a captured resampling's own (:meth:`load`).
    """

    meta: torch.Tensor  # (8, g) int64: rows, k, m, seeds, events, n, d, reset (see the properties)
    kmax: int
    mmax: int
    n_real: int  # sum(n * d)
    allowed: torch.Tensor | None  # (n_real, in_dim) bool: connectivity="local" patches; None: all inputs
    reset_all: bool = True  # every member zeroes its swapped connections' Adam moments

    rows = property(lambda self: self.meta[0])  # (g,) stack rows
    k = property(lambda self: self.meta[1])  # (g,) inputs per dendrite
    m = property(lambda self: self.meta[2])  # (g,) swaps per dendrite
    seeds = property(lambda self: self.meta[3])  # (g,) each member's layer seed
    events = property(lambda self: self.meta[4])  # (g,) its resampling number
    n = property(lambda self: self.meta[5])  # (g,) its neurons
    d = property(lambda self: self.meta[6])  # (g,) its dendrites per neuron

    @property
    def reset(self) -> torch.Tensor | None:
        """(g, 1, 1) bool: zero the swapped connections' Adam moments; None: all do."""
        return None if self.reset_all else self.meta[7].view(-1, 1, 1).bool()

    @property
    def bound(self) -> torch.Tensor:
        """(g,) float32: the fresh weights' bound, 1 / sqrt(k), rounded once from double (as
        Python's ``1.0 / math.sqrt(k)`` converted to float32: both operations are exact-rounded)."""
        return (1.0 / self.k.double().sqrt()).float()

    @property
    def key(self) -> tuple[Any, ...]:
        """What a captured resampling of this group depends on besides ``meta``'s values."""
        return (self.meta.shape[1], self.kmax, self.mmax, self.n_real, self.allowed is None, self.reset_all)

    def static(self) -> _Group:
        """A copy with its own tensors, for a captured resampling to read (see :meth:`load`)."""
        return _Group(self.meta.clone(), self.kmax, self.mmax, self.n_real,
                      None if self.allowed is None else self.allowed.clone(), self.reset_all)

    def load(self, other: _Group) -> None:
        """``other``'s values into this static copy's tensors (the same :attr:`key`)."""
        self.meta.copy_(other.meta)
        if self.allowed is not None and other.allowed is not None:
            self.allowed.copy_(other.allowed)

    def draw(self, used: torch.Tensor, grid_d: int, in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's new inputs and fresh weights as its lone layer draws them
        (``core._layers.swap_weakest``), on the padded layout ``(g, grid, mmax)`` of a grid of
        ``grid_d`` dendrites per neuron: of each real row, the ``mmax`` best-scored inputs it
        does not use (``used``, ``(g, grid, k)``), best first; padded rows get input 0 and zero
        weights (as they had). Computed on the device from a few numbers per member: nothing
        per row is staged on the host."""
        g, grid, _ = used.shape
        dev = used.device
        # each real row's member, its number in the member's own layer (neuron i, dendrite j:
        # i * d + j) and its place among the g * grid rows (i * the grid's dendrites + j)
        sizes = self.n * self.d
        member = torch.repeat_interleave(torch.arange(g, device=dev), sizes, output_size=self.n_real)
        own = torch.arange(self.n_real, device=dev) - (torch.cumsum(sizes, 0) - sizes)[member]
        d = self.d[member]
        where = member * grid + (own // d) * grid_d + own % d
        seed, event = self.seeds[member], self.events[member]
        used = used.reshape(g * grid, -1)
        new = torch.zeros(g * grid, self.mmax, dtype=torch.long, device=dev)
        chunk = max(1, _DRAW_ELEMENTS // in_dim)  # the scores of every input, a few rows at a time
        for a in range(0, self.n_real, chunk):
            part = slice(a, a + chunk)
            scores = input_scores(draw_rows(seed[part], event[part], own[part], _SCORES), in_dim)
            if self.allowed is not None:
                scores.masked_fill_(~self.allowed[part], -2)
            scores.scatter_(1, used[where[part]], -1)
            new.index_copy_(0, where[part], scores.topk(self.mmax, dim=1).indices)
        fresh = torch.zeros(g * grid, self.mmax, device=dev)
        fresh.index_copy_(0, where, fresh_weights(
            draw_rows(seed, event, own, _FRESH), self.mmax, self.bound[member].unsqueeze(1)))
        return new.view(g, grid, -1), fresh.view(g, grid, -1)


#: Full-batch steps that one CUDA graph replay runs where no resampling, schedule or test hook
#: comes between them (``_Population._train``; 1: a replay a step).
_CHUNK_STEPS = 16
#: Whether resamplings are captured as CUDA graphs (``_Population._resample``; off: eager, for A/B runs).
_RESAMPLE_GRAPHS = True
#: The most captured resamplings a stack keeps.
_MAX_RESAMPLE_GRAPHS = 8
#: ``dendritic_simple`` members built from their draws alone, without their modules
#: (``_Population._member_without_module``).
_MODULE_FREE = True
#: A stack's evaluation captured as a CUDA graph from its second epoch (``_Population._evaluate``).
_EVAL_GRAPHS = True
#: Device types where a stack's next epoch is queued before this one's results are read back,
#: when nothing can change its members (``_Population._launch_ahead``). Not the CPU: there an
#: epoch's launch is its work, with nothing to overlap.
_AHEAD_ON = ("cuda",)

#: The most scores a resampling draws at once (256 MB of int32 scores, 512 MB past 2,048 inputs).
_DRAW_ELEMENTS = 1 << 26


# -- the scheduler -------------------------------------------------------------------------------
#: How much nicer than the caller the plan workers run (Linux: a thread's own nice value).
#: Their draws filled every core when they drew the resampling scores too (1,024 members of the
#: seed space's larger sizes), and the main thread, which launches the steps the device waits
#: for, then waited for a core (bench/v13_probe.py, bench/NOTES_population.md v13).
_PLAN_NICE = 5


#: The most plan workers a CUDA population runs (each on one core, two cores left to the rest).
_MAX_PLAN_WORKERS = 16


def _one_intra_op_thread() -> None:
    torch.get_num_threads()  # this thread's lazy OpenMP set-up first, or it would undo the next line
    torch.set_num_threads(1)
    if _PLAN_NICE and hasattr(os, "setpriority"):
        tid = threading.get_native_id()
        with contextlib.suppress(OSError):  # a system that refuses: the thread runs as it is
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + _PLAN_NICE))


def _serial_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads that each run PyTorch's CPU ops on one intra-op thread.

    Each worker's draws (a data order, resampling scores and their top-k) are small; with
    PyTorch's default of one OpenMP team per calling thread, as wide as the machine, 8
    workers on a 16-core H200 host drew 1,024 members' plans in 0.34 s, longer than a bf16
    epoch's 0.37 s of steps left room for (the epochs then alternated 0.4 / 0.9 s); on one
    intra-op thread each, 15 workers took 0.19 s (.devrun plans probe, bench/NOTES_population.md).
    OpenMP's thread count is per calling thread, but ``torch.set_num_threads`` also records
    the count new threads start with: it is put back once every worker has started.
    """
    before = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name,
                              initializer=_one_intra_op_thread)
    started = threading.Barrier(workers + 1)
    for _ in range(workers):
        pool.submit(started.wait)
    started.wait()
    torch.set_num_threads(before)
    return pool


_GC_LOCK = threading.Lock()
_GC_HOLDS = [0, False]  # populations running in this process; whether the collector was on


@contextlib.contextmanager
def _young_gc_only() -> Iterator[None]:
    """No automatic collections while a population trains; its loop collects the young
    generations after each epoch (a few ms) and the full collector runs again afterwards.

    A population keeps hundreds of thousands of objects alive (every member's module, plans,
    tensors), and each full collection went over all of them: on the H200 host, four of
    97-142 ms in a 15-epoch call at K = 1,024, on the main thread, which the device then waited
    for (whole call 8.06 / 7.48 s with them, 7.09 / 6.60 s without; bench/results/gc_probe_gpu.txt).
    Cyclic garbage old enough to reach the oldest generation waits until the population ends.
    """
    with _GC_LOCK:
        if _GC_HOLDS[0] == 0:
            _GC_HOLDS[1] = gc.isenabled()
            gc.disable()
        _GC_HOLDS[0] += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_HOLDS[0] -= 1
            if _GC_HOLDS[0] == 0 and _GC_HOLDS[1]:
                gc.enable()


def _release_memory(device: torch.device) -> None:
    """After an out-of-memory error: what the failed work held goes back to the device."""
    gc.collect()  # cyclic garbage may hold device memory (full collections are off)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _padded_bytes(t: torch.Tensor) -> int:
    """``t``'s bytes, rounded up to 64 (a run of tensors carved out of one buffer stays aligned)."""
    return -(-t.numel() * t.element_size() // 64) * 64


class _PinnedBuffers:
    """Pinned host buffers that the epochs' staged data orders and shifts are written into, one
    epoch after another (CUDA only).

    A fresh pinned buffer of a stack's data orders (K x n_train int32: 221 MB at K = 1,024 on
    Fashion-MNIST) took 0.10-0.32 s to allocate on an H200's host, and a homogeneous call's
    epochs 2-3 ran ~0.13 s slower for it (bench/NOTES_population.md v22). Torch's caching host
    allocator hands a block back only once nothing references it and its copy is known to be
    done, which the next epoch's staging, running while this epoch's copy is still queued,
    never saw: a call allocated three. Here a buffer comes back (:meth:`give`) as soon as its
    copy to the device is queued, with an event after that copy; the next staging (:meth:`take`,
    on the staging thread, which never runs during a capture) waits for the event, which an
    epoch's first operations meet, and writes over it. A buffer big enough for a smaller stack
    serves it too. At most ``keep`` buffers wait to be reused. The first is allocated on the
    staging thread while the stack builds (:meth:`reserve`, from ``_Population._restack``).
    """

    def __init__(self, device: torch.device, keep: int = 2) -> None:
        self.device = device
        self.keep = keep
        self.free: list[tuple[torch.UntypedStorage, torch.cuda.Event | None]] = []
        self.lock = threading.Lock()

    def _fitting(self, nbytes: int) -> int | None:
        """The index of the smallest waiting buffer that holds ``nbytes`` (under the lock)."""
        fits = [i for i, (st, _) in enumerate(self.free) if st.nbytes() >= nbytes]
        return min(fits, key=lambda i: self.free[i][0].nbytes()) if fits else None

    @staticmethod
    def _allocate(nbytes: int) -> torch.UntypedStorage:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).untyped_storage()

    def reserve(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Allocate what a :meth:`take` of ``shape`` and ``dtype`` needs ahead of it, unless a
        waiting buffer holds it."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self.lock:
            if self._fitting(nbytes) is not None:
                return
        storage = self._allocate(nbytes)
        with self.lock:
            self.free.append((storage, None))

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        found = self.try_take(nbytes)
        storage = found.untyped_storage() if found is not None else self._allocate(nbytes)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def try_take(self, nbytes: int) -> torch.Tensor | None:
        """A waiting buffer of at least ``nbytes`` (uint8, its whole size) once its last copy
        has run; None if none holds them (nothing is allocated)."""
        with self.lock:
            at = self._fitting(nbytes)
            found = self.free.pop(at) if at is not None else None
        if found is None:
            return None
        storage, done = found
        if done is not None:
            done.synchronize()  # its last copy to the device has run
        return torch.empty(0, dtype=torch.uint8).set_(storage)

    def give(self, *tensors: torch.Tensor | None) -> None:
        """Take back ``tensors`` (from :meth:`take`) once their copies to the device are queued
        on its current stream."""
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        with self.lock:
            self.free.extend((t.untyped_storage(), done) for t in tensors if t is not None)
            self.free.sort(key=lambda f: f[0].nbytes(), reverse=True)
            del self.free[self.keep :]  # the largest serve every size


class _Population:
    """Keeps up to ``size`` members training; refills, evaluates, reports and recovers."""

    def __init__(
        self, family: str, configs: Iterable[dict[str, Any]], data: Dataset, n_epochs: int,
        batch_size: int, device: torch.device, seed: int, size: int | str,
        on_epoch: OnMemberEpoch | None, on_result: OnResult | None, precision: str = "fp32",
    ) -> None:
        self.family, self.data, self.n_epochs, self.batch_size = family, data, n_epochs, batch_size
        self.precision = check_precision(precision)
        # bf16 applies to the dendrite layer's products, which are nearly all of the work; the
        # inputs they read are kept once in bf16 so that every step moves half the bytes.
        low = precision == "bf16" and family != "vanilla_mlp"
        self.lowp = torch.bfloat16 if low else torch.float32
        self.x_train, self.x_val, self.x_test = (
            t.to(self.lowp) for t in (data.x_train, data.x_val, data.x_test))
        self.graphs = device.type == "cuda"  # capture each stack's training step once
        self.graph: _StepGraph | None = None
        # training FLOPs of the stacked layout (padding included) and of the members' own sizes
        self.stats: dict[str, Any] = {"useful_flops": 0.0, "executed_flops": 0.0, "stacks": [],
                                      "build_seconds": 0.0, "epoch_seconds": 0.0, "keep_seconds": 0.0,
                                      # per epoch of a stack: seconds the main thread spent on
                                      # the epoch's staging (waiting for the staging thread, or
                                      # staging itself when nothing was staged ahead), and how
                                      # many epochs staged on the main thread
                                      "staging_seconds": [], "staged_here": 0,
                                      # epochs queued ahead of the one before (_launch_ahead)
                                      "run_ahead": 0}
        self.device, self.seed, self.on_epoch, self.on_result = device, seed, on_epoch, on_result
        self.on_settle: Callable[[int], Any] | None = None
        self.keep_weights: Callable[[int, TrainResult], Any] | None = None
        self.configs: Iterator[dict[str, Any]] = iter(configs)
        self.n_configs = len(configs) if isinstance(configs, Sequence) else None
        self.size_arg = size
        self.size = 0
        self.max_size = _AUTO_MAX  # "auto" is capped here (train_population's max_population)
        self.n_train = len(data.x_train)
        self.n_steps = math.ceil(self.n_train / batch_size)
        self.default_batch = batch_size  # a member's batch size unless its config sets one
        self.image: tuple[int, ...] | None = None  # (C, H, W) that augment="shift" moves
        self.results: list[TrainResult] = []
        self.pending: deque[_Member] = deque()  # requeued after an out-of-memory error
        self.exhausted = False
        # One stack per batch size (their steps cannot be shared); ``stack``, ``graph``,
        # ``ahead``, ``batch_size`` and ``n_steps`` are those of the one training now.
        self.stack: _Stack | None = None
        self.stacks: dict[int, tuple[_Stack, _StepGraph | None, Any]] = {}
        cuda = device.type == "cuda"
        # Enough threads to draw the next epoch's random numbers while the device works, each
        # on one intra-op thread (see _serial_pool), leaving two cores to the main thread.
        workers = max(1, min(_MAX_PLAN_WORKERS, (os.cpu_count() or 2) - 2)) if cuda else 1
        self.pool = _serial_pool(workers, "population") if cuda else ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="population")
        # one thread of its own, so that its waits on the pool's work can never deadlock; on the
        # population's device, so that its CUDA calls (pinned buffers, their events) open no
        # context on another GPU
        on_device: dict[str, Any] = {}
        if cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            on_device = dict(initializer=torch.cuda.set_device, initargs=(index,))
        self.stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="population-stage", **on_device)
        self.ahead: tuple[_Stack, list[Future[_Plan]], Future[Any]] | None = None
        self.flight: _Flight | None = None  # the epoch queued ahead (_launch_ahead)
        self.ahead_ok = True  # False once an epoch queued ahead ran out of memory
        self.read_at = 0.0  # when the last epoch's results were read back
        self.alone = True  # whether the stack training now is the round's only one (_run)
        self.staging: Future[Any] | None = None
        self.pinned = _PinnedBuffers(device)
        self.workers = workers
        # the architectures of members built without a module (_member_without_module)
        self.templates: dict[str, _Template | None] = {}  # None: built as modules

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
            logger.warning("train_population: member %d failed to build: %s", index, exc)
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
        recipe = self._recipe(config)
        d = self.data
        for key, value in (("in_dim", d.in_dim), ("n_classes", d.n_classes)):
            if params.setdefault(key, value) != value:
                raise ValueError(
                    f"{key}={params[key]!r} does not match the dataset's {value}; leave it out "
                    f"and it is taken from the data"
                )
        family = get_family(self.family)
        resolved = family.resolve(params)  # unknown parameters: a ValueError listing the known
        if _MODULE_FREE and family.build is dendritic_simple and config.get("bio") is None:
            mem = self._member_without_module(index, family, resolved, mseed, lr, wd, recipe)
            if mem is not None:
                self.results.append(mem.result)
                return mem
        # create_model(family, seed=mseed, **params) draws from the CPU generator alone; its
        # torch.manual_seed also reseeds every CUDA device (about a millisecond a member on a
        # GPU host) without changing the weights, so only the CPU generator is seeded here.
        # core's own builders leave a layer as constructed: its own draws can wait (see below)
        defer = getattr(family.build, "__module__", None) == "core._models"
        with torch.random.fork_rng(devices=[]), (
            deferred_connections() if defer else contextlib.nullcontext([])
        ) as draws:
            torch.default_generator.manual_seed(mseed)
            net = family.build(**resolved)
        arch, layer, linears = _parse(net, self.family)
        bio = None
        pending: list[Callable[[], None]] = []
        if draws and config.get("bio") is None:
            pending = draws  # drawn on the workers once every newcomer is built (_draw_connections)
        else:
            _draw_all(draws)
        if config.get("bio") is not None:  # converted before its tensors are read: Dale's signs
            readout = next(n for n, m in net.named_modules() if m is linears[-1])
            bio = convert_member(net, config["bio"], mseed, _bio_role(readout))
        own = _own_tensors(layer, linears)  # the module's tensors, written back when it ends
        # the module's own tensors (the layer's may still be being drawn): read only to be
        # stacked, and written only when the member ends
        ps = {k: v.detach() for k, v in own.items()}
        state = _State(ps, {}, {}, layer.indices if layer is not None else None)  # moments: zeros
        result = TrainResult(n_params=count_parameters(net), device=str(self.device), seed=mseed)
        patch = None
        if layer is not None and layer.connectivity == "local" and arch.m > 0:
            patch = layer.patch_mask()
        mem = _Member(
            index=index, arch=arch, seed=mseed, lr=lr, weight_decay=wd,
            data_gen=torch.Generator().manual_seed(mseed),
            layer_seed=seed_int64(layer._seed) if layer is not None else None,
            result=result, recipe=recipe, n_steps=math.ceil(self.n_train / recipe.batch_size),
            patch=patch, state=state, net=net, own=own, bio=bio, draws=pending,
        )
        self.results.append(result)
        return mem

    def _member_without_module(
        self, index: int, family: ModelFamily, resolved: dict[str, Any], mseed: int, lr: float,
        wd: float, recipe: _Recipe,
    ) -> _Member | None:
        """A ``dendritic_simple`` member from its draws alone (``dendritic_simple_tensors``):
        the same numbers as its module's, its state_dict given by its architecture's
        :class:`_Template`. Building 1,024 modules took ~0.4 ms of Python each (on an idle
        2-core machine; about twice that on a busy GPU host). None where it does not apply
        (``connectivity="local"``)."""
        key = repr(sorted(resolved.items()))
        if key in self.templates:
            tmpl = self.templates[key]
            if tmpl is None:
                return None
        else:
            # one module per architecture: it checks the arguments as the builder does (a bad
            # one raises here) and shows the layout; its draws go to a forked generator
            with torch.random.fork_rng(devices=[]), deferred_connections():
                net = family.build(**resolved)
            arch, layer, linears = _parse(net, self.family)
            names = {id(t): name for name, t in _own_tensors(layer, linears).items()}
            sd = net.state_dict(keep_vars=True)
            if layer is not None:
                names[id(layer.indices)] = "indices"
            if layer is None or layer.connectivity != "random" or any(id(v) not in names for v in sd.values()):
                self.templates[key] = None  # its members are built as modules
                return None
            tmpl = self.templates[key] = _Template(
                arch, count_parameters(net), tuple((k, names[id(v)]) for k, v in sd.items()),
                copy.deepcopy(getattr(sd, "_metadata", None)))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mseed)
            drawn = dendritic_simple_tensors(**resolved)
        assert drawn is not None
        tensors, layer_seed, draw = drawn
        params = {name: tensors[k] for k, name in tmpl.keys if name != "indices"}
        indices = next(tensors[k] for k, name in tmpl.keys if name == "indices")
        return _Member(
            index=index, arch=tmpl.arch, seed=mseed, lr=lr, weight_decay=wd,
            data_gen=torch.Generator().manual_seed(mseed), layer_seed=seed_int64(layer_seed),
            result=TrainResult(n_params=tmpl.n_params, device=str(self.device), seed=mseed),
            recipe=recipe, n_steps=math.ceil(self.n_train / recipe.batch_size),
            state=_State(params, {}, {}, indices), draws=[draw], template=tmpl,
        )

    def _recipe(self, config: dict[str, Any]) -> _Recipe:
        """A config's training recipe, checked as train_model checks its arguments."""
        bs = config.get("batch_size", self.default_batch)
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {bs!r}")
        schedule = config.get("lr_schedule", "constant")
        if schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {', '.join(map(repr, LR_SCHEDULES))}, got {schedule!r}")
        warmup = config.get("warmup_epochs")
        if warmup is not None:
            if isinstance(warmup, bool) or not isinstance(warmup, int | float):
                raise ValueError(f"warmup_epochs must be a number, got {warmup!r}")
            if not 0 <= warmup <= self.n_epochs:
                raise ValueError(
                    f"warmup_epochs must be in [0, n_epochs={self.n_epochs}], got {warmup!r}")
        smoothing = config.get("label_smoothing", 0.0)
        if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) or not (
            0.0 <= smoothing < 1.0
        ):
            raise ValueError(f"label_smoothing must be in [0, 1), got {smoothing!r}")
        augment = config.get("augment", "none")
        if augment not in AUGMENTS:
            raise ValueError(
                f"augment must be one of {', '.join(map(repr, AUGMENTS))}, got {augment!r}")
        if augment == "shift" and self.image is None:
            self.image = _image_view(self.data)  # a ValueError for inputs that are not images
        total, warm = schedule_steps(self.n_train, bs, self.n_epochs, schedule, warmup)
        return _Recipe(bs, schedule, warmup, float(smoothing), augment, total, warm)

    @torch.no_grad()
    def _keep_weights(self, stack: _Stack, rows: list[int]) -> None:
        """Write these rows into their members' modules; attach each ``state_dict`` to the result."""
        # the waiting staging buffer, idle once the members' last epoch is queued and no staging
        # job may want it (one would allocate another), if it holds them
        idle = self.staging is None or self.staging.done()
        pinned = self.pinned if self.device.type == "cuda" and _KEEP_PINNED and idle else None
        for i, st in zip(rows, stack.states(rows, moments=False, pinned=pinned), strict=True):
            mem = stack.members[i]
            if mem.template is not None:
                mem.result.state_dict = mem.template.state_dict(st)
                mem.template = None
                continue
            if mem.net is None:
                continue
            for name, t in mem.own.items():
                t.copy_(st.params[name])
            layer = mem.net[0] if isinstance(mem.net[0], DendriticLayer) else None
            if layer is not None and st.indices is not None:
                layer.indices.copy_(st.indices)
                layer.n_backward = mem.steps
                if mem.arch.m > 0:
                    layer.n_resamples = mem.steps // mem.arch.every
            mem.result.state_dict = mem.net.state_dict()
            mem.net, mem.own = None, {}

    def _prefetch(self, mem: _Member) -> None:
        """Queue the draws of the member's next epoch (one at a time: generators are sequential)."""
        planned = mem.epoch + len(mem.plans) + (mem.current is not None) + (mem.next is not None)
        if planned < self.n_epochs and not mem.plans:
            steps0 = mem.plan_steps
            mem.plan_steps += mem.n_steps
            mem.plans.append(self.pool.submit(
                _make_plan, mem.data_gen, mem.arch, self.n_train, mem.n_steps, steps0, mem.recipe,
            ))

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
        B, f = self.batch_size, 4
        rows = _aligned(dims.rows)  # a fused step's rows (_ROW_ALIGN)
        width = rows + dims.feat + 2 * dims.hidden * max(1, dims.depth) + dims.n_classes
        total = f * 7 * dims.numel  # parameters, gradient, moments, the epoch's copy
        total += f * 3 * rows * dims.in_dim  # dense matrix, its gradient, scatter
        total += f * 2 * B * dims.in_dim + 8 * B  # the gathered batch
        total += f * 8 * B * width  # activations and their gradients
        total += 8 * 3 * dims.rows * dims.k  # connections, their copy, the mask
        total += 4 * self.n_train  # the epoch's data order
        total += 2 * self.n_train  # its shifts, when the member augments (uint8 pairs)
        total += f * 2 * dims.rows * dims.in_dim  # resampling draws
        return int(total)

    def _initial_size(self, first: _Member) -> int:
        self.batch_size = first.recipe.batch_size
        if isinstance(self.size_arg, int):
            return self.size_arg
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            dims = _Dims.of([first.arch])
            size = int(0.6 * free) // max(1, 2 * self._member_bytes(dims))
            size = max(1, min(self.max_size, size))
        else:
            size = min(_AUTO_CPU, self.max_size)
        return min(size, self.n_configs) if self.n_configs is not None else size

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> list[TrainResult]:
        try:
            with _young_gc_only():
                self._run()
        finally:
            self.ahead = self.flight = None
            self.stager.shutdown(wait=True, cancel_futures=True)
            self.pool.shutdown(wait=True, cancel_futures=True)
        return self.results

    def _run(self) -> None:
        t0 = time.perf_counter()
        first = self._take()
        if first is None:
            return
        self.size = self._initial_size(first)
        incoming = [first]
        while True:
            live = sum(st.K for st, _, _ in self.stacks.values())
            while live + len(incoming) < self.size:
                mem = self._take()
                if mem is None:
                    break
                incoming.append(mem)
            if not live and not incoming:
                return
            by_batch: dict[int, list[_Member]] = {}
            for mem in incoming:
                by_batch.setdefault(mem.recipe.batch_size, []).append(mem)
            incoming = []
            # members of different batch sizes train in their own stacks, an epoch each in turn
            turns = sorted(set(self.stacks) | set(by_batch))
            self.alone = len(turns) == 1  # no other stack trains before this one's next epoch
            for bs in turns:
                self._switch(bs)
                self._restack(by_batch.get(bs, []))
                assert self.stack is not None
                t1 = time.perf_counter()
                self.stats["build_seconds"] += t1 - t0
                ended = self._epoch(self.stack)
                gc.collect(1)  # the young generations, in a few ms (see _young_gc_only)
                t0 = time.perf_counter()
                self.stats["epoch_seconds"] += t0 - t1
                if ended is not None:  # None: out of memory, halved; the rest retry next round
                    keep = [i for i, mem in enumerate(self.stack.members) if mem not in ended]
                    self.stack = self.stack.select(keep)
                self._park(bs)

    def _switch(self, bs: int) -> None:
        """Make the stack of batch size ``bs`` (if any) the one that trains next."""
        self.batch_size, self.n_steps = bs, math.ceil(self.n_train / bs)
        self.stack, self.graph, self.ahead = self.stacks.pop(bs, (None, None, None))

    def _park(self, bs: int) -> None:
        """Put the stack that trained back among the others (dropped when no member is left)."""
        if self.stack is not None and self.stack.K:
            self.stacks[bs] = (self.stack, self.graph, self.ahead)
        self.stack, self.graph, self.ahead = None, None, None

    def _restack(self, incoming: list[_Member]) -> None:
        stack = self.stack
        if not incoming and stack is not None:
            return
        everyone = (stack.members if stack is not None else []) + incoming
        if self.device.type == "cuda":  # the first epoch's data orders' buffer (_stage), allocated while this builds
            self.staging = self.stager.submit(self.pinned.reserve, (len(everyone), self.n_train), torch.int32)
        needed = _Dims.of(m.arch for m in everyone)
        self._draw_connections(incoming)
        states = [m.state for m in incoming]
        assert all(s is not None for s in states)
        # members sorted by _band_key, so that the fused step's bands (_bands) cut the padding
        if stack is None or not stack.dims.covers(needed) or stack.dims.volume > 1.25 * needed.volume:
            old = stack.states(list(range(stack.K))) if stack is not None else []
            pairs = sorted(zip(everyone, old + states, strict=True), key=lambda ms: _band_key(ms[0].arch))
            self.stack = _Stack.build(needed, [m for m, _ in pairs], [st for _, st in pairs],  # type: ignore[misc]
                                      self.device, self.lowp)
        else:
            pairs = sorted(zip(incoming, states, strict=True), key=lambda ms: _band_key(ms[0].arch))
            merged = stack.cat(_Stack.build(stack.dims, [m for m, _ in pairs], [st for _, st in pairs],  # type: ignore[misc]
                                            self.device, self.lowp))
            if merged.fused:  # cat appends the newcomers' run: merged into one sorted run for
                # the bands (each refill's own run would soon pass _bands' _MAX_CUTS)
                merged = merged.select(sorted(range(merged.K), key=lambda i: _band_key(merged.members[i].arch)))
            self.stack = merged
        now = time.perf_counter()
        for m in incoming:
            m.state = None
            if not m.start:
                m.start = now
            # Drawn once the newcomers are built: drawing alongside the building only slows both.
            self._prefetch(m)

    def _draw_connections(self, members: list[_Member]) -> None:
        """The members' deferred draws (their layers' connections and weights, see
        ``core._layers.deferred_connections``), on the workers, a share each.

        Made once every newcomer is built: drawn alongside the building, the workers' turns at
        the GIL slowed this thread's many small operations, and building 1,024 members took
        3.07 s against 1.36 s drawn afterwards, on the same 16-core host
        (bench/NOTES_population.md, v16). On CUDA, the members built without a module are
        drawn on the device, all at once (:meth:`_draw_on_device`).
        """
        batched = [m for m in members if m.template is not None and m.draws] if self.device.type in _PICK_ON else []
        if batched:
            self._draw_on_device(batched)
        draws = [d for m in members for d in m.draws]
        for m in members:
            m.draws = []
        parts = min(self.workers, len(draws))
        for fut in [self.pool.submit(_draw_all, draws[j::parts]) for j in range(parts)]:
            fut.result()

    def _draw_on_device(self, members: list[_Member]) -> None:
        """The draws of members built without a module (``dendritic_simple_tensors``), made
        on the device for all of them at once.

        A layer's connections and weights are counters of its seed
        (``core._layers.draw_connections``, ``draw_weights``); here every member's rows are
        scored and picked in a few batched passes (``_DRAW_BYTES`` of scores at a time; the
        scores are distinct within a row, so the device's top-k is the layer's), and the
        weights are computed a group of similar fan-ins at a time and come back to the CPU in
        one transfer, where the stack reads them. Drawn with ``torch.rand`` on the host's
        workers, the scores had taken 0.20-0.40 s of a 1,024-member build, 0.7-1.3 s of
        thread time (bench/NOTES_population.md, v24).
        """
        dev = self.device
        in_dim = members[0].arch.in_dim
        archs = [m.arch for m in members]
        for m in members:
            assert m.layer_seed is not None and len(m.draws) == 1
            m.draws = []
        seeds = torch.tensor([m.layer_seed for m in members], dtype=torch.long)
        # the dendrites' rows, each with its layer's seed, its own number and its layer's k
        rows = torch.tensor([a.n * a.d for a in archs])
        row_seed, row_id = seeds.repeat_interleave(rows), _numbered(rows)
        kmax = max(a.k for a in archs)
        per_chunk = max(1, _DRAW_BYTES // (16 * in_dim))  # the scores' int64 hash and its temporaries
        seed_d, id_d = row_seed.to(dev), row_id.to(dev)
        picked = torch.cat([connection_scores(seed_d[i : i + per_chunk], id_d[i : i + per_chunk], in_dim)
                            .topk(kmax, dim=1).indices for i in range(0, len(row_id), per_chunk)])
        # the weights and biases: one pass per group of members whose k share a power of 2,
        # as wide as the group's widest (a column's value does not depend on the width); then
        # the somas'
        groups: dict[int, list[int]] = {}
        for i, a in enumerate(archs):
            groups.setdefault(a.k.bit_length(), []).append(i)
        parts = []
        for idx in groups.values():
            r, k = rows[idx], torch.tensor([archs[i].k for i in idx])
            parts.append(initial_weights(seeds[idx].repeat_interleave(r).to(dev), _numbered(r).to(dev),
                                         k.repeat_interleave(r).to(dev)[:, None], INIT_DENDRITES, int(k.max()) + 1))
        neurons = torch.tensor([a.n if a.soma else 0 for a in archs])
        if int(neurons.sum()):
            d = torch.tensor([a.d for a in archs])
            parts.append(initial_weights(seeds.repeat_interleave(neurons).to(dev), _numbered(neurons).to(dev),
                                         d.repeat_interleave(neurons).to(dev)[:, None], INIT_SOMAS, int(d.max()) + 1))
        host = torch.cat([p.flatten() for p in parts]).cpu()  # one transfer
        weights: dict[int, torch.Tensor] = {}  # each member's rows of (weights, bias)
        at = 0
        for idx, p in zip(groups.values(), parts, strict=False):
            block = host[at : at + p.numel()].view(p.shape)
            at += p.numel()
            first = 0
            for i in idx:
                r = archs[i].n * archs[i].d
                weights[i] = block[first : first + r]
                first += r
        somas = host[at:].view(-1, parts[-1].shape[1]) if int(neurons.sum()) else None
        at_row = at_n = 0
        for i, m in enumerate(members):
            a, st = archs[i], m.state
            assert st is not None
            r, n = a.n * a.d, int(neurons[i])
            st.indices = picked[at_row : at_row + r, : a.k]
            st.params[_LAYER_PARAMS["weight"]] = weights[i][:, : a.k]
            st.params[_LAYER_PARAMS["bias"]] = weights[i][:, a.k]
            if n:
                assert somas is not None
                st.params[_LAYER_PARAMS["soma_weight"]] = somas[at_n : at_n + n, : a.d]
                st.params[_LAYER_PARAMS["soma_bias"]] = somas[at_n : at_n + n, a.d]
            at_row += r
            at_n += n

    def _shrink(self, stack: _Stack) -> None:
        """After an out-of-memory error: halve the population, requeue who no longer fits."""
        if stack.K <= 1:
            raise torch.OutOfMemoryError(
                "train_population ran out of device memory with a single member; "
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
            "train_population: out of device memory with %d members; continuing with %d "
            "(the others wait for a free slot and resume where they were)", stack.K, self.size,
        )

    def _assemble(self, stack: _Stack, ahead: bool = False) -> tuple[
        torch.Tensor, dict[int, list[_Group]], torch.Tensor | None, torch.Tensor | None
    ]:
        """Gather the members' plans for this epoch (``ahead``: the next one, see
        :meth:`_launch_ahead`) into device tensors.

        Returns the data orders ``(K, n_train)``, the resampling groups by step, the shifts
        ``(K, n_train, 2)`` (uint8; None unless a member augments) and the learning rates
        ``(n_steps, K)`` (float64; None unless a member follows a schedule).
        """
        plans, futures = [], []
        for mem in stack.members:
            fut = None
            if ahead:
                fut = mem.plans.popleft()
                mem.next = fut.result()
            elif mem.current is None:
                fut = mem.plans.popleft()
                mem.current = fut.result()
            futures.append(fut)
            plans.append(mem.next if ahead else mem.current)
        ahead, self.ahead = self.ahead, None
        staged = None
        t_stage = time.perf_counter()
        if ahead is not None and ahead[0] is stack and all(
            a is b for a, b in zip(ahead[1], futures, strict=True)
        ):
            staged = ahead[2].result()  # staged on the CPU while the device ran the last epoch
        if staged is None:
            self._settle_staging()  # a buffer _restack reserves may still be on its way
            staged = self._stage(stack, plans)
            self.stats["staged_here"] += 1
        self.stats["staging_seconds"].append(round(time.perf_counter() - t_stage, 4))
        dev, cuda = self.device, self.device.type == "cuda"
        perms, shifts, lrs, staged_events = staged
        order = perms.to(dev, non_blocking=cuda)
        def put(values: list[Any]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(dev, non_blocking=cuda)

        events: dict[int, list[_Group]] = {}
        for t, groups in staged_events.items():
            for rows, ks, ms, reset, seeds, evs, ns, ds, allowed in groups:
                events.setdefault(t, []).append(_Group(
                    put([rows, ks, ms, seeds, evs, ns, ds, [int(r) for r in reset or [True] * len(rows)]]),
                    kmax=max(ks), mmax=max(ms), n_real=sum(a * b for a, b in zip(ns, ds, strict=True)),
                    allowed=None if allowed is None else allowed.to(dev, non_blocking=cuda),
                    reset_all=reset is None))
        moved = [t.to(dev, non_blocking=cuda) if t is not None else None for t in (shifts, lrs)]
        if cuda:
            self.pinned.give(perms, shifts)  # staged into again once these copies have run
        return order, events, moved[0], moved[1]

    def _stage_ahead(self, stack: _Stack) -> None:
        """Stack the members' next plans on the CPU while the device trains this epoch.

        Used by the next epoch only if it trains this very stack (no member ended or joined)
        with these very plans; otherwise it is dropped and the next epoch stages its own.
        """
        if self.device.type != "cuda" or not all(mem.plans for mem in stack.members):
            return
        futures = [mem.plans[0] for mem in stack.members]
        job = self.stager.submit(lambda: self._stage(stack, [f.result() for f in futures]))
        self.ahead = (stack, futures, job)
        self.staging = job

    def _settle_staging(self) -> None:
        """Wait for the last staging job (its pinned allocations are CUDA calls)."""
        job, self.staging = self.staging, None
        if job is not None:
            try:
                job.result()
            except (Exception, CancelledError):  # a dropped job (cancelled plans): nothing to keep
                pass

    def _stage(self, stack: _Stack, plans: list[_Plan]) -> tuple[
        torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[int, list[tuple[Any, ...]]]
    ]:
        """The plans' data orders, shifts, learning rates and resampling draws, stacked into
        (pinned) CPU tensors."""
        cuda = self.device.type == "cuda"

        def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return self.pinned.take(shape, dtype) if cuda else torch.empty(*shape, dtype=dtype)

        perms = empty(stack.K, self.n_train, dtype=torch.int32)
        self._stack_rows([p.perm for p in plans], perms)
        shifts = lrs = None
        if stack.shift:  # members that do not augment stay where they are (shift MAX_SHIFT)
            shifts = empty(stack.K, self.n_train, 2, dtype=torch.uint8).fill_(MAX_SHIFT)
            for i, plan in enumerate(plans):
                if plan.shifts is not None:
                    shifts[i].copy_(plan.shifts)
        if stack.scheduled:  # each step's learning rate: base * factor, in double as train_model
            # the stack's own steps: on CUDA this runs in a thread while another stack may train
            n_steps = stack.members[0].n_steps
            factors = torch.ones(n_steps, stack.K, dtype=torch.float64)
            for i, plan in enumerate(plans):
                if plan.lr_factors is not None:
                    factors[:, i] = plan.lr_factors
            base = torch.tensor([mem.lr for mem in stack.members], dtype=torch.float64)
            lrs = factors * base
            if cuda:
                lrs = lrs.pin_memory()
        # the members due at a step, in groups of one power-of-2 range of inputs per dendrite:
        # each group is padded to its largest member (see _Stack.resample)
        by_step: dict[int, dict[int, list[int]]] = {}
        for i, (mem, plan) in enumerate(zip(stack.members, plans, strict=True)):
            for t in plan.events:
                by_step.setdefault(t, {}).setdefault((mem.arch.k - 1).bit_length(), []).append(i)
        dims = stack.dims
        events: dict[int, list[tuple[Any, ...]]] = {}
        for t, rows in ((t, rows) for t, groups in sorted(by_step.items()) for _, rows in sorted(groups.items())):
            mems = [stack.members[i] for i in rows]
            archs = [mem.arch for mem in mems]
            allowed = None
            if any(mem.patch is not None for mem in mems):
                allowed = torch.cat([
                    mem.patch if mem.patch is not None else torch.ones(a.n * a.d, dims.in_dim, dtype=torch.bool)
                    for mem, a in zip(mems, archs, strict=True)])
            if cuda and allowed is not None:
                allowed = allowed.pin_memory()
            reset = None if all(a.reset for a in archs) else [a.reset for a in archs]
            events.setdefault(t, []).append((
                rows, [a.k for a in archs], [a.m for a in archs], reset,
                [mem.layer_seed for mem in mems], [plans[i].events[t] for i in rows],
                [a.n for a in archs], [a.d for a in archs], allowed))
        return perms, shifts, lrs, events

    def _stack_rows(self, rows: list[torch.Tensor], out: torch.Tensor) -> None:
        """``torch.stack(rows, out=out)``, split over the worker threads when it is large."""
        n = len(rows)
        parts = min(self.workers, max(1, out.numel() // (1 << 22)), n)
        if parts <= 1:
            torch.stack(rows, out=out)
            return
        cuts = [n * j // parts for j in range(parts + 1)]
        futures = [self.pool.submit(torch.stack, rows[a:b], out=out[a:b])
                   for a, b in zip(cuts, cuts[1:], strict=False)]
        for fut in futures:
            fut.result()

    def _train(self, stack: _Stack, ahead: bool = False) -> torch.Tensor:
        """Queue one epoch's steps and the evaluations (``ahead``: those of the epoch after the
        one queued last, see :meth:`_launch_ahead`); returns the (6, K) sums, on the device.

        Rows: train loss sum, train correct, then validation and test (loss sum, correct),
        divided by the split sizes in double precision afterwards, as train_model does.
        """
        d = self.data
        x, y = self.x_train, d.y_train
        B, K = self.batch_size, stack.K
        order, events, shifts, lrs = self._assemble(stack, ahead)
        loss_sum = torch.zeros(K, device=self.device)
        correct = torch.zeros(K, device=self.device)
        graph = self.graph
        if graph is not None and (graph.stack is not stack or graph.fused != stack.fused):
            graph = None
        for g in (graph, graph and graph.chunk):
            if g is not None:
                g.loss_sum.zero_()
                g.correct.zero_()
        S, full = _CHUNK_STEPS, self.n_train // B  # full: the steps of a whole batch
        t = 0
        while t < self.n_steps:
            t += 1
            last = t + S - 1
            if (graph is not None and S > 1 and lrs is None and _step_hook is None and last <= full
                    and not any(u in events for u in range(t, last))):
                # S steps in one replay (the first chunk captures it, its warm-up running them)
                cols = order[:, (t - 1) * B : last * B]
                sh = shifts[:, (t - 1) * B : last * B].long() if shifts is not None else None
                if graph.chunk is None:
                    self._settle_staging()  # no other thread may call CUDA during the capture
                    graph.chunk = _StepGraph(stack, x, y, cols, self.image, sh, steps=S)
                else:
                    graph.chunk.replay(cols, sh)
                t = last
            else:
                if _step_hook is not None:
                    _step_hook(K)
                cols = order[:, (t - 1) * B : t * B]
                b = cols.shape[1]
                sh = shifts[:, (t - 1) * B : t * B].long() if shifts is not None else None
                if lrs is not None:  # the schedule: this step's rates, read by the (captured) Adam
                    stack.lr.copy_(lrs[t - 1])
                if graph is not None and b == B:
                    graph.replay(cols, sh)
                elif self.graphs and b == B and graph is None and stack.bio is None:
                    # the first full step runs for real while it warms up the capture
                    self.graph = None  # the old stack's graph and its memory go first
                    self._settle_staging()  # no other thread may call CUDA during the capture
                    self._compile_ahead(stack, x, y, cols)
                    graph = self.graph = _StepGraph(stack, x, y, cols, self.image, sh)
                else:
                    idx = cols.reshape(-1)
                    xb = x.index_select(0, idx).view(K, b, -1)
                    yb = y.index_select(0, idx).view(K, b)
                    if sh is not None and self.image is not None:
                        xb = _shift_batch(xb, sh, self.image)
                    loss, right = stack.train_step(xb, yb, [m.steps + t for m in stack.members])
                    loss_sum += loss * b
                    correct += right
            if t in events:  # after step t (the last of a chunk)
                self._resample(stack, events[t])
        # The next epoch's plans are drawn and stacked on the CPU while the device runs this
        # one's steps, once they are all queued (nothing in the loop waits for the device).
        # Drawn from the first step on, alongside this thread's launches, they slowed the
        # middle epochs at K = 1,024 bf16 to 0.31-0.55 s against the last epoch's 0.29 s (which
        # stages nothing); now they take 0.29 s (bench/NOTES_population.md v15-v16).
        for mem in stack.members:
            self._prefetch(mem)
        self._stage_ahead(stack)
        for g in (graph, graph and graph.chunk):
            if g is not None:
                loss_sum += g.loss_sum
                correct += g.correct
        return torch.stack([loss_sum, correct, *self._evaluate(stack)])

    def _evaluate(self, stack: _Stack) -> list[torch.Tensor]:
        """Every member's validation and test sums (loss, correct), after this epoch's steps.

        On CUDA a stack's evaluation is captured as a CUDA graph at the stack's second epoch
        (a stack that lives one epoch is not worth the capture) and replayed from then on:
        the launches of an epoch's evaluation (a chunk of examples, band by band) become one.
        The capture's warm-up is the evaluation itself. In the 2,000-trial study a cohort's
        evaluation took 0.13-0.30 s an epoch eager and 0.057 s replayed with the plain
        evaluation, 0.015-0.025 s replayed with the fused one (v20). A homogeneous stack's
        eager launches took ~0.1 s of the main thread an epoch, hidden behind its steps
        unless the plan workers held the GIL (0.2-0.3 s in v22's one bad call); replayed
        they take 0.0001 s, and the capture ~0.26 s of host time once, hidden behind the
        second epoch's steps (K = 1,024 bf16, bench/NOTES_population.md v23).
        """
        d = self.data
        out: list[torch.Tensor] = []

        def body() -> None:
            out.extend([*stack.evaluate(self.x_val, d.y_val), *stack.evaluate(self.x_test, d.y_test)])

        if stack.eval_graph is not None:
            graph, held = stack.eval_graph
            graph.replay()
            return held  # read (copied by _train's stack) before the next replay
        if not self._captures_evaluation(stack):
            stack.evaluated = True
            body()
            return out
        self._settle_staging()  # no other thread may call CUDA during the capture
        graph = capture_step(body, self.device)
        stack.eval_graph = (graph, out[4:])
        return out[:4]  # the warm-up's: the real evaluation

    def _captures_evaluation(self, stack: _Stack) -> bool:
        """Whether the stack's next evaluation is captured as a CUDA graph (see :meth:`_evaluate`)."""
        return (self.graphs and _EVAL_GRAPHS and stack.bio is None and stack.evaluated
                and stack.eval_graph is None)

    def _resample(self, stack: _Stack, groups: list[_Group]) -> None:
        """:meth:`_Stack.resample` of one step's groups, replayed as a CUDA graph where one
        was captured for groups of the same shapes (:attr:`_Group.key`).

        An eager resampling launches ~60 operations from this thread, a replay two: with the
        next epoch still staged from the first step, the middle epochs' median at K = 1,024
        bf16 was 0.34-0.35 s eager and 0.31-0.33 s replayed, the last epoch's 0.29 s
        (bench/NOTES_population.md v16, call 1). Groups
        that cover the whole stack (a cohort resampling together) are captured at once; others
        at their second sighting, up to ``_MAX_RESAMPLE_GRAPHS`` a stack. The capture's
        warm-up is the resampling itself.
        """
        if not (self.graphs and _RESAMPLE_GRAPHS):
            stack.resample(groups)
            return
        key = tuple(g.key for g in groups)
        held = stack.resample_graphs.get(key)
        if held is not None:
            graph, static = held
            for mine, grp in zip(static, groups, strict=True):
                mine.load(grp)
            graph.replay()
            return
        whole = sum(g.meta.shape[1] for g in groups) == stack.K
        if (not whole and key not in stack.resample_seen) or len(stack.resample_graphs) >= _MAX_RESAMPLE_GRAPHS:
            stack.resample_seen.add(key)
            stack.resample(groups)
            return
        self._settle_staging()  # no other thread may call CUDA during the capture
        static = [g.static() for g in groups]
        if stack.resample_pool is None:
            stack.resample_pool = torch.cuda.graph_pool_handle()
        graph = capture_step(lambda: stack.resample(static), self.device, pool=stack.resample_pool)
        stack.resample_graphs[key] = (graph, static)

    @staticmethod
    def _compile_ahead(stack: _Stack, x: torch.Tensor, y: torch.Tensor, cols: torch.Tensor) -> None:
        """:meth:`_Stack.compile_ahead` on this step's first example per member; a failure is
        left to the step, which meets it again and falls back to PyTorch (``_without_triton``)."""
        first = cols[:, :1].reshape(-1)
        try:
            stack.compile_ahead(x.index_select(0, first).unsqueeze(1), y.index_select(0, first).unsqueeze(1))
        except Exception as exc:  # noqa: BLE001 - the step reports it
            logger.debug("compiling the fused kernels ahead failed: %s", exc)

    def _read_back(self, table: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Queue ``table``'s copy to the host now; the returned call waits for it."""
        if self.device.type != "cuda":
            return table.cpu
        host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
        host.copy_(table, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def wait() -> torch.Tensor:
            done.synchronize()
            return host

        return wait

    def _may_run_ahead(self, stack: _Stack) -> bool:
        """Whether the stack's next epoch is bound to train these very members, whatever this
        epoch's results: no callback can stop one, none reaches its last epoch, none can join.

        A member that diverges is the one exception; :meth:`_call_back` undoes the epoch
        launched ahead then. Not an epoch that captures its evaluation (a stack's second,
        :meth:`_evaluate`): a capture waits for the device, so the host would wait for that
        epoch's steps before reading this one's results.
        """
        return (self.device.type in _AHEAD_ON and self.ahead_ok and self.on_epoch is None and self.on_settle is None
                and stack.bio is None and not self._captures_evaluation(stack) and self.alone and not self.pending
                and (self.exhausted or stack.K >= self.size)
                and all(mem.epoch + 2 <= self.n_epochs for mem in stack.members))

    def _launch_ahead(self, stack: _Stack) -> _Flight | None:
        """Queue the stack's next epoch behind the one on the device, before that one's results
        are read back: the device trains on while the host does the epoch's bookkeeping (the
        members' metrics, the young collection, the next epoch's assembly). Between the
        epochs of a K = 1,024 call the device had waited 0.004-0.04 s each, 0.13-0.20 s in 15
        epochs (bench/NOTES_population.md v23). None when the device ran out of memory:
        undone, and not tried again in this population (the next epoch meets the shortage
        itself and halves the population)."""
        t0 = time.perf_counter()
        snap = table = None
        try:
            snap = stack.snapshot()  # queued behind this epoch: the members' state after it
            table = self._train(stack, ahead=True)
        except torch.OutOfMemoryError:
            pass  # undone below, once the failed epoch's tensors are released
        if snap is not None and table is not None:
            return _Flight(stack, table, snap, t0)
        self.ahead_ok = False
        _release_memory(self.device)
        self._call_back(stack, snap)  # no snapshot: nothing of it was queued
        return None

    def _call_back(self, stack: _Stack, snap: tuple[Any, ...] | None) -> None:
        """Undo an epoch launched ahead: the members' state from before it (``snap``, queued
        behind the epoch: it still runs, then is undone), its plans back in front of the
        members' queues."""
        if snap is not None:
            stack.restore(snap)
        for mem in stack.members:
            if mem.next is not None:
                fut: Future[_Plan] = Future()
                fut.set_result(mem.next)
                mem.plans.appendleft(fut)
                mem.next = None

    def _epoch(self, stack: _Stack) -> set[_Member] | None:
        """One epoch of every member; returns those that ended, or None after halving.

        Its steps were queued ahead, during the last epoch, where :meth:`_may_run_ahead`
        allowed; where it allows now, the next epoch's are queued before this one's results
        are read back.
        """
        t0 = time.perf_counter()
        flight, self.flight = self.flight, None
        if flight is not None and flight.stack is stack:
            for mem in stack.members:
                mem.current, mem.next = mem.next, None
            table_dev, t0 = flight.table, flight.t0
            flight = None  # its snapshot too: a queued epoch is never retried
        else:
            if flight is not None:  # another stack's (never, as _may_run_ahead allows): undone
                self._call_back(flight.stack, flight.snap)
            snap = None
            table_dev = None
            try:
                snap = stack.snapshot()
                table_dev = self._train(stack)
            except torch.OutOfMemoryError:
                pass  # handled below, once the failed step's tensors are released
            if table_dev is None:
                self.graph = None
                _release_memory(self.device)
                if snap is not None:
                    stack.restore(snap)
                del snap
                self._shrink(stack)
                return None
            del snap
        back = self._read_back(table_dev)
        if self._may_run_ahead(stack):
            self.flight = self._launch_ahead(stack)
            self.stats["run_ahead"] += self.flight is not None
        table = back()
        read = time.perf_counter()
        seconds = read - max(t0, self.read_at)  # an epoch queued ahead: from the last read-back
        self.read_at = read
        per = 4.0 * self.n_train  # forward and weight gradient, 2 FLOPs a multiply-add each
        self.stats["executed_flops"] += per * stack.macs
        self.stats["useful_flops"] += per * stack.useful_macs
        shape = (stack.K, stack.dims.n, stack.dims.d, stack.dims.k)
        if not self.stats["stacks"] or self.stats["stacks"][-1] != shape:
            self.stats["stacks"].append(shape)
        ended: list[int] = []
        now = time.perf_counter()
        d = self.data
        sizes = [self.n_train, self.n_train, len(d.x_val), len(d.x_val), len(d.x_test), len(d.x_test)]
        rows = [[v / max(1, n) for v in row] for row, n in zip(table.tolist(), sizes, strict=True)]
        for i, mem in enumerate(stack.members):
            mem.current = None
            mem.epoch += 1
            mem.steps += mem.n_steps
            res = mem.result
            tl, ta, vl, va, sl, sa = (row[i] for row in rows)
            stop = False
            if not math.isfinite(tl):
                res.status = "diverged"
                res.error = f"training loss became non-finite ({tl}) in epoch {mem.epoch}"
                stop = True
            else:
                metrics = {
                    "epoch": mem.epoch, "train_loss": tl, "train_accuracy": ta,
                    "val_loss": vl, "val_accuracy": va, "test_loss": sl, "test_accuracy": sa,
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
        if ended and self.flight is not None:  # a member diverged: the stack changes first
            self._call_back(self.flight.stack, self.flight.snap)
            self.flight = None
        for i in ended:
            mem = stack.members[i]
            mem.result.wall_time = now - mem.start
            for fut in mem.plans:
                fut.cancel()
            mem.plans.clear()
        t_keep = time.perf_counter()
        wanted = self.keep_weights
        self._keep_weights(stack, [
            i for i in ended if stack.members[i].result.status != "diverged"
            and (wanted is None or wanted(stack.members[i].index, stack.members[i].result))])
        self.stats["keep_seconds"] += time.perf_counter() - t_keep
        for i in ended:
            mem = stack.members[i]
            mem.net, mem.own, mem.template = None, {}, None
            if self.on_result is not None:
                self.on_result(mem.index, mem.result)
        return {stack.members[i] for i in ended}


def train_population(
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
    precision: str = "fp32",
    on_settle: Callable[[int], Any] | None = None,
    buckets: bool = True,
    stats: dict[str, Any] | None = None,
    keep_weights: Callable[[int, TrainResult], Any] | None = None,
) -> list[TrainResult]:
    """Train many models of one family at once, each exactly as :func:`train_model` would.

    ``configs`` holds one dict per member: the family's parameters (sizes, resampling
    settings such as ``percentage_resample``, ``steps_to_resample``, ``connectivity`` and
    ``resample_reset_adam``) plus the training hyperparameters ``lr`` (default 1e-3),
    ``weight_decay`` (default 0), ``seed`` (default ``seed + index``, the member's position
    in ``configs``) and the recipe of :func:`~core.train_model`: ``batch_size`` (default the
    ``batch_size`` argument), ``lr_schedule`` and ``warmup_epochs``, ``label_smoothing`` and
    ``augment``, each with train_model's default. Member ``i`` is ``create_model(model,
    seed=s, in_dim=..., n_classes=..., **sizes)`` trained like ``train_model(it, data,
    n_epochs, lr, weight_decay, batch_size, seed=s, lr_schedule=..., ...)``: the same initial
    weights, data order and shifts, learning rates, Adam updates, synaptic resampling and
    per-epoch metrics, within floating-point tolerance. Members of different batch sizes
    train in different stacks (a sequence of configs is split by batch size, like size
    buckets; an iterator's members of each batch size train an epoch each in turn).

    ``configs`` may be an iterator: it is read lazily, one config whenever a slot is free.
    Up to ``population_size`` members train at once (an int, or ``"auto"``/``None``: sized
    from the device's free memory on CUDA, 8 on the CPU, never more than a sequence's
    length, never more than ``max_population`` if given); a member that ends frees its slot for the next config at once, so members
    started at different times run side by side with different epoch counters.

    After each of a member's epochs ``on_epoch(index, epoch, metrics)`` is called; a truthy
    return stops that member (status ``"stopped"``). A non-finite training loss ends only
    that member (``"diverged"``); a config that cannot be built (unknown parameter, bad
    size, bad ``lr``) ends only that member (``"failed"``, with the reason in ``error``).
    ``on_result(index, result)`` is called as soon as a member ends. ``on_settle(index)``, if
    given, is asked for every member still training once all members of a stack have reported
    an epoch: a truthy answer stops it there (a decision that needs every member's value, as
    a synchronous successive-halving rung does). If the device runs out
    of memory, the population is halved and no member is lost (see the module's docstring).
    Returns one :class:`TrainResult` per config, in the order the configs were read; each
    member that did not diverge or fail also carries ``result.state_dict``, the trained
    module's weights (CPU tensors). ``keep_weights(index, result)``, if given, is asked for
    each such member as it ends, before ``on_result``: a falsy answer leaves its
    ``state_dict`` None and spares reading its weights back (a study keeps a few best).

    ``precision`` chooses the arithmetic of the matrix products: ``"fp32"`` (the default)
    is exact float32, the members equal ``train_model``'s within rounding; ``"tf32"`` lets
    the matrix products use TF32 tensor cores; ``"bf16"`` runs the forward and backward
    products in bfloat16 with float32 accumulation. Weights, Adam and the metrics stay
    float32 in every mode. On the CPU every precision computes in float32.

    With ``buckets`` (the default) a sequence of dendritic configs whose sizes differ a lot
    is split into size buckets (members of similar neurons x dendrites grids), trained one
    bucket after the other, so that padding stays small; a bucket is never smaller than
    :data:`_MIN_BUCKET` members, and small or uniform populations stay one stack. Every
    member trains exactly as without buckets; only the order in which members run and end
    changes. An iterator of configs is never bucketed (it is read lazily). If ``stats`` is
    a dict it receives ``useful_flops`` and ``executed_flops`` (training FLOPs: 4 per
    multiply-add of an example's forward pass, ``_Dims.macs``, of the members' own sizes and
    of the padded stacks)
    and ``stacks``: the (members, neurons, dendrites, inputs) shapes that were trained;
    ``build_seconds``, ``epoch_seconds`` and ``keep_seconds``; ``staging_seconds``, per epoch
    of a stack, what the main thread spent on its data orders and resampling draws (waiting for
    the staging thread, or staging itself), and ``staged_here``, the epochs it staged itself;
    ``run_ahead``, the epochs queued on the device before the previous epoch's results were
    read back (CUDA, where no callback is given and no member can end or join: the device
    trains on while the host does the bookkeeping). An epoch's ``seconds`` in a member's
    history is its wall time, from the previous read-back for an epoch queued ahead.

    Only the families registered with ``population="mlp"`` (``POPULATION_FAMILIES``,
    ``list_models(population="mlp")``) can be stacked; any other raises a ValueError (train
    those one at a time with ``train_model``).
    """
    check_precision(precision)
    family = get_family(model)  # unknown names list the known ones
    if family.population != "mlp":
        raise _not_batchable(family.name, "its layers are not the stacked kinds")
    if data.task != "classification" or data.n_classes is None:
        raise ValueError(
            f"train_population trains classifiers; dataset {data.name!r} is a {data.task} task. "
            f"Use train_model for it."
        )
    if not isinstance(n_epochs, int) or n_epochs < 1:
        raise ValueError(f"n_epochs must be an integer >= 1, got {n_epochs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
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
    on_device = data.to(dev)
    groups = [list(range(len(configs)))] if isinstance(configs, Sequence) else [[]]
    if isinstance(configs, Sequence):
        groups = _batch_groups(configs, batch_size)
    if buckets and isinstance(configs, Sequence):
        groups = [
            [group[j] for j in sub]
            for group in groups
            for sub in size_buckets(family.name, [configs[i] for i in group], data.in_dim,
                                    data.n_classes or 0, _MIN_BUCKET)
        ]
    results: list[TrainResult | None] = [None] * (len(configs) if isinstance(configs, Sequence) else 0)
    totals: dict[str, Any] = {"useful_flops": 0.0, "executed_flops": 0.0, "stacks": []}
    for group in groups:
        if len(groups) == 1:  # no renumbering: callbacks and seeds see the caller's indices
            sub: Any = configs
            on_e, on_r, on_s, on_k = on_epoch, on_result, on_settle, keep_weights
        else:
            sub = [dict(configs[i], seed=configs[i].get("seed", seed + i))
                   if isinstance(configs[i], dict) else configs[i] for i in group]
            on_e = None if on_epoch is None else (
                lambda j, e, m, g=group: on_epoch(g[j], e, m))  # type: ignore[misc]
            on_r = None if on_result is None else (
                lambda j, r, g=group: on_result(g[j], r))  # type: ignore[misc]
            on_s = None if on_settle is None else (
                lambda j, g=group: on_settle(g[j]))  # type: ignore[misc]
            on_k = None if keep_weights is None else (
                lambda j, r, g=group: keep_weights(g[j], r))  # type: ignore[misc]
        pop = _Population(
            family.name, sub, on_device, n_epochs, batch_size, dev, seed, size, on_e, on_r, precision,
        )
        pop.on_settle, pop.keep_weights = on_s, on_k
        if max_population is not None:
            pop.max_size = max_population
        # Triton launches on the current device (and its stream): the population's, on a
        # worker given cuda:N
        with _matmul_precision(precision, dev), (
                torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()):
            out = pop.run()
        for key, value in pop.stats.items():
            totals[key] = totals[key] + value if key in totals else value  # sums, lists joined
        if len(groups) == 1:
            results = list(out)
        else:
            for i, res in zip(group, out, strict=True):
                results[i] = res
    if stats is not None:
        stats.update(totals)
        stats["buckets"] = len(groups)
    return [r for r in results if r is not None]


def _batch_groups(configs: Sequence[Any], batch_size: int) -> list[list[int]]:
    """Config indices by the batch size each config trains with, in order of first appearance.

    A config without ``batch_size`` (or one that is not a dict: it fails when built) uses the
    population's. One group when every config shares one batch size.
    """
    out: dict[Any, list[int]] = {}
    for i, cfg in enumerate(configs):
        bs = cfg.get("batch_size", batch_size) if isinstance(cfg, dict) else batch_size
        out.setdefault(bs if isinstance(bs, int) and not isinstance(bs, bool) else batch_size,
                       []).append(i)
    return list(out.values())


#: The fewest members a size bucket holds (fewer would leave a large device idle).
_MIN_BUCKET = 128
#: A bucket takes a member only while its members' own rows fill this share of its grid.
_BUCKET_FILL = 0.8


def size_buckets(
    family: str, configs: Sequence[Any], in_dim: int, n_classes: int,
    min_size: int = _MIN_BUCKET, fill: float = _BUCKET_FILL,
) -> list[list[int]]:
    """Split config indices into groups of similar dendrite grids (neurons x dendrites).

    A stack pads every member to its largest neurons x dendrites grid, so a group costs
    ``members x max neurons x max dendrites`` rows. Starting from one group per distinct
    grid, the smallest group is merged into the one that adds the fewest padded rows until
    every group has ``min_size`` members; then groups are merged, cheapest first, while the
    merged group's own rows still fill ``fill`` of its padded rows. Configs whose sizes cannot
    be read (they fail when built) join the first group. One group of every index when the
    family has no dendritic layer, the population is small, or one stack already fills
    ``fill`` of its rows.
    """
    fam = get_family(family)
    every = list(range(len(configs)))
    if family == "vanilla_mlp" or len(configs) < 2 * min_size:
        return [every]
    cells: dict[tuple[int, int], list[int]] = {}
    bad: list[int] = []
    for i, cfg in enumerate(configs):
        try:
            params = {k: v for k, v in cfg.items() if k not in _TRAIN_KEYS}
            r = fam.resolve({"in_dim": in_dim, "n_classes": n_classes, **params})
            cells.setdefault((int(r["n_neurons"]), int(r["n_dendrites"])), []).append(i)
        except (AttributeError, KeyError, TypeError, ValueError):
            bad.append(i)
    if not cells:
        return [every]
    # a group: [members, max neurons, max dendrites, own rows, indices]
    groups: list[list[Any]] = [[len(v), n, d, n * d * len(v), v] for (n, d), v in cells.items()]

    def cost(a: list[Any]) -> int:
        return int(a[0] * a[1] * a[2])

    def merged(a: list[Any], b: list[Any]) -> list[Any]:
        return [a[0] + b[0], max(a[1], b[1]), max(a[2], b[2]), a[3] + b[3], a[4] + b[4]]

    whole = groups[0]
    for grp in groups[1:]:
        whole = merged(whole, grp)
    if whole[3] >= fill * cost(whole):
        return [every]
    while len(groups) > 1:
        small = min(groups, key=lambda a: a[0])
        if small[0] >= min_size:
            break
        best = min((b for b in groups if b is not small),
                   key=lambda b: cost(merged(small, b)) - cost(small) - cost(b))
        groups = [a for a in groups if a is not small and a is not best] + [merged(small, best)]
    while len(groups) > 1:
        pick: tuple[int, int, int] | None = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                m = merged(groups[i], groups[j])
                extra = cost(m) - cost(groups[i]) - cost(groups[j])
                if m[3] >= fill * cost(m) and (pick is None or extra < pick[0]):
                    pick = (extra, i, j)
        if pick is None:
            break
        _, i, j = pick
        groups = [a for n, a in enumerate(groups) if n not in (i, j)] + [merged(groups[i], groups[j])]
    out = [list(a[4]) for a in groups]
    out[0].extend(bad)
    if len(out) == 1:
        return [every]
    return [sorted(g) for g in out]


@contextlib.contextmanager
def _matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """TF32 matrix products for ``"tf32"`` on CUDA (restored after); nothing else changes."""
    if device.type != "cuda" or precision != "tf32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
