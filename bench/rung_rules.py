"""Offline: which rung rule keeps the configurations that win at the end?

    python bench/rung_rules.py CURVES.jsonl [--eta 3] [--top 10] [--rungs 1,3,9]

Reads the learning curves that ``bench/bench_search.py --curves FILE`` writes (the median
run's complete trials: parameters, size, validation accuracy after every epoch and at the
end) and asks, for a successive-halving cut that keeps 1/eta of the trials at epoch r, how
many of the final ``--top`` best each rule keeps, whether it keeps the final best, and the rank
correlation of its score with the final accuracy. Rules:

- ``plain``: validation accuracy at epoch r (what ``studies.RungPruner`` ranks by);
- ``strata``: the same, but the cut keeps 1/eta of each third of the trials by parameter count,
  so that slow-starting large models compete with their own size;
- ``size-adjusted``: the final accuracy predicted from the accuracy at r and the size, i.e.
  accuracy at r + alpha + beta * log(parameters), (alpha, beta) fitted by least squares of
  (final - accuracy at r) on log(parameters) over the other half of the trials (by trial
  number: the earlier half scores the later one and the later the earlier), so that no trial's
  own final accuracy enters its score.

Per seed, each rule's numbers are over all of that seed's trials (each half scored with the
other half's beta). This is a prediction for a rung rule, not a search: a real rung run's
sampler reacts to what the rungs stop.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import spearman  # noqa: E402


def _fit(trials: list[dict[str, Any]], r: int) -> tuple[float, float]:
    """Least squares of (final - accuracy at r) on log(parameters): (intercept, slope)."""
    xs = [math.log(t["n_params"]) for t in trials]
    ys = [t["final"] - t["curve"][r - 1] for t in trials]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    beta = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return my - beta * mx, beta


def scores(trials: list[dict[str, Any]], r: int) -> dict[str, list[float]]:
    """Each rule's score of every trial at epoch r (higher is kept)."""
    plain = [t["curve"][r - 1] for t in trials]
    half = sorted(t["number"] for t in trials)[len(trials) // 2]
    early = [t for t in trials if t["number"] < half]
    late = [t for t in trials if t["number"] >= half]
    fits = {True: _fit(late, r), False: _fit(early, r)}  # each half scored by the other's fit
    # the predicted final accuracy, so that both halves' scores compare
    adjusted = [t["curve"][r - 1] + fits[t["number"] < half][0] + fits[t["number"] < half][1]
                * math.log(t["n_params"]) for t in trials]
    return {"plain": plain, "strata": plain, "size-adjusted": adjusted}


def keep(trials: list[dict[str, Any]], score: list[float], eta: int, stratified: bool) -> set[int]:
    """Indices a 1/eta cut keeps: overall, or within each third of the trials by size."""
    idx = list(range(len(trials)))
    if not stratified:
        return set(sorted(idx, key=lambda i: -score[i])[: max(1, len(idx) // eta)])
    by_size = sorted(idx, key=lambda i: trials[i]["n_params"])
    out: set[int] = set()
    for s in range(3):
        part = by_size[s * len(idx) // 3 : (s + 1) * len(idx) // 3]
        out |= set(sorted(part, key=lambda i: -score[i])[: max(1, len(part) // eta)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("curves")
    ap.add_argument("--eta", type=int, default=3)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--rungs", default="1,3,9")
    args = ap.parse_args()
    by_seed: dict[int, list[dict[str, Any]]] = defaultdict(list)
    with open(args.curves) as f:
        for line in f:
            t = json.loads(line)
            if t["n_params"] and None not in t["curve"]:
                by_seed[t["seed"]].append(t)
    rungs = [int(x) for x in args.rungs.split(",")]
    print(f"# {args.curves}: a 1/{args.eta} cut at epoch r; kept of the final top {args.top}, "
          f"whether the final best is kept, rank correlation of the score with the final accuracy, "
          f"mean parameters of the kept trials (final top {args.top}'s in the header)")
    totals: dict[tuple[int, str], list[tuple[int, int, float]]] = defaultdict(list)
    for seed, trials in sorted(by_seed.items()):
        n_epochs = min(len(t["curve"]) for t in trials)
        final = [t["final"] for t in trials]
        order = sorted(range(len(trials)), key=lambda i: -final[i])
        best, top = order[0], set(order[: args.top])
        size_top = sum(trials[i]["n_params"] for i in top) / len(top)
        print(f"seed {seed}: {len(trials)} complete trials of {n_epochs} epochs; mean parameters "
              f"{sum(t['n_params'] for t in trials) / len(trials):.0f}, final top {args.top} {size_top:.0f}")
        for r in rungs:
            if r >= n_epochs:
                continue
            for rule, score in scores(trials, r).items():
                kept = keep(trials, score, args.eta, rule == "strata")
                rho = spearman(score, final)
                size = sum(trials[i]["n_params"] for i in kept) / len(kept)
                totals[(r, rule)].append((len(top & kept), int(best in kept), rho))
                print(f"  epoch {r:2d} {rule:14s} keeps {len(top & kept):2d} of {args.top}, best "
                      f"{'kept' if best in kept else 'lost'}, rank corr {rho:.2f}, kept mean params {size:.0f}")
    print(f"# over {len(by_seed)} seeds:")
    for (r, rule), rows in sorted(totals.items()):
        print(f"  epoch {r:2d} {rule:14s} keeps {sum(x[0] for x in rows) / len(rows):4.1f} of {args.top} "
              f"on average, the final best in {sum(x[1] for x in rows)} of {len(rows)}, rank corr "
              f"{sum(x[2] for x in rows) / len(rows):.2f}")


if __name__ == "__main__":
    main()
