"""Seeded toy time series for the recurrent families: multi-frequency sines, delayed recall, Lorenz.

Every generator returns a regression :class:`~core.Dataset` with ``x`` of shape
``(N, seq_len, F)`` (float32; ``flatten`` is ignored) and targets ``(N, out)`` for the
last step, or ``(N, seq_len, out)`` with ``sequence_targets=True`` (one target per step;
train those models with ``return_sequences=True``). ``n_samples`` sequences form the pool
that ``subset_size`` and ``val_fraction`` split into train and validation, as for the
image datasets; ``n_test`` more are drawn from an independent stream for the test split.
All of it is a function of ``data_seed`` (default: ``seed``).

Forecasting targets (``multi_sine``, ``lorenz``) are the next ``horizon`` observations
after the window, flattened in time order, so ``out = horizon * F``; with
``sequence_targets`` step ``t`` is paired with observations ``t+1 .. t+horizon``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._data import Dataset, DatasetInfo, register_dataset, split_train_val

__all__: list[str] = []

_SEQ_LEN = 50
_N_SAMPLES = 2500
_N_TEST = 500

Generator = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def _check_int(minimum: int, **values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")


def _forecast_pairs(
    obs: np.ndarray, seq_len: int, horizon: int, sequence_targets: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-``horizon`` targets from observations ``(n, seq_len + horizon, F)``."""
    n, _, f = obs.shape
    x = obs[:, :seq_len]
    if not sequence_targets:
        return x, obs[:, seq_len:].reshape(n, horizon * f)
    # windows[n, t, f, k] = obs[n, t + 1 + k, f]
    windows = np.lib.stride_tricks.sliding_window_view(obs[:, 1:], horizon, axis=1)
    return x, windows.transpose(0, 1, 3, 2).reshape(n, seq_len, horizon * f)


def _build(
    name: str,
    generate: Generator,
    *,
    n_samples: int,
    n_test: int,
    subset_size: int | None,
    val_fraction: float,
    seed: int,
    data_seed: int | None,
    standardise_features: int = 0,
) -> Dataset:
    """Draw pool and test sets from separate streams, split, optionally standardise.

    With ``standardise_features=F`` inputs and targets (whose last dimension holds
    groups of ``F`` features) are scaled per feature with the training split's statistics.
    """
    _check_int(2, n_samples=n_samples)
    _check_int(1, n_test=n_test)
    root = seed if data_seed is None else data_seed
    # Separate streams keep the test set unchanged when n_samples changes, and vice versa.
    x_pool, y_pool = generate(np.random.default_rng([root, 0]), n_samples)
    x_test, y_test = generate(np.random.default_rng([root, 1]), n_test)
    tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
               for a in (x_pool, y_pool, x_test, y_test)]
    xtr, ytr, xva, yva = split_train_val(tensors[0], tensors[1], subset_size, val_fraction, seed)
    xte, yte = tensors[2], tensors[3]
    normalization = None
    if standardise_features:
        f = standardise_features
        mean = xtr.reshape(-1, f).mean(0)
        std = xtr.reshape(-1, f).std(0).clamp_min(1e-6)

        def scale(t: torch.Tensor) -> torch.Tensor:
            grouped = t.reshape(*t.shape[:-1], -1, f)
            return ((grouped - mean) / std).reshape(t.shape).contiguous()

        xtr, ytr, xva, yva, xte, yte = map(scale, (xtr, ytr, xva, yva, xte, yte))
        # core.normalize's format; the targets were scaled with the same statistics
        normalization = {"mean": mean.tolist(), "std": std.tolist(), "shape": [f],
                         "input_shape": list(xtr.shape[1:]), "targets": True}
    return Dataset(
        name=name,
        x_train=xtr,
        y_train=ytr,
        x_val=xva,
        y_val=yva,
        x_test=xte,
        y_test=yte,
        task="regression",
        input_shape=tuple(xtr.shape[1:]),
        normalization=normalization,
    )


