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
from studies import _population, _runner  # noqa: E402


def _no_data(*args: object, **kwargs: object) -> None:
    return None


_runner._train_seeds = bench_overhead.fake_train_seeds  # type: ignore[assignment]
_runner.load_data = _population.load_data = studies.load_data = _no_data  # type: ignore[assignment]
core.train_population = bench_overhead.fake_train_population  # type: ignore[assignment]
