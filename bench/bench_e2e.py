"""End to end: one worker runs a whole Fashion-MNIST study; where does the time go?

    python bench/bench_e2e.py --device cuda --trials 2000 --population auto --data-dir DIR

The seed's space under ``max_params=8000``, 15 epochs, batch 256, TPE and the median pruner,
run by one ``dendro worker`` (in this process, so it can be timed). The worker's main thread
is split into sampler time (Optuna sampler methods), storage time (the storage's public
methods, outermost calls only) and the rest (training on the device and the population's
own bookkeeping); the population trainer's own figures split the rest further (building and
stacking members, epochs, writing weights back) and give useful / executed training FLOPs
(the members' own sizes against the padded stacks that ran).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import signal
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import optuna

import studies
from service.worker import Worker, WorkerConfig

_TOTALS: dict[str, float] = defaultdict(float)
_TRAINER: dict[str, Any] = defaultdict(float)  # core.train_population's stats, summed over calls
_SHAPES: set[tuple[int, ...]] = set()  # (members, neurons, dendrites, inputs) of the stacks trained
_DEPTH = threading.local()
#: --profile: each population epoch's members, padded grid and seconds, split into stacking the
#: epoch's plans, the steps, evaluation and the per-member bookkeeping (callbacks)
_EPOCHS: list[dict[str, Any]] = []
_BETWEEN: dict[str, float] = defaultdict(float)  # --profile: seconds between epochs, by part
_KERNELS: list[Any] = []  # --profile: the fused Triton kernels, whose compilations are counted


def _timed(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread() or getattr(_DEPTH, "on", False):
            return fn(*args, **kwargs)
        _DEPTH.on = True
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _TOTALS[kind] += time.perf_counter() - t0
            _DEPTH.on = False

    return wrapper


def _trainer_stats(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stats: dict[str, Any] = {}
        try:
            return fn(*args, **{**kwargs, "stats": stats})
        finally:
            _TRAINER["calls"] += 1
            for k, v in stats.items():
                if k == "stacks":  # the stacks' shapes in the order they trained: count the switches
                    _SHAPES.update(v)
                    _TRAINER["switches"] += len(v)
                elif isinstance(v, list):  # per epoch (staging_seconds): their sum
                    _TRAINER[k] += sum(v)
                else:
                    _TRAINER[k] += v

    return wrapper


def _sync_timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Time ``fn`` into the current epoch's record, the device synchronized before and after."""
    import torch

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if _EPOCHS:
                _EPOCHS[-1][key] = _EPOCHS[-1].get(key, 0.0) + time.perf_counter() - t0

    return wrapper


