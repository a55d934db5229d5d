"""A trial that diverges or runs out of memory fails with its reason; the worker and the study go on."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import optuna
import pytest
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

pytestmark = pytest.mark.slow

OOM_TRIAL = 2
#: epochs of the population kill: a population of four trains them together in a few seconds,
#: which is long enough to be caught (and killed) mid-population
POP_EPOCHS = 15


def test_a_diverging_trial_and_an_out_of_memory_trial_fail_with_their_reason_and_the_worker_goes_on(
    sqlite_api: Api, procs: Procs
) -> None:
    api, name = sqlite_api, unique("faults")
    api.create(tiny_spec(name, n_trials=4, n_epochs=3))
    # A point whose loss turns non-finite in its first epoch, queued before any worker runs:
    # it is trial 0.
    optuna.load_study(study_name=name, storage=api.storage).enqueue_trial({"lr": 1e30})
    worker = procs.worker(api.storage, "--studies", name, "--idle-exit", "2",
                          env={"DENDRO_FAULT_OOM_TRIALS": f"[{OOM_TRIAL}]"})
    done = api.wait_done(name, 120)
    assert procs.wait_exit(worker, 30) == 0, "one worker ran every trial and exited cleanly"

    p = done["progress"]
    assert p["finished"] == 4 and p["failed"] == 2 and p["running"] == 0 and p["total"] == 6
    trials = {t["number"]: t for t in api.trials(name)}
    diverged, oom = trials[0], trials[OOM_TRIAL]
    assert diverged["params"]["lr"] == 1e30
    assert diverged["state"] == "failed"
    assert diverged["fail_reason"].startswith("training loss became non-finite"), diverged["fail_reason"]
    assert oom["state"] == "failed"
    assert oom["fail_reason"].startswith("out of memory on cpu:"), oom["fail_reason"]
    assert "injected by DENDRO_FAULT_OOM_TRIALS" in oom["fail_reason"]
    assert oom["metrics"].get("epochs_run") is None, "stopped inside training, never told as trained"
    others = [t for n, t in trials.items() if n not in (0, OOM_TRIAL)]
    assert [t["state"] for t in others] == ["complete"] * 4
    assert all(t["fail_reason"] is None for t in others)
    # The same worker process went on after each fault.
    assert {t["metrics"]["worker"] for t in trials.values() if "worker" in t["metrics"]} == \
        {f"{os.uname().nodename}:{worker.pid}"}
    log = procs.log(worker)
    assert "fault injection: trials [2] will raise out-of-memory" in log
    assert "Traceback" not in log, log[-3000:]


def test_the_fault_hook_is_off_by_default() -> None:
    from service import Settings
    from service.worker import WorkerConfig

    assert Settings().fault_oom_trials == []
    assert WorkerConfig(storage="sqlite:///x.db").oom_trials == frozenset()
    assert Settings().fault_epoch_seconds == 0.0
    assert WorkerConfig(storage="sqlite:///x.db").epoch_seconds == 0.0


def test_a_population_worker_killed_mid_population_still_ends_with_exactly_n_trials(
    sqlite_api: Api, procs: Procs
) -> None:
    api, name = sqlite_api, unique("popkill")
    n_trials = 10
    api.create(tiny_spec(name, n_trials=n_trials, n_epochs=POP_EPOCHS))
    # each epoch at least 0.1 s: the population is caught mid-training
    doomed = procs.worker(api.storage, "--studies", name, "--population", "4", env={**FAST_RETRY, **SLOW_EPOCHS})

    def members_training() -> list[dict[str, Any]]:
        running = [t for t in api.running(name) if t["n_params"]]
        return running if len(running) >= 2 else []

    members = wait_for(members_training, 90, "a population training", interval=0.05)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(10)
    assert api.study(name)["progress"]["finished"] < n_trials, "killed mid-study"

    # The rescuer starts once the dead lease is stale: its first ask fails the killed members.
    time.sleep(FAST_RETRY_STALE)
    rescuer = procs.worker(api.storage, "--studies", name, "--population", "4", "--idle-exit", "3",
                           env=FAST_RETRY)
    api.wait_done(name, 150)
    assert procs.wait_exit(rescuer, 60) == 0
    assert "Traceback" not in procs.log(rescuer)
    study = wait_for(lambda: (s := api.study(name))["state"] == "done" and s, 15, "the study to be done")
    p = study["progress"]
    assert p["finished"] == n_trials and p["running"] == 0
    trials = api.trials(name)
    numbers = [t["number"] for t in trials]
    assert len(numbers) == len(set(numbers))
    by_number = {t["number"]: t for t in trials}
    for m in members:
        assert by_number[m["number"]]["state"] == "failed", "the killed members were failed, not left RUNNING"
    finished = [t for t in trials if t["state"] in ("complete", "pruned")]
    assert len(finished) == n_trials
    assert all(t["metrics"]["epochs_run"] == POP_EPOCHS for t in finished if t["state"] == "complete")
