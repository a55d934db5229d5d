"""Where a homogeneous K = 1,024 population epoch's wall time goes: the main thread's waits.

    python bench/profile_population_waits.py --data-dir DIR [--precision bf16] [--epochs 10]

CUDA only. Per epoch: its seconds, then each part's seconds / calls: the main thread's wait for
the staged plans (assemble), evaluation (synchronized), garbage collection, the graph replays'
launches, the stager's stacking, and the plan drawing summed over the worker threads
(bench/results/bench_population_gpu_v10.txt, bench/NOTES_population.md "v10").
"""

from __future__ import annotations

import argparse
import collections
import gc
import threading
import time
from typing import Any

import torch

import core
import core._population as P

SIZES = dict(n_neurons=12, n_dendrites=6, n_dendrite_inputs=96)
_T: dict[str, float] = collections.defaultdict(float)
_C: dict[str, int] = collections.defaultdict(int)
_LOCK = threading.Lock()


def _timed(obj: Any, name: str, key: str, sync: bool = False) -> None:
    orig = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            if sync:
                torch.cuda.synchronize()
            with _LOCK:
                _T[key] += time.perf_counter() - t0
                _C[key] += 1

    setattr(obj, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    _timed(P, "_make_plan", "make_plan(thread-sum)")
    _timed(P._Population, "_assemble", "assemble(main)")
    _timed(P._Population, "_stage", "stage(stager)")
    _timed(P._Stack, "evaluate", "evaluate(main,sync)", sync=True)
    _timed(P._StepGraph, "replay", "replay-call(main)")
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            _T["gc"] += time.perf_counter() - started[0]
            _C["gc"] += 1

    gc.callbacks.append(on_gc)
    rows: list[tuple[int, float, dict[str, float], dict[str, int]]] = []

    def on_epoch(i: int, epoch: int, metrics: dict[str, Any]) -> bool:
        if i == 0:
            rows.append((epoch, metrics["seconds"], dict(_T), dict(_C)))
        return False

    data = core.load_dataset("fashion-mnist", data_dir=args.data_dir)
    core.train_population("dendritic_simple", [dict(SIZES)] * 2, data, 1, 256, device="cuda",
                          precision=args.precision)  # warm-up: compilations
    _T.clear()
    _C.clear()
    configs = [dict(SIZES, lr=2e-3, seed=i) for i in range(1024)]
    t0 = time.perf_counter()
    core.train_population("dendritic_simple", configs, data, args.epochs, 256, device="cuda",
                          population_size=1024, precision=args.precision, on_epoch=on_epoch)
    print(f"# {args.precision} K=1024 {args.epochs} epochs wall {time.perf_counter() - t0:.2f}s")
    prev: dict[str, float] = collections.defaultdict(float)
    prevc: dict[str, int] = collections.defaultdict(int)
    for epoch, seconds, t, c in rows:
        parts = " ".join(f"{k}={t.get(k, 0) - prev[k]:.3f}/{c.get(k, 0) - prevc[k]}"
                         for k in sorted(set(t) | set(prev)))
        print(f"epoch {epoch:2d} {seconds:.3f}s  {parts}")
        prev.update(t)
        prevc.update(c)


if __name__ == "__main__":
    main()
