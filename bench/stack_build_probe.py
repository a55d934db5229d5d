"""How long stacking K members of the seed space's mixed sizes takes (``_Stack.build``'s padded path).

    python bench/stack_build_probe.py [--k 996] [--device cuda] [--reps 4]

K configs drawn as ``bench/padding_probe.py`` draws them (uniformly from the seed space under
max_params=8000), sorted as a fused stack sorts them, each given random weights and
connections (on the device, as when they were picked there), then stacked ``--reps`` times,
the device synchronized around each; then one more build under cProfile. The build of a study's
cohort: v19 moved the newcomers' zero moments and the real connections' mask to the device.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from padding_probe import sample  # noqa: E402

from core import _population as P  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=996)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    dev = torch.device(args.device)
    lowp = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rng = random.Random(0)
    archs = sorted((sample(rng) for _ in range(args.k)), key=P._band_key)
    dims = P._Dims.of(archs)
    print(f"# K={args.k} grid ({dims.n}, {dims.d}, {dims.k}), rows of {dims.stride}, on {dev}")
    members, states = [], []
    for i, a in enumerate(archs):
        r = a.n * a.d
        params = {"dw": torch.randn(r, a.k), "db": torch.randn(r), "sw": torch.randn(a.n, a.d),
                  "sb": torch.randn(a.n), "wo": torch.randn(a.n_classes, a.width), "bo": torch.randn(a.n_classes)}
        states.append(P._State(params, {}, {}, torch.randint(0, a.in_dim, (r, a.k), device=dev)))
        members.append(P._Member(index=i, arch=a, seed=i, lr=1e-3, weight_decay=0.0, data_gen=torch.Generator(),
                                 layer_seed=i, result=None, recipe=P._Recipe(256), n_steps=211))  # type: ignore[arg-type]

    def build() -> None:
        P._Stack.build(dims, members, states, dev, lowp)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.reps):
        t0 = time.perf_counter()
        build()
        print(f"build {time.perf_counter() - t0:.3f}s", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    build()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(10)


if __name__ == "__main__":
    main()
