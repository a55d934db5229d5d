"""Fashion-MNIST search over growth settings against no growth, under one budget.

    python bench/gpu_growth_search.py --device cuda --data-dir DIR [--trials 10] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import time

import studies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--max-params", type=int, default=50_000)
    ap.add_argument("--subset", type=int, default=20_000)
    ap.add_argument("--storage", default="sqlite:////tmp/growth_search.db")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = studies.growth_search(max_params=args.max_params, dataset="fashion-mnist", n_trials=args.trials,
                                n_epochs=args.epochs, subset_size=args.subset, storage=args.storage,
                                device=args.device, data_dir=args.data_dir, show_progress=False)
    print(f"# small_cnn (width 4, hidden 24) on Fashion-MNIST subset {args.subset}, max_params={args.max_params}, "
          f"{args.trials} trials x {args.epochs} epochs per variant, {time.perf_counter() - t0:.0f}s")
    for row in res.table:
        print(json.dumps(row, default=str))


if __name__ == "__main__":
    main()
