"""The workers' registry: one row a worker process, its beat and current trial."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

__all__ = ["WorkerRegistry"]

_META = sa.MetaData()
_WORKERS = sa.Table(
    "dendro_workers",
    _META,
    sa.Column("worker_id", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("last_heartbeat", sa.Float, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("study_name", sa.String(128), nullable=True),
    sa.Column("trial_number", sa.Integer, nullable=True),
    sa.Column("trials_done", sa.Integer, nullable=False, default=0),
)


class WorkerRegistry:
    """Rows in ``dendro_workers`` beside Optuna's tables, created on first use."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        _META.create_all(engine, checkfirst=True)

    def register(self, worker_id: str, host: str, pid: int, device: str) -> None:
        now = time.time()
        with self.engine.begin() as con:
            con.execute(_WORKERS.delete().where(_WORKERS.c.worker_id == worker_id))
            con.execute(_WORKERS.insert().values(
                worker_id=worker_id, host=host, pid=pid, device=device, started_at=now,
                last_heartbeat=now, state="idle", trials_done=0,
            ))

    def beat(self, worker_id: str, **fields: Any) -> None:
        with self.engine.begin() as con:
            con.execute(
                _WORKERS.update().where(_WORKERS.c.worker_id == worker_id)
                .values(last_heartbeat=time.time(), **fields)
            )

    def list(self, live_within: float | None = None) -> list[dict[str, Any]]:
        q = sa.select(_WORKERS).order_by(_WORKERS.c.started_at)
        if live_within is not None:
            q = q.where(_WORKERS.c.last_heartbeat >= time.time() - live_within)
        with self.engine.connect() as con:
            return [dict(r._mapping) for r in con.execute(q)]

    def remove(self, worker_id: str) -> None:
        with self.engine.begin() as con:
            con.execute(_WORKERS.delete().where(_WORKERS.c.worker_id == worker_id))
