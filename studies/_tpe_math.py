"""TPE's candidate scoring with the Gaussian tail mass computed array-wise, not element by element.

Optuna's Parzen estimator scores a candidate under every kernel; for an integer (stepped)
parameter that needs ``log(Phi(b) - Phi(a))`` for every (candidate, kernel) pair, and Optuna
computes each ``log Phi`` outside the central band with a Python function per element (and,
below -20, an asymptotic series iterated per element). With a few thousand trials that is
over a million Python calls per ask: most of a population's sampler time
(``bench/bench_overhead.py``). Here the same formulas run over whole arrays: the same branches,
the same series with the same stopping rule per element. Above -20 ``math.erf``/``math.erfc``/
``math.log`` are applied through ``numpy.frompyfunc``, so those values equal Optuna's bit for
bit; in the far tail numpy's square and log may differ from Python's in the last bit (a
relative 1e-16 of a log-mass below -200). ``tests/studies/test_fast.py`` checks the values and
that FastTPESampler's proposals equal TPESampler's point for point. Nothing in
Optuna is patched: :class:`studies._fast.FastTPESampler` calls :func:`log_pdf` for its own asks.

One fit serves many asks (a population's batch: :meth:`studies._fast.FastTPESampler.one_fit`),
so :func:`log_pdf` keeps, per estimator, what depends on the estimator alone (a weak-keyed
cache: it dies with the estimator): each stepped dimension's unique (mu, sigma) pairs and
normalisation, the continuous dimensions' stacked kernels with their bounds' mass and
``log(sigma)``, the categorical dimensions' ``log(weights)``, the mixture's ``log(weights)``; and
a stepped dimension's row of masses over those pairs is remembered per candidate value (its
bits), the values a call misses computed together. Every row and term is what
:func:`_mixture_log_pdf` computes for it, from the same inputs with the same numpy calls, added
in the same order: the results are equal bit for bit (``tests/studies/test_tpe_math.py``).
"""

from __future__ import annotations

import math
import sys
import threading
import weakref
from typing import Any

import numpy as np

from ._optuna_private import tpe_categorical_type, tpe_ndtr, tpe_unique_inverse_2d

__all__ = ["log_pdf", "log_ndtr", "log_gauss_mass", "sample"]

_erf = np.frompyfunc(math.erf, 1, 1)
_erfc = np.frompyfunc(math.erfc, 1, 1)
_log = np.frompyfunc(math.log, 1, 1)
_NORM_PDF_LOGC = math.log(math.sqrt(2 * math.pi))
_NDTRI_EXP_APPROX_C = math.sqrt(3) / math.pi


