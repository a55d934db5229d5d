"""/v1/workers: the worker processes that beat into this storage."""

from __future__ import annotations

import time

from fastapi import APIRouter

from .._workers_table import WorkerRegistry
from ..deps import ReadAuth, SettingsDep, StorageDep
from ..models import ErrorBody, WorkerPublic, WorkersPublic

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get("", response_model=WorkersPublic, dependencies=[ReadAuth],
            responses={401: {"model": ErrorBody}, 503: {"model": ErrorBody}})
def list_workers(storage: StorageDep, settings: SettingsDep, include_dead: bool = False) -> WorkersPublic:
    """Live workers: host, device, current trial and last heartbeat."""
    rows = WorkerRegistry(storage.engine).list(None if include_dead else settings.worker_timeout)
    now = time.time()
    data = [WorkerPublic(**r, alive=now - r["last_heartbeat"] <= settings.worker_timeout) for r in rows]
    return WorkersPublic(data=data, count=len(data))
