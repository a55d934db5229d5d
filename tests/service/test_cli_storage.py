"""One storage for every command: --storage, then DENDRO_STORAGE, then the data dir's dendro.db;
a URL that can never work is one line and exit 2 on every command, creating nothing."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial
from service_helpers import DENDRO, free_port, unique, wait_for

import studies
from service.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

SPEC: dict[str, Any] = {
    "name": "cli", "model": "dendritic_simple", "dataset": "digits", "max_params": 3000,
    "n_trials": 1, "n_epochs": 1, "batch_size": 128, "subset_size": 200, "sampler": "random",
    "pruner": "none", "search_space": {"n_neurons": [4], "n_dendrites": [2], "n_dendrite_inputs": [8]},
}

#: every command, as it would be typed; each gets --storage URL appended
COMMANDS: dict[str, list[str]] = {
    "serve": ["serve", "--port", "1"],
    "worker": ["worker", "--idle-exit", "1", "--device", "cpu"],
    "search": ["search", "--spec", "spec.json", "--device", "cpu"],
    "study-list": ["study", "list"],
    "study-show": ["study", "show", "cli"],
    "study-export": ["study", "export", "cli", "--out", "exports"],
    "study-extend": ["study", "extend", "cli", "--n-trials", "5"],
}
BAD_URLS: dict[str, tuple[str, str]] = {
    "not-a-url": ("notaurl", "is not a database URL"),
    "unknown-driver": ("foo://x", "unknown database or driver 'foo'"),
    "driver-not-installed": ("mysql://me:secret@127.0.0.1/db", "'mysqldb', which is not installed"),
    "sqlite-folder-missing": ("sqlite:///{tmp}/no/such/folder/dendro.db", "does not exist"),
}


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean working directory with a spec file and no DENDRO_* variables."""
    for k in ("DENDRO_STORAGE", "DENDRO_DATA_DIR", "DENDRO_PLUGINS"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dendro: error: "), err
    return lines[0]


@pytest.mark.parametrize("url_kind", list(BAD_URLS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_bad_storage_url_is_one_line_and_exit_2_on_every_command_creating_nothing(
    folder: Path, command: str, url_kind: str, capsys: pytest.CaptureFixture[str],
) -> None:
    url, words = BAD_URLS[url_kind]
    url = url.format(tmp=folder)
    before = _listing(folder)
    assert main([*COMMANDS[command], "--storage", url]) == 2
    out, err = capsys.readouterr()
    line = _one_error_line(err)
    assert words in line and "secret" not in line, line
    assert _listing(folder) == before, "nothing is created: no database, no folder, no data dir"


@pytest.mark.parametrize("url_kind", ["not-a-url", "driver-not-installed"])
def test_a_bad_dendro_storage_variable_is_refused_the_same_way(
    folder: Path, url_kind: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, words = BAD_URLS[url_kind]
    monkeypatch.setenv("DENDRO_STORAGE", url)
    assert main(["study", "list"]) == 2
    assert words in _one_error_line(capsys.readouterr().err)
    assert _listing(folder) == ["spec.json"]


@pytest.mark.slow
def test_the_installed_worker_exits_at_once_on_notaurl(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = subprocess.run([str(DENDRO), "worker", "--storage", "notaurl"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert _one_error_line(r.stderr) == ("dendro: error: storage URL 'notaurl' is not a database URL; use e.g. "
                                         "sqlite:///path/to/dendro.db or postgresql+psycopg://user@host:5432/db")
    assert time.monotonic() - t0 < 30 and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_worker_waits_for_a_database_that_does_not_answer_yet(tmp_path: Path) -> None:
    # a server that is down may come back: the worker retries instead of exiting
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    log = tmp_path / "worker.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(DENDRO), "worker", "--storage", url, "--device", "cpu"], cwd=tmp_path,
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "retrying" in log.read_text() or proc.poll() is not None, 60, "the worker to retry")
        assert proc.poll() is None, log.read_text()
    finally:
        proc.kill()
        proc.wait()
    out = log.read_text()
    assert "is unreachable" in out and "database unavailable" in out and "Traceback" not in out, out


def _make_study(url: str, name: str = "cli", **kw: Any) -> optuna.Study:
    study = studies.create_study(studies.StudySpec.model_validate({**SPEC, "name": name, **kw}), url)
    return study


def test_study_list_resolves_flag_then_variable_then_data_dir(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    flag_url, env_url = f"sqlite:///{folder / 'flag.db'}", f"sqlite:///{folder / 'env.db'}"
    (folder / "data").mkdir()
    _make_study(flag_url, "in-flag")
    _make_study(env_url, "in-env")
    _make_study(f"sqlite:///{folder / 'data' / 'dendro.db'}", "in-data-dir")
    monkeypatch.setenv("DENDRO_STORAGE", env_url)
    assert main(["study", "list", "--storage", flag_url]) == 0
    out, err = capsys.readouterr()
    assert "in-flag" in out and "in-env" not in out
    assert err == "", "the storage given with --storage is not echoed"
    assert main(["study", "list"]) == 0
    out, err = capsys.readouterr()
    assert "in-env" in out and err.strip() == f"dendro: storage {env_url} (from DENDRO_STORAGE)"
    monkeypatch.delenv("DENDRO_STORAGE")
    monkeypatch.setenv("DENDRO_DATA_DIR", "data")
    assert main(["study", "list"]) == 0
    out, err = capsys.readouterr()
    assert "in-data-dir" in out and "(from the data dir data)" in err
    monkeypatch.delenv("DENDRO_DATA_DIR")
    assert main(["study", "list", "--data-dir", str(folder / "data")]) == 0
    assert "in-data-dir" in capsys.readouterr().out


def test_study_list_without_a_database_says_so_and_creates_none(
    folder: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["study", "list"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no database at" in line and ".data/dendro.db" in line
    assert _listing(folder) == ["spec.json"]


def test_the_storage_line_hides_the_password(folder: Path, capsys: pytest.CaptureFixture[str],
                                             pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = pg_url.replace("postgres@", "postgres:hunter2@")
    monkeypatch.setenv("DENDRO_STORAGE", url)
    assert main(["study", "list"]) == 0
    err = capsys.readouterr().err
    assert "hunter2" not in err and "postgres:***@" in err and "(from DENDRO_STORAGE)" in err


@pytest.mark.slow
def test_search_out_holds_the_exports_and_the_database_stays_in_the_data_dir(
    folder: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["search", "--spec", "spec.json", "--device", "cpu", "--out", "results"]) == 0
    out, err = capsys.readouterr()
    assert (folder / ".data" / "dendro.db").is_file()
    assert sorted(p.name for p in (folder / "results").iterdir()) == ["cli.csv", "cli.html", "cli.json"]
    assert f"dendro: storage sqlite:///{folder / '.data' / 'dendro.db'} (from the data dir .data)" in err


def test_a_preset_summary_is_printed_whole_or_written_to_a_file(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = {"preset": "quick-prototype", "results": [{"trial": i, "params": {"lr": 0.001 * i}} for i in range(400)]}
    monkeypatch.setattr(studies, "run_preset", lambda *a, **kw: big)
    assert main(["search", "--preset", "quick-prototype", "--storage", f"sqlite:///{folder / 'p.db'}"]) == 0
    out = capsys.readouterr().out
    assert len(out) > 4000 and json.loads(out) == big
    assert main(["search", "--preset", "quick-prototype", "--storage", f"sqlite:///{folder / 'p.db'}",
                 "--json", "summary.json"]) == 0
    assert capsys.readouterr().out.strip() == "wrote the results of preset quick-prototype to summary.json"
    assert json.loads((folder / "summary.json").read_text()) == big


def _add(study: optuna.Study, values: list[float], n_params: int, n: int) -> None:
    study.add_trial(create_trial(state=TrialState.COMPLETE, values=values, params={"n_neurons": n},
                                 distributions={"n_neurons": IntDistribution(2, 8)},
                                 user_attrs={"n_params": n_params}))


def test_study_show_gives_state_family_dataset_budget_best_and_error(
    folder: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"sqlite:///{folder / 'show.db'}"
    study = _make_study(url, n_trials=4)
    _add(study, [0.8], 1200, 4)
    _add(study, [0.9], 1500, 6)
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={}))
    study.set_user_attr("dendro.error", "invalid spec: model: unknown model family 'mine'")
    assert main(["study", "show", "cli", "--storage", url]) == 0
    out = capsys.readouterr().out
    for words in ["study cli: running", "family:    dendritic_simple", "dataset:   digits",
                  "budget:    max_params=3000", "2 of 4 finished", "1 failed",
                  "best:      trial 1: val_accuracy=0.9000, 1500 params, params {\"n_neurons\": 6}",
                  "error:     invalid spec: model: unknown model family 'mine'"]:
        assert words in out, out


def test_study_show_gives_the_pareto_front_of_two_objectives(
    folder: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"sqlite:///{folder / 'pareto.db'}"
    study = _make_study(url, name="front", objective=["val_accuracy", "n_params"])
    _add(study, [0.8, 1200], 1200, 4)
    _add(study, [0.9, 1500], 1500, 6)
    _add(study, [0.7, 1600], 1600, 7)  # dominated
    assert main(["study", "show", "front", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "pareto front (2 trials):" in out and "trial 0: val_accuracy=0.8, n_params=1200" in out
    assert "trial 2:" not in out


def test_study_extend_gives_a_done_study_more_trials(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{folder / 'extend.db'}"
    study = _make_study(url, name=unique("ext"), n_trials=1)
    _add(study, [0.8], 1200, 4)
    study.set_user_attr(studies.STATE_ATTR, "done")
    assert main(["study", "extend", study.study_name, "--n-trials", "1", "--storage", url]) == 2
    assert "has 1 finished trials" in _one_error_line(capsys.readouterr().err)
    assert main(["study", "extend", study.study_name, "--n-trials", "3", "--storage", url]) == 0
    assert capsys.readouterr().out.strip() == f"study {study.study_name}: n_trials 3; running"
    assert studies.study_state(study) == "running"
    assert main(["study", "extend", study.study_name, "--storage", url]) == 2
    assert "give --n-trials" in _one_error_line(capsys.readouterr().err), "checked before the storage opens"


@pytest.mark.parametrize(("name", "value"), [("DENDRO_HEARTBEAT_INTERVAL", "often"),
                                           ("DENDRO_FAULT_EPOCH_SECONDS", "-1")])
def test_a_bad_setting_in_the_environment_is_one_line_and_exit_2(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str, value: str,
) -> None:
    monkeypatch.setenv(name, value)
    assert main(["study", "list"]) == 2
    assert f"invalid setting: {name}" in _one_error_line(capsys.readouterr().err)
    assert _listing(folder) == ["spec.json"]
