"""A study's life through the REST API, finished by two real workers on SQLite and on PostgreSQL."""

from __future__ import annotations

import csv
import io
import itertools
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from service_helpers import Api, Procs, tiny_spec, unique, wait_for

import core

pytestmark = pytest.mark.slow

N_NEURONS, N_DENDRITES = [4, 6, 8], [2, 3]
GRID = {"n_neurons": N_NEURONS, "n_dendrites": N_DENDRITES, "n_dendrite_inputs": [8], "lr": [0.01]}
N_TRIALS = len(N_NEURONS) * len(N_DENDRITES)  # the whole grid


@dataclass
class Finished:
    api: Api
    name: str
    created: dict[str, Any]
    worker_pids: list[int]
    exit_codes: list[int | None]
    logs: list[str]
    seen_workers: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def finished(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    """A grid study launched by REST and run to the end by two workers racing for its trials."""
    api: Api = request.getfixturevalue("pg_api" if request.param == "postgres" else "sqlite_api")
    procs = Procs(tmp_path_factory.mktemp(f"lifecycle-{request.param}"))
    try:
        name = unique("life")
        created = api.create(tiny_spec(name, sampler="grid", pruner="median", n_trials=N_TRIALS,
                                       n_epochs=3, search_space=GRID))
        workers = [procs.worker(api.storage, "--studies", name, "--idle-exit", "2") for _ in range(2)]
        out = Finished(api, name, created, [w.pid for w in workers], [], [])

        def done() -> bool:
            r = api.http.get("/v1/workers")
            if r.status_code == 200:
                seen = {w["pid"] for w in out.seen_workers}
                out.seen_workers += [w for w in r.json()["data"]
                                     if w["pid"] in out.worker_pids and w["pid"] not in seen]
            p = api.study(name)["progress"]
            return p["finished"] >= N_TRIALS and p["running"] == 0

        wait_for(done, 120, f"two workers to finish {name}", interval=0.25)
        out.exit_codes = [procs.wait_exit(w, 30) for w in workers]
        out.logs = [procs.log(w) for w in workers]
        yield out
    finally:
        procs.close()


def _finished_trials(f: Finished) -> list[dict[str, Any]]:
    return [t for t in f.api.trials(f.name) if t["state"] in ("complete", "pruned")]


def test_launch_answers_201_with_the_running_study(finished: Finished) -> None:
    c = finished.created
    assert c["name"] == finished.name
    assert c["state"] == "running"
    assert c["n_trials"] == N_TRIALS
    assert c["progress"]["total"] == 0
    assert c["spec"]["dataset"] == "digits" and c["spec"]["sampler"] == "grid"
    assert c["directions"] == ["maximize"] and c["objectives"] == ["val_accuracy"]


def test_workers_finish_exactly_n_trials_and_leave_none_running(finished: Finished) -> None:
    s = finished.api.study(finished.name)
    p = s["progress"]
    assert s["state"] == "done"
    assert p["finished"] == p["complete"] + p["pruned"] == N_TRIALS
    assert p["running"] == 0 and p["waiting"] == 0 and p["failed"] == 0
    assert p["total"] == N_TRIALS
    assert finished.exit_codes == [0, 0], "workers with --idle-exit exit 0 once the study is done"


def test_two_workers_share_the_trials_without_running_a_grid_point_twice(finished: Finished) -> None:
    trials = _finished_trials(finished)
    points = [(t["params"]["n_neurons"], t["params"]["n_dendrites"]) for t in trials]
    assert sorted(points) == sorted(itertools.product(N_NEURONS, N_DENDRITES))
    by_worker = {t["metrics"].get("worker") for t in trials}
    assert len(by_worker) >= 1 and None not in by_worker


def test_workers_never_meet_a_locked_database(finished: Finished) -> None:
    for log in [*finished.logs, finished.api.log_text()]:
        assert "database is locked" not in log


def test_no_trial_raises_in_the_workers(finished: Finished) -> None:
    for log in finished.logs:
        assert "Traceback" not in log


def test_workers_endpoint_shows_the_live_workers(finished: Finished) -> None:
    assert finished.seen_workers, "GET /v1/workers never listed a running worker"
    for w in finished.seen_workers:
        assert w["device"] == "cpu" and w["alive"] and w["host"]
        assert w["last_heartbeat"] >= w["started_at"]
    # Exited workers take their rows with them.
    live = finished.api.http.get("/v1/workers").json()["data"]
    assert not [w for w in live if w["pid"] in finished.worker_pids]


def test_list_shows_each_study_with_progress_and_best_value(finished: Finished) -> None:
    r = finished.api.http.get("/v1/studies")
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["data"])
    mine = next(s for s in body["data"] if s["name"] == finished.name)
    complete = [t for t in finished.api.trials(finished.name) if t["state"] == "complete"]
    assert mine["progress"]["finished"] == N_TRIALS
    assert mine["best_value"] == max(t["values"][0] for t in complete)
    assert mine == finished.api.study(finished.name)


