"""The seed's search scenarios as presets: a registry of functions, also run by ``dendro search --preset``."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

import core

from ._results import _atomic_write, export_study, trained_trials
from ._searcher import HyperparameterSearcher, SearchResult
from ._spec import ARCH_KEY, TRAIN_KEYS, StudySpec, count_point
from .exceptions import SpecError

__all__ = [
    "Preset",
    "PresetResult",
    "PRESETS",
    "register_preset",
    "get_preset",
    "list_presets",
    "run_preset",
    "budget_space",
    "quick_prototype_search",
    "optimize_for_budget",
    "compare_architectures",
    "thorough_optimization",
    "SEED_ARCHITECTURES",
]

SEED_ARCHITECTURES = ("dendritic_simple", "soma_disabled", "dendritic_with_hidden")


@dataclass
class PresetResult:
    """What a preset found. ``best`` is selected on validation; test accuracy is only reported.

    ``table`` is the side-by-side comparison (``compare_architectures``); ``seeds`` the
    re-training of the best configuration with several seeds (``thorough_optimization``).
    """

    preset: str
    dataset: str
    max_params: int | None
    best: SearchResult | None
    results: list[SearchResult] = field(default_factory=list)
    studies: list[str] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    seeds: dict[str, Any] | None = None
    exports: list[Path] = field(default_factory=list)

    @property
    def test_accuracy(self) -> float:
        return self.best.test_accuracy if self.best is not None else float("nan")

    @property
    def val_accuracy(self) -> float:
        return self.best.val_accuracy if self.best is not None else float("nan")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.best.params) if self.best is not None else {}

    @property
    def total_params(self) -> int:
        return self.best.total_params if self.best is not None else 0

    def to_dict(self, top: int = 5) -> dict[str, Any]:
        """A JSON-ready summary: the best, the ``top`` results, the table and the seeds."""
        return {
            "preset": self.preset,
            "dataset": self.dataset,
            "max_params": self.max_params,
            "best": self.best.to_dict() if self.best is not None else None,
            "top": [r.to_dict() for r in self.results[:top]],
            "table": self.table,
            "seeds": self.seeds,
            "studies": self.studies,
            "exports": [str(p) for p in self.exports],
        }


PresetFunction = Callable[..., PresetResult]


@dataclass(frozen=True)
class Preset:
    """A registered scenario: ``name`` is the CLI's kebab-case name, ``function`` runs it."""

    name: str
    function: PresetFunction
    aliases: tuple[str, ...] = ()
    description: str = ""


