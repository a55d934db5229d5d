"""Triton kernels for population training: the soma-and-readout head, forward and backward,
fused; Adam over the population's flat parameter rows in one pass; resampling scores.

A population of ``dendritic_simple`` members spends most of a step after the dendrite product
in small element-wise and reduction kernels (LeakyReLU, the soma's weighted sum, its
LeakyReLU, the readout, cross-entropy, and the gradients of each), every one a full pass over
the (members, batch, dendrites) activations. :func:`soma_head` does all of them in one pass:
from the dendrites' pre-activations ``z`` it computes each member's mean cross-entropy (with
the member's own label smoothing, zero by default), its number of correct predictions, the
gradient with respect to ``z`` and the gradients of the soma and readout parameters. Sums over the batch are written per batch block and added up
afterwards, so the result is deterministic.

:func:`adam_rows` is ``torch.optim.Adam``'s update for every member's flat row at once (each
row with its own learning rate, step count and weight decay): one read of the gradient,
parameters and moments and one write of each, where the element-wise PyTorch ops make about
ten passes over those buffers. :func:`adam_connections` is the same update for the dendrite
weights alone, reading each real connection's gradient from the dense gradient matrix and
skipping the padded slots (a population of mixed sizes is mostly padding).

:func:`input_scores` computes a resampling's scores of every input of every dendrite from
the counter-based generator's row keys (``core._layers.input_scores``, the same integers) in
one pass.

Triton specializes a kernel on each integer argument's divisibility by 16 and each pointer's
16-byte alignment; sizes and offsets are left unspecialized and pointers are whole tensors, so
a study compiles each kernel once per tile shape (the head's power-of-2 neurons of a band),
whatever its stacks' sizes.

Triton runs on CUDA only; :func:`available` says whether the kernels can be used, and
callers keep their plain PyTorch path for everything else (the CPU, no Triton).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

__all__ = [
    "adam_connections", "adam_rows", "ahead", "available", "compiling_ahead", "disable", "input_scores", "soma_eval",
    "soma_head",
]

_SLOPE = 0.1
_TILE = 8192  # the fused head's (batch block x neurons x dendrites) elements per program


@functools.cache
def _triton() -> Any:
    try:
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - depends on the machine
        return None

    # Triton compiles a kernel anew for each pattern of "integer argument divisible by 16" (or
    # equal to 1); the grid's sizes and the parameters' offsets change with every stack shape,
    # and the batch and its block count with an epoch's last, partial batch, so they are left
    # unspecialized (the row stride is always a multiple of 16: _Dims.stride); so are z's and
    # the labels' strides and the gradient switch, which the evaluation (soma_eval) sets
    # otherwise than the step: both run the same compiled kernel
    @triton.jit(do_not_specialize=["B", "NN", "DD", "NS", "DS", "ZM", "ZB", "YM", "m0", "db_off", "sw_off",
                                   "sb_off", "wo_off", "bo_off", "n_blocks", "grad"])
    def head_kernel(
        z_ptr, sw_ptr, sb_ptr, wo_ptr, bo_ptr, y_ptr, eps_ptr,
        gz_ptr, part_ptr, loss_ptr, correct_ptr,
        B, NN, DD, NS, DS, ZM, ZB, YM, m0, C, p_stride, db_off, sw_off, sb_off, wo_off, bo_off, n_blocks,
        part_stride, inv_b, grad,
        BB: tl.constexpr, NP: tl.constexpr, DP: tl.constexpr, CP: tl.constexpr,
        ADD_DB: tl.constexpr, GZ_BF16: tl.constexpr, DOT: tl.constexpr,
        O_SB: tl.constexpr, O_WO: tl.constexpr, O_BO: tl.constexpr, O_DB: tl.constexpr,
    ):
        m = tl.program_id(0)
        blk = tl.program_id(1)
        offs_b = blk * BB + tl.arange(0, BB)
        i = tl.arange(0, NP)
        j = tl.arange(0, DP)
        c = tl.arange(0, CP)
        mb = offs_b < B
        mi = i < NN
        mj = j < DD
        mc = c < C
        b3 = offs_b[:, None, None]
        i3 = i[None, :, None]
        j3 = j[None, None, :]
        m3 = (b3 < B) & (i3 < NN) & (j3 < DD)
        zp = z_ptr + m.to(tl.int64) * ZM + b3.to(tl.int64) * ZB + i3 * DD + j3
        z = tl.load(zp, mask=m3, other=0.0).to(tl.float32)
        mg = m + m0  # the member's row of p, y and eps (z, gz and the sums are the band's own)
        pm = p_stride * mg.to(tl.int64)
        mij = mi[:, None] & mj[None, :]
        if ADD_DB:  # z is the product alone (in its own dtype): the dendrites' bias, in float32
            db = tl.load(sw_ptr + pm + db_off + i[:, None] * DS + j[None, :], mask=mij, other=0.0)
            z = z + db[None, :, :]
        h = tl.where(z > 0, z, z * 0.1)
        sw = tl.load(sw_ptr + pm + sw_off + i[:, None] * DS + j[None, :], mask=mij, other=0.0)
        sb = tl.load(sb_ptr + pm + sb_off + i, mask=mi, other=0.0)
        s_pre = tl.sum(h * sw[None, :, :], axis=2) + sb[None, :]
        s = tl.where(s_pre > 0, s_pre, s_pre * 0.1)
        wo = tl.load(wo_ptr + pm + wo_off + c[:, None] * NS + i[None, :],
                     mask=mc[:, None] & mi[None, :], other=0.0)
        bo = tl.load(bo_ptr + pm + bo_off + c, mask=mc, other=0.0)
        if DOT:  # the readout's three products as float32 dots (no (BB, CP, NP) temporaries)
            logits = tl.dot(s, tl.trans(wo), input_precision="ieee") + bo[None, :]
        else:
            logits = tl.sum(s[:, None, :] * wo[None, :, :], axis=2) + bo[None, :]
        logits = tl.where(mc[None, :], logits, float("-inf"))
        y = tl.load(y_ptr + mg.to(tl.int64) * YM + offs_b, mask=mb, other=0)
        mx = tl.max(logits, axis=1)
        e = tl.exp(logits - mx[:, None])
        se = tl.sum(e, axis=1)
        hit = c[None, :] == y[:, None]
        ly = tl.sum(tl.where(hit, logits, 0.0), axis=1)
        # label smoothing eps: (1 - eps) * CE + eps * the mean over classes of -log p
        eps = tl.load(eps_ptr + mg)
        lsum = tl.sum(tl.where(mc[None, :], logits, 0.0), axis=1)
        ce = tl.where(mb, mx + tl.log(se) - (1.0 - eps) * ly - eps * (lsum / C), 0.0)
        pred = tl.argmax(logits, axis=1)
        right = tl.where(mb & (pred == y), 1.0, 0.0)
        tl.store(loss_ptr + m * n_blocks + blk, tl.sum(ce, axis=0))
        tl.store(correct_ptr + m * n_blocks + blk, tl.sum(right, axis=0))
        if grad:  # the step's gradients (the evaluation wants the sums above alone)
            dlog = (e / se[:, None] - (1.0 - eps) * tl.where(hit, 1.0, 0.0) - eps / C) * inv_b
            dlog = tl.where(mb[:, None] & mc[None, :], dlog, 0.0)
            # per-block partial sums of the small parameters' gradients, laid out by head_parts
            part = part_ptr + (m.to(tl.int64) * n_blocks + blk) * part_stride
            if DOT:
                g_wo = tl.dot(tl.trans(dlog), s, input_precision="ieee")  # (CP, NP)
                ds = tl.dot(dlog, wo, input_precision="ieee")  # (BB, NP)
            else:
                g_wo = tl.sum(dlog[:, :, None] * s[:, None, :], axis=0)
                ds = tl.sum(dlog[:, :, None] * wo[None, :, :], axis=1)
            g_bo = tl.sum(dlog, axis=0)
            ds = tl.where(s_pre > 0, ds, ds * 0.1)
            ds = tl.where(mb[:, None], ds, 0.0)
            g_sb = tl.sum(ds, axis=0)
            g_sw = tl.sum(ds[:, :, None] * h, axis=0)  # (NP, DP)
            tl.store(part + i[:, None] * DP + j[None, :], g_sw)
            tl.store(part + O_SB + i, g_sb)
            tl.store(part + O_WO + c[:, None] * NP + i[None, :], g_wo)
            tl.store(part + O_BO + c, g_bo)
            dh = ds[:, :, None] * sw[None, :, :]
            dz = tl.where(z > 0, dh, dh * 0.1)
            tl.store(part + O_DB + i[:, None] * DP + j[None, :], tl.sum(dz, axis=0))
            gp = gz_ptr + m.to(tl.int64) * ZM + b3.to(tl.int64) * ZB + i3 * DD + j3
            if GZ_BF16:  # rounded to nearest even, as Tensor.to rounds
                tl.store(gp, dz.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=m3)
            else:
                tl.store(gp, dz, mask=m3)

    global _adam_update  # a module global: Triton's interpreter sees no closure variables

    @triton.jit
    def _adam_update(p, m, v, g, row, wd_ptr, step_ptr, bc2_ptr, w1, beta2, w2, eps, HAS_WD: tl.constexpr):
        """Adam's step of member ``row``'s values ``p`` with moments ``m``, ``v`` and gradient
        ``g``: the operations of Tensor.lerp_ (weight < 0.5), addcmul_, sqrt, div, add, sub,
        with correctly rounded square root and divisions as PyTorch's (tl.sqrt and / are the
        fast, approximate ones); the compiler may still fuse a multiply and an add into one FMA.
        Shared by both Adam kernels (inlined into each)."""
        if HAS_WD:
            g = g + tl.load(wd_ptr + row) * p
        m = m + w1 * (g - m)
        v = v * beta2 + (w2 * g) * g
        denom = tl.div_rn(tl.sqrt_rn(v), tl.load(bc2_ptr + row)) + eps
        p = p - tl.div_rn(m, denom) * tl.load(step_ptr + row)
        return p, m, v

    @triton.jit(do_not_specialize=["P", "p_stride", "col0"])
    def adam_kernel(
        p_ptr, m_ptr, v_ptr, g_ptr, step_ptr, bc2_ptr, wd_ptr, P, p_stride, col0,
        w1, beta2, w2, eps, HAS_WD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # among the columns from col0 on
        mask = offs < P
        base = row.to(tl.int64) * p_stride + col0
        p = tl.load(p_ptr + base + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + base + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + row.to(tl.int64) * P + offs, mask=mask, other=0.0)
        p, m, v = _adam_update(p, m, v, g, row, wd_ptr, step_ptr, bc2_ptr, w1, beta2, w2, eps, HAS_WD)
        tl.store(p_ptr + base + offs, p, mask=mask)
        tl.store(m_ptr + base + offs, m, mask=mask)
        tl.store(v_ptr + base + offs, v, mask=mask)

    @triton.jit(do_not_specialize=["P", "R", "KPAD", "D"])
    def adam_connections_kernel(
        p_ptr, m_ptr, v_ptr, gd_ptr, at_ptr, n_ptr, d_ptr, k_ptr, step_ptr, bc2_ptr, wd_ptr,
        P, R, KPAD, D, w1, beta2, w2, eps, HAS_WD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        n = tl.load(n_ptr + row)
        d = tl.load(d_ptr + row)
        k = tl.load(k_ptr + row)
        start = tl.program_id(1) * BLOCK
        if start < n * d * k:  # the member's own slots, numbered (neuron, dendrite, input)
            s = start + tl.arange(0, BLOCK)
            mask = s < n * d * k
            own = s // k  # the member's own dendrite, then its place on the stack's grid
            j = s - own * k
            off = ((own // d) * D + own % d) * KPAD + j
            base = row.to(tl.int64) * P
            at = tl.load(at_ptr + row.to(tl.int64) * R * KPAD + off, mask=mask, other=0)
            g = tl.load(gd_ptr + at, mask=mask, other=0.0).to(tl.float32)
            p = tl.load(p_ptr + base + off, mask=mask, other=0.0)
            m = tl.load(m_ptr + base + off, mask=mask, other=0.0)
            v = tl.load(v_ptr + base + off, mask=mask, other=0.0)
            p, m, v = _adam_update(p, m, v, g, row, wd_ptr, step_ptr, bc2_ptr, w1, beta2, w2, eps, HAS_WD)
            tl.store(p_ptr + base + off, p, mask=mask)
            tl.store(m_ptr + base + off, m, mask=mask)
            tl.store(v_ptr + base + off, v, mask=mask)

    global _mix32  # a module global, as _adam_update

    @triton.jit
    def _mix32(x):
        """core._layers._mix_ on uint32 (whose products wrap as the int64 ones are masked)."""
        x = ((x >> 16) ^ x) * 0x45D9F3B
        x = ((x >> 16) ^ x) * 0x45D9F3B
        return (x >> 16) ^ x

    @triton.jit(do_not_specialize=["N", "CB"])
    def scores_kernel(key_ptr, out_ptr, N, CB, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        c = col.to(tl.uint32)
        h = _mix32(tl.load(key_ptr + row).to(tl.uint32) ^ _mix32(c ^ 0x1B873593))
        key = ((h >> (CB + 1)) << CB) | c
        tl.store(out_ptr + row.to(tl.int64) * N + col, key.to(tl.int32), mask=col < N)

    return triton, head_kernel, adam_kernel, adam_connections_kernel, scores_kernel


_DISABLED: list[bool] = []
_AHEAD = threading.local()  # .on: this thread is inside compiling_ahead


def ahead() -> bool:
    """Whether this thread is inside :func:`compiling_ahead` (its launches only compile)."""
    return bool(getattr(_AHEAD, "on", False))


@contextlib.contextmanager
def compiling_ahead(workers: int = 8) -> Iterator[bool]:
    """Compile, in ``workers`` threads at once, what this thread's calls of the entry points
    below would launch, and launch nothing; leaving the block waits for every compilation and
    raises the first failure (the launch that needs the kernel would raise it too).

    A kernel compiled from a cold cache takes ~1.3 s, most of it in LLVM and ``ptxas``, which
    run without the GIL; a study's first stack compiled 8 of them one after another (10.5–17.6 s
    on a fresh H200, bench/results/bench_e2e_gpu_v14.txt). Yields False and compiles nothing
    where this Triton has no asynchronous compilation (``triton.runtime._async_compile``,
    Triton >= 3.4); the launches then compile as they come.
    """
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        yield False
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="dendro-compile") as pool, AsyncCompileMode(pool):
        _AHEAD.on = True
        try:
            yield True
        finally:
            _AHEAD.on = False


def _launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or only its compilation inside :func:`compiling_ahead`."""
    if ahead():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def disable() -> None:
    """Stop offering the fused head in this process (after Triton failed to build it)."""
    _DISABLED.append(True)