def test_trials_are_paged_in_number_order_and_filtered_by_state(finished: Finished) -> None:
    http, name = finished.api.http, finished.name
    pages = []
    for offset in range(0, N_TRIALS, 4):
        r = http.get(f"/v1/studies/{name}/trials", params={"offset": offset, "limit": 4})
        assert r.status_code == 200
        body = r.json()
        assert body["count"] == N_TRIALS and body["offset"] == offset and body["limit"] == 4
        pages.append([t["number"] for t in body["data"]])
    assert [len(p) for p in pages] == [4, N_TRIALS - 4]
    assert sum(pages, []) == list(range(N_TRIALS))

    counts = finished.api.study(name)["progress"]
    for state in ("complete", "pruned", "running", "failed"):
        body = http.get(f"/v1/studies/{name}/trials", params={"state": state}).json()
        assert body["count"] == counts[state] == len(body["data"])
        assert all(t["state"] == state for t in body["data"])
    assert http.get(f"/v1/studies/{name}/trials", params={"state": "sleeping"}).status_code == 422

    one = http.get(f"/v1/studies/{name}/trials", params={"state": "complete", "limit": 1, "history": True})
    t = one.json()["data"][0]
    assert len(t["metrics"]["history"]) == t["metrics"]["epochs_run"] == 3
    assert 0 < t["n_params"] <= 3000


def test_best_is_the_completed_trial_with_the_highest_validation_accuracy(finished: Finished) -> None:
    r = finished.api.http.get(f"/v1/studies/{finished.name}/best")
    assert r.status_code == 200
    (best,) = r.json()
    complete = [t for t in finished.api.trials(finished.name) if t["state"] == "complete"]
    assert best["values"][0] == max(t["values"][0] for t in complete)
    assert best["number"] == finished.api.study(finished.name)["best_trial"]
    assert best["metrics"]["val_accuracy"] == best["values"][0]


