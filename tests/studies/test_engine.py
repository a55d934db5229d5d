"""The trial engine: leases re-queue once, asks share fairly, writes fail alone, the view stays true."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

import studies
from studies import StudySpec, _fast, _lease, _runner

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _spec(tiny_spec: Callable[..., StudySpec], **kw: Any) -> StudySpec:
    return tiny_spec(**({"n_trials": 20, "n_epochs": 2, "max_params": 1500, "sampler": "tpe"} | kw))


def _raw(url: str) -> optuna.storages.RDBStorage:
    """Another process's view of the database: a storage object of its own."""
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})


def _open(url: str, spec: StudySpec, name: str = "s") -> tuple[optuna.Study, StudySpec]:
    st = studies.open_storage(url)
    studies.create_study(spec, st, name)
    return studies.load_study(name, st, sampler_seed=1)


# -- leases ------------------------------------------------------------------------------------------
def test_a_stale_leases_trial_is_failed_and_its_point_queued_once_however_many_reap_together(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec],
) -> None:
    url = f"sqlite:///{tmp_path / 'reap.db'}"
    study, spec = _open(url, _spec(tiny_spec))
    trial = studies.ask_trial(study, spec)
    assert trial is not None
    params = studies.suggest(trial, spec.space)
    fs = _fast.of(study)
    assert fs is not None
    fs.flush([trial._trial_id])
    lease = _lease.lease_for(study._storage)
    assert lease is not None
    raw = _raw(url)
    assert raw.get_trial(trial._trial_id).system_attrs[_lease.LEASE_KEY] == lease.id
    # Still beating: nobody may touch it.
    assert _lease.reap_stale(raw, study._study_id, grace=20) == []
    # The process dies: its lease stops beating.
    lease.close(remove=False)
    _lease._LEASES.pop(str(lease.engine.url))
    with raw.engine.begin() as con:
        con.execute(sa.text("UPDATE dendro_workers SET last_heartbeat = 0 WHERE worker_id = :w"), {"w": lease.id})
    reaped: list[list[int]] = []
    start = threading.Barrier(4)

    def reaper() -> None:
        own = _raw(url)
        start.wait()
        reaped.append(_lease.reap_stale(own, study._study_id, grace=20))

    threads = [threading.Thread(target=reaper) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(map(len, reaped)) == [0, 0, 0, 1], reaped
    trials = raw.get_all_trials(study._study_id)
    dead = next(t for t in trials if t.number == trial.number)
    assert dead.state == TrialState.FAIL and "lease" in dead.user_attrs["fail_reason"]
    assert dead.user_attrs["dendro.state"] == "failed"
    queued = [t for t in trials if t.user_attrs.get("requeued_from") == trial.number]
    assert len(queued) == 1 and queued[0].state == TrialState.WAITING
    assert queued[0].params == params and queued[0].system_attrs["fixed_params"] == params


def test_a_batch_ask_takes_at_most_a_fair_share_and_never_more_than_is_left(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec],
) -> None:
    url = f"sqlite:///{tmp_path / 'fair.db'}"
    study, spec = _open(url, _spec(tiny_spec, n_trials=10), "fair")
    lease = _lease.lease_for(study._storage)
    assert lease is not None
    # Another live worker on the study (and one that is long dead: not counted).
    for wid, beat in (("other", _lease.db_now(lease.engine)), ("dead", sa.literal(0.0))):
        with lease.engine.begin() as con:
            con.execute(_lease.LEASES_TABLE.insert().values(
                worker_id=wid, host="h", pid=1, device="cpu", started_at=0.0, last_heartbeat=beat,
                state="training", study_name="fair", trials_done=0))
    first = studies.ask_trials(study, spec, 100)
    assert len(first) == 5  # ceil(10 / 2 live workers)
    second = studies.ask_trials(study, spec, 100)
    assert len(second) == 5  # the 5 left (the share counts finished trials, not running ones)
    assert studies.ask_trials(study, spec, 100) == []
    assert len({t.number for t in first + second}) == 10


