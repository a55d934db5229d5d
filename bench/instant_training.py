"""A test-only plugin: trials train instantly (bench_overhead's made-up curves) in this process.

Imported by every worker of ``bench/bench_scale.py`` (``DENDRO_PLUGINS=instant_training``
with ``bench/`` on ``PYTHONPATH``, or the bench's own launcher), so that what is left to
measure is the service: storage, leases, sampler, pruner. Never import it in real use.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_overhead  # noqa: E402

import core  # noqa: E402
import studies  # noqa: E402
from studies import _fast, _population, _runner  # noqa: E402


def _no_data(*args: object, **kwargs: object) -> None:
    return None


_runner._train_seeds = bench_overhead.fake_train_seeds  # type: ignore[assignment]
_runner.load_data = _population.load_data = studies.load_data = _no_data  # type: ignore[assignment]
core.train_population = bench_overhead.fake_train_population  # type: ignore[assignment]

# -- the study lock, timed: how long this worker waited for it and held it (printed at exit) --
import atexit  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

_LOCK = {"n": 0, "wait": 0.0, "hold": 0.0, "t0": time.perf_counter()}
_study_lock = _runner.study_lock


@contextlib.contextmanager
def _timed_lock(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    with _study_lock(*args, **kwargs):  # type: ignore[arg-type]
        t1 = time.perf_counter()
        try:
            yield
        finally:
            _LOCK["n"] += 1
            _LOCK["wait"] += t1 - t0
            _LOCK["hold"] += time.perf_counter() - t1


def _lock_report() -> None:
    print(f"LOCKSTATS pid={os.getpid()} n={_LOCK['n']} wait={_LOCK['wait']:.3f} hold={_LOCK['hold']:.3f} "
          f"alive={time.perf_counter() - _LOCK['t0']:.3f}", flush=True)


# On PostgreSQL a fast ask takes no study lock: the study row's lock, held from the answer of
# the statement that takes it (``FOR UPDATE``) to the commit of the trials it creates.
_create_trials = _fast.FastStorage.create_trials
_study_attrs = _fast.FastStorage._study_attrs
_ROW: dict[str, float] = {}


def _timed_create(self: _fast.FastStorage, n: int, decide: object = None) -> list[int]:
    if decide is None:
        return _create_trials(self, n)
    _ROW.pop("t1", None)
    t0 = _ROW["t0"] = time.perf_counter()
    try:
        return _create_trials(self, n, decide)  # type: ignore[arg-type]
    finally:
        del _ROW["t0"]
        t1 = _ROW.pop("t1", time.perf_counter())
        _LOCK["n"] += 1
        _LOCK["wait"] += t1 - t0
        _LOCK["hold"] += time.perf_counter() - t1


def _timed_attrs(self: _fast.FastStorage, rows: object) -> object:
    # the answer of the read that takes the row lock (or, without one, the first read) is here
    if "t0" in _ROW and "t1" not in _ROW:
        _ROW["t1"] = time.perf_counter()
    return _study_attrs(self, rows)


_runner.study_lock = _timed_lock  # type: ignore[assignment]
_fast.FastStorage.create_trials = _timed_create  # type: ignore[method-assign]
_fast.FastStorage._study_attrs = _timed_attrs  # type: ignore[method-assign]
atexit.register(_lock_report)

# -- optional: each worker profiles itself (cProfile) and dumps to $BENCH_SCALE_PROFILE/<pid>.prof at exit --
if os.environ.get("BENCH_SCALE_PROFILE"):
    import cProfile  # noqa: E402

    _PROF = cProfile.Profile()

    def _dump_profile() -> None:
        _PROF.disable()
        _PROF.dump_stats(os.path.join(os.environ["BENCH_SCALE_PROFILE"], f"{os.getpid()}.prof"))

    atexit.register(_dump_profile)
    _PROF.enable()
