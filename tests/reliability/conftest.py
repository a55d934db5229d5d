"""Fixtures of the reliability tests: the service tests' servers and helpers, and PostgreSQL restarts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The service tests' helpers and fixtures, reused rather than copied: `service_helpers` is
# imported from its folder, and the fixtures of tests/service/conftest.py are loaded under a
# name of their own (two modules called `conftest` would shadow each other).
_SERVICE_TESTS = Path(__file__).resolve().parent.parent / "service"
if str(_SERVICE_TESTS) not in sys.path:
    sys.path.insert(0, str(_SERVICE_TESTS))
_spec = importlib.util.spec_from_file_location("_service_tests_conftest", _SERVICE_TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_service_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_service_conftest)

procs = _service_conftest.procs
session_procs = _service_conftest.session_procs
pg_url = _service_conftest.pg_url
sqlite_api = _service_conftest.sqlite_api
pg_api = _service_conftest.pg_api
api = _service_conftest.api
_pg_error = _service_conftest._pg_error


def _pg_ctl(action: str) -> None:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir())
    for version in versions:
        r = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action,
                            *(["-m", "fast"] if action in ("stop", "restart") else [])],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0 and not (action == "start" and "already running" in r.stderr):
            raise AssertionError(f"pg_ctlcluster {version} main {action}: {r.stderr.strip()}")


@pytest.fixture
def pg_control(pg_url: str) -> Iterator[Callable[[str], None]]:
    """``pg_control("stop" | "start" | "restart")`` on this machine's own cluster.

    Whatever the test does, the server is running again when it ends.
    """
    if not Path("/etc/postgresql").is_dir():
        pytest.skip("no local PostgreSQL cluster to restart (/etc/postgresql is missing)")
    try:
        yield _pg_ctl
    finally:
        if _pg_error() is not None:
            _pg_ctl("start")
        deadline = time.monotonic() + 60
        while _pg_error() is not None and time.monotonic() < deadline:
            time.sleep(0.5)
