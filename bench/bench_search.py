"""Best validation accuracy against device-seconds: TPE + median against TPE + population rungs.

    python bench/bench_search.py [--dataset digits] [--trials 120] [--rung-trials N] [--epochs 9]
        [--population 27] [--seeds 3] [--device cpu|cuda] [--data-dir DIR] [--subset-size N]
        [--out bench_search.html] [--curves FILE]

Two studies of the same space, sampler (TPE) and seed, each run by one population executor
(``studies.execute_population``, as ``dendro worker --population K`` does): one with the median
pruner, one with ``successive_halving`` (``studies.RungPruner``: members ranked with each other
at epochs 1, 3, 9, ...). For each, it records when every trial ended (seconds since the run
started) and the best validation accuracy so far; it prints the share of trials stopped early,
each run's best, and how long the rung run took to reach the median run's best (against the
median run's whole time, and against when it first got there), and writes the curves to one
plotly HTML file. ``--seeds N`` repeats the pair with N seeds: one seed's best is a noisy maximum.
The issue-15 target: at least 60% of trials stopped early and the same best validation accuracy
in at most a third of the time.

A best validation accuracy is the luckiest of many draws, and a run that trains more trials to
the end draws more often. So each run's answer is also finalized as the service does it
(``studies.run_finalize``: the top ``--final-top`` complete trials re-trained with
``--final-seeds`` fresh seeds, chosen on mean validation accuracy, test reported): the median
run's at its end, and the rung run's twice, with the trials it had completed at a third of the
median run's time and at its own end (``--final-top 0`` skips this).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402

import studies  # noqa: E402


def _spec(args: argparse.Namespace, pruner: str, n_trials: int, label: str) -> studies.StudySpec:
    space: dict[str, Any] = {
        "n_neurons": {"type": "int", "low": 4, "high": 16},
        "n_dendrites": {"type": "int", "low": 2, "high": 10},
        "n_dendrite_inputs": {"type": "int", "low": 4, "high": 32, "log": True},
        "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
    }
    return studies.StudySpec(
        name=f"search-{label}", model="dendritic_simple", dataset=args.dataset, max_params=args.max_params,
        n_trials=n_trials, n_epochs=args.epochs, batch_size=args.batch_size, sampler="tpe",
        pruner=pruner, subset_size=args.subset_size, search_space=space, seed=args.seed, keep_models=0)


def _run(args: argparse.Namespace, pruner: str, url: str, n_trials: int,
         rungs: tuple[int, int] | None = None) -> dict[str, Any]:
    """One study; ``rungs`` = (first rung's epoch r, eta) for the rung pruner (the spec's own
    pruner is r=1, eta=3)."""
    label = pruner if rungs is None else f"{pruner} r{rungs[0]} eta{rungs[1]}"
    spec = _spec(args, pruner, n_trials, label.replace(" ", "-"))
    studies.create_study(spec, url)
    study, spec = studies.load_study(spec.name or "", url, sampler_seed=args.seed)
    if rungs is not None and rungs != (1, 3):
        study.pruner = studies.RungPruner(min_resource=rungs[0], reduction_factor=rungs[1],
                                          max_resource=spec.n_epochs, hyperband=pruner == "hyperband",
                                          direction=spec.directions[0])
    t0 = time.perf_counter()
    ends: list[tuple[float, Any]] = []
    outs = studies.execute_population(study, spec, population_size=args.population, device=args.device,
                                       data_dir=args.data_dir)
    wall = time.perf_counter() - t0
    trials = [t for t in study.get_trials(deepcopy=False) if not studies.is_infeasible(t)]
    start = min(t.datetime_start for t in trials)
    best, curve = 0.0, []
    for t in sorted(trials, key=lambda t: t.datetime_complete):
        val = t.user_attrs.get("val_accuracy")
        if t.state.name == "COMPLETE" and val is not None:
            best = max(best, float(val))
        ends.append(((t.datetime_complete - start).total_seconds(), best))
        curve.append(ends[-1])
    states = [o.state for o in outs]
    epochs = sum(len(t.intermediate_values) for t in trials)
    return {"pruner": label, "wall": wall, "curve": curve, "best": best, "trials": len(trials),
            "pruned": states.count("pruned"), "member_epochs": epochs, "study": study, "spec": spec,
            "start": start}


def _finalize(args: argparse.Namespace, url: str, run: dict[str, Any], cutoff: float | None,
              label: str) -> dict[str, Any]:
    """The service's final answer for the trials ``run`` had completed ``cutoff`` seconds after
    it started (all of them for None): they are copied into a study of their own, which
    ``studies.run_finalize`` finalizes as a worker would."""
    study, spec = run["study"], run["spec"]
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if not studies.is_infeasible(t)
            and (cutoff is None or (t.datetime_complete - run["start"]).total_seconds() <= cutoff)]
    best = max((float(t.user_attrs.get("val_accuracy", 0.0)) for t in done), default=0.0)
    out: dict[str, Any] = {"cutoff": cutoff, "best": best, "complete": len(done), "val": None, "test": None,
                           "test_std": None, "n_params": None, "params": None, "seconds": 0.0}
    if not done:
        return out  # nothing had trained to the end yet: no answer to give
    copy = optuna.create_study(study_name=f"final-{label}", storage=url,
                               directions=[str(d) for d in spec.directions])
    copy.add_trials(done)
    request = {"state": "running", "top_n": args.final_top, "seeds": args.final_seeds,
               "n_epochs": args.epochs}
    final = studies.run_finalize(copy, spec, device=args.device, data_dir=args.data_dir, request=request)
    return {**out, "val": final.get("val_accuracy_mean"), "test": final.get("test_accuracy_mean"),
            "test_std": final.get("test_accuracy_std"), "n_params": final.get("n_params"),
            "params": final.get("params"), "seconds": final.get("seconds")}


def _print_final(who: str, f: dict[str, Any]) -> None:
    at = "its end" if f["cutoff"] is None else f"{f['cutoff']:.1f} s"
    if f["val"] is None:
        print(f"  finalized, {who} at {at}: no trial had completed, no answer")
        return
    print(f"  finalized, {who} at {at}: {f['complete']} complete trials, best val {f['best']:.4f}; "
          f"the answer: val {f['val']:.4f}, test {f['test']:.4f} +- {f['test_std'] or 0:.4f}, "
          f"{f['n_params']} params, {f['seconds']:.1f} s to finalize; {f['params']}")


def _rank(xs: list[float]) -> list[float]:
    """Average ranks: tied values share the mean of their ranks (validation accuracies often tie)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation, with average ranks for ties."""
    ra, rb = _rank(a), _rank(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def _early_ranks(args: argparse.Namespace, median: dict[str, Any], eta: int = 3, top: int = 10) -> None:
    """How well an early epoch ranks the median run's complete trials by their final
    validation accuracy: the rank correlation, and how many of the final ``top`` a 1/eta cut at
    that epoch would have kept (the rung pruner's bet)."""
    done = [t for t in median["study"].get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if not studies.is_infeasible(t) and t.user_attrs.get("val_accuracy") is not None]
    if len(done) < 2 * top:
        return
    final = [float(t.user_attrs["val_accuracy"]) for t in done]
    best = set(sorted(range(len(done)), key=lambda i: -final[i])[:top])
    parts, e = [], 1
    while e < args.epochs:
        early = [float(t.intermediate_values.get(e, float("nan"))) for t in done]
        kept = set(sorted(range(len(done)), key=lambda i: -early[i])[: len(done) // eta])
        size = sum(int(done[i].user_attrs.get("n_params", 0)) for i in kept) / max(1, len(kept))
        parts.append(f"epoch {e}: rank corr {spearman(early, final):.2f}, keeps {len(best & kept)} of the final "
                     f"top {top}, mean params of those it keeps {size:.0f}")
        e *= eta
    size_all = sum(int(t.user_attrs.get("n_params", 0)) for t in done) / len(done)
    size_best = sum(int(done[i].user_attrs.get("n_params", 0)) for i in best) / top
    print(f"  median run's {len(done)} complete trials (mean params {size_all:.0f}; final top {top}: "
          f"{size_best:.0f}), a 1/{eta} cut at " + "; ".join(parts))


def _write_curves(path: str, run: dict[str, Any]) -> None:
    """Append one JSON line per complete trial of ``run``: its parameters, size, validation
    accuracy after every epoch and at the end (``bench/rung_rules.py`` reads them)."""
    with open(path, "a") as f:
        for t in run["study"].get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if studies.is_infeasible(t) or t.user_attrs.get("val_accuracy") is None:
                continue
            curve = [t.intermediate_values.get(e) for e in range(1, max(t.intermediate_values, default=0) + 1)]
            f.write(json.dumps({"seed": run["seed"], "number": t.number, "params": t.params,
                                "n_params": t.user_attrs.get("n_params"), "curve": curve,
                                "final": t.user_attrs["val_accuracy"]}) + "\n")


def _report(args: argparse.Namespace, median: dict[str, Any], rungs: dict[str, Any]) -> dict[str, Any]:
    """One seed's rows, and how long the rung run took to reach the median run's best: against
    the median run's whole time (the time it took to give its answer) and against the time it
    first reached that best."""
    for r in (median, rungs):
        print(f"{r['pruner']:28s} {r['seed']:4d} {r['trials']:6d} {r['wall']:8.1f} {r['best']:9.4f} "
              f"{r['pruned'] / max(1, r['trials']):13.0%} {r['member_epochs']:14d}")
    target = median["best"]
    reached = next((s for s, b in rungs["curve"] if b >= target), None)
    median_at = next((s for s, b in median["curve"] if b >= target), None)
    out = {"seed": median["seed"], "stopped": rungs["pruned"] / max(1, rungs["trials"]),
           "best_gap": rungs["best"] - target, "time_ratio": None}
    if reached is None:
        print(f"  the rung run never reached the median run's best ({target:.4f}); its best: {rungs['best']:.4f}")
    else:
        out["time_ratio"] = reached / max(median["wall"], 1e-9)
        print(f"  the rung run reached the median run's best ({target:.4f}) after {reached:.1f} s: "
              f"{out['time_ratio']:.2f}x the median run's {median['wall']:.1f} s "
              f"({reached / max(median_at or 1e-9, 1e-9):.2f}x the {median_at:.1f} s it took to reach it)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--trials", type=int, default=120)
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--rung-trials", type=int, help="trials of the rung run (default: --trials); it "
                    "stops most of them early, so at equal time it can try more")
    ap.add_argument("--population", type=int, default=27)
    ap.add_argument("--rung-pruner", default="successive_halving", choices=["successive_halving", "hyperband"],
                    help="the rung run's pruner")
    ap.add_argument("--rungs", default="1:3", help="comma-separated r:eta of the rung runs (first rung's "
                    "epoch and reduction factor), each against the same median run; the spec's own is 1:3")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-params", type=int, default=3000)
    ap.add_argument("--subset-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="repeat both runs with seeds seed .. seed+N-1")
    ap.add_argument("--final-top", type=int, default=3, help="finalize each run's top N trials (0: no finalizing)")
    ap.add_argument("--final-seeds", type=int, default=3, help="seeds per finalized trial")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir", help="folder with the dataset's files (default: the system's)")
    ap.add_argument("--curves", help="append the median run's complete trials' learning curves to this "
                    "JSON-lines file (for bench/rung_rules.py)")
    ap.add_argument("--out", default="bench_search.html", help="the plot (self-contained HTML, about 4 MB)")
    args = ap.parse_args()
    print(f"{args.dataset}, {args.epochs} epochs, population {args.population}, device {args.device}, "
          f"median {args.trials} trials, {args.rung_pruner} {args.rung_trials or args.trials} trials")
    print(f"{'pruner':28s} {'seed':>4s} {'trials':>6s} {'wall s':>8s} {'best val':>9s} {'stopped early':>14s} "
          f"{'member-epochs':>14s}", flush=True)
    variants = [tuple(int(x) for x in v.split(":")) for v in args.rungs.split(",") if v]
    runs: list[dict[str, Any]] = []
    summary: dict[str, list[dict[str, Any]]] = {}
    for seed in range(args.seed, args.seed + args.seeds):
        args_s = argparse.Namespace(**{**vars(args), "seed": seed})
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/search.db"
            median = _run(args_s, "median", url, args.trials)
            median["seed"] = seed
            runs.append(median)
            _early_ranks(args, median)
            if args.curves:
                _write_curves(args.curves, median)
            for r_eta in variants:
                rungs = _run(args_s, args.rung_pruner, url, args.rung_trials or args.trials, r_eta)  # type: ignore[arg-type]
                rungs["seed"] = seed
                runs.append(rungs)
                row = _report(args, median, rungs)
                if args.final_top > 0:
                    if "final" not in median:
                        median["final"] = _finalize(args, url, median, None, "median")
                    _print_final("median run", median["final"])
                    tag = rungs["pruner"].replace(" ", "-")
                    row["final_third"] = _finalize(args, url, rungs, median["wall"] / 3, f"{tag}-third")
                    row["final_end"] = _finalize(args, url, rungs, None, f"{tag}-end")
                    row["final_median"] = median["final"]
                    _print_final("rung run", row["final_third"])
                    _print_final("rung run", row["final_end"])
                summary.setdefault(rungs["pruner"], []).append(row)
    for label, rows in summary.items():
        if args.final_top > 0:
            def mean(key: str, field: str, rows: list[dict[str, Any]] = rows) -> str:
                got = [r[key][field] for r in rows if r[key][field] is not None]
                missing = f" ({len(rows) - len(got)} without an answer)" if len(got) < len(rows) else ""
                return (f"{sum(got) / len(got):.4f}" if got else "none") + missing

            print(f"{label}, finalized answers over {len(rows)} seeds (mean val / mean test): median run "
                  f"{mean('final_median', 'val')} / {mean('final_median', 'test')}; rung run at a third of "
                  f"the median run's time {mean('final_third', 'val')} / {mean('final_third', 'test')}; "
                  f"rung run at its end {mean('final_end', 'val')} / {mean('final_end', 'test')}")
        if len(rows) < 2:
            continue
        reached = [r["time_ratio"] for r in rows if r["time_ratio"] is not None]
        print(f"{label} over {len(rows)} seeds: stopped early {sum(r['stopped'] for r in rows) / len(rows):.0%}; "
              f"best val rung - median {sum(r['best_gap'] for r in rows) / len(rows):+.4f} on average; "
              f"reached the median run's best in {len(reached)} of {len(rows)} seeds"
              + (f", at {sorted(reached)[len(reached) // 2]:.2f}x its time (median of those)" if reached else ""))
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in runs:
        xs, ys = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"TPE + {r['pruner']}, seed {r['seed']}",
                                 line={"shape": "hv"}))
    fig.update_layout(title=f"Best validation accuracy against seconds ({args.dataset}, {args.device})",
                      xaxis_title="seconds since the run started", yaxis_title="best val accuracy")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(args.out, include_plotlyjs=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