def _instrument_epochs(profile_epoch: int) -> None:
    """--profile: record every population epoch (and profile the kernels of one)."""
    import torch

    from core import _population as P

    train, epoch = P._Population._train, P._Population._epoch

    def timed_epoch(self: Any, stack: Any) -> Any:
        d = stack.dims
        rec = {"K": stack.K, "grid": (d.n, d.d, d.k), "bs": self.batch_size,
               "new_graph": self.graph is None or self.graph.stack is not stack,
               "rows_used": sum(m.arch.n * m.arch.d for m in stack.members) / max(1, stack.K),
               "bands": [f"{n}x{d}" for _, _, n, d in stack.bands]}
        _EPOCHS.append(rec)
        t0 = time.perf_counter()
        before = _compiled()
        try:
            return epoch(self, stack)
        finally:
            rec["wall"] = time.perf_counter() - t0
            rec["compiles"] = _compiled() - before

    def timed_train(self: Any, stack: Any) -> Any:
        rec = _EPOCHS[-1]
        t0 = time.perf_counter()
        if len(_EPOCHS) == profile_epoch and torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                out = train(self, stack)
            print(f"# kernels of population epoch {profile_epoch} (K={stack.K}, grid {rec['grid']}):")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
        else:
            out = train(self, stack)
        rec["train"] = time.perf_counter() - t0
        return out

    P._Population._epoch, P._Population._train = timed_epoch, timed_train
    P._Population._assemble = _sync_timed("assemble", P._Population._assemble)
    # the evaluation, eager or replayed (timed around _Population._evaluate, never inside its
    # capture; older trees: _Stack.evaluate)
    if hasattr(P._Population, "_evaluate"):
        P._Population._evaluate = _sync_timed("evaluate", P._Population._evaluate)
    else:
        P._Stack.evaluate = _sync_timed("evaluate", P._Stack.evaluate)
    # the synaptic resampling between two steps (eager, replayed or captured: timed around
    # _Population._resample, never inside a capture), and how many members it resampled
    owner = P._Population if hasattr(P._Population, "_resample") else P._Stack  # older trees: eager only
    resample = _sync_timed("resample", owner._resample if owner is P._Population else owner.resample)

    def counted(self: Any, *args: Any) -> Any:
        groups = args[-1]
        if _EPOCHS:
            _EPOCHS[-1]["members"] = _EPOCHS[-1].get("members", 0) + sum(g.rows.shape[0] for g in groups)
            _EPOCHS[-1]["events"] = _EPOCHS[-1].get("events", 0) + 1
        return resample(self, *args)

    if owner is P._Population:
        P._Population._resample = counted
    else:
        P._Stack.resample = counted
    # inside the steps: the capture of a stack's step graphs (their warm-up steps included: one
    # step, then a chunk of _CHUNK_STEPS) and the Triton compilations (each new specialization
    # of the fused kernels)
    P._StepGraph.__init__ = _sync_timed("capture", P._StepGraph.__init__)
    from core import _kernels

    tri = _kernels._triton() if torch.cuda.is_available() else None
    _KERNELS[:] = list(tri[1:]) if tri is not None else []
    # between epochs: reading configs (the worker's asks, sampling and gates run inside),
    # building each member's module and state, stacking them on the device
    for name, key in (("_take", "take"), ("_build_member", "build_member"), ("_restack", "restack")):
        setattr(P._Population, name, _between(key, getattr(P._Population, name)))


def _compiled() -> int:
    """How many specializations of the fused Triton kernels this process has compiled so far
    (Triton's in-memory cache of each kernel, per device; 0 where its layout is unknown)."""
    try:
        return sum(len(c[0]) for k in _KERNELS for c in k.device_caches.values())
    except (AttributeError, TypeError, IndexError):
        return 0


