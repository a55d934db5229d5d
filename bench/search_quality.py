"""Search quality: the best dendritic configuration under 8,000 parameters, re-trained with seeds.

    python bench/search_quality.py --device cuda --trials 600 --population auto --data-dir DIR

Runs a TPE study (median pruning) on Fashion-MNIST with ``max_params=8000`` in population
mode, selects the best trial on validation accuracy, re-trains it with 3 seeds for
``--final-epochs`` and prints the mean and spread of test accuracy, with trials and time used.
"""

from __future__ import annotations

import argparse
import statistics
import time

import core
import studies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--trials", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--final-epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--population", default="auto")
    ap.add_argument("--storage", default="sqlite:////tmp/search_quality.db")
    ap.add_argument("--data-dir")
    ap.add_argument("--model", default="dendritic_simple")
    args = ap.parse_args()
    pop = int(args.population) if args.population.isdigit() else args.population
    spec = studies.StudySpec(
        name=f"quality-{int(time.time())}", model=args.model, dataset="fashion-mnist",
        max_params=8000, n_trials=args.trials, n_epochs=args.epochs, batch_size=args.batch_size,
        sampler="tpe", pruner="median",
        search_space={
            "n_neurons": {"type": "int", "low": 5, "high": 20},
            "n_dendrites": {"type": "int", "low": 3, "high": 15},
            "n_dendrite_inputs": {"type": "int", "low": 16, "high": 256, "log": True},
            "lr": {"type": "float", "low": 3e-4, "high": 2e-2, "log": True},
            "weight_decay": {"type": "float", "low": 1e-7, "high": 1e-3, "log": True},
            "synaptic_resampling": [True, False],
            "percentage_resample": {"type": "float", "low": 0.05, "high": 0.5},
            "steps_to_resample": {"type": "int", "low": 32, "high": 512, "log": True},
        },
    )
    study = studies.create_study(spec, args.storage, spec.name)
    study, spec = studies.load_study(spec.name, args.storage)
    t0 = time.perf_counter()
    while True:
        outs = studies.execute_population(study, spec, population_size=pop, device=args.device,
                                          data_dir=args.data_dir)
        if not outs:
            break
    search_s = time.perf_counter() - t0
    c = studies.progress(study)
    best = study.best_trial
    print(f"search: {c} in {search_s:.0f}s; best val {best.value:.4f} test {best.user_attrs['test_accuracy']:.4f} "
          f"params {best.user_attrs['n_params']} at {best.params}", flush=True)
    family, model_args, train = studies.split_params(spec, best.params)
    data = studies.load_data(spec, args.data_dir)
    accs = []
    for seed in (0, 1, 2):
        m = core.create_model(family, seed=seed, **model_args)
        r = core.train_model(m, data, n_epochs=args.final_epochs, lr=train["lr"],
                             weight_decay=train["weight_decay"], batch_size=args.batch_size,
                             device=args.device, seed=seed)
        accs.append(r.test_accuracy)
        print(f"retrain seed {seed}: test {r.test_accuracy:.4f} val {r.val_accuracy:.4f} "
              f"params {r.n_params}", flush=True)
    print(f"RESULT trials={c['finished']} infeasible={c['infeasible']} search_seconds={search_s:.0f} "
          f"mean_test={statistics.mean(accs):.4f} std={statistics.stdev(accs):.4f} "
          f"params={core.count_parameters(m)} final_epochs={args.final_epochs}", flush=True)


if __name__ == "__main__":
    main()
