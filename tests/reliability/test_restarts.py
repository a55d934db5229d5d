"""PostgreSQL and the API restarted under a running study: everyone reconnects, nothing is lost."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from service_helpers import FAST_RETRY, SLOW_EPOCHS, Api, Procs, tiny_spec, unique, wait_for

import studies

pytestmark = pytest.mark.slow

N_TRIALS, N_EPOCHS = 6, 8


def _finished(api: Api, name: str) -> dict[int, dict[str, Any]]:
    return {t["number"]: t for t in api.trials(name, history=True) if t["state"] in ("complete", "pruned")}


def _assert_clean_503(r: Any, what: str) -> None:
    assert r.status_code == 503, (what, r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), (what, r.text[:500])
    assert "database is unavailable" in r.json()["detail"], what
    assert r.headers.get("retry-after") == "5", what
    for leak in ("Traceback", "psycopg", "sqlalchemy", "OperationalError", "127.0.0.1:5432"):
        assert leak not in r.text, (what, leak, r.text[:500])


@pytest.mark.postgres
def test_postgres_restarted_mid_study_workers_and_api_reconnect_and_the_study_completes(
    pg_url: str, pg_control: Callable[[str], None], procs: Procs
) -> None:
    api = procs.serve(pg_url, env=FAST_RETRY)
    name = unique("pgrestart")
    api.create(tiny_spec(name, n_trials=N_TRIALS, n_epochs=N_EPOCHS))
    workers = [procs.worker(pg_url, "--studies", name, "--idle-exit", "5", env=FAST_RETRY) for _ in range(2)]
    wait_for(lambda: api.study(name)["progress"]["finished"] >= 1 and api.running(name), 90,
             "a finished trial and one training")
    before = _finished(api, name)

    pg_control("stop")
    down_at = time.monotonic()
    try:
        # While it is down, every endpoint that needs it answers a clean 503, over and over.
        checks = 0
        while time.monotonic() - down_at < 6:
            for method, path in [
                ("GET", "/healthz"), ("GET", "/v1/studies"), ("GET", f"/v1/studies/{name}"),
                ("GET", f"/v1/studies/{name}/trials"), ("GET", f"/v1/studies/{name}/best"),
                ("GET", f"/v1/studies/{name}/export"), ("GET", f"/v1/studies/{name}/export?format=csv"),
                ("POST", f"/v1/studies/{name}/stop"), ("GET", "/v1/workers"), ("GET", "/api/studies"),
            ]:
                _assert_clean_503(api.http.request(method, path), f"{method} {path}")
                checks += 1
            r = api.http.post("/v1/studies", json=tiny_spec(unique("while-down")))
            _assert_clean_503(r, "POST /v1/studies")
            time.sleep(0.5)
        assert all(w.poll() is None for w in workers), "the workers wait for the database, they do not exit"
    finally:
        pg_control("start")

    # The same API process answers again without a restart of its own.
    wait_for(lambda: api.http.get("/healthz").status_code == 200, 30, "the API to reconnect")
    done = api.wait_done(name, 150)
    wait_for(lambda: api.study(name)["state"] == "done", 15, "the study to be marked done")
    assert done["progress"]["finished"] == N_TRIALS and done["progress"]["running"] == 0
    after = _finished(api, name)
    assert len(after) == N_TRIALS
    assert all(after[n] == t for n, t in before.items()), "what was finished before is unchanged"
    for w in workers:
        assert procs.wait_exit(w, 60) == 0
    logs = [procs.log(w) for w in workers]
    assert any("database unavailable" in log and "retrying" in log for log in logs), \
        "a worker met the outage and backed off"
    assert checks >= 50
    server_log = api.log_text()
    assert "Traceback" not in server_log, server_log[-3000:]
    assert api.http.delete(f"/v1/studies/{name}").status_code == 204


@pytest.mark.parametrize("storage", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_api_killed_and_restarted_mid_study_serves_the_same_state(
    storage: str, request: pytest.FixtureRequest, procs: Procs
) -> None:
    url = request.getfixturevalue("pg_url") if storage == "postgres" else f"sqlite:///{procs.folder / 'restart.db'}"
    api = procs.serve(url)
    name = unique("apirestart")
    # Trials of at least 0.8 s (SLOW_EPOCHS), 10 of them: the study is still going when the API
    # is killed after the first two, whatever the machine's speed (short trials, asked a few at
    # a time, could all have finished by then).
    n_trials = 10
    created = api.create(tiny_spec(name, n_trials=n_trials, n_epochs=N_EPOCHS))
    workers = [procs.worker(url, "--studies", name, "--idle-exit", "3", env=SLOW_EPOCHS) for _ in range(2)]
    wait_for(lambda: api.study(name)["progress"]["finished"] >= 2, 90, "two finished trials")
    before = _finished(api, name)

    os.killpg(api.proc.pid, signal.SIGKILL)
    api.proc.wait(10)
    # The workers carry on without it: trials keep finishing in the database.
    study, _ = studies.load_study(name, url)
    at_kill = studies.progress(study)["finished"]
    wait_for(lambda: studies.progress(study)["finished"] > at_kill, 60,
             "a trial to finish while the API is down")

    again = procs.serve(url)
    assert again.base_url != api.base_url
    now = again.study(name)
    for key in ("name", "n_trials", "directions", "objectives", "spec"):
        assert now[key] == created[key], key
    after = _finished(again, name)
    assert all(after[n] == t for n, t in before.items()), "the same finished trials, unchanged"
    assert len(after) > len(before)

    done = again.wait_done(name, 120)
    assert done["progress"]["finished"] == n_trials and done["progress"]["running"] == 0
    for w in workers:
        assert procs.wait_exit(w, 60) == 0
        assert "Traceback" not in procs.log(w)
    # What the new API shows is what the storage holds.
    counts = studies.progress(studies.load_study(name, url)[0])
    assert {k: counts[k] for k in done["progress"]} == done["progress"]
    if storage == "postgres":
        assert again.http.delete(f"/v1/studies/{name}").status_code == 204
