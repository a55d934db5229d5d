"""Our page at /: studies, budgets, families, states, workers and the accuracy-against-size plot.

A real `dendro serve` on SQLite; trials and a worker's beat are written into the same database
the way workers write them, so the page shows a known picture without minutes of training.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import optuna
import pytest
import sqlalchemy as sa
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial
from service_helpers import Api, Procs, tiny_spec, unique

import studies
from service._workers_table import WorkerRegistry

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
#: what a machine without internet cannot reach: anything but loopback (and inline data)
OUTSIDE = re.compile(r"^(?!http://127\.0\.0\.1[:/]|data:|blob:).*")
WORKER = "page-worker-1"


@dataclass
class Served:
    api: Api
    url: str
    budget: str  # a study with a budget of 3,000 and a few trials
    pareto: str  # a two-objective study with a budget of 5,000 and none yet
    running_trial: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    procs = Procs(tmp_path_factory.mktemp("page"))
    url = f"sqlite:///{procs.folder / 'page.db'}"
    try:
        api = procs.serve(url)
        budget, pareto = unique("budget"), unique("pareto")
        api.create(tiny_spec(budget, n_trials=6))
        api.create(tiny_spec(pareto, max_params=5000, objective=["val_accuracy", "n_params"]))

        study = optuna.load_study(study_name=budget, storage=url)
        dist = {"n_neurons": IntDistribution(4, 10)}
        for n, (size, acc) in enumerate([(900, 0.80), (1500, 0.88), (2400, 0.86)]):
            study.add_trial(create_trial(params={"n_neurons": 4 + n}, distributions=dist, value=acc,
                                         user_attrs={"n_params": size, "val_accuracy": acc}))
        # Over the budget: never trained, told as pruned and marked (as the budget gate does).
        study.add_trial(create_trial(params={"n_neurons": 10}, distributions=dist, state=TrialState.PRUNED,
                                     user_attrs={"n_params": 4200, "infeasible": True, "reason": "over budget"}))
        running = study.ask()
        running.set_user_attr("n_params", 1200)
        running.report(0.5, 0)
        running.report(0.7, 1)

        workers = WorkerRegistry(sa.create_engine(url))
        workers.register(WORKER, "gpu-box", 4242, "cuda:0")
        workers.beat(WORKER, state="training", study_name=budget, trial_number=running.number, trials_done=3)
        yield Served(api, url, budget, pareto, running.number)
    finally:
        procs.close()


def test_the_page_and_its_assets_come_from_this_server(served: Served) -> None:
    http = served.api.http
    r = http.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", r.text)
    assert "/assets/vendor/plotly.min.js" in urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        assert http.get(url).status_code == 200, url
    # plotly.js is the installed package's own copy, not a CDN's.
    import plotly

    shipped = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert http.get("/assets/vendor/plotly.min.js").content == shipped.read_bytes()
    # The dashboard stays where it was.
    assert http.get("/dashboard").status_code == 200


def test_the_page_loads_without_the_token_when_reads_need_it(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service import Settings, create_app

    settings = Settings(storage=f"sqlite:///{tmp_path / 'closed.db'}", api_token="page-token-0123456789",
                        read_requires_token=True)
    with TestClient(create_app(settings)) as client:
        # The page holds no data: it loads, then asks for the token that the API wants.
        for path in ("/", "/assets/page/page.js", "/assets/vendor/plotly.min.js", "/v1/docs"):
            assert client.get(path).status_code == 200, path
        assert client.get("/v1/studies").status_code == 401
        assert client.get("/v1/studies", headers={"Authorization": "Bearer page-token-0123456789"}).status_code == 200


def test_a_study_created_by_rest_carries_its_spec_as_a_dashboard_note(served: Served) -> None:
    http = served.api.http
    study_id = served.api.study(served.budget)["study_id"]
    note = http.get(f"/api/studies/{study_id}").json()["note"]
    assert note["version"] == 1
    body = note["body"]
    for text in ("`dendritic_simple`", "`digits`", "3,000 parameters", "maximize val_accuracy", "`random`",
                 "`none`", "| n_trials | 6 |", "| n_epochs | 2 |", "`n_dendrites` | int 2 to 6",
                 "`lr` | float 0.001 to 0.03 (log scale)"):
        assert text in body, (text, body)
    # The same note through optuna-dashboard's Python API.
    from optuna_dashboard import get_note

    assert get_note(optuna.load_study(study_name=served.pareto, storage=served.url)).count(
        "maximize val_accuracy, minimize n_params") == 1


def test_write_spec_note_replaces_the_note_with_a_new_version() -> None:
    from optuna_dashboard import get_note

    spec = studies.StudySpec.model_validate(tiny_spec("noted"))
    study = optuna.create_study(study_name="noted", directions=spec.directions)
    studies.write_spec_note(study, spec)
    studies.write_spec_note(study, spec.model_copy(update={"n_trials": 9}))
    assert "| n_trials | 9 |" in get_note(study) and "| n_trials | 3 |" not in get_note(study)


def _text(page: object, selector: str) -> str:
    # textContent: the plot is SVG, which has no innerText
    return " ".join((page.locator(selector).text_content() or "").split())  # type: ignore[attr-defined]


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_in_chromium_shows_studies_budgets_workers_and_refreshes_itself(
    served: Served, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    api, budget, pareto = served.api, served.budget, served.pareto
    study_id = api.study(budget)["study_id"]
    requested: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda req: requested.append(req.url))
            page.route(OUTSIDE, lambda route: route.abort())
            page.goto(f"{api.base_url}/")
            page.wait_for_function("Number(document.body.dataset.refreshes || 0) >= 1", timeout=30_000)

            a, b = f"article[data-study='{budget}']", f"article[data-study='{pareto}']"
            assert _text(page, f"{a} .state") == "running"
            assert _text(page, f"{a} .fact-budget") == "3,000 params"
            assert _text(page, f"{a} .fact-family") == "dendritic_simple"
            assert _text(page, f"{a} .fact-best") == "0.88 val_accuracy (trial #1, 1,500 params)"
            assert _text(page, f"{a} .label").startswith("3 / 6 finished · 1 running · 1 over budget")
            assert page.get_attribute(f"{a} .bar", "aria-valuenow") == "3"
            assert page.get_attribute(f"{a} a.dashboard-link", "href") == f"/dashboard/studies/{study_id}"
            assert _text(page, f"{b} .fact-budget") == "5,000 params"
            assert _text(page, f"{b} .fact-objective") == "maximize val_accuracy, minimize n_params"
            assert "No trained trial yet" in _text(page, f"{b} .plot")

            # The plot: 3 trained points, the over-budget one on the floor, the front, the budget line.
            legend = _text(page, f"{a} .plot .legend")
            for name in ("complete", "over budget (not trained)", "Pareto front", "best (trial #1)"):
                assert name in legend, legend
            assert "budget 3,000" in _text(page, f"{a} .plot .annotation")
            assert page.locator(f"{a} .plot .scatterlayer .trace:first-child .point").count() == 3

            row = f"tr[data-worker='{WORKER}']"
            assert budget in _text(page, row) and "cuda:0" in _text(page, row) and "gpu-box:4242" in _text(page, row)
            assert _text(page, f"{row} .trial") == f"#{served.running_trial} (epoch 2 of 2)"
            assert re.fullmatch(r"\d+ s ago", _text(page, f"{row} .beat"))
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            # Without a reload: a finished trial, a stop, an error and a deletion show up.
            study = optuna.load_study(study_name=budget, storage=served.url)
            study.add_trial(create_trial(params={"n_neurons": 7}, distributions={"n_neurons": IntDistribution(4, 10)},
                                         value=0.93, user_attrs={"n_params": 2000, "val_accuracy": 0.93}))
            assert api.http.post(f"/v1/studies/{budget}/stop").status_code == 200
            studies.set_study_error(optuna.load_study(study_name=pareto, storage=served.url),
                                    "dataset 'npz:/gone.npz' is missing")
            page.wait_for_function(
                """([a, b]) => document.querySelector(a + ' .label').textContent.startsWith('4 / 6 finished')
                   && document.querySelector(a + ' .state').textContent === 'stopped'
                   && document.querySelector(b + ' .state').textContent === 'error'""",
                arg=[a, b], timeout=15_000)
            assert _text(page, f"{a} .fact-best") == "0.93 val_accuracy (trial #5, 2,000 params)"
            assert page.locator(f"{b} .study-error").is_visible()
            assert _text(page, f"{b} .study-error") == "error: dataset 'npz:/gone.npz' is missing"
            assert api.http.delete(f"/v1/studies/{pareto}").status_code == 204
            page.locator(b).wait_for(state="detached", timeout=15_000)
            assert not errors, errors
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 20_000
    assert requested
    outside = [u for u in requested if not u.startswith(("data:", "blob:")) and urlparse(u).hostname != "127.0.0.1"]
    assert not outside, outside
