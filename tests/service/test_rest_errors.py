"""Every error status of the REST API, from a real server: JSON that names the field and what is allowed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from service_helpers import Api, Procs, free_port, tiny_spec, unique

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A server with a token, small limits and its own SQLite file."""
    procs = Procs(tmp_path_factory.mktemp("guarded"))
    try:
        yield procs.serve(f"sqlite:///{procs.folder / 'guarded.db'}", env={
            "DENDRO_API_TOKEN": TOKEN, "DENDRO_MAX_TRIALS": "5", "DENDRO_MAX_EPOCHS": "4",
            "DENDRO_MAX_BODY_BYTES": "4096", "DENDRO_MAX_PAGE_SIZE": "10",
        })
    finally:
        procs.close()


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _detail(r: Any) -> Any:
    assert r.headers["content-type"].startswith("application/json"), r.text
    return r.json()["detail"]


def test_unknown_study_is_404_on_every_endpoint(api: Api) -> None:
    name = unique("missing")
    for method, path in [
        ("GET", f"/v1/studies/{name}"),
        ("GET", f"/v1/studies/{name}/trials"),
        ("GET", f"/v1/studies/{name}/best"),
        ("POST", f"/v1/studies/{name}/stop"),
        ("POST", f"/v1/studies/{name}/resume"),
        ("DELETE", f"/v1/studies/{name}"),
        ("GET", f"/v1/studies/{name}/export"),
        ("GET", f"/v1/studies/{name}/trials/0/model"),
    ]:
        r = api.http.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert name in _detail(r), (method, path)


def test_a_trial_without_kept_weights_is_404(api: Api) -> None:
    name = unique("noweights")
    api.create(tiny_spec(name, n_trials=1))
    try:
        api.http.post(f"/v1/studies/{name}/stop")  # no worker may take it
        r = api.http.get(f"/v1/studies/{name}/trials/0/model")
        assert r.status_code == 404
        assert "no weights kept for trial 0" in _detail(r)
    finally:
        api.http.delete(f"/v1/studies/{name}")


def test_unknown_plot_kind_is_404_listing_the_kinds(api: Api) -> None:
    name = unique("plotkind")
    api.create(tiny_spec(name, n_trials=1))
    try:
        api.http.post(f"/v1/studies/{name}/stop")
        r = api.http.get(f"/v1/studies/{name}/plots/pie-chart")
        assert r.status_code == 404, r.text
        detail = _detail(r)
        assert "'pie-chart'" in detail and "kinds:" in detail
    finally:
        api.http.delete(f"/v1/studies/{name}")


def test_an_existing_name_is_409(api: Api) -> None:
    name = unique("twice")
    api.create(tiny_spec(name))
    try:
        api.http.post(f"/v1/studies/{name}/stop")
        r = api.http.post("/v1/studies", json=tiny_spec(name, n_trials=7))
        assert r.status_code == 409
        assert name in _detail(r) and "exists" in _detail(r)
        assert api.study(name)["n_trials"] == 3, "the first study is left as it was"
    finally:
        api.http.delete(f"/v1/studies/{name}")


def test_a_state_change_the_state_does_not_allow_is_409(api: Api) -> None:
    name = unique("states")
    api.create(tiny_spec(name))
    try:
        r = api.http.post(f"/v1/studies/{name}/resume")
        assert r.status_code == 409 and "cannot resume" in _detail(r) and "running" in _detail(r)
        r = api.http.post(f"/v1/studies/{name}/stop")
        assert r.status_code == 200 and r.json()["state"] == "stopped"
        r = api.http.post(f"/v1/studies/{name}/stop")
        assert r.status_code == 409 and "cannot stop" in _detail(r) and "stopped" in _detail(r)
        r = api.http.post(f"/v1/studies/{name}/resume")
        assert r.status_code == 200 and r.json()["state"] == "running"
        api.http.post(f"/v1/studies/{name}/stop")
    finally:
        api.http.delete(f"/v1/studies/{name}")


@pytest.mark.parametrize(
    ("change", "loc", "words"),
    [
        ({"epochs": 3}, ["body", "epochs"], ["unknown key 'epochs'", "n_epochs"]),
        ({"search_space": {"n_neurons": {"type": "int", "low": 9, "high": 4},
                           "n_dendrite_inputs": [8]}},
         ["body", "search_space", "n_neurons"], ["empty range", "low=9"]),
        ({"max_params": 50}, ["body", "max_params"], ["max_params=50", "smallest model has"]),
        ({"search_space": {"n_neurons": [4], "n_dendrite_inputs": [8], "n_layers": [2]}},
         ["body", "search_space", "n_layers"], ["does not take 'n_layers'", "n_dendrites"]),
        ({"dataset": "imagenet"}, ["body", "dataset"], ["unknown dataset 'imagenet'", "digits"]),
        ({"n_trials": 0}, ["body", "n_trials"], ["greater than or equal to 1"]),
    ],
    ids=["unknown-key", "empty-range", "impossible-budget", "unknown-param", "unknown-dataset", "zero-trials"],
)
def test_a_bad_spec_is_422_naming_the_field(sqlite_api: Api, change: dict[str, Any], loc: list[str],
                                            words: list[str]) -> None:
    name = unique("bad")
    r = sqlite_api.http.post("/v1/studies", json={**tiny_spec(name), **change})
    assert r.status_code == 422, r.text
    (err,) = _detail(r)
    assert err["loc"] == loc
    for w in words:
        assert w in err["msg"], err["msg"]
    assert sqlite_api.http.get(f"/v1/studies/{name}").status_code == 404, "nothing is created"


