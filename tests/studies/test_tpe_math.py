"""studies._tpe_math's per-estimator cache: every log_pdf equals the uncached computation bit for bit."""

from __future__ import annotations

import gc
import math
import weakref
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from studies import _fast, _tpe_math

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

#: int, int-log, stepped int, float-log, float, stepped float and categorical
SPACE = {
    "n_neurons": IntDistribution(5, 20),
    "n_dendrite_inputs": IntDistribution(16, 256, log=True),
    "every_third": IntDistribution(0, 30, step=3),
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
    "shift": FloatDistribution(-1.0, 1.0),
    "tenths": FloatDistribution(0.0, 1.0, step=0.1),
    "act": CategoricalDistribution(["relu", "tanh", "gelu"]),
}


def _value(p: dict[str, Any]) -> float:
    return (math.log(p["n_dendrite_inputs"]) - p["n_neurons"] / 7 + abs(math.log10(p["lr"]) + 3)
            + p["shift"] ** 2 + p["every_third"] / 30 - p["tenths"] + (p["act"] == "tanh"))


def _study(n: int, multivariate: bool = True, seed: int = 3) -> tuple[optuna.Study, _fast.FastTPESampler]:
    """A study of ``n`` trials asked through FastTPESampler: some pruned, some left running."""
    sampler = _fast.FastTPESampler(seed=seed, multivariate=multivariate, n_startup_trials=10)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    for i in range(n):
        trial = study.ask(SPACE)
        if i % 9 == 4:
            continue  # running: a lie to the constant liar
        if i % 6 == 1:
            trial.report(1.0, 1)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, _value(trial.params))
    return study, sampler


