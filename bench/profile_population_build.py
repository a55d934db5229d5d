"""Where the whole call of core.train_population goes besides steady epochs (issue 14's whole/steady).

    python bench/profile_population_build.py --data-dir DIR [--k 1024] [--epochs 3] [--precision bf16]

cProfile of one call (K members of dendritic_simple 12x6x96, Fashion-MNIST), top functions by
cumulative and by own time, plus the call's own stats (build, epoch seconds).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = core.resolve_device(args.device)
    data = core.load_dataset("fashion-mnist", data_dir=args.data_dir)
    sizes = {"n_neurons": 12, "n_dendrites": 6, "n_dendrite_inputs": 96}
    core.train_population("dendritic_simple", [dict(sizes)] * 2, data, 1, 256, device=dev, precision=args.precision)
    configs = [dict(sizes, lr=2e-3, seed=i) for i in range(args.k)]
    stats: dict = {}
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    core.train_population("dendritic_simple", configs, data, args.epochs, 256, device=dev,
                          population_size=args.k, precision=args.precision, stats=stats)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    print(f"# wall {time.perf_counter() - t0:.2f}s, build {stats['build_seconds']:.2f}s, epochs "
          f"{stats['epoch_seconds']:.2f}s, cpu threads {torch.get_num_threads()}")
    st = pstats.Stats(prof)
    st.sort_stats("cumulative").print_stats(40)
    st.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
