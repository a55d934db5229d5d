"""Presets for the bio-inspired training rules and for dendrite growth, under the budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna

from ._presets import PresetResult, _atomic_write, register_preset
from ._results import export_study, trained_trials
from ._runner import run_study
from ._spec import StudySpec

__all__ = ["bio_rules_search", "growth_search", "BIO_SPACE", "GROWTH_SPACE"]

#: bio-rule options worth searching, in the names of core.BioConfig / core.BioStepHook
BIO_SPACE: dict[str, Any] = {
    "bio.fuzzy_learning_rate_factor_nu": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
    "bio.fuzzy_lr_distribution": ["baseline", "uniform", "normal", "lognormal", "gamma", "beta"],
    "bio.dampening_factor": {"type": "float", "low": 0.3, "high": 1.0},
    "bio.crystal_thresh": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
    "bio.rejuvenation_parameter_dre": {"type": "float", "low": 2.0, "high": 20.0},
    "bio.rejuvenate_every": [None, 200, 1000],
    "bio.apply_dales_principle": [False, True],
    "lr": {"type": "float", "low": 3e-4, "high": 1e-2, "log": True},
}

#: growth options worth searching, in the names of core.GrowthConfig
GROWTH_SPACE: dict[str, Any] = {
    "growth.mode": ["history", "fixed"],
    "growth.patience": {"type": "int", "low": 1, "high": 4},
    "growth.improvement_threshold": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "growth.fixed_start": {"type": "int", "low": 1, "high": 6},
    "growth.fixed_every": {"type": "int", "low": 1, "high": 5},
    "growth.max_sets": {"type": "int", "low": 1, "high": 3},
    "growth.max_retries": {"type": "int", "low": 0, "high": 2},
    "lr": {"type": "float", "low": 3e-4, "high": 1e-2, "log": True},
}


def _row(label: str, study: optuna.Study) -> dict[str, Any]:
    trained = [t for t in trained_trials(study) if t.state == optuna.trial.TrialState.COMPLETE]
    if not trained:
        return {"variant": label, "trials": 0}
    best = max(trained, key=lambda t: t.value if t.value is not None else float("-inf"))
    hist = best.user_attrs.get("history") or [{}]
    return {
        "variant": label,
        "trials": len(trained_trials(study)),
        "best_val_accuracy": round(float(best.value or 0.0), 4),
        "test_accuracy": best.user_attrs.get("test_accuracy"),
        "params_start": best.user_attrs.get("n_params"),
        "params_final": best.user_attrs.get("n_params_final"),
        "dendrite_sets": hist[-1].get("n_dendrite_sets"),
        "best_params": best.params,
    }


def _print_table(table: list[dict[str, Any]]) -> None:
    print(f"{'variant':<28} {'trials':>6} {'val acc':>8} {'test acc':>8} {'params':>15} {'sets':>4}")
    for r in table:
        if not r.get("best_val_accuracy"):
            print(f"{r['variant']:<28} {r['trials']:>6}  no completed trial")
            continue
        test = r["test_accuracy"] if r["test_accuracy"] is not None else float("nan")
        params = f"{r['params_start']}->{r['params_final']}"
        print(f"{r['variant']:<28} {r['trials']:>6} {r['best_val_accuracy']:>8.4f} {test:>8.4f} "
              f"{params:>15} {r['dendrite_sets'] if r['dendrite_sets'] is not None else '-':>4}")


def _write(result: PresetResult, studies_: list[optuna.Study], out_dir: str | Path | None) -> PresetResult:
    if out_dir is not None:
        for s in studies_:
            result.exports += export_study(s, out_dir)
        path = Path(out_dir) / f"{result.preset}-summary.json"
        _atomic_write(path, json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        result.exports.append(path)
    return result


@register_preset("bio-rules")
def bio_rules_search(
    max_params: int = 8000, dataset: str = "fashion-mnist", n_trials: int | None = None,
    storage: str | optuna.storages.BaseStorage | None = None, out_dir: str | Path | None = None,
    n_epochs: int | None = None, subset_size: int | None = None, device: str | None = None,
    data_dir: str | None = None, show_progress: bool = True, model: str = "dendritic_simple",
    model_params: dict[str, Any] | None = None, population: int | str | None = None,
) -> PresetResult:
    """Search the bio-inspired training rules on top of a fixed model, against the plain rules.

    ``population`` (an integer K or ``"auto"``) trains each study's trials K at a time
    (the rules are applied per member on the stacked buffers; see ``core.train_population``).
    """
    params = model_params if model_params is not None else (
        {"n_neurons": 10, "n_dendrites": 23, "n_dendrite_inputs": 32} if model == "dendritic_simple" else {})
    base = dict(model=model, dataset=dataset, max_params=max_params, n_trials=n_trials or 20,
                n_epochs=n_epochs or 10, batch_size=128, subset_size=subset_size, model_params=params,
                pruner="median")
    plain = StudySpec(name=f"bio-plain-{model}-{dataset}-{max_params}",
                      search_space={"lr": BIO_SPACE["lr"]}, **base)
    bio = StudySpec(name=f"bio-rules-{model}-{dataset}-{max_params}", bio={}, search_space=BIO_SPACE, **base)
    done = [run_study(s, storage, s.name, show_progress=show_progress, device=device, data_dir=data_dir,
                      population=population)
            for s in (plain, bio)]
    result = PresetResult("bio-rules", dataset, max_params, None, studies=[s.study_name for s in done])
    result.table = [_row("plain Adam (lr searched)", done[0]), _row("bio rules (searched)", done[1])]
    if show_progress:
        _print_table(result.table)
    return _write(result, done, out_dir)


@register_preset("dendrite-growth")
def growth_search(
    max_params: int = 50_000, dataset: str = "fashion-mnist", n_trials: int | None = None,
    storage: str | optuna.storages.BaseStorage | None = None, out_dir: str | Path | None = None,
    n_epochs: int | None = None, subset_size: int | None = None, device: str | None = None,
    data_dir: str | None = None, show_progress: bool = True, model: str = "small_cnn",
    model_params: dict[str, Any] | None = None,
) -> PresetResult:
    """Search growth settings (mode, patience, switch epochs, max sets) against no growth.

    Both studies start from the same model and share ``max_params``: growth is never
    allowed to take a model over it, so the grown model is compared with the plain one at
    the same budget.
    """
    params = model_params if model_params is not None else (
        {"width": 4, "hidden_dim": 24} if model == "small_cnn" else {})
    base = dict(model=model, dataset=dataset, max_params=max_params, n_trials=n_trials or 20,
                n_epochs=n_epochs or 12, batch_size=128, subset_size=subset_size, model_params=params,
                pruner="none")
    plain = StudySpec(name=f"growth-none-{model}-{dataset}-{max_params}",
                      search_space={"lr": GROWTH_SPACE["lr"]}, **base)
    grown = StudySpec(name=f"growth-{model}-{dataset}-{max_params}", growth={"layers": "*"},
                      search_space=GROWTH_SPACE, **base)
    done = [run_study(s, storage, s.name, show_progress=show_progress, device=device, data_dir=data_dir)
            for s in (plain, grown)]
    result = PresetResult("dendrite-growth", dataset, max_params, None, studies=[s.study_name for s in done])
    result.table = [_row("no growth (lr searched)", done[0]), _row("growth (searched)", done[1])]
    if show_progress:
        _print_table(result.table)
    return _write(result, done, out_dir)
