"""DELETE of a study that a worker keeps writing to: a 204 means it is gone.

Optuna deletes a study row by row and, when another process inserts a row of it meanwhile,
rolls back and returns as if it had deleted it. With a worker writing to the study that
happened on most deletes on SQLite, and now and then on PostgreSQL. ``studies.delete_study``
locks the study first and deletes it in one transaction, so a delete goes through even
while a writer never pauses.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import optuna
import pytest
from fastapi.testclient import TestClient
from service_helpers import FAST_RETRY, Api, Procs, tiny_spec, unique, wait_for

import studies
from service import Settings, create_app

pytestmark = pytest.mark.slow

#: what a training worker does, back to back: new rows of its trial. One process serves every
#: round (a trial id a line on stdin), as a long-lived worker does: starting the interpreter
#: (torch included) costs far more than a round.
WRITER = """
import sys, studies
storage = studies.open_storage(sys.argv[1])
for line in sys.stdin:
    trial_id, k = int(line), 0
    while True:
        try:
            storage.set_trial_user_attr(trial_id, f"k{k}", k)
            storage.record_heartbeat(trial_id)
        except Exception:
            break  # the trial is gone
        if k == 0:
            print("writing", flush=True)
        k += 1
    print(f"stopped after {k} writes", flush=True)
"""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def client_and_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[tuple[TestClient, str]]:
    url = (request.getfixturevalue("pg_url") if request.param == "postgres"
           else f"sqlite:///{tmp_path_factory.mktemp('race') / 'race.db'}")
    with TestClient(create_app(Settings(storage=url), dashboard=False)) as client:
        yield client, url


def test_a_delete_goes_through_and_is_complete_even_while_a_worker_writes_nonstop(
    client_and_url: tuple[TestClient, str]
) -> None:
    client, url = client_and_url
    storage = studies.open_storage(url)
    answers = []
    writer = subprocess.Popen([sys.executable, "-c", WRITER, url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdin is not None
    said = _lines_of(writer)

    try:
        for round_ in range(3):
            name = unique(f"race{round_}")
            assert client.post("/v1/studies", json=tiny_spec(name)).status_code == 201
            trial_id = optuna.load_study(study_name=name, storage=storage).ask()._trial_id
            writer.stdin.write(f"{trial_id}\n")
            writer.stdin.flush()
            assert said() == "writing"
            r = client.delete(f"/v1/studies/{name}")
            answers.append(r.status_code)
            assert r.status_code == 204, r.text
            with pytest.raises(KeyError):
                storage.get_study_id_from_name(name)
            assert said().startswith("stopped after "), "the writer's next write fails: its trial is gone"
            assert client.get(f"/v1/studies/{name}").status_code == 404
            _assert_no_orphans(storage)
        writer.stdin.close()
        assert writer.wait(30) == 0
    finally:
        writer.kill()
        writer.wait(10)
    print(f"\nDELETE answers with a worker writing: {answers}")


def _lines_of(proc: subprocess.Popen[str]) -> Callable[[], str]:
    """A reader of ``proc``'s output lines that fails, rather than hangs, when it goes quiet."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()

    def said() -> str:
        try:
            return lines.get(timeout=120)
        except queue.Empty:
            raise AssertionError(f"the writer said nothing for 120s (exit code {proc.poll()})") from None

    return said


def _assert_no_orphans(storage: optuna.storages.RDBStorage) -> None:
    """Not a row of a deleted study is left behind, in any table."""
    with storage.engine.connect() as con:
        orphans = {
            t: con.exec_driver_sql(
                f"SELECT count(*) FROM {t} WHERE trial_id NOT IN (SELECT trial_id FROM trials)"
            ).scalar()
            for t in ("trial_user_attributes", "trial_heartbeats", "trial_params", "trial_values")
        }
        orphans["trials"] = con.exec_driver_sql(
            "SELECT count(*) FROM trials WHERE study_id NOT IN (SELECT study_id FROM studies)").scalar()
    assert set(orphans.values()) == {0}, orphans


@pytest.mark.parametrize("storage", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_study_deleted_under_two_training_workers_is_gone_and_the_workers_go_on(
    storage: str, request: pytest.FixtureRequest, procs: Procs
) -> None:
    api: Api = request.getfixturevalue(f"{'pg' if storage == 'postgres' else 'sqlite'}_api")
    name = unique("delrun")
    api.create(tiny_spec(name, n_trials=50, n_epochs=3))
    workers = [procs.worker(api.storage, "--studies", name, "--idle-exit", "2", env=FAST_RETRY)
               for _ in range(2)]
    wait_for(lambda: api.study(name)["progress"]["finished"] >= 1 and len(api.running(name)) >= 2, 90,
             "the workers to be training")
    r = api.http.delete(f"/v1/studies/{name}")
    assert r.status_code == 204, r.text
    assert api.http.get(f"/v1/studies/{name}").status_code == 404
    with pytest.raises(KeyError):
        studies.open_storage(api.storage).get_study_id_from_name(name)
    for w in workers:
        assert procs.wait_exit(w, 60) == 0, "the workers carry on (and, idle, exit)"


def test_a_delete_that_cannot_get_the_study_in_time_is_a_409_and_changes_nothing(
    client_and_url: tuple[TestClient, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another transaction holds the study (a long write): 409 after the wait, study intact."""
    import sqlalchemy as sa

    import service.routes.studies as routes

    client, url = client_and_url
    monkeypatch.setattr(routes, "_DELETE_SECONDS", 1.0)
    name = unique("held")
    assert client.post("/v1/studies", json=tiny_spec(name)).status_code == 201
    holder = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with holder.connect() as con:
        if con.dialect.name == "postgresql":  # what a worker's insert of a trial holds
            con.exec_driver_sql("SELECT 1 FROM studies WHERE study_name = %(n)s FOR KEY SHARE", {"n": name})
        else:  # a writer in the middle of its transaction
            con.exec_driver_sql("UPDATE studies SET study_name = study_name WHERE study_name = ?", (name,))
        r = client.delete(f"/v1/studies/{name}")
        con.rollback()
    holder.dispose()
    assert r.status_code == 409, r.text
    assert name in r.json()["detail"] and "retry" in r.json()["detail"]
    assert client.get(f"/v1/studies/{name}").status_code == 200  # nothing half-deleted
    assert client.get(f"/v1/studies/{name}/trials").status_code == 200
    assert client.delete(f"/v1/studies/{name}").status_code == 204  # released: it goes
