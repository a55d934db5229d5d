"""The worker's fast path (studies._fast) writes what Optuna's plain path writes, with fewer trips."""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

import core
import studies
from studies import StudySpec, _fast, _lease, _population, _runner

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


# -- an instant trainer: metrics are a function of the point ------------------------------------
def _curve(point: dict[str, Any], n_epochs: int) -> list[dict[str, Any]]:
    rng = random.Random(json.dumps(point, sort_keys=True))
    final = 0.5 + 0.05 * math.log(point["n_neurons"] * point["n_dendrites"]) + rng.gauss(0, 0.02)
    out = []
    for e in range(1, n_epochs + 1):
        acc = final - 0.3 * math.exp(-e / rng.uniform(1, 3)) + rng.gauss(0, 0.01)
        out.append({"epoch": e, "train_loss": 1 - acc, "train_accuracy": acc, "val_loss": 1 - acc,
                    "val_accuracy": acc, "test_loss": 1 - acc, "test_accuracy": acc, "seconds": 0.0})
    return out


def _run(history: list[dict[str, Any]], seed: int, n: int, on_epoch: Callable[..., bool] | None,
         ) -> core.TrainResult:
    res = core.TrainResult(n_params=n, device="cpu", seed=seed)
    for m in history:
        res.history.append({**m, "n_params": n})
        if on_epoch is not None and on_epoch(m["epoch"], m):
            res.status = "stopped"
            break
    return res


def _fake_train_seeds(spec: StudySpec, number: int, family: str, model_args: dict[str, Any],
                      train_args: dict[str, Any], n: int, data: Any, dev: Any,
                      on_epoch: Callable[..., bool]) -> tuple[list[core.TrainResult], None]:
    point = {k: model_args[k] for k in ("n_neurons", "n_dendrites", "n_dendrite_inputs")}
    return [_run(_curve(point, spec.n_epochs), _runner.trial_seed(spec, number), n, on_epoch)], None


def _fake_train_population(model: str, configs: Any, data: Any, n_epochs: int, batch_size: int = 128,
                           device: Any = None, seed: int = 0, on_epoch: Any = None, *,
                           population_size: Any = None, on_result: Any = None,
                           max_population: Any = None, precision: str = "fp32",
                           on_settle: Any = None, keep_weights: Any = None) -> list[core.TrainResult]:
    """core.train_population's scheduling (slots refilled as members end), without training."""
    size = population_size if isinstance(population_size, int) else 8
    it = iter(configs)
    results: list[core.TrainResult] = []
    active: list[tuple[int, list[dict[str, Any]]]] = []
    exhausted = False
    while True:
        while len(active) < size and not exhausted:
            cfg = next(it, None)
            if cfg is None:
                exhausted = True
                break
            point = {k: cfg[k] for k in ("n_neurons", "n_dendrites", "n_dendrite_inputs")}
            results.append(core.TrainResult(device="cpu", seed=cfg["seed"]))
            active.append((len(results) - 1, _curve(point, n_epochs)))
        if not active:
            return results
        ended = []
        for i, curve in active:
            res = results[i]
            res.history.append(curve[len(res.history)])
            if on_epoch(i, res.history[-1]["epoch"], res.history[-1]):
                res.status = "stopped"
                ended.append(i)
            elif len(res.history) >= n_epochs:
                ended.append(i)
        if on_settle is not None:  # every member reported: the settled rung's losers stop
            for i, _ in active:
                if i not in ended and on_settle(i):
                    results[i].status = "stopped"
                    ended.append(i)
        for i in ended:
            on_result(i, results[i])
        active = [a for a in active if a[0] not in ended]


@pytest.fixture(autouse=True)
def instant_training(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_runner, "_train_seeds", _fake_train_seeds)
    monkeypatch.setattr(_runner, "load_data", lambda *a, **k: None)
    monkeypatch.setattr(_population, "load_data", lambda *a, **k: None)
    monkeypatch.setattr(core, "train_population", _fake_train_population)


@contextlib.contextmanager
def plain_path() -> Iterator[None]:
    """Optuna's own storage path: no FastStorage under the study."""
    with pytest.MonkeyPatch.context() as mp:
        def plain(study: optuna.Study) -> _fast.PlainView:
            return _fast.PlainView(study._storage, study._study_id, _runner._kind)

        mp.setattr(_runner, "_fast_storage", plain)
        mp.setattr(_population, "_fast_storage", plain)
        yield


# -- storages ------------------------------------------------------------------------------------
def _pg_reachable() -> bool:
    try:
        engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 2})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:  # noqa: BLE001 - any failure means: skip
        return False


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fast.db'}"
    if not _pg_reachable():
        pytest.skip(f"PostgreSQL at {PG_URL} cannot be reached")
    return PG_URL


def _name(tag: str) -> str:
    return f"fast-{tag}-{random.getrandbits(40):x}"


def _own_storage(url: str, heartbeat: bool = True) -> optuna.storages.RDBStorage:
    """A storage object of its own, as another worker process would have (studies.open_storage's)."""
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    if not heartbeat:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    return optuna.storages.RDBStorage(
        url, engine_kwargs=kwargs, heartbeat_interval=5, grace_period=20,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))


@contextlib.contextmanager
def _elsewhere(url: str) -> Iterator[optuna.storages.RDBStorage]:
    """Another process's storage (the API's, say), without heartbeat, closed after use."""
    other = _own_storage(url, heartbeat=False)
    try:
        yield other
    finally:
        other.engine.dispose()


def _stored(url: str, name: str) -> list[dict[str, Any]]:
    """What Optuna (and its dashboard) reads back for every trial, times left out."""
    with _elsewhere(url) as st:
        trials = optuna.load_study(study_name=name, storage=st).get_trials()
        return [{"number": t.number, "state": t.state, "params": t.params,
                 "distributions": t.distributions, "values": t.values,
                 "intermediate_values": t.intermediate_values, "user_attrs": t.user_attrs,
                 "system_attrs": t.system_attrs} for t in trials]


def _drop(url: str, *names: str) -> None:
    if url.startswith("postgresql"):
        for name in names:
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=name, storage=url)


def _spec(tiny_spec: Callable[..., StudySpec], **kw: Any) -> StudySpec:
    settings: dict[str, Any] = {"n_trials": 14, "n_epochs": 4, "pruner": "median", "max_params": 1500}
    return tiny_spec(**(settings | kw))


