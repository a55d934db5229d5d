"""The API's shared study reads: fresh by default, at most ``max_age`` old when asked to be."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import optuna

import studies
from service._snapshots import Snapshots


def _study(sqlite_url: str, tiny_spec: Callable[..., Any]) -> tuple[optuna.Study, Any]:
    spec = tiny_spec()
    studies.create_study(spec, sqlite_url, spec.name)
    storage = studies.open_storage(sqlite_url)
    return optuna.load_study(study_name=spec.name, storage=storage), storage


def test_by_default_every_read_sees_a_write_made_just_before_it(
    sqlite_url: str, tiny_spec: Callable[..., Any]
) -> None:
    study, storage = _study(sqlite_url, tiny_spec)
    snaps = Snapshots()
    assert len(snaps.get(storage, study.study_name).trials) == 0
    study.ask()
    assert len(snaps.get(storage, study.study_name).trials) == 1


def test_with_max_age_a_read_serves_later_gets_until_it_is_too_old_or_forgotten(
    sqlite_url: str, tiny_spec: Callable[..., Any]
) -> None:
    study, storage = _study(sqlite_url, tiny_spec)
    snaps = Snapshots(max_age=0.3)
    first = snaps.get(storage, study.study_name)
    study.ask()  # a worker's write
    assert snaps.get(storage, study.study_name) is first  # within max_age: the same read
    time.sleep(0.35)
    assert len(snaps.get(storage, study.study_name).trials) == 1  # too old: read again
    study.ask()
    snaps.forget(study.study_name)  # what this API writes itself shows at once
    assert len(snaps.get(storage, study.study_name).trials) == 2
