"""Useful / executed training FLOPs of one stack of the seed space's mixed sizes, without a GPU.

    python bench/padding_probe.py [--k 1024] [--samples 5]

Draws K configs of the seed space under max_params=8000 (uniformly, not TPE's proposals: a
harder mix than a study's), sorts them as a fused stack is built and splits them into the
step's bands (core._population._bands), then prints useful / executed two ways:

* per multiply-add of an example's forward pass (``_Dims.macs``: the dense dendrite matrix, the
  somas, the readout), what the population reports since v17;
* the count before v17, which added each member's padded flat parameters (the compact
  connections of the stack's largest k included) as if every example multiplied them.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core._population import _Arch, _band_key, _bands, _Dims, executed_macs, useful_macs  # noqa: E402


def sample(rng: random.Random, in_dim: int = 784, classes: int = 10, budget: int = 8000) -> _Arch:
    while True:
        n, d = rng.randint(5, 20), rng.randint(3, 15)
        k = round(math.exp(rng.uniform(math.log(16), math.log(256))))
        if n * d * (k + 2) + n + classes * n + classes <= budget:
            return _Arch(in_dim, classes, n, d, k, soma=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=5)
    args = ap.parse_args()
    print("sample  bands  useful/executed (per-example multiply-adds)  (count before v17)")
    for s in range(args.samples):
        rng = random.Random(s)
        archs = sorted((sample(rng) for _ in range(args.k)), key=_band_key)
        dims = _Dims.of(archs)
        bands = _bands([(a.n, a.d) for a in archs], dims.d)
        macs, own = executed_macs(dims, bands), useful_macs(archs)
        old = sum((b - a) * (dims.numel + n * d * dims.in_dim) for a, b, n, d in bands)
        old_own = sum(_Dims.of([a]).numel + a.n * a.d * a.in_dim for a in archs)
        print(f"{s:6d}  {len(bands):5d}  {own / macs:44.3f}  {old_own / old:18.3f}")


if __name__ == "__main__":
    main()