# -- a trial stopped from outside ---------------------------------------------------------------------
def _stopped_and_queued(url: str, study: optuna.Study, numbers: list[int]) -> None:
    """Each trial of ``numbers`` is FAIL with the stop's reason, and its point waits, once."""
    trials = _raw(url).get_all_trials(study._study_id)
    for number in numbers:
        cut = next(t for t in trials if t.number == number)
        assert cut.state == TrialState.FAIL and cut.user_attrs["fail_reason"] == "stopped: stop now"
        assert cut.user_attrs["dendro.state"] == "failed"
        (queued,) = [t for t in trials if t.user_attrs.get("requeued_from") == number]
        assert queued.state == TrialState.WAITING and queued.params == cut.params
        assert queued.system_attrs["fixed_params"] == cut.params


@pytest.mark.parametrize("sampler", ["tpe", "qmc"])  # the batching storage's path, Optuna's plain one
def test_a_stopped_trial_is_failed_and_its_point_queued_in_one_transaction(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec], monkeypatch: pytest.MonkeyPatch, sampler: str,
) -> None:
    url = f"sqlite:///{tmp_path / 'stop.db'}"
    study, spec = _open(url, _spec(tiny_spec, sampler=sampler, n_epochs=3))

    # The queueing fails: the failure is not written either (one transaction), the trial
    # stays RUNNING, and its lease's reaper re-queues it later. Nothing is half-written.
    def broken(*args: Any) -> None:
        raise RuntimeError("the insert failed")

    if sampler == "qmc":
        monkeypatch.setattr(_lease, "queue_again", broken)
        trial = studies.ask_trial(study, spec)
        assert trial is not None
        with pytest.raises(RuntimeError, match="the insert failed"):
            studies.execute_trial(study, trial, spec, device="cpu", should_stop=lambda: "stop now")
        (t,) = _raw(url).get_all_trials(study._study_id)
        assert t.state == TrialState.RUNNING and "fail_reason" not in t.user_attrs
        monkeypatch.undo()
        study, spec = _open(url, _spec(tiny_spec, sampler=sampler, n_epochs=3), "again")

    trial = studies.ask_trial(study, spec)
    assert trial is not None
    assert (_fast.of(study) is not None) == (sampler == "tpe")
    out = studies.execute_trial(study, trial, spec, device="cpu", should_stop=lambda: "stop now")
    assert out.state == "stopped" and out.reason == "stopped: stop now"
    _stopped_and_queued(url, study, [trial.number])
    # The very next ask of this worker takes the queued point.
    again = studies.ask_trial(study, spec)
    assert again is not None and again.user_attrs.get("requeued_from") == trial.number


def test_a_stopped_population_fails_its_members_and_queues_their_points_with_their_tells(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec],
) -> None:
    url = f"sqlite:///{tmp_path / 'stoppop.db'}"
    study, spec = _open(url, _spec(tiny_spec, n_trials=4, n_epochs=3))
    asked = [0]

    def stop_once_started() -> bool | str:  # no stop before the first batch is asked
        asked[0] += 1
        return asked[0] > 1 and "stop now"

    outs = studies.execute_population(study, spec, population_size=4, device="cpu",
                                      should_stop=stop_once_started, max_trials=4)
    stopped = [o.number for o in outs if o.state == "stopped"]
    assert len(stopped) == 4, outs
    _stopped_and_queued(url, study, stopped)


class _AlwaysPrune(optuna.pruners.BasePruner):
    def __init__(self) -> None:
        self.asked: list[int | None] = []

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        self.asked.append(trial.last_step)
        return True


@pytest.mark.parametrize("population", [False, True], ids=["single-trial", "population"])
def test_the_pruner_is_not_asked_after_a_trials_last_epoch(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec], population: bool,
) -> None:
    url = f"sqlite:///{tmp_path / 'last.db'}"
    for n_epochs, want in ((1, "complete"), (3, "pruned")):
        study, spec = _open(url, _spec(tiny_spec, n_trials=2, n_epochs=n_epochs), f"e{n_epochs}")
        pruner = study.pruner = _AlwaysPrune()
        if population:
            outs = studies.execute_population(study, spec, population_size=2, device="cpu", max_trials=2)
        else:
            trial = studies.ask_trial(study, spec)
            assert trial is not None
            outs = [studies.execute_trial(study, trial, spec, device="cpu")]
        assert {o.state for o in outs} == {want}, outs
        assert set(pruner.asked) == ({1} if n_epochs == 3 else set())  # never at the last epoch


