"""train_model against the seed-style loop: seconds per epoch and accuracy, same run, same data.

    python bench/bench_train.py [--device cpu|cuda] [--epochs 3] [--data-dir DIR]

dendritic_simple with 12 neurons, 6 dendrites, 96 inputs per dendrite, batch 256, on
Fashion-MNIST (digits with --dataset digits). Prints both and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baseline import seed_style_train  # noqa: E402

import core  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-dir")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--impl", default="all", help="gather, scatter or all (layer implementations)")
    args = ap.parse_args()
    dev = core.resolve_device(args.device)
    data = core.load_dataset(args.dataset, data_dir=args.data_dir)
    n, d, k = 12, 6, min(96, data.in_dim)
    print(f"# {args.dataset} {data.sizes()} on {dev} ({torch.get_num_threads()} threads), "
          f"dendritic_simple n={n} d={d} k={k}, batch {args.batch_size}, {args.epochs} epochs")
    base = seed_style_train(data, n, d, k, args.epochs, args.batch_size, args.lr, dev)
    rows = [("seed-style loop (DataLoader, dense masked)", base["seconds_per_epoch"], base["test_accuracy"])]
    impls = ["gather", "scatter"] if args.impl == "all" else [args.impl]
    for impl in impls:
        model = core.create_model("dendritic_simple", seed=0, in_dim=data.in_dim, n_neurons=n,
                                  n_dendrites=d, n_dendrite_inputs=k)
        model[0].impl = impl
        t0 = time.perf_counter()
        r = core.train_model(model, data, n_epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        spe = (time.perf_counter() - t0) / args.epochs
        rows.append((f"train_model (impl={impl})", spe, r.test_accuracy))
    print(f"{'trainer':48s} {'s/epoch':>9s} {'speed-up':>9s} {'test acc':>9s}")
    for name, spe, acc in rows:
        print(f"{name:48s} {spe:9.3f} {base['seconds_per_epoch'] / spe:8.2f}x {acc:9.4f}")


if __name__ == "__main__":
    main()
