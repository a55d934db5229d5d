"""Where a homogeneous population call's first epoch and build go (issue 14's whole / steady).

    python bench/first_epoch_probe.py --data-dir DIR [--k 1024] [--epochs 4] [--precision bf16]
        [--calls N] [--plain-only]

K members of dendritic_simple 12x6x96 on Fashion-MNIST, batch 256, after a two-member warm-up
call (as bench/bench_population.py makes). Every population epoch is timed as
``bench/bench_e2e.py --profile`` times the study's: stacking plans / steps / evaluation /
bookkeeping, the resampling and the graph captures within the steps, plus compiling the fused
kernels ahead; each part with the device synchronized before and after, so the parts add up
to device time plus the host time nothing overlapped. Before it, ``--calls`` plain calls (1 by
default; v18 compared two trees with two plain calls a process, 15 epochs, processes
alternating: ``--epochs 15 --calls 2 --plain-only``), each with its wall time, build, keep and
whole / steady.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import core  # noqa: E402
from core import _population as P  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--eval-bytes", type=int, help="core._population._EVAL_BYTES (a probe)")
    ap.add_argument("--module-free", type=int, choices=[0, 1], help="core._population._MODULE_FREE")
    ap.add_argument("--eval-graphs", type=int, choices=[0, 1], help="core._population._EVAL_GRAPHS")
    ap.add_argument("--keep-pinned", type=int, choices=[0, 1], help="core._population._KEEP_PINNED")
    ap.add_argument("--run-ahead", type=int, choices=[0, 1],
                    help="1: core._population._AHEAD_ON = ('cuda',), 0: ()")
    ap.add_argument("--calls", type=int, default=1, help="plain calls before the timed one")
    ap.add_argument("--plain-only", action="store_true", help="skip the timed call")
    ap.add_argument("--trace", action="store_true",
                    help="plain calls: print each epoch's staging job, the main thread's wait for it, the "
                         "evaluation's launches, the pinned allocations, the build's parts, the weights kept "
                         "and the host's time between epochs (host times, no synchronization)")
    ap.add_argument("--eval-profile", type=int, default=0,
                    help="profile the timed call's first N evaluations (two an epoch) with torch.profiler")
    args = ap.parse_args()
    for flag, name in ((args.eval_bytes, "_EVAL_BYTES"), (args.module_free, "_MODULE_FREE"),
                       (args.eval_graphs, "_EVAL_GRAPHS"), (args.keep_pinned, "_KEEP_PINNED")):
        if flag is not None:
            setattr(P, name, type(getattr(P, name))(flag))
    if args.run_ahead is not None:
        P._AHEAD_ON = ("cuda",) if args.run_ahead else ()
    dev = core.resolve_device("auto")
    data = core.load_dataset("fashion-mnist", data_dir=args.data_dir)
    sizes = {"n_neurons": 12, "n_dendrites": 6, "n_dendrite_inputs": 96}
    core.train_population("dendritic_simple", [dict(sizes)] * 2, data, 1, 256, device=dev,
                          precision=args.precision)
    configs = [dict(sizes, lr=2e-3, seed=i) for i in range(args.k)]

    def call() -> tuple[float, dict]:
        stats: dict = {}
        t0 = time.perf_counter()
        res = core.train_population("dendritic_simple", configs, data, args.epochs, 256, device=dev,
                                    population_size=args.k, precision=args.precision, stats=stats)
        stats["epochs"] = [round(h["seconds"], 3) for h in res[0].history]
        return time.perf_counter() - t0, stats

    trace = _trace() if args.trace else None
    for n in range(1, args.calls + 1):
        if trace is not None:
            for v in trace.values():
                v.clear()
        wall, stats = call()
        last = stats["epochs"][-1]
        print(f"# plain call {n}: wall {wall:.3f}s, build {stats['build_seconds']:.3f}s, epochs "
              f"{stats['epoch_seconds']:.3f}s, keep {stats['keep_seconds']:.3f}s; whole / steady "
              f"{args.epochs * last / wall:.3f} (steady: the last epoch, {args.k / last:.1f} model-epochs/s); "
              f"epoch seconds {stats['epochs']}; {stats['run_ahead']} queued ahead", flush=True)
        if trace is not None:
            print(f"#   main thread's wait for the staged plans {stats['staging_seconds']} "
                  f"({stats['staged_here']} staged there)")
            for name, v in trace.items():
                if name == "read-back":  # each epoch's read-back to the next epoch's first launch
                    starts = trace["_train"][1:]  # 0: queued ahead, before the read-back
                    name, v = "host between epochs (read-back to the next _train; 0: queued ahead)", [
                        max(0.0, b - a) for a, b in zip(v, starts, strict=False)]
                elif name == "_train":
                    continue
                elif name.startswith(("build", "keep")):  # one total a call
                    v = [sum(v)]
                print(f"#   {name} {[round(t, 4) for t in v]}")
    if args.plain_only:
        return
    import bench_e2e

    if args.eval_profile:
        _profile_evaluations(args.eval_profile)
    bench_e2e._instrument_epochs(10**9)
    P._Population._compile_ahead = staticmethod(bench_e2e._sync_timed("compile", P._Population._compile_ahead))
    wall, stats = call()
    bench_e2e._print_epochs()
    for i, r in enumerate(bench_e2e._EPOCHS, 1):
        if "compile" in r:
            print(f"# epoch {i}: compiling ahead {r['compile']:.3f}s (within its steps)")
    print(f"# timed call: wall {wall:.3f}s, build {stats['build_seconds']:.3f}s, epochs "
          f"{stats['epoch_seconds']:.3f}s, keep {stats['keep_seconds']:.3f}s")


def _trace() -> dict[str, list[float]]:
    """Host seconds of each staging job (a worker thread), each pinned buffer it takes, each
    ``_Population._evaluate`` call's launches (the main thread, no synchronization) and each
    pinned allocation, in order."""
    import torch

    out: dict[str, list] = {"staging jobs": [], "pinned buffers taken (the wait for the last copy included)": [],
                                   "evaluation launches": [], "pinned allocations": []}

    def timed(fn, key):  # noqa: ANN001, ANN202
        def run(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                out[key].append(time.perf_counter() - t0)
        return run

    P._Population._stage = timed(P._Population._stage, "staging jobs")
    P._Population._evaluate = timed(P._Population._evaluate, "evaluation launches")
    P._PinnedBuffers.take = timed(P._PinnedBuffers.take, "pinned buffers taken (the wait for the last copy included)")
    empty = torch.empty

    def pinned_empty(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        if not kw.get("pin_memory"):
            return empty(*a, **kw)
        return timed(empty, "pinned allocations")(*a, **kw)

    P.torch.empty = pinned_empty  # the module's torch is torch itself: a probe only
    # the build's parts and the host's time between one epoch's read-back and the next one's
    # first launch (the device idles there), one total each a call
    for key, owner, name in (("build: members (_take)", P._Population, "_take"),
                             ("build: their draws (_draw_connections)", P._Population, "_draw_connections"),
                             ("build: draws' scores (connection_scores, queued)", P, "connection_scores"),
                             ("build: draws' weights (initial_weights, queued)", P, "initial_weights"),
                             ("build: the stack (_Stack.build)", P._Stack, "build"),
                             ("build: all of _restack", P._Population, "_restack"),
                             ("keep (_keep_weights)", P._Population, "_keep_weights"),
                             ("keep: read back (_Stack.states)", P._Stack, "states"),
                             ("keep: state_dicts (_Template.state_dict)", P._Template, "state_dict")):
        out[key] = []
        fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        if isinstance(fn, classmethod):
            setattr(owner, name, classmethod(timed(fn.__func__, key)))
        else:
            setattr(owner, name, timed(fn, key))
    out["_train"], out["read-back"] = [], []
    train, read_back = P._Population._train, P._Population._read_back

    def train_starts(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        out["_train"].append(time.perf_counter())
        return train(self, *a, **kw)

    def read_back_ends(self, table):  # noqa: ANN001, ANN202
        wait = read_back(self, table)

        def ended():  # noqa: ANN202
            try:
                return wait()
            finally:
                out["read-back"].append(time.perf_counter())
        return ended

    P._Population._train = train_starts
    P._Population._read_back = read_back_ends
    return out


def _profile_evaluations(first: int) -> None:
    """Print, for each of the next ``first`` calls of ``_Stack.evaluate``, its wall time, the
    device allocations (cudaMalloc) it made and torch.profiler's busiest operations."""
    import torch

    orig = P._Stack.evaluate
    seen = [0]

    def evaluate(self: P._Stack, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen[0] += 1
        if seen[0] > first:
            return orig(self, x, y)
        torch.cuda.synchronize()
        mallocs = torch.cuda.memory_stats().get("num_device_alloc", 0)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=acts) as prof:
            out = orig(self, x, y)
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        print(f"## evaluate {seen[0]} ({len(x)} examples): {wall:.3f}s, cudaMalloc "
              f"{torch.cuda.memory_stats().get('num_device_alloc', 0) - mallocs}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=4))
        return out

    P._Stack.evaluate = evaluate


if __name__ == "__main__":
    main()
