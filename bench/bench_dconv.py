"""The dendritic conv family on Fashion-MNIST under 8,000 parameters: one config, one seed.

    python bench/bench_dconv.py --config E --epochs 20 --seed 0 [--augment none|shift]
        [--device cuda] [--data-dir DIR]

Trains ``dendritic_conv`` alone (``core.train_model``: Adam 5e-3, cosine schedule with one
warm-up epoch, label smoothing 0.1) and prints one JSON line: the exact parameter count, the
final validation and test accuracy and the validation curve. Config ``E`` is the family's
defaults (6,766 parameters). This is a single-config check, not a search: the issue-15
headline (a search plus finalize within 30 minutes) is a study, run through the service.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import core  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "A": dict(n_units1=16, n_units2=32, n_dendrites=4, n_dendrite_inputs1=9, n_dendrite_inputs2=32, pool_grid=1),
    "C": dict(n_units1=12, n_units2=24, n_dendrites=6, n_dendrite_inputs1=9, n_dendrite_inputs2=32, pool_grid=2),
    "E": dict(),
    "F": dict(n_units1=8, n_units2=16, n_dendrites=8, n_dendrite_inputs1=9, n_dendrite_inputs2=32, pool_grid=2),
    "J": dict(n_units1=12, n_units2=24, n_dendrites=8, n_dendrite_inputs1=9, n_dendrite_inputs2=24, pool_grid=2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="E", choices=sorted(CONFIGS))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--augment", default="none", choices=["none", "shift"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    data = core.load_dataset("fashion-mnist", data_dir=args.data_dir, flatten=False)
    cfg = CONFIGS[args.config]
    n = core.analytic_parameter_count("dendritic_conv", **cfg)
    model = core.create_model("dendritic_conv", seed=args.seed, **cfg)
    t = time.time()
    r = core.train_model(model, data, n_epochs=args.epochs, lr=5e-3, batch_size=128, device=args.device,
                         seed=args.seed, lr_schedule="cosine", warmup_epochs=1, label_smoothing=0.1,
                         augment=args.augment)
    print(json.dumps({"config": args.config, "n_params": n, "augment": args.augment, "seed": args.seed,
                      "seconds": round(time.time() - t, 1), "final_val": r.val_accuracy,
                      "final_test": r.test_accuracy,
                      "val_curve": [round(h["val_accuracy"], 4) for h in r.history]}), flush=True)


if __name__ == "__main__":
    main()