def _run_out(study: optuna.Study, spec: StudySpec) -> None:
    """Ask and run the study's trials one at a time until it has no more, as one worker does."""
    while (trial := studies.ask_trial(study, spec)) is not None:
        studies.execute_trial(study, trial, spec, device="cpu", worker="w1")


def _single(url: str, spec: StudySpec, name: str) -> optuna.Study:
    st = studies.open_storage(url)
    studies.create_study(spec, st, name)
    study, spec = studies.load_study(name, st, sampler_seed=3)
    _run_out(study, spec)
    return study


def _population_run(url: str, spec: StudySpec, name: str, k: int = 4) -> optuna.Study:
    st = studies.open_storage(url)
    studies.create_study(spec, st, name)
    study, spec = studies.load_study(name, st, sampler_seed=3)
    _population.execute_population(study, spec, population_size=k, device="cpu", worker="w1")
    return study


# -- the same rows ---------------------------------------------------------------------------------
def test_the_fast_path_stores_exactly_what_the_plain_path_stores(
    url: str, tiny_spec: Callable[..., StudySpec],
) -> None:
    spec = _spec(tiny_spec)
    fast, plain = _name("f"), _name("p")
    try:
        study = _single(url, spec, fast)
        assert isinstance(_fast.of(study), _fast.FastStorage)
        with plain_path():
            assert _fast.of(_single(url, spec, plain)) is None
        got, want = _stored(url, fast), _stored(url, plain)
        assert got == want
        states = {t["state"] for t in want}
        assert TrialState.PRUNED in states and TrialState.COMPLETE in states  # the pruner pruned
        assert all(t["intermediate_values"] for t in want if not t["user_attrs"].get("infeasible"))
        assert all("constraints:max_params" in t["system_attrs"] for t in want)
        assert studies.progress(study) == studies.progress(optuna.load_study(study_name=plain, storage=url))
        assert studies.study_state(study) == "done"
    finally:
        _drop(url, fast, plain)


def test_the_population_path_asks_and_tells_in_batches_and_stores_the_same(
    url: str, tiny_spec: Callable[..., StudySpec],
) -> None:
    spec = _spec(tiny_spec)
    fast, plain = _name("pf"), _name("pp")
    try:
        study = _population_run(url, spec, fast)
        fs = _fast.of(study)
        assert fs is not None
        with plain_path():
            _population_run(url, spec, plain)
        assert _stored(url, fast) == _stored(url, plain)
        # each trial asked, started and told: far fewer writes than one per trial and epoch
        assert fs.writes < 3 * spec.n_trials
        assert studies.study_state(study) == "done"
    finally:
        _drop(url, fast, plain)


# -- pruning ---------------------------------------------------------------------------------------
def _count_statements(engine: sa.engine.Engine) -> list[str]:
    seen: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return seen


