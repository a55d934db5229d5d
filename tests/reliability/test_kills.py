"""Workers SIGKILLed mid-trial, again and again: the study still ends with exactly n_trials, losing nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import pytest
from service_helpers import (
    FAST_RETRY,
    FAST_RETRY_STALE,
    Api,
    Procs,
    tiny_spec,
    unique,
    wait_for,
)

pytestmark = pytest.mark.slow

N_WORKERS, N_KILLS = 4, 5
N_TRIALS, N_EPOCHS = 10, 8


def _pid_of(trial: dict[str, Any]) -> int | None:
    worker = trial["metrics"].get("worker")  # "host:pid", set as training starts
    return int(worker.rsplit(":", 1)[1]) if worker else None


def _assert_nothing_lost(api: Api, name: str, n_trials: int, n_epochs: int,
                         killed: list[dict[str, Any]]) -> None:
    study = api.study(name)
    p = study["progress"]
    assert p["finished"] == n_trials, p
    assert p["running"] == 0, p
    assert study["state"] == "done"
    trials = api.trials(name, history=True)
    numbers = [t["number"] for t in trials]
    assert len(numbers) == len(set(numbers)) == p["total"], "no duplicate trial numbers"
    assert sorted(numbers) == list(range(len(numbers)))
    finished = [t for t in trials if t["state"] in ("complete", "pruned")]
    assert len(finished) == n_trials
    for t in finished:
        m = t["metrics"]
        assert t["state"] == "complete", t  # pruner "none"
        assert 0.0 <= m["val_accuracy"] <= 1.0 and 0.0 <= m["test_accuracy"] <= 1.0, t
        assert t["values"] == [m["val_accuracy"]]
        assert len(m["history"]) == m["epochs_run"] == n_epochs, t["number"]
        assert 0 < t["n_params"] <= 3000
    by_number = {t["number"]: t for t in trials}
    for k in killed:
        assert by_number[k["number"]]["state"] == "failed", k["number"]
        # Its point was queued again: run since, or still waiting if the study filled first.
        again = [t for t in trials if t["number"] > k["number"] and t["params"] == k["params"]
                 and t["state"] in ("complete", "pruned", "waiting")]
        assert again, f"the point of killed trial {k['number']} ({k['params']}) was lost: " + repr(
            [(t["number"], t["state"], t["params"]) for t in trials])


def _kill_workers_mid_trial(api: Api, procs: Procs, name: str, workers: dict[int, subprocess.Popen[bytes]],
                            n_kills: int, restart: Any) -> list[dict[str, Any]]:
    """SIGKILL the worker of a training trial ``n_kills`` times, starting a new worker each time."""
    killed: list[dict[str, Any]] = []
    tries = 0
    while len(killed) < n_kills:
        tries += 1
        assert tries <= 3 * n_kills, f"only {len(killed)} of {n_kills} kills came mid-trial"

        def training() -> list[dict[str, Any]]:
            done = {k["number"] for k in killed}
            # params as well as n_params: on PostgreSQL a read of a trial that is being
            # written can see its attributes before its params (Optuna reads a trial's rows
            # in several statements, each at read committed)
            return [t for t in api.running(name)
                    if t["n_params"] and t["params"] and t["number"] not in done and _pid_of(t) in workers]

        victim = wait_for(training, 90, "a trial training on one of our workers", interval=0.05)[0]
        proc = workers.pop(_pid_of(victim))  # type: ignore[arg-type]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # The trial may have been told between the read and the kill (it trains in well under
        # a second): then this kill was not mid-trial. Its worker is dead, so nothing else can
        # finish the trial before the grace period passes: still running means killed mid-trial.
        if {t["number"] for t in api.running(name)} >= {victim["number"]}:
            killed.append(victim)
        new = restart()
        workers[new.pid] = new
        time.sleep(0.5)  # let the others make progress between kills
    return killed


@pytest.mark.parametrize("storage", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_five_kills_during_a_study_of_four_workers_lose_no_trial(
    storage: str, request: pytest.FixtureRequest, procs: Procs
) -> None:
    api: Api = request.getfixturevalue(f"{'pg' if storage == 'postgres' else 'sqlite'}_api")
    name = unique("kills")
    api.create(tiny_spec(name, n_trials=N_TRIALS, n_epochs=N_EPOCHS))

    def start() -> subprocess.Popen[bytes]:
        # Idle for longer than a killed worker's lease takes to go stale: a worker that has
        # nothing to do must still be there to fail the last victim's trial and run it again.
        return procs.worker(api.storage, "--studies", name, "--idle-exit", str(FAST_RETRY_STALE),
                            env=FAST_RETRY)

    workers = {w.pid: w for w in (start() for _ in range(N_WORKERS))}
    killed = _kill_workers_mid_trial(api, procs, name, workers, N_KILLS, start)
    assert len(killed) == N_KILLS
    assert api.study(name)["progress"]["finished"] < N_TRIALS, "the kills came mid-study"

    api.wait_done(name, 180)
    wait_for(lambda: api.study(name)["state"] == "done", 15, "the study to be marked done")
    for w in workers.values():
        assert procs.wait_exit(w, 60) == 0
        log = procs.log(w)
        assert "Traceback" not in log and "database is locked" not in log, log[-2000:]
    _assert_nothing_lost(api, name, N_TRIALS, N_EPOCHS, killed)
    if storage == "postgres":  # the database is shared between runs
        assert api.http.delete(f"/v1/studies/{name}").status_code == 204
