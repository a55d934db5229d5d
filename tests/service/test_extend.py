"""PATCH /v1/studies/{name}: a finished study gets more trials and a real worker trains them;
every refusal has its status code."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from service_helpers import Api, Procs, tiny_spec, unique, wait_for

import core
import studies


@pytest.fixture(scope="module")
def served(session_procs: Procs, tmp_path_factory: pytest.TempPathFactory) -> Api:
    """`dendro serve` with one local worker on SQLite and a server limit of 50 trials."""
    folder = tmp_path_factory.mktemp("extend")
    return session_procs.serve(f"sqlite:///{folder / 'dendro.db'}", "--workers", "1", "--device", "cpu",
                               env={"DENDRO_MAX_TRIALS": "50"})


def _wait_state(api: Api, name: str, state: str) -> dict[str, object]:
    """The study once it is in ``state`` with nothing running (the worker marks it done just
    after its last tell)."""
    def check() -> dict[str, object] | None:
        s = api.study(name)
        return s if s["state"] == state and s["progress"]["running"] == 0 else None

    return wait_for(check, 90, f"study {name} to be {state}", interval=0.25)


@pytest.mark.slow
def test_patch_extends_a_finished_study_and_the_worker_trains_the_new_trials(served: Api) -> None:
    name = unique("extend")
    served.create(tiny_spec(name, n_trials=2, n_epochs=1))
    done = _wait_state(served, name, "done")
    assert done["progress"]["finished"] == 2
    assert served.http.post(f"/v1/studies/{name}/resume").status_code == 409, "nothing left to resume"

    r = served.http.patch(f"/v1/studies/{name}", json={"n_trials": 4})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "running" and r.json()["n_trials"] == 4 and r.json()["spec"]["n_trials"] == 4
    again = _wait_state(served, name, "done")
    assert again["progress"]["finished"] == 4
    assert sorted(t["number"] for t in served.trials(name)) == [0, 1, 2, 3]

    # the README's download: a kept trial's file rebuilds the model with create_model
    best = served.study(name)["best_trial"]
    r = served.http.get(f"/v1/studies/{name}/trials/{best}/model")
    assert r.status_code == 200, r.text
    ckpt = torch.load(io.BytesIO(r.content), weights_only=True)
    cfg = ckpt["config"]
    model = core.create_model(cfg["family"], **cfg["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    assert core.count_parameters(model) == cfg["n_params"]

    # the refusals, each with its code
    for body, code, words in [
        ({"n_trials": 4}, 422, "has 4 finished trials"),
        ({"n_trials": 3}, 422, "must be more than that"),
        ({"n_trials": 51}, 422, "over this server's limit of 50"),
        ({"n_trials": 0}, 422, "greater than or equal to 1"),
        ({"n_trial": 9}, 422, "n_trial"),
        ({}, 422, "give a new n_trials"),
    ]:
        r = served.http.patch(f"/v1/studies/{name}", json=body)
        assert r.status_code == code and words in r.text, (body, r.status_code, r.text)
    r = served.http.patch(f"/v1/studies/{unique('nope')}", json={"n_trials": 9})
    assert r.status_code == 404 and "no study named" in r.text

    # a study that no worker can run (state error) cannot be extended
    study, _ = studies.load_study(name, served.storage)
    study.set_user_attr(studies.STATE_ATTR, "error")
    study.set_user_attr("dendro.error", "invalid spec: model: unknown model family 'mine'")
    r = served.http.patch(f"/v1/studies/{name}", json={"n_trials": 9})
    assert r.status_code == 409 and "unknown model family 'mine'" in r.text, r.text


@pytest.mark.slow
def test_resume_restarts_a_done_study_that_has_trials_left(served: Api) -> None:
    name = unique("resume")
    served.create(tiny_spec(name, n_trials=1, n_epochs=1))
    _wait_state(served, name, "done")
    # done with trials left: e.g. a spec given more trials by a client that did not resume it
    study, spec = studies.load_study(name, served.storage)
    study.set_user_attr(studies.SPEC_ATTR, spec.model_copy(update={"n_trials": 2}).public_dict())
    assert served.study(name)["state"] == "done"
    r = served.http.post(f"/v1/studies/{name}/resume")
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    assert _wait_state(served, name, "done")["progress"]["finished"] == 2


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_patch_needs_the_token_when_one_is_set(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service._app import create_app
    from service._settings import Settings

    url = f"sqlite:///{tmp_path / 'guarded.db'}"
    name = unique("guarded")
    studies.create_study(studies.StudySpec.model_validate(tiny_spec(name, n_trials=2)), url)
    app = create_app(Settings(storage=url, api_token="s3cret", data_dir=tmp_path), dashboard=False)
    with TestClient(app) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = http.patch(f"/v1/studies/{name}", json={"n_trials": 9}, headers=headers)
            assert r.status_code == 401 and "token" in r.text, r.text
        assert studies.load_study(name, url)[1].n_trials == 2, "a refused write changes nothing"
        r = http.patch(f"/v1/studies/{name}", json={"n_trials": 9}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["n_trials"] == 9, r.text


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_a_pareto_study_naming_no_pruner_is_created_without_pruning(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service._app import create_app
    from service._settings import Settings

    app = create_app(Settings(storage=f"sqlite:///{tmp_path / 'p.db'}", data_dir=tmp_path), dashboard=False)
    spec = tiny_spec(unique("pareto"), objective=["val_accuracy", "n_params"])
    del spec["pruner"]
    with TestClient(app) as http:
        r = http.post("/v1/studies", json=spec)
        assert r.status_code == 201, r.text
        assert r.json()["spec"]["pruner"] == "none" and r.json()["directions"] == ["maximize", "minimize"]
        r = http.post("/v1/studies", json={**spec, "name": unique("pareto"), "pruner": "median"})
        assert r.status_code == 422 and "pruning needs a single objective" in r.text
