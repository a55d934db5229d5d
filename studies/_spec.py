"""The study spec: one pydantic model that the CLI, the Python API and the REST API share."""

from __future__ import annotations

import itertools
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import core

from ._space import ParamDef, parse_space
from .exceptions import BudgetError, SpecError

__all__ = [
    "StudySpec",
    "OBJECTIVES",
    "SAMPLERS",
    "PRUNERS",
    "TRAIN_KEYS",
    "ARCH_KEY",
    "NAME_PATTERN",
    "split_params",
    "count_point",
    "smallest_point",
    "build_extras",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)

#: objective name -> (direction, trial attribute it reads)
OBJECTIVES: dict[str, str] = {
    "val_accuracy": "maximize",
    "val_loss": "minimize",
    "val_mse": "minimize",
    "n_params": "minimize",
}
SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc", "nsga2", "gp")
PRUNERS = ("median", "hyperband", "successive_halving", "none")
#: searchable settings that configure training rather than the model
TRAIN_KEYS = frozenset({"lr", "weight_decay", "optimizer", "batch_size", "lr_schedule", "warmup_epochs",
                        "label_smoothing", "augment"})
#: the training recipe: spec fields that a search space may also search (core.train_model's arguments)
RECIPE_CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adam", "adamw", "sgd"),
    "lr_schedule": ("constant", "cosine", "onecycle"),
    "augment": ("none", "shift"),
}
#: the seed's way of searching over model families
ARCH_KEY = "architecture"
_MAX_ENUMERATION = 20_000