# -- multi-frequency sines ----------------------------------------------------------------------
# Frequency bands in cycles per step; the high band stays well below the Nyquist limit (0.5).
_SINE_BANDS = ((0.005, 0.02), (0.03, 0.08), (0.1, 0.2))


@register_dataset(
    "multi_sine",
    info=DatasetInfo("multi_sine", (_SEQ_LEN, 1), task="regression", out_dim=1),
)
def _multi_sine(
    *,
    data_dir: Path | None = None,
    subset_size: int | None,
    val_fraction: float,
    seed: int,
    flatten: bool = False,
    n_samples: int = _N_SAMPLES,
    n_test: int = _N_TEST,
    seq_len: int = _SEQ_LEN,
    horizon: int = 1,
    noise: float = 0.0,
    sequence_targets: bool = False,
    data_seed: int | None = None,
) -> Dataset:
    """Forecast a sum of a low, a medium and a high frequency sine (one feature).

    Each sequence draws per band a frequency, an amplitude in [0.5, 1.5] and a phase.
    ``noise`` is the standard deviation of Gaussian noise added to the inputs only, so
    the targets stay the clean signal.
    """
    _check_int(1, seq_len=seq_len, horizon=horizon)
    if not noise >= 0.0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")

    def generate(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        t = np.arange(seq_len + horizon)
        signal = np.zeros((n, seq_len + horizon))
        for low, high in _SINE_BANDS:
            freq = rng.uniform(low, high, (n, 1))
            amp = rng.uniform(0.5, 1.5, (n, 1))
            phase = rng.uniform(0.0, 2 * math.pi, (n, 1))
            signal += amp * np.sin(2 * math.pi * freq * t + phase)
        x, y = _forecast_pairs(signal[..., None], seq_len, horizon, sequence_targets)
        if noise > 0:
            x = x + rng.normal(0.0, noise, x.shape)
        return x, y

    return _build("multi_sine", generate, n_samples=n_samples, n_test=n_test,
                  subset_size=subset_size, val_fraction=val_fraction, seed=seed,
                  data_seed=data_seed)


# -- delayed recall -------------------------------------------------------------------------------
@register_dataset(
    "delay_recall",
    info=DatasetInfo("delay_recall", (_SEQ_LEN, 3), task="regression", out_dim=1),
)
def _delay_recall(
    *,
    data_dir: Path | None = None,
    subset_size: int | None,
    val_fraction: float,
    seed: int,
    flatten: bool = False,
    n_samples: int = _N_SAMPLES,
    n_test: int = _N_TEST,
    seq_len: int = _SEQ_LEN,
    min_delay: int = 5,
    max_delay: int | None = None,
    sequence_targets: bool = False,
    data_seed: int | None = None,
) -> Dataset:
    """Recall a marked value when cued, a random number of steps after it was shown.

    Features per step: a value drawn uniformly from [-1, 1], a marker (1 at the one step
    whose value must be remembered) and a cue (1 at the step where it must be output).
    The delay from marker to cue is uniform in [min_delay, max_delay] (default: as long
    as the sequence allows). Without ``sequence_targets`` the cue is the last step and the
    target is the marked value ``(N, 1)``; with it the marker can fall anywhere and the
    target ``(N, seq_len, 1)`` is the marked value at the cue step and 0 elsewhere.
    """
    _check_int(2, seq_len=seq_len)
    if max_delay is None:
        max_delay = seq_len - 1
    _check_int(1, min_delay=min_delay, max_delay=max_delay)
    if not min_delay <= max_delay <= seq_len - 1:
        raise ValueError(
            f"delays must satisfy 1 <= min_delay <= max_delay <= seq_len - 1 = {seq_len - 1}, "
            f"got min_delay={min_delay}, max_delay={max_delay}"
        )

    def generate(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(n)
        x = np.zeros((n, seq_len, 3))
        x[:, :, 0] = rng.uniform(-1.0, 1.0, (n, seq_len))
        delay = rng.integers(min_delay, max_delay + 1, n)
        if sequence_targets:
            mark = rng.integers(0, seq_len - delay)  # so that mark + delay <= seq_len - 1
        else:
            mark = seq_len - 1 - delay
        cue = mark + delay
        x[rows, mark, 1] = 1.0
        x[rows, cue, 2] = 1.0
        recalled = x[rows, mark, 0]
        if not sequence_targets:
            return x, recalled[:, None]
        y = np.zeros((n, seq_len, 1))
        y[rows, cue, 0] = recalled
        return x, y

    return _build("delay_recall", generate, n_samples=n_samples, n_test=n_test,
                  subset_size=subset_size, val_fraction=val_fraction, seed=seed,
                  data_seed=data_seed)


# -- Lorenz system ----------------------------------------------------------------------------------
def _lorenz_rk4(
    state: np.ndarray, dt: float, n_steps: int, sigma: float, rho: float, beta: float
) -> np.ndarray:
    """Advance states ``(n, 3)`` by ``n_steps`` classical Runge-Kutta steps of size ``dt``."""

    def f(s: np.ndarray) -> np.ndarray:
        x, y, z = s[:, 0], s[:, 1], s[:, 2]
        return np.stack([sigma * (y - x), x * (rho - z) - y, x * y - beta * z], axis=1)

    for _ in range(n_steps):
        k1 = f(state)
        k2 = f(state + 0.5 * dt * k1)
        k3 = f(state + 0.5 * dt * k2)
        k4 = f(state + dt * k3)
        state = state + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return state


@register_dataset(
    "lorenz",
    info=DatasetInfo("lorenz", (_SEQ_LEN, 3), task="regression", out_dim=3),
)
def _lorenz(
    *,
    data_dir: Path | None = None,
    subset_size: int | None,
    val_fraction: float,
    seed: int,
    flatten: bool = False,
    n_samples: int = _N_SAMPLES,
    n_test: int = _N_TEST,
    seq_len: int = _SEQ_LEN,
    horizon: int = 1,
    dt: float = 0.01,
    substeps: int = 5,
    burn_in: float = 10.0,
    sigma: float = 10.0,
    rho: float = 28.0,
    beta: float = 8.0 / 3.0,
    sequence_targets: bool = False,
    data_seed: int | None = None,
) -> Dataset:
    """Forecast the Lorenz system's state (x, y, z) from a window of past states.

    Each sequence starts from a random point, runs ``burn_in`` time units to reach the
    attractor, then is observed every ``substeps`` RK4 steps of size ``dt`` (0.05 time
    units by default, so 50 observations span 2.5 time units, a few turns around the
    lobes). Inputs and targets are standardised per coordinate with the training split's
    statistics.
    """
    _check_int(1, seq_len=seq_len, horizon=horizon, substeps=substeps)
    if not dt > 0:
        raise ValueError(f"dt must be > 0, got {dt!r}")
    if not burn_in >= 0:
        raise ValueError(f"burn_in must be >= 0, got {burn_in!r}")

    def generate(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        state = rng.normal(0.0, 10.0, (n, 3)) + np.array([0.0, 0.0, 25.0])
        state = _lorenz_rk4(state, dt, int(round(burn_in / dt)), sigma, rho, beta)
        obs = np.empty((n, seq_len + horizon, 3))
        for t in range(seq_len + horizon):
            obs[:, t] = state
            state = _lorenz_rk4(state, dt, substeps, sigma, rho, beta)
        return _forecast_pairs(obs, seq_len, horizon, sequence_targets)

    return _build("lorenz", generate, n_samples=n_samples, n_test=n_test,
                  subset_size=subset_size, val_fraction=val_fraction, seed=seed,
                  data_seed=data_seed, standardise_features=3)