def test_pruning_decisions_are_optunas_median_pruner_and_make_no_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_fast, "MAX_AGE", 3600.0)  # the view is fresh for the whole test
    url = f"sqlite:///{tmp_path / 'prune.db'}"
    rng = random.Random(0)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    storage = _own_storage(url, heartbeat=False)
    studies_ = {}
    for kind in ("plain", "fast"):
        s = optuna.create_study(storage=storage, study_name=kind, direction="maximize", pruner=pruner)
        for _ in range(8):  # the same history in both
            curve = [rng.random() for _ in range(6)]
            s.add_trial(optuna.create_trial(value=curve[-1], intermediate_values=dict(enumerate(curve, 1))))
        rng = random.Random(0)
        studies_[kind] = s
    fast = optuna.load_study(study_name="fast", storage=_own_storage(url, heartbeat=False), pruner=pruner)
    fs = _fast.attach(fast)
    assert fs is not None
    plain = studies_["plain"]
    plain_direction = plain.direction
    fs.refresh()
    assert fast.direction == plain_direction  # read once: directions never change
    statements = _count_statements(fs._backend.engine)
    pruned = 0
    for i in range(12):
        curve = [rng.random() for _ in range(6)]
        tp, tf = plain.ask(), fast.ask()
        before = len(statements)
        decisions = []
        for step, v in enumerate(curve, 1):
            tp.report(v, step)
            tf.report(v, step)
            optuna_says = pruner.prune(plain, plain._storage.get_trial(tp._trial_id))
            decisions.append((tp.should_prune(), tf.should_prune(), optuna_says))
            assert len(set(decisions[-1])) == 1, (i, step, decisions)
            if decisions[-1][0]:
                break
        assert len(statements) == before, "reports and pruning checks went to the database"
        state = TrialState.PRUNED if decisions[-1][0] else TrialState.COMPLETE
        pruned += state == TrialState.PRUNED
        value = None if state == TrialState.PRUNED else curve[-1]
        plain.tell(tp, value, state=state)
        fast.tell(tf, value, state=state)
    assert 0 < pruned < 12
    strip = [{k: v for k, v in t.items() if k != "system_attrs"} for t in _stored(url, "fast")]
    assert strip == [{k: v for k, v in t.items() if k != "system_attrs"} for t in _stored(url, "plain")]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_view_loads_finished_trials_exactly_as_optuna_reads_them(
    tmp_path: Path, backend: str,
) -> None:
    """Other workers' finished trials are loaded with plain queries, not Optuna's ORM: every
    field must come out as Optuna's own read gives it (values by objective, infinities and NaN,
    params in their written order, attributes, intermediate values)."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'load.db'}"
    else:
        url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        try:
            sa.create_engine(url).connect().close()
        except sa.exc.OperationalError:
            pytest.skip("the local PostgreSQL server is not running")
    name = f"load-{backend}-{random.random()}"
    writer = optuna.create_study(storage=_own_storage(url, heartbeat=False), study_name=name,
                                 directions=["maximize", "minimize"])
    dist = {"b": optuna.distributions.FloatDistribution(0, 1),
            "a": optuna.distributions.IntDistribution(1, 9, log=True),
            "c": optuna.distributions.CategoricalDistribution(["x", None, 3])}
    for i, values in enumerate([[0.5, 1.0], [math.inf, -math.inf], [-1.0, 2.5]]):
        writer.add_trial(optuna.create_trial(
            values=values, params={"b": 0.25 * i, "a": 1 + i, "c": ["x", None, 3][i]}, distributions=dist,
            user_attrs={"z": i, "nested": {"k": [1, 2]}, "a": "s"}, system_attrs={"sys": i},
            intermediate_values={1: 0.1, 2: math.inf, 3: -math.inf, 4: math.nan}))
    writer.add_trial(optuna.create_trial(state=TrialState.PRUNED, params={"b": 0.5}, distributions={"b": dist["b"]},
                                         intermediate_values={1: 0.3}))
    writer.add_trial(optuna.create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "x"}))
    reader = optuna.load_study(study_name=name, storage=_own_storage(url, heartbeat=False))
    fs = _fast.attach(reader)
    assert fs is not None
    fs.refresh()
    try:
        want = writer.get_trials(deepcopy=False)
        got = fs.get_all_trials(reader._study_id, deepcopy=False)
        assert len(got) == len(want) == 5
        for g, w in zip(got, want, strict=True):
            assert g._trial_id == w._trial_id and g.number == w.number and g.state == w.state
            assert g.values == w.values or (g.values is not None and w.values is not None
                                            and all(math.isnan(x) and math.isnan(y) or x == y
                                                    for x, y in zip(g.values, w.values, strict=True)))
            assert list(g.params.items()) == list(w.params.items())
            assert g.distributions == w.distributions
            assert g.user_attrs == w.user_attrs and g.system_attrs == w.system_attrs
            assert g.datetime_start == w.datetime_start and g.datetime_complete == w.datetime_complete
            assert list(g.intermediate_values) == list(w.intermediate_values)
            for step, x in w.intermediate_values.items():
                y = g.intermediate_values[step]
                assert (math.isnan(x) and math.isnan(y)) or x == y
    finally:
        optuna.delete_study(study_name=name, storage=_own_storage(url, heartbeat=False))


# -- other writers -------------------------------------------------------------------------------
def test_the_incremental_view_sees_what_other_storages_and_processes_write(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec], monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"sqlite:///{tmp_path / 'view.db'}"
    spec = _spec(tiny_spec, n_trials=50)
    st = studies.open_storage(url)
    studies.create_study(spec, st, "view")
    study, spec = studies.load_study("view", st, sampler_seed=1)
    fs = _runner._fast_storage(study)
    assert isinstance(fs, _fast.FastStorage)
    first = studies.ask_trial(study, spec)
    assert first is not None
    studies.execute_trial(study, first, spec, device="cpu", worker="w1")

    other = optuna.load_study(study_name="view", storage=_own_storage(url))
    point = {"n_neurons": 3, "n_dendrites": 2, "n_dendrite_inputs": 8}
    other.add_trial(optuna.create_trial(params=point, distributions={k: p.distribution() for k, p in spec.space.items()},
                                        value=0.5))
    running = other.ask()  # another worker's trial, still running
    other.enqueue_trial(point, user_attrs={"requeued_from": 99})
    script = ("import optuna, sys; s = optuna.load_study(study_name='view', storage=sys.argv[1]); "
              "s.add_trial(optuna.create_trial(value=0.25, state=optuna.trial.TrialState.COMPLETE))")
    subprocess.run([sys.executable, "-c", script, url], check=True, capture_output=True, timeout=60)

    def fresh_counts() -> dict[str, Any]:
        with plain_path():
            return studies.progress(optuna.load_study(study_name="view", storage=_own_storage(url)))

    assert studies.progress(study) == fresh_counts()
    assert studies.progress(study)["running"] == 1 and studies.progress(study)["waiting"] == 1
    # the view is read again when it is older than MAX_AGE, for Optuna's own readers too
    other.tell(running, 0.75)
    monkeypatch.setattr(_fast, "MAX_AGE", 0.0)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert running.number in {t.number for t in complete}
    assert studies.progress(study) == fresh_counts()
    # the next ask takes the queued point first, and this worker runs it as its own
    trial = studies.ask_trial(study, spec)
    assert trial is not None and trial.user_attrs["requeued_from"] == 99
    studies.execute_trial(study, trial, spec, device="cpu", worker="w1")
    back = other._storage.get_trial(trial._trial_id)
    assert back.params == point
    assert back.state in (TrialState.COMPLETE, TrialState.PRUNED) and back.intermediate_values
    assert back.user_attrs["worker"] == "w1" and back.user_attrs["requeued_from"] == 99
    assert studies.progress(study) == fresh_counts()


def test_two_workers_racing_for_the_last_trials_never_overshoot(
    url: str, tiny_spec: Callable[..., StudySpec], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On PostgreSQL the asks count, check and create under the study row's lock alone, in
    # one transaction (studies._runner._ask_row_locked); on SQLite under the study lock.
    name = _name("race")
    spec = _spec(tiny_spec, n_trials=24, pruner="none", n_epochs=2)
    studies.create_study(spec, studies.open_storage(url), name)
    locks = [0]
    study_lock = _runner.study_lock

    def counted(*args: Any, **kwargs: Any) -> Any:
        locks[0] += 1
        return study_lock(*args, **kwargs)

    monkeypatch.setattr(_runner, "study_lock", counted)
    start = threading.Barrier(3)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            study, sp = studies.load_study(name, _own_storage(url), sampler_seed=i)
            start.wait()
            if i == 0:
                _population.execute_population(study, sp, population_size=4, device="cpu", worker="pop")
            else:
                while (trial := studies.ask_trial(study, sp)) is not None:
                    studies.execute_trial(study, trial, sp, device="cpu", worker=f"w{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    try:
        done = optuna.load_study(study_name=name, storage=_own_storage(url))
        c = studies.progress(done)
        assert c["finished"] == spec.n_trials
        assert c["running"] == c["waiting"] == c["failed"] == 0
        assert c["total"] == spec.n_trials + c["infeasible"]
        numbers = [t.number for t in done.get_trials()]
        assert sorted(numbers) == list(range(len(numbers)))
        if url.startswith("postgresql"):
            assert locks[0] < spec.n_trials / 2, "the asks did not take the study lock"
    finally:
        _drop(url, name)


def test_counts_read_only_the_trials_after_the_settled_ones_and_equal_a_full_count(
    url: str, tiny_spec: Callable[..., StudySpec],
) -> None:
    """The counts under the lock add the trials after the last id up to which all are finished
    (and written) to counts kept from the view: the same answer as counting every trial,
    with running, held-back, failed, infeasible and another storage's trials about."""
    name = _name("settled")
    spec = _spec(tiny_spec, n_trials=30, pruner="median", n_epochs=2, max_params=900)
    st = studies.open_storage(url)
    studies.create_study(spec, st, name)
    study, spec = studies.load_study(name, st, sampler_seed=5)
    try:
        for _ in range(6):
            trial = studies.ask_trial(study, spec)
            assert trial is not None
            studies.execute_trial(study, trial, spec, device="cpu", worker="w1")
        other = optuna.load_study(study_name=name, storage=_own_storage(url))
        other.tell(other.ask(), state=TrialState.FAIL)  # another process's trial, failed
        running = studies.ask_trial(study, spec)  # stays running
        fs = _runner._fast_storage(study)
        assert isinstance(fs, _fast.FastStorage)
        with fs.deferring():
            for _ in range(3):
                trial = studies.ask_trial(study, spec)
                assert trial is not None
                studies.execute_trial(study, trial, spec, device="cpu", worker="w1")
            fs.refresh()
            held = fs._settled("infeasible")  # told here, not yet written: not settled
            with fs._backend.engine.connect() as conn:
                assert fs._count_states(conn, "infeasible") == fs.count_states("infeasible")
        fs.refresh()
        upto, by_state, _ = fs._settled("infeasible")
        assert running is not None and held[0] < running._trial_id and upto < running._trial_id
        assert sum(by_state.values()) >= 7  # the first six and the failed one, at least
        with fs._backend.engine.connect() as conn:
            full = fs._count_states(conn, "infeasible")
        assert full == fs.count_states("infeasible")
        studies.execute_trial(study, running, spec, device="cpu", worker="w1")
        fs.refresh()
        upto_after, by_state_after, _ = fs._settled("infeasible")
        assert upto_after > running._trial_id and sum(by_state_after.values()) == sum(full[0].values())
        with fs._backend.engine.connect() as conn:
            assert fs._count_states(conn, "infeasible") == fs.count_states("infeasible")
    finally:
        _drop(url, name)


