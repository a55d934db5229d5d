"""Limits, study names and the API token against hostile and careless clients, on a real server."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from service_helpers import DENDRO, Api, Procs, tiny_spec, unique

pytestmark = pytest.mark.slow

TOKEN = "tok-" + uuid.uuid4().hex  # unique, so a leak anywhere can be searched for
LIMITS = {"DENDRO_MAX_TRIALS": "5", "DENDRO_MAX_EPOCHS": "4", "DENDRO_MAX_PARAMS": "3000",
          "DENDRO_MAX_PAGE_SIZE": "10", "DENDRO_MAX_BODY_BYTES": "4096"}
CANARY = Path("/tmp") / f"dendro-canary-{uuid.uuid4().hex}"
HOSTILE_NAMES = [
    "../../etc/passwd", "..", ".hidden", "a/b", "..%2f..%2fetc", "a\\b", "a b", "a\nb", "abc\n",
    f"x;touch {CANARY}", f"$(touch {CANARY})", f"`touch {CANARY}`", "a|b", "a&&b", "a>b", "-rf",
    "x" * 65, "名前", "a\x00b", "a'b", 'a"b', "%s%s%n",
]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A server with the token and small limits, reads open."""
    procs = Procs(tmp_path_factory.mktemp("hostile"))
    try:
        yield procs.serve(f"sqlite:///{procs.folder / 'hostile.db'}",
                          env={"DENDRO_API_TOKEN": TOKEN, **LIMITS})
    finally:
        procs.close()


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _detail(r: httpx.Response) -> Any:
    assert r.headers["content-type"].startswith("application/json"), r.text[:300]
    return r.json()["detail"]


# -- limits ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"n_trials": 6}, "n_trials", ["n_trials=6", "limit of 5"]),
        ({"n_epochs": 5}, "n_epochs", ["n_epochs=5", "limit of 4"]),
        ({"max_params": 3001}, "max_params", ["max_params=3001", "limit of 3000"]),
        ({"max_params": None}, "max_params", ["at most 3000 parameters", "limit max_params", "set max_params"]),
    ],
    ids=["trials", "epochs", "params", "params-missing"],
)
def test_over_a_limit_is_a_422_naming_it(guarded: Api, change: dict[str, Any], field: str,
                                         words: list[str]) -> None:
    name = unique("limit")
    r = guarded.http.post("/v1/studies", json={**tiny_spec(name), **change}, headers=_auth())
    assert r.status_code == 422, r.text
    (err,) = _detail(r)
    assert err["loc"] == ["body", field]
    for w in words:
        assert w in err["msg"], err["msg"]
    assert guarded.http.get(f"/v1/studies/{name}").status_code == 404, "nothing is created"


def test_page_size_over_the_limit_is_a_422_and_the_schema_documents_every_limit(guarded: Api) -> None:
    name = unique("pages")
    assert guarded.http.post("/v1/studies", json=tiny_spec(name, n_trials=2), headers=_auth()).status_code == 201
    r = guarded.http.get(f"/v1/studies/{name}/trials", params={"limit": 11})
    assert r.status_code == 422
    (err,) = _detail(r)
    assert err["loc"] == ["query", "limit"] and "at most 10" in err["msg"]
    assert guarded.http.get(f"/v1/studies/{name}/trials", params={"limit": 10}).status_code == 200

    schema = guarded.http.get("/v1/openapi.json").json()
    props = schema["components"]["schemas"]["StudySpec"]["properties"]
    assert (props["n_trials"]["maximum"], props["n_epochs"]["maximum"], props["max_params"]["maximum"]) == (5, 4, 3000)
    (limit,) = [p for p in schema["paths"]["/v1/studies/{name}/trials"]["get"]["parameters"] if p["name"] == "limit"]
    assert limit["schema"]["maximum"] == 10


def test_a_body_over_the_size_limit_is_413_not_422(guarded: Api) -> None:
    # 413 Content Too Large is the status HTTP has for this: the body is refused before it is
    # parsed, so there is no field to name in a 422.
    r = guarded.http.post("/v1/studies", json=tiny_spec(unique("big"), model_params={"pad": "x" * 5000}),
                          headers=_auth())
    assert r.status_code == 413
    assert "limit of 4096 bytes" in _detail(r) and r.json()["field"] == "body"


