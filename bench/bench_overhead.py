"""Service overhead per trial (storage + sampler) with an instant trainer: plain Optuna vs ours.

    python bench/bench_overhead.py [--sizes 100,1000,2000] [--backends sqlite,postgresql]
        [--paths plain,trial,population] [--window 100] [--repeats 3] [--population 64]
        [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test] [--quick]

The seed's space (dendritic_simple on Fashion-MNIST: neurons 5-20, dendrites 3-15, inputs
16-256 log, lr log) under ``max_params=8000``, 15 epochs, TPE, the median pruner. Training is
replaced by a curve computed from the parameters, so what is left is Optuna and our service
layer. Paths:

- ``plain``: plain Optuna on an ``RDBStorage(url)``: ``study.ask()``, the space's suggests,
  15 x ``trial.report`` + ``trial.should_prune()``, ``study.tell()``; TPE (multivariate, 10
  startup trials) and MedianPruner(5, 3), as ``studies.make_sampler/make_pruner`` configure.
- ``trial``: what ``dendro worker`` runs per trial: ``studies.ask_trial`` then
  ``studies.execute_trial`` (budget gate, attributes, lease, reports and pruning, result
  attributes, tell, done check), on ``studies.open_storage(url)``, with the trainer replaced.
- ``population``: ``execute_population`` (K members at once, slots refilled as members end)
  with ``core.train_population`` replaced by a scheduler that does no work.

Each size N is measured on its last ``--window`` trials: the study is first filled with
N - window finished trials inserted in bulk (params, distributions, values, user attributes
with a 15-epoch history, constraint, 15 intermediate values; some pruned, some infeasible),
loaded once (a worker that runs for a while has them cached), then the window runs for real.
SQLite studies live in a fresh temporary file; PostgreSQL ones get a fresh name and are
deleted afterwards. The paths take turns within each repeat (the machine's load changes).
Columns are medians over ``--repeats`` runs of the window's mean
milliseconds per asked trial, split into the time spent inside the sampler, the pruner and
the storage (exclusive of each other: a storage read made by the sampler is storage), and
the rest (Optuna's and our Python around them). ``plain/ours`` is the plain path's total over
the row's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.storages._rdb import models
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import core  # noqa: E402
import studies  # noqa: E402
from studies import _fast, _population, _runner  # noqa: E402
from studies._storage import rdb  # noqa: E402

SEED_SPACE = {
    "n_neurons": {"type": "int", "low": 5, "high": 20},
    "n_dendrites": {"type": "int", "low": 3, "high": 15},
    "n_dendrite_inputs": {"type": "int", "low": 16, "high": 256, "log": True},
    "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
}
MAX_PARAMS = 8000
EPOCHS = 15
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BUCKETS = ("sampler", "pruner", "storage")


def make_spec(name: str, n_trials: int, seed: int) -> studies.StudySpec:
    return studies.StudySpec(
        name=name, model="dendritic_simple", dataset="fashion-mnist", search_space=SEED_SPACE,
        max_params=MAX_PARAMS, n_trials=n_trials, n_epochs=EPOCHS, batch_size=256,
        sampler="tpe", pruner="median", seed=seed,
    )


# -- the instant trainer ------------------------------------------------------------------------
def curve(params: dict[str, Any], n_params: int) -> list[dict[str, Any]]:
    """Per-epoch metrics of a made-up training run: a deterministic function of the point."""
    rng = random.Random(json.dumps({k: params[k] for k in sorted(params)}, default=str))
    final = (0.80 + 0.08 * math.log(n_params) / math.log(MAX_PARAMS)
             - 0.01 * (math.log10(float(params["lr"])) - math.log10(3e-3)) ** 2
             + rng.gauss(0.0, 0.003))
    speed = rng.uniform(1.5, 4.0)
    out = []
    for e in range(1, EPOCHS + 1):
        acc = final - 0.3 * math.exp(-(e - 1) / speed) + rng.gauss(0.0, 0.002)
        out.append({
            "epoch": e, "train_loss": 1.6 * (1 - acc) + 0.05, "train_accuracy": acc + 0.01,
            "val_loss": 1.6 * (1 - acc), "val_accuracy": acc, "test_loss": 1.6 * (1 - acc) + 0.01,
            "test_accuracy": acc - 0.005, "seconds": 0.0, "n_params": n_params,
        })
    return out


def _result(history: list[dict[str, Any]], seed: int, n_params: int,
            on_epoch: Callable[[int, dict[str, Any]], bool] | None) -> core.TrainResult:
    res = core.TrainResult(n_params=n_params, device="cpu", seed=seed)
    for m in history:
        res.history.append(m)
        if on_epoch is not None and on_epoch(m["epoch"], m):
            res.status = "stopped"
            break
    return res


def fake_train_seeds(spec: studies.StudySpec, number: int, family: str, model_args: dict[str, Any],
                     train_args: dict[str, Any], n: int, data: Any, dev: Any,
                     on_epoch: Callable[[int, dict[str, Any]], bool]) -> tuple[list[Any], None]:
    params = {k: model_args[k] for k in SEED_SPACE if k in model_args} | {"lr": train_args["lr"]}
    seed = _runner.trial_seed(spec, number)
    return [_result(curve(params, n), seed, n, on_epoch)], None


#: the population a study's "auto" takes in fake_train_population (the CPU's 8; an H200 takes 996)
AUTO_SIZE = 8


def fake_train_population(model: str, configs: Any, data: Any, n_epochs: int, batch_size: int = 128,
                          device: Any = None, seed: int = 0, on_epoch: Any = None, *,
                          population_size: Any = None, on_result: Any = None,
                          max_population: Any = None, precision: str = "fp32",
                          on_settle: Any = None, keep_weights: Any = None, **_: Any) -> list[Any]:
    """core.train_population's scheduling (slots refilled as members end), without the work:
    each member's epochs are :func:`curve`'s; ``keep_weights`` is asked of each member that
    ends, before ``on_result``, as the trainer asks it."""
    spec = make_spec("x", 1, 0)
    size = population_size if isinstance(population_size, int) else AUTO_SIZE
    it = iter(configs)
    results: list[core.TrainResult] = []
    active: list[tuple[int, list[dict[str, Any]]]] = []
    exhausted = False
    while True:
        while len(active) < size and not exhausted:
            try:
                cfg = next(it)
            except StopIteration:
                exhausted = True
                break
            params = {k: cfg[k] for k in SEED_SPACE}
            n = studies.count_point(spec, params)
            results.append(core.TrainResult(n_params=n, device="cpu", seed=cfg["seed"]))
            active.append((len(results) - 1, curve(params, n)))
        if not active:
            return results
        ended = []
        for idx, hist in active:
            res = results[idx]
            m = hist[len(res.history)]
            res.history.append(m)
            if on_epoch(idx, m["epoch"], m):
                res.status = "stopped"
                ended.append(idx)
            elif len(res.history) >= n_epochs:
                ended.append(idx)
        if on_settle is not None:  # every member reported: the settled rung's losers stop
            for idx, _ in active:
                if idx not in ended and on_settle(idx):
                    results[idx].status = "stopped"
                    ended.append(idx)
        for idx in ended:
            if keep_weights is not None:
                keep_weights(idx, results[idx])
            on_result(idx, results[idx])
        active = [a for a in active if a[0] not in ended]


@contextlib.contextmanager
def instant_training() -> Iterator[None]:
    saved = (_runner._train_seeds, _runner.load_data, _population.load_data, core.train_population)
    _runner._train_seeds = fake_train_seeds  # type: ignore[assignment]
    _runner.load_data = _population.load_data = lambda *a, **k: None  # type: ignore[assignment]
    core.train_population = fake_train_population  # type: ignore[assignment]
    try:
        yield
    finally:
        (_runner._train_seeds, _runner.load_data, _population.load_data,
         core.train_population) = saved  # type: ignore[assignment]


# -- a study's history, inserted in bulk ---------------------------------------------------------
def history(spec: studies.StudySpec, n: int, seed: int) -> list[optuna.trial.FrozenTrial]:
    """``n`` finished trials as the worker would leave them: about 1 in 8 infeasible, 40% pruned."""
    rng = random.Random(seed)
    space = {name: p.distribution() for name, p in spec.space.items()}
    now = datetime.datetime.now()
    constraint = f"{optuna.study._constrained_optimization._CONSTRAINTS_KEY}:max_params"
    out = []
    for number in range(n):
        params: dict[str, Any] = {}
        for name, d in space.items():
            if isinstance(d, optuna.distributions.IntDistribution):
                params[name] = (round(math.exp(rng.uniform(math.log(d.low), math.log(d.high))))
                                if d.log else rng.randint(d.low, d.high))
            else:
                assert isinstance(d, optuna.distributions.FloatDistribution)
                params[name] = math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
        count = studies.count_point(spec, params)
        user: dict[str, Any] = {"n_params": count}
        ivs: dict[int, float] = {}
        values: list[float] | None = None
        state = TrialState.PRUNED
        if count > MAX_PARAMS:
            user |= {"infeasible": True, "reason": f"{count} parameters exceed max_params={MAX_PARAMS}"}
        else:
            hist = curve(params, count)
            if rng.random() < 0.4:
                hist = hist[: rng.randint(4, 12)]
            else:
                state = TrialState.COMPLETE
            ivs = {m["epoch"]: m["val_accuracy"] for m in hist}
            values = [hist[-1]["val_accuracy"]]
            res = core.TrainResult(history=hist, n_params=count, seed=number,
                                   status="completed" if state == TrialState.COMPLETE else "stopped")
            user |= {"family": spec.model, "worker": "bench:0",
                     **_runner._result_attrs([res], core.resolve_device("cpu"), "bench:0")}
        out.append(optuna.trial.FrozenTrial(
            number=number, state=state, value=None, values=values, datetime_start=now,
            datetime_complete=now, params=params, distributions=dict(space), user_attrs=user,
            system_attrs={constraint: float(count - MAX_PARAMS)}, intermediate_values=ivs,
            trial_id=0,
        ))
    return out


def insert_trials(storage: optuna.storages.BaseStorage, study_id: int,
                  trials: list[optuna.trial.FrozenTrial]) -> None:
    """Write finished trials as Optuna's add_trials would, in a few statements."""
    if not trials:
        return
    engine = rdb(storage).engine
    utc = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    with engine.begin() as con:
        con.execute(sa.insert(models.TrialModel.__table__), [
            {"study_id": study_id, "number": t.number, "state": t.state,
             "datetime_start": utc, "datetime_complete": utc} for t in trials])
        ids = dict(con.execute(sa.select(models.TrialModel.number, models.TrialModel.trial_id)
                               .where(models.TrialModel.study_id == study_id)).all())
        params, values, users, systems, ivs = [], [], [], [], []
        for t in trials:
            tid = ids[t.number]
            for name, v in t.params.items():
                d = t.distributions[name]
                params.append({"trial_id": tid, "param_name": name, "param_value": d.to_internal_repr(v),
                               "distribution_json": optuna.distributions.distribution_to_json(d)})
            for i, v in enumerate(t.values or []):
                stored, kind = models.TrialValueModel.value_to_stored_repr(v)
                values.append({"trial_id": tid, "objective": i, "value": stored, "value_type": kind})
            users += [{"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in t.user_attrs.items()]
            systems += [{"trial_id": tid, "key": k, "value_json": json.dumps(v)} for k, v in t.system_attrs.items()]
            for step, v in t.intermediate_values.items():
                stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(v)
                ivs.append({"trial_id": tid, "step": step, "intermediate_value": stored,
                            "intermediate_value_type": kind})
        for model, rows in ((models.TrialParamModel, params), (models.TrialValueModel, values),
                            (models.TrialUserAttributeModel, users),
                            (models.TrialSystemAttributeModel, systems),
                            (models.TrialIntermediateValueModel, ivs)):
            if rows:
                con.execute(sa.insert(model.__table__), rows)


# -- where the time goes -------------------------------------------------------------------------
class Split:
    """Exclusive time inside wrapped callables, by bucket, on the measuring thread only."""

    STORAGE_METHODS = (
        "create_new_trial", "set_trial_param", "set_trial_state_values",
        "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
        "get_trial", "get_all_trials", "get_trial_id_from_study_id_trial_number",
        "get_study_user_attrs", "get_study_system_attrs", "get_study_directions",
        "get_study_name_from_id", "get_study_id_from_name", "set_study_user_attr",
        "get_trial_system_attrs", "get_trial_user_attrs", "record_heartbeat", "_get_stale_trial_ids",
        "get_best_trial", "get_n_trials",
        # the fast path's own round trips
        "refresh", "flush", "create_trials", "reserve",
    )

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.stack: list[list[float]] = []  # [start, time in children]
        self.time: dict[str, float] = defaultdict(float)
        self.saved: list[tuple[Any, str, Any, bool]] = []

    def _timed(self, fn: Callable[..., Any], bucket: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self.thread:
                return fn(*args, **kwargs)
            self.stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                start, children = self.stack.pop()
                spent = time.perf_counter() - start
                self.time[bucket] += spent - children
                if self.stack:
                    self.stack[-1][1] += spent
        return wrapper

    def wrap(self, obj: Any, names: tuple[str, ...], bucket: str) -> None:
        for name in names:
            fn = getattr(obj, name, None)
            if fn is None:
                continue
            own = name in getattr(obj, "__dict__", {})
            self.saved.append((obj, name, obj.__dict__.get(name) if own else None, own))
            setattr(obj, name, self._timed(fn, bucket))

    def wrap_lock(self, module: Any) -> None:
        """The study lock's enter and exit are storage round trips (PostgreSQL) or a flock."""
        original = getattr(module, "study_lock", None)
        if original is None:
            return
        timed = self._timed

        @contextlib.contextmanager
        def lock(storage: Any, name: str) -> Iterator[None]:
            cm = original(storage, name)
            timed(cm.__enter__, "storage")()
            try:
                yield
            except BaseException:
                if not timed(cm.__exit__, "storage")(*sys.exc_info()):
                    raise
            else:
                timed(cm.__exit__, "storage")(None, None, None)

        self.saved.append((module, "study_lock", original, True))
        module.study_lock = lock

    def watch(self, study: optuna.Study) -> None:
        self.wrap(study._storage, self.STORAGE_METHODS, "storage")
        view = _fast.of(study)  # the study's own view in the worker's storage, if it has one
        if view is not None and view is not study._storage:
            self.wrap(view, self.STORAGE_METHODS, "storage")
        self.wrap(study.sampler, ("infer_relative_search_space", "sample_relative",
                                  "sample_independent", "before_trial", "after_trial"), "sampler")
        self.wrap(study.pruner, ("prune",), "pruner")

    def restore(self) -> None:
        for obj, name, old, own in reversed(self.saved):
            if own and old is not None:
                setattr(obj, name, old)
            else:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
        self.saved.clear()


# -- the three paths -----------------------------------------------------------------------------
def _plain_window(study: optuna.Study, spec: studies.StudySpec, window: int) -> int:
    for _ in range(window):
        trial = study.ask()
        params = studies.suggest(trial, spec.space)
        pruned = False
        hist = curve(params, studies.count_point(spec, params))
        for m in hist:
            trial.report(m["val_accuracy"], m["epoch"])
            if trial.should_prune():
                pruned = True
                break
        if pruned:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, hist[-1]["val_accuracy"])
    return window


def _trial_window(study: optuna.Study, spec: studies.StudySpec, window: int) -> int:
    asked = 0
    while (trial := studies.ask_trial(study, spec)) is not None:
        studies.execute_trial(study, trial, spec, device="cpu", worker="bench:1")
        asked += 1
    return asked


def _population_window(study: optuna.Study, spec: studies.StudySpec, window: int, k: int) -> int:
    outcomes = _population.execute_population(study, spec, population_size=k, device="cpu",
                                              worker="bench:1")
    return len(outcomes)


def run_one(path: str, url: str, size: int, window: int, seed: int, k: int) -> dict[str, float]:
    """One measured window of one path: ms per asked trial, total and per bucket."""
    window = min(window, size)
    name = f"bench-{path}-{size}-{uuid.uuid4().hex[:8]}"
    past = history(make_spec(name, 1, seed), size - window, seed)
    finished = sum(1 for t in past if "infeasible" not in t.user_attrs)
    spec = make_spec(name, finished + window, seed)
    if path == "plain":
        storage: optuna.storages.BaseStorage = optuna.storages.RDBStorage(url)
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10),
            pruner=studies.make_pruner(spec))
    else:
        storage = studies.open_storage(url)
        studies.create_study(spec, storage, name)
    insert_trials(storage, storage.get_study_id_from_name(name), past)
    if path != "plain":
        study, spec = studies.load_study(name, storage, sampler_seed=seed)
        fast = getattr(_runner, "_fast_storage", None)  # what the first ask puts under the study
        if fast is not None:
            fast(study)
    study.get_trials(deepcopy=False)  # a running worker has the history cached
    split = Split()
    split.watch(study)
    split.wrap_lock(_runner)
    split.wrap_lock(_population)
    try:
        with instant_training(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            if path == "plain":
                asked = _plain_window(study, spec, window)
            elif path == "trial":
                asked = _trial_window(study, spec, window)
            else:
                asked = _population_window(study, spec, window, k)
            total = time.perf_counter() - start
    finally:
        split.restore()
    if path != "plain":
        assert studies.progress(study)["finished"] == spec.n_trials, studies.progress(study)
    if not url.startswith("sqlite"):
        optuna.delete_study(study_name=name, storage=url)
    row = {"total": 1000 * total / asked, "asked": asked}
    for b in BUCKETS:
        row[b] = 1000 * split.time[b] / asked
    row["other"] = row["total"] - sum(row[b] for b in BUCKETS)
    return row


def _retrying(run: Callable[[], dict[str, float]], tries: int = 3) -> dict[str, float]:
    """A run again from scratch when the database went away under it (a server restart)."""
    for attempt in range(tries):
        try:
            return run()
        except (sa.exc.OperationalError, sa.exc.InterfaceError,
                optuna.exceptions.StorageInternalError, studies.StorageError) as exc:
            if attempt == tries - 1:
                raise
            print(f"  (the database went away: {exc.__class__.__name__}; running it again)",
                  file=sys.stderr, flush=True)
            for storage in studies._storage._STORAGES.values():
                storage.engine.dispose()
            studies._storage._STORAGES.clear()
            time.sleep(5)
    raise AssertionError("unreachable")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,2000")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--paths", default="plain,trial,population")
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--population", type=int, default=64, help="K of the population path")
    ap.add_argument("--pg-url", default=PG_URL)
    ap.add_argument("--quick", action="store_true", help="100 trials only, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.repeats = "100", 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sizes = [int(s) for s in args.sizes.split(",")]
    paths = args.paths.split(",")
    header = (f"{'backend':<11}{'trials':>7}  {'path':<11}{'ms/trial':>9}{'sampler':>9}"
              f"{'pruner':>8}{'storage':>9}{'other':>8}{'plain/ours':>12}")
    print(f"window {args.window} trials, median of {args.repeats}; population K={args.population}")
    print(header)
    print("-" * len(header))
    for backend in args.backends.split(","):
        for size in sizes:
            runs: dict[str, list[dict[str, float]]] = {path: [] for path in paths}
            for r in range(args.repeats):  # paths take turns, so that a change of load hits all
                for path in paths:
                    with tempfile.TemporaryDirectory() as tmp:
                        url = (f"sqlite:///{tmp}/bench.db" if backend == "sqlite" else args.pg_url)
                        runs[path].append(_retrying(functools.partial(
                            run_one, path, url, size, args.window, seed=r, k=args.population)))
            rows = {path: {key: statistics.median(run[key] for run in rs) for key in rs[0]}
                    for path, rs in runs.items()}
            for path, row in rows.items():
                ratio = ""
                if path != "plain" and "plain" in rows:
                    ratio = f"{rows['plain']['total'] / row['total']:.1f}x"
                print(f"{backend:<11}{size:>7}  {path:<11}{row['total']:>9.1f}{row['sampler']:>9.1f}"
                      f"{row['pruner']:>8.1f}{row['storage']:>9.1f}{row['other']:>8.1f}{ratio:>12}",
                      flush=True)


if __name__ == "__main__":
    main()
