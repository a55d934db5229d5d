"""The workers' registry: one row a worker process (its lease), its beat and current trial.

The rows are the workers' leases (``studies.Lease``): the same row that keeps a worker's
trials alive is the one ``/v1/workers`` lists, beaten by one thread in the worker.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

import studies

__all__ = ["WorkerRegistry"]


class WorkerRegistry:
    """Reads (and, for tools and tests, writes) the lease rows beside Optuna's tables."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._leases: dict[str, studies.Lease] = {}

    def register(self, worker_id: str, host: str, pid: int, device: str) -> None:
        lease = studies.Lease(self.engine, lease_id=worker_id, host=host, pid=pid, device=device)
        self._leases[worker_id] = lease.open(thread=False)

    def beat(self, worker_id: str, **fields: Any) -> None:
        lease = self._leases.get(worker_id) or studies.Lease(self.engine, lease_id=worker_id)
        lease.beat(**fields)

    def list(self, live_within: float | None = None) -> list[dict[str, Any]]:
        rows = studies.list_leases(self.engine, live_within)
        for r in rows:
            r.pop("age", None)
        return rows

    def remove(self, worker_id: str) -> None:
        lease = self._leases.pop(worker_id, None) or studies.Lease(self.engine, lease_id=worker_id)
        lease.opened = True
        lease.close(remove=True)
