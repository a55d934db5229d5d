"""The 2,000-trial study's host work alone: bench/bench_e2e.py's worker, with the trainer replaced.

    python bench/host_study_probe.py [--cprofile] [bench_e2e options, e.g. --device cpu --data-dir DIR]

``core.train_population`` becomes ``bench/bench_overhead.py``'s instant trainer
(``fake_train_population``): it reads the configs as the real trainer does (a slot filled
whenever a member ends; ``--population auto`` fills 996 slots, what the study's population
takes on an H200), and each member reports the made-up epochs of ``bench_overhead.curve``.
What is left is the worker's own time for the same trials: asks, sampling, gates, reports,
pruning, tells. It is the study's floor with an infinitely fast trainer. Printed:
bench_e2e's report, and the seconds spent in the worker's callbacks (reading configs,
on_epoch, on_result with keep_weights).
"""

from __future__ import annotations

import cProfile
import functools
import pstats
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_overhead  # noqa: E402

import core  # noqa: E402

SECONDS = {"reading configs": 0.0, "on_epoch": 0.0, "on_result": 0.0}


def _timed(key: str, fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
    if fn is None:
        return None

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            SECONDS[key] += time.perf_counter() - t0

    return wrapper


def _timed_configs(configs: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    it = iter(configs)
    while True:
        t0 = time.perf_counter()
        try:
            config = next(it)
        except StopIteration:
            return
        finally:
            SECONDS["reading configs"] += time.perf_counter() - t0
        yield config


def stand_in(model: str, configs: Iterable[dict[str, Any]], data: Any, n_epochs: int, *args: Any,
             on_epoch: Callable[..., Any] | None = None, on_result: Callable[..., Any] | None = None,
             keep_weights: Callable[..., Any] | None = None, **kwargs: Any) -> list[Any]:
    return bench_overhead.fake_train_population(
        model, _timed_configs(configs), data, n_epochs, *args, on_epoch=_timed("on_epoch", on_epoch),
        on_result=_timed("on_result", on_result), keep_weights=_timed("on_result", keep_weights), **kwargs)


def main() -> None:
    profile = "--cprofile" in sys.argv
    if profile:
        sys.argv.remove("--cprofile")
    bench_overhead.AUTO_SIZE = 996
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
