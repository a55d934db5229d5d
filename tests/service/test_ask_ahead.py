"""A single-trial worker of short trials asks several at once; a stop fails the unstarted ones."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from service_helpers import tiny_spec

import studies
from service import worker as worker_mod
from service.worker import Worker, WorkerConfig


def _queued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
            n_trials: int = 20) -> tuple[str, studies.StudySpec, Worker]:
    """A study of short trials and a worker that has run two of them, with trials asked ahead."""
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    spec = studies.StudySpec(**tiny_spec(name, n_trials=n_trials, n_epochs=1))
    studies.create_study(spec, url, name)
    # whatever this machine's speed, the trials are "short": the most asked at once
    monkeypatch.setattr(worker_mod, "ASK_AHEAD_SECONDS", 1e6)
    w = Worker(WorkerConfig(storage=url, device="cpu", studies=[name]))
    assert w.run_once() and not w._ahead, "the first trial of a study is asked alone"
    assert isinstance(w._storage, studies.BatchingStorage), "a worker opens the batching storage"
    assert w.run_once()
    assert w._ahead
    return url, spec, w


def test_a_worker_of_short_trials_asks_ahead_and_a_stop_fails_only_the_unstarted_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    n_trials = 30
    url, _, w = _queued(tmp_path, monkeypatch, "ahead", n_trials)
    assert len(w._ahead) == worker_mod.MAX_ASK_AHEAD - 1, "then several at once, one run"
    unstarted = {t.number for *_, t, _ in w._ahead}
    w.stop_requested.set()
    assert w.run() == 0  # stops at once: the trials asked ahead are failed, visibly

    trials = optuna.load_study(study_name="ahead", storage=url).get_trials()
    by_number = {t.number: t for t in trials}
    for number in unstarted:
        t = by_number[number]
        assert t.state == TrialState.FAIL and not t.params, "never started: no point drawn, none lost"
        assert t.user_attrs["fail_reason"] == "the worker stopped before this trial started"
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 2, TrialState.FAIL: len(unstarted)}

    # another worker finishes the study: exactly n_trials, no number twice, none left running
    again = Worker(WorkerConfig(storage=url, device="cpu", studies=["ahead"], idle_exit=0.5, poll_interval=0.1))
    assert again.run() == 0
    trials = optuna.load_study(study_name="ahead", storage=url).get_trials()
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == n_trials
    assert not states[TrialState.RUNNING] and not states[TrialState.WAITING]
    assert len({t.number for t in trials}) == len(trials)
    # asked in batches: trials created in one transaction share their start
    batches = Counter(t.datetime_start for t in trials if t.state == TrialState.COMPLETE)
    assert max(batches.values()) > 1
    assert studies.study_state(optuna.load_study(study_name="ahead", storage=url)) == "done"


def test_a_worker_of_long_trials_asks_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'one.db'}"
    spec = studies.StudySpec(**tiny_spec("one", n_trials=4, n_epochs=1))
    studies.create_study(spec, url, "one")
    monkeypatch.setattr(worker_mod, "ASK_AHEAD_SECONDS", 1e-9)  # every trial is "long"
    w = Worker(WorkerConfig(storage=url, device="cpu", studies=["one"], idle_exit=0.5, poll_interval=0.1))
    assert w.run() == 0
    trials = optuna.load_study(study_name="one", storage=url).get_trials()
    assert len(trials) == 4 and len({t.datetime_start for t in trials}) == 4, "one ask per trial"


def test_trials_asked_ahead_of_a_study_stopped_since_are_failed_unstarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, _, w = _queued(tmp_path, monkeypatch, "stop")
    unstarted = {t.number for *_, t, _ in w._ahead}
    optuna.load_study(study_name="stop", storage=url).set_user_attr(studies.STATE_ATTR, "stopped")
    w._state_seen = None  # as after STATE_POLL seconds
    while w._ahead:
        assert w.run_once()
    trials = {t.number: t for t in optuna.load_study(study_name="stop", storage=url).get_trials()}
    for number in unstarted:
        assert trials[number].state == TrialState.FAIL and not trials[number].params
        assert trials[number].user_attrs["fail_reason"] == "the study was stopped before this trial started"
    assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials.values())
    w.stop_requested.set()
    assert w.run() == 0


def test_a_grid_study_is_never_asked_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid sampler gives a trial its grid point at the ask: a trial asked ahead and failed
    unstarted would take its point with it (found in review)."""
    url = f"sqlite:///{tmp_path / 'grid.db'}"
    grid = {"n_neurons": {"type": "categorical", "choices": [4, 6]},
            "n_dendrites": {"type": "categorical", "choices": [2, 3]},
            "n_dendrite_inputs": {"type": "categorical", "choices": [4, 8]},
            "lr": {"type": "categorical", "choices": [0.01]}}
    spec = studies.StudySpec(**tiny_spec("grid", sampler="grid", n_trials=8, n_epochs=1, search_space=grid))
    studies.create_study(spec, url, "grid")
    monkeypatch.setattr(worker_mod, "ASK_AHEAD_SECONDS", 1e6)
    w = Worker(WorkerConfig(storage=url, device="cpu", studies=["grid"]))
    assert w.run_once() and w.run_once() and not w._ahead
    w.stop_requested.set()
    assert w.run() == 0
    again = Worker(WorkerConfig(storage=url, device="cpu", studies=["grid"], idle_exit=0.5, poll_interval=0.1))
    assert again.run() == 0
    trials = optuna.load_study(study_name="grid", storage=url).get_trials()
    trained = {tuple(sorted(t.params.items())) for t in trials if t.state == TrialState.COMPLETE}
    assert len(trained) == 8, "every grid point trained"


