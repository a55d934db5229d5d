"""The seed's search API (HyperparameterSearcher, SearchResult, hyperparameter_tuning) on Optuna studies."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

import core

from ._results import _atomic_write, optuna_quiet, trained_trials
from ._runner import progress, run_study
from ._space import grid_of
from ._spec import ARCH_KEY, StudySpec, count_point
from ._storage import _redact, default_storage_url, open_storage
from .exceptions import SpecError

__all__ = ["SearchResult", "HyperparameterSearcher", "hyperparameter_tuning", "TUNING_METRICS"]

log = logging.getLogger(__name__)

#: what ``hyperparameter_tuning`` can select on, and which way is better
TUNING_METRICS: dict[str, Literal["minimize", "maximize"]] = {
    "val_accuracy": "maximize",
    "test_accuracy": "maximize",
    "train_accuracy": "maximize",
    "val_loss": "minimize",
    "test_loss": "minimize",
    "train_loss": "minimize",
}


@dataclass
class SearchResult:
    """One trained configuration, with the seed's fields plus the validation accuracy that ranks it."""

    params: dict[str, Any]
    test_accuracy: float
    train_accuracy: float
    total_params: int
    train_time: float
    final_test_loss: float
    val_accuracy: float

    @classmethod
    def from_trial(cls, trial: FrozenTrial) -> SearchResult:
        a = trial.user_attrs

        def num(key: str) -> float:
            v = a.get(key)
            return float(v) if v is not None else float("nan")

        return cls(
            params=dict(trial.params),
            test_accuracy=num("test_accuracy"),
            train_accuracy=num("train_accuracy"),
            total_params=int(a.get("n_params", 0)),
            train_time=num("wall_time"),
            final_test_loss=num("test_loss"),
            val_accuracy=num("val_accuracy"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rank_key(r: SearchResult) -> tuple[float, int]:
    # Validation selects; among equals the smaller model wins. NaN sorts last.
    acc = r.val_accuracy if math.isfinite(r.val_accuracy) else -math.inf
    return (-acc, r.total_params)


def _ranked(trials: list[FrozenTrial]) -> list[SearchResult]:
    return sorted((SearchResult.from_trial(t) for t in trials), key=_rank_key)


class HyperparameterSearcher:
    """Searches under a parameter budget, each one an Optuna study in a database.

    The seed's class, same arguments and methods, now resumable: every search builds a
    :class:`StudySpec` and runs it with :func:`run_study` in ``storage`` (default: the
    SQLite file ``dendro.db`` in the current directory). With ``study_name`` every
    search goes to that study, so calling the same search again (for instance with more
    trials) continues it. Without one, each search gets a name derived from its settings
    (``search-random-<digest>``): running the same search again resumes it as well, and a
    different search starts its own study.

    Choose the seed's architectures with ``architecture`` in the space (any registered
    family works). Results are ranked by validation accuracy; test accuracy is reported,
    never used to select. ``weight_decay`` keeps the seed's 0.01, applied with AdamW
    (``optimizer="adamw"``): as Adam's coupled L2 term the same 0.01 cost 1-2.5 points of
    test accuracy on digits and on a Fashion-MNIST subset, AdamW cost nothing.
    """

    def __init__(
        self,
        dataset: str = "fashion-mnist",
        subset_size: int | None = None,
        max_params: int | None = 8000,
        n_epochs: int = 15,
        lr: float = 0.0005,
        weight_decay: float = 0.01,
        batch_size: int = 256,
        n_classes: int = 10,
        verbose: bool = True,
        storage: str | optuna.storages.BaseStorage | None = None,
        study_name: str | None = None,
        device: str | None = None,
        data_dir: str | None = None,
        *,
        optimizer: str = "adamw",
        seed: int = 0,
        name_prefix: str = "search",
    ) -> None:
        info = core.dataset_info(dataset)  # an unknown dataset fails here, listing the known
        if info.n_classes is not None and n_classes != info.n_classes:
            raise ValueError(
                f"n_classes={n_classes} but dataset {dataset!r} has {info.n_classes} classes; "
                f"pass n_classes={info.n_classes} (the dataset decides it)"
            )
        self.dataset = dataset
        self.subset_size = subset_size
        self.max_params = max_params
        self.n_epochs = n_epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.n_classes = n_classes
        self.verbose = verbose
        self.storage = storage if storage is not None else default_storage_url(".")
        self.study_name = study_name
        self.device = device
        self.data_dir = data_dir
        self.optimizer = optimizer
        self.seed = seed
        self.name_prefix = name_prefix
        self._studies: dict[str, optuna.Study] = {}

    # -- building and running ------------------------------------------------------------
    def make_spec(
        self, space: Mapping[str, Any], sampler: str, n_trials: int, pruner: str = "none", **extra: Any
    ) -> StudySpec:
        """The spec one search runs (checked: unknown keys, empty ranges, impossible budgets)."""
        space = dict(space)
        arch = space.get(ARCH_KEY)
        model = str(arch[0]) if isinstance(arch, list | tuple) and arch else (
            str(arch) if isinstance(arch, str) else "dendritic_simple"
        )
        settings: dict[str, Any] = {
            "model": model, "dataset": self.dataset, "search_space": space,
            "max_params": self.max_params, "sampler": sampler, "pruner": pruner,
            "n_trials": n_trials, "n_epochs": self.n_epochs, "batch_size": self.batch_size,
            "lr": self.lr, "weight_decay": self.weight_decay, "optimizer": self.optimizer,
            "subset_size": self.subset_size, "seed": self.seed,
        }
        settings.update(extra)
        return StudySpec(**settings)

    def _name(self, kind: str, spec: StudySpec) -> str:
        if self.study_name is not None:
            return self.study_name
        body = json.dumps(spec.model_dump(mode="json", exclude={"name", "n_trials"}), sort_keys=True)
        return f"{self.name_prefix}-{kind}-{hashlib.sha1(body.encode()).hexdigest()[:10]}"

    def run(self, kind: str, spec: StudySpec) -> list[SearchResult]:
        """Run (or resume) ``spec`` as this searcher's study for ``kind``; its ranked results."""
        name = self._name(kind, spec)
        with optuna_quiet():
            study = run_study(spec, self.storage, name, show_progress=self.verbose,
                              device=self.device, data_dir=self.data_dir)
        self._studies[name] = study
        results = _ranked(trained_trials(study, complete_only=True))
        if self.verbose:
            c = progress(study)
            best = f"; best val accuracy {results[0].val_accuracy:.4f}" if results else ""
            print(f"{kind} search {name}: {c['complete']} trained, {c['pruned']} pruned, "
                  f"{c['infeasible']} over budget (never trained), {c['failed']} failed{best}")
        return results

    def grid_search(self, param_grid: Mapping[str, Any], max_trials: int | None = None) -> list[SearchResult]:
        """Train every grid point that fits the budget once (at most ``max_trials`` of them).

        Over-budget points are recorded as infeasible and never trained. Values are lists
        (a ``(low, high)`` int pair means every integer between).
        """
        if max_trials is not None and max_trials < 1:
            raise ValueError(f"max_trials must be >= 1 or None, got {max_trials}")
        spec = self.make_spec(param_grid, "grid", 1)
        grid = grid_of(spec.space)
        feasible = 0
        for combo in itertools.product(*grid.values()):
            try:
                n = count_point(spec, dict(zip(grid, combo, strict=True)))
            except ValueError:
                continue
            feasible += self.max_params is None or n <= self.max_params
        n_trials = max(1, min(feasible, max_trials) if max_trials is not None else feasible)
        return self.run("grid", spec.model_copy(update={"n_trials": n_trials}))

    def random_search(self, param_distributions: Mapping[str, Any], n_trials: int) -> list[SearchResult]:
        """``n_trials`` trained points drawn at random from the feasible part of the space.

        Seed formats: ``(low, high)`` a range, a list a set of choices, a dict
        ``{"type": "randint" | "int" | "float" | "loguniform", "low", "high"}`` (inclusive).
        """
        return self.run("random", self.make_spec(param_distributions, "random", n_trials))

    def optimize(
        self, param_space: Mapping[str, Any], n_trials: int, *, pruner: str = "median"
    ) -> list[SearchResult]:
        """TPE over ``param_space`` for ``n_trials`` trained trials; unpromising ones are pruned."""
        return self.run("tpe", self.make_spec(param_space, "tpe", n_trials, pruner=pruner))

    # -- results -------------------------------------------------------------------------
    @property
    def studies(self) -> dict[str, optuna.Study]:
        """The studies this searcher ran, by name."""
        return dict(self._studies)

    @property
    def results(self) -> list[SearchResult]:
        """Every completed trial of this searcher's studies, best validation accuracy first."""
        trials = [t for s in self._studies.values() for t in trained_trials(s, complete_only=True)]
        return _ranked(trials)

    def get_best_results(self, n: int = 10) -> list[SearchResult]:
        """The ``n`` best results by validation accuracy (fewer parameters break ties)."""
        return self.results[: max(0, n)]

    def print_results(self, n: int = 10) -> None:
        """A table of the ``n`` best results, for people."""
        best = self.get_best_results(n)
        if not best:
            print("no completed trials yet")
            return
        print(f"{'rank':>4} {'val acc':>8} {'test acc':>8} {'train acc':>9} {'params':>7} "
              f"{'time s':>7}  configuration")
        for i, r in enumerate(best, 1):
            print(f"{i:>4} {r.val_accuracy:>8.4f} {r.test_accuracy:>8.4f} {r.train_accuracy:>9.4f} "
                  f"{r.total_params:>7d} {r.train_time:>7.1f}  {r.params}")

    def search_config(self) -> dict[str, Any]:
        storage = self.storage if isinstance(self.storage, str) else type(self.storage).__name__
        return {
            "dataset": self.dataset, "subset_size": self.subset_size, "max_params": self.max_params,
            "n_epochs": self.n_epochs, "lr": self.lr, "weight_decay": self.weight_decay,
            "optimizer": self.optimizer, "batch_size": self.batch_size, "n_classes": self.n_classes,
            "seed": self.seed, "storage": _redact(storage) if "://" in storage else storage,
            "studies": list(self._studies),
        }

    def save_results(self, path: str | Path) -> Path:
        """Write ``{"search_config", "results"}`` as JSON (atomically); returns the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "search_config": self.search_config(),
            "progress": {name: progress(s) for name, s in self._studies.items()},
            "results": [r.to_dict() for r in self.results],
        }
        text = json.dumps(doc, indent=2, default=_json_default, allow_nan=False)
        _atomic_write(out, text + "\n")
        return out


def _json_default(o: Any) -> Any:
    return str(o)


# -- the seed-000 grid over a user's own factory ------------------------------------------------
def hyperparameter_tuning(
    model_factory: Callable[..., tuple[torch.nn.Module, torch.optim.Optimizer]],
    param_grid: Mapping[str, list[Any]],
    dataset: str | core.Dataset = "fashion-mnist",
    n_epochs: int = 10,
    metric: str = "test_accuracy",
    *,
    batch_size: int = 128,
    subset_size: int | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> dict[str, Any]:
    """Grid search over ``model_factory(**params) -> (model, optimizer)``; the best params.

    Every grid point is trained once with ``core.train_model`` and recorded as a trial of
    an Optuna study (GridSampler) in ``storage`` (default: ``dendro.db`` here), so an
    interrupted grid resumes where it stopped. ``metric`` picks the winner, as in the seed;
    its default ``test_accuracy`` selects on the test set, which then no longer measures
    generalisation: pass ``metric="val_accuracy"`` to select on validation (recommended).
    """
    if metric not in TUNING_METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(TUNING_METRICS)}")
    if not param_grid:
        raise SpecError("param_grid", "is empty; give at least one parameter and its values")
    grid: dict[str, list[Any]] = {}
    for k, v in param_grid.items():
        values = list(v) if isinstance(v, list | tuple) else [v]
        if not values:
            raise SpecError(f"param_grid.{k}", "has no values; give a non-empty list")
        grid[str(k)] = values
    if isinstance(dataset, core.Dataset):
        data, data_name = dataset, dataset.name
    else:
        data = core.load_dataset(dataset, data_dir=data_dir, subset_size=subset_size, seed=seed)
        data_name = dataset
    config = {
        "kind": "hyperparameter_tuning", "factory": getattr(model_factory, "__qualname__", "?"),
        "param_grid": grid, "dataset": data_name, "subset_size": subset_size,
        "n_epochs": n_epochs, "batch_size": batch_size, "metric": metric, "seed": seed,
    }
    if study_name is None:
        digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
        study_name = f"tuning-{digest}"
    st = storage if storage is not None else default_storage_url(".")
    with optuna_quiet():
        study = optuna.create_study(
            storage=open_storage(st) if isinstance(st, str) else st,
            study_name=study_name,
            direction=TUNING_METRICS[metric],
            sampler=optuna.samplers.GridSampler(grid, seed=seed),
            load_if_exists=True,
        )
    study.set_user_attr("dendro.search_config", config)
    study.set_user_attr("dendro.objectives", [metric])
    dev = core.resolve_device(device)

    def objective(trial: optuna.Trial) -> float:
        params = {k: trial.suggest_categorical(k, v) for k, v in grid.items()}
        model, opt = model_factory(**params)
        res = core.train_model(model, data, n_epochs=n_epochs, batch_size=batch_size,
                               device=dev, seed=seed, optimizer=opt)
        for key in ("val_accuracy", "test_accuracy", "train_accuracy", "val_loss", "test_loss",
                    "train_loss", "wall_time", "epochs_run"):
            trial.set_user_attr(key, getattr(res, key))
        trial.set_user_attr("n_params", res.n_params)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("device", str(dev))
        trial.set_user_attr("history", json.loads(json.dumps(res.history, default=float)))
        if res.status == "diverged":
            raise core.TrainingDivergedError(res.error or "non-finite loss")
        value = getattr(res, metric)
        if value is None:
            raise ValueError(f"metric {metric!r} is not defined for dataset {data_name!r}")
        return float(value)

    total = math.prod(len(v) for v in grid.values())
    done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    if done < total:
        with optuna_quiet():
            study.optimize(objective, n_trials=total - done, catch=(core.TrainingDivergedError,),
                           show_progress_bar=verbose)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"no grid point trained successfully in study {study_name!r}")
    best = study.best_trial
    if verbose:
        print(f"best {metric} {best.value:.4f} with {best.params}")
    return dict(best.params)
