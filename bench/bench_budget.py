"""How many of TPE's asked points fall over the parameter budget (target: at most 10%).

    python bench/bench_budget.py [--trials 200] [--max-params 8000] [--repeats 5] [--plain]
    python bench/bench_budget.py --real [--subset-size 5000] [--epochs 2] [--device cuda]

The seed's space on Fashion-MNIST with dendritic_simple: n_neurons 5-20, n_dendrites 3-15,
n_dendrite_inputs 16-256 (log), lr 1e-4-1e-2 (log). A study runs until ``--trials`` trials
have trained; over-budget points are asked, recorded as infeasible and not counted, exactly
as in ``run_study`` (same sampler, same budget gate). Prints the share of asked points that
were infeasible overall, in the first 50 asks and in the last 100, per repeat (seed).

Where TPE proposes is driven by the feasible/infeasible boundary, not by the details of
training, so by default a cheap stand-in replaces training (seconds for the whole run):

    accuracy = 0.80 + 0.08 * log(n_params) / log(max_params)
               - 0.01 * (log10(lr) - log10(3e-3))**2 + N(0, 0.003)

It rewards bigger models right up to the budget, so the optimum sits on the boundary:
the hardest case for staying feasible. ``--real`` trains each point on a Fashion-MNIST
subset instead. ``--plain`` uses Optuna's TPE with the budget as a constraint only (the
sampler before ``studies.BudgetAwareSampler``), for the before/after comparison.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import studies  # noqa: E402
from studies._runner import BudgetAwareSampler, TrialOutcome, budget_gate  # noqa: E402

SEED_SPACE = {
    "n_neurons": {"type": "int", "low": 5, "high": 20},
    "n_dendrites": {"type": "int", "low": 3, "high": 15},
    "n_dendrite_inputs": {"type": "int", "low": 16, "high": 256, "log": True},
    "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
}


def stand_in(n_params: int, lr: float, max_params: int, rng: random.Random) -> float:
    return (0.80 + 0.08 * math.log(n_params) / math.log(max_params)
            - 0.01 * (math.log10(lr) - math.log10(3e-3)) ** 2 + rng.gauss(0.0, 0.003))


def run_once(args: argparse.Namespace, seed: int) -> tuple[list[bool], float, float]:
    """One study; returns (infeasible flag per ask in order, best value, seconds)."""
    spec = studies.StudySpec(
        name=f"bench-budget-{seed}", model="dendritic_simple", dataset="fashion-mnist",
        search_space=SEED_SPACE, max_params=args.max_params, n_trials=args.trials,
        n_epochs=args.epochs, batch_size=256, sampler="tpe", pruner="none", seed=seed,
        subset_size=args.subset_size if args.real else None,
    )
    study = studies.create_study(spec, optuna.storages.InMemoryStorage(), spec.name)
    if args.plain and isinstance(study.sampler, BudgetAwareSampler):
        study.sampler = study.sampler.base
    rng = random.Random(seed)
    start = time.perf_counter()
    while (trial := studies.ask_trial(study, spec)) is not None:
        if args.real:
            studies.execute_trial(study, trial, spec, device=args.device, data_dir=args.data_dir)
            continue
        gate = budget_gate(study, trial, spec)
        if isinstance(gate, TrialOutcome):
            continue
        params, n = gate
        trial.set_user_attr("n_params", n)
        trial.set_constraint("max_params", float(n - args.max_params))
        study.tell(trial, stand_in(n, params["lr"], args.max_params, rng))
    seconds = time.perf_counter() - start
    asks = [studies.is_infeasible(t) for t in sorted(study.trials, key=lambda t: t.number)]
    return asks, study.best_value, seconds


def share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200, help="trained trials per study")
    ap.add_argument("--max-params", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=5, help="studies, with seeds 0, 1, ...")
    ap.add_argument("--plain", action="store_true", help="constrained TPE without the budget-aware draws")
    ap.add_argument("--real", action="store_true", help="train on Fashion-MNIST instead of the stand-in")
    ap.add_argument("--subset-size", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = "constrained TPE" if args.plain else "constrained TPE + budget-aware draws"
    objective = f"Fashion-MNIST subset {args.subset_size}, {args.epochs} epochs" if args.real else "stand-in"
    print(f"# {sampler}; {objective}; max_params={args.max_params}; {args.trials} trained trials per study")
    print(f"{'seed':>4} {'asks':>5} {'infeasible':>10} {'first 50':>9} {'last 100':>9} {'best':>7} {'seconds':>8}")
    overall, first, last = [], [], []
    for seed in range(args.repeats):
        asks, best, seconds = run_once(args, seed)
        overall.append(share(asks))
        first.append(share(asks[:50]))
        last.append(share(asks[-100:]))
        print(f"{seed:>4} {len(asks):>5} {overall[-1]:>10.1%} {first[-1]:>9.1%} {last[-1]:>9.1%} "
              f"{best:>7.4f} {seconds:>8.1f}")
    print(f"{'mean':>4} {'':>5} {statistics.fmean(overall):>10.1%} {statistics.fmean(first):>9.1%} "
          f"{statistics.fmean(last):>9.1%}")


if __name__ == "__main__":
    main()
