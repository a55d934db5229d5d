"""Homogeneous bf16 K = 1,024: what Python's full (generation 2) collections cost a population.

    python bench/gc_probe.py DATA_DIR

Runs core.train_population twice with the collector as it is and twice with it switched off
around the call, and prints the epochs, the whole call and every full collection (when it
started, how long it took). Since v11 the population itself keeps full collections off while
it trains (core._population._young_gc_only), so on that code both modes should match.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402

data = core.load_dataset("fashion-mnist", data_dir=sys.argv[1] if len(sys.argv) > 1 else None)
sizes = dict(n_neurons=12, n_dendrites=6, n_dendrite_inputs=96)
core.train_population("dendritic_simple", [dict(sizes)] * 2, data, 1, 256, device="cuda", precision="bf16")
full: list[tuple[str, float]] = []


def cb(phase: str, info: dict[str, Any]) -> None:
    if info["generation"] == 2:
        full.append((phase, time.perf_counter()))


gc.callbacks.append(cb)
for mode in ("gc on", "gc off", "gc on", "gc off"):
    marks: list[float] = []
    full.clear()
    if mode == "gc off":
        gc.collect()
        gc.disable()
    t0 = time.perf_counter()

    def on_epoch(i: int, epoch: int, metrics: dict[str, Any], marks: list[float] = marks) -> bool:
        if i == 0:
            marks.append(time.perf_counter())
        return False

    configs = [dict(sizes, lr=2e-3, seed=i) for i in range(1024)]
    core.train_population("dendritic_simple", configs, data, 15, 256, device="cuda", population_size=1024,
                          precision="bf16", on_epoch=on_epoch)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    gc.enable()
    epochs = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    starts = [t for p, t in full if p == "start"]
    stops = [t for p, t in full if p == "stop"]
    pauses = [(round(a - t0, 2), round((b - a) * 1e3, 1)) for a, b in zip(starts, stops, strict=False)]
    print(f"{mode}: wall {wall:.2f}s, first epoch ends at {marks[0] - t0:.2f}s; "
          f"epochs 2..15 {[round(e, 3) for e in epochs]}")
    print(f"   full collections (start s, ms): {pauses}; epoch ends at {[round(m - t0, 2) for m in marks]}")
    sys.stdout.flush()