def test_a_read_that_fails_midway_is_read_again_and_the_counts_stay_exact(url: str) -> None:
    """A refresh that loses the database while loading trials moves nothing on: the next one
    reads the same trials again (each counted once), so the counts under the lock, which trust
    the view up to its last complete read, and the numbers made from them stay exact."""
    name = _name("midway")
    st = _own_storage(url, heartbeat=False)
    sid = optuna.create_study(study_name=name, storage=st)._study_id
    a = _fast.FastStorage(st, sid)
    b = _fast.FastStorage(_own_storage(url, heartbeat=False), sid)

    def finish(k: int) -> None:
        for _ in range(k):
            (tid,) = b.create_trials(1, lambda *args: 1)
            b.set_trial_state_values(tid, TrialState.COMPLETE, [1.0])

    try:
        finish(5)
        a.refresh()
        finish(5)
        load, calls = a._load_full, [0]

        def flaky(conn: Any, ids: list[int]) -> None:
            calls[0] += 1
            if calls[0] == 1:
                raise sa.exc.OperationalError("SELECT", {}, Exception("server closed the connection"))
            load(conn, ids)

        a._load_full = flaky  # type: ignore[method-assign]
        with pytest.raises(optuna.exceptions.StorageInternalError):
            a.refresh()
        finish(2)
        a.refresh()
        assert a.kinds()["complete"] == 12
        assert a.count_states("infeasible")[0][TrialState.COMPLETE] == 12
        a.create_trials(2, lambda *args: 2)
        numbers = sorted(t.number for t in _own_storage(url, heartbeat=False).get_all_trials(sid))
        assert numbers == list(range(14))
    finally:
        _drop(url, name)


def test_a_view_of_a_deleted_study_does_not_count_the_one_created_under_its_id(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec],
) -> None:
    """SQLite reuses a deleted study's id: a view kept from the old study refuses to count
    the new one (KeyError, as for a deleted study) rather than add the old trials to it."""
    url = f"sqlite:///{tmp_path / 'again.db'}"
    spec = _spec(tiny_spec, n_trials=8, pruner="none", n_epochs=1)
    st = studies.open_storage(url)
    studies.create_study(spec, st, "again")
    study, spec = studies.load_study("again", st, sampler_seed=1)
    _run_out(study, spec)
    fs = _runner._fast_storage(study)
    assert isinstance(fs, _fast.FastStorage)
    fs.refresh()
    assert fs.count_states("infeasible")[0][TrialState.COMPLETE] >= 8
    studies.delete_study(st, "again")
    studies.create_study(spec, st, "again")
    again = optuna.load_study(study_name="again", storage=_own_storage(url, heartbeat=False))
    assert again._study_id == study._study_id  # the id is reused
    again.tell(again.ask(), 0.5)
    with pytest.raises(KeyError):
        fs.count_states("infeasible")


def test_a_workers_storage_is_the_batching_storage_and_the_engine_swaps_nothing(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec],
) -> None:
    """``open_storage(url, batching=True)`` is what a worker opens: one object per URL over the
    plain storage; a study loaded from it is the study the engine runs (its storage is never
    swapped), and every Study object of that study reads through the same view."""
    url = f"sqlite:///{tmp_path / 'worker.db'}"
    st = studies.open_storage(url, batching=True)
    assert isinstance(st, _fast.BatchingStorage) and studies.open_storage(url, batching=True) is st
    assert st._backend is studies.open_storage(url)
    spec = _spec(tiny_spec, n_trials=6, pruner="none", n_epochs=1)
    studies.create_study(spec, st, "w")
    study, spec = studies.load_study("w", st, sampler_seed=1)
    assert _fast.of(study) is None, "nothing asked yet: every call is the database's"
    trial = studies.ask_trial(study, spec)
    assert trial is not None and study._storage is st
    fs = _fast.of(study)
    assert isinstance(fs, _fast.FastStorage) and _fast.view(trial) is fs
    twin = optuna.load_study(study_name="w", storage=st)  # another Study object, same storage
    assert [t.number for t in twin.get_trials(deepcopy=False)] == [trial.number]
    assert twin.get_trials(deepcopy=False)[0].state == TrialState.RUNNING
    studies.execute_trial(study, trial, spec, device="cpu", worker="w1")
    _run_out(study, spec)
    assert _fast.of(study) is fs
    stored = _stored(url, "w")
    assert [t["state"] for t in stored] == [TrialState.COMPLETE] * 6
    assert all(t["params"] for t in stored)
    assert studies.study_state(optuna.load_study(study_name="w", storage=url)) == "done"


