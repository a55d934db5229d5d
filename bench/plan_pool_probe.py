"""How fast the population's worker threads draw 1,024 members' epoch plans on this host.

    python bench/plan_pool_probe.py [--data-dir DIR]

Draws the plans (data order, resampling scores and their top-k) of the bench's homogeneous
12 x 6 x 96 member on 8 and 15 threads, with PyTorch's default intra-op threads and with one.
A bf16 epoch of K = 1,024 on an H200 leaves ~0.37 s to draw the next epoch's plans in
(bench/results/bench_population_gpu_v10.txt, bench/NOTES_population.md "v10").
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import core
import core._population as P

SIZES = dict(n_neurons=12, n_dendrites=6, n_dendrite_inputs=96)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir")
    data = core.load_dataset("fashion-mnist", data_dir=ap.parse_args().data_dir)
    pop = P._Population("dendritic_simple", [], data, 15, 256, torch.device("cpu"), 0, 8, None, None)
    mems = [pop._build_member(i, dict(SIZES, lr=2e-3, seed=i)) for i in range(64)]
    print("torch threads", torch.get_num_threads())

    def one(i: int) -> P._Plan:
        m = mems[i % 64]
        return P._make_plan(m.data_gen, m.arch, pop.n_train, m.n_steps, 0, m.recipe)

    t0 = time.perf_counter()
    for i in range(64):
        one(i)
    print(f"serial: {(time.perf_counter() - t0) / 64 * 1e3:.2f} ms a plan")
    for intra in (None, 1):
        if intra:
            torch.set_num_threads(intra)
        for workers in (8, 15):
            with ThreadPoolExecutor(workers) as ex:
                list(ex.map(one, range(64)))
                t0 = time.perf_counter()
                list(ex.map(one, range(1024)))
                dt = time.perf_counter() - t0
            print(f"intra={torch.get_num_threads()} workers={workers}: 1024 plans {dt:.3f}s")


if __name__ == "__main__":
    main()