# -- the batching storage's defects --------------------------------------------------------------
def test_an_enqueued_point_is_seen_by_the_very_next_ask(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_fast, "MAX_AGE", 3600.0)  # the view would otherwise be reused
    url = f"sqlite:///{tmp_path / 'enq.db'}"
    study, spec = _open(url, _spec(tiny_spec))
    fs = _runner._fast_storage(study)
    assert isinstance(fs, _fast.FastStorage)
    fs.refresh()
    point = {"n_neurons": 3, "n_dendrites": 2, "n_dendrite_inputs": 8}
    study.enqueue_trial(point, user_attrs={"mine": 1})
    trial = study.ask()  # Optuna's own ask pops waiting trials from the view
    assert trial.user_attrs.get("mine") == 1
    assert studies.suggest(trial, spec.space) == point


def test_an_attribute_json_cannot_encode_raises_when_set_and_the_trial_goes_on(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec],
) -> None:
    url = f"sqlite:///{tmp_path / 'enc.db'}"
    study, spec = _open(url, _spec(tiny_spec))
    trial = studies.ask_trial(study, spec)
    assert trial is not None
    with pytest.raises(TypeError):
        trial.set_user_attr("bad", object())
    trial.set_user_attr("good", [1, 2])
    study.tell(trial, 0.5)
    back = _raw(url).get_trial(trial._trial_id)
    assert back.state == TrialState.COMPLETE and back.user_attrs == {"good": [1, 2]}


def test_a_write_the_database_refuses_fails_that_trial_alone_and_later_tells_work(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec], monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"sqlite:///{tmp_path / 'iso.db'}"
    study, spec = _open(url, _spec(tiny_spec))
    fs = _fast.of(study) or _runner._fast_storage(study)
    assert isinstance(fs, _fast.FastStorage)
    a, b = studies.ask_trials(study, spec, 2)
    write = _fast.FastStorage._write

    def refuse_a(self: _fast.FastStorage, session: Any, batch: list[Any]) -> None:
        if any(o.live._trial_id == a._trial_id and o.told and o.live.state == TrialState.COMPLETE for o in batch):
            raise sa.exc.IntegrityError("INSERT ...", {}, Exception("refused for the test"))
        write(self, session, batch)

    monkeypatch.setattr(_fast.FastStorage, "_write", refuse_a)
    with fs.deferring():
        study.tell(a, 0.1)
        study.tell(b, 0.2)
    raw = _raw(url)
    got_a, got_b = raw.get_trial(a._trial_id), raw.get_trial(b._trial_id)
    assert got_b.state == TrialState.COMPLETE and got_b.value == 0.2
    assert got_a.state == TrialState.FAIL and "could not be stored" in got_a.user_attrs["fail_reason"]
    # the view says what the database says, and the next tells go through
    assert {t.number: t.state for t in study.get_trials(deepcopy=False)} == {
        a.number: TrialState.FAIL, b.number: TrialState.COMPLETE}
    assert studies.progress(study)["failed"] == 1 and studies.progress(study)["complete"] == 1
    c = studies.ask_trial(study, spec)
    assert c is not None
    study.tell(c, 0.3)
    assert raw.get_trial(c._trial_id).state == TrialState.COMPLETE


# -- one vocabulary ------------------------------------------------------------------------------------
def test_every_trial_state_has_one_name_everywhere(tmp_path: Path, tiny_spec: Callable[..., StudySpec]) -> None:
    url = f"sqlite:///{tmp_path / 'voc.db'}"
    spec = _spec(tiny_spec, n_trials=4, max_params=400)
    study = studies.run_study(spec, url, "voc", show_progress=False)
    seen = set()
    for t in study.get_trials():
        state = studies.trial_state(t)
        assert state in studies.TRIAL_STATES
        assert t.user_attrs[studies.TRIAL_STATE_ATTR] == state  # what the dashboard shows
        seen.add(state)
    assert "complete" in seen
    csv_states = [line.split(",")[1] for line in studies.study_to_csv(study).splitlines()[1:]]
    assert csv_states == [studies.trial_state(t) for t in study.get_trials()]
    assert "dendro.uid" in study.user_attrs and studies.STATES[-1] == "error"