def test_a_workers_storage_gives_a_study_created_under_a_deleted_ones_id_a_view_of_its_own(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec],
) -> None:
    """SQLite reuses a deleted study's id. A long-lived worker's storage drops the old study's
    view when the new study is loaded: the new one runs all its trials, none of the old ones
    counted."""
    url = f"sqlite:///{tmp_path / 'reuse.db'}"
    st = studies.open_storage(url, batching=True)
    spec = _spec(tiny_spec, n_trials=5, pruner="none", n_epochs=1)
    studies.create_study(spec, st, "again")
    old, spec = studies.load_study("again", st, sampler_seed=1)
    _run_out(old, spec)
    old_view = _fast.of(old)
    assert isinstance(old_view, _fast.FastStorage)
    with _elsewhere(url) as other:  # the API's process deletes and creates it again
        studies.delete_study(other, "again")
        studies.create_study(spec, other, "again")
    new, spec = studies.load_study("again", st, sampler_seed=2)
    assert new._study_id == old._study_id  # the id is reused
    assert new.get_trials(deepcopy=False) == [], "the old study's trials are not the new one's"
    _run_out(new, spec)
    assert _fast.of(new) is not old_view and _fast.of(old) is None
    stored = _stored(url, "again")
    assert [t["number"] for t in stored] == list(range(5))
    assert {t["state"] for t in stored} == {TrialState.COMPLETE}


def test_a_workers_storage_routes_a_reused_trial_id_to_the_study_that_runs_it(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec],
) -> None:
    """SQLite gives a deleted study's trial ids to the next trials created. A worker that still
    holds the deleted study (its view has those ids cached) runs the new study's trials as
    that study's, and keeps no view of a study it let go of."""
    url = f"sqlite:///{tmp_path / 'ids.db'}"
    st = studies.open_storage(url, batching=True)
    spec = _spec(tiny_spec, n_trials=4, pruner="none", n_epochs=1)
    studies.create_study(spec, st, "A")
    studies.create_study(spec, st, "X")  # so that the new study gets another id than A's
    old, spec = studies.load_study("A", st, sampler_seed=1)
    _run_out(old, spec)
    with _elsewhere(url) as other:
        studies.delete_study(other, "A")
        studies.create_study(spec, other, "B")
    new, spec = studies.load_study("B", st, sampler_seed=2)
    reused = []
    while (trial := studies.ask_trial(new, spec)) is not None:
        reused.append(trial._trial_id in _fast.of(old)._numbers)  # type: ignore[union-attr]
        out = studies.execute_trial(new, trial, spec, device="cpu", worker="w1")
        assert out.state == "complete"
    assert any(reused), "the new study's trials took the deleted study's ids"
    stored = _stored(url, "B")
    assert [t["state"] for t in stored] == [TrialState.COMPLETE] * 4 and all(t["params"] for t in stored)
    with pytest.raises(KeyError):  # the old Study object's study is gone: it asks nothing
        studies.ask_trial(old, spec)
    assert len(_stored(url, "B")) == 4
    del old, trial
    gc.collect()
    assert list(st._views) == [new._study_id], "a study let go of takes its view with it"


@pytest.mark.parametrize("mode", ["single-trial", "population"])
def test_a_trial_of_a_study_deleted_and_made_again_under_its_id_tells_nothing_to_the_new_one(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec], mode: str,
) -> None:
    """SQLite gives a deleted study's id, and its trials' ids, to the next ones created. A
    worker still training a trial of the deleted study must not write its results into the new
    study's trial that took the same id (same study id, same number): nothing is told."""
    url = f"sqlite:///{tmp_path / 'again.db'}"
    st = studies.open_storage(url, batching=True)
    spec = _spec(tiny_spec, n_trials=4, pruner="none", n_epochs=1)
    studies.create_study(spec, st, "A")
    old, spec = studies.load_study("A", st, sampler_seed=1)
    trial = studies.ask_trial(old, spec)
    view = _fast.of(old)
    assert trial is not None and view is not None
    time.sleep(0.01)  # the new trial starts later: its start is what tells the two apart
    with _elsewhere(url) as other:
        studies.delete_study(other, "A")
        studies.create_study(spec, other, "B")
        new = optuna.load_study(study_name="B", storage=other)
        theirs = new.ask()
    assert (new._study_id, theirs._trial_id, theirs.number) == (old._study_id, trial._trial_id, trial.number)
    with pytest.raises(KeyError):
        if mode == "population":  # the population's tells are held back until a flush
            with view.deferring():
                old.tell(trial, 0.5)
        else:
            old.tell(trial, 0.5)
    (b,) = _stored(url, "B")
    assert b["state"] == TrialState.RUNNING and b["values"] is None and not b["params"]


def test_a_study_extended_while_a_worker_runs_its_last_trial_goes_on_in_that_worker(
    url: str, tiny_spec: Callable[..., StudySpec],
) -> None:
    """Extending (or resuming) gives a study a new uid, so that workers read its spec again;
    the worker's view of it, whose trials are all still there, is the same study's and goes on
    (the uid alone once made it look deleted: the worker's next count raised KeyError)."""
    name = _name("ext")
    spec = _spec(tiny_spec, n_trials=2, pruner="none", n_epochs=1)
    st = studies.open_storage(url, batching=True)
    try:
        studies.create_study(spec, st, name)
        study, spec = studies.load_study(name, st, sampler_seed=1)
        studies.execute_trial(study, studies.ask_trial(study, spec), spec, device="cpu", worker="w1")
        last = studies.ask_trial(study, spec)
        assert last is not None
        with _elsewhere(url) as other:
            studies.extend_study(optuna.load_study(study_name=name, storage=other), n_trials=4)
        assert studies.execute_trial(study, last, spec, device="cpu", worker="w1").state == "complete"
        again, spec = studies.load_study(name, st, sampler_seed=2)  # the worker reads the spec anew
        assert spec.n_trials == 4 and _fast.of(study) is not None
        _run_out(again, spec)
        stored = _stored(url, name)
        assert [t["state"] for t in stored] == [TrialState.COMPLETE] * 4
        assert [t["number"] for t in stored] == list(range(4))
    finally:
        _drop(url, name)


