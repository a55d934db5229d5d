"""Best validation accuracy against device-seconds: TPE + median against TPE + population rungs.

    python bench/bench_search.py [--dataset digits] [--trials 120] [--epochs 9] [--population 27]
        [--device cpu|cuda] [--subset-size N] [--out bench/results/bench_search.html]

Two studies of the same space, sampler (TPE) and seed, each run by one population executor
(``studies.execute_population``, as ``dendro worker --population K`` does): one with the median
pruner, one with ``successive_halving`` (``studies.RungPruner``: members ranked with each other
at epochs 1, 3, 9, ...). For each, it records when every trial ended (seconds since the run
started) and the best validation accuracy so far; it prints the share of trials stopped early,
each run's best, and how long the rung run took to reach the median run's best, and writes both
curves to one plotly HTML file. The issue-15 target: at least 60% of trials stopped early and the
same best validation accuracy in at most a third of the time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import studies  # noqa: E402


def _spec(args: argparse.Namespace, pruner: str, n_trials: int) -> studies.StudySpec:
    space: dict[str, Any] = {
        "n_neurons": {"type": "int", "low": 4, "high": 16},
        "n_dendrites": {"type": "int", "low": 2, "high": 10},
        "n_dendrite_inputs": {"type": "int", "low": 4, "high": 32, "log": True},
        "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
    }
    return studies.StudySpec(
        name=f"search-{pruner}", model="dendritic_simple", dataset=args.dataset, max_params=args.max_params,
        n_trials=n_trials, n_epochs=args.epochs, batch_size=args.batch_size, sampler="tpe",
        pruner=pruner, subset_size=args.subset_size, search_space=space, seed=args.seed, keep_models=0)


def _run(args: argparse.Namespace, pruner: str, url: str, n_trials: int) -> dict[str, Any]:
    spec = _spec(args, pruner, n_trials)
    studies.create_study(spec, url)
    study, spec = studies.load_study(spec.name or "", url, sampler_seed=args.seed)
    t0 = time.perf_counter()
    ends: list[tuple[float, Any]] = []
    outs = studies.execute_population(study, spec, population_size=args.population, device=args.device)
    wall = time.perf_counter() - t0
    trials = [t for t in study.get_trials(deepcopy=False) if not studies.is_infeasible(t)]
    start = min(t.datetime_start for t in trials)
    best, curve = 0.0, []
    for t in sorted(trials, key=lambda t: t.datetime_complete):
        val = t.user_attrs.get("val_accuracy")
        if t.state.name == "COMPLETE" and val is not None:
            best = max(best, float(val))
        ends.append(((t.datetime_complete - start).total_seconds(), best))
        curve.append(ends[-1])
    states = [o.state for o in outs]
    epochs = sum(len(t.intermediate_values) for t in trials)
    return {"pruner": pruner, "wall": wall, "curve": curve, "best": best, "trials": len(trials),
            "pruned": states.count("pruned"), "member_epochs": epochs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--trials", type=int, default=120)
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--rung-trials", type=int, help="trials of the rung run (default: --trials); it "
                    "stops most of them early, so at equal time it can try more")
    ap.add_argument("--population", type=int, default=27)
    ap.add_argument("--rung-pruner", default="successive_halving", choices=["successive_halving", "hyperband"],
                    help="the rung run's pruner")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-params", type=int, default=3000)
    ap.add_argument("--subset-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench_search.html", help="the plot (self-contained HTML, about 4 MB)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/search.db"
        runs = [_run(args, "median", url, args.trials),
                _run(args, args.rung_pruner, url, args.rung_trials or args.trials)]
    print(f"{args.dataset}, {args.epochs} epochs, population {args.population}, device {args.device}")
    print(f"{'pruner':20s} {'trials':>6s} {'wall s':>8s} {'best val':>9s} {'stopped early':>14s} "
          f"{'member-epochs':>14s}")
    for r in runs:
        print(f"{r['pruner']:20s} {r['trials']:6d} {r['wall']:8.1f} {r['best']:9.4f} "
              f"{r['pruned'] / max(1, r['trials']):13.0%} {r['member_epochs']:14d}")
    median, rungs = runs
    target = median["best"]
    reached = next((s for s, b in rungs["curve"] if b >= target), None)
    median_at = next((s for s, b in median["curve"] if b >= target), None)
    if reached is None:
        print(f"the rung run never reached the median run's best ({target:.4f}); its best: {rungs['best']:.4f}")
    else:
        print(f"the rung run reached the median run's best ({target:.4f}) after {reached:.1f} s; the median "
              f"run after {median_at:.1f} s: {reached / max(median_at or 1e-9, 1e-9):.2f}x the time")
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in runs:
        xs, ys = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"TPE + {r['pruner']}",
                                 line={"shape": "hv"}))
    fig.update_layout(title=f"Best validation accuracy against seconds ({args.dataset}, {args.device})",
                      xaxis_title="seconds since the run started", yaxis_title="best val accuracy")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(args.out, include_plotlyjs=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
