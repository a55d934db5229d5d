"""Finalize: the top trials re-trained with fresh seeds, chosen on validation, stored on the study."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna
import pytest

import core
import studies
from studies import _finalize

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _spec(name: str, **over: Any) -> studies.StudySpec:
    raw: dict[str, Any] = {
        "name": name, "model": "dendritic_simple", "dataset": "digits", "max_params": 3000,
        "n_trials": 4, "n_epochs": 2, "batch_size": 256, "subset_size": 300, "sampler": "random",
        "pruner": "none",
        "search_space": {
            "n_neurons": {"type": "int", "low": 4, "high": 10},
            "n_dendrites": {"type": "int", "low": 2, "high": 6},
            "n_dendrite_inputs": {"type": "int", "low": 4, "high": 16},
            "lr": {"type": "float", "low": 0.003, "high": 0.03, "log": True},
        },
    }
    raw.update(over)
    return studies.StudySpec.model_validate(raw)


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite file with a finished 4-trial digits study (copied per test)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('fin') / 'base.db'}"
    studies.run_study(_spec("fin"), storage=url, show_progress=False, device="cpu")
    return url


@pytest.fixture
def study(searched: str, tmp_path: Path) -> optuna.Study:
    db = tmp_path / "s.db"
    base = Path(searched.removeprefix("sqlite:///"))
    for suffix in ("", "-wal", "-shm"):  # WAL mode: the last writes may sit in the -wal file
        if base.with_name(base.name + suffix).exists():
            db.with_name(db.name + suffix).write_bytes(base.with_name(base.name + suffix).read_bytes())
    s, _ = studies.load_study("fin", studies.open_storage(f"sqlite:///{db}"))
    return s


def _result(val: float, test: float, seed: int = 0) -> core.TrainResult:
    return core.TrainResult(history=[{"epoch": 1, "val_accuracy": val, "test_accuracy": test,
                                      "val_loss": 1 - val, "test_loss": 1 - test}], seed=seed)


def test_a_request_names_the_bad_field(study: optuna.Study) -> None:
    for kwargs, field in (({"top_n": 0}, "top_n"), ({"seeds": 0}, "seeds"), ({"n_epochs": 0}, "n_epochs"),
                          ({"n_epochs": 5, "max_epochs": 4}, "n_epochs")):
        with pytest.raises(studies.SpecError) as err:
            studies.request_finalize(study, **kwargs)  # type: ignore[arg-type]
        assert err.value.field == field


def test_a_study_without_a_complete_trial_cannot_be_finalized(tmp_path: Path) -> None:
    s = studies.create_study(_spec("empty"), f"sqlite:///{tmp_path / 'e.db'}")
    with pytest.raises(studies.StateError, match="no complete trial"):
        studies.request_finalize(s)
    assert not studies.pending_finalize(s)


def test_a_second_request_while_one_is_queued_is_a_state_error(study: optuna.Study) -> None:
    r = studies.request_finalize(study, top_n=2, seeds=2, n_epochs=1)
    assert r["state"] == "queued" and (r["top_n"], r["seeds"], r["n_epochs"]) == (2, 2, 1)
    assert studies.pending_finalize(study)
    with pytest.raises(studies.StateError, match="queued already"):
        studies.request_finalize(study)
    assert studies.final_of(study.user_attrs)["state"] == "queued"


def test_n_epochs_defaults_to_the_spec(study: optuna.Study) -> None:
    assert studies.request_finalize(study)["n_epochs"] == 2


def test_only_one_worker_takes_a_request_and_a_silent_one_is_taken_over(study: optuna.Study) -> None:
    studies.request_finalize(study, top_n=1, seeds=1, n_epochs=1)
    assert _finalize.take_finalize(study, "w1") is not None
    assert _finalize.take_finalize(study, "w2") is None
    assert not studies.pending_finalize(study)
    r = study.user_attrs[studies.FINALIZE_ATTR]
    study.set_user_attr(studies.FINALIZE_ATTR, {**r, "beat_at": time.time() - 10_000})
    assert studies.pending_finalize(study)
    taken = _finalize.take_finalize(study, "w2")
    assert taken is not None and taken["worker"] == "w2"


def test_finalize_retrains_the_top_trials_in_a_population_and_stores_the_answer(study: optuna.Study) -> None:
    spec = studies.study_spec(study)
    studies.request_finalize(study, top_n=2, seeds=2, n_epochs=1)
    final = studies.run_finalize(study, spec, device="cpu")
    stored = study.user_attrs[studies.FINAL_ATTR]
    assert stored == final and final["state"] == "done" and final["mode"] == "population"
    assert study.user_attrs[studies.FINALIZE_ATTR]["state"] == "done"
    assert studies.final_of(study.user_attrs) == final
    complete = sorted(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)),
                      key=lambda t: (-t.values[0], t.number))
    top = [t.number for t in complete[:2]]
    assert [c["trial"] for c in final["candidates"]] == top
    assert len(final["candidates"][0]["runs"]) == 2
    best = max(enumerate(final["candidates"]), key=lambda ic: (ic[1]["val_accuracy_mean"], -ic[0]))[1]
    assert final["trial"] == best["trial"]
    for key in ("val_accuracy_mean", "val_accuracy_std", "test_accuracy_mean", "test_accuracy_std"):
        assert isinstance(final[key], float), key
    assert 0.0 < final["test_accuracy_mean"] <= 1.0
    chosen = study.trials[final["trial"]]
    assert final["params"] == chosen.params and final["n_params"] == chosen.user_attrs["n_params"]
    assert (final["seeds"], final["n_epochs"], final["top_n"]) == (2, 1, 2)


def test_the_html_report_has_a_final_answer_section_once_finalized(
    study: optuna.Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (before,) = studies.export_study(study, tmp_path / "a", formats=("html",))
    assert "Final answer" not in Path(before).read_text()
    monkeypatch.setattr(_finalize.core, "train_population",
                        lambda model, configs, *a, **k: [_result(0.9, 0.8765)] * len(configs))
    studies.request_finalize(study, top_n=2, seeds=2, n_epochs=1)
    final = studies.run_finalize(study, device="cpu")
    (after,) = studies.export_study(study, tmp_path / "b", formats=("html",))
    text = Path(after).read_text()
    assert "<h2>Final answer</h2>" in text and "test accuracy 87.65% ± 0.00%" in text
    assert f"Trial {final['trial']}, {final['n_params']} parameters" in text


def test_selection_uses_validation_and_never_test(study: optuna.Study, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first candidate is better on validation, the second far better on test: the first wins."""

    def fake(model: str, configs: list[dict[str, Any]], *a: Any, **k: Any) -> list[core.TrainResult]:
        n = len(configs) // 2
        return [_result(0.9, 0.5)] * n + [_result(0.8, 0.99)] * n

    monkeypatch.setattr(_finalize.core, "train_population", fake)
    studies.request_finalize(study, top_n=2, seeds=3, n_epochs=1)
    final = studies.run_finalize(study, device="cpu")
    assert final["trial"] == final["candidates"][0]["trial"]
    assert final["test_accuracy_mean"] == pytest.approx(0.5)
    assert final["val_accuracy_mean"] == pytest.approx(0.9) and final["val_accuracy_std"] == 0.0


