"""Two changes of v13 against their alternatives, homogeneous and mixed, K = 1,024 each.

    python bench/v13_probe.py DATA_DIR [--epochs 8] [--rounds 2] [--modes ...]

* The connections' Adam, one program per 1,024 of a member's own slots (v13), against the
  step's dense pass (``homo-dense`` / ``homo-conn``: a homogeneous 12 x 6 x 96 stack fills
  all of its slots, so the ``_GATHER_BELOW = 0.5`` rule gives it the dense pass; ``homo-conn``
  forces the connections' Adam). Run the same file from an older tree's ``bench/`` to compare
  with the old kernel (a tile of rows x inputs over the stack's padded grid).
* The plan workers' nice value (``_PLAN_NICE``), 0 against 5, on the homogeneous stack in
  bf16 and on the seed space's mixed sizes (bench_population.seed_space) in one padded stack,
  as the end-to-end study trains them (``homo-nice0`` ... ``mixed-nice5``).
Prints each run's epoch seconds, its steady rate (K over the median of epochs 2..N), the
members' mean test accuracy and the useful / executed FLOPs. The last epoch draws no plans
for a next one, so it shows the step alone.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_population import seed_space  # noqa: E402

import core  # noqa: E402
from core import _population  # noqa: E402

SIZES = dict(n_neurons=12, n_dendrites=6, n_dendrite_inputs=96)
MODES = {  # mode: (configs, precisions, _GATHER_BELOW, _PLAN_NICE)
    "homo-dense": ("homo", ("fp32", "bf16"), 0.5, 5),
    "homo-conn": ("homo", ("fp32", "bf16"), 1.01, 5),
    "homo-nice0": ("homo", ("bf16",), 0.5, 0),
    "homo-nice5": ("homo", ("bf16",), 0.5, 5),
    "mixed-nice0": ("mixed", ("bf16",), 0.5, 0),
    "mixed-nice5": ("mixed", ("bf16",), 0.5, 5),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    data = core.load_dataset("fashion-mnist", data_dir=args.data_dir)
    sets = {"homo": [dict(SIZES, seed=i, lr=2e-3) for i in range(args.k)],
            "mixed": seed_space(args.k, random.Random(0))}
    core.train_population("dendritic_simple", sets["homo"][:2], data, 1, 256, device="cuda")  # warm-up
    for rnd in range(args.rounds):
        for mode in args.modes.split(","):
            which, precisions, share, nice = MODES[mode]
            _population._GATHER_BELOW = share
            _population._PLAN_NICE = nice
            for precision in precisions:
                stats: dict[str, Any] = {}
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = core.train_population("dendritic_simple", sets[which], data, args.epochs, 256,
                                            device="cuda", population_size=args.k, buckets=False,
                                            precision=precision, stats=stats)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
                ep = [h["seconds"] for h in res[0].history]
                steady = args.k / statistics.median(ep[1:])
                acc = statistics.mean(r.test_accuracy or 0.0 for r in res)
                ratio = stats["useful_flops"] / max(1.0, stats["executed_flops"])
                print(f"{args.tag}{mode:12s} {precision} round {rnd} steady {steady:8.1f} whole "
                      f"{args.k * args.epochs / wall:8.1f} acc {acc:.4f} useful/executed {ratio:.2f} "
                      f"stacks {stats['stacks'][:2]} epochs {[round(e, 3) for e in ep]}", flush=True)


if __name__ == "__main__":
    main()