def _records(obj: Any) -> list[dict[str, Any]]:
    """The per-trial records anywhere in an exported document: dicts that carry ``params``."""
    if isinstance(obj, dict):
        found = [obj] if isinstance(obj.get("params"), dict) else []
        return found + [r for v in obj.values() for r in _records(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in _records(v)]
    return []


def test_json_export_holds_every_trial_of_the_study(finished: Finished) -> None:
    r = finished.api.http.get(f"/v1/studies/{finished.name}/export", params={"format": "json"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    exported = {(p["params"]["n_neurons"], p["params"]["n_dendrites"]) for p in _records(doc)
                if "n_neurons" in p["params"]}
    trials = _finished_trials(finished)
    assert exported == {(t["params"]["n_neurons"], t["params"]["n_dendrites"]) for t in trials}
    assert finished.name in r.text


def test_csv_export_has_one_row_a_trial_matching_the_study(finished: Finished) -> None:
    r = finished.api.http.get(f"/v1/studies/{finished.name}/export", params={"format": "csv"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    assert f'filename="{finished.name}.csv"' in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == N_TRIALS
    number_col = next(c for c in rows[0] if c.lower() in ("number", "trial", "trial_number"))
    neurons_col = next(c for c in rows[0] if c.endswith("n_neurons"))
    by_number = {t["number"]: t for t in finished.api.trials(finished.name)}
    for row in rows:
        t = by_number[int(row[number_col])]
        assert int(float(row[neurons_col])) == t["params"]["n_neurons"]


def _plot_kinds(api: Api, name: str) -> list[str]:
    r = api.http.get(f"/v1/studies/{name}/plots/no-such-plot")
    assert r.status_code == 404, r.text
    detail = r.json()["detail"]
    assert "kinds:" in detail, detail
    return [k.strip() for k in detail.split("kinds:", 1)[1].split(",")]


def test_a_plot_is_served_as_plotly_json_and_as_a_standalone_page(finished: Finished) -> None:
    http, name = finished.api.http, finished.name
    kind = _plot_kinds(finished.api, name)[0]
    r = http.get(f"/v1/studies/{name}/plots/{kind}")
    assert r.status_code == 200, r.text
    fig = r.json()
    assert "data" in fig and "layout" in fig
    page = http.get(f"/v1/studies/{name}/plots/{kind}", params={"format": "html"})
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower() and "plotly" in page.text.lower()


def test_kept_weights_download_as_a_torch_file_that_rebuilds_the_model(finished: Finished) -> None:
    http, name = finished.api.http, finished.name
    best = finished.api.study(name)["best_trial"]
    r = http.get(f"/v1/studies/{name}/trials/{best}/model")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    saved = torch.load(io.BytesIO(r.content), weights_only=True)
    config, state = saved["config"], saved["state_dict"]
    model = core.create_model(config["family"], **config["model_args"])
    model.load_state_dict(state)
    trial = next(t for t in finished.api.trials(name) if t["number"] == best)
    assert core.count_parameters(model) == trial["n_params"] == config["n_params"]
    assert config["params"] == trial["params"]

    as_json = http.get(f"/v1/studies/{name}/trials/{best}/model", params={"format": "json"})
    assert as_json.status_code == 200 and as_json.json() == {"trial": best, "config": config}


def test_local_workers_stop_on_their_own_when_serve_is_sigkilled(tmp_path: Path) -> None:
    """`dendro serve` killed without a chance to stop its workers: they notice and exit."""
    procs = Procs(tmp_path)
    pids: set[int] = set()
    try:
        api = procs.serve(f"sqlite:///{tmp_path / 'orphan.db'}", "--workers", "1", "--device", "cpu")
        wait_for(lambda: pids.update(w["pid"] for w in api.http.get("/v1/workers").json()["data"]) or pids,
                 60, "the local worker to register")
        os.killpg(api.proc.pid, signal.SIGKILL)  # its own group only: the worker has a session of its own
        api.proc.wait(10)

        def gone() -> bool:
            for pid in pids:
                try:
                    os.kill(pid, 0)
                    return False
                except ProcessLookupError:
                    pass
            return True

        wait_for(gone, 30, "the orphaned worker to exit")
    finally:
        procs.close()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_serve_with_local_workers_runs_a_study_and_stops_them_with_it(tmp_path: Path) -> None:
    """The embedded default: `dendro serve --workers 2` on a SQLite file, then SIGTERM."""
    procs = Procs(tmp_path)
    pids: set[int] = set()
    try:
        api = procs.serve(f"sqlite:///{tmp_path / 'local.db'}", "--workers", "2", "--device", "cpu")
        name = unique("local")
        api.create(tiny_spec(name, n_trials=4))

        def done() -> bool:
            pids.update(w["pid"] for w in api.http.get("/v1/workers").json()["data"])
            p = api.study(name)["progress"]
            return p["finished"] >= 4 and p["running"] == 0

        wait_for(done, 120, "the local workers to finish the study", interval=0.25)
        wait_for(lambda: done() and len(pids) == 2, 60, "both local workers to register")
        assert api.study(name)["progress"]["total"] == 4

        api.proc.send_signal(signal.SIGTERM)
        assert procs.wait_exit(api.proc, 60) == 0
        for pid in pids:  # the workers went with the API
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        log = api.log_text()
        assert "started 2 local worker(s) on cpu" in log
        assert "database is locked" not in log and "Traceback" not in log
    finally:
        procs.close()
        for pid in pids:  # the API starts them in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
