"""Optuna searches over dendritic models under a parameter budget, stored in a SQL database.

Optuna and PyTorch only: no web code lives here.
"""

from __future__ import annotations

from ._artifacts import ModelStore
from ._runner import (
    SPEC_ATTR,
    STATE_ATTR,
    STATES,
    TrialOutcome,
    ask_trial,
    create_study,
    execute_trial,
    is_infeasible,
    load_data,
    load_study,
    make_pruner,
    make_sampler,
    progress,
    run_study,
    set_study_state,
    study_spec,
    study_state,
)
from ._population import execute_population, population_supported
from ._space import ParamDef, grid_of, parse_space, suggest
from ._spec import (
    NAME_PATTERN,
    OBJECTIVES,
    PRUNERS,
    SAMPLERS,
    StudySpec,
    count_point,
    smallest_point,
    split_params,
)
from ._storage import default_storage_url, heartbeat, open_storage, sqlite_path, study_lock
from .exceptions import (
    BudgetError,
    SpecError,
    StateError,
    StorageError,
    StudiesError,
    StudyExistsError,
    StudyNotFoundError,
)

__all__ = [
    "StudySpec",
    "run_study",
    "create_study",
    "load_study",
    "study_spec",
    "study_state",
    "set_study_state",
    "progress",
    "ask_trial",
    "execute_trial",
    "execute_population",
    "population_supported",
    "split_params",
    "is_infeasible",
    "load_data",
    "make_sampler",
    "make_pruner",
    "TrialOutcome",
    "ModelStore",
    "ParamDef",
    "parse_space",
    "suggest",
    "grid_of",
    "count_point",
    "smallest_point",
    "open_storage",
    "default_storage_url",
    "sqlite_path",
    "study_lock",
    "heartbeat",
    "SPEC_ATTR",
    "STATE_ATTR",
    "STATES",
    "NAME_PATTERN",
    "OBJECTIVES",
    "SAMPLERS",
    "PRUNERS",
    "StudiesError",
    "SpecError",
    "BudgetError",
    "StudyNotFoundError",
    "StudyExistsError",
    "StateError",
    "StorageError",
]
