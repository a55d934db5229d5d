"""The fused soma-and-readout head at the 2,000-trial study's padded grid: which batch block?

    python bench/head_block_probe.py [--K 996] [--n 20] [--d 15]

``core._kernels.soma_head`` runs one program per (member, block of BB examples); BB is
chosen so that a block's (BB, n, d) tile holds about 4,096 elements (BB = 8 at the study's
20 x 15 grid, padded to 32 x 16), with 4 warps. Each program also loads its member's soma
and readout weights and writes a partial sum of their gradients, so a small BB re-reads and
re-writes those once per 8 examples. This times the kernel (median of 20 CUDA-event timings
after 3 warm-ups) for BB in 4..64 and 4 or 8 warps, prints each one's largest difference from
the first row (summation order only) and GB/s over the bytes that must move (z read, dL/dz
written). ``soma_head`` now aims at 8,192 elements a program (``_kernels._TILE``). Rows with
dot=1 compute the readout's three products with ``tl.dot`` (``_kernels.HEAD_DOT``).
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch

from core import _kernels


def _launch_and_sum(launch: Callable[[], Any], part: torch.Tensor) -> None:
    launch()
    part.sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--K", type=int, default=996)
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--d", type=int, default=15)
    args = ap.parse_args()
    K, B, n, d, C = args.K, args.B, args.n, args.d, 10
    dev = torch.device("cuda")
    torch.manual_seed(0)
    offs = {"sw": 0, "sb": n * d, "wo": n * d + n, "bo": n * d + n + C * n, "C": C}
    p = torch.randn(K, offs["bo"] + C, device=dev) * 0.1
    z = torch.randn(K, B, n * d, device=dev)
    y = torch.randint(0, C, (K, B), device=dev)
    tri = _kernels._triton()
    assert tri is not None
    kernel = tri[1]
    NP, DP, CP = _kernels._pow2(n), _kernels._pow2(d), max(16, _kernels._pow2(C))
    eps = torch.zeros(K, device=dev)
    ref = None
    print(f"# K={K} B={B} grid {n}x{d} (padded {NP}x{DP}); bytes that must move: "
          f"{2 * z.numel() * 4 / 1e6:.0f} MB")
    rows = [(w, bb, False) for w in (4, 8) for bb in (4, 8, 16, 32, 64)]
    if NP >= 16:  # tl.dot needs every side >= 16
        rows += [(w, bb, True) for w in (4, 8) for bb in (16, 32, 64)]
    for warps, BB, dot in rows:
        if True:
            n_blocks = -(-B // BB)
            at = _kernels.head_parts(NP, DP, CP)
            gz = torch.empty_like(z)
            part = torch.empty(K, n_blocks, at.stride, device=dev)
            loss = torch.empty(K, n_blocks, device=dev)
            correct = torch.empty(K, n_blocks, device=dev)

            launch = functools.partial(
                kernel[(K, n_blocks)], z, p, p, p, p, y, eps, gz, part, loss, correct,
                B, n, d, n, d, B * n * d, n * d, B, 0, C, p.stride(0), 0, offs["sw"], offs["sb"], offs["wo"],
                offs["bo"], n_blocks, at.stride, 1.0 / B, 1, BB=BB, NP=NP, DP=DP, CP=CP, ADD_DB=False,
                GZ_BF16=False, DOT=dot, O_SB=at.sb, O_WO=at.wo, O_BO=at.bo, O_DB=at.db, num_warps=warps)
            run = functools.partial(_launch_and_sum, launch, part)

            try:
                for _ in range(3):
                    run()
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - a block too large for the registers
                print(f"BB={BB:3d} warps={warps} dot={dot}: failed ({type(exc).__name__}: {exc})"[:300])
                continue
            times = []
            for _ in range(20):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                run()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            ms = statistics.median(times)
            got = (loss.sum(1), gz.clone(), part.sum(1))
            if ref is None:
                ref = got
            diff = [f"{(g - r).abs().max().item() / max(1e-30, r.abs().max().item()):.1e}"
                    for g, r in zip(got, ref, strict=True)]
            print(f"BB={BB:3d} warps={warps} dot={dot:d} tile={BB * NP * DP:6d}: {ms:7.3f} ms  "
                  f"{2 * z.numel() * 4 / ms / 1e6:7.0f} GB/s  largest difference from the first row "
                  f"(loss, dL/dz, parameter gradients), relative to the largest value: {' '.join(diff)}")


if __name__ == "__main__":
    main()
