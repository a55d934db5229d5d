"""Fixtures for the service tests: real `dendro serve` and `dendro worker` processes on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_helpers import PG_URL, Api, Procs


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


@pytest.fixture(scope="session")
def session_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    p = Procs(tmp_path_factory.mktemp("servers"))
    yield p
    p.close()


def _pg_error() -> str | None:
    import psycopg

    conninfo = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(conninfo, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The local PostgreSQL; started if it is down, skipped with the reason if it cannot be."""
    error = _pg_error()
    if error is not None and Path("/etc/postgresql").is_dir():
        for version in sorted(os.listdir("/etc/postgresql")):
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                           capture_output=True, timeout=60)
        error = _pg_error()
    if error is not None:
        pytest.skip(f"PostgreSQL at {PG_URL} cannot be reached ({error}); start it or set DENDRO_TEST_PG")
    return PG_URL


@pytest.fixture(scope="session")
def sqlite_api(session_procs: Procs) -> Api:
    return session_procs.serve(f"sqlite:///{session_procs.folder / 'dendro.db'}")


@pytest.fixture(scope="session")
def pg_api(session_procs: Procs, pg_url: str) -> Api:
    return session_procs.serve(pg_url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest) -> Api:
    """The API on each storage kind (one server per kind for the whole session)."""
    return request.getfixturevalue("pg_api" if request.param == "postgres" else "sqlite_api")