@pytest.fixture
def tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process in a timezone nine hours from UTC."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_trial_times_are_stored_as_optuna_stores_them_in_any_timezone(
    url: str, tiny_spec: Callable[..., StudySpec], tokyo: None,
) -> None:
    """Optuna's table holds UTC and its reads give local time: a trial the worker's storage
    created starts when Optuna says it did, the view agrees with Optuna's read, and an extend
    during the last trial is still the same study (its held trial's start is compared)."""
    name = _name("tz")
    spec = _spec(tiny_spec, n_trials=2, pruner="none", n_epochs=1)
    st = studies.open_storage(url, batching=True)
    try:
        studies.create_study(spec, st, name)
        study, spec = studies.load_study(name, st, sampler_seed=1)
        before = datetime.datetime.now()
        studies.execute_trial(study, studies.ask_trial(study, spec), spec, device="cpu", worker="w1")
        last = studies.ask_trial(study, spec)
        assert last is not None
        with _elsewhere(url) as other:
            read = optuna.load_study(study_name=name, storage=other).get_trials()
            for t in read:
                assert abs((t.datetime_start - before).total_seconds()) < 60, t.datetime_start
                assert study._storage.get_trial(t._trial_id).datetime_start == t.datetime_start
            studies.extend_study(optuna.load_study(study_name=name, storage=other), n_trials=3)
        assert studies.execute_trial(study, last, spec, device="cpu", worker="w1").state == "complete"
        again, spec = studies.load_study(name, st, sampler_seed=2)
        _run_out(again, spec)
        assert _fast.of(again) is _fast.of(study) is not None, "the extended study keeps its view"
        assert [t["state"] for t in _stored(url, name)] == [TrialState.COMPLETE] * 3
    finally:
        _drop(url, name)


@pytest.mark.postgres
def test_the_pipelined_ask_writes_what_the_ask_one_statement_at_a_time_writes() -> None:
    """PostgreSQL's ask in two round trips (psycopg's pipeline) numbers its rows, ties them to
    the lease and decides on fresh counts exactly as the five-statement path does; a decision
    of none creates nothing and leaves no transaction open; a deleted study raises KeyError."""
    if not _pg_reachable():
        pytest.skip(f"PostgreSQL at {PG_URL} cannot be reached")
    names = [_name("pipe"), _name("plain")]
    app = _name("pipe-test")  # our connections, told apart from other processes' on the server
    st = optuna.storages.RDBStorage(PG_URL, engine_kwargs={"connect_args": {"application_name": app}})
    seen: list[tuple[int, int]] = []

    def decide(by_state: Any, flagged: Any, attrs: dict[str, Any]) -> int:
        seen.append((sum(by_state.values()), sum(flagged.values())))
        assert attrs["tag"] == "t"
        return 3

    try:
        rows = []
        for name, pipelined in zip(names, (True, False), strict=True):
            study = optuna.create_study(study_name=name, storage=st)
            study.set_user_attr("tag", "t")
            done = study.ask()  # another writer's trials: counted, and flagged when infeasible
            study._storage.set_trial_user_attr(done._trial_id, "infeasible", True)
            study.tell(done, state=TrialState.PRUNED)
            fs = _fast.FastStorage(st, study._study_id)
            fs.lease_id = "lease-1"
            original = _fast._pipelines
            _fast._pipelines = (lambda conn: True) if pipelined else (lambda conn: False)  # type: ignore[assignment]
            try:
                first = fs.create_trials(5, decide)
                assert fs.create_trials(5, lambda *a: 0) == []
                second = fs.create_trials(5, decide)
            finally:
                _fast._pipelines = original  # type: ignore[assignment]
            assert len(first) == len(second) == 3 and first == sorted(first) and max(first) < min(second)
            with st.engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE state = "
                                            "'idle in transaction' AND application_name = :app"),
                                    {"app": app}).scalar() == 0
            rows.append([{"number": t.number, "state": t.state, "lease": t.system_attrs.get(_fast.LEASE_KEY)}
                         for t in optuna.load_study(study_name=name, storage=st).get_trials()])
            assert [fs.get_trial(tid).number for tid in first + second] == list(range(1, 7))
        assert rows[0] == rows[1]
        assert [r["number"] for r in rows[0]] == list(range(7))
        assert all(r["lease"] == "lease-1" and r["state"] == TrialState.RUNNING for r in rows[0][1:])
        assert seen == [(1, 1), (4, 1)] * 2, "fresh counts (the trials just created among them), the flag counted"
        fs = _fast.FastStorage(st, optuna.load_study(study_name=names[0], storage=st)._study_id)
        optuna.delete_study(study_name=names[0], storage=st)
        with pytest.raises(KeyError):
            fs.create_trials(1, decide)
    finally:
        _drop(PG_URL, *names)
        st.engine.dispose()


@pytest.mark.postgres
def test_a_database_error_in_the_pipelined_ask_is_raised_as_on_the_plain_path() -> None:
    """A lock timeout inside the pipeline reaches the caller as the same storage error as on
    the one-statement-at-a-time path (which workers back off from), not as a raw psycopg
    error, and the next ask works (found in review)."""
    if not _pg_reachable():
        pytest.skip(f"PostgreSQL at {PG_URL} cannot be reached")
    name = _name("locktimeout")
    st = optuna.storages.RDBStorage(PG_URL, engine_kwargs={"connect_args": {"options": "-c lock_timeout=300"}})
    holder = sa.create_engine(PG_URL)
    try:
        study = optuna.create_study(study_name=name, storage=st)
        raised = []
        for pipelined in (True, False):
            fs = _fast.FastStorage(st, study._study_id)
            original = _fast._pipelines
            _fast._pipelines = (lambda conn: True) if pipelined else (lambda conn: False)  # type: ignore[assignment]
            try:
                with holder.connect() as conn:  # another transaction holds the study row
                    conn.execute(sa.text("SELECT 1 FROM studies WHERE study_id = :s FOR UPDATE"),
                                 {"s": study._study_id})
                    with pytest.raises(Exception) as exc:
                        fs.create_trials(1, lambda *a: 1)
                    conn.rollback()
                raised.append(exc.value)
                assert len(fs.create_trials(1, lambda *a: 1)) == 1
            finally:
                _fast._pipelines = original  # type: ignore[assignment]
        assert type(raised[0]) is type(raised[1])
        assert isinstance(raised[0], optuna.exceptions.StorageInternalError)
        assert isinstance(raised[0].__cause__, sa.exc.OperationalError)
    finally:
        _drop(PG_URL, name)
        st.engine.dispose()
        holder.dispose()


