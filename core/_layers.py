"""The dendritic layer: sparse dendrites with synaptic resampling, computed on real connections only."""

from __future__ import annotations

import contextlib
import math
import operator
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = ["DendriticLayer", "register_dendritic_hooks", "resample_layers"]

_SLOPE = 0.1
#: how a dendrite's inputs are chosen: anywhere in the input, or within one image patch
CONNECTIVITIES = ("random", "local")


_DEFER = threading.local()  # .draws: a list while deferred_connections() is active in this thread


@contextlib.contextmanager
def deferred_connections() -> Iterator[list[Callable[[], None]]]:
    """Layers built in this block (this thread only) leave their connections and weights undrawn.

    Each adds to the list a closure that draws them from the layer's seed exactly as its
    constructor would have (the same numbers: they depend on the seed alone). Call each
    before the layer's ``indices`` or weights are read. The population runs them on its
    worker threads once the members are built: the draw (a score for every input of every
    dendrite, then a ``topk``) was over half of a member's build. Only for builders that do
    not touch the layer after constructing it (core's own families).
    """
    outer = getattr(_DEFER, "draws", None)
    _DEFER.draws = draws = []
    try:
        yield draws
    finally:
        _DEFER.draws = outer


def infer_image_shape(in_dim: int) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of a flattened square image of ``in_dim`` values with 1 or 3 channels.

    ``n`` and ``3n`` cannot both be perfect squares, so the answer is unique when there is one.
    """
    for c in (1, 3):
        side = math.isqrt(in_dim // c)
        if in_dim % c == 0 and side * side * c == in_dim:
            return (c, side, side)
    return None


def resolve_image_shape(input_shape: Sequence[int] | None, in_dim: int) -> tuple[int, int, int]:
    if input_shape is None:
        shape = infer_image_shape(in_dim)
        if shape is None:
            raise ValueError(
                f"connectivity='local' needs the image shape: in_dim={in_dim} is not a square "
                f"image of 1 or 3 channels, so pass input_shape=(C, H, W) or (H, W)"
            )
        return shape
    dims = tuple(input_shape)
    if len(dims) == 2:
        dims = (1, *dims)
    if (
        len(dims) != 3
        or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in dims)
        or math.prod(dims) != in_dim
    ):
        raise ValueError(
            f"input_shape must be (C, H, W) or (H, W) of positive integers whose product is "
            f"in_dim={in_dim}, got {input_shape!r}"
        )
    return dims  # type: ignore[return-value]


def _patch_side(k: int, image: tuple[int, int, int]) -> tuple[int, int]:
    """(height, width) of the smallest square patch, clipped to the image, holding >= k inputs."""
    c, h, w = image
    side = 1
    while min(side, h) * min(side, w) * c < k:
        side += 1
    return min(side, h), min(side, w)


def layer_seed(seed: Any) -> int:
    """A layer's seed: ``seed`` checked (an integer in ``[-2**63, 2**64)``, what
    ``torch.Generator`` takes), or a random one where it is None."""
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    try:
        value = operator.index(seed)
    except TypeError:
        value = None
    if value is None or isinstance(seed, bool) or not -(2**63) <= value < 2**64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64) or None, got {seed!r}")
    return value


def draw_connections(seed: int, rows: int, in_dim: int, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, k)`` distinct inputs per dendrite, as a layer's construction draws them from
    its ``seed``: the ``k`` best of its candidates (``mask``: the inputs of its patch) by
    :func:`connection_scores`, best first. The scores are distinct within a row, so every
    device picks the same inputs in the same order; the population trainer picks many
    layers' at once on its device (``core._population``, ``_draw_on_device``)."""
    scores = connection_scores(torch.tensor(seed_int64(seed)), torch.arange(rows), in_dim)
    if mask is not None:
        scores.masked_fill_(~mask, -1)  # scores are >= 0: outside inputs come last
    return scores.topk(k, dim=1).indices


def connection_scores(seed: torch.Tensor, rows: torch.Tensor, n_inputs: int) -> torch.Tensor:
    """``(rows, n_inputs)`` construction scores (:func:`input_scores`) of dendrite rows
    ``rows`` of layers seeded ``seed`` (int64 tensors that broadcast: one seed per row when
    many layers' rows are scored at once). Without the Triton kernel, whose compilation on a
    cold cache (~1-2 s) would hold up a population's first build: the kernel is compiled with
    the fused step's, ahead of its first resampling (``core._population``), and the same
    values cost the device a few milliseconds more here."""
    return input_scores(draw_rows(seed, 0, rows, _INIT_SCORES), n_inputs, kernel=False)


