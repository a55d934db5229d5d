"""What a worker's view pays to load other workers' trials, by the number loaded at once.

    python bench/bench_view_loads.py [--storage URL] [--trials 2400]

Every worker loads every other worker's trials (its sampler and pruner see the whole study):
running ones lightly (state, number, params), finished ones whole. With many workers these
loads come a few trials at a time, so their fixed cost per load is what grows with the
number of workers. This makes a study of ``--trials`` finished trials of the seed's space
(one instant population worker, as ``bench_scale.py``), then times ``FastStorage._load_full``
and ``_load_light`` over its first 1,000 trials in chunks of 1, 8, 31 and 500, and an empty
refresh; the study is deleted at the end (PostgreSQL).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale  # noqa: E402
import optuna  # noqa: E402
from bench_overhead import PG_URL, make_spec  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

import studies  # noqa: E402
from studies import _fast  # noqa: E402
from studies._optuna_private import create_scoped_session  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", default=PG_URL)
    p.add_argument("--trials", type=int, default=2400)
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logs = Path(tempfile.mkdtemp(prefix="bench_view_loads-"))
    name = f"loads-{uuid.uuid4().hex[:8]}"
    studies.create_study(make_spec(name, args.trials, seed=1), args.storage, name, state="queued")
    procs = bench_scale._start(1, args.storage, name, "population", 32, logs, True, ["cpu"], None)
    try:
        bench_scale._run_when_all_up(args.storage, name, procs, 120)
        bench_scale._wait_done(args.storage, name, args.trials, 600)
    finally:
        bench_scale._reap(procs, 60)
    st = optuna.storages.RDBStorage(args.storage)
    try:
        sid = st.get_study_id_from_name(name)
        fs = _fast.FastStorage(st, sid)
        fs.refresh()
        ids = sorted(fs._numbers)[:1000]
        t0 = time.perf_counter()
        for _ in range(200):
            fs.refresh()
        print(f"{args.storage.split(':')[0]}, {len(fs._numbers)} trials; an empty refresh: "
              f"{1000 * (time.perf_counter() - t0) / 200:.3f} ms")
        print(f"{'chunk':>6s} {'full ms/chunk':>14s} {'full ms/trial':>14s} {'light ms/trial':>15s}")
        for chunk in (1, 8, 31, 500):
            times = []
            for load in ("full", "light"):
                view = _fast.FastStorage(st, sid)
                t0 = time.perf_counter()
                with create_scoped_session(st.scoped_session) as session:
                    conn = session.connection()
                    for lo in range(0, len(ids), chunk):
                        part = ids[lo:lo + chunk]
                        if load == "full":
                            view._load_full(conn, part)
                        else:
                            view._load_light(conn, dict.fromkeys(part, TrialState.RUNNING))
                times.append(time.perf_counter() - t0)
            n = len(ids)
            print(f"{chunk:6d} {1000 * times[0] / -(-n // chunk):14.2f} {1000 * times[0] / n:14.3f} "
                  f"{1000 * times[1] / n:15.3f}")
    finally:
        st.engine.dispose()
        if not args.storage.startswith("sqlite"):
            bench_scale._drop(args.storage, name)


if __name__ == "__main__":
    main()