class StudySpec(BaseModel):
    """Everything a study needs, checked before anything runs.

    ``search_space`` accepts the seed formats: a list is a set of choices, a
    ``(low, high)`` tuple a range, a dict ``{"type", "low", "high", "step", "log"}`` a
    typed range (``type`` one of int/randint/float/uniform/loguniform/categorical/grid).
    Searching ``architecture`` chooses the model family per trial. ``model_params`` are
    fixed family arguments. ``max_params`` is the budget no trained model may exceed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, description="Study name: letters, digits, '.', '_', '-'; at most 64.")
    model: str = Field(default="dendritic_simple", description="Model family (see core.list_models()).")
    dataset: str = Field(default="fashion-mnist", description="Dataset (see core.list_datasets()), "
                         "or a file: 'npz:/path/data.npz' or 'folder:/path/to/images'.")
    search_space: dict[str, Any] = Field(default_factory=dict)
    model_params: dict[str, Any] = Field(default_factory=dict)
    max_params: int | None = Field(default=None, ge=1, description="Parameter budget; None = no budget.")
    objective: str | list[str] | None = Field(
        default=None,
        description="'val_accuracy' (default for classification), 'val_loss'/'val_mse' (default "
        "for regression), or a list such as ['val_accuracy', 'n_params'] for a Pareto front.",
    )
    sampler: Literal["tpe", "random", "grid", "cmaes", "qmc", "nsga2", "gp"] = "tpe"
    pruner: Literal["median", "hyperband", "successive_halving", "none"] = "median"
    n_trials: int = Field(default=20, ge=1)
    n_epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr_schedule: Literal["constant", "cosine", "onecycle"] = Field(
        default="constant", description="Learning-rate schedule; 'cosine' and 'onecycle' warm up "
        "over warmup_epochs (onecycle: 30% of training when unset).")
    warmup_epochs: float | None = Field(default=None, ge=0, description="Epochs of linear warm-up "
                                        "(fractions allowed).")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="Label smoothing of the "
                                   "training loss (validation and test losses stay plain).")
    augment: Literal["none", "shift"] = Field(default="none", description="'shift': random shifts "
                                              "of images by up to 2 pixels while training.")
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        default="fp32",
        description="Arithmetic of population training (core.train_population): 'fp32' is exact "
        "(the default); 'tf32' and 'bf16' trade a little accuracy for speed on CUDA.",
    )
    seeds_per_trial: int = Field(default=1, ge=1, le=10)
    seed: int = Field(default=0, ge=0, description="Seeds the sampler and the trials' seeds.")
    data_seed: int = Field(default=0, ge=0, description="Seeds the subset and validation split.")
    subset_size: int | None = Field(default=None, ge=2)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    timeout: float | None = Field(default=None, gt=0, description="Seconds for the whole study.")
    keep_models: int = Field(default=5, ge=0, description="Keep the weights of this many best trials.")
    bio: dict[str, Any] | None = Field(
        default=None,
        description="Bio-inspired training rules on top of the family (core.BioConfig options and "
        "core.BioStepHook switches); search them as 'bio.<option>' in search_space.",
    )
    growth: dict[str, Any] | None = Field(
        default=None,
        description="Grow dendrite sets while training (core.GrowthConfig options); search them "
        "as 'growth.<option>'. Growth never takes the model over max_params.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME_RE.fullmatch(v):
            raise ValueError(
                "a study name is 1-64 characters: letters, digits, '.', '_' or '-', starting with "
                f"a letter or digit; got {v!r}"
            )
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v not in core.list_models():
            raise ValueError(f"unknown model family {v!r}; known: {', '.join(core.list_models())}")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        # A registered name, or a file dataset (npz:/path, folder:/path) checked on disk and
        # stored with an absolute path, so that every worker reads the same file.
        try:
            return core.resolve_dataset_name(v)
        except (core.CoreError, ValueError, OSError) as exc:
            raise ValueError(str(exc)) from None

    @field_validator("search_space", mode="before")
    @classmethod
    def _space_tuples(cls, v: Any) -> Any:
        # A (low, high) tuple is a range; JSON has no tuples, so store it as a typed dict
        # and a spec survives the round trip through the database unchanged.
        if not isinstance(v, dict):
            return v
        out = {}
        for k, p in v.items():
            if isinstance(p, tuple) and len(p) == 2:
                is_int = all(isinstance(x, int) and not isinstance(x, bool) for x in p)
                p = {"type": "int" if is_int else "float", "low": p[0], "high": p[1]}
            out[k] = p
        return out

    @model_validator(mode="before")
    @classmethod
    def _pareto_prunes_nothing(cls, data: Any) -> Any:
        # Pruning needs one objective: a Pareto spec that names no pruner gets none, rather
        # than the single-objective default it cannot use.
        if isinstance(data, dict) and "pruner" not in data:
            objective = data.get("objective")
            if isinstance(objective, list | tuple) and len(objective) > 1:
                return {**data, "pruner": "none"}
        return data

    @model_validator(mode="after")
    def _semantics(self) -> StudySpec:
        _check(self)
        return self

    # -- derived ------------------------------------------------------------------------
    @property
    def space(self) -> dict[str, ParamDef]:
        return parse_space(self.search_space)

    @property
    def info(self) -> core.DatasetInfo:
        return core.dataset_info(self.dataset)

    @property
    def objectives(self) -> list[str]:
        if self.objective is None:
            return ["val_accuracy" if self.info.task == "classification" else "val_loss"]
        return [self.objective] if isinstance(self.objective, str) else list(self.objective)

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    @property
    def families(self) -> list[str]:
        arch = self.space.get(ARCH_KEY)
        return [str(c) for c in arch.choices] if arch is not None else [self.model]

    def public_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _check(spec: StudySpec) -> None:
    space = parse_space(spec.search_space)
    objectives = spec.objectives
    for o in objectives:
        if o not in OBJECTIVES:
            raise SpecError("objective", f"unknown objective {o!r}; allowed: {', '.join(OBJECTIVES)}")
    if len(set(objectives)) != len(objectives) or len(objectives) > 2:
        raise SpecError("objective", "give one objective, or two different ones for a Pareto front")
    if objectives == ["n_params"]:
        raise SpecError("objective", "'n_params' alone is not a search; pair it with a metric")
    task = spec.info.task
    if task == "regression" and "val_accuracy" in objectives:
        raise SpecError("objective", f"dataset {spec.dataset!r} is a regression task: use 'val_loss' or 'val_mse'")
    if task == "classification" and "val_mse" in objectives:
        raise SpecError("objective", f"dataset {spec.dataset!r} is a classification task: use 'val_accuracy' or 'val_loss'")
    if spec.sampler in ("cmaes", "qmc", "gp") and len(objectives) > 1:
        raise SpecError("sampler", f"sampler {spec.sampler!r} is single-objective; use tpe, nsga2 or random for two objectives")
    if len(objectives) > 1 and spec.pruner != "none":
        raise SpecError("pruner", "pruning needs a single objective; set pruner to 'none' for a Pareto search")

    families = [spec.model]
    if ARCH_KEY in space:
        arch = space[ARCH_KEY]
        if arch.kind != "categorical":
            raise SpecError(f"search_space.{ARCH_KEY}", "must be a list of model families")
        families = [str(c) for c in arch.choices]
        unknown = [f for f in families if f not in core.list_models()]
        if unknown:
            raise SpecError(f"search_space.{ARCH_KEY}", f"unknown model famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; known: {', '.join(core.list_models())}")
    io_keys = {"in_dim", "n_classes", "in_channels", "out_dim"}
    _check_extras(spec, space)
    for key in list(space) + list(spec.model_params):
        if "." in key and key.split(".", 1)[0] in _EXTRAS:
            continue
        where = "search_space" if key in space else "model_params"
        if key in io_keys:
            raise SpecError(f"{where}.{key}", f"{key!r} comes from the dataset and cannot be set")
        if key == ARCH_KEY or (key in TRAIN_KEYS and where == "search_space"):
            continue
        takers = [f for f in families if key in core.get_family(f).accepts]
        if not takers:
            accepted = sorted(set().union(*(core.get_family(f).accepts for f in families)) - io_keys)
            raise SpecError(
                f"{where}.{key}",
                f"model famil{'y' if len(families) == 1 else 'ies'} {', '.join(families)} "
                f"do{'es' if len(families) == 1 else ''} not take {key!r}; searchable: "
                f"{', '.join(accepted + sorted(TRAIN_KEYS))}",
            )
    for key, allowed in RECIPE_CHOICES.items():
        p = space.get(key)
        if p is None:
            continue
        bad = [c for c in (p.choices if p.kind == "categorical" else [None]) if c not in allowed]
        if bad:
            raise SpecError(f"search_space.{key}", f"{key} is a list of choices from {', '.join(allowed)}; "
                            f"got {bad if bad != [None] else 'a range'}")
    for key, low, high in (("batch_size", 1, None), ("label_smoothing", 0, 1), ("warmup_epochs", 0, None)):
        p = space.get(key)
        if p is None:
            continue
        vals = list(p.choices) if p.kind == "categorical" else [p.low, p.high]
        ok = all(isinstance(v, int | float) and not isinstance(v, bool) and v >= low
                 and (high is None or v < high) for v in vals)
        if key == "batch_size" and ok:
            ok = all(float(v).is_integer() for v in vals)
        if not ok:
            rule = f">= {low}" + (f" and < {high}" if high is not None else "")
            raise SpecError(f"search_space.{key}", f"{key} values must be numbers {rule}"
                            + (" (whole numbers)" if key == "batch_size" else "") + f"; got {vals}")
    for key in ("lr", "weight_decay"):
        p = space.get(key)
        if p is not None and (p.kind == "categorical" or p.low < 0 or (key == "lr" and p.low <= 0)):
            if p.kind != "categorical" or any(not isinstance(c, int | float) or c < 0 for c in p.choices):
                raise SpecError(f"search_space.{key}", f"{key} must be a positive number range or list")
    if spec.sampler == "grid":
        from ._space import grid_of

        grid_of(space)  # raises for a float range without a step
    if spec.max_params is not None:
        n, point = smallest_point(spec)
        if n > spec.max_params:
            raise BudgetError(
                f"no point of the search space fits under max_params={spec.max_params}: the "
                f"smallest model has {n} parameters, at {point}. Raise max_params to at least "
                f"{n} or lower the ranges.",
                n,
                point,
            )


def _bio_keys() -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(core.BioConfig)} | {
        f.name for f in dataclasses.fields(core.BioStepHook) if f.init
    }


def _growth_keys() -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(core.GrowthConfig)} - {"metric"}


_EXTRAS = {"bio": _bio_keys, "growth": _growth_keys}


def _check_extras(spec: StudySpec, space: dict[str, ParamDef]) -> None:
    for section, keys_of in _EXTRAS.items():
        allowed = keys_of()
        fixed = getattr(spec, section) or {}
        searched = [k.split(".", 1)[1] for k in space if k.startswith(section + ".")]
        for key, where in [(k, section) for k in fixed] + [(k, f"search_space.{section}") for k in searched]:
            if key not in allowed:
                raise SpecError(f"{where}.{key}", f"unknown {section} option {key!r}; allowed: {', '.join(sorted(allowed))}")
        if searched and getattr(spec, section) is None:
            raise SpecError(f"search_space.{section}.{searched[0]}",
                            f"searching {section} options needs '{section}' in the spec (use {{}} for the defaults)")
        if getattr(spec, section) is not None:
            try:
                _extra_objects(section, dict(fixed))
            except (TypeError, ValueError) as exc:
                raise SpecError(section, str(exc)) from None


def _extra_objects(section: str, options: dict[str, Any]) -> Any:
    """Build the core objects of a bio/growth section, raising on bad values."""
    import dataclasses

    if section == "growth":
        return core.GrowthConfig(**options)
    hook_keys = {f.name for f in dataclasses.fields(core.BioStepHook) if f.init}
    hook = core.BioStepHook(**{k: v for k, v in options.items() if k in hook_keys})
    config = core.BioConfig(**{k: v for k, v in options.items() if k not in hook_keys})
    return config, hook


def split_params(
    spec: StudySpec, params: dict[str, Any]
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A trial's parameters as (family, model arguments, training settings).

    Model arguments include the dataset's sizes and the spec's fixed ``model_params``;
    parameters that the chosen family does not take are dropped (possible only when
    ``architecture`` is searched). Training settings fall back to the spec's values.
    """
    family = str(params.get(ARCH_KEY, spec.model))
    fam = core.get_family(family)
    info = spec.info
    model_args = dict(core.data_params(family, info.input_shape, info.n_classes, info.out_dim))
    for k, v in {**spec.model_params, **params}.items():
        if k in fam.accepts and k not in TRAIN_KEYS and k != ARCH_KEY and "." not in k:
            model_args[k] = v
    train: dict[str, Any] = {
        "lr": float(params.get("lr", spec.lr)),
        "weight_decay": float(params.get("weight_decay", spec.weight_decay)),
        "optimizer": str(params.get("optimizer", spec.optimizer)),
        "batch_size": int(params.get("batch_size", spec.batch_size)),
        "lr_schedule": str(params.get("lr_schedule", spec.lr_schedule)),
        "warmup_epochs": params.get("warmup_epochs", spec.warmup_epochs),
        "label_smoothing": float(params.get("label_smoothing", spec.label_smoothing)),
        "augment": str(params.get("augment", spec.augment)),
    }
    for section in _EXTRAS:
        fixed = getattr(spec, section)
        if fixed is not None:
            searched = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(section + ".")}
            train[section] = {**fixed, **searched}
    return family, model_args, train


