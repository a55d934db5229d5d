"""train_population against the seed-style loop and train_model: model-epochs per second.

    python bench/bench_population.py [--device cpu|cuda] [--epochs 2] [--populations 8]
                                     [--data-dir DIR] [--subset N] [--threads N] [--profile] [--tf32]

dendritic_simple with 12 neurons, 6 dendrites, 96 inputs per dendrite, batch 256, on
Fashion-MNIST. Rows: (a) the seed-style loop (bench/_baseline.py: DataLoader over CPU
tensors, a dense masked weight, resampling on the mask), (b) core.train_model, (c)
core.train_population with K members (seeds 0..K-1, member 0 is the model of (b)).
"model-epochs/s" counts every member's epochs over the whole call, set-up included;
"steady" is K over the last epoch's seconds. "test acc" is the mean final test accuracy per
member; "|d acc| m0" is member 0's difference from (b), which trains the same model.
``--profile`` prints the CUDA (or CPU) kernels of one epoch of the largest population.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baseline import seed_style_train  # noqa: E402

import core  # noqa: E402

SIZES = dict(n_neurons=12, n_dendrites=6, n_dendrite_inputs=96)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _population(data: core.Dataset, k: int, epochs: int, args: Any, dev: torch.device
                ) -> tuple[float, float, list[core.TrainResult]]:
    configs = [dict(SIZES, lr=args.lr, seed=i) for i in range(k)]
    _sync(dev)
    t0 = time.perf_counter()
    res = core.train_population("dendritic_simple", configs, data, epochs, args.batch_size,
                                device=dev, population_size=k)
    _sync(dev)
    wall = time.perf_counter() - t0
    return wall, res[0].history[-1]["seconds"], res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--populations", help="comma-separated K (default 8 on CPU, 64,256,1024 on CUDA)")
    ap.add_argument("--data-dir")
    ap.add_argument("--subset", type=int, help="training examples to keep (before validation)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--profile", action="store_true", help="profile one epoch of the largest K")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--tf32", action="store_true",
                    help="TF32 matrix products for every row (as TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 "
                         "does for a worker); the default is exact fp32")
    args = ap.parse_args()
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = core.resolve_device(args.device)
    pops = [int(x) for x in (args.populations or ("64,256,1024" if dev.type == "cuda" else "8")).split(",")]
    data = core.load_dataset("fashion-mnist", data_dir=args.data_dir, subset_size=args.subset)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# fashion-mnist {data.sizes()} on {dev} ({name}), torch {torch.__version__}; "
          f"dendritic_simple {SIZES}, batch {args.batch_size}, lr {args.lr}, {args.epochs} epochs, "
          f"tf32 matmul {torch.backends.cuda.matmul.allow_tf32}")

    # a warm-up, so that no row pays for CUDA/cuBLAS initialisation
    core.train_population("dendritic_simple", [dict(SIZES)], data, 1, args.batch_size, device=dev)

    base = seed_style_train(data, SIZES["n_neurons"], SIZES["n_dendrites"], SIZES["n_dendrite_inputs"],
                            args.epochs, args.batch_size, args.lr, dev)
    base_rate = 1.0 / base["seconds_per_epoch"]
    rows = [("(a) seed-style loop", 1, base_rate, base_rate, base["test_accuracy"], None)]

    model = core.create_model("dendritic_simple", seed=0, in_dim=data.in_dim, **SIZES)
    _sync(dev)
    t0 = time.perf_counter()
    single = core.train_model(model, data, args.epochs, args.lr, batch_size=args.batch_size,
                              device=dev, seed=0)
    _sync(dev)
    rate = args.epochs / (time.perf_counter() - t0)
    rows.append(("(b) core.train_model", 1, rate, 1.0 / single.history[-1]["seconds"],
                 single.test_accuracy, None))

    for k in pops:
        wall, last, res = _population(data, k, args.epochs, args, dev)
        acc = sum(r.test_accuracy or 0.0 for r in res) / len(res)
        rows.append((f"(c) train_population K={k}", k, k * args.epochs / wall, k / last, acc,
                     abs((res[0].test_accuracy or 0.0) - (single.test_accuracy or 0.0))))

    print(f"{'trainer':30s} {'model-epochs/s':>14s} {'steady':>9s} {'vs (a)':>9s} {'steady vs (a)':>13s} "
          f"{'test acc':>9s} {'|d acc| m0':>10s}")
    for label, _k, rate, steady, acc, d0 in rows:
        print(f"{label:30s} {rate:14.2f} {steady:9.2f} {rate / base_rate:8.1f}x {steady / base_rate:12.1f}x "
              f"{acc:9.4f} {'' if d0 is None else f'{d0:10.4f}'}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            _population(data, max(pops), 1, args, dev)
        key = "cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
        import cProfile
        import pstats

        with cProfile.Profile() as cprof:
            _population(data, max(pops), 1, args, dev)
        pstats.Stats(cprof).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
