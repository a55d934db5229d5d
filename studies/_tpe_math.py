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
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from ._optuna_private import tpe_categorical_type, tpe_ndtr, tpe_unique_inverse_2d

__all__ = ["log_pdf", "log_ndtr", "log_gauss_mass"]

_erf = np.frompyfunc(math.erf, 1, 1)
_erfc = np.frompyfunc(math.erfc, 1, 1)
_log = np.frompyfunc(math.log, 1, 1)
_NORM_PDF_LOGC = math.log(math.sqrt(2 * math.pi))


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


def log_gauss_mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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
        out[case_central] = np.log1p(-tpe_ndtr(a[case_central]) - tpe_ndtr(-b[case_central]))
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
            left = np.log(xi_uniq - step / 2) if is_log else (xi_uniq - step / 2)
            right = np.log(xi_uniq + step / 2) if is_log else (xi_uniq + step / 2)
            weighted += _log_gauss_mass_unique(
                (left[:, np.newaxis] - mu_uniq) / sigma_uniq,
                (right[:, np.newaxis] - mu_uniq) / sigma_uniq,
            )[np.ix_(xi_inv, mu_sigma_inv)]
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


def log_pdf(estimator: Any, samples: dict[str, np.ndarray]) -> np.ndarray:
    """A Parzen estimator's ``log_pdf(samples)``, equal to Optuna's, computed array-wise."""
    return _mixture_log_pdf(estimator._mixture_distribution, estimator._transform(samples))
