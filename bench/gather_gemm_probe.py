"""Probe (issue 14): the members' batch gather fused into the dendrite products (Triton).

    python bench/gather_gemm_probe.py [--reps 20] [--shapes 1024x72,996x187,996x300]

Each step of ``core.train_population`` gathers every member's batch from the training set
into a ``(K, B, 784)`` buffer (``index_select``; ~0.2 ms a step at K = 996 in bf16, 11% of
the study's cohort-1 step) and then runs two batched products over it: ``z = x @ W^T``
(W the dense ``(K, R, 784)`` dendrite matrix) and the dense weight gradient
``x^T @ dL/dz`` ``(K, 784, R)``. Here the two products load their rows of ``x`` straight from
the training set through the members' example indices, so the buffer is never written or
read. Timed (median of ``--reps`` CUDA-event timings after warm-up), for each shape ``KxR``
(members x dendrite rows, B = 256, bf16 operands, float32 accumulation):

- the trainer's path: gather + bmm + bmm;
- the fused kernels, for each tile configuration; each result is checked against the
  trainer's (same operands, sums in another order).
"""

# ruff: noqa: B023 - each loop closure is timed within its own iteration
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from _baseline import cuda_seconds  # bench/ is the script's folder


@triton.jit
def _fwd(X, IDX, W, Z, B, R, IN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """z[k, b, r] = sum_i X[IDX[k, b], i] * W[k, r, i]."""
    k = tl.program_id(0)
    om = tl.program_id(1) * BM + tl.arange(0, BM)
    on = tl.program_id(2) * BN + tl.arange(0, BN)
    ok = tl.arange(0, BK)
    mm, mn = om < B, on < R
    rows = tl.load(IDX + k * B + om, mask=mm, other=0).to(tl.int64) * IN
    wk = W + k.to(tl.int64) * R * IN
    acc = tl.zeros((BM, BN), tl.float32)
    for i in range(0, IN, BK):
        mk = (i + ok) < IN
        a = tl.load(X + rows[:, None] + (i + ok)[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        b = tl.load(wk + on[None, :] * IN + (i + ok)[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    zp = Z + (k.to(tl.int64) * B + om[:, None]) * R + on[None, :]
    tl.store(zp, acc.to(Z.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _wgrad(X, IDX, GZ, GD, B, R, IN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """gd[k, i, r] = sum_b X[IDX[k, b], i] * GZ[k, b, r]."""
    k = tl.program_id(0)
    oi = tl.program_id(1) * BM + tl.arange(0, BM)
    on = tl.program_id(2) * BN + tl.arange(0, BN)
    ob = tl.arange(0, BK)
    mi, mn = oi < IN, on < R
    gk = GZ + k.to(tl.int64) * B * R
    acc = tl.zeros((BM, BN), tl.float32)
    for b0 in range(0, B, BK):
        mb = (b0 + ob) < B
        rows = tl.load(IDX + k * B + b0 + ob, mask=mb, other=0).to(tl.int64) * IN
        a = tl.load(X + rows[None, :] + oi[:, None], mask=mi[:, None] & mb[None, :], other=0.0)  # (BM, BK)
        g = tl.load(gk + (b0 + ob)[:, None] * R + on[None, :], mask=mb[:, None] & mn[None, :], other=0.0)
        acc = tl.dot(a, g, acc)
    gp = GD + (k.to(tl.int64) * IN + oi[:, None]) * R + on[None, :]
    tl.store(gp, acc.to(GD.dtype.element_ty), mask=mi[:, None] & mn[None, :])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", default="1024x72,996x187,996x300")
    ap.add_argument("--fwd-configs", default="64x64x64x4x3,128x64x64x4x3,128x64x64x8x3,64x128x64x4x3,"
                    "128x128x64x8x3,256x64x64x8x3,128x32x128x4x3,64x32x128x4x4")
    ap.add_argument("--wg-configs", default="64x64x64x4x3,128x64x64x4x3,128x64x64x8x3,64x128x64x4x3,"
                    "128x128x64x8x3,128x32x64x4x4,64x32x128x4x3,128x64x128x8x3")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    N, IN, B = 54000, 784, 256
    X = torch.rand(N, IN, device=dev).to(torch.bfloat16)
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}; "
          f"B={B}, in={IN}, bf16 operands; ms per step (median of {args.reps})", flush=True)
    for shape in args.shapes.split(","):
        K, R = (int(v) for v in shape.split("x"))
        idx = torch.randint(0, N, (K * B,), device=dev)
        W = (torch.randn(K, R, IN, device=dev) * 0.05).to(torch.bfloat16)
        gz = (torch.randn(K, B, R, device=dev) * 0.01).to(torch.bfloat16)
        out: dict[str, torch.Tensor] = {}
        gd = torch.empty(K, IN, R, device=dev, dtype=torch.bfloat16)

        def gather() -> None:
            out["x"] = X.index_select(0, idx).view(K, B, IN)

        def fwd() -> None:
            out["z"] = torch.bmm(out["x"], W.transpose(1, 2))

        def wg() -> None:
            torch.bmm(out["x"].transpose(1, 2), gz, out=gd)

        t_g, t_f, t_w = (cuda_seconds(f, args.reps) * 1e3 for f in (gather, fwd, wg))
        z_ref, gd_ref = out["z"].float(), gd.float().clone()
        flops = 2 * K * B * R * IN
        print(f"K={K} R={R}: trainer gather {t_g:.3f} + bmm {t_f:.3f} ({flops / t_f / 1e9:.0f} TFLOP/s) "
              f"+ bmm {t_w:.3f} ({flops / t_w / 1e9:.0f}) = {t_g + t_f + t_w:.3f} ms", flush=True)
        z = torch.empty(K, B, R, device=dev, dtype=torch.bfloat16)
        i32 = idx.int()
        best_f = best_w = float("inf")
        for cfg in args.fwd_configs.split(","):
            bm, bn, bk, nw, ns = (int(v) for v in cfg.split("x"))
            grid = (K, triton.cdiv(B, bm), triton.cdiv(R, bn))
            try:
                t = cuda_seconds(lambda: _fwd[grid](X, i32, W, z, B, R, IN, bm, bn, bk, num_warps=nw, num_stages=ns),
                                 args.reps) * 1e3
            except Exception as exc:  # noqa: BLE001 - a tile that does not compile: say so
                print(f"  fwd {cfg}: failed: {str(exc).splitlines()[0][:100]}")
                continue
            err = ((z.float() - z_ref).abs().max() / z_ref.abs().max()).item()
            best_f = min(best_f, t)
            print(f"  fwd   {cfg:14s} {t:.3f} ms ({flops / t / 1e9:.0f} TFLOP/s) rel err {err:.1e}", flush=True)
        for cfg in args.wg_configs.split(","):
            bm, bn, bk, nw, ns = (int(v) for v in cfg.split("x"))
            grid = (K, triton.cdiv(IN, bm), triton.cdiv(R, bn))
            try:
                t = cuda_seconds(lambda: _wgrad[grid](X, i32, gz, gd, B, R, IN, bm, bn, bk, num_warps=nw,
                                                      num_stages=ns), args.reps) * 1e3
            except Exception as exc:  # noqa: BLE001
                print(f"  wgrad {cfg}: failed: {str(exc).splitlines()[0][:100]}")
                continue
            err = ((gd.float() - gd_ref).abs().max() / gd_ref.abs().max()).item()
            best_w = min(best_w, t)
            print(f"  wgrad {cfg:14s} {t:.3f} ms ({flops / t / 1e9:.0f} TFLOP/s) rel err {err:.1e}", flush=True)
        print(f"K={K} R={R}: fused best {best_f:.3f} + {best_w:.3f} = {best_f + best_w:.3f} ms against "
              f"{t_g + t_f + t_w:.3f} ms (ratio {(t_g + t_f + t_w) / (best_f + best_w):.2f}x)", flush=True)


if __name__ == "__main__":
    main()