def available(device: torch.device) -> bool:
    """Whether the fused head runs here: a CUDA device and an importable Triton."""
    return device.type == "cuda" and not _DISABLED and _triton() is not None


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


#: The head's three readout products as tl.dot in float32 with input_precision "ieee" (exact
#: products, sums in another order) wherever the block and the padded neurons are >= 16 (tl.dot's
#: smallest side). On an H200 (bench/head_block_probe.py) the broadcast-and-sum form gave dL/dz
#: 1e-3 (relative) away from the same kernel at blocks of 4 or 8 examples once the block reached
#: 16, at 16 and 32 padded neurons, as a TF32 product would (at 8 neurons it stayed exact at
#: every block); tl.dot "ieee" agreed with the small blocks to 2e-7 and ran 5-10% faster.
HEAD_DOT = True


def head_config(n: int, d: int, C: int) -> tuple[int, int, int, int, bool]:
    """(NP, DP, CP, BB, DOT): the head's padded neurons, dendrites, classes, its batch block,
    and whether the readout's products are tl.dot (else broadcast sums)."""
    NP, DP, CP = _pow2(n), _pow2(d), max(16, _pow2(C))
    BB = _block(NP, DP, CP)
    dot = HEAD_DOT and BB >= 16 and NP >= 16
    if dot:  # the dots hold fewer temporaries: 32 examples of a 32 x 16 grid, 1.09 against 1.23 ms
        BB = max(BB, min(32, _pow2_floor(2 * _TILE // (NP * DP))))
    return NP, DP, CP, BB, dot


class HeadParts(NamedTuple):
    """Where a row of the head's per-block partial sums keeps each gradient (offsets in
    floats) for a grid padded to (NP, DP) and CP classes: the soma weights (NP, DP) first,
    then the soma bias (NP), the readout weight (CP, NP), its bias (CP) and the dendrites'
    bias (NP, DP); ``stride``: the row's length."""

    sb: int
    wo: int
    bo: int
    db: int
    stride: int


def head_parts(NP: int, DP: int, CP: int) -> HeadParts:
    """The layout of the head kernel's partial-sum rows (:class:`HeadParts`)."""
    sb = NP * DP
    wo = sb + NP
    bo = wo + CP * NP
    db = bo + CP
    return HeadParts(sb, wo, bo, db, db + NP * DP)


def _block(NP: int, DP: int, CP: int) -> int:
    """The fused head's batch block for a (neurons, dendrites, classes) grid padded to powers of 2.

    About 8,192 elements of z a program with 4 warps: 0.94 ms against 1.63 ms for 4,096 at the
    seed space's 20 x 15 grid, K = 996 (bench/head_block_probe.py, one H200); 16,384 spills.
    The (block, classes, neurons) products grow with the block too: where they would pass
    32,768 elements (many classes), the block stays at the 4,096 rule's (the speed was measured
    with 10 classes only).
    """
    bb = _pow2_floor(max(1, min(64, _TILE // (NP * DP))))
    if bb * CP * NP > 32768:
        bb = _pow2_floor(max(1, min(64, 4096 // (NP * DP))))
    return bb


def soma_head(
    z: torch.Tensor, p: torch.Tensor, offsets: dict[str, int], n: int, d: int, y: torch.Tensor,
    smoothing: torch.Tensor | None = None, add_bias: bool = False,
    grad_dtype: torch.dtype | None = None, n_stored: int | None = None, first: int = 0,
    d_stored: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Loss, correct counts and gradients of ``LeakyReLU -> soma -> LeakyReLU -> Linear -> CE``.

    ``z`` (K, B, R) holds the dendrites' pre-activations (bias included) on the (neuron,
    dendrite) grid, its first ``n*d`` columns (``R`` may be larger: a fused band's rows aligned
    for its products; dL/dz is zero past them); the soma weights (n, d) and bias (n) and the readout weight (C, n) and bias
    (C) are read from each member's flat parameter row ``p`` (K, P) at ``offsets``
    (``sw``, ``sb``, ``wo``, ``bo``; the readout's shape from ``offsets["C"]``). ``y`` (K, B)
    holds the labels. Returns ``(mean loss (K,), correct (K,), dL/dz (K, B, R), dL/dsw
    (K, n, d), dL/dsb (K, n), dL/dwo (K, C, n), dL/dbo (K, C), dL/ddb (K, n*d))`` for the loss
    ``sum over members of the batch-mean cross-entropy``, ``db`` being the dendrites' bias
    (the batch sum of dL/dz). ``smoothing`` (K,) float32, if given, is each member's label
    smoothing (``F.cross_entropy(label_smoothing=...)``); the loss and every gradient are then
    those of the smoothed cross-entropy.

    ``add_bias``: ``z`` is the product without the bias, which is read at ``offsets["db"]``
    and added in float32 (``z`` may then be bfloat16: it is widened first, as
    ``z.float() + db`` does, without that pass over memory). ``grad_dtype``: the dtype
    dL/dz is written in (default ``z``'s; bfloat16 for the low-precision weight gradient,
    rounded as ``Tensor.to`` rounds), the other gradients being summed from its float32 values.

    ``n_stored``: the neurons the parameter rows are laid out for (default ``n``). With
    ``n`` smaller, ``z`` holds only the first ``n`` neurons' dendrites (a band of members that
    use no more) and the head reads, and returns the gradients of, those neurons alone.
    ``d_stored``: likewise the dendrites per neuron the rows are laid out for (default ``d``):
    with ``d`` smaller, ``z`` is laid out on the band's own (n, d) grid, the parameters on the
    rows' (n_stored, d_stored) one.
    ``first``: the band's first member among the rows of ``p``, ``y`` and ``smoothing``, which
    are then the whole population's (``z`` and what is returned are the band's): whole
    tensors keep their pointers' alignment, which Triton would otherwise compile anew for.
    """
    K, B, R = z.shape  # K: the band's members
    C = offsets["C"]
    NP, DP, CP = head_config(n, d, C)[:3]
    at = head_parts(NP, DP, CP)
    gz = torch.empty_like(z, dtype=grad_dtype or z.dtype)
    if R > n * d:  # the aligned rows past the grid: the kernel covers the grid alone
        gz[:, :, n * d :].zero_()
    eps = smoothing if smoothing is not None else torch.zeros(first + K, device=z.device)
    loss, correct, part = _launch_head(z, p, offsets, n, d, y, eps, gz, B, K, (B * R, R, B), first, add_bias,
                                       gz.dtype, n_stored, d_stored)
    assert part is not None
    tot = part.sum(1)
    g_sw = tot[:, : at.sb].view(K, NP, DP)[:, :n, :d]
    g_sb = tot[:, at.sb : at.sb + n]
    g_wo = tot[:, at.wo : at.bo].view(K, CP, NP)[:, :C, :n]
    g_bo = tot[:, at.bo : at.bo + C]
    g_db = tot[:, at.db :].view(K, NP, DP)[:, :n, :d].reshape(K, n * d)
    return loss.sum(1) / B, correct.sum(1), gz, g_sw, g_sb, g_wo, g_bo, g_db


def soma_eval(
    z: torch.Tensor, p: torch.Tensor, offsets: dict[str, int], n: int, d: int, y: torch.Tensor, rows: int,
    add_bias: bool = False, grad_dtype: torch.dtype | None = None, n_stored: int | None = None, first: int = 0,
    d_stored: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`soma_head`'s summed cross-entropy (no label smoothing) and correct counts, without
    its gradients, of every member on one shared batch.

    ``z`` (N, K * rows) holds each example's pre-activations member after member, ``rows``
    columns each (the first ``n*d`` on the (neuron, dendrite) grid): ``x @ W^T`` for the
    members' dense matrices stacked ``(K * rows, in)``. ``y`` (N,) holds the labels. The other
    arguments are :func:`soma_head`'s; ``grad_dtype`` is the one the step passes, so that the
    evaluation runs the step's compiled kernel (its gradients switched off) and compiles nothing
    of its own. Returns ``(loss sums (K,), correct (K,))``.
    """
    N, K = z.shape[0], z.shape[1] // rows
    loss, correct, _ = _launch_head(z, p, offsets, n, d, y, torch.zeros(first + K, device=z.device), None, N, K,
                                    (rows, K * rows, 0), first, add_bias, grad_dtype or z.dtype, n_stored, d_stored)
    return loss.sum(1), correct.sum(1)


def _launch_head(
    z: torch.Tensor, p: torch.Tensor, offsets: dict[str, int], n: int, d: int, y: torch.Tensor, eps: torch.Tensor,
    gz: torch.Tensor | None, examples: int, members: int, strides: tuple[int, int, int], first: int,
    add_bias: bool, grad_dtype: torch.dtype, n_stored: int | None, d_stored: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One launch of the head kernel for :func:`soma_head` (``gz`` given: the gradients too)
    and :func:`soma_eval` (``gz`` None): each member's loss and correct sums per block of
    examples, and with the gradients the blocks' partial sums (sw, sb, wo, bo, db).
    ``strides``: z's per member and per example, the labels' per member. Both pass the same
    dtypes, constexprs and specialized integers (``grad_dtype`` the step's dL/dz dtype, the
    partial sums' row length), so that they run one compiled kernel."""
    tri = _triton()
    assert tri is not None
    C = offsets["C"]
    NP, DP, CP, BB, dot = head_config(n, d, C)
    n_blocks = -(-examples // BB)
    at = head_parts(NP, DP, CP)
    f32 = dict(device=z.device, dtype=torch.float32)
    loss = torch.empty(members, n_blocks, **f32)
    correct = torch.empty(members, n_blocks, **f32)
    part = torch.empty(members, n_blocks, at.stride, **f32) if gz is not None else None
    zm, zb, ym = strides
    _launch(
        tri[1], (members, n_blocks), z, p, p, p, p, y, eps, z if gz is None else gz,
        loss if part is None else part, loss, correct,
        examples, n, d, n_stored or n, d_stored or d, zm, zb, ym, first, C, p.stride(0),
        offsets["db"] if add_bias else 0, offsets["sw"], offsets["sb"], offsets["wo"], offsets["bo"], n_blocks,
        at.stride, 1.0 / examples, int(gz is not None),
        BB=BB, NP=NP, DP=DP, CP=CP, ADD_DB=add_bias, GZ_BF16=grad_dtype == torch.bfloat16, DOT=dot,
        O_SB=at.sb, O_WO=at.wo, O_BO=at.bo, O_DB=at.db, num_warps=4,
    )
    return loss, correct, part


def adam_rows(
    p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, step_size: torch.Tensor,
    bc2_sqrt: torch.Tensor, wd: torch.Tensor | None, beta1: float, beta2: float, eps: float,
    col0: int = 0,
) -> None:
    """One Adam step of every row of ``p`` (K, P) in place, with moments ``m`` and ``v``.

    ``step_size`` (K,) is each row's ``lr / (1 - beta1 ** step)``, ``bc2_sqrt`` (K,) its
    ``sqrt(1 - beta2 ** step)`` and ``wd`` (K,) its weight decay (None: none), all float32:
    ``g += wd * p; m = lerp(m, g, 1 - beta1); v = beta2 * v + (1 - beta2) * g * g;
    p -= m / (sqrt(v) / bc2_sqrt + eps) * step_size``, the operations ``torch.optim.Adam``
    does, in its order, with correctly rounded square roots and divisions; a multiply-add may be
    fused into one FMA, so a result can differ from the element-wise ops in its last bit.
    Every tensor is contiguous and float32. ``col0``: only the columns from ``col0`` on are
    updated, ``g`` (K, P - col0) being their gradient. The sizes and the offset are left
    unspecialized, so one compilation serves every row length.
    """
    tri = _triton()
    assert tri is not None
    kernel = tri[2]
    K, P = p.shape
    n = P - col0
    assert p.is_contiguous() and m.is_contiguous() and v.is_contiguous() and g.shape == (K, n)
    block = 1024
    _launch(
        kernel, (K, -(-n // block)), p, m, v, g.contiguous(), step_size, bc2_sqrt, wd if wd is not None else step_size, n, P,
        col0, 1.0 - beta1, beta2, 1.0 - beta2, eps, HAS_WD=wd is not None, BLOCK=block,
        num_warps=4,
    )


#: Slots of one member that one program of the connections' Adam updates.
_ADAM_BLOCK = 1024


def adam_connections(
    p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, gd: torch.Tensor, at: torch.Tensor,
    sizes: torch.Tensor, d: int, step_size: torch.Tensor, bc2_sqrt: torch.Tensor,
    wd: torch.Tensor | None, beta1: float, beta2: float, eps: float,
    slots: int | None = None,
) -> None:
    """:func:`adam_rows` for the dendrite weights alone, reading their gradient from ``gd``.

    Each row of ``p`` (K, P) starts with a member's dendrite weights on the padded (neurons x
    ``d`` dendrites, k) grid, ``R = at.shape[1]`` rows of ``at.shape[2]`` slots; ``at``
    (K, R, k) holds each slot's position in the flat dense gradient ``gd`` (bf16 or float32)
    and ``sizes`` (3, >= K) int32 each member's own neurons, dendrites and inputs. Only the
    member's own connections are read and updated: its padded slots, whose gradient is zero
    and whose weights and moments stay zero, are skipped (for the seed space's mixed sizes,
    ~95% of the slots); the gather from ``gd`` replaces a ``take`` over every slot and its copy.
    Each program updates ``_ADAM_BLOCK`` of a member's own slots, numbered (neuron, dendrite,
    input), so that no lane idles on the padding of a smaller member; ``slots`` (default: all
    of ``R * k``) is the most slots a member has, which sizes the grid.
    """
    tri = _triton()
    assert tri is not None
    kernel = tri[3]
    K, P = p.shape
    _, R, kpad = at.shape
    assert p.is_contiguous() and m.is_contiguous() and v.is_contiguous() and at.is_contiguous()
    slots = R * kpad if slots is None else slots
    _launch(
        kernel, (K, max(1, -(-slots // _ADAM_BLOCK))), p, m, v, gd, at, sizes[0], sizes[1], sizes[2], step_size, bc2_sqrt,
        wd if wd is not None else step_size, P, R, kpad, d, 1.0 - beta1, beta2, 1.0 - beta2, eps,
        HAS_WD=wd is not None, BLOCK=_ADAM_BLOCK, num_warps=4,
    )


_SCORES_BLOCK = 1024


def input_scores(row_keys: torch.Tensor, n_inputs: int) -> torch.Tensor:
    """``core._layers.input_scores`` in one kernel, up to 2,048 inputs: ``(..., rows, n_inputs)``
    int32 scores of each row's key (int64) and input, the same values as the PyTorch ops (integer arithmetic),
    one write of the scores instead of about fifteen passes over int64 temporaries."""
    from ._layers import int32_scores, key_bits  # noqa: PLC0415 - _layers imports this module lazily

    tri = _triton()
    assert tri is not None and int32_scores(n_inputs), "int32 scores: up to 2,048 inputs"
    keys = row_keys.contiguous()
    out = torch.empty(*keys.shape, n_inputs, dtype=torch.int32, device=keys.device)
    _launch(tri[4], (keys.numel(), -(-n_inputs // _SCORES_BLOCK)), keys, out, n_inputs, key_bits(n_inputs),
            BLOCK=_SCORES_BLOCK, num_warps=4)
    return out
