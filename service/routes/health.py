"""/healthz: is the API up and the database reachable."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter

from ..deps import StorageDep
from ..models import ErrorBody, Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses={503: {"model": ErrorBody}})
def healthz(storage: StorageDep) -> Health:
    with storage.engine.connect() as con:
        con.execute(sa.text("SELECT 1"))
    from importlib.metadata import version

    return Health(status="ok", storage=storage.engine.url.get_backend_name(), version=version("dendro"))
