"""`dendro search` and `dendro study`: the issue's spec JSON runs, and bad input exits 2 with one message."""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from service_helpers import DENDRO, free_port

import studies
from service.cli import build_parser, main

#: the spec of issue 3, verbatim
ISSUE_SPEC: dict[str, Any] = {
    "name": "fmnist-8k", "model": "dendritic_simple", "dataset": "fashion-mnist",
    "max_params": 8000, "n_trials": 50, "n_epochs": 15, "batch_size": 256,
    "search_space": {
        "n_neurons": {"type": "int", "low": 5, "high": 20},
        "n_dendrites": {"type": "int", "low": 3, "high": 15},
        "n_dendrite_inputs": {"type": "int", "low": 16, "high": 256, "log": True},
        "lr": {"type": "float", "low": 0.0001, "high": 0.01, "log": True},
        "synaptic_resampling": [True, False]},
    "sampler": "tpe", "pruner": "median",
}
#: what turns the issue's search into a quick one on digits
QUICK = ["--dataset", "digits", "--n-trials", "2", "--n-epochs", "1", "--subset-size", "300",
         "--device", "cpu"]


def _run(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DENDRO), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@dataclass
class Searched:
    result: subprocess.CompletedProcess[str]
    storage: str
    folder: Path


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Searched:
    folder = tmp_path_factory.mktemp("search")
    (folder / "fmnist-8k.json").write_text(json.dumps(ISSUE_SPEC))
    storage = f"sqlite:///{folder / 'search.db'}"
    result = _run("search", "--spec", "fmnist-8k.json", *QUICK, "--storage", storage, cwd=folder)
    return Searched(result, storage, folder)


@pytest.mark.slow
def test_search_runs_the_issue_spec_with_the_command_line_overrides(searched: Searched) -> None:
    assert searched.result.returncode == 0, searched.result.stderr[-3000:]
    assert "study fmnist-8k: 2 finished" in searched.result.stdout
    study, spec = studies.load_study("fmnist-8k", searched.storage)
    assert spec.dataset == "digits" and spec.n_trials == 2 and spec.n_epochs == 1
    assert spec.model_dump(include={"max_params", "batch_size", "sampler", "pruner", "search_space"}) == {
        k: ISSUE_SPEC[k] for k in ("max_params", "batch_size", "sampler", "pruner", "search_space")}
    c = studies.progress(study)
    assert c["finished"] == 2 and c["running"] == 0
    for t in study.get_trials(deepcopy=False):
        if t.state.is_finished() and not studies.is_infeasible(t):
            assert t.user_attrs["n_params"] <= 8000


@pytest.mark.slow
def test_study_export_writes_json_and_csv_that_match_the_study(searched: Searched) -> None:
    assert searched.result.returncode == 0
    out = searched.folder / "out"
    r = _run("study", "export", "fmnist-8k", "--storage", searched.storage, "--out", str(out),
             "--format", "json,csv", cwd=searched.folder)
    assert r.returncode == 0, r.stderr[-3000:]
    study, _ = studies.load_study("fmnist-8k", searched.storage)
    doc = json.loads((out / "fmnist-8k.json").read_text())
    assert "fmnist-8k" in json.dumps(doc)
    rows = list(csv.DictReader((out / "fmnist-8k.csv").open()))
    assert len(rows) == len(study.trials)


def test_search_with_a_grid_visits_every_point_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In this process: the installed command is run by the tests above, and a new interpreter
    # would spend far longer importing torch than searching.
    spec = {"name": "grid", "dataset": "digits", "subset_size": 300, "n_trials": 4, "n_epochs": 1,
            "sampler": "grid", "pruner": "none",
            "search_space": {"n_neurons": [4, 6], "n_dendrites": [2, 3], "n_dendrite_inputs": [8]}}
    (tmp_path / "grid.json").write_text(json.dumps(spec))
    storage = f"sqlite:///{tmp_path / 'grid.db'}"
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--spec", "grid.json", "--device", "cpu", "--storage", storage]) == 0
    study, _ = studies.load_study("grid", storage)
    points = sorted((t.params["n_neurons"], t.params["n_dendrites"]) for t in study.trials)
    assert points == [(4, 2), (4, 3), (6, 2), (6, 3)]


