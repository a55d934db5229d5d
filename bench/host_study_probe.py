"""The 2,000-trial study's host work alone: bench/bench_e2e.py's worker, with the trainer replaced.

    python bench/host_study_probe.py [--cprofile] [bench_e2e options, e.g. --device cpu --data-dir DIR]

``core.train_population`` becomes a stand-in that trains nothing. It reads the configs as the
real trainer does (a slot is filled whenever a member ends; ``--population auto`` fills 996
slots, what the study's population takes on an H200). Each member reports 15 epochs of made-up
metrics: better for later trials, as TPE's second cohort is, so the median pruner prunes about
as rarely as in the real study. What is left is the worker's own time for the same trials:
asks, sampling, gates, reports, pruning, tells. It is the study's floor with an infinitely
fast trainer. Printed: bench_e2e's report, and the seconds the stand-in spent in the worker's
callbacks (reading configs, on_epoch, on_result).
"""

from __future__ import annotations

import cProfile
import pstats
import random
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import core  # noqa: E402
from core._train import TrainResult  # noqa: E402

AUTO = 996  # the study's population on an H200 ("auto")
SECONDS = {"reading configs": 0.0, "on_epoch": 0.0, "on_result": 0.0}


def stand_in(model: str, configs: Iterable[dict[str, Any]], data: Any, n_epochs: int, batch_size: int = 128,
             device: Any = None, seed: int = 0, on_epoch: Callable[..., Any] | None = None, *,
             population_size: int | str | None = None, on_result: Callable[..., Any] | None = None,
             keep_weights: Callable[..., Any] | None = None, **_: Any) -> list[TrainResult]:
    rng = random.Random(seed)
    it = iter(configs)
    size = population_size if isinstance(population_size, int) else AUTO
    live: list[tuple[int, float, TrainResult]] = []
    out: list[TrainResult] = []
    exhausted = False
    while True:
        t0 = time.perf_counter()
        while len(live) < size and not exhausted:
            try:
                config = next(it)
            except StopIteration:
                exhausted = True
                break
            quality = 0.55 + 0.25 * len(out) / 2000 + 0.03 * rng.random()  # later trials do better
            live.append((len(out), quality, TrainResult(n_params=5000, seed=config.get("seed", 0))))
            out.append(live[-1][2])
        SECONDS["reading configs"] += time.perf_counter() - t0
        if not live:
            return out
        ended = []
        t0 = time.perf_counter()
        for member in live:
            i, quality, res = member
            epoch = len(res.history) + 1
            acc = quality + 0.1 * (1 - 0.8 ** epoch)
            metrics = {"epoch": epoch, "train_loss": 1 - acc, "train_accuracy": acc, "val_loss": 1 - acc,
                       "val_accuracy": acc, "test_loss": 1 - acc, "test_accuracy": acc, "seconds": 0.5,
                       "n_params": res.n_params}
            res.history.append(metrics)
            if on_epoch is not None and on_epoch(i, epoch, metrics):
                res.status = "stopped"
                ended.append(member)
            elif epoch >= n_epochs:
                ended.append(member)
        SECONDS["on_epoch"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for member in ended:
            live.remove(member)
            if keep_weights is not None:
                keep_weights(member[0], member[2])
            if on_result is not None:
                on_result(member[0], member[2])
        SECONDS["on_result"] += time.perf_counter() - t0


def main() -> None:
    profile = "--cprofile" in sys.argv
    if profile:
        sys.argv.remove("--cprofile")
    core.train_population = stand_in  # type: ignore[assignment]
    import bench_e2e

    prof = cProfile.Profile() if profile else None
    if prof is not None:
        prof.enable()
    bench_e2e.main()
    if prof is not None:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats("studies|service", 30)
    print("# the stand-in's time in the worker's callbacks: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in SECONDS.items()), flush=True)


if __name__ == "__main__":
    main()
