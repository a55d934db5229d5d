"""Probe (issue 14): the compact dendrite product against the dense one, one population step.

    python bench/compact_kernel_probe.py [--k 1024] [--reps 20]

Shapes of the bench_population workload: K members, batch B = 256 of 784 inputs, R = 72 dendrites
of KMAX = 96 connections each. Per step, each member's own batch is gathered from the training
set (54,000 x 784). Timed, median of --reps after warm-up:

- dense (what core.train_population runs): the batch gathered into (K, B, 784), the compact
  weights put into the dense (K, R, 784) matrix, z = x @ dense^T + b, the weight gradient
  x^T @ dz and its take at the connections;
- compact A (Triton): z and the weight gradient straight from the training set through the
  members' batch indices and the connection indices (no dense matrix, no gathered batch);
- compact B (Triton): the batch gathered transposed, (K, 784, B), so that a connection's inputs
  over the batch are contiguous; then z and the weight gradient from it.

Each compact result is checked against the dense one (fp32). Prints ms per step and what the
product alone would allow in model-epochs/s (211 steps an epoch, K members).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from _baseline import cuda_seconds  # bench/ is the script's folder


@triton.jit
def _fwd_a(X, COLS, IDXT, WT, BIAS, Z, B, R, IN: tl.constexpr, KMAX: tl.constexpr,
           BB: tl.constexpr, BR: tl.constexpr):
    k = tl.program_id(0)
    ob = tl.program_id(1) * BB + tl.arange(0, BB)
    orr = tl.program_id(2) * BR + tl.arange(0, BR)
    mb, mr = ob < B, orr < R
    cols = tl.load(COLS + k * B + ob, mask=mb, other=0).to(tl.int64)
    xrow = X + cols * IN
    acc = tl.zeros((BB, BR), tl.float32)
    for j in range(KMAX):
        ij = tl.load(IDXT + (k * KMAX + j) * R + orr, mask=mr, other=0)
        wj = tl.load(WT + (k * KMAX + j) * R + orr, mask=mr, other=0.0)
        xv = tl.load(xrow[:, None] + ij[None, :], mask=mb[:, None] & mr[None, :], other=0.0)
        acc += xv.to(tl.float32) * wj[None, :]
    acc += tl.load(BIAS + k * R + orr, mask=mr, other=0.0)[None, :]
    tl.store(Z + (k * B + ob[:, None]) * R + orr[None, :], acc, mask=mb[:, None] & mr[None, :])


@triton.jit
def _wgrad_a(X, COLS, IDXT, GZ, DWT, B: tl.constexpr, R, IN: tl.constexpr, KMAX: tl.constexpr,
             BR: tl.constexpr):
    k = tl.program_id(0)
    orr = tl.program_id(1) * BR + tl.arange(0, BR)
    ob = tl.arange(0, B)
    mr = orr < R
    cols = tl.load(COLS + k * B + ob).to(tl.int64)
    xrow = X + cols * IN
    g = tl.load(GZ + (k * B + ob[:, None]) * R + orr[None, :], mask=mr[None, :], other=0.0)  # (B, BR)
    for j in range(KMAX):
        ij = tl.load(IDXT + (k * KMAX + j) * R + orr, mask=mr, other=0)
        xv = tl.load(xrow[:, None] + ij[None, :], mask=mr[None, :], other=0.0)
        tl.store(DWT + (k * KMAX + j) * R + orr, tl.sum(xv.to(tl.float32) * g, axis=0), mask=mr)


@triton.jit
def _fwd_b(XT, IDXT, WT, BIAS, Z, B, R, IN: tl.constexpr, KMAX: tl.constexpr,
           BB: tl.constexpr, BR: tl.constexpr):
    k = tl.program_id(0)
    ob = tl.program_id(1) * BB + tl.arange(0, BB)
    orr = tl.program_id(2) * BR + tl.arange(0, BR)
    mb, mr = ob < B, orr < R
    acc = tl.zeros((BR, BB), tl.float32)
    for j in range(KMAX):
        ij = tl.load(IDXT + (k * KMAX + j) * R + orr, mask=mr, other=0).to(tl.int64)
        wj = tl.load(WT + (k * KMAX + j) * R + orr, mask=mr, other=0.0)
        xv = tl.load(XT + (k * IN + ij[:, None]) * B + ob[None, :], mask=mr[:, None] & mb[None, :], other=0.0)
        acc += xv.to(tl.float32) * wj[:, None]
    acc += tl.load(BIAS + k * R + orr, mask=mr, other=0.0)[:, None]
    tl.store(Z + (k * B + ob[None, :]) * R + orr[:, None], acc, mask=mr[:, None] & mb[None, :])


@triton.jit
def _wgrad_b(XT, IDXT, GZ, DWT, B: tl.constexpr, R, IN: tl.constexpr, KMAX: tl.constexpr,
             BR: tl.constexpr):
    k = tl.program_id(0)
    orr = tl.program_id(1) * BR + tl.arange(0, BR)
    ob = tl.arange(0, B)
    mr = orr < R
    g = tl.load(GZ + (k * B + ob[None, :]) * R + orr[:, None], mask=mr[:, None], other=0.0)  # (BR, B)
    for j in range(KMAX):
        ij = tl.load(IDXT + (k * KMAX + j) * R + orr, mask=mr, other=0).to(tl.int64)
        xv = tl.load(XT + (k * IN + ij[:, None]) * B + ob[None, :], mask=mr[:, None], other=0.0)
        tl.store(DWT + (k * KMAX + j) * R + orr, tl.sum(xv.to(tl.float32) * g, axis=1), mask=mr)


@triton.jit
def _fwd_c(XT, IDXT, WT, BIAS, Z, B: tl.constexpr, R, IN: tl.constexpr, KMAX: tl.constexpr,
           BB: tl.constexpr, BR: tl.constexpr):
    """B with 32-bit offsets from the member's base pointer (one integer multiply-add a load)."""
    k = tl.program_id(0)
    ob = tl.program_id(1) * BB + tl.arange(0, BB)
    orr = tl.program_id(2) * BR + tl.arange(0, BR)
    mr = orr < R
    xk = XT + k.to(tl.int64) * (IN * B)
    acc = tl.zeros((BR, BB), tl.float32)
    for j in range(KMAX):
        ij = tl.load(IDXT + (k * KMAX + j) * R + orr, mask=mr, other=0)
        wj = tl.load(WT + (k * KMAX + j) * R + orr, mask=mr, other=0.0)
        xv = tl.load(xk + (ij[:, None] * B + ob[None, :]))
        acc += xv.to(tl.float32) * wj[:, None]
    acc += tl.load(BIAS + k * R + orr, mask=mr, other=0.0)[:, None]
    tl.store(Z + (k * B + ob[None, :]) * R + orr[:, None], acc, mask=mr[:, None])


