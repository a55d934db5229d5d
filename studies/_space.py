"""Search spaces in the seed formats, parsed into parameter definitions Optuna can sample."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna

from .exceptions import SpecError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["ParamDef", "parse_space", "suggest", "grid_of", "space_lows"]

_INT_TYPES = {"int", "randint", "integer"}
_FLOAT_TYPES = {"float", "uniform", "real"}
_LOG_TYPES = {"loguniform", "log_uniform", "logfloat"}
_CAT_TYPES = {"categorical", "choice", "choices", "grid"}
_DICT_KEYS = {"type", "low", "high", "step", "log", "choices", "values"}
_Scalar = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class ParamDef:
    """One searched parameter: a set of choices, or an int/float range (inclusive)."""

    name: str
    kind: str  # "categorical" | "int" | "float"
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return optuna.distributions.FloatDistribution(
            self.low, self.high, log=self.log, step=self.step
        )

    def grid_values(self) -> list[Any]:
        """Every value this parameter can take, for grid search."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise SpecError(
                f"search_space.{self.name}",
                "a float range without 'step' has no grid; give 'step' or a list of values",
            )
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [self.low + i * self.step for i in range(n)]

    def low_values(self) -> list[Any]:
        """Values to try when looking for the smallest model (sizes grow with the value)."""
        return list(self.choices) if self.kind == "categorical" else [self.distribution_low()]

    def distribution_low(self) -> float | int:
        return int(self.low) if self.kind == "int" else self.low


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float)) and not isinstance(v, bool)


def _range(name: str, kind: str, low: Any, high: Any, step: Any, log: Any) -> ParamDef:
    field = f"search_space.{name}"
    if not _is_num(low) or not _is_num(high):
        raise SpecError(field, f"'low' and 'high' must be numbers, got low={low!r}, high={high!r}")
    if kind == "int" and not (_is_int(low) and _is_int(high)):
        raise SpecError(field, f"an int range needs integer bounds, got low={low!r}, high={high!r}")
    if not math.isfinite(low) or not math.isfinite(high):
        raise SpecError(field, "bounds must be finite")
    if low > high:
        raise SpecError(field, f"empty range: low={low} is greater than high={high}")
    if not isinstance(log, bool):
        raise SpecError(field, f"'log' must be true or false, got {log!r}")
    if log and low <= 0:
        raise SpecError(field, f"a log range needs low > 0, got low={low}")
    if step is not None:
        if not _is_num(step) or step <= 0 or (kind == "int" and not _is_int(step)):
            raise SpecError(field, f"'step' must be a positive {kind}, got {step!r}")
        if log:
            raise SpecError(field, "'step' and 'log' cannot be combined")
    return ParamDef(name, kind, low=low, high=high, step=step, log=log)


def _parse_one(name: str, value: Any) -> ParamDef:
    field = f"search_space.{name}"
    if isinstance(value, tuple):
        if len(value) != 2:
            raise SpecError(field, f"a range is a (low, high) pair, got {len(value)} values")
        low, high = value
        kind = "int" if _is_int(low) and _is_int(high) else "float"
        return _range(name, kind, low, high, None, False)
    if isinstance(value, list):
        if not value:
            raise SpecError(field, "the list of choices is empty; give at least one value")
        bad = [v for v in value if not isinstance(v, _Scalar)]
        if bad:
            raise SpecError(field, f"choices must be numbers, strings, booleans or null, got {bad[0]!r}")
        if len(set(map(repr, value))) != len(value):
            raise SpecError(field, "choices must not repeat")
        return ParamDef(name, "categorical", choices=tuple(value))
    if isinstance(value, dict):
        unknown = sorted(set(value) - _DICT_KEYS)
        if unknown:
            raise SpecError(
                field, f"unknown key(s) {unknown}; a parameter dict takes {sorted(_DICT_KEYS)}"
            )
        t = value.get("type")
        if t is None:
            t = "int" if _is_int(value.get("low")) and _is_int(value.get("high")) else "float"
        if not isinstance(t, str):
            raise SpecError(f"{field}.type", f"must be a string, got {t!r}")
        t = t.lower()
        if t in _CAT_TYPES:
            choices = value.get("choices", value.get("values"))
            if not isinstance(choices, list):
                raise SpecError(field, f"type {t!r} needs 'choices' (a list)")
            return _parse_one(name, choices)
        if "low" not in value or "high" not in value:
            raise SpecError(field, f"type {t!r} needs 'low' and 'high'")
        log = value.get("log", False)
        if t in _INT_TYPES:
            return _range(name, "int", value["low"], value["high"], value.get("step"), log)
        if t in _FLOAT_TYPES:
            return _range(name, "float", value["low"], value["high"], value.get("step"), log)
        if t in _LOG_TYPES:
            low, high = value["low"], value["high"]
            kind = "int" if _is_int(low) and _is_int(high) and t != "loguniform" else "float"
            return _range(name, kind, float(low) if kind == "float" and _is_num(low) else low,
                          high, None, True)
        allowed = sorted(_INT_TYPES | _FLOAT_TYPES | _LOG_TYPES | _CAT_TYPES)
        raise SpecError(f"{field}.type", f"unknown type {t!r}; allowed: {', '.join(allowed)}")
    if isinstance(value, _Scalar):
        # A single fixed value is a one-choice categorical: searchable later, recorded now.
        return ParamDef(name, "categorical", choices=(value,))
    raise SpecError(field, f"expected a list of choices, a (low, high) pair or a dict, got {value!r}")


def parse_space(space: Mapping[str, Any]) -> dict[str, ParamDef]:
    """Parse a search space in any of the seed formats; errors name the parameter."""
    if not isinstance(space, dict):
        raise SpecError("search_space", f"must be an object of parameter -> definition, got {space!r}")
    return {str(k): _parse_one(str(k), v) for k, v in space.items()}


def suggest(trial: optuna.trial.BaseTrial, space: Mapping[str, ParamDef]) -> dict[str, Any]:
    """Draw every parameter of ``space`` from ``trial`` (a pure function of the trial)."""
    out: dict[str, Any] = {}
    for name, p in space.items():
        if p.kind == "categorical":
            out[name] = trial.suggest_categorical(name, list(p.choices))
        elif p.kind == "int":
            out[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1),
                                          log=p.log)
        else:
            out[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
    return out


def grid_of(space: Mapping[str, ParamDef]) -> dict[str, list[Any]]:
    """The grid for Optuna's GridSampler: every value of every parameter."""
    return {name: p.grid_values() for name, p in space.items()}


def space_lows(space: Mapping[str, ParamDef]) -> dict[str, list[Any]]:
    return {name: p.low_values() for name, p in space.items()}
