"""Fixtures shared by every test package: throwaway SQLite storages and tiny study specs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# pytest puts this folder on sys.path for this file, and its sub-folders core/, studies/,
# service/ would then shadow the packages they test (as empty namespace packages: the
# editable install's finder comes after the path search). A regular package anywhere on
# the path wins over a namespace one, so put the repository root there too.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.hookimpl(tryfirst=True)  # before the mark plugin selects with -m
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test of the shared PostgreSQL server gets the ``pgserver`` mark: ``make test`` runs
    them one after another in one pytest process (some stop or restart the server:
    tests/reliability/test_restarts.py) and everything else (SQLite files, their own servers and
    ports) in a second process beside it."""
    for item in items:
        uses_pg = ("pg_url" in getattr(item, "fixturenames", ()) or item.get_closest_marker("postgres")
                   or "postgres" in item.nodeid)
        if uses_pg:
            item.add_marker(pytest.mark.pgserver)


#: a small space on digits (8x8 inputs): counts from a few hundred to a few thousand
TINY_SPACE: dict[str, Any] = {
    "n_neurons": {"type": "int", "low": 2, "high": 8},
    "n_dendrites": {"type": "int", "low": 2, "high": 6},
    "n_dendrite_inputs": {"type": "int", "low": 4, "high": 32, "log": True},
}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A storage URL for a fresh SQLite file in the test's own directory."""
    return f"sqlite:///{tmp_path / 'dendro.db'}"


@pytest.fixture
def tiny_spec() -> Callable[..., Any]:
    """A factory of fast ``studies.StudySpec`` on digits (1 epoch, 300 examples); keywords override."""

    def make(**overrides: Any) -> Any:
        import studies

        settings: dict[str, Any] = {
            "name": "tiny", "model": "dendritic_simple", "dataset": "digits",
            "search_space": TINY_SPACE, "max_params": 1500, "n_trials": 2, "n_epochs": 1,
            "batch_size": 64, "subset_size": 300, "pruner": "none",
        }
        settings.update(overrides)
        return studies.StudySpec(**settings)

    return make