@triton.jit
def _wgrad_c(XT, IDXT, GZ, DWT, B: tl.constexpr, R, IN: tl.constexpr, KMAX: tl.constexpr,
             BR: tl.constexpr):
    k = tl.program_id(0)
    orr = tl.program_id(1) * BR + tl.arange(0, BR)
    ob = tl.arange(0, B)
    mr = orr < R
    xk = XT + k.to(tl.int64) * (IN * B)
    g = tl.load(GZ + (k * B + ob[None, :]) * R + orr[:, None], mask=mr[:, None], other=0.0)  # (BR, B)
    for j in range(KMAX):
        ij = tl.load(IDXT + (k * KMAX + j) * R + orr, mask=mr, other=0)
        xv = tl.load(xk + (ij[:, None] * B + ob[None, :]))
        tl.store(DWT + (k * KMAX + j) * R + orr, tl.sum(xv.to(tl.float32) * g, axis=1), mask=mr)


def timed(fn, reps: int) -> float:
    """Milliseconds of one call (bench/_baseline.py's median of CUDA-event timings)."""
    return cuda_seconds(fn, reps) * 1e3


def _launchers(kind, a, b_, Xs, xts, cols, idxt, wt, bias, gz, z, dwt):
    """The forward and weight-gradient launches of one variant and tile shape."""
    K, B, R = z.shape
    IN, KM = Xs.shape[1], idxt.shape[1]
    if kind == "A":
        BB, BR = a, b_

        def fwd():
            _fwd_a[(K, triton.cdiv(B, BB), triton.cdiv(R, BR))](Xs, cols, idxt, wt, bias, z, B, R, IN, KM, BB, BR)

        def wg():
            _wgrad_a[(K, triton.cdiv(R, BR))](Xs, cols, idxt, gz, dwt, B, R, IN, KM, BR)
        return fwd, wg
    if kind.startswith("C"):  # C or Cw8: num_warps 4 or 8
        BR, BB = a, b_
        nw = 8 if kind == "Cw8" else 4

        def fwd_c():
            _fwd_c[(K, triton.cdiv(B, BB), triton.cdiv(R, BR))](xts, idxt, wt, bias, z, B, R, IN, KM, BB, BR,
                                                                num_warps=nw)

        def wg_c():
            _wgrad_c[(K, triton.cdiv(R, BR))](xts, idxt, gz, dwt, B, R, IN, KM, BR, num_warps=nw)
        return fwd_c, wg_c
    BR, BB = a, b_

    def fwd_b():
        _fwd_b[(K, triton.cdiv(B, BB), triton.cdiv(R, BR))](xts, idxt, wt, bias, z, B, R, IN, KM, BB, BR)

    def wg_b():
        _wgrad_b[(K, triton.cdiv(R, BR))](xts, idxt, gz, dwt, B, R, IN, KM, BR)
    return fwd_b, wg_b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--configs", default="A:32x16,A:64x16,A:64x32,B:16x64,B:32x64,B:16x128,B:32x128")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    N, IN, K, B, R, KM = 54000, 784, args.k, 256, 72, 96
    X = torch.randn(N, IN, device=dev)
    cols = torch.stack([torch.randperm(N, device=dev)[:B] for _ in range(K)]).int()
    idx = torch.rand(K, R, IN, device=dev).topk(KM, dim=2).indices.int()  # distinct per row
    w = torch.randn(K, R, KM, device=dev) * 0.1
    bias = torch.randn(K, R, device=dev) * 0.1
    gz = torch.randn(K, B, R, device=dev)
    idxt, wt = idx.transpose(1, 2).contiguous(), w.transpose(1, 2).contiguous()
    flat = (torch.arange(K, device=dev)[:, None, None] * R * IN + torch.arange(R, device=dev)[None, :, None] * IN
            + idx.long()).view(-1)
    buf = torch.zeros(K * R * IN, device=dev)
    flat_t = (torch.arange(K, device=dev)[:, None, None] * IN * R + idx.long() * R
              + torch.arange(R, device=dev)[None, :, None]).view(-1)

    out = {}

    def dense_gather():
        out["xb"] = X.index_select(0, cols.view(-1).long()).view(K, B, IN)

    def dense_fwd():
        buf.put_(flat, w.reshape(-1))
        out["z"] = torch.baddbmm(bias.unsqueeze(1), out["xb"], buf.view(K, R, IN).transpose(1, 2))

    def dense_wgrad():
        gd = torch.bmm(out["xb"].transpose(1, 2), gz)
        out["dw"] = gd.view(-1).take(flat_t).view(K, R, KM)

    t_g, t_f, t_w = timed(dense_gather, args.reps), timed(dense_fwd, args.reps), timed(dense_wgrad, args.reps)
    z_ref, dw_ref = out["z"].clone(), out["dw"].clone()
    steps = 211

    def report(name: str, ms: float) -> None:
        print(f"{name:42s} {ms:8.3f} ms/step   product alone caps at {K / (ms * steps / 1000):9.0f} model-epochs/s",
              flush=True)

    print(f"# K={K} B={B} in={IN} R={R} kmax={KM}, {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    report("dense: gather (K,B,784)", t_g)
    report("dense: put + baddbmm", t_f)
    report("dense: bmm + take", t_w)
    report("dense: all three", t_g + t_f + t_w)

    xt_holder = {}

    def stage_t():
        xt_holder["xt"] = X.index_select(0, cols.view(-1).long()).view(K, B, IN).transpose(1, 2).contiguous()

    t_s = timed(stage_t, args.reps)
    report("compact B: stage (K,784,B)", t_s)
    for half in (False, True):
        Xs = X.to(torch.bfloat16) if half else X
        xts = xt_holder["xt"].to(torch.bfloat16) if half else xt_holder["xt"]
        tag = "bf16 x" if half else "fp32 x"
        for cfg in args.configs.split(","):
            kind, shape = cfg.split(":")
            a, b_ = (int(v) for v in shape.split("x"))
            z = torch.empty(K, B, R, device=dev)
            dwt = torch.empty(K, KM, R, device=dev)
            fwd, wg = _launchers(kind, a, b_, Xs, xts, cols, idxt, wt, bias, gz, z, dwt)
            try:
                tf, tw = timed(fwd, args.reps), timed(wg, args.reps)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile: say so
                print(f"compact {cfg} ({tag}): failed: {str(exc).splitlines()[0][:120]}")
                continue
            tol = 5e-2 if half else 2e-3
            ok_z = torch.allclose(z, z_ref, atol=tol, rtol=tol)
            ok_w = torch.allclose(dwt.transpose(1, 2), dw_ref, atol=tol * 10, rtol=tol)
            err = (dwt.transpose(1, 2) - dw_ref).abs().max().item()
            extra = t_s if kind != "A" else 0.0
            report(f"compact {cfg} ({tag}) fwd {'ok' if ok_z else 'WRONG'}", tf)
            report(f"compact {cfg} ({tag}) wgrad {'ok' if ok_w else 'WRONG'} ({err:.1e})", tw)
            report(f"compact {cfg} ({tag}) all" + (" + stage" if extra else ""), tf + tw + extra)


if __name__ == "__main__":
    main()