def test_a_dead_workers_trial_keeps_its_params_and_is_retried(
    tmp_path: Path, tiny_spec: Callable[..., StudySpec],
) -> None:
    url = f"sqlite:///{tmp_path / 'dead.db'}"
    spec = _spec(tiny_spec, n_trials=3)
    st = studies.open_storage(url)
    studies.create_study(spec, st, "dead")
    study, spec = studies.load_study("dead", st, sampler_seed=1)
    trial = studies.ask_trial(study, spec)
    assert trial is not None
    params = studies.suggest(trial, spec.space)
    trial.set_user_attr("n_params", 1)
    _fast.of(trial).flush([trial._trial_id])  # what execute_trial does before training
    trial.report(0.5, 1)  # buffered: dies with the worker
    # The worker dies: its lease stops beating and goes stale; its trial is RUNNING with params.
    lease = _lease.lease_for(study._storage)
    assert lease is not None and trial.storage.get_trial_system_attrs(trial._trial_id)[_lease.LEASE_KEY] == lease.id
    lease.close(remove=False)
    _lease._LEASES.pop(str(lease.engine.url))  # the next ask in this process takes a new lease
    raw = _own_storage(url)
    with raw.engine.begin() as con:
        con.execute(sa.text("UPDATE dendro_workers SET last_heartbeat = 0 WHERE worker_id = :w"), {"w": lease.id})
    other, sp = studies.load_study("dead", _own_storage(url), sampler_seed=2)
    retry = studies.ask_trial(other, sp)
    assert retry is not None and retry.number != trial.number
    assert retry.params == params  # re-queued with its point
    dead = raw.get_trial(trial._trial_id)
    assert dead.state == TrialState.FAIL and dead.params == params and not dead.intermediate_values
    assert "lease" in dead.user_attrs["fail_reason"] and dead.user_attrs["dendro.state"] == "failed"


# -- the sampler -----------------------------------------------------------------------------------
def test_fast_tpe_proposes_exactly_what_optunas_tpe_proposes() -> None:
    space = {"a": optuna.distributions.IntDistribution(5, 20),
             "b": optuna.distributions.IntDistribution(16, 256, log=True),
             "c": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    proposals = []
    for cls in (optuna.samplers.TPESampler, _fast.FastTPESampler):
        sampler = cls(seed=5, multivariate=True, n_startup_trials=10)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        points = []
        for i in range(70):
            trial = study.ask(space)
            points.append(trial.params)
            trial.set_constraint("budget", trial.params["a"] * trial.params["b"] - 2000.0)
            if i % 7 == 3:
                continue  # left running: constant liar sees it
            if i % 5 == 1:
                trial.report(trial.params["c"] * 100, 1)
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, math.log(trial.params["b"]) - trial.params["a"] / 7)
        proposals.append(points)
    assert proposals[0] == proposals[1]