def test_a_family_that_cannot_be_stacked_trains_one_model_at_a_time(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(studies, "population_supported", lambda spec: "not today")
    seen: list[int] = []
    real = core.train_model

    def counting(model: Any, data: Any, **kw: Any) -> core.TrainResult:
        seen.append(kw["seed"])
        return real(model, data, **kw)

    monkeypatch.setattr(_finalize.core, "train_model", counting)
    studies.request_finalize(study, top_n=1, seeds=2, n_epochs=1)
    final = studies.run_finalize(study, device="cpu")
    assert final["mode"] == "single" and len(set(seen)) == 2
    assert final["test_accuracy_std"] is not None


def test_an_error_is_stored_on_the_request_and_the_worker_lives_on(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*a: Any, **k: Any) -> list[core.TrainResult]:
        raise RuntimeError("the device caught fire")

    monkeypatch.setattr(_finalize.core, "train_population", broken)
    studies.request_finalize(study, top_n=1, seeds=2, n_epochs=1)
    assert studies.serve_finalize(study._storage, "cpu", None, "w-test") is True
    r = study.user_attrs[studies.FINALIZE_ATTR]
    assert r["state"] == "error" and "caught fire" in r["reason"] and r["worker"] == "w-test"
    assert studies.final_of(study.user_attrs)["state"] == "error"
    assert studies.serve_finalize(study._storage, "cpu", None, "w-test") is False
    studies.request_finalize(study, top_n=1, seeds=1, n_epochs=1)  # an error can be asked again


def test_a_trials_recipe_travels_with_its_population_member() -> None:
    spec = _spec("recipe")
    assert _finalize._recipe_changes(spec, {"lr": 0.01, "weight_decay": 0.0}) == {}
    changed = _finalize._recipe_changes(spec, {"lr": 0.01, "weight_decay": 0.0, "lr_schedule": "cosine",
                                               "label_smoothing": 0.1, "augment": "none", "batch_size": 64})
    assert changed == {"lr_schedule": "cosine", "label_smoothing": 0.1, "batch_size": 64}


def test_a_bio_studys_rules_travel_with_its_population_members(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A bio study of dendritic_simple trains in a population; its finalize must too, rules included.
    url = f"sqlite:///{tmp_path / 'bio.db'}"
    spec = _spec("bio-fin", n_trials=2, bio={"apply_dales_principle": True},
                 search_space={"bio.fuzzy_lr_distribution": ["uniform", "gamma"],
                               "lr": {"type": "float", "low": 0.003, "high": 0.03, "log": True}},
                 model_params={"n_neurons": 6, "n_dendrites": 3, "n_dendrite_inputs": 12})
    study = studies.run_study(spec, storage=url, show_progress=False, device="cpu", population=2)
    seen: list[dict[str, Any]] = []
    real = core.train_population

    def spy(model: str, configs: list[dict[str, Any]], *a: Any, **k: Any) -> list[core.TrainResult]:
        seen.extend(configs)
        return real(model, configs, *a, **k)

    monkeypatch.setattr(_finalize.core, "train_population", spy)
    studies.request_finalize(study, top_n=2, seeds=2, n_epochs=1)
    final = studies.run_finalize(study, device="cpu")
    assert final["mode"] == "population" and len(seen) == 4
    for c in seen:
        assert c["bio"]["apply_dales_principle"] is True
        assert c["bio"]["fuzzy_lr_distribution"] in ("uniform", "gamma")