PRESETS: dict[str, Preset] = {}
_LOOKUP: dict[str, str] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_preset(name: str, *, aliases: Sequence[str] = ()) -> Callable[[PresetFunction], PresetFunction]:
    """Register a preset under its CLI name; its function name (either spelling) is an alias."""

    def deco(fn: PresetFunction) -> PresetFunction:
        keys = {_key(n) for n in (name, fn.__name__, *aliases)}
        taken = sorted(k for k in keys if k in _LOOKUP)
        if taken:
            raise core.DuplicateNameError(f"preset name(s) {taken} are already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        PRESETS[name] = Preset(name, fn, tuple(sorted(keys - {name})), doc[0] if doc else "")
        for k in keys:
            _LOOKUP[k] = name
        return fn

    return deco


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (``optimize-budget`` or ``optimize_for_budget`` alike)."""
    try:
        return PRESETS[_LOOKUP[_key(name)]]
    except KeyError:
        raise SpecError("preset", f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def run_preset(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run a preset by name (the CLI's entry point) and return its JSON-ready summary."""
    return get_preset(name).function(**kwargs).to_dict()


# -- spaces -----------------------------------------------------------------------------------
def _counter(family: str, dataset: str) -> Callable[[dict[str, Any]], int]:
    spec = StudySpec(model=family, dataset=dataset)
    return lambda point: count_point(spec, point)


def _fit_high(count: Callable[[dict[str, Any]], int], lows: dict[str, Any], name: str, low: int,
              high: int, budget: int) -> int:
    """The largest value of ``name`` in [low, high] whose model, all else at its low, fits."""
    best = low
    lo, hi = low, high
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            ok = count({**lows, name: mid}) <= budget
        except ValueError:
            ok = False
        if ok:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def budget_space(
    max_params: int, dataset: str, architectures: Sequence[str] | None = None,
    *, search_resampling: bool = True,
) -> dict[str, Any]:
    """The seed's space (neurons 5-20, dendrites 3-15, inputs 16-256 log, lr log), fitted to
    the budget and the dataset.

    Each size's upper end is lowered to what fits under ``max_params`` with everything else
    at its low end, and the inputs per dendrite never exceed the input size. Without
    ``architectures`` they follow the seed's advice: the simple family for budgets up to
    2,000, soma-disabled too up to 5,000, and all three from 5,000.
    """
    if architectures is None:
        architectures = (
            SEED_ARCHITECTURES[:1] if max_params <= 2000
            else SEED_ARCHITECTURES[:2] if max_params < 5000 else SEED_ARCHITECTURES
        )
    in_dim = core.dataset_info(dataset).in_dim
    ranges = {"n_neurons": (5, 20), "n_dendrites": (3, 15),
              "n_dendrite_inputs": (min(16, in_dim), min(256, in_dim))}
    takes_hidden = any("hidden_dim" in core.get_family(a).accepts for a in architectures)
    if takes_hidden:
        ranges["hidden_dim"] = (4, 32)
    lows = {k: lo for k, (lo, _) in ranges.items()}
    highs: dict[str, int] = {}
    for name, (lo, hi) in ranges.items():
        fits = [
            _fit_high(_counter(a, dataset), {k: v for k, v in lows.items()
                                             if k in core.get_family(a).accepts},
                      name, lo, hi, max_params)
            for a in architectures if name in core.get_family(a).accepts
        ]
        highs[name] = max(fits) if fits else hi
    space: dict[str, Any] = {"architecture": list(architectures)}
    for name, (lo, _) in ranges.items():
        d: dict[str, Any] = {"type": "int", "low": lo, "high": max(lo, highs[name])}
        if name == "n_dendrite_inputs" and d["high"] > lo:
            d["log"] = True
        space[name] = d
    space["lr"] = {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}
    if search_resampling:
        space["synaptic_resampling"] = [True, False]
    return space


def _narrow(space: Mapping[str, Any], best: Mapping[str, Any], width: float = 0.25) -> dict[str, Any]:
    """A space around ``best``: ranges shrink to +-``width`` of the value (lr: x/÷ 2) inside
    the broad ones; choices are fixed to the best's."""
    out: dict[str, Any] = {}
    for name, d in space.items():
        v = best.get(name)
        if v is None:
            continue
        if isinstance(d, dict) and d.get("type") == "int":
            lo = max(d["low"], math.floor(v * (1 - width)))
            hi = min(d["high"], math.ceil(v * (1 + width)))
            out[name] = {**d, "low": lo, "high": max(lo, hi)}
            if out[name]["low"] == out[name]["high"]:
                out[name].pop("log", None)
        elif isinstance(d, dict) and d.get("type") == "float":
            out[name] = {**d, "low": max(d["low"], v / 2), "high": min(d["high"], v * 2)}
        else:
            out[name] = [v]
    return _drop_unused(out)


def _drop_unused(space: dict[str, Any]) -> dict[str, Any]:
    """Without the parameters a fixed architecture does not take (a spec refuses them)."""
    arch = space.get(ARCH_KEY)
    if not (isinstance(arch, list) and len(arch) == 1):
        return space
    takes = core.get_family(str(arch[0])).accepts | TRAIN_KEYS | {ARCH_KEY}
    return {k: v for k, v in space.items() if k in takes}


# -- running ------------------------------------------------------------------------------------
def _searcher(prefix: str, max_params: int, dataset: str, n_epochs: int, subset_size: int | None,
              storage: str | optuna.storages.BaseStorage | None, device: str | None,
              data_dir: str | None, show_progress: bool, batch_size: int = 256) -> HyperparameterSearcher:
    n_classes = core.dataset_info(dataset).n_classes or 10
    return HyperparameterSearcher(
        dataset=dataset, subset_size=subset_size, max_params=max_params, n_epochs=n_epochs,
        batch_size=batch_size, n_classes=n_classes, verbose=show_progress, storage=storage,
        device=device, data_dir=data_dir, name_prefix=prefix,
    )


def _finish(result: PresetResult, searchers: Sequence[HyperparameterSearcher],
            out_dir: str | Path | None) -> PresetResult:
    result.studies = [n for s in searchers for n in s.studies]
    if out_dir is not None:
        for s in searchers:
            for study in s.studies.values():
                result.exports += export_study(study, out_dir)
        path = Path(out_dir) / f"{result.preset}-summary.json"
        _atomic_write(path, json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        result.exports.append(path)
    return result


@register_preset("quick-prototype")
def quick_prototype_search(
    max_params: int = 8000, dataset: str = "fashion-mnist", n_trials: int | None = None,
    storage: str | optuna.storages.BaseStorage | None = None, out_dir: str | Path | None = None,
    n_epochs: int | None = None, subset_size: int | None = None, device: str | None = None,
    data_dir: str | None = None, show_progress: bool = True,
) -> PresetResult:
    """A fast first look: the simple family, focused ranges, 8 epochs, batches of 512, 12 TPE trials."""
    s = _searcher("quick-prototype", max_params, dataset, n_epochs or 8, subset_size, storage,
                  device, data_dir, show_progress, batch_size=512)
    space = budget_space(max_params, dataset, ["dendritic_simple"], search_resampling=False)
    in_dim = core.dataset_info(dataset).in_dim
    space["n_neurons"]["low"] = min(6, space["n_neurons"]["high"])
    space["n_neurons"]["high"] = min(16, space["n_neurons"]["high"])
    space["n_dendrites"]["high"] = min(10, space["n_dendrites"]["high"])
    space["n_dendrite_inputs"]["low"] = min(32, in_dim, space["n_dendrite_inputs"]["high"])
    space["n_dendrite_inputs"]["high"] = min(128, space["n_dendrite_inputs"]["high"])
    space["lr"] = {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}
    results = s.optimize(space, n_trials or 12)
    res = PresetResult("quick-prototype", dataset, max_params, results[0] if results else None, results)
    return _finish(res, [s], out_dir)


@register_preset("optimize-budget")
def optimize_for_budget(
    max_params: int = 8000, dataset: str = "fashion-mnist", n_trials: int | None = None,
    storage: str | optuna.storages.BaseStorage | None = None, out_dir: str | Path | None = None,
    n_epochs: int | None = None, subset_size: int | None = None, device: str | None = None,
    data_dir: str | None = None, show_progress: bool = True,
) -> PresetResult:
    """The best model under the budget: ranges and families fitted to it, 40 TPE trials of 15 epochs."""
    s = _searcher("optimize-budget", max_params, dataset, n_epochs or 15, subset_size, storage,
                  device, data_dir, show_progress)
    results = s.optimize(budget_space(max_params, dataset), n_trials or 40)
    res = PresetResult("optimize-budget", dataset, max_params, results[0] if results else None, results)
    return _finish(res, [s], out_dir)


@register_preset("compare-architectures")
def compare_architectures(
    max_params: int = 8000, dataset: str = "fashion-mnist", n_trials: int | None = None,
    storage: str | optuna.storages.BaseStorage | None = None, out_dir: str | Path | None = None,
    n_epochs: int | None = None, subset_size: int | None = None, device: str | None = None,
    data_dir: str | None = None, show_progress: bool = True,
    architectures: Sequence[str] = SEED_ARCHITECTURES,
) -> PresetResult:
    """Each seed architecture searched with the same budget, trials (15) and epochs; a table."""
    searchers: list[HyperparameterSearcher] = []
    table: list[dict[str, Any]] = []
    everything: list[SearchResult] = []
    for arch in architectures:
        s = _searcher(f"compare-{arch.replace('_', '-')}", max_params, dataset, n_epochs or 15,
                      subset_size, storage, device, data_dir, show_progress)
        searchers.append(s)
        results = s.optimize(budget_space(max_params, dataset, [arch]), n_trials or 15)
        everything += results
        study = next(iter(s.studies.values()))
        infeasible = sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("infeasible"))
        row: dict[str, Any] = {"architecture": arch, "trials": len(trained_trials(study)),
                               "infeasible": infeasible}
        if results:
            b = results[0]
            row.update(val_accuracy=b.val_accuracy, test_accuracy=b.test_accuracy,
                       train_accuracy=b.train_accuracy, total_params=b.total_params,
                       train_time=b.train_time, params=b.params)
        table.append(row)
    everything.sort(key=lambda r: (-r.val_accuracy, r.total_params))
    if show_progress:
        _print_table(table)
    res = PresetResult("compare-architectures", dataset, max_params,
                       everything[0] if everything else None, everything, table=table)
    return _finish(res, searchers, out_dir)


def _print_table(table: Sequence[Mapping[str, Any]]) -> None:
    print(f"{'architecture':<24} {'val acc':>8} {'test acc':>8} {'params':>7} {'trials':>6}  best configuration")
    for r in table:
        if "val_accuracy" in r:
            cfg = {k: v for k, v in r["params"].items() if k != "architecture"}
            print(f"{r['architecture']:<24} {r['val_accuracy']:>8.4f} {r['test_accuracy']:>8.4f} "
                  f"{r['total_params']:>7d} {r['trials']:>6}  {cfg}")
        else:
            print(f"{r['architecture']:<24} {'-':>8} {'-':>8} {'-':>7} {r['trials']:>6}  no completed trial")


@register_preset("thorough")
def thorough_optimization(
    max_params: int = 8000, dataset: str = "fashion-mnist", n_trials: int | None = None,
    storage: str | optuna.storages.BaseStorage | None = None, out_dir: str | Path | None = None,
    n_epochs: int | None = None, subset_size: int | None = None, device: str | None = None,
    data_dir: str | None = None, show_progress: bool = True, n_seeds: int = 3,
) -> PresetResult:
    """Broad TPE search, a narrowed one around its best, then the best re-trained with several seeds.

    ``n_trials`` (default 60) is split two thirds broad, one third narrow; 20 epochs each.
    The seeds' mean and standard deviation of test accuracy are in ``result.seeds``.
    """
    if not 1 <= n_seeds <= 10:
        raise ValueError(f"n_seeds must be between 1 and 10, got {n_seeds}")
    total = n_trials or 60
    broad_n = max(1, math.ceil(total * 2 / 3))
    narrow_n = max(1, total - broad_n)
    epochs = n_epochs or 20
    args = (max_params, dataset, epochs, subset_size, storage, device, data_dir, show_progress)
    broad = _searcher("thorough-broad", *args)
    space = budget_space(max_params, dataset)
    found = broad.optimize(space, broad_n)
    searchers = [broad]
    if found:
        narrow = _searcher("thorough-narrow", *args)
        narrow.optimize(_narrow(space, found[0].params), narrow_n)
        searchers.append(narrow)
    everything = sorted([r for s in searchers for r in s.results],
                        key=lambda r: (-r.val_accuracy, r.total_params))
    best = everything[0] if everything else None
    seeds: dict[str, Any] | None = None
    if best is not None:
        rerun = _searcher("thorough-seeds", *args)
        fixed = _drop_unused({k: [v] for k, v in best.params.items()})
        spec = rerun.make_spec(fixed, "random", 1, seeds_per_trial=n_seeds)
        rerun.run("seeds", spec)
        searchers.append(rerun)
        seeds = _seed_summary(next(iter(rerun.studies.values())), best.params)
    res = PresetResult("thorough", dataset, max_params, best, everything, seeds=seeds)
    if show_progress and seeds is not None:
        print(f"best configuration re-trained with {n_seeds} seeds: test accuracy "
              f"{seeds['test_accuracy_mean']:.4f} ± {seeds['test_accuracy_std']:.4f}")
    return _finish(res, searchers, out_dir)


def _seed_summary(study: optuna.Study, params: Mapping[str, Any]) -> dict[str, Any] | None:
    done = trained_trials(study, complete_only=True)
    if not done:
        return None
    a = done[0].user_attrs
    per_seed = a.get("seed_results") or [
        {"seed": a.get("seed"), "val_accuracy": a.get("val_accuracy"),
         "test_accuracy": a.get("test_accuracy")}
    ]
    tests = [float(r["test_accuracy"]) for r in per_seed]
    vals = [float(r["val_accuracy"]) for r in per_seed]
    return {
        "params": dict(params),
        "n_params": a.get("n_params"),
        "per_seed": per_seed,
        "test_accuracy_mean": statistics.fmean(tests),
        "test_accuracy_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
        "val_accuracy_mean": statistics.fmean(vals),
    }