def test_a_population_proposes_each_batch_from_one_fit(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import core

    def no_training(model: str, configs: Any, data: Any, n_epochs: int, **kw: Any) -> list[Any]:
        results = []
        for i, cfg in enumerate(configs):
            res = core.TrainResult(device="cpu", seed=cfg["seed"])
            m = {"epoch": 1, "val_accuracy": random.random(), "val_loss": 1.0, "train_loss": 1.0}
            res.history.append(m)
            kw["on_epoch"](i, 1, m)
            kw["on_result"](i, res)
            results.append(res)
        return results

    from studies import _population

    monkeypatch.setattr(core, "train_population", no_training)
    monkeypatch.setattr(_population, "load_data", lambda *a, **k: None)
    url = f"sqlite:///{tmp_path / 'fit.db'}"
    study, spec = _open(url, _spec(tiny_spec, n_trials=90, n_epochs=1, pruner="none", max_params=10_000), "fit")
    sampler = study.sampler.base  # type: ignore[attr-defined]
    assert isinstance(sampler, _fast.FastTPESampler)
    fits: list[int] = []
    fit = sampler._fit
    sampler._fit = lambda *a: fits.append(1) or fit(*a)  # type: ignore[method-assign]
    outs = studies.execute_population(study, spec, population_size=30, device="cpu")
    assert sum(o.state == "complete" for o in outs) == 90
    # three batches of 30: TPE's startup trials are random, then one fit for each later batch,
    # on the trials finished by then (a batch never reuses an earlier batch's fit)
    assert len(fits) == 2, fits


# -- one storage interface -----------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["tpe", "qmc"])
def test_the_lifecycle_writes_through_one_interface_whichever_storage_is_underneath(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec], sampler: str,
) -> None:
    """TPE gets the batching storage, QMC (state of its own in the storage) a plain view;
    callers see the same interface and the same counts, read back from the database."""
    url = f"sqlite:///{tmp_path / 'view.db'}"
    study, spec = _open(url, _spec(tiny_spec, sampler=sampler, n_trials=4, n_epochs=1))
    assert isinstance(_fast.view(study), _fast.PlainView)  # nothing asked through the engine yet
    while (trial := studies.ask_trial(study, spec)) is not None:
        studies.execute_trial(study, trial, spec, device="cpu")
    v = _fast.view(study, _runner._kind)
    assert isinstance(v, _fast.FastStorage if sampler == "tpe" else _fast.PlainView)
    assert v.batching == (sampler == "tpe")
    with v.deferring():
        assert v.flush() == 0  # every tell is written
    v.refresh()
    from_db = Counter(studies.trial_state(t) for t in _raw(url).get_all_trials(study._study_id))
    assert v.kinds() == from_db and sum(from_db.values()) >= 4
    assert studies.progress(study)["finished"] == from_db["complete"] + from_db["pruned"] == 4
    assert studies.study_state(study) == "done"


def test_a_population_reads_back_only_the_weights_that_may_be_kept_and_keeps_the_best(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from core import _population

    url = f"sqlite:///{tmp_path / 'keep.db'}"
    study, spec = _open(url, _spec(tiny_spec, n_trials=12, n_epochs=1, keep_models=2))
    read_back: list[int] = []
    keep = _population._Population._keep_weights

    def counted(self: Any, stack: Any, rows: list[int]) -> None:
        read_back.extend(stack.members[i].index for i in rows)
        keep(self, stack, rows)

    monkeypatch.setattr(_population._Population, "_keep_weights", counted)
    store = studies.ModelStore(sa.create_engine(url))
    outs = studies.execute_population(study, spec, population_size=3, device="cpu", model_store=store,
                                      max_trials=12)
    done = sorted((o for o in outs if o.state == "complete"), key=lambda o: (-o.values[0], o.number))
    assert len(done) == 12
    assert sorted(store.list(study.study_name)) == sorted(o.number for o in done[:2])
    # the first two fill the store; later members are read back only while they could enter it
    assert 2 <= len(read_back) < 12, read_back
    got = store.get(study.study_name, done[0].number)
    assert got is not None and got[0]["n_params"] == done[0].n_params
