"""Probe (issue 14): cuBLAS's batched bf16 products at the dendrite rows a band has.

    python bench/bmm_align_probe.py [--k 250] [--rows 187,192,195,200,270,272,300,304]

A band of the fused step multiplies each member's batch (B = 256, 784 inputs) by its dense
matrix of R = n * d rows: ``z = x @ W^T`` (K, B, R) and the weight gradient ``x^T @ dL/dz``
(K, 784, R). R is the leading dimension of z, dL/dz and the gradient; this times both
products (median of 20 CUDA-event timings) for each R, to see what an R that is not a
multiple of 8 costs against the next one that is.
"""

# ruff: noqa: B023 - each loop closure is timed within its own iteration
from __future__ import annotations

import argparse

import torch
from _baseline import cuda_seconds  # bench/ is the script's folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=250)
    ap.add_argument("--rows", default="72,80,187,192,195,200,270,272,300,304")
    args = ap.parse_args()
    dev, K, B, IN = torch.device("cuda"), args.k, 256, 784
    x = torch.rand(K, B, IN, device=dev).to(torch.bfloat16)
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}; K={K} B={B} in={IN}, bf16")
    for R in (int(r) for r in args.rows.split(",")):
        W = torch.rand(K, R, IN, device=dev).to(torch.bfloat16)
        gz = torch.rand(K, B, R, device=dev).to(torch.bfloat16)
        gd = torch.empty(K, IN, R, device=dev, dtype=torch.bfloat16)
        tf = cuda_seconds(lambda: torch.bmm(x, W.transpose(1, 2)), 20)
        tw = cuda_seconds(lambda: torch.bmm(x.transpose(1, 2), gz, out=gd), 20)
        fl = 2 * K * B * R * IN
        print(f"R={R:4d} (R % 8 = {R % 8}): z {tf * 1e3:.3f} ms {fl / tf / 1e12:5.0f} TFLOP/s   "
              f"gradient {tw * 1e3:.3f} ms {fl / tw / 1e12:5.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
