"""Request and response models of the REST API, one per entity (FastAPI template style)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

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
    state: str = Field(description="queued | running | stopped | done")
    n_trials: int
    progress: StudyProgress
    directions: list[str]
    objectives: list[str]
    best_value: float | None = None
    best_trial: int | None = None
    best_params: dict[str, Any] | None = None
    pareto_trials: list[int] | None = None
    spec: dict[str, Any]


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