def test_a_worker_population_over_the_limit_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from service.cli import main

    storage = f"sqlite:///{tmp_path / 'pop.db'}"
    monkeypatch.setenv("DENDRO_MAX_POPULATION", "8")
    assert main(["worker", "--storage", storage, "--population", "9", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dendro: error: --population 9 is over this server's limit max_population=8 "
                   "(DENDRO_MAX_POPULATION); use at most that, or 'auto'")
    monkeypatch.delenv("DENDRO_MAX_POPULATION")
    assert main(["worker", "--storage", storage, "--population", "5000", "--device", "cpu"]) == 2
    assert "max_population=4096" in capsys.readouterr().err, "a safe default"
    for bad in ("0", "-3", "lots"):
        with pytest.raises(SystemExit) as exc:
            main(["worker", "--storage", storage, "--population", bad])
        assert exc.value.code == 2
        assert "--population must be a positive integer or 'auto'" in capsys.readouterr().err
    assert not (tmp_path / "pop.db").exists(), "refused before the storage is opened"


def test_a_worker_poll_interval_that_is_not_a_positive_number_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from service.cli import main

    storage = f"sqlite:///{tmp_path / 'poll.db'}"
    for bad in ("0", "-1", "soon", "nan", "inf"):
        with pytest.raises(SystemExit) as exc:
            main(["worker", "--storage", storage, "--poll-interval", bad])
        assert exc.value.code == 2
        assert f"--poll-interval must be a positive number of seconds, got {bad!r}" in capsys.readouterr().err
    assert not (tmp_path / "poll.db").exists(), "refused before the storage is opened"


# -- study names -------------------------------------------------------------------------------
def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if not p.name.endswith((".log", ".db", ".db-wal", ".db-shm", ".lock"))}


def test_hostile_study_names_are_refused_on_every_path_and_create_nothing(guarded: Api) -> None:
    folder = guarded.log.parent
    before = _files(folder)
    http = guarded.http
    for name in HOSTILE_NAMES:
        seg = quote(name, safe="")
        for method, path in [
            ("GET", f"/v1/studies/{seg}"), ("GET", f"/v1/studies/{seg}/trials"),
            ("GET", f"/v1/studies/{seg}/best"), ("GET", f"/v1/studies/{seg}/export?format=csv"),
            ("GET", f"/v1/studies/{seg}/plots/history"), ("GET", f"/v1/studies/{seg}/trials/0/model"),
            ("POST", f"/v1/studies/{seg}/stop"), ("POST", f"/v1/studies/{seg}/resume"),
            ("DELETE", f"/v1/studies/{seg}"),
        ]:
            r = http.request(method, path, headers=_auth())
            assert r.status_code in (404, 422), (name, method, path, r.status_code, r.text[:300])
            detail = _detail(r)
            if r.status_code == 422:
                assert detail[0]["loc"] == ["path", "name"]
                assert "letters, digits" in detail[0]["msg"]
        r = http.post("/v1/studies", json=tiny_spec(name), headers=_auth())
        assert r.status_code == 422, (name, r.text[:300])
        assert _detail(r)[0]["loc"] == ["body", "name"], name
    assert not CANARY.exists(), "a name reached a shell"
    assert _files(folder) == before, "a name reached the file system"
    listed = {s["name"] for s in http.get("/v1/studies").json()["data"]}
    assert not listed & set(HOSTILE_NAMES)