def test_trials_asked_ahead_of_a_study_deleted_and_created_again_are_dropped_untold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLite reuses a deleted study's id, and so its trials' ids: the trials asked ahead of the
    old study must not be trained and told into the new study's trials (found in review)."""
    url, spec, w = _queued(tmp_path, monkeypatch, "again")
    n_ahead = len(w._ahead)
    studies.delete_study(url, "again")
    studies.create_study(spec, url, "again")
    other = optuna.load_study(study_name="again", storage=url)
    held = [other.ask() for _ in range(n_ahead + 2)]  # another client's trials, ids reused
    w._state_seen = None
    while w._ahead:
        assert w.run_once()
    trials = optuna.load_study(study_name="again", storage=url).get_trials()
    assert [t.number for t in trials] == [t.number for t in held]
    assert all(t.state == TrialState.RUNNING and not t.user_attrs for t in trials), "nothing told into them"
    w.stop_requested.set()
    assert w.run() == 0
    assert all(t.state == TrialState.RUNNING for t in optuna.load_study(study_name="again", storage=url).get_trials())


def test_trials_asked_ahead_of_a_study_extended_since_are_failed_unstarted_and_it_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Extending a study gives it a new uid (workers read its spec again): the trials asked ahead
    are still the study's, so they are failed visibly, not left RUNNING under a live lease as if
    the study were gone (found in review); the study then completes its new number of trials."""
    url, _, w = _queued(tmp_path, monkeypatch, "grown", n_trials=12)
    unstarted = {t.number for *_, t, _ in w._ahead}
    studies.extend_study(optuna.load_study(study_name="grown", storage=url), n_trials=16)
    w._state_seen = None
    while w._ahead:
        assert w.run_once()
    by_number = {t.number: t for t in optuna.load_study(study_name="grown", storage=url).get_trials()}
    for number in unstarted:
        t = by_number[number]
        assert t.state == TrialState.FAIL and not t.params
        assert t.user_attrs["fail_reason"] == "the study changed before this trial started"
    w.stop_requested.set()
    assert w.run() == 0

    again = Worker(WorkerConfig(storage=url, device="cpu", studies=["grown"], idle_exit=0.5, poll_interval=0.1))
    assert again.run() == 0
    trials = optuna.load_study(study_name="grown", storage=url).get_trials()
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 16
    assert not states[TrialState.RUNNING] and not states[TrialState.WAITING]
