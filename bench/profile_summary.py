"""Sum the cProfiles that ``bench_scale.py --profile DIR`` wrote (one per worker) and print the
functions with the most cumulative time, per finished trial.

    python bench/profile_summary.py DIR N_TRIALS [--top 40]

A worker that found no study (the idle start-up probe) is left out: the largest files are
the workers that ran trials. Cumulative time double-counts nested calls, so read it as "time
spent inside", not as shares that add up.
"""

from __future__ import annotations

import argparse
import os
import pstats
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("trials", type=int)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--workers", type=int, default=None, help="the N largest profiles only (default: all)")
    args = p.parse_args()
    files = sorted(Path(args.dir).glob("*.prof"), key=lambda f: f.stat().st_size, reverse=True)
    if args.workers:
        files = files[:args.workers]
    stats = pstats.Stats(*map(str, files))
    rows = []
    for (fn, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((ct, tt, nc, f"{name} {os.path.basename(fn)}:{line}"))
    rows.sort(reverse=True)
    print(f"{len(files)} profiles, {args.trials} trials; ms per trial: cumulative, own; calls")
    for ct, tt, nc, where in rows[:args.top]:
        print(f"{1000 * ct / args.trials:9.2f} {1000 * tt / args.trials:8.2f} {nc:9d}  {where[:110]}")
    print("-- by own time --")
    rows.sort(key=lambda r: -r[1])
    for ct, tt, nc, where in rows[:args.top]:
        print(f"{1000 * ct / args.trials:9.2f} {1000 * tt / args.trials:8.2f} {nc:9d}  {where[:110]}")


if __name__ == "__main__":
    main()
