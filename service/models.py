"""Request and response models of the REST API, one per entity (FastAPI template style)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ErrorBody",
    "StudyProgress",
    "StudyPublic",
    "StudiesPublic",
    "TrialPublic",
    "TrialsPublic",
    "WorkerPublic",
    "WorkersPublic",
    "Health",
    "StudyUpdate",
    "FinalizeCreate",
]


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong and what is allowed.")
    field: str | None = Field(default=None, description="The request field at fault, if one is.")


class StudyProgress(BaseModel):
    complete: int
    pruned: int
    failed: int
    running: int
    waiting: int
    infeasible: int
    finished: int = Field(description="complete + pruned: what n_trials counts.")
    total: int


class StudyPublic(BaseModel):
    name: str
    study_id: int = Field(description="Optuna's id: the dashboard shows the study at /dashboard/studies/{study_id}.")
    state: str = Field(description="queued | running | stopped | done | error")
    error: str | None = Field(default=None, description="Why no worker can run the study (state error).")
    n_trials: int
    progress: StudyProgress
    directions: list[str]
    objectives: list[str]
    best_value: float | None = None
    best_trial: int | None = None
    best_params: dict[str, Any] | None = None
    pareto_trials: list[int] | None = None
    spec: dict[str, Any]
    final: dict[str, Any] | None = Field(
        default=None,
        description="The honest final answer (POST /finalize): the finalize in flight (state queued, "
        "running or error), else the last result (state done), else null.",
    )


class StudiesPublic(BaseModel):
    data: list[StudyPublic]
    count: int


class TrialPublic(BaseModel):
    number: int
    state: str
    infeasible: bool
    values: list[float] | None
    params: dict[str, Any]
    n_params: int | None
    last_step: int | None = Field(
        default=None,
        description="The last epoch reported so far (single objective): how far a running trial is.",
    )
    metrics: dict[str, Any]
    fail_reason: str | None
    datetime_start: str | None
    datetime_complete: str | None


class TrialsPublic(BaseModel):
    data: list[TrialPublic]
    count: int = Field(description="Trials matching the filter, over all pages.")
    offset: int
    limit: int


class WorkerPublic(BaseModel):
    worker_id: str
    host: str
    pid: int
    device: str
    state: str
    study_name: str | None
    trial_number: int | None
    trials_done: int
    started_at: float
    last_heartbeat: float
    alive: bool


class WorkersPublic(BaseModel):
    data: list[WorkerPublic]
    count: int


class Health(BaseModel):
    status: str
    storage: str
    version: str
    workers_alive: int = Field(description="Workers that beat within the server's worker_timeout.")


class StudyUpdate(BaseModel):
    """PATCH /v1/studies/{name}: more trials (or time) for a study; a done one runs again."""

    model_config = ConfigDict(extra="forbid")

    n_trials: int | None = Field(default=None, ge=1, description="The new total: more than the "
                                 "finished trials, at most the server's max_trials.")
    timeout: float | None = Field(default=None, gt=0, description="The new whole-study timeout in seconds.")


class FinalizeCreate(BaseModel):
    """POST /v1/studies/{name}/finalize: re-train the top trials with fresh seeds."""

    model_config = ConfigDict(extra="forbid")

    top_n: int = Field(default=3, ge=1, le=100, description="How many of the best complete trials (by "
                       "the first objective) to re-train.")
    seeds: int = Field(default=3, ge=1, le=100, description="Fresh seeds per trial.")
    n_epochs: int | None = Field(default=None, ge=1, description="Epochs per run; default: the "
                                 "study's n_epochs; at most the server's max_epochs.")