def build_extras(train: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(BioConfig, BioStepHook, GrowthConfig) for a trial's training settings; None where unused."""
    bio = _extra_objects("bio", train["bio"]) if "bio" in train else (None, None)
    growth = _extra_objects("growth", train["growth"]) if "growth" in train else None
    return bio[0], bio[1], growth


def count_point(spec: StudySpec, params: dict[str, Any]) -> int:
    """Exact parameter count of the model a point of the space builds (nothing is built)."""
    family, model_args, _ = split_params(spec, params)
    return core.analytic_parameter_count(family, **model_args)


def smallest_point(spec: StudySpec) -> tuple[int, dict[str, Any]]:
    """The smallest parameter count the space can reach and a point that reaches it.

    Sizes only grow with their value in every family, so the low end of each range and
    every categorical choice are enough to enumerate.
    """
    space = parse_space(spec.search_space)
    names = list(space)
    options = [space[n].low_values() for n in names]
    best: tuple[int, dict[str, Any]] | None = None
    errors: list[tuple[str, dict[str, Any]]] = []
    for combo in itertools.islice(itertools.product(*options), _MAX_ENUMERATION):
        point = dict(zip(names, combo, strict=True))
        try:
            n = count_point(spec, point)
        except ValueError as exc:  # e.g. more dendrite inputs than the data has
            errors.append((str(exc), point))
            continue
        if best is None or n < best[0]:
            best = (n, point)
    if best is None:
        message, point = errors[0]
        raise _default_misfit(spec, point, message) or SpecError(
            "search_space", f"no point of the space builds a model: {message}")
    return best


def _default_misfit(spec: StudySpec, point: dict[str, Any], message: str) -> SpecError | None:
    """The error for a family default that does not fit the dataset, naming that default.

    E.g. dendritic_simple's ``n_dendrite_inputs=96`` on the 64 inputs of digits: the user set
    nothing wrong, so the message says which default failed and where to set it.
    """
    family = str(point.get(ARCH_KEY, spec.model))
    fam = core.get_family(family)
    set_here = set(point) | set(spec.model_params) | set(core.data_params(
        family, spec.info.input_shape, spec.info.n_classes, spec.info.out_dim))
    culprits = [k for k in fam.defaults if k not in set_here and re.search(rf"\b{re.escape(k)}\b", message)]
    if not culprits:
        return None
    names = " and ".join(f"{k}={fam.defaults[k]!r}" for k in culprits)
    return SpecError(
        f"model_params.{culprits[0]}",
        f"model family {family!r} defaults to {names}, which does not fit dataset {spec.dataset!r} "
        f"({message}); set {' and '.join(culprits)} in search_space or model_params",
    )
