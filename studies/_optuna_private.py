"""The private Optuna names this package still needs, in one place, each with the reason.

Optuna is bounded below its next major version in ``pyproject.toml``; a new major may move
any of these, and this module is the one to fix. Nothing here is patched: these names are
only read, called or subclassed. (Beside them the package reads three attributes that
Optuna documents nowhere but every storage-aware tool uses: ``Study._storage``,
``Study._study_id`` and ``Trial._trial_id``/``FrozenTrial._trial_id``.)
"""

from __future__ import annotations

import json
from typing import Any

# The RDB schema (tables and ORM models): the batching storage (studies._fast) writes a
# batch of trials' rows in one statement per table, the lease reaper (studies._lease) fails
# a stale trial and queues its point in one transaction, and studies.delete_study empties a
# study's rows in one statement per table. Optuna's public API writes row by row.
from optuna.storages._rdb import models

# A session that commits on success and rolls back (and translates errors as Optuna does)
# on failure: the same transaction boundaries as Optuna's own writes.
from optuna.storages._rdb.storage import _create_scoped_session as create_scoped_session

# The key under which Study.set_constraint / Trial.set_constraint store a constraint.
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY as CONSTRAINTS_KEY

__all__ = [
    "models",
    "create_scoped_session",
    "CONSTRAINTS_KEY",
    "set_trial_attr_without_commit",
    "tpe_split_trials",
    "tpe_infeasible_score",
    "tpe_pruned_score",
    "tpe_default_gammas",
    "tpe_ndtr",
    "tpe_unique_inverse_2d",
    "tpe_categorical_type",
    "tpe_startup_trials",
    "tell",
    "percentile_pruner_parts",
]


def set_trial_attr_without_commit(storage: Any, session: Any, model: Any, trial_id: int, key: str,
                                  value: Any) -> None:
    """Optuna's upsert of one attribute row inside a caller's transaction: the batching
    storage's fallback on databases without an INSERT .. ON CONFLICT statement."""
    storage._set_trial_attr_without_commit(session, model, trial_id, key, value)


def tpe_split_trials(study: Any, trials: list[Any], n_below: int) -> tuple[list[Any], list[Any]]:
    """TPE's multi-objective good/bad split: FastTPESampler fits its estimators itself (one fit
    serves a batch of asks) and must split exactly as TPESampler does."""
    from optuna.samplers._tpe import sampler as tpe

    return tpe._split_trials(study, trials, n_below)


def tpe_infeasible_score(trial: Any) -> float:
    """How far over its constraints a trial is, as TPE ranks infeasible trials."""
    from optuna.samplers._tpe import sampler as tpe

    return float(tpe._get_infeasible_trial_score(trial))


def tpe_pruned_score(trial: Any, study: Any) -> Any:
    """How far a pruned trial got and its last report, as TPE ranks pruned trials."""
    from optuna.samplers._tpe import sampler as tpe

    return tpe._get_pruned_trial_score(trial, study)


def tpe_default_gammas() -> tuple[Any, Any]:
    """TPE's default gamma functions (single, multi-objective), used when none is given."""
    from optuna.samplers._tpe import sampler as tpe

    return tpe.default_gamma, tpe.default_gamma_multiobjective


def json_dumps_attr(value: Any) -> str:
    """An attribute value as Optuna stores it (``value_json``); raises TypeError or ValueError
    for a value JSON cannot encode, at the moment it is set, as RDBStorage does."""
    return json.dumps(value)


def tpe_ndtr(a: Any) -> Any:
    """TPE's array normal CDF (its own erf): the central case of the Gaussian mass, which
    studies._tpe_math computes array-wise and must compute exactly as Optuna does."""
    from optuna.samplers._tpe import _truncnorm

    return _truncnorm._ndtr(a)


def tpe_unique_inverse_2d(a: Any, b: Any) -> Any:
    """TPE's de-duplication of (mu, sigma) pairs before the Gaussian mass (studies._tpe_math)."""
    from optuna.samplers._tpe import probability_distributions as pd

    return pd._unique_inverse_2d(a, b)


def tpe_categorical_type() -> type:
    """The class of a Parzen estimator's categorical kernels, which studies._tpe_math scores."""
    from optuna.samplers._tpe import probability_distributions as pd

    return pd._BatchedCategoricalDistributions


def tpe_startup_trials(sampler: Any) -> int:
    """A TPESampler's ``n_startup_trials`` (stored privately, with no getter): a population of
    "auto" size is never smaller than the random start-up (studies._population)."""
    return int(sampler._n_startup_trials)


def percentile_pruner_parts() -> tuple[Any, Any, Any]:
    """PercentilePruner.prune's three steps: whether a step is one it decides at, a trial's best
    report so far, and the percentile over the completed trials at a step. FastMedianPruner
    decides with them exactly as MedianPruner does, computing the last once per step while the
    completed trials stay the same."""
    from optuna.pruners import _percentile as pct

    return (pct._is_first_in_interval_step, pct._get_best_intermediate_result_over_steps,
            pct._get_percentile_intermediate_result_over_trials)


def tell(study: Any, trial: Any, values: Any = None, state: Any = None) -> None:
    """``Study.tell`` without its return value: Optuna's ``tell`` returns a deep copy of the told
    trial (its whole epoch history), read back from the storage, which our callers never use;
    in a population ~1,000 members end together and the copies cost ~1.7 ms each (profiled, a
    2-core machine). The same checks, warnings and writes: ``tell`` calls this, then copies."""
    from optuna.study._tell import _tell_with_warning

    _tell_with_warning(study=study, trial=trial, value_or_values=values, state=state)
