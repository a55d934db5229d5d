"""Is the population path's answer within noise of the one-trial path's, across search seeds?

    python bench/diru_noise.py --one FILE [FILE ...] --pop FILE [FILE ...] [--task lorenz]

Each FILE is a ``bench_diru.py`` output (one search seed; its table rows: task, family, test
MSE mean and std over the re-training seeds, ...). At 20 trials which configuration TPE lands
on varies from search seed to search seed more than re-training seeds do, so one seed's t test
(re-training seeds only) calls two runs of the *same* path different. Here the unit is the
search seed: for each family, the per-seed means of each path, their mean and spread, and
Welch's t between the two paths over those per-seed means. |t| < 2 is "within noise".
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path


def rows(path: str, task: str) -> dict[str, float]:
    """family -> test MSE mean, from one bench_diru output."""
    out: dict[str, float] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[0] == task and parts[1] in ("diru", "lstm", "gru"):
            try:
                out.setdefault(parts[1], float(parts[2]))
            except ValueError:
                continue
    return out


def welch(a: list[float], b: list[float]) -> float:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    return (statistics.mean(b) - statistics.mean(a)) / math.sqrt(va + vb) if va + vb > 0 else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs="+", required=True, help="one-trial-at-a-time outputs, one per search seed")
    p.add_argument("--pop", nargs="+", required=True, help="population outputs, one per search seed")
    p.add_argument("--task", default="lorenz")
    args = p.parse_args()
    one = [rows(f, args.task) for f in args.one]
    pop = [rows(f, args.task) for f in args.pop]
    print(f"task {args.task}: {len(one)} search seeds one trial at a time, {len(pop)} in population; "
          "per-seed test MSE means")
    print(f"{'family':7s} {'one trial (per seed)':>40s} {'mean':>9s} {'population (per seed)':>40s} "
          f"{'mean':>9s} {'t':>6s}")
    for fam in ("diru", "lstm", "gru"):
        a = [r[fam] for r in one if fam in r]
        b = [r[fam] for r in pop if fam in r]
        fa = " ".join(f"{x:.5f}" for x in a)
        fb = " ".join(f"{x:.5f}" for x in b)
        t = welch(a, b) if len(a) > 1 and len(b) > 1 else float("nan")
        print(f"{fam:7s} {fa:>40s} {statistics.mean(a):9.5f} {fb:>40s} {statistics.mean(b):9.5f} {t:6.2f}")


if __name__ == "__main__":
    main()