def test_over_a_server_limit_is_422_naming_the_limit(guarded: Api) -> None:
    for field, value, limit in (("n_trials", 6, 5), ("n_epochs", 5, 4)):
        r = guarded.http.post("/v1/studies", json=tiny_spec(unique("big"), **{field: value}), headers=_auth())
        assert r.status_code == 422, r.text
        (err,) = _detail(r)
        assert err["loc"] == ["body", field]
        assert f"{field}={value}" in err["msg"] and f"limit of {limit}" in err["msg"]
    r = guarded.http.get("/v1/studies/x/trials", params={"limit": 11})
    assert r.status_code == 422
    assert _detail(r)[0]["loc"] == ["query", "limit"]


def test_writes_need_the_token_and_reads_stay_open(guarded: Api) -> None:
    http, name = guarded.http, unique("guarded")
    spec = tiny_spec(name, n_trials=2)
    for headers in ({}, _auth("wrong"), {"Authorization": TOKEN}, {"X-API-Token": "wrong"}):
        r = http.post("/v1/studies", json=spec, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert "token" in _detail(r)
        assert r.headers.get("www-authenticate") == "Bearer"
    assert http.get(f"/v1/studies/{name}").status_code == 404, "a refused write changes nothing"

    assert http.post("/v1/studies", json=spec, headers=_auth()).status_code == 201
    for method, path in [("POST", f"/v1/studies/{name}/stop"), ("POST", f"/v1/studies/{name}/resume"),
                         ("DELETE", f"/v1/studies/{name}")]:
        assert http.request(method, path).status_code == 401, path
        assert http.request(method, path, headers=_auth("wrong")).status_code == 401, path
    assert http.get("/v1/studies").status_code == 200
    assert http.get(f"/v1/studies/{name}").json()["state"] == "running"
    assert http.get(f"/v1/studies/{name}/trials").status_code == 200
    assert http.get("/v1/workers").status_code == 200
    assert http.post(f"/v1/studies/{name}/stop", headers={"X-API-Token": TOKEN}).status_code == 200
    assert http.delete(f"/v1/studies/{name}", headers=_auth()).status_code == 204


def test_the_dashboard_writes_need_the_token_too(guarded: Api) -> None:
    http, name = guarded.http, unique("dash")
    body = {"study_name": name, "directions": ["minimize"]}
    for headers in ({}, _auth("wrong")):
        r = http.post("/api/studies", json=body, headers=headers)
        assert r.status_code == 401 and "token" in _detail(r)
    assert name not in http.get("/api/studies").text, "a refused write changes nothing"
    r = http.post("/api/studies", json=body, headers=_auth())
    assert r.status_code == 201, r.text
    studies = http.get("/api/studies")
    assert studies.status_code == 200, "dashboard reads stay open"
    study_id = next(s["study_id"] for s in studies.json()["study_summaries"] if s["study_name"] == name)
    assert http.delete(f"/api/studies/{study_id}").status_code == 401
    assert http.delete(f"/api/studies/{study_id}", headers=_auth()).status_code == 204
    assert http.get("/dashboard").status_code == 200


def test_a_body_over_the_size_limit_is_413(guarded: Api) -> None:
    big = tiny_spec(unique("huge"), model_params={"padding": "x" * 5000})
    r = guarded.http.post("/v1/studies", json=big, headers=_auth())
    assert r.status_code == 413
    assert "limit of 4096 bytes" in _detail(r)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    r = guarded.http.post("/v1/studies", content=chunks(),
                          headers={**_auth(), "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert "limit of 4096 bytes" in _detail(r)
    r = guarded.http.post("/api/studies", content=chunks(),
                          headers={**_auth(), "Content-Type": "application/json"})
    assert r.status_code == 413, r.text


def test_an_unreachable_database_is_503_with_a_clear_message(procs: Procs) -> None:
    # A PostgreSQL URL on a port where nothing listens: the API starts all the same.
    api = procs.serve(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test")
    for method, path, body in [
        ("GET", "/healthz", None),
        ("GET", "/v1/studies", None),
        ("GET", "/v1/studies/any", None),
        ("POST", "/v1/studies", tiny_spec("any")),
        ("GET", "/v1/workers", None),
        ("GET", "/api/studies", None),
    ]:
        r = api.http.request(method, path, json=body)
        assert r.status_code == 503, (path, r.text)
        detail = _detail(r)
        assert "database is unavailable" in detail and "Retry" in detail
        assert "Traceback" not in r.text and "psycopg" not in r.text
        assert r.headers["retry-after"] == "5"
    assert api.proc.poll() is None, "the server keeps running"
    r = api.http.get("/v1/docs")
    assert r.status_code == 200, "what needs no database still works"