def _between(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _BETWEEN[key] += time.perf_counter() - t0

    return wrapper


def _print_epochs() -> None:
    """The --profile table: one line per population epoch, then the totals."""
    print("# population epochs: K, padded grid (n, d, k), mean rows used, the fused step's bands "
          "(each band's neurons x dendrites), seconds in all, of which "
          "stacking plans / steps / evaluation / bookkeeping (the members' callbacks, weights kept); "
          "within the steps: the resampling (seconds, steps with resampling / members resampled), "
          "capturing the step graphs (their warm-up steps and any Triton compilation included), and how many "
          "Triton kernels were compiled")
    tot: dict[str, float] = defaultdict(float)
    for i, r in enumerate(_EPOCHS, 1):
        steps = r.get("train", 0.0) - r.get("assemble", 0.0) - r.get("evaluate", 0.0)
        book = r["wall"] - r.get("train", 0.0)
        for k, v in (("wall", r["wall"]), ("assemble", r.get("assemble", 0.0)), ("steps", steps),
                     ("evaluate", r.get("evaluate", 0.0)), ("bookkeeping", book)):
            tot[k] += v
        tot["member_epochs"] += r["K"]
        print(f"  {i:4d} K={r['K']:5d} grid={r['grid']} rows {r['rows_used']:6.1f}/{r['grid'][0] * r['grid'][1]:4d} "
              f"bs={r['bs']} bands {','.join(map(str, r['bands'])):11s} "
              f"{'new ' if r['new_graph'] else '    '}{r['wall']:7.3f}s = "
              f"{r.get('assemble', 0.0):6.3f} + {steps:6.3f} + {r.get('evaluate', 0.0):6.3f} + {book:6.3f}"
              + (f"   resample {r['resample']:.3f}s ({r['events']}/{r['members']})" if "resample" in r else "")
              + (f"   capture {r['capture']:.3f}s" if "capture" in r else "")
              + (f", {r['compiles']} Triton kernel(s) compiled" if r.get("compiles") else ""))
        tot["capture"] += r.get("capture", 0.0)
        tot["resample"] += r.get("resample", 0.0)
    n = max(1.0, tot["member_epochs"])
    print(f"# totals over {len(_EPOCHS)} population epochs, {int(n)} member-epochs:")
    for k in ("wall", "assemble", "steps", "resample", "capture", "evaluate", "bookkeeping"):
        print(f"  {k:<12} {tot[k]:8.1f}s  {1000 * tot[k] / n:7.3f} ms per member-epoch")
    b = _BETWEEN
    print(f"# between epochs: reading configs {b['take'] - b['build_member']:.2f}s (the worker's asks, "
          f"sampling, gates), building members {b['build_member']:.2f}s, stacking them "
          f"{b['restack']:.2f}s")


def _instrument() -> None:
    import core

    core.train_population = _trainer_stats(core.train_population)
    extra = vars(importlib.import_module("studies._fast")) if importlib.util.find_spec("studies._fast") else {}
    samplers = {optuna.samplers.TPESampler, optuna.samplers.RandomSampler, studies.BudgetAwareSampler}
    samplers |= {c for c in extra.values() if isinstance(c, type) and issubclass(c, optuna.samplers.BaseSampler)}
    for cls in samplers:
        for name in ("sample_relative", "sample_independent", "infer_relative_search_space",
                     "before_trial", "after_trial"):
            if name in vars(cls):
                setattr(cls, name, _timed("sampler", vars(cls)[name]))
    storage_classes = [optuna.storages.RDBStorage]
    storage_classes += [c for c in extra.values()
                        if isinstance(c, type) and issubclass(c, optuna.storages.BaseStorage)]
    for cls in storage_classes:
        for name, fn in list(vars(cls).items()):
            if callable(fn) and not name.startswith("_"):
                setattr(cls, name, _timed("storage", fn))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--population", default="auto")
    ap.add_argument("--storage", default="sqlite:////tmp/bench_e2e.db")
    ap.add_argument("--data-dir")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--max-params", type=int, default=8000)
    ap.add_argument("--retrain-seeds", type=int, default=0, help="re-train the best with this many seeds")
    ap.add_argument("--final-epochs", type=int, default=30)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                    help="the study's precision (its dendrite products)")
    ap.add_argument("--profile", action="store_true",
                    help="time every population epoch's parts (device synchronized around each: "
                         "slightly slower) and profile the kernels of one epoch")
    ap.add_argument("--switch-interval", type=float,
                    help="sys.setswitchinterval for the run (the default is Python's, 0.005 s)")
    ap.add_argument("--profile-epoch", type=int, default=5, help="which population epoch's kernels to profile")
    args = ap.parse_args()
    if args.switch_interval is not None:
        import sys

        sys.setswitchinterval(args.switch_interval)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = studies.StudySpec(
        name=f"e2e-{int(time.time())}", model="dendritic_simple", dataset=args.dataset,
        max_params=args.max_params, n_trials=args.trials, n_epochs=args.epochs, batch_size=256,
        sampler="tpe", pruner="median", precision=args.precision,
        search_space={
            "n_neurons": {"type": "int", "low": 5, "high": 20},
            "n_dendrites": {"type": "int", "low": 3, "high": 15},
            "n_dendrite_inputs": {"type": "int", "low": 16, "high": 256, "log": True},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        },
    )
    studies.create_study(spec, args.storage, spec.name)
    _instrument()
    if args.profile:
        _instrument_epochs(args.profile_epoch)
    worker = Worker(WorkerConfig(storage=args.storage, device=args.device, studies=[spec.name],
                                 idle_exit=1.0, population=args.population, data_dir=args.data_dir))
    studies.load_data(spec, args.data_dir)  # the dataset is read once; not part of the study's time
    # SIGTERM (e.g. `timeout`) stops the worker at the next epoch and still prints the figures.
    signal.signal(signal.SIGTERM, lambda *_: worker.stop_requested.set())
    t0 = time.perf_counter()
    worker.run()
    wall = time.perf_counter() - t0 - 1.0  # the idle wait before exiting
    # the run's own sampler and storage time: the reads below (the report's) come after it
    totals = defaultdict(float, _TOTALS)
    study, _ = studies.load_study(spec.name, args.storage)
    c = studies.progress(study)
    rest = wall - totals["sampler"] - totals["storage"]
    epochs = sum(t.user_attrs.get("epochs_run", 0) for t in study.get_trials(deepcopy=False))
    if args.profile:
        _print_epochs()
    print(f"# {spec.name}: {args.dataset}, max_params={args.max_params}, {args.epochs} epochs, TPE + median "
          f"pruner, population={args.population}, device={args.device}, precision={args.precision}")
    print(f"progress: {c}")
    print(f"wall {wall:.1f}s for {c['finished']} finished trials ({c['infeasible']} infeasible asks), "
          f"{epochs} model-epochs -> {epochs / wall:.0f} model-epochs/s")
    for k, v in (("sampler", totals["sampler"]), ("storage", totals["storage"]),
                 ("training + population bookkeeping", rest)):
        print(f"  {k:<36} {v:8.1f}s  {100 * v / wall:5.1f}%  {1000 * v / max(1, c['total']):7.1f} ms/trial")
    if _TRAINER["calls"]:
        t = _TRAINER
        print(f"  of which, in the population trainer ({int(t['calls'])} calls; {len(_SHAPES)} stack shapes, "
              f"{len({x[1:3] for x in _SHAPES})} grids, {int(t['switches'])} changes of shape from one epoch "
              f"to the next):")
        for k, label in (("build_seconds", "building and stacking members"), ("epoch_seconds", "epochs"),
                         ("keep_seconds", "writing weights back")):
            print(f"    {label:<34} {t[k]:8.1f}s  {100 * t[k] / wall:5.1f}%")
        print(f"    (the main thread on the epochs' staging {t['staging_seconds']:.1f}s, "
              f"{int(t['staged_here'])} epochs staged there rather than ahead)")
        print(f"  useful / executed training FLOPs: {t['useful_flops'] / max(1.0, t['executed_flops']):.2f}")
    best = study.best_trial
    print(f"best val {best.value:.4f} test {best.user_attrs.get('test_accuracy'):.4f} "
          f"params {best.user_attrs.get('n_params')} {best.params}", flush=True)
    if args.retrain_seeds:
        import core

        family, model_args, train = studies.split_params(spec, best.params)
        data = studies.load_data(spec, args.data_dir)
        accs = []
        for seed in range(args.retrain_seeds):
            m = core.create_model(family, seed=seed, **model_args)
            r = core.train_model(m, data, n_epochs=args.final_epochs, lr=train["lr"], batch_size=256,
                                 device=args.device, seed=seed)
            accs.append(r.test_accuracy)
            print(f"retrain seed {seed}: test {r.test_accuracy:.4f} val {r.val_accuracy:.4f} params {r.n_params}",
                  flush=True)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"RESULT best re-trained {args.final_epochs} epochs x {len(accs)} seeds: mean test "
              f"{statistics.mean(accs):.4f} std {sd:.4f}", flush=True)


if __name__ == "__main__":
    main()
