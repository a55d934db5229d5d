"""The diru-vs-lstm preset and regression studies of the recurrent families."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import FixedTrial

import core
import studies
from studies import StudySpec, run_study, split_params
from studies import _diru as diru  # exported from studies once the package imports it

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

FAMILIES = ["diru", "lstm", "gru"]
TASKS = ["multi_sine", "delay_recall", "lorenz"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Per-step matmuls of these models are tiny: a second intra-op thread only adds
    # contention on a loaded two-core machine (several times slower there).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the preset end to end --------------------------------------------------------------------
def test_preset_compares_every_task_and_family_under_one_budget(
    sqlite_url: str, tmp_path: Path, one_thread: None
) -> None:
    max_params = 3000
    res = studies.get_preset("diru-vs-lstm").function(
        max_params=max_params, n_trials=2, n_epochs=2, n_seeds=2, subset_size=60,
        max_layers=1, storage=sqlite_url, out_dir=tmp_path, device="cpu", show_progress=False,
    )
    assert isinstance(res, diru.RecurrentComparison)
    assert [(r["task"], r["family"]) for r in res.table] == [(t, f) for t in TASKS for f in FAMILIES]
    for r in res.table:
        for key in ("test_mse_mean", "test_mse_std", "seconds_per_epoch", "epochs_to_converge"):
            assert math.isfinite(r[key]), (r["task"], r["family"], key)
        assert r["seeds"] == 2 and r["trials"] == 2
        assert 0 < r["n_params"] <= max_params
        assert 1 <= r["epochs_to_converge"] <= 2

    # every trained trial of every study stayed under the budget, counted exactly
    assert len(res.studies) == 9
    for name in res.studies:
        study = optuna.load_study(study_name=name, storage=sqlite_url)
        spec = studies.study_spec(study)
        assert spec.objectives == ["val_mse"] and spec.directions == ["minimize"]
        trained = studies.trained_trials(study)
        assert trained
        for t in trained:
            family, args, _ = split_params(spec, t.params)
            assert t.user_attrs["n_params"] <= max_params
            assert core.count_parameters(core.create_model(family, **args)) == t.user_attrs["n_params"]

    assert [e["task"] for e in res.improvements] == TASKS
    for e in res.improvements:
        rows = {r["family"]: r for r in res.table if r["task"] == e["task"]}
        expected = (rows["lstm"]["test_mse_mean"] - rows["diru"]["test_mse_mean"]) \
            / rows["lstm"]["test_mse_mean"] * 100
        assert e["vs_lstm_pct"] == pytest.approx(expected)
        assert math.isfinite(e["vs_gru_pct"])
        assert e["seed_claim_vs_lstm_pct"] == diru.SEED_CLAIMS[e["task"]]

    summary = json.loads((tmp_path / "diru-vs-lstm-summary.json").read_text())
    assert summary["table"][0]["test_mse_mean"] == pytest.approx(res.table[0]["test_mse_mean"])
    assert len(summary["seeds"]["lorenz"]["diru"]["runs"]) == 2
    report = (tmp_path / "diru-vs-lstm-report.html").read_text()
    assert "plotly" in report and "test predictions" in report and "MSE per epoch" in report
    text = diru.format_comparison(res)
    assert "+24.9" in text and "delay_recall" in text


def test_preset_in_population_mode_trains_trials_together_and_retrains_the_same(
    tmp_path: Path, one_thread: None
) -> None:
    # One task, two families: the population path against the one-trial path, same settings.
    kw: dict[str, Any] = dict(max_params=3000, dataset="multi_sine", families=("diru", "lstm"),
                              n_trials=4, n_epochs=2, n_seeds=2, subset_size=60, max_layers=1,
                              device="cpu", show_progress=False)
    pop_url = f"sqlite:///{tmp_path / 'pop.db'}"
    pop = diru.diru_vs_lstm(storage=pop_url, population=4, **kw)
    assert pop.settings["population"] == 4
    sizes = []
    for name in pop.studies:
        study = optuna.load_study(study_name=name, storage=pop_url)
        trained = studies.trained_trials(study)
        assert len(trained) == 4
        assert all(t.user_attrs["n_params"] <= 3000 for t in trained)
        sizes += [t.user_attrs["population_size"] for t in trained]
    assert max(sizes) > 1, sizes  # trials really trained side by side

    # The re-trainings of a configuration are the same whichever path trains them: re-train
    # each selected configuration one model at a time and compare the seeds' test MSE.
    for row in pop.table:
        spec = StudySpec(model=row["family"], dataset="multi_sine", max_params=3000,
                         objective="val_mse", n_epochs=2, subset_size=60,
                         search_space=diru.recurrent_space(row["family"], "multi_sine", 3000,
                                                           max_layers=1))
        study = optuna.load_study(study_name=row["study"], storage=pop_url)
        alone, _ = diru._retrain_best(study, spec, "multi_sine", row["family"], 2, torch.device("cpu"),
                                      None, 0.05, 10, False, together=False)
        assert row["test_mse_seeds"] == pytest.approx(alone["test_mse_seeds"], rel=1e-4, abs=1e-6)


def test_preset_is_registered_and_takes_the_clis_dataset_as_tasks(sqlite_url: str) -> None:
    preset = studies.get_preset("diru_vs_lstm")
    assert preset.name == "diru-vs-lstm" and preset.function is diru.diru_vs_lstm
    with pytest.raises(studies.SpecError, match="choose from .*multi_sine"):
        diru.diru_vs_lstm(dataset="digits", storage=sqlite_url, show_progress=False)
    with pytest.raises(studies.SpecError, match="non-recurrent"):
        diru.diru_vs_lstm(families=("diru", "dendritic_simple"), storage=sqlite_url,
                          show_progress=False)
    with pytest.raises(studies.SpecError, match="n_seeds"):
        diru.diru_vs_lstm(n_seeds=0, storage=sqlite_url, show_progress=False)


# -- regression studies of the recurrent families -------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_regression_spec_of_each_family_validates_and_runs(
    family: str, task: str, one_thread: None
) -> None:
    space = diru.recurrent_space(family, task, 2000, max_layers=1)
    spec = StudySpec(name=f"{family}-{task}", model=family, dataset=task, search_space=space,
                     max_params=2000, n_trials=1, n_epochs=1, subset_size=40, pruner="none")
    assert spec.objectives == ["val_loss"] and spec.directions == ["minimize"]
    study = run_study(spec, optuna.storages.InMemoryStorage(), show_progress=False, device="cpu")
    (t,) = study.trials
    assert t.state == optuna.trial.TrialState.COMPLETE, t.user_attrs.get("fail_reason")
    assert t.value is not None and math.isfinite(t.value)
    assert t.value == pytest.approx(t.user_attrs["val_loss"])
    assert t.user_attrs["val_accuracy"] is None and math.isfinite(t.user_attrs["test_loss"])
    assert t.user_attrs["n_params"] <= 2000


@pytest.mark.parametrize("family", FAMILIES)
def test_recurrent_space_fits_the_budget_at_its_largest_hidden_size(family: str) -> None:
    space = diru.recurrent_space(family, "lorenz", 5000)
    high = space["hidden_size"]["high"]
    spec = StudySpec(model=family, dataset="lorenz", search_space=space, max_params=5000)
    smallest: dict[str, Any] = {k: 1 for k in ("num_layers", "num_compartments") if k in space}
    assert studies.count_point(spec, {**smallest, "hidden_size": high}) <= 5000
    assert studies.count_point(spec, {**smallest, "hidden_size": high + 1}) > 5000
    assert ("num_compartments" in space) == ("global_gate_bias" in space) == (family == "diru")
    assert "dropout" in space and "lr" in space


def test_recurrent_space_is_a_pure_function_of_a_trial() -> None:
    space = studies.parse_space(diru.recurrent_space("diru", "multi_sine", 5000))
    point = {"hidden_size": 20, "num_layers": 2, "dropout": 0.1, "lr": 0.01,
             "num_compartments": 3, "global_gate_bias": -2.0}
    assert studies.suggest(FixedTrial(point), space) == point


def test_searched_dropout_and_gate_bias_reach_the_model_and_leave_the_count() -> None:
    base = {"in_dim": 3, "out_dim": 2, "hidden_size": 9, "num_layers": 2}
    model = core.create_model("diru", **base, dropout=0.2, global_gate_bias=-2.0)
    assert isinstance(model, core.DIRU) and model.dropout.p == 0.2
    for cell in model.cells:
        assert isinstance(cell, core.DIRUCell)
        assert torch.equal(cell.global_gate.bias, torch.full((9,), -2.0))
    assert core.count_parameters(model) == core.analytic_parameter_count(
        "diru", **base, dropout=0.2, global_gate_bias=-2.0) == core.count_parameters(
        core.create_model("diru", **base))
    for family in ("lstm", "gru"):
        m = core.create_model(family, **base, dropout=0.3)
        assert m.rnn.dropout == 0.3  # type: ignore[union-attr]
        assert core.count_parameters(m) == core.analytic_parameter_count(family, **base)


# -- definitions ------------------------------------------------------------------------------
def test_epochs_to_converge_is_the_first_epoch_within_tolerance_of_the_best() -> None:
    vals = [1.0, 0.5, 0.2, 0.104, 0.1, 0.12]
    assert diru.epochs_to_converge(vals, 0.05) == 4  # 0.104 <= 1.05 * 0.1
    assert diru.epochs_to_converge(vals, 0.0) == 5
    assert diru.epochs_to_converge([float("nan"), 0.3], 0.05) == 2
    assert diru.epochs_to_converge([float("nan")]) is None
    with pytest.raises(ValueError, match="tolerance"):
        diru.epochs_to_converge(vals, -0.1)


def test_improvement_is_positive_when_diru_has_the_lower_mse() -> None:
    assert diru.improvement(0.031, 0.024) == pytest.approx(22.58, abs=0.01)
    assert diru.improvement(1.0, 1.5) == pytest.approx(-50.0)
    assert math.isnan(diru.improvement(0.0, 1.0))
