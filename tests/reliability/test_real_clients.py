"""Real clients on our database: Optuna's own CLI, `optuna-dashboard`, and headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from service_helpers import Api, Procs, free_port, tiny_spec, unique, wait_for

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
#: no network beyond loopback, no first-run or update traffic
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
N_TRIALS = 8
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


@dataclass
class Finished:
    api: Api
    name: str
    storage: str


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def finished(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    """A study launched by REST and finished by real workers."""
    procs = Procs(tmp_path_factory.mktemp(f"clients-{request.param}"))
    name = unique("clients")
    spec = tiny_spec(name, n_trials=N_TRIALS, n_epochs=3)
    try:
        if request.param == "sqlite":
            # The embedded default: the API with a local worker beside it.
            api = procs.serve(f"sqlite:///{procs.folder / 'clients.db'}", "--workers", "1", "--device", "cpu")
            api.create(spec)
        else:
            api = request.getfixturevalue("pg_api")
            api.create(spec)
            procs.worker(api.storage, "--studies", name, "--idle-exit", "2")
        api.wait_done(name, 120)
        yield Finished(api, name, api.storage)
        if request.param == "postgres":
            api.http.delete(f"/v1/studies/{name}")
    finally:
        procs.close()


def _optuna(*args: str) -> list[dict]:
    r = subprocess.run([str(BIN / "optuna"), *args, "-f", "json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_optunas_own_cli_lists_our_study_and_its_trials(finished: Finished) -> None:
    listed = {s["name"]: s for s in _optuna("studies", "--storage", finished.storage)}
    ours = listed[finished.name]
    assert ours["direction"] == ["MAXIMIZE"]
    assert ours["user_attrs"]["dendro.state"] == "done"
    assert ours["n_trials"] == finished.api.study(finished.name)["progress"]["total"]

    trials = _optuna("trials", "--study-name", finished.name, "--storage", finished.storage)
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    assert len(complete) == N_TRIALS
    ours_api = {t["number"]: t for t in finished.api.trials(finished.name)}
    for t in complete:
        assert t["value"]["val_accuracy"] == ours_api[t["number"]]["values"][0]
        assert t["params"] == ours_api[t["number"]]["params"]
        assert len(t["user_attrs"]["history"]) == 3


def test_optuna_dashboard_reads_our_database(finished: Finished, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "optuna-dashboard.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(BIN / "optuna-dashboard"), finished.storage, "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

        def studies() -> list[dict] | None:
            if proc.poll() is not None:
                raise AssertionError(f"optuna-dashboard exited: {log.read_text()[-3000:]}")
            try:
                return http.get("/api/studies").json()["study_summaries"]
            except httpx.TransportError:
                return None

        summaries = wait_for(studies, 60, "optuna-dashboard to answer")
        (ours,) = [s for s in summaries if s["study_name"] == finished.name]
        detail = http.get(f"/api/studies/{ours['study_id']}").json()
        assert len([t for t in detail["trials"] if t["state"] == "Complete"]) == N_TRIALS
        assert http.get("/dashboard").status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.browser
def test_the_dashboard_in_headless_chromium_shows_the_study_list_and_a_history_plot(
    finished: Finished, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")

    base = finished.api.base_url
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/dashboard")
            card = page.get_by_text(finished.name).first
            card.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "study-list.png"))

            card.click()
            page.wait_for_url("**/dashboard/studies/*", timeout=30_000)
            history = page.locator("#plot-history")
            history.wait_for(timeout=30_000)
            # Plotly has drawn one marker per finished trial.
            page.wait_for_function(
                "n => document.querySelectorAll('#plot-history .scatterlayer .point').length >= n",
                arg=N_TRIALS, timeout=30_000)
            assert "History" in page.inner_text("body")
            shot = tmp_path / "study-history.png"
            page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": 1400, "height": 900})
            assert not errors, errors
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000
    if os.environ.get("DENDRO_UPDATE_DOCS") == "1" and finished.storage.startswith("sqlite"):
        # Refreshes the README's picture on request only: tests leave the checkout alone.
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
