"""POST /v1/studies/{name}/finalize: 202 and a real worker's answer under `final`; every 4xx path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from service_helpers import tiny_spec, unique, wait_for

import studies
from service import create_app
from service._settings import Settings

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'f.db'}"


@pytest.fixture
def client(url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(storage=url, api_token=TOKEN, data_dir=tmp_path, max_epochs=50)
    with TestClient(create_app(settings, dashboard=False)) as c:
        yield c


def _study(url: str, name: str, complete: int = 1) -> optuna.Study:
    """A dendro study with ``complete`` told trials (values only: enough to ask for a finalize)."""
    study = studies.create_study(studies.StudySpec.model_validate(tiny_spec(name)), url)
    for v in range(complete):
        t = study.ask()
        t.set_user_attr("n_params", 1000 + v)
        study.tell(t, 0.5 + 0.1 * v)
    return study


def test_finalize_answers_202_with_the_queued_request_and_get_shows_it(client: TestClient, url: str) -> None:
    _study(url, "q1")
    r = client.post("/v1/studies/q1/finalize", json={"top_n": 2, "seeds": 2, "n_epochs": 1}, headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["state"] == "queued" and (body["top_n"], body["seeds"], body["n_epochs"]) == (2, 2, 1)
    final = client.get("/v1/studies/q1").json()["final"]
    assert final["state"] == "queued" and final["requested_at"] == body["requested_at"]


def test_an_empty_body_takes_the_defaults(client: TestClient, url: str) -> None:
    _study(url, "d1")
    r = client.post("/v1/studies/d1/finalize", headers=AUTH)
    assert r.status_code == 202, r.text
    assert (r.json()["top_n"], r.json()["seeds"], r.json()["n_epochs"]) == (3, 3, 2)  # tiny_spec: 2 epochs


def test_a_study_without_finalize_shows_final_null(client: TestClient, url: str) -> None:
    _study(url, "n1")
    assert client.get("/v1/studies/n1").json()["final"] is None


def test_unknown_study_is_404(client: TestClient) -> None:
    r = client.post("/v1/studies/nope/finalize", json={}, headers=AUTH)
    assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_without_the_token_it_is_401(client: TestClient, url: str) -> None:
    _study(url, "a1")
    assert client.post("/v1/studies/a1/finalize", json={}).status_code == 401
    assert client.post("/v1/studies/a1/finalize", json={}, headers={"Authorization": "Bearer no"}).status_code == 401
    assert client.get("/v1/studies/a1").json()["final"] is None, "a refused request stores nothing"


def test_no_complete_trial_is_409(client: TestClient, url: str) -> None:
    _study(url, "c0", complete=0)
    r = client.post("/v1/studies/c0/finalize", json={}, headers=AUTH)
    assert r.status_code == 409 and "no complete trial" in r.json()["detail"]


def test_a_finalize_already_queued_is_409(client: TestClient, url: str) -> None:
    _study(url, "c2")
    assert client.post("/v1/studies/c2/finalize", json={}, headers=AUTH).status_code == 202
    r = client.post("/v1/studies/c2/finalize", json={}, headers=AUTH)
    assert r.status_code == 409 and "queued already" in r.json()["detail"]


@pytest.mark.parametrize(("body", "field"), [
    ({"top_n": 0}, "top_n"),
    ({"seeds": -1}, "seeds"),
    ({"n_epochs": 0}, "n_epochs"),
    ({"n_epochs": 51}, "n_epochs"),  # over the server's max_epochs
    ({"top_n": "many"}, "top_n"),
    ({"epochs": 3}, "epochs"),  # unknown field
])
def test_bad_values_are_422_naming_the_field(client: TestClient, url: str, body: dict[str, Any], field: str) -> None:
    _study(url, "v1")
    r = client.post("/v1/studies/v1/finalize", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    text = r.text
    assert field in text, text
    assert client.get("/v1/studies/v1").json()["final"] is None


def test_the_cli_queues_a_finalize_or_runs_it_here_with_local(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import core
    from service.cli import main
    from studies import _finalize

    _study(url, "cli1", complete=2)
    assert main(["study", "finalize", "cli1", "--storage", url, "--top-n", "2"]) == 0
    assert "finalize queued (top 2 x 3 seeds x 2 epochs); a worker runs it" in capsys.readouterr().out
    assert main(["study", "finalize", "cli1", "--storage", url]) == 2
    assert "queued already" in capsys.readouterr().err
    assert main(["study", "finalize", "cli1", "--storage", url, "--seeds", "0"]) == 2
    assert "seeds: must be an integer >= 1" in capsys.readouterr().err

    def fake(model: str, configs: list[dict[str, Any]], *a: Any, **k: Any) -> list[core.TrainResult]:
        return [core.TrainResult(history=[{"val_accuracy": 0.9, "test_accuracy": 0.891 + 0.002 * (i % 2),
                                           "val_loss": 0.3, "test_loss": 0.3}]) for i in range(len(configs))]

    monkeypatch.setattr(_finalize.core, "train_population", fake)
    _study(url, "cli2", complete=2)
    assert main(["study", "finalize", "cli2", "--storage", url, "--local", "--seeds", "2", "--n-epochs", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("final: test 89.20% ± 0.14 (val 90.00%), trial 1, 1,001 params, mean of 2 seeds x 1 "
                          "epochs over the top 3"), out


@pytest.mark.slow
def test_a_real_worker_runs_the_finalize_and_get_shows_the_answer(client: TestClient, url: str, tmp_path: Path) -> None:
    name = unique("fin")
    created = client.post("/v1/studies", json=tiny_spec(name, n_trials=3, n_epochs=2), headers=AUTH)
    assert created.status_code == 201, created.text
    env = {k: v for k, v in os.environ.items() if not k.startswith("DENDRO_")}
    log = tmp_path / "worker.log"
    with open(log, "wb") as fh:
        worker = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--storage", url, "--device", "cpu",
             "--data-dir", str(tmp_path), "--idle-exit", "20"],
            cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    try:
        def done() -> bool:
            s = client.get(f"/v1/studies/{name}").json()
            return s["progress"]["finished"] >= 3 and s["progress"]["running"] == 0

        wait_for(done, 60, f"the worker to finish the trials of {name}", interval=0.25)
        r = client.post(f"/v1/studies/{name}/finalize", json={"top_n": 2, "seeds": 2, "n_epochs": 1}, headers=AUTH)
        assert r.status_code == 202, r.text

        def final() -> dict[str, Any] | None:
            f = client.get(f"/v1/studies/{name}").json()["final"]
            assert worker.poll() is None, log.read_text()[-3000:]
            return f if f and f["state"] in ("done", "error") else None

        f = wait_for(final, 60, f"the worker to finalize {name}", interval=0.25)
        assert f["state"] == "done", f
        trials = client.get(f"/v1/studies/{name}/trials", params={"state": "complete"}).json()["data"]
        by_val = sorted(trials, key=lambda t: (-t["values"][0], t["number"]))
        assert [c["trial"] for c in f["candidates"]] == [t["number"] for t in by_val[:2]]
        assert f["trial"] in {t["number"] for t in by_val[:2]}
        for key in ("test_accuracy_mean", "test_accuracy_std", "val_accuracy_mean", "n_params", "params"):
            assert f[key] is not None, key
        assert f["mode"] == "population" and (f["seeds"], f["n_epochs"], f["top_n"]) == (2, 1, 2)
        assert "finalized trial" in log.read_text()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_shows_the_final_answer_and_a_queued_one(tmp_path: Path) -> None:
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    from service_helpers import Procs
    from test_page import CHROMIUM_ARGS, OUTSIDE

    procs = Procs(tmp_path)
    url = f"sqlite:///{tmp_path / 'page.db'}"
    try:
        api = procs.serve(url)
        done, queued = unique("final"), unique("queued")
        api.create(tiny_spec(done))
        api.create(tiny_spec(queued))
        s = optuna.load_study(study_name=done, storage=url)
        s.set_user_attr(studies.FINAL_ATTR, {
            "state": "done", "trial": 12, "n_params": 7600, "params": {}, "test_accuracy_mean": 0.8912,
            "test_accuracy_std": 0.0021, "val_accuracy_mean": 0.9, "val_accuracy_std": 0.001,
            "seeds": 3, "n_epochs": 10, "top_n": 3})
        q = optuna.load_study(study_name=queued, storage=url)
        q.set_user_attr(studies.FINALIZE_ATTR, {"state": "queued", "top_n": 2, "seeds": 3, "n_epochs": 5,
                                                "requested_at": 1.0})
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.route(OUTSIDE, lambda route: route.abort())
                page.goto(f"{api.base_url}/")
                page.wait_for_function("Number(document.body.dataset.refreshes || 0) >= 1", timeout=30_000)
                a, b = f"article[data-study='{done}'] .study-final", f"article[data-study='{queued}'] .study-final"
                assert page.locator(a).text_content() == "final: test 89.1% ± 0.2 (trial 12, 7,600 params)"
                assert page.locator(b).text_content() == "final: queued (top 2 × 3 seeds × 5 epochs)"
                assert not errors, errors
            finally:
                browser.close()
    finally:
        procs.close()


@pytest.mark.postgres
def test_on_postgresql_one_worker_takes_a_request_and_rest_shows_it(pg_url: str, tmp_path: Path) -> None:
    from studies import _finalize

    name = unique("pgfin")
    study = _study(pg_url, name)
    try:
        settings = Settings(storage=pg_url, api_token=TOKEN, data_dir=tmp_path)
        with TestClient(create_app(settings, dashboard=False)) as c:
            assert c.post(f"/v1/studies/{name}/finalize", json={"top_n": 1}, headers=AUTH).status_code == 202
            assert c.post(f"/v1/studies/{name}/finalize", json={}, headers=AUTH).status_code == 409
            assert _finalize.take_finalize(study, "w1") is not None
            assert _finalize.take_finalize(study, "w2") is None
            final = c.get(f"/v1/studies/{name}").json()["final"]
            assert final["state"] == "running" and final["worker"] == "w1"
    finally:
        studies.delete_study(study._storage, name)
