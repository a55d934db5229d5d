"""Workers under stop, resume, delete, SIGKILL and SIGTERM: studies end with exactly n_trials, none RUNNING."""

from __future__ import annotations

import io
import os
import signal
import time
from typing import Any

import pytest
import sqlalchemy as sa
import torch
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

pytestmark = pytest.mark.slow

#: long enough to be caught mid-trial: with SLOW_EPOCHS, at least 2 s a trial
LONG_EPOCHS = 20


def _by_number(api: Api, name: str) -> dict[int, dict[str, Any]]:
    return {t["number"]: t for t in api.trials(name)}


def _finished(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in trials if t["state"] in ("complete", "pruned")]


def test_stop_ends_running_trials_within_an_epoch_and_resume_finishes_the_study(
    sqlite_api: Api, procs: Procs
) -> None:
    api, name = sqlite_api, unique("stop")
    api.create(tiny_spec(name, n_trials=3, n_epochs=LONG_EPOCHS))
    # Idle longer than the stopped spell below, or the worker would leave before the resume.
    procs.worker(api.storage, "--studies", name, "--idle-exit", "8", env=SLOW_EPOCHS)

    def second_trial_training() -> list[dict[str, Any]]:
        # After one finished trial the worker has its data in memory: a running trial that
        # passed its budget check (n_params is set) trains at once.
        if api.study(name)["progress"]["finished"] < 1:
            return []
        return [t for t in api.running(name) if t["n_params"]]

    (cut,) = wait_for(second_trial_training, 90, "a second trial to start training", interval=0.05)

    stopped = api.http.post(f"/v1/studies/{name}/stop")
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    t0 = time.monotonic()
    wait_for(lambda: not api.running(name), 10, "the running trial to stop", interval=0.05)
    elapsed = time.monotonic() - t0
    cut = _by_number(api, name)[cut["number"]]
    # The worker looks at the study's state after every epoch: the trial ends at the end of
    # the epoch it is in (plus the time to tell it and to see that here).
    assert elapsed < 2.0 + 2 * cut["metrics"]["seconds_per_epoch"]
    assert cut["state"] == "failed"
    assert cut["fail_reason"] == "stopped: the study was stopped"
    assert cut["metrics"]["epochs_run"] < LONG_EPOCHS
    # its point was queued again in the transaction that told the failure
    (requeued,) = api.trials(name, state="waiting")
    assert requeued["params"] == cut["params"]

    # No trial starts while the study is stopped (the worker polls every second).
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert not api.running(name)
        time.sleep(0.1)
    assert api.study(name)["progress"]["finished"] == 1
    assert api.http.post(f"/v1/studies/{name}/stop").status_code == 409

    resumed = api.http.post(f"/v1/studies/{name}/resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == "running"
    assert api.http.post(f"/v1/studies/{name}/resume").status_code == 409
    api.wait_done(name, 90)
    # The worker marks the study done just after it tells the last trial.
    done = wait_for(lambda: (s := api.study(name))["state"] == "done" and s, 10, "the study to be done")
    assert done["progress"]["finished"] == 3 and done["progress"]["running"] == 0
    trials = api.trials(name)
    assert len(_finished(trials)) == 3
    rerun = next(t for t in trials if t["number"] == requeued["number"])
    assert rerun["state"] in ("complete", "pruned") and rerun["params"] == cut["params"], \
        "the cut point was queued and run again"

    # Delete: the study, its trials and its kept weights are gone.
    best = done["best_trial"]
    r = api.http.get(f"/v1/studies/{name}/trials/{best}/model")
    assert r.status_code == 200
    assert "state_dict" in torch.load(io.BytesIO(r.content), weights_only=True)
    assert api.http.delete(f"/v1/studies/{name}").status_code == 204
    for path in (f"/v1/studies/{name}", f"/v1/studies/{name}/trials", f"/v1/studies/{name}/trials/{best}/model"):
        assert api.http.get(path).status_code == 404, path
    assert name not in [s["name"] for s in api.http.get("/v1/studies").json()["data"]]
    engine = sa.create_engine(api.storage)
    try:
        assert studies.ModelStore(engine).get(name, best) is None, "its weights are gone too"
    finally:
        engine.dispose()


# On PostgreSQL: SQLite reuses a deleted study's ids and, without foreign_keys=ON, keeps a
# heartbeat row written just after the delete, which the new study's first trial collides with.
@pytest.mark.postgres
def test_a_study_deleted_while_its_trial_trains_does_not_take_the_worker_down(
    pg_api: Api, procs: Procs
) -> None:
    api, name = pg_api, unique("gone")
    # Long enough that the delete always lands mid-trial (it stops the trial at its next epoch).
    api.create(tiny_spec(name, n_trials=1, n_epochs=10 * LONG_EPOCHS))
    worker = procs.worker(api.storage, "--studies", name, "--idle-exit", "2", env=SLOW_EPOCHS)
    wait_for(lambda: api.running(name), 90, "a trial to start")
    assert api.http.delete(f"/v1/studies/{name}").status_code == 204

    # The same name again is a new study: the worker must not reuse what it knew of the old.
    api.create(tiny_spec(name, n_trials=1, n_epochs=2))
    done = api.wait_done(name, 60)
    assert done["progress"]["finished"] == 1 and done["progress"]["total"] == 1
    assert procs.wait_exit(worker, 30) == 0
    log = procs.log(worker)
    assert "was deleted while trial 0 ran" in log
    assert "the worker goes on" not in log, "no unexpected error on the way"


@pytest.mark.postgres
def test_a_study_deleted_while_its_population_trains_logs_only_the_clean_message(
    pg_api: Api, procs: Procs
) -> None:
    api, name = pg_api, unique("gonepop")
    api.create(tiny_spec(name, n_trials=4, n_epochs=10 * LONG_EPOCHS))
    worker = procs.worker(api.storage, "--studies", name, "--idle-exit", "2", "--population", "4",
                          env=SLOW_EPOCHS)
    wait_for(lambda: api.running(name), 90, "a population to start")
    assert api.http.delete(f"/v1/studies/{name}").status_code == 204
    assert procs.wait_exit(worker, 60) == 0
    log = procs.log(worker)
    assert "was deleted while its population trained" in log
    assert "Traceback" not in log and "KeyError" not in log, log[-2000:]


@pytest.mark.parametrize("storage", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_worker_killed_mid_trial_loses_nothing(storage: str, request: pytest.FixtureRequest,
                                                 procs: Procs) -> None:
    api: Api = request.getfixturevalue(f"{'pg' if storage == 'postgres' else 'sqlite'}_api")
    name = unique("kill")
    api.create(tiny_spec(name, n_trials=2, n_epochs=LONG_EPOCHS))
    doomed = procs.worker(api.storage, "--studies", name, env={**FAST_RETRY, **SLOW_EPOCHS})
    # Mid-trial: its point is chosen and passed the budget check (n_params is recorded).
    (killed,) = wait_for(lambda: [t for t in api.running(name) if t["n_params"]], 90,
                         "a trial to pass its budget check", interval=0.05)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(10)
    assert [t["number"] for t in api.running(name)] == [killed["number"]], "left RUNNING, for now"

    # Its heartbeat has stopped: after the grace period the next worker fails it and runs its
    # point again. (Wait the grace period out first: a worker that starts at once and finds
    # nothing to do could otherwise be idle for --idle-exit before the lease is stale.)
    time.sleep(FAST_RETRY_STALE)
    rescuer = procs.worker(api.storage, "--studies", name, "--idle-exit", "2", env=FAST_RETRY)
    api.wait_done(name, 120)
    assert procs.wait_exit(rescuer, 30) == 0

    done = api.study(name)
    p = done["progress"]
    assert p["finished"] == 2 and p["running"] == 0 and p["waiting"] == 0
    assert done["state"] == "done"
    trials = _by_number(api, name)
    assert trials[killed["number"]]["state"] == "failed"
    assert trials[killed["number"]]["params"] == killed["params"]
    retried = [t for t in _finished(list(trials.values())) if t["params"] == killed["params"]]
    assert len(retried) == 1 and retried[0]["number"] > killed["number"], "its point was run again"
    assert "Traceback" not in procs.log(rescuer)


@pytest.mark.postgres
def test_sigterm_fails_the_trial_visibly_and_exits_0_and_max_trials_ends_a_worker(
    pg_api: Api, procs: Procs
) -> None:
    api, name = pg_api, unique("term")
    # Long enough that the signal always lands mid-trial, even on a loaded machine.
    epochs = 2 * LONG_EPOCHS
    api.create(tiny_spec(name, n_trials=2, n_epochs=epochs))
    first = procs.worker(api.storage, "--studies", name, env=SLOW_EPOCHS)
    (cut,) = wait_for(lambda: api.running(name), 90, "a trial to start")
    first.send_signal(signal.SIGTERM)
    assert procs.wait_exit(first, 30) == 0
    assert "stopping after the current epoch" in procs.log(first)

    cut = _by_number(api, name)[cut["number"]]
    assert cut["state"] == "failed"
    assert "shutting down" in cut["fail_reason"]
    assert cut["metrics"]["epochs_run"] < epochs
    assert len(api.trials(name, state="waiting")) == 1, "its point is queued again"

    # --max-trials 1 (and no --idle-exit): the worker runs the queued point, then exits.
    second = procs.worker(api.storage, "--studies", name, "--max-trials", "1")
    assert procs.wait_exit(second, 90) == 0
    s = api.study(name)
    assert s["state"] == "running" and s["progress"]["finished"] == 1 and s["progress"]["running"] == 0
    (rerun,) = _finished(api.trials(name))
    assert rerun["params"] == cut["params"]
    assert api.http.post(f"/v1/studies/{name}/stop").status_code == 200
    assert api.http.delete(f"/v1/studies/{name}").status_code == 204