@pytest.fixture
def specs(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "good.json").write_text(json.dumps({**ISSUE_SPEC, "dataset": "digits"}))
    (tmp_path / "broken.json").write_text('{"name": "x", "dataset": ')
    (tmp_path / "typo.json").write_text(json.dumps({**ISSUE_SPEC, "dataset": "digits", "n_epoch": 3}))
    (tmp_path / "list.json").write_text("[1, 2]")
    yield tmp_path


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--preset", "no-such-preset"], ["unknown preset 'no-such-preset'", "optimize-budget"]),
        (["--spec", "broken.json"], ["broken.json is not valid JSON"]),
        (["--spec", "missing.json"], ["no such file 'missing.json'"]),
        (["--spec", "list.json"], ["must hold a JSON object"]),
        (["--spec", "typo.json"], ["n_epoch", "unknown key"]),
        (["--spec", "good.json", "--max-params", "10"], ["max_params", "smallest model has"]),
        (["--spec", "good.json", "--storage", "dendro.db"], ["'dendro.db' is not a database URL"]),
        (["--spec", "good.json", "--storage", "postgresql+psycopg://postgres@127.0.0.1:{port}/test"],
         ["cannot reach the database"]),
        (["--preset", "dendrite-growth", "--population", "4"], ["population", "one trial at a time"]),
        (["--spec", "good.json", "--population", "0"], ["--population", "positive integer or 'auto'"]),
    ],
    ids=["bad-preset", "malformed-spec", "missing-spec", "spec-not-an-object", "unknown-key",
         "impossible-budget", "storage-not-a-url", "storage-unreachable", "preset-without-population",
         "bad-population"],
)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(
    specs: Path, args: list[str], words: list[str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(specs)
    args = [a.replace("{port}", str(free_port())) for a in args]
    if "--storage" not in args:
        args += ["--storage", f"sqlite:///{specs / 'out.db'}"]
    before = sorted(p.name for p in specs.iterdir())
    assert main(["search", *args, "--out", str(specs / "results")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dendro: error: "), err
    for w in words:
        assert w in lines[0], lines[0]
    assert sorted(p.name for p in specs.iterdir()) == before, "nothing is written"


def test_search_population_trains_a_specs_trials_together(specs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(specs)
    storage = f"sqlite:///{specs / 'pop.db'}"
    assert main(["search", "--spec", "good.json", "--n-trials", "4", "--n-epochs", "1", "--subset-size",
                 "300", "--device", "cpu", "--population", "4", "--storage", storage]) == 0
    study, _ = studies.load_study(ISSUE_SPEC["name"], storage)
    done = [t for t in study.trials if t.state.is_finished()]
    assert len(done) == 4
    assert max(t.user_attrs["population_size"] for t in done) > 1


@pytest.mark.slow
def test_the_installed_command_exits_2_on_an_impossible_budget(specs: Path) -> None:
    r = _run("search", "--spec", "good.json", "--max-params", "10", "--storage",
             f"sqlite:///{specs / 'out.db'}", cwd=specs, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "smallest model has" in r.stderr and "Traceback" not in r.stderr
    assert not (specs / "out.db").exists()


@pytest.mark.slow
def test_a_worker_loads_no_web_code(tmp_path: Path) -> None:
    """Nor torchvision, which pulls in torch._dynamo (~3 s of every worker's start) for the
    two ResNet families alone: it is imported when one is built."""
    probe = ("import sys, service.cli, service.worker, studies, core; "
             "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'optuna_dashboard', "
             "'torchvision', 'torch._dynamo') if m in sys.modules))")
    r = subprocess.run([str(DENDRO.with_name("python")), "-c", probe], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_compare_resamples_by_default_and_says_how_often(capsys: pytest.CaptureFixture[str]) -> None:
    # fewer epochs than the default, with steps that still fit several resampling steps in
    assert main(["compare", "--epochs", "2", "--steps-to-resample", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(":")[0].strip(): line for line in out.splitlines() if "resampling events" in line}
    assert set(rows) == {"dendritic (resampling)", "dendritic (static)"}, out
    assert "dendritic (static): 0 resampling events (0 connections swapped)" in out
    events = int(rows["dendritic (resampling)"].split(":")[1].split()[0])
    assert events == (2 * 21) // 8, out  # 1294 training examples / batch 64 = 21 steps an epoch
    assert "no resampling happened" not in out
    defaults = build_parser().parse_args(["compare"])
    assert defaults.epochs * -(-1294 // defaults.batch_size) // defaults.steps_to_resample >= 5, \
        "the defaults resample several times on digits"
