"""Fashion-MNIST accuracy at <= 8,000 parameters, with and without synaptic resampling.

    python bench/bench_accuracy.py [--epochs 20] [--seeds 0,1,2] [--device auto] [--data-dir DIR]

dendritic_simple with the seed's layer (10 neurons, 23 dendrites, 32 inputs each: 7,940
parameters), Adam lr 1e-3, batch 128, selected on nothing (fixed configuration), test
accuracy after the last epoch; mean and spread over the seeds.
"""

from __future__ import annotations

import argparse
import statistics

import core


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    data = core.load_dataset("fashion-mnist", data_dir=args.data_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"# Fashion-MNIST, dendritic_simple n=10 d=23 k=32, {args.epochs} epochs, lr {args.lr}, "
          f"batch {args.batch_size}, device {core.resolve_device(args.device)}")
    for resampling in (True, False):
        accs, n_params = [], 0
        for s in seeds:
            m = core.create_model("dendritic_simple", seed=s, n_neurons=10, n_dendrites=23,
                                  n_dendrite_inputs=32, synaptic_resampling=resampling)
            r = core.train_model(m, data, n_epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                 device=args.device, seed=s)
            accs.append(r.test_accuracy)
            n_params = r.n_params
            print(f"resampling={resampling!s:5s} seed={s} params={n_params} test_acc={r.test_accuracy:.4f} "
                  f"val_acc={r.val_accuracy:.4f} ({r.seconds_per_epoch:.2f}s/epoch)", flush=True)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"RESULT resampling={resampling} params={n_params} mean={statistics.mean(accs):.4f} "
              f"std={sd:.4f} min={min(accs):.4f} max={max(accs):.4f}", flush=True)


if __name__ == "__main__":
    main()
