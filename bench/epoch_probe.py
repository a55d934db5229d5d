"""Where a homogeneous population's epochs lose time against its last one, K = 1,024, bf16.

    python bench/epoch_probe.py DATA_DIR [--k 1024] [--epochs 8] [--rounds 2] [--sync-debug]
                                         [--switch-intervals 0.005,0.0005] [--resampling on,off]
                                         [--resample-graphs on,off] [--chunk-steps 16,1]
                                         [--plan-workers 16,4]

Trains ``dendritic_simple`` 12 x 6 x 96 members (the bench's) with synaptic resampling as
configured (every 128 steps) and switched off, alternating, and prints each run's epoch
seconds and its median over epochs 2..N against the last epoch (which draws no plans for a
next one). ``--sync-debug`` runs one more epoch-count run under
``torch.cuda.set_sync_debug_mode("warn")`` and counts the synchronizing calls by where they
were made (a synchronization in the step loop lets the device run dry while the host
launches the next steps). Uses only ``core.train_population``, so the same file runs from an
older tree (``PYTHONPATH=old python old/bench/epoch_probe.py``) in the same call.
``--switch-intervals`` repeats each run under each ``sys.setswitchinterval`` (Python's
default is 0.005 s: how long a thread that wants the GIL waits before asking its holder).
``--resample-graphs on,off`` repeats each run with the resamplings captured as CUDA graphs and
eager (``core._population._RESAMPLE_GRAPHS``; a tree without it runs eager whatever is asked),
``--chunk-steps`` with that many steps a CUDA graph replay (``_CHUNK_STEPS``), and
``--plan-workers`` with at most that many plan threads (``_MAX_PLAN_WORKERS``). Each run also
prints, per epoch, how long the main thread took to queue its steps (from the epoch's plans
assembled to the next epoch's staging started, which follows the last step; trees that stage
from the first step print nothing there).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import core  # noqa: E402

SIZES = dict(n_neurons=12, n_dendrites=6, n_dendrite_inputs=96)


QUEUED: list[float] = []  # per epoch: seconds the main thread took to queue the steps


def _timed_queueing() -> None:
    """Record, per epoch, the time from its plans assembled to the next epoch's staging."""
    pop = getattr(core._population, "_Population", None)
    if pop is None or "_loop_start" in vars(pop):
        return
    assemble, stage = pop._assemble, pop._stage_ahead

    def timed_assemble(self, stack):  # noqa: ANN001, ANN202
        out = assemble(self, stack)
        self._loop_start = time.perf_counter()
        return out

    def timed_stage(self, stack):  # noqa: ANN001, ANN202
        QUEUED.append(time.perf_counter() - getattr(self, "_loop_start", time.perf_counter()))
        return stage(self, stack)

    pop._assemble, pop._stage_ahead, pop._loop_start = timed_assemble, timed_stage, 0.0


def run(data: core.Dataset, k: int, epochs: int, resample: bool, precision: str) -> list[float]:
    configs = [dict(SIZES, seed=i, lr=2e-3, synaptic_resampling=resample) for i in range(k)]
    QUEUED.clear()
    res = core.train_population("dendritic_simple", configs, data, epochs, 256, device="cuda",
                                population_size=k, precision=precision)
    return [h["seconds"] for h in res[0].history]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--sync-debug", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--switch-intervals", default="0.005")
    ap.add_argument("--resampling", default="on,off")
    ap.add_argument("--resample-graphs", default="on")
    ap.add_argument("--chunk-steps", default="")
    ap.add_argument("--plan-workers", default="")
    args = ap.parse_args()
    data = core.load_dataset("fashion-mnist", data_dir=args.data_dir)
    run(data, 2, 1, True, args.precision)  # kernels compiled, the device warm
    default = sys.getswitchinterval()
    _timed_queueing()
    for rnd in range(args.rounds):
        for interval in map(float, args.switch_intervals.split(",")):
            for resample, graphs, chunk, workers in itertools.product(
                (m == "on" for m in args.resampling.split(",")), args.resample_graphs.split(","),
                args.chunk_steps.split(","), args.plan_workers.split(","),
            ):
                core._population._RESAMPLE_GRAPHS = graphs == "on"
                if chunk:
                    core._population._CHUNK_STEPS = int(chunk)
                if workers:
                    core._population._MAX_PLAN_WORKERS = int(workers)
                sys.setswitchinterval(interval)
                t0 = time.perf_counter()
                ep = run(data, args.k, args.epochs, resample, args.precision)
                wall = time.perf_counter() - t0
                sys.setswitchinterval(default)
                mid = statistics.median(ep[1:-1])
                print(f"{args.tag}resampling {'on ' if resample else 'off'} graphs {graphs:3} chunk "
                      f"{chunk or '-':>2} workers {workers or '-':>2} switch {interval:g} round {rnd}: "
                      f"wall {wall:6.2f}s, epochs 2..N-1 median {mid:.3f}s, last {ep[-1]:.3f}s, "
                      f"{[round(e, 3) for e in ep]}; queued in {[round(q, 3) for q in QUEUED]}", flush=True)
    if args.sync_debug:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run(data, args.k, 3, True, args.precision)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        where = collections.Counter(
            f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
        print(f"{args.tag}synchronizing calls in a 3-epoch run: {sum(where.values())}")
        for at, n in where.most_common(15):
            print(f"{args.tag}  {n:6d}  {at}")


if __name__ == "__main__":
    main()