def initial_weights(seed: torch.Tensor, rows: torch.Tensor, fan_in: torch.Tensor, stream: int,
                    columns: int) -> torch.Tensor:
    """``(rows, columns)`` initial weights of units ``rows`` (a dendrite's row or a soma's
    neuron) of layers seeded ``seed``, uniform in ``+-1/sqrt(fan_in)`` like ``nn.Linear``
    over the unit's real fan-in (``fan_in`` float, broadcasting against the result: one per
    row when many layers are drawn at once). A unit's first ``fan_in`` columns are its
    weights, the next one its bias; a column's value does not depend on ``columns``, so
    units of several sizes are drawn together at the widest and each takes its own.
    ``stream``: :data:`INIT_DENDRITES` or :data:`INIT_SOMAS`."""
    bound = (1.0 / fan_in.double().sqrt()).float()
    return fresh_weights(draw_rows(seed, 0, rows, stream), columns, bound)


@torch.no_grad()
def draw_weights(seed: int, weight: torch.Tensor, bias: torch.Tensor,
                 soma_weight: torch.Tensor | None = None, soma_bias: torch.Tensor | None = None) -> None:
    """A layer's initial weights from its ``seed``, in place (:func:`initial_weights`): its
    dendrites' weights and biases, and its somas' where it has them. Computed on the CPU
    whatever the tensors' device; every device computes the same numbers."""
    s = torch.tensor(seed_int64(seed))
    rows, k = weight.shape
    w = initial_weights(s, torch.arange(rows), torch.tensor(float(k)), INIT_DENDRITES, k + 1)
    weight.copy_(w[:, :k])
    bias.copy_(w[:, k])
    if soma_weight is not None and soma_bias is not None:
        n, d = soma_weight.shape
        sw = initial_weights(s, torch.arange(n), torch.tensor(float(d)), INIT_SOMAS, d + 1)
        soma_weight.copy_(sw[:, :d])
        soma_bias.copy_(sw[:, d])


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

    ``connectivity`` says where a dendrite's inputs come from: ``"random"`` draws them from
    the whole input; ``"local"`` from one patch of the image (``input_shape``, ``(C, H, W)``
    or ``(H, W)``, inferred for square 1- or 3-channel images): the smallest square,
    clipped to the image, whose pixels (times channels) hold at least ``n_dendrite_inputs``
    inputs, centred on a random pixel and shifted to lie inside the image. Resampling then
    draws replacements from the same patch. The patch origins are the ``patch_origin``
    buffer. ``resample_reset_adam`` says whether a swapped connection's optimizer state is
    reset (the default) or kept.

    The connections and initial weights are a counter of ``seed`` (:func:`draw_connections`,
    :func:`draw_weights`; the patches come from a generator seeded with it); a resampling's
    draws are a counter of ``seed`` and ``n_resamples``, the number of resamplings the layer
    made before (see :func:`swap_weakest`): the same on every device, and the same for a
    population trainer that builds and resamples many layers at once. A
    layer restored from a ``state_dict`` to go on training should get ``n_resamples`` back
    too (it is not part of the state), or its next draws repeat the first ones.

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
        connectivity: str = "random",
        input_shape: Sequence[int] | None = None,
        resample_reset_adam: bool = True,
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
        if connectivity not in CONNECTIVITIES:
            raise ValueError(
                f"connectivity must be one of {', '.join(map(repr, CONNECTIVITIES))}, got {connectivity!r}"
            )
        image = resolve_image_shape(input_shape, in_dim) if connectivity == "local" else None
        self.in_dim = in_dim
        self.n_neurons = n_neurons
        self.n_dendrite_inputs = n_dendrite_inputs
        self.n_dendrites = n_dendrites
        self.synaptic_resampling = bool(synaptic_resampling)
        self.percentage_resample = float(percentage_resample)
        self.steps_to_resample = steps_to_resample
        self.soma_enabled = bool(soma_enabled)
        self.impl = impl
        self.connectivity = connectivity
        self.resample_reset_adam = bool(resample_reset_adam)
        self.n_backward = 0
        self.n_swapped = 0
        self._pending_resample = False
        self._hooked = False  # resampling driven by register_dendritic_hooks
        # construction and resampling draw from counters keyed by the seed (draw_connections,
        # draw_weights, swap_weakest); a local layer's patches from a generator seeded with it
        self._seed = layer_seed(seed)
        self.n_resamples = 0  # resamplings made: the counter of the next one's draws

        n_dend = n_neurons * n_dendrites
        self.image_shape: tuple[int, int, int] | None = image
        self.patch_size: tuple[int, int] | None = None
        if image is not None:
            # Each dendrite reads one square patch of the image (every channel of its pixels).
            c, h, w = image
            self.patch_size = _patch_side(n_dendrite_inputs, image)
            ph, pw = self.patch_size
            gen = torch.Generator().manual_seed(self._seed)
            centre_y = torch.randint(0, h, (n_dend,), generator=gen)
            centre_x = torch.randint(0, w, (n_dend,), generator=gen)
            origin = torch.stack(
                [(centre_y - ph // 2).clamp(0, h - ph), (centre_x - pw // 2).clamp(0, w - pw)], 1
            )
            self.register_buffer("patch_origin", origin)
        self.register_buffer("indices", torch.empty(n_dend, n_dendrite_inputs, dtype=torch.long))
        self.weight = nn.Parameter(torch.empty(n_dend, n_dendrite_inputs))
        self.bias = nn.Parameter(torch.empty(n_dend))
        if self.soma_enabled:
            self.soma_weight = nn.Parameter(torch.empty(n_neurons, n_dendrites))
            self.soma_bias = nn.Parameter(torch.empty(n_neurons))
        else:
            self.register_parameter("soma_weight", None)
            self.register_parameter("soma_bias", None)
        draws = getattr(_DEFER, "draws", None)
        if draws is None:
            self._draw()
        else:
            draws.append(self._draw)

    def _draw(self) -> None:
        """Everything drawn from the layer's seed at construction: the connections and the weights."""
        self._draw_connections()
        self.reset_parameters()

    def _draw_connections(self) -> None:
        """Distinct inputs per dendrite, drawn uniformly among its candidates (:func:`draw_connections`)."""
        mask = self.patch_mask() if self.image_shape is not None else None
        self.indices.copy_(draw_connections(self._seed, self.n_neurons * self.n_dendrites,
                                            self.in_dim, self.n_dendrite_inputs, mask))

    def patch_mask(self) -> torch.Tensor:
        """``(n_neurons * n_dendrites, in_dim)`` booleans: the inputs each dendrite's patch holds.

        Only for ``connectivity="local"``; inputs are laid out as a flattened ``(C, H, W)``.
        """
        if self.image_shape is None or self.patch_size is None:
            raise ValueError("patch_mask needs connectivity='local'")
        c, h, w = self.image_shape
        ph, pw = self.patch_size
        origin = self.patch_origin
        rows = torch.arange(h, device=origin.device)
        cols = torch.arange(w, device=origin.device)
        y0, x0 = origin[:, :1], origin[:, 1:]
        in_y = (rows >= y0) & (rows < y0 + ph)  # (D, H)
        in_x = (cols >= x0) & (cols < x0 + pw)  # (D, W)
        mask = in_y[:, :, None] & in_x[:, None, :]
        return mask[:, None].expand(-1, c, -1, -1).reshape(len(origin), c * h * w)

    # -- initialisation -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Initialise like ``nn.Linear`` over each unit's real fan-in, from the layer's seed
        (:func:`draw_weights`): the same initial weights every time."""
        soma = (self.soma_weight, self.soma_bias) if self.soma_enabled else ()
        draw_weights(self._seed, self.weight, self.bias, *soma)

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
        candidates = self.in_dim
        if self.image_shape is not None and self.patch_size is not None:
            candidates = self.image_shape[0] * self.patch_size[0] * self.patch_size[1]
        return min(math.floor(k * self.percentage_resample), candidates - k)

    @torch.no_grad()
    def resample(self, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Swap the weakest connections of every dendrite for new random inputs.

        In each dendrite the ``floor(k * percentage_resample)`` weights of smallest
        magnitude are dropped and as many inputs that the dendrite does not use (within its
        patch, for ``connectivity="local"``) are connected, with fresh weights. The
        optimizer state of the swapped slots is reset, or kept when ``resample_reset_adam``
        is false. Returns the number of swapped connections.
        """
        m = self.n_to_resample()
        if not self.synaptic_resampling or m <= 0:
            return 0
        swapped = swap_weakest(
            self.weight, self.indices, self.in_dim, m, (self._seed, self.n_resamples),
            optimizer if self.resample_reset_adam else None,
            self.patch_mask() if self.image_shape is not None else None,
        )
        self.n_resamples += 1
        self.n_swapped += swapped
        return swapped

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
            + (f", connectivity='local', input_shape={self.image_shape}" if self.image_shape else "")
        )


# -- the resampling draws ----------------------------------------------------------------
# A resampling's random numbers come from a counter-based generator: each is a hash of the
# layer's seed, the resampling's number, the dendrite (row), the input or swap slot and a
# stream, so that any set of them can be computed on any device, in any order and in any
# batch, and equal what a lone layer computes. The population trainer draws every member's
# scores on the device at the step they are due (core._population); the CPU threads that drew
# them ahead (a ``rand`` and a ``topk`` over every input of every dendrite, ~1 ms a member
# and event) could not keep up with the device (bench/NOTES_population.md, v14).
_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27: a 32-bit value times it is exact in int64
_COL_SALT = 0x1B873593
_SCORES, _FRESH = 1, 2  # the streams: the inputs' scores, the fresh weights
# the construction's streams (its event: 0): the connections' scores, the dendrites' weights
# and biases, the somas' (draw_connections, draw_weights)
_INIT_SCORES, INIT_DENDRITES, INIT_SOMAS = 3, 4, 5


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash of ``x`` (int64, values in [0, 2**32)), in place (every
    caller passes a fresh tensor): half the memory traffic of the out-of-place expression."""
    for _ in range(2):
        x.bitwise_xor_(x >> 16).mul_(_MIX).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def draw_rows(seed: torch.Tensor, event: torch.Tensor, rows: torch.Tensor, stream: int) -> torch.Tensor:
    """Each row's key for one stream of a resampling's draws (int64, in [0, 2**32)).

    ``seed`` and ``event`` (int64, the layer's seed and how many resamplings it made before)
    broadcast against ``rows`` (int64, the dendrites' own row numbers).
    """
    lo, hi = seed & _M32, (seed >> 32) & _M32
    # the stream enters hashed, after the whole seed: XORed into the seed's low bits (as
    # before v25), seed s on stream t drew what seed s ^ t ^ u drew on stream u
    h = _mix_(_mix_(_mix_(_mix_(lo) ^ hi) ^ _stream_salt(stream)) ^ (event & _M32))
    return _mix_(h ^ rows)


def _stream_salt(stream: int) -> int:
    return (stream * 0x9E3779B1) & _M32  # distinct for distinct streams below 2**32 (an odd multiplier)


def _column_hash(n: int, device: torch.device) -> torch.Tensor:
    return _mix_(torch.arange(n, dtype=torch.long, device=device) ^ _COL_SALT)


def key_bits(n_inputs: int) -> int:
    """Low bits of a score that hold its input (the rest hold the hash)."""
    return max(1, (n_inputs - 1).bit_length())


#: The fewest hash bits an int32 score keeps (31 less the input's bits: up to 2,048 inputs). Wider
#: inputs get int64 scores with the whole 32-bit hash: with few hash bits, inputs of equal hash
#: would be ranked by their number, and the draw would lean to the higher inputs.
_MIN_HASH_BITS = 20


def int32_scores(n_inputs: int) -> bool:
    """Whether :func:`input_scores` over ``n_inputs`` inputs are int32 (up to 2,048 inputs)."""
    return 31 - key_bits(n_inputs) >= _MIN_HASH_BITS


def input_scores(row_keys: torch.Tensor, n_inputs: int, kernel: bool = True) -> torch.Tensor:
    """``(..., rows, n_inputs)`` scores from :func:`draw_rows`'s ``_SCORES`` keys.

    A score's high bits are a hash of its row key and input, its low bits the input itself:
    non-negative and distinct within a row, so the k best are the same set in the same order
    whatever sorts them (no ties to break, on any device). int32 up to 2,048 inputs, where
    the hash keeps at least ``_MIN_HASH_BITS`` bits; int64 above. On CUDA with Triton the
    int32 scores are one kernel (``core._kernels.input_scores``, the same values), unless
    ``kernel`` is false.
    """
    from . import _kernels  # noqa: PLC0415 - imports torch only; Triton when used

    narrow = int32_scores(n_inputs)
    if kernel and narrow and _kernels.available(row_keys.device) and row_keys.numel():
        try:
            return _kernels.input_scores(row_keys, n_inputs)
        except Exception:  # noqa: BLE001 - a Triton that cannot build it: the same values below
            _kernels.disable()
    cb = key_bits(n_inputs)
    h = _mix_(row_keys.unsqueeze(-1) ^ _column_hash(n_inputs, row_keys.device))
    cols = torch.arange(n_inputs, dtype=torch.long, device=row_keys.device)
    if not narrow:  # the whole hash above the input's bits
        return h.bitwise_left_shift_(cb).bitwise_or_(cols)
    return h.bitwise_right_shift_(cb + 1).bitwise_left_shift_(cb).bitwise_or_(cols).to(torch.int32)


def fresh_weights(row_keys: torch.Tensor, m: int, bound: torch.Tensor) -> torch.Tensor:
    """``(..., rows, m)`` weights uniform in ``[-bound, bound)`` from :func:`draw_rows`'s
    ``_FRESH`` keys; ``bound`` (float32) broadcasts against the result. The same float32
    operations on every device, so the same values."""
    h = _mix_(row_keys.unsqueeze(-1) ^ _column_hash(m, row_keys.device))
    u = (h >> 8).to(torch.float32) * (1.0 / (1 << 24))  # exact: 24 bits
    return u * (bound + bound) - bound


def seed_int64(seed: int) -> int:
    """A seed as int64 holds it (``torch.Generator`` takes seeds up to 2**64 - 1): its 64 bits."""
    seed %= 1 << 64
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _draw_key(seed: int, event: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(seed_int64(seed), dtype=torch.long, device=device),
            torch.tensor(event, dtype=torch.long, device=device))


@torch.no_grad()
def swap_weakest(
    weight: torch.Tensor,
    indices: torch.Tensor,
    n_inputs: int,
    m: int,
    draw: tuple[int, int],
    optimizer: torch.optim.Optimizer | None = None,
    allowed: torch.Tensor | None = None,
) -> int:
    """Reconnect the ``m`` weakest of each row's sparse connections to inputs it does not use.

    ``weight`` and ``indices`` are ``(rows, k)``: row ``r`` reads inputs ``indices[r]`` (of
    ``n_inputs``) with ``weight[r]``. The new inputs are drawn uniformly from the row's
    unused inputs (and, with the boolean ``(rows, n_inputs)`` mask ``allowed``, only where
    it is true): the best-scored ones by :func:`input_scores`, then fresh weights, uniform
    in ``[-1/sqrt(k), 1/sqrt(k))`` (:func:`fresh_weights`), both from ``draw``: the layer's
    seed and how many resamplings it made before. The optimizer state of the swapped slots,
    when ``optimizer`` is given, is zeroed. Returns the number of swapped connections.
    """
    dev = weight.device
    seed, event = _draw_key(*draw, dev)
    rows = torch.arange(indices.shape[0], dtype=torch.long, device=dev)
    weakest = weakest_slots(weight.abs(), m)  # (rows, m)
    scores = input_scores(draw_rows(seed, event, rows, _SCORES), n_inputs)
    if allowed is not None:
        scores.masked_fill_(~allowed.to(dev), -2)  # nor inputs outside the allowed set
    scores.scatter_(1, indices, -1)  # nor inputs in use
    indices.scatter_(1, weakest, scores.topk(m, dim=1).indices)  # the best first (no ties)
    bound = torch.tensor(1.0 / math.sqrt(weight.shape[1]), dtype=torch.float32, device=dev)
    fresh = fresh_weights(draw_rows(seed, event, rows, _FRESH), m, bound)
    weight.scatter_(1, weakest, fresh.to(weight.dtype))
    if optimizer is not None:
        for value in optimizer.state.get(weight, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                value.scatter_(1, weakest, 0.0)
    return weakest.numel()


def weakest_slots(magnitude: torch.Tensor, m: int) -> torch.Tensor:
    """The positions of the ``m`` smallest of each row's last dimension, smallest first, equal
    magnitudes in their order (a stable sort). Shared by :func:`swap_weakest` and the
    population trainer's resampling, which pads the rows of its smaller members with ``inf``
    and takes the first ``m`` of more: the same positions in the same order, ties included."""
    return magnitude.sort(dim=-1, stable=True).indices[..., :m]


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
