"""/healthz: is the API up, is the database reachable, and how many workers beat."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter

from .._workers_table import WorkerRegistry
from ..deps import SettingsDep, StorageDep
from ..models import ErrorBody, Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses={503: {"model": ErrorBody}})
def healthz(storage: StorageDep, settings: SettingsDep) -> Health:
    """``ok`` with the number of workers that beat within ``worker_timeout`` seconds (503 while
    the database is down). Zero workers is still ``ok``: the API works, trials just wait."""
    with storage.engine.connect() as con:
        con.execute(sa.text("SELECT 1"))
    from importlib.metadata import version

    alive = len(WorkerRegistry(storage.engine).list(settings.worker_timeout))
    return Health(status="ok", storage=storage.engine.url.get_backend_name(), version=version("dendro"),
                  workers_alive=alive)
