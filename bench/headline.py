"""Issue 15's headline: one study, search plus finalize, on Fashion-MNIST under 8,000 parameters.

    python bench/headline.py --device cuda --data-dir DIR [--trials 10] [--epochs 8]
        [--top-n 2] [--seeds 3] [--final-epochs 15] [--storage URL] [--subset N]

One ``dendritic_conv`` study (TPE + median pruner, cosine schedule with one warm-up epoch,
batch 128) searches the units, dendrites, inputs per dendrite, lr and label smoothing, with
the family's defaults enqueued as the first trial. Then ``finalize`` re-trains the top
``--top-n`` trials by validation with ``--seeds`` fresh seeds for ``--final-epochs`` epochs,
chooses on validation, and reports the chosen trial's test accuracy (mean and std over the
seeds), its parameter count and its configuration. Both phases are timed; the answer is the
same ``dendro.final`` that ``POST /v1/studies/{name}/finalize`` stores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402

import studies  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--top-n", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--final-epochs", type=int, default=15)
    ap.add_argument("--subset", type=int, help="training examples (a quick try)")
    ap.add_argument("--storage", default=f"sqlite:////tmp/headline_{int(time.time())}.db")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = studies.StudySpec(
        name="headline-dendritic-conv", model="dendritic_conv", dataset="fashion-mnist",
        max_params=8000, n_trials=args.trials, n_epochs=args.epochs, batch_size=128,
        subset_size=args.subset, sampler="tpe", pruner="median", lr_schedule="cosine",
        warmup_epochs=1,
        search_space={
            "n_units1": {"type": "int", "low": 8, "high": 16},
            "n_units2": {"type": "int", "low": 16, "high": 32},
            "n_dendrites": {"type": "int", "low": 4, "high": 8},
            "n_dendrite_inputs2": {"type": "int", "low": 16, "high": 48},
            "lr": {"type": "float", "low": 2e-3, "high": 1e-2, "log": True},
            "label_smoothing": {"type": "categorical", "choices": [0.0, 0.1]},
        },
    )
    study = studies.create_study(spec, args.storage, spec.name)
    # the family's defaults (n_units1 12, n_units2 24, 6 dendrites, 32 inputs: 6,766 parameters)
    study.enqueue_trial({"n_units1": 12, "n_units2": 24, "n_dendrites": 6, "n_dendrite_inputs2": 32,
                         "lr": 5e-3, "label_smoothing": 0.1})
    t0 = time.perf_counter()
    study = studies.run_study(spec, args.storage, spec.name, show_progress=False, device=args.device,
                              data_dir=args.data_dir)
    search = time.perf_counter() - t0
    c = studies.progress(study)
    best = study.best_trial
    print(f"search: {search:.1f} s, {c}; best val {best.value:.4f} (trial {best.number}, "
          f"{best.user_attrs.get('n_params')} parameters) {best.params}", flush=True)
    studies.request_finalize(study, top_n=args.top_n, seeds=args.seeds, n_epochs=args.final_epochs)
    t1 = time.perf_counter()
    final = studies.run_finalize(study, spec, device=args.device, data_dir=args.data_dir)
    fin = time.perf_counter() - t1
    print(f"finalize: {fin:.1f} s (top {args.top_n} x {args.seeds} seeds x {args.final_epochs} epochs)")
    print(json.dumps(final, indent=1, default=str))
    print(f"TOTAL {search + fin:.1f} s: search {search:.1f} + finalize {fin:.1f}; chosen test accuracy "
          f"{final.get('test_accuracy_mean')} +- {final.get('test_accuracy_std')}, "
          f"{final.get('n_params')} parameters", flush=True)


if __name__ == "__main__":
    main()