def test_a_hostile_name_stored_by_another_client_never_leaves_the_export_folder(
    guarded: Api, tmp_path: Path
) -> None:
    import studies

    # Optuna, the dashboard or a script accept any name: ours must stay safe with it.
    evil = f"../../{tmp_path.name}-escaped/x;touch {CANARY}"
    import optuna

    spec = studies.StudySpec.model_validate({**tiny_spec("placeholder"), "n_trials": 1})
    study = optuna.create_study(study_name=evil, storage=guarded.storage, direction="maximize")
    study.set_user_attr(studies.SPEC_ATTR, spec.public_dict())
    study.set_user_attr(studies.STATE_ATTR, "stopped")
    try:
        listed = {s["name"] for s in guarded.http.get("/v1/studies").json()["data"]}
        assert evil in listed, "listed as it is (JSON-escaped)"
        r = guarded.http.get(f"/v1/studies/{quote(evil, safe='')}/export", params={"format": "csv"})
        assert r.status_code in (404, 422), "unreachable by URL: the name rule refuses it"
        out = tmp_path / "out"
        res = subprocess.run([str(DENDRO), "study", "export", evil, "--storage", guarded.storage, "--out",
                              str(out), "--format", "json,csv"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
        assert res.returncode == 0, res.stderr
        written = sorted(p.name for p in out.iterdir())
        assert len(written) == 2 and all("/" not in n and ";" not in n and " " not in n for n in written), written
        assert not (tmp_path.parent / f"{tmp_path.name}-escaped").exists(), "nothing outside --out"
        assert not CANARY.exists()
    finally:
        optuna.delete_study(study_name=evil, storage=guarded.storage)


# -- the token ---------------------------------------------------------------------------------
def _dashboard_writes(study_id: int) -> list[tuple[str, str, Any]]:
    return [
        ("POST", "/api/studies", {"study_name": unique("dash"), "directions": ["minimize"]}),
        ("POST", f"/api/studies/{study_id}/rename", {"study_name": unique("renamed")}),
        ("PUT", f"/api/studies/{study_id}/note", {"version": 0, "body": "hello"}),
        ("POST", "/api/trials/1/tell", {"state": "Fail"}),
        ("POST", "/api/trials/1/user-attrs", {"user_attrs": {"a": 1}}),
        ("DELETE", f"/api/studies/{study_id}", None),
    ]


def test_every_write_needs_the_token_reads_stay_open_and_the_token_never_leaks(guarded: Api) -> None:
    http, name = guarded.http, unique("tok")
    wrong = [{}, _auth(TOKEN + "x"), _auth(TOKEN[:-1]), {"Authorization": TOKEN},
             {"X-API-Token": TOKEN.upper()}, {"Cookie": f"dendro_token={TOKEN}0"}]
    bodies: list[str] = []

    def call(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
        r = http.request(method, path, json=body, headers=headers or {})
        bodies.append(json.dumps(dict(r.headers)) + r.text)
        return r

    ours = [("POST", "/v1/studies", tiny_spec(name, n_trials=2)), ("POST", f"/v1/studies/{name}/stop", None),
            ("POST", f"/v1/studies/{name}/resume", None), ("DELETE", f"/v1/studies/{name}", None)]
    for headers in wrong:
        for method, path, body in ours:
            r = call(method, path, body, headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert "needs the API token" in _detail(r)
    assert call("GET", f"/v1/studies/{name}").status_code == 404, "refused writes changed nothing"

    dash = call("POST", "/api/studies", {"study_name": unique("dash"), "directions": ["minimize"]}, _auth())
    assert dash.status_code == 201
    study_id = dash.json()["study_summary"]["study_id"]
    for headers in wrong:
        for method, path, body in _dashboard_writes(study_id):
            r = call(method, path, body, headers)
            assert r.status_code == 401, (method, path, headers, r.text)

    # With the token, in each of the accepted places.
    assert call("POST", "/v1/studies", tiny_spec(name, n_trials=2), _auth()).status_code == 201
    assert call("POST", f"/v1/studies/{name}/stop", None, {"X-API-Token": TOKEN}).status_code == 200
    assert call("POST", f"/v1/studies/{name}/resume", None, {"Cookie": f"dendro_token={TOKEN}"}).status_code == 200
    assert call("PUT", f"/api/studies/{study_id}/note", {"version": 1, "body": "hi"}, _auth()).status_code == 204
    for path in ("/v1/studies", f"/v1/studies/{name}", f"/v1/studies/{name}/trials", f"/v1/studies/{name}/best",
                 "/v1/workers", "/api/studies", f"/api/studies/{study_id}", "/dashboard", "/healthz"):
        assert call("GET", path).status_code == 200, path
    # Errors, with the token sent along, do not echo it.
    for method, path in (("GET", "/v1/studies/no-such"), ("GET", "/v1/studies/a%3Bb"), ("GET", "/v1/nope"),
                         ("PUT", "/v1/studies"), ("POST", f"/v1/studies/{name}/resume")):
        assert call(method, path, None, _auth()).status_code >= 400
    assert call("POST", "/v1/studies", {"name": 1}, _auth()).status_code == 422
    assert call("DELETE", f"/v1/studies/{name}", None, _auth()).status_code == 204
    assert call("DELETE", f"/api/studies/{study_id}", None, _auth()).status_code == 204

    for text in bodies:
        assert TOKEN not in text and TOKEN[:-1] not in text and TOKEN.upper() not in text
    log = guarded.log_text()
    assert "POST /v1/studies" in log, "the access log was captured"
    assert TOKEN[:12] not in log and TOKEN.upper()[:12] not in log, "the token reached the server log"


def test_reads_need_the_token_too_when_configured(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        api = procs.serve(f"sqlite:///{tmp_path / 'closed.db'}",
                          env={"DENDRO_API_TOKEN": TOKEN, "DENDRO_READ_REQUIRES_TOKEN": "true"})
        name = unique("closed")
        assert api.http.post("/v1/studies", json=tiny_spec(name, n_trials=2), headers=_auth()).status_code == 201
        reads = ["/v1/studies", f"/v1/studies/{name}", f"/v1/studies/{name}/trials", f"/v1/studies/{name}/best",
                 f"/v1/studies/{name}/export", "/v1/workers", "/api/studies", "/dashboard"]
        for path in reads:
            for headers in ({}, _auth("wrong")):
                r = api.http.get(path, headers=headers)
                assert r.status_code == 401, (path, headers, r.status_code)
                assert TOKEN not in r.text
            assert api.http.get(path, headers=_auth()).status_code == 200, path
        # What reveals no study stays open: the health check (for orchestrators) and the docs.
        for path in ("/healthz", "/v1/openapi.json", "/v1/docs"):
            assert api.http.get(path).status_code == 200, path
        assert TOKEN[:12] not in api.log_text()
    finally:
        procs.close()
        assert not os.path.exists(CANARY)