def test_a_burst_of_asks_shares_tpe_fits_only_when_asked_to() -> None:
    space = {"a": optuna.distributions.IntDistribution(5, 20),
             "c": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    fits = []
    for stale in (0, 4):
        sampler = _fast.FastTPESampler(seed=1, multivariate=True, n_startup_trials=5)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        for _ in range(20):
            t = study.ask(space)
            study.tell(t, t.params["c"] * t.params["a"])
        calls = []
        fit = sampler._fit
        sampler._fit = lambda *a, _fit=fit, _calls=calls: _calls.append(1) or _fit(*a)  # type: ignore[method-assign]
        sampler.max_stale_lies = stale
        burst = [study.ask(space) for _ in range(10)]  # all left running: each one a lie
        assert len({(t.params["a"], t.params["c"]) for t in burst}) == 10
        # a finished trial always refits, stale lies or not
        study.tell(burst[0], 0.0)
        study.ask(space)
        fits.append(len(calls))
    assert fits == [11, 2 + 1]  # exact: one fit an ask; 4 stale lies: one per 5 asks, then the tell


def test_tpe_tail_mass_equals_optunas() -> None:
    # FastTPESampler scores candidates with studies._tpe_math: the same values as Optuna's
    # element-wise functions, including the far tails (asymptotic series below -20).
    from optuna.samplers._tpe import _truncnorm

    from studies import _tpe_math

    rng = np.random.default_rng(7)
    a = np.concatenate([rng.normal(0, 10, 20000), rng.uniform(-80, -19, 3000), rng.uniform(5, 40, 3000),
                        np.array([-20.0, 6.0, 0.0, -1.0, 1.0])])
    b = a + np.abs(rng.normal(0, 3, a.shape))
    head = a > -20  # bit for bit; the far tail's series within the last bit
    assert np.array_equal(_tpe_math.log_ndtr(a[head]), _truncnorm._log_ndtr(a[head]))
    np.testing.assert_allclose(_tpe_math.log_ndtr(a), _truncnorm._log_ndtr(a), rtol=1e-14, atol=0)
    np.testing.assert_allclose(_tpe_math.log_gauss_mass(a, b), _truncnorm._log_gauss_mass(a, b),
                               rtol=1e-13, atol=1e-300)


def test_a_sqlite_store_is_in_wal_mode_with_foreign_keys_and_every_commit_reaches_the_disk(tmp_path: Path) -> None:
    storage = studies.open_storage(f"sqlite:///{tmp_path / 'pragmas.db'}")
    assert isinstance(storage, optuna.storages.RDBStorage)
    with storage.engine.connect() as con:
        assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert con.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        # FULL: a commit waits for the disk (~0.2 ms on the H200 host); NORMAL would lose the
        # last commits to a power cut
        assert con.exec_driver_sql("PRAGMA synchronous").scalar() == 2


def test_the_intersection_search_space_equals_optunas_while_trials_run_and_finish_out_of_order() -> None:
    from optuna.search_space import IntersectionSearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(0)
    study = optuna.create_study()
    ours = _fast._RunningSafeIntersection(include_pruned=True)
    theirs = IntersectionSearchSpace(include_pruned=True)
    running: list[optuna.Trial] = []
    for step in range(400):
        if rng.random() < 0.1:
            study.enqueue_trial({"x": 0.5})  # waiting until asked
        if rng.random() < 0.55 or not running:
            trial = study.ask()
            trial.suggest_float("x", 0.0, 1.0)
            # a parameter whose range changes now and then: it leaves the intersection
            trial.suggest_int("n", 1, 10 if step < 300 else 12)
            if rng.random() < 0.9:
                trial.suggest_float("lr", 1e-4, 1e-1, log=True)
            running.append(trial)
        else:  # one of the running trials ends, not necessarily the oldest
            trial = running.pop(rng.randrange(len(running)))
            state = rng.choice([TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL])
            study.tell(trial, 0.1 if state == TrialState.COMPLETE else None, state=state)
        if step % 3 == 0:
            assert ours.calculate(study) == theirs.calculate(study), step
    assert ours.calculate(study) == theirs.calculate(study)
    assert ours._floor > 0 and len(ours._counted) < len(study.trials)  # the cache moved on
    other = optuna.create_study(storage=study._storage)  # another id in the same storage
    with pytest.raises(ValueError, match="multiple studies"):
        ours.calculate(other)
    sampler = _fast.FastTPESampler(seed=0, multivariate=True)
    assert isinstance(sampler._search_space, _fast._RunningSafeIntersection)


def test_the_trial_copy_is_a_deep_copy_and_shares_nothing_mutable() -> None:
    """get_trial and get_all_trials(deepcopy=True) copy by hand (a population's tells read
    ~1,000 trials three times each): equal to copy.deepcopy, no shared container."""
    import copy

    from optuna.distributions import FloatDistribution, IntDistribution

    history = [{"epoch": e, "val_accuracy": 0.5 + e / 100} for e in range(3)]
    t = optuna.trial.FrozenTrial(
        number=3, state=TrialState.COMPLETE, value=None, values=[0.8],
        datetime_start=datetime.datetime(2026, 1, 1), datetime_complete=datetime.datetime(2026, 1, 2),
        params={"n": 4, "lr": 0.01}, distributions={"n": IntDistribution(1, 9), "lr": FloatDistribution(1e-4, 1.0)},
        user_attrs={"history": history, "tag": (1, 2), "nested": {"a": [1, {"b": None}]}},
        system_attrs={"constraints:max_params": [-5.0]}, intermediate_values={0: 0.5, 1: 0.6}, trial_id=9,
    )
    got = _fast._copy_trial(t)
    assert got == copy.deepcopy(t) and got._trial_id == 9
    got.user_attrs["history"][0]["epoch"] = 99
    got.user_attrs["nested"]["a"][1]["b"] = 1
    got.system_attrs["constraints:max_params"].append(1.0)
    got.values.append(1.0)  # type: ignore[union-attr]
    assert t.user_attrs["history"][0]["epoch"] == 0 and t.user_attrs["nested"]["a"][1]["b"] is None
    assert t.system_attrs["constraints:max_params"] == [-5.0] and t.values == [0.8]
    assert got.user_attrs["tag"] == (1, 2)  # not JSON: deep-copied all the same


def test_a_block_of_asks_draws_and_scores_its_candidates_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """one_fit(asks=N): one array-wise draw of N asks' candidates, and the same points as the
    same block asked one draw at a time; the generator ends where those asks leave it, also
    when the block uses fewer rows than it drew ahead."""
    from studies import _tpe_math

    space = {"a": optuna.distributions.IntDistribution(5, 20),
             "c": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    draws: list[int] = []
    sample = _tpe_math.sample
    monkeypatch.setattr(_tpe_math, "sample",
                        lambda est, rng, n, asks=1: draws.append(asks) or sample(est, rng, n, asks))
    points, after = {}, {}
    for expected, asked in ((0, 10), (10, 10), (16, 10)):
        sampler = _fast.FastTPESampler(seed=1, multivariate=True, n_startup_trials=5)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        for _ in range(20):
            t = study.ask(space)
            study.tell(t, t.params["c"] * t.params["a"])
        draws.clear()
        with sampler.one_fit(expected):
            block = [study.ask(space) for _ in range(asked)]
            if expected:
                pool = sampler._pool
                assert pool is not None and pool[2].shape == (expected, 24) and pool[3] == asked
                for i, t in enumerate(block):  # each ask: the best of its own candidates
                    best = int(np.argmax(pool[2][i]))
                    assert t.params["a"] == int(pool[1]["a"][i][best])
        assert draws == ([expected] if expected else [1] * asked)
        assert sampler._pool is None
        points[expected] = [t.params for t in block]
        for t in block:
            study.tell(t, 1.0)
        after[expected] = study.ask(space).params  # the generator was left where it should be
    assert points[0] == points[10] == points[16]
    assert len({(p["a"], p["c"]) for p in points[0]}) == 10
    assert after[0] == after[10] == after[16]


def test_a_trial_told_inside_a_block_is_seen_by_the_blocks_next_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block's asks can end inside it (an ask its gate finds infeasible is told pruned at
    once): the trial that completes the random start-up switches the block's next ask to TPE, as
    between single asks, instead of the block's first start-up answer holding for all of it."""
    from studies import _tpe_math

    space = {"a": optuna.distributions.IntDistribution(1, 64, log=True),
             "c": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)}
    draws: list[int] = []
    sample = _tpe_math.sample
    monkeypatch.setattr(_tpe_math, "sample",
                        lambda est, rng, n, asks=1: draws.append(asks) or sample(est, rng, n, asks))
    points = {}
    for expected in (0, 6):
        sampler = _fast.FastTPESampler(seed=3, multivariate=True, n_startup_trials=5)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        for _ in range(4):
            t = study.ask(space)
            study.tell(t, t.params["a"] * 0.01 + t.params["c"])
        draws.clear()
        with sampler.one_fit(expected):
            first = study.ask(space)
            assert draws == [], "still in the start-up: a random point"
            study.tell(first, state=TrialState.PRUNED)  # the fifth finished trial
            block = [study.ask(space) for _ in range(5)]
        assert draws == ([6] if expected else [1] * 5), "TPE drew every ask after the tell"
        points[expected] = [first.params] + [t.params for t in block]
    assert points[0] == points[6]


def test_a_block_whose_estimators_alternate_draws_each_ask_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A conditional space samples each ask with two estimators (the relative one and an
    independent one): the block's draws ahead are given back at the first switch and the rest
    of the block draws one ask at a time (not the rest of the block again at every switch),
    with the same points."""
    from studies import _tpe_math

    def objective(t: optuna.Trial) -> float:
        lr = t.suggest_float("lr", 1e-4, 1e-1, log=True)
        if t.suggest_categorical("kind", ["mlp", "cnn"]) == "mlp":
            return lr + t.suggest_int("width", 8, 256, log=True) * 1e-3
        return lr + t.suggest_float("drop", 0.0, 0.5)

    rows: list[int] = []
    sample = _tpe_math.sample
    monkeypatch.setattr(_tpe_math, "sample",
                        lambda est, rng, n, asks=1: rows.append(asks) or sample(est, rng, n, asks))
    points, drawn = {}, {}
    for expected in (0, 40):
        sampler = _fast.FastTPESampler(seed=1, multivariate=True, n_startup_trials=10)
        study = optuna.create_study(sampler=sampler)
        study.optimize(objective, n_trials=30)
        rows.clear()
        with sampler.one_fit(expected):
            block = []
            for _ in range(40):
                t = study.ask()
                objective(t)
                block.append(t.params)
        points[expected], drawn[expected] = block, sum(rows)
    assert points[0] == points[40]
    assert drawn[40] <= drawn[0] + 40, drawn  # at most one block's draw ahead given back