def _f(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _ndtr_exact(a: np.ndarray) -> np.ndarray:
    """Phi(a), as Optuna's scalar ``_ndtr_single`` computes it."""
    x = a / 2**0.5
    out = np.empty_like(x)
    lo = x < -1 / 2**0.5
    mid = ~lo & (x < 1 / 2**0.5)
    hi = ~(lo | mid)
    if lo.any():
        out[lo] = 0.5 * _f(_erfc(-x[lo]))
    if mid.any():
        out[mid] = 0.5 + 0.5 * _f(_erf(x[mid]))
    if hi.any():
        out[hi] = 1.0 - 0.5 * _f(_erfc(x[hi]))
    return out


def _log_ndtr_tail(a: np.ndarray) -> np.ndarray:
    """log Phi(a) for a <= -20: the asymptotic series, each element stopping where Optuna's does."""
    # (numpy's a**2 is a*a; Python's float power is C's pow: the two can differ in the last bit)
    log_lhs = -0.5 * a**2 - np.log(-a) - 0.5 * math.log(2 * math.pi)
    last = np.zeros_like(a)
    rhs = np.ones_like(a)
    numerator = np.ones_like(a)
    denom_factor = np.ones_like(a)
    denom_cons = 1 / a**2
    sign = 1.0
    i = 0
    active = np.abs(last - rhs) > sys.float_info.epsilon
    while active.any():
        i += 1
        sign = -sign
        last = np.where(active, rhs, last)
        denom_factor = np.where(active, denom_factor * denom_cons, denom_factor)
        numerator = np.where(active, numerator * (2 * i - 1), numerator)
        rhs = np.where(active, rhs + sign * numerator * denom_factor, rhs)
        active &= np.abs(last - rhs) > sys.float_info.epsilon
    return log_lhs + np.log(rhs)


def log_ndtr(a: np.ndarray) -> np.ndarray:
    """log Phi(a) elementwise, equal to Optuna's ``_truncnorm._log_ndtr``."""
    a = _f(a)
    out = np.empty_like(a)
    hi = a > 6
    mid = ~hi & (a > -20)
    lo = ~(hi | mid)
    if hi.any():
        out[hi] = -_ndtr_exact(-a[hi])
    if mid.any():
        out[mid] = _f(_log(_ndtr_exact(a[mid])))
    if lo.any():
        out[lo] = _log_ndtr_tail(a[lo])
    return out


def _log_diff(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    return log_p + np.log1p(-np.exp(log_q - log_p))


def _ndtr_by_math_erf(a: np.ndarray) -> np.ndarray:
    """Optuna's ``_truncnorm._ndtr`` as it computes arrays of under 2,000 values (its ``erf``
    applies ``math.erf`` to each; larger arrays get a polynomial that differs in the last bits)."""
    return 0.5 + 0.5 * _f(_erf(a / 2**0.5))


def log_gauss_mass(a: np.ndarray, b: np.ndarray, ndtr: Any = tpe_ndtr) -> np.ndarray:
    """log of the standard normal's mass on [a, b], as Optuna's ``_truncnorm._log_gauss_mass``."""
    a, b = _f(a), _f(b)
    case_left = b <= 0
    case_right = a > 0
    case_central = ~(case_left | case_right)
    out = np.full_like(a, fill_value=np.nan, dtype=np.complex128)
    if case_left.any():
        out[case_left] = _log_diff(log_ndtr(b[case_left]), log_ndtr(a[case_left]))
    if case_right.any():
        out[case_right] = _log_diff(log_ndtr(-a[case_right]), log_ndtr(-b[case_right]))
    if case_central.any():
        out[case_central] = np.log1p(-ndtr(a[case_central]) - ndtr(-b[case_central]))
    return np.real(out)


def _log_gauss_mass_unique(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a_uniq, b_uniq, inv = tpe_unique_inverse_2d(a.ravel(), b.ravel())
    return log_gauss_mass(a_uniq, b_uniq)[inv].reshape(a.shape)


def _truncnorm_logpdf(x: np.ndarray, a: np.ndarray, b: np.ndarray, loc: np.ndarray,
                      scale: np.ndarray) -> np.ndarray:
    x = (x - loc) / scale
    x, a, b = np.atleast_1d(x, a, b)
    out = (-(x**2) / 2.0 - _NORM_PDF_LOGC) - log_gauss_mass(a, b) - np.log(scale)
    x, a, b = np.broadcast_arrays(x, a, b)
    return np.select([a == b, (x < a) | (x > b)], [np.nan, -np.inf], default=out)


def _mixture_log_pdf(mixture: Any, x: np.ndarray) -> np.ndarray:
    """``_MixtureOfProductDistribution.log_pdf`` of Optuna, with the array-wise tail mass."""
    weights = mixture.weights
    weighted = np.zeros((len(x), len(weights)), dtype=np.float64)
    cont_dists, x_cont, lows_cont, highs_cont = [], [], [], []
    categorical = tpe_categorical_type()
    for i, d in enumerate(mixture.distributions):
        if isinstance(d, categorical):
            xi = x[:, i, np.newaxis, np.newaxis].astype(np.int64)
            weighted += np.log(np.take_along_axis(d.weights[np.newaxis], xi, axis=-1))[..., 0]
            continue
        is_log = d.is_log
        if (step := d.step) == 0.0:
            cont_dists.append(d)
            x_cont.append(np.log(x[:, i]) if is_log else x[:, i])
            lows_cont.append(d.adapted_low)
            highs_cont.append(d.adapted_high)
        else:
            xi_uniq, xi_inv = np.unique(x[:, i], return_inverse=True)
            mu_uniq, sigma_uniq, mu_sigma_inv = tpe_unique_inverse_2d(d.mu, d.sigma)
            weighted += _stepped_rows(xi_uniq, step, is_log, mu_uniq, sigma_uniq)[np.ix_(xi_inv, mu_sigma_inv)]
            weighted -= log_gauss_mass(
                (d.adapted_low - mu_uniq) / sigma_uniq, (d.adapted_high - mu_uniq) / sigma_uniq
            )[mu_sigma_inv]
    if len(x_cont):
        mus = np.asarray([d.mu for d in cont_dists]).T
        sigmas = np.asarray([d.sigma for d in cont_dists]).T
        weighted += _truncnorm_logpdf(
            np.asarray(x_cont).T[:, np.newaxis, :],
            a=(np.asarray(lows_cont) - mus) / sigmas,
            b=(np.asarray(highs_cont) - mus) / sigmas,
            loc=mus,
            scale=sigmas,
        ).sum(axis=-1)
    weighted += np.log(weights[np.newaxis])
    max_ = weighted.max(axis=1)
    max_[np.isneginf(max_)] = 0
    with np.errstate(divide="ignore"):
        return np.log(np.exp(weighted - max_[:, None]).sum(axis=1)) + max_


def _stepped_rows(xi_uniq: np.ndarray, step: float, is_log: bool, mu_uniq: np.ndarray,
                  sigma_uniq: np.ndarray) -> np.ndarray:
    """log mass of each stepped value's bin under each unique (mu, sigma) kernel, unnormalised:
    one row per value, as :func:`_mixture_log_pdf` computes it."""
    left = np.log(xi_uniq - step / 2) if is_log else (xi_uniq - step / 2)
    right = np.log(xi_uniq + step / 2) if is_log else (xi_uniq + step / 2)
    return _log_gauss_mass_unique(
        (left[:, np.newaxis] - mu_uniq) / sigma_uniq,
        (right[:, np.newaxis] - mu_uniq) / sigma_uniq,
    )


#: most float64s one stepped dimension of one estimator remembers (16 MiB); past it, it starts over
_MEMO_LIMIT = 1 << 21


class _Stepped:
    """A stepped (integer) dimension of one estimator: its kernels' unique (mu, sigma) pairs,
    their normalisation, and the rows of :func:`_stepped_rows` of the values seen so far."""

    def __init__(self, d: Any) -> None:
        self.step, self.is_log = d.step, d.is_log
        self.mu_uniq, self.sigma_uniq, self.inv = tpe_unique_inverse_2d(d.mu, d.sigma)
        self.norm = log_gauss_mass(
            (d.adapted_low - self.mu_uniq) / self.sigma_uniq,
            (d.adapted_high - self.mu_uniq) / self.sigma_uniq,
        )[self.inv]
        self.rows: dict[int, int] = {}  # a value's bits -> its row in table
        self.table = np.empty((0, len(self.mu_uniq)))
        self.lock = threading.Lock()

    def masses(self, xi: np.ndarray) -> np.ndarray:
        """The (len(xi), kernels) unnormalised log masses of the values ``xi``."""
        xi_uniq, xi_inv = np.unique(xi, return_inverse=True)
        width = len(self.mu_uniq)
        if xi_uniq.dtype != np.float64 or len(xi_uniq) * width > _MEMO_LIMIT:
            return self._rows(xi_uniq)[np.ix_(xi_inv, self.inv)]  # not float64s, or too many
        keys = xi_uniq.view(np.int64).tolist()  # by bits: a row is a function of its value's bits
        with self.lock:
            rows = self.rows
            idx = [rows.get(k, -1) for k in keys]
            missing = [j for j, r in enumerate(idx) if r < 0]
            if missing:
                if (len(rows) + len(missing)) * width > _MEMO_LIMIT:  # full: start over
                    rows.clear()
                    idx, missing = [-1] * len(keys), list(range(len(keys)))
                n, k = len(rows), len(missing)
                if n + k > len(self.table):
                    cap = max(n + k, min(2 * len(self.table), _MEMO_LIMIT // width), 16)
                    grown = np.empty((cap, width))
                    grown[:n] = self.table[:n]
                    self.table = grown
                self.table[n:n + k] = self._rows(xi_uniq[missing])
                for m, j in enumerate(missing):
                    rows[keys[j]] = idx[j] = n + m
            # (values as table[np.ix_(rows, inv)], gathered in two cheaper steps)
            return np.take(self.table[np.asarray(idx, dtype=np.intp)[xi_inv]], self.inv, axis=1)

    def _rows(self, xi_uniq: np.ndarray) -> np.ndarray:
        return _stepped_rows(xi_uniq, self.step, self.is_log, self.mu_uniq, self.sigma_uniq)


class _Prepared:
    """What :func:`_mixture_log_pdf` computes from one estimator's mixture alone, kept for the
    estimator's later calls (the mixture is built once, in the estimator's constructor)."""

    def __init__(self, mixture: Any) -> None:
        self.mixture = mixture
        categorical = tpe_categorical_type()
        #: per dimension, in order: ("categorical", log weights as (choices, kernels)),
        #: ("stepped", _Stepped) or ("continuous", whether it is log-scaled)
        self.dims: list[tuple[str, Any]] = []
        cont_dists, lows_cont, highs_cont = [], [], []
        for d in mixture.distributions:
            if isinstance(d, categorical):
                self.dims.append(("categorical", np.ascontiguousarray(np.log(d.weights).T)))
            elif d.step == 0.0:
                self.dims.append(("continuous", d.is_log))
                cont_dists.append(d)
                lows_cont.append(d.adapted_low)
                highs_cont.append(d.adapted_high)
            else:
                self.dims.append(("stepped", _Stepped(d)))
        self.cont: tuple[np.ndarray, ...] | None = None
        if cont_dists:
            # _truncnorm_logpdf's candidate-free terms, from the same arrays
            mus = np.asarray([d.mu for d in cont_dists]).T
            sigmas = np.asarray([d.sigma for d in cont_dists]).T
            a = (np.asarray(lows_cont) - mus) / sigmas
            b = (np.asarray(highs_cont) - mus) / sigmas
            a, b = np.atleast_1d(a, b)
            self.cont = (mus, sigmas, a, b, log_gauss_mass(a, b), np.log(sigmas), a == b)
        self.log_weights = np.log(mixture.weights[np.newaxis])

    def log_pdf(self, x: np.ndarray) -> np.ndarray:
        """:func:`_mixture_log_pdf` (``self.mixture``, x), the same operations in the same order."""
        weighted = np.zeros((len(x), self.log_weights.shape[1]), dtype=np.float64)
        x_cont = []
        for i, (kind, data) in enumerate(self.dims):
            if kind == "categorical":
                weighted += data[x[:, i].astype(np.int64)]
            elif kind == "continuous":
                x_cont.append(np.log(x[:, i]) if data else x[:, i])
            else:
                weighted += data.masses(x[:, i])
                weighted -= data.norm
        if len(x_cont):
            assert self.cont is not None
            mus, sigmas, a, b, mass, log_scale, degenerate = self.cont
            z = (np.asarray(x_cont).T[:, np.newaxis, :] - mus) / sigmas
            z = np.atleast_1d(z)
            out = (-(z**2) / 2.0 - _NORM_PDF_LOGC) - mass - log_scale
            # np.select([a == b, (z < a) | (z > b)], [nan, -inf], default=out), in place:
            # the same values in the same (C) layout, so the same sum
            out = np.ascontiguousarray(out)
            out[(z < a) | (z > b)] = -np.inf
            np.copyto(out, np.nan, where=degenerate)
            weighted += out.sum(axis=-1)
        weighted += self.log_weights
        max_ = weighted.max(axis=1)
        max_[np.isneginf(max_)] = 0
        with np.errstate(divide="ignore"):
            return np.log(np.exp(weighted - max_[:, None]).sum(axis=1)) + max_


#: estimator -> its _Prepared; weak: an entry goes with its estimator (a new estimator, even
#: under a dead one's id, gets its own)
_PREPARED: weakref.WeakKeyDictionary[Any, _Prepared] = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()


def _prepared(estimator: Any) -> _Prepared:
    mixture = estimator._mixture_distribution
    with _PREPARED_LOCK:
        p = _PREPARED.get(estimator)
        if p is None or p.mixture is not mixture:  # (a mixture replaced: prepared again)
            p = _PREPARED[estimator] = _Prepared(mixture)
    return p


def log_pdf(estimator: Any, samples: dict[str, np.ndarray]) -> np.ndarray:
    """A Parzen estimator's ``log_pdf(samples)``, equal to Optuna's, computed array-wise; what
    depends on the estimator alone is computed at its first call (see the module's doc)."""
    return _prepared(estimator).log_pdf(estimator._transform(samples))


def _log_pdf_uncached(estimator: Any, samples: dict[str, np.ndarray]) -> np.ndarray:
    """:func:`log_pdf` computed from scratch (the reference its cache must equal bit for bit)."""
    return _mixture_log_pdf(estimator._mixture_distribution, estimator._transform(samples))


# -- drawing candidates ---------------------------------------------------------------------------
# Optuna's truncated-normal sampler inverts the CDF by Newton's method, each iteration a
# ``_log_ndtr`` of every value through a Python function per element: ~440 Python calls for one
# ask's 24 candidates in three numeric dimensions, and small-array numpy calls for the rest:
# most of an ask's time (profiled). Below are Optuna's ``_MixtureOfProductDistribution.sample``,
# ``_truncnorm.rvs``, ``ppf`` and ``_ndtri_exp`` line for line, with :func:`log_ndtr` and
# :func:`log_gauss_mass` in place of the per-element functions, for many asks at once: one ask
# draws its uniforms from the generator in a fixed order (the kernels' choice, each categorical
# dimension's, then the numerical dimensions' quantiles), so ``asks`` asks' uniforms are one
# ``random_sample`` of ``asks`` rows, each row the doubles one ask would have drawn; every step
# after is element-wise, and the one step that is not, Newton's stop (when all of one call's
# values have converged), is taken per ask. So each ask's candidates are the ones Optuna's
# sampler draws for it, bit for bit, and the generator ends where ``asks`` single asks leave it
# (``tests/studies/test_tpe_math.py``).
def _ndtri_exp(y: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Optuna's ``_ndtri_exp``, each ``group`` of values iterating until all of its own converge."""
    flipped = y > -1e-2
    z = y.copy()
    z[flipped] = np.log(-np.expm1(y[flipped]))
    x = np.empty_like(y)
    if (small := np.nonzero(z < -5))[0].size:
        x[small] = -np.sqrt(-2.0 * (z[small] + _NORM_PDF_LOGC))
    if (moderate := np.nonzero(z >= -5))[0].size:
        x[moderate] = -_NDTRI_EXP_APPROX_C * np.log(np.expm1(-z[moderate]))
    going = np.arange(len(y))
    n_groups = int(group.max()) + 1 if len(group) else 0
    for _ in range(100):
        xs = x[going]
        log_ndtr_x = log_ndtr(xs)
        log_norm_pdf_x = -0.5 * xs**2 - _NORM_PDF_LOGC
        dx = (log_ndtr_x - z[going]) * np.exp(log_ndtr_x - log_norm_pdf_x)
        xs -= dx
        x[going] = xs
        unsettled = np.zeros(n_groups, dtype=bool)
        unsettled[group[going][~(np.abs(dx) < 1e-8 * np.abs(xs))]] = True
        going = going[unsettled[group[going]]]
        if not going.size:
            break
    x[flipped] *= -1
    return x


def _ppf(q: np.ndarray, a: np.ndarray, b: np.ndarray, group: np.ndarray, ndtr: Any) -> np.ndarray:
    q, a, b = np.atleast_1d(q, a, b)
    q, a, b, group = np.broadcast_arrays(q, a, b, group)
    case_left = a < 0
    case_right = ~case_left
    log_mass = log_gauss_mass(a, b, ndtr)
    out = np.empty_like(q)
    if (q_left := q[case_left]).size:
        log_phi = np.logaddexp(log_ndtr(a[case_left]), np.log(q_left) + log_mass[case_left])
        out[case_left] = _ndtri_exp(log_phi, group[case_left])
    if (q_right := q[case_right]).size:
        log_phi = np.logaddexp(log_ndtr(-b[case_right]), np.log1p(-q_right) + log_mass[case_right])
        out[case_right] = -_ndtri_exp(log_phi, group[case_right])
    out[q == 0] = a[q == 0]
    out[q == 1] = b[q == 1]
    out[a == b] = math.nan
    return out


def _mixture_sample(mixture: Any, rng: np.random.RandomState, asks: int, n: int) -> np.ndarray:
    """``asks`` x Optuna's ``mixture.sample(rng, n)``, one after the other, as rows of one array."""
    categorical = tpe_categorical_type()
    dims = mixture.distributions
    n_cat = sum(isinstance(d, categorical) for d in dims)
    u = rng.random_sample((asks, n * (1 + len(dims))))  # each row: the doubles one ask draws
    cdf = mixture.weights.cumsum()  # RandomState.choice(len(w), p=w): its cdf and searchsorted
    cdf /= cdf[-1]
    active = cdf.searchsorted(u[:, :n].reshape(-1), side="right")
    ret = np.empty((asks * n, len(dims)), dtype=float)
    disc_inds, numerical_inds, log_inds, numerical, disc = [], [], [], [], []
    col = n
    for i, d in enumerate(dims):
        if isinstance(d, categorical):
            rnd_quantile = u[:, col : col + n].reshape(-1)
            col += n
            cum_probs = np.cumsum(d.weights[active, :], axis=-1)
            assert np.isclose(cum_probs[:, -1], 1).all()
            cum_probs[:, -1] = 1
            ret[:, i] = np.sum(cum_probs < rnd_quantile[:, np.newaxis], axis=-1)
        else:
            numerical.append(d)
            numerical_inds.append(i)
            if d.step != 0.0:
                disc_inds.append(i)
                disc.append(d)
            if d.is_log:
                log_inds.append(i)
    if numerical:
        mus = np.asarray([d.mu[active] for d in numerical])
        sigmas = np.asarray([d.sigma[active] for d in numerical])
        lows = np.asarray([d.adapted_low for d in numerical])
        highs = np.asarray([d.adapted_high for d in numerical])
        k = len(numerical)
        # an ask's quantiles are uniform(size=(k, n)): its row's next k * n doubles, dimension-major
        quantiles = u[:, n * (1 + n_cat) : n * (1 + n_cat + k)].reshape(asks, k, n)
        quantiles = quantiles.transpose(1, 0, 2).reshape(k, asks * n)
        group = np.repeat(np.arange(asks), n)[np.newaxis, :]
        a = (lows[:, np.newaxis] - mus) / sigmas
        b = (highs[:, np.newaxis] - mus) / sigmas
        # one ask's ppf gives Optuna's normal CDF under 2,000 values: math.erf's
        ndtr = tpe_ndtr if asks == 1 else _ndtr_by_math_erf
        ret[:, numerical_inds] = (_ppf(quantiles, a, b, group, ndtr) * sigmas + mus).T
        ret[:, log_inds] = np.exp(ret[:, log_inds])
        step_d = np.asarray([d.step for d in disc])
        low_d = np.asarray([d.low for d in disc])
        high_d = np.asarray([d.high for d in disc])
        ret[:, disc_inds] = np.clip(low_d + np.round((ret[:, disc_inds] - low_d) / step_d) * step_d, low_d, high_d)
    return ret


def sample(estimator: Any, rng: np.random.RandomState, size: int, asks: int = 1) -> dict[str, np.ndarray]:
    """``asks`` calls of a Parzen estimator's ``sample(rng, size)``: the same draws and the same
    candidates, ask after ask (``asks * size`` values per parameter), array-wise."""
    mixture = estimator._mixture_distribution
    if asks > 1 and size * len(mixture.distributions) >= 2000:  # Optuna's erf switches to a polynomial
        drawn = np.concatenate([_mixture_sample(mixture, rng, 1, size) for _ in range(asks)])
    else:
        drawn = _mixture_sample(mixture, rng, asks, size)
    return estimator._untransform(drawn)
