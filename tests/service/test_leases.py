"""Real `dendro worker` processes: stale leases re-queue once, poison studies are skipped, names reused."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from service_helpers import (
    FAST_RETRY,
    FAST_RETRY_STALE,
    SLOW_EPOCHS,
    Api,
    Procs,
    tiny_spec,
    unique,
    wait_for,
)

import studies

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    st = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    try:
        return optuna.load_study(study_name=name, storage=st).get_trials()
    finally:
        st.engine.dispose()


def _create(url: str, **overrides: Any) -> str:
    name = unique("lease")
    studies.create_study(studies.StudySpec.model_validate(tiny_spec(name, **overrides)), url, name)
    return name


def test_a_killed_population_workers_trials_are_failed_and_requeued_exactly_once(
    tmp_path: Path, procs: Procs,
) -> None:
    url = f"sqlite:///{tmp_path / 'lease.db'}"
    # 15 epochs of at least 0.1 s: the population is caught mid-training.
    name = _create(url, n_trials=6, n_epochs=15)
    doomed = procs.worker(url, "--studies", name, "--population", "3", env={**FAST_RETRY, **SLOW_EPOCHS})

    def training() -> list[optuna.trial.FrozenTrial]:
        running = [t for t in _trials(url, name) if t.state == TrialState.RUNNING and t.params]
        return running if len(running) >= 2 else []

    wait_for(training, 90, "a population training", interval=0.1)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(10)
    killed = [t for t in _trials(url, name) if t.state == TrialState.RUNNING]
    assert killed and all(t.system_attrs.get("dendro.lease") for t in killed)

    # Two rescuers start together once the lease is stale: both see it at their first ask;
    # each point is queued once.
    time.sleep(FAST_RETRY_STALE)
    rescuers = [procs.worker(url, "--studies", name, "--population", "3", "--idle-exit", "2", env=FAST_RETRY)
                for _ in range(2)]
    for r in rescuers:
        assert procs.wait_exit(r, 150) == 0, procs.log(r)[-3000:]
    trials = _trials(url, name)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    by_number = {t.number: t for t in trials}
    for k in killed:
        dead = by_number[k.number]
        assert dead.state == TrialState.FAIL and "lease" in dead.user_attrs["fail_reason"]
        again = [t for t in trials if t.user_attrs.get("requeued_from") == k.number]
        assert len(again) == 1, f"trial {k.number} was re-queued {len(again)} times"
        assert again[0].params == k.params and again[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                and not t.user_attrs.get("infeasible")]
    assert len(finished) == 6
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for r in rescuers:
        assert "Traceback" not in procs.log(r)


def test_a_study_no_worker_can_run_is_marked_error_and_skipped_while_a_good_one_completes(
    sqlite_api: Api, procs: Procs,
) -> None:
    api = sqlite_api
    poison, good = unique("poison"), unique("good")
    api.create(tiny_spec(poison, n_trials=2))
    api.create(tiny_spec(good, n_trials=2))
    # As a study made by a process with a plugin that this worker lacks: a family it does not know.
    study = optuna.load_study(study_name=poison, storage=api.storage)
    raw = dict(study.user_attrs[studies.SPEC_ATTR], model="family_from_a_plugin")
    study.set_user_attr(studies.SPEC_ATTR, raw)
    worker = procs.worker(api.storage, "--studies", f"{poison},{good}", "--idle-exit", "3")
    done = api.wait_done(good, 90)
    assert done["state"] in ("running", "done") and done["progress"]["finished"] == 2
    bad = wait_for(lambda: (s := api.study(poison))["state"] == "error" and s, 30, "the poison study's error")
    assert "family_from_a_plugin" in bad["error"] and bad["progress"]["total"] == 0
    assert bad["state"] in [s["state"] for s in api.http.get("/v1/studies").json()["data"] if s["name"] == poison]
    assert procs.wait_exit(worker, 30) == 0, "the worker went on and exited normally"
    assert "marked error and skipped" in procs.log(worker)


def test_a_study_deleted_and_created_again_is_served_by_the_same_long_lived_worker(
    tmp_path: Path, procs: Procs,
) -> None:
    url = f"sqlite:///{tmp_path / 'again.db'}"
    name = _create(url, n_trials=2)
    worker = procs.worker(url, "--studies", name, "--idle-exit", "20")

    def finished() -> int:
        return sum(t.state == TrialState.COMPLETE for t in _trials(url, name))

    wait_for(lambda: finished() == 2, 90, "the first study to finish")
    studies.delete_study(url, name)
    # The same name and spec: SQLite gives the new study the old one's id.
    studies.create_study(studies.StudySpec.model_validate(tiny_spec(name, n_trials=2)), url, name)
    t0 = time.monotonic()
    wait_for(lambda: finished() == 2, 60, "the second study to finish")
    assert worker.poll() is None, "the same worker served both"
    st = optuna.load_study(study_name=name, storage=url)
    assert st.user_attrs[studies.STATE_ATTR] == "done" and time.monotonic() - t0 < 60
    os.killpg(worker.pid, signal.SIGTERM)
    assert procs.wait_exit(worker, 30) == 0