def _estimators(study: optuna.Study, sampler: _fast.FastTPESampler,
                space: dict[str, Any]) -> tuple[Any, Any]:
    """(below, above) fitted as FastTPESampler fits them for an ask over ``space``."""
    trials = study._get_trials(deepcopy=False,
                               states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    return sampler._fit(study, trials, space)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit: -0.0 is not 0.0 and a NaN only equals the same NaN."""
    return a.shape == b.shape and a.dtype == b.dtype == np.float64 and \
        np.array_equal(a.view(np.int64), b.view(np.int64))


def _batches(est: Any, other: Any, space: dict[str, Any], seed: int) -> list[dict[str, np.ndarray]]:
    """Candidate batches: drawn from either estimator (new and repeated values), reordered, one
    and many, the bounds, and values that score -inf or nan."""
    rng = np.random.RandomState(seed)
    drawn = [est.sample(rng, 24) for _ in range(6)] + [other.sample(rng, 24) for _ in range(3)]
    out = drawn + [drawn[0], drawn[2], drawn[0]]  # the same values again
    out.append({k: v[::-1].copy() for k, v in drawn[1].items()})  # reordered
    out.append({k: v[:1].copy() for k, v in drawn[3].items()})  # one candidate
    out.append(est.sample(rng, 300))  # many, mostly seen
    edges: dict[str, np.ndarray] = {}
    for name, d in space.items():
        if isinstance(d, CategoricalDistribution):
            edges[name] = np.array([0.0, len(d.choices) - 1.0, 1.0, 0.0])
        elif d.step is not None:
            edges[name] = np.array([d.low, d.high, d.low + d.step, d.high])
        else:  # the bounds, and one value outside each (log_pdf -inf there)
            lo, hi = d.low, d.high
            edges[name] = np.array([lo, hi, lo / 2 if d.log else lo - 1, hi * 2 if d.log else hi + 1])
    out.append(edges)
    nan = {k: v[:4].copy() for k, v in drawn[4].items()}
    for name, d in space.items():
        if not isinstance(d, CategoricalDistribution):
            nan[name][1] = np.nan  # a nan candidate value: the row of nan, memoised too
    out.append(nan)
    return out


def _check_all(below: Any, above: Any, space: dict[str, Any], seed: int = 0) -> int:
    n = 0
    for est, other in ((below, above), (above, below)):
        for samples in _batches(est, other, space, seed):
            cached = _tpe_math.log_pdf(est, samples)
            plain = _tpe_math._log_pdf_uncached(est, samples)
            assert _bits_equal(cached, plain), (cached, plain)
            n += 1
    return n


def test_cached_log_pdf_equals_the_uncached_bit_for_bit() -> None:
    study, sampler = _study(60)
    below, above = _estimators(study, sampler, dict(sorted(SPACE.items())))
    assert min(len(below._mixture_distribution.weights), len(above._mixture_distribution.weights)) > 5
    assert _check_all(below, above, dict(sorted(SPACE.items()))) > 20
    # the cache was used: each estimator has its entry, each stepped dimension its values'
    # rows, and a batch seen before adds none
    for est in (below, above):
        prepared = _tpe_math._PREPARED[est]
        stepped = [d for kind, d in prepared.dims if kind == "stepped"]
        assert len(stepped) == 4 and all(d.rows for d in stepped)
        before = [len(d.rows) for d in stepped]
        samples = est.sample(np.random.RandomState(0), 24)  # the first batch _batches drew
        assert _bits_equal(_tpe_math.log_pdf(est, samples), _tpe_math._log_pdf_uncached(est, samples))
        assert [len(d.rows) for d in stepped] == before
    # the values include -inf and nan, at the same places
    edges = _batches(below, above, dict(sorted(SPACE.items())), 0)[-2]
    assert np.isneginf(_tpe_math.log_pdf(below, edges)).any()


def test_cached_log_pdf_equals_the_uncached_for_univariate_estimators() -> None:
    # independent TPE: one estimator per parameter, a bandwidth per kernel (many unique pairs)
    study, sampler = _study(50, multivariate=False, seed=4)
    for name, d in SPACE.items():
        below, above = _estimators(study, sampler, {name: d})
        _check_all(below, above, {name: d}, seed=1)


def test_a_full_memo_starts_over_and_stays_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    study, sampler = _study(40, seed=5)
    space = dict(sorted(SPACE.items()))
    below, above = _estimators(study, sampler, space)
    # room for a few rows only: calls start over, or (more values than fit) compute directly
    monkeypatch.setattr(_tpe_math, "_MEMO_LIMIT", 40 * len(above._mixture_distribution.weights) // 4)
    _check_all(below, above, space, seed=2)


def test_a_new_fit_is_scored_with_its_own_values() -> None:
    study, sampler = _study(40, seed=6)
    space = dict(sorted(SPACE.items()))
    old_below, old_above = _estimators(study, sampler, space)
    samples = old_below.sample(np.random.RandomState(1), 24)
    old = _tpe_math.log_pdf(old_below, samples)
    assert old_below in _tpe_math._PREPARED
    for _ in range(15):  # more trials: another fit, other kernels
        trial = study.ask(SPACE)
        study.tell(trial, _value(trial.params))
    below, above = _estimators(study, sampler, space)
    new = _tpe_math.log_pdf(below, samples)
    assert _bits_equal(new, _tpe_math._log_pdf_uncached(below, samples))
    assert not np.array_equal(new, old)
    # the old estimator's values are its own still
    assert _bits_equal(_tpe_math.log_pdf(old_below, samples), old)
    # an estimator whose mixture is replaced is prepared again
    old_below._mixture_distribution = above._mixture_distribution
    assert _bits_equal(_tpe_math.log_pdf(old_below, samples), _tpe_math._log_pdf_uncached(above, samples))
    # an entry goes with its estimator (earlier tests' estimators are collected first)
    gc.collect()
    n, gone = len(_tpe_math._PREPARED), weakref.ref(old_below)
    del old_below, old_above
    gc.collect()
    assert gone() is None and len(_tpe_math._PREPARED) == n - 1


def test_the_sampler_proposes_the_same_points_with_the_cache_as_without(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a population's batch: many asks from one fit, each scored by the cached estimators
    points = []
    for cached in (True, False):
        if not cached:
            monkeypatch.setattr(_tpe_math, "log_pdf", _tpe_math._log_pdf_uncached)
        study, sampler = _study(40, seed=7)
        with sampler.one_fit():
            points.append([study.ask(SPACE).params for _ in range(40)])
    assert points[0] == points[1]


@pytest.mark.parametrize("multivariate", [True, False])
def test_sample_draws_what_optunas_sample_draws_bit_for_bit(multivariate: bool) -> None:
    """The array-wise candidates equal Optuna's for every dimension kind, small and large draws,
    and leave the generator where Optuna's leaves it (the next ask's draws are the same too)."""
    study, sampler = _study(60, multivariate=multivariate)
    spaces = [dict(sorted(SPACE.items()))] if multivariate else [{k: d} for k, d in SPACE.items()]
    n = 0
    for space in spaces:
        for est in _estimators(study, sampler, space):
            for seed, size, asks in ((0, 24, 1), (1, 1, 1), (2, 500, 1), (3, 24, 40), (4, 7, 3), (5, 400, 2)):
                mine, theirs = np.random.RandomState(seed), np.random.RandomState(seed)
                for _ in range(2):
                    got = _tpe_math.sample(est, mine, size, asks)
                    want = [est.sample(theirs, size) for _ in range(asks)]  # one ask after another
                    assert got.keys() == want[0].keys()
                    for k in got:
                        joined = np.concatenate([np.asarray(w[k], np.float64) for w in want])
                        assert _bits_equal(np.asarray(got[k], np.float64), joined), k
                    n += 1
                assert mine.randint(1 << 30) == theirs.randint(1 << 30)
    assert n >= 20


def test_sample_draws_the_same_in_the_far_tails() -> None:
    """Kernels far narrower than their bounds (truncation points beyond -20 sigma, both sides)."""
    study, sampler = _study(60)
    below, _ = _estimators(study, sampler, dict(sorted(SPACE.items())))
    for d in below._mixture_distribution.distributions:
        if hasattr(d, "sigma") and d.step == 0.0:
            d.sigma[:] = d.sigma * 1e-3
    mine, theirs = np.random.RandomState(9), np.random.RandomState(9)
    got, want = _tpe_math.sample(below, mine, 200), below.sample(theirs, 200)
    for k in want:
        assert _bits_equal(np.asarray(got[k], np.float64), np.asarray(want[k], np.float64)), k
