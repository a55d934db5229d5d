"""N `dendro worker` processes on one study: aggregate trials/s and per-trial service time.

    python bench/bench_scale.py [--workers 1,2,4,8,16,32] [--backends postgresql,sqlite]
        [--modes population,trial] [--trials 400] [--population 32]
        [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test]
    python bench/bench_scale.py --gpu [--gpu-trials 4000] [--data-dir DIR]

Each row starts N real worker processes (``python -m service.cli worker``) against one new
study of the seed's space (dendritic_simple on Fashion-MNIST, max_params 8000, 15 epochs,
TPE + median pruner, as bench_overhead.py), waits until they have finished it and exited,
then checks the study: exactly n_trials finished, no trial number twice, none RUNNING or
WAITING. Training is replaced by bench_overhead's instant curve (``instant_training.py``,
imported by each worker), so what is measured is the service: storage, leases, sampler and
pruner. Columns:

- ``wall``: from the first trial's start to the last one's end (database timestamps);
- ``trials/s``: finished trials / wall;
- ``service ms``: per-trial service time, N x wall / trials (a worker's seconds per trial);
- ``span ms``: the sum over the workers of each one's span (from the start of its first trial
  to the end of its last, found by the lease on its trials) per finished trial: the service
  time without the tail where some workers had no trial left while others finished theirs;
- ``cpu ms``: the workers' CPU time (user + system, read from ``/proc`` when the study is set
  running and again when its last trial has finished) per finished trial: what the service
  costs in the workers, which the machine's core count does not inflate (their start-up and
  exit are left out, which on a loaded machine cost more than a lone worker's);
- ``host``: the share of all the machine's cores busy over the same span (``/proc/stat``;
  PostgreSQL's own work included): near 100%, the cores bound the aggregate rate.
- ``locks``, ``busy``, ``hold ms``, ``wait ms``: the study lock (asks are serialised under
  it): how often the workers took it, the share of the wall time some worker held it, and
  the mean time one took holding it and waiting for it. ``busy`` near 100% means the lock,
  not the cores, bounds the aggregate rate. On PostgreSQL a fast ask (TPE, random) takes
  the study row's lock instead, for one transaction (count, check, create): that is what
  these columns time there (its wait includes the connection's ping and BEGIN).

With more workers than cores, ``service ms`` grows with the time each worker waits for a
core; ``cpu ms`` shows what the service costs. ``--gpu`` runs the real thing instead
(no instant curve): one population worker on ``cuda:0`` with ``--gpu-trials / 2`` trials,
then two (``cuda:0``, ``cuda:1``) on ``--gpu-trials``, and prints trials/s of both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import PG_URL, make_spec  # noqa: E402

import studies  # noqa: E402
from studies._keys import LEASE_KEY  # noqa: E402

_LAUNCH = ("import sys; sys.path.insert(0, {bench!r}); {plugin}"
           "from service.cli import main; sys.exit(main(sys.argv[1:]))")


def _worker_cmd(instant: bool) -> list[str]:
    plugin = "import instant_training; " if instant else ""
    return [sys.executable, "-c", _LAUNCH.format(bench=str(ROOT / "bench"), plugin=plugin)]


def _start(n: int, storage: str, name: str, mode: str, k: int | str, logs: Path, instant: bool,
           devices: list[str], data_dir: str | None, idle_exit: float = 3600) -> list[subprocess.Popen[bytes]]:
    env = {key: v for key, v in os.environ.items() if not key.startswith("DENDRO_")}
    # keep the caller's PYTHONPATH (on a GPU machine it holds the carried wheels)
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")) if p)
    env |= {"PYTHONUNBUFFERED": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    if instant:
        env["DENDRO_PLUGINS"] = "instant_training"
    procs = []
    for i in range(n):
        # an idle worker looks for work ten times a second, so all start within 0.1 s of the
        # study being set running (at the default 1 s, up to a second of each row's wall)
        args = ["worker", "--storage", storage, "--studies", name, "--idle-exit", str(idle_exit),
                "--device", devices[i % len(devices)], "--poll-interval", "0.1"]
        if data_dir:
            args += ["--data-dir", data_dir]
        if mode == "population":
            args += ["--population", str(k)]
        with open(logs / f"{name}-{i}.log", "wb") as fh:
            procs.append(subprocess.Popen([*_worker_cmd(instant), *args], stdout=fh, stderr=subprocess.STDOUT,
                                          env=env, cwd=ROOT))
    return procs


def _ticks(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far (0 where unreadable)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def _host() -> tuple[float, float]:
    """(busy, all) clock ticks of every core since boot (``/proc/stat``), or (0, 0)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = ticks[3] + ticks[4]  # idle, iowait
    return float(sum(ticks) - idle), float(sum(ticks))


def _run_when_all_up(storage: str, name: str, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Set the (queued) study running once every worker holds its lease: all N start together."""
    engine = sa.create_engine(storage)
    pids = {p.pid for p in procs}
    deadline = time.monotonic() + timeout
    try:
        while {r["pid"] for r in studies.list_leases(engine, live_within=60)} & pids != pids:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("the workers did not all start")
            time.sleep(0.2)
    finally:
        engine.dispose()
    study = optuna.load_study(study_name=name, storage=storage)
    study.set_user_attr(studies.STATE_ATTR, "running")


def _wait_done(storage: str, name: str, n_trials: int, timeout: float) -> None:
    """Until n_trials have finished and none runs: one count by state a poll (loading the
    trials, as a client would, would cost this process and the database a core at 2,400)."""
    engine = sa.create_engine(storage)
    deadline = time.monotonic() + timeout
    count = sa.text("SELECT t.state, count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                    "WHERE s.study_name = :name GROUP BY t.state")
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                c = {str(state): int(k) for state, k in conn.execute(count, {"name": name})}
            if c.get("COMPLETE", 0) + c.get("PRUNED", 0) >= n_trials and not c.get("RUNNING"):
                return
            time.sleep(0.2)
    finally:
        engine.dispose()


def _reap(procs: list[subprocess.Popen[bytes]], timeout: float) -> tuple[float, list[int]]:
    """Stop every worker (SIGTERM) and wait; their CPU seconds (from the kernel) and exit codes."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    cpu, codes = 0.0, []
    deadline = time.monotonic() + timeout
    for p in procs:
        if p.returncode is not None:  # reaped already (by a poll): its CPU time is not known
            codes.append(p.returncode)
            continue
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                cpu += usage.ru_utime + usage.ru_stime
                p.returncode = os.waitstatus_to_exitcode(status)
                codes.append(p.returncode)
                break
            if time.monotonic() > deadline:
                p.kill()
                _, status, usage = os.wait4(p.pid, 0)
                cpu += usage.ru_utime + usage.ru_stime
                codes.append(-9)
                break
            time.sleep(0.05)
    return cpu, codes


def _check(storage: str, name: str, n_trials: int) -> dict[str, Any]:
    st = optuna.storages.RDBStorage(storage)
    try:
        trials = optuna.load_study(study_name=name, storage=st).get_trials(deepcopy=False)
    finally:
        st.engine.dispose()
    states = Counter(studies.trial_state(t) for t in trials)
    numbers = [t.number for t in trials]
    finished = states["complete"] + states["pruned"]
    starts = [t.datetime_start for t in trials if t.datetime_start and t.state != TrialState.WAITING]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else float("nan")
    # each worker's span: from the start of its first trial to the end of its last (its lease
    # is on every trial it ran); their sum leaves out the tail where a worker had nothing left
    spans: dict[str, list[Any]] = {}
    for t in trials:
        lease = t.system_attrs.get(LEASE_KEY)
        if lease and t.datetime_start and t.datetime_complete:
            span = spans.setdefault(lease, [t.datetime_start, t.datetime_complete])
            span[0], span[1] = min(span[0], t.datetime_start), max(span[1], t.datetime_complete)
    busy = sum((b - a).total_seconds() for a, b in spans.values())
    problems = []
    if finished != n_trials:
        problems.append(f"{finished} finished, not {n_trials}")
    if len(numbers) != len(set(numbers)):
        problems.append("duplicate trial numbers")
    if states["running"] or states["waiting"]:
        problems.append(f"{states['running']} running, {states['waiting']} waiting")
    return {"finished": finished, "wall": wall, "spans": busy, "states": dict(states), "ok": not problems,
            "problems": problems}


def _drop(storage: str, name: str) -> None:
    try:
        studies.delete_study(storage, name)
    except Exception as exc:  # noqa: BLE001 - best effort
        print(f"  (could not delete {name}: {exc})")


def run_row(backend: str, mode: str, n: int, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    name = f"scale-{mode[:3]}-{n}-{uuid.uuid4().hex[:8]}"
    if backend == "sqlite":
        storage = f"sqlite:///{logs / (name + '.db')}"
    else:
        storage = args.pg_url
    studies.create_study(make_spec(name, args.trials, seed=n), storage, name, state="queued")
    procs = _start(n, storage, name, mode, args.population, logs, True, ["cpu"], None)
    pids = [p.pid for p in procs]
    try:
        _run_when_all_up(storage, name, procs, args.timeout)
        cpu0, host0 = _ticks(pids), _host()
        _wait_done(storage, name, args.trials, args.timeout)
        cpu, host1 = _ticks(pids) - cpu0, _host()
    finally:
        codes = _reap(procs, 60)[1]
    res = _check(storage, name, args.trials)
    busy = (host1[0] - host0[0]) / max(1.0, host1[1] - host0[1])
    res |= {"backend": backend, "mode": mode, "n": n, "cpu": cpu, "host": busy, "codes": codes,
            "lock": _lock_stats(logs, name, n)}
    if backend != "sqlite":
        _drop(storage, name)
    return res


def _lock_stats(logs: Path, name: str, n: int) -> dict[str, float]:
    """The study lock, from the workers' LOCKSTATS lines (instant_training times it)."""
    tot = {"n": 0.0, "wait": 0.0, "hold": 0.0}
    for i in range(n):
        for line in (logs / f"{name}-{i}.log").read_text(errors="replace").splitlines():
            if line.startswith("LOCKSTATS"):
                kv = dict(x.split("=") for x in line.split()[1:])
                for k in tot:
                    tot[k] += float(kv[k])
    return tot


def _fmt(r: dict[str, Any], trials: int) -> str:
    wall = r["wall"]
    rate = r["finished"] / wall if wall and wall == wall else float("nan")
    service = 1000 * r["n"] * wall / max(1, r["finished"])
    span = 1000 * r["spans"] / max(1, r["finished"])
    cpu = 1000 * r["cpu"] / max(1, r["finished"])
    ok = "ok" if r["ok"] and all(c == 0 for c in r["codes"]) else "FAIL " + "; ".join(
        r["problems"] + ([f"exit codes {r['codes']}"] if any(r["codes"]) else []))
    lock = r.get("lock") or {}
    locks = ""
    if lock.get("n"):
        locks = (f" {lock['n']:6.0f} {100 * lock['hold'] / wall:6.0f}% {1000 * lock['hold'] / lock['n']:7.1f} "
                 f"{1000 * lock['wait'] / lock['n']:7.1f}")
    host = f" {100 * r['host']:5.0f}%" if "host" in r else ""
    return (f"{r['backend']:10s} {r['mode']:10s} {r['n']:3d} {r['finished']:6d} {wall:8.2f} {rate:9.1f} "
            f"{service:11.1f} {span:8.1f} {cpu:8.1f}{host}{locks}  {ok}")


def gpu(args: argparse.Namespace, logs: Path) -> None:
    """One population worker on 2,000 trials, then two (one per GPU) on 4,000: real training."""
    from bench_overhead import SEED_SPACE

    rows = []
    print(f"{'backend':10s} {'mode':10s} {'N':>3s} {'trials':>6s} {'wall s':>8s} {'trials/s':>9s} "
          f"{'service ms':>11s} {'span ms':>8s} {'cpu ms':>8s}  checks   (real training; cpu ms includes start-up)", flush=True)
    devs = args.gpu_devices.split(",")
    for n, devices, trials in ((1, devs[:1], args.gpu_trials // 2), (2, devs[:2], args.gpu_trials)):
        name = f"gpu-{n}-{uuid.uuid4().hex[:8]}"
        storage = f"sqlite:///{logs / (name + '.db')}" if args.gpu_storage == "sqlite" else args.pg_url
        spec = studies.StudySpec(
            name=name, model="dendritic_simple", dataset="fashion-mnist", search_space=SEED_SPACE,
            max_params=8000, n_trials=trials, n_epochs=args.gpu_epochs, batch_size=256, sampler="tpe",
            pruner="median", seed=n, subset_size=args.gpu_subset)
        studies.create_study(spec, storage, name, state="queued")
        t0 = time.monotonic()
        procs = _start(n, storage, name, "population", "auto", logs, False, devices, args.data_dir)
        try:
            _run_when_all_up(storage, name, procs, args.timeout)
            _wait_done(storage, name, trials, args.timeout)
        finally:
            cpu, codes = _reap(procs, 120)
        res = _check(storage, name, trials) | {"n": n, "cpu": cpu, "codes": codes, "backend": args.gpu_storage,
                                                "mode": "population", "elapsed": time.monotonic() - t0}
        rows.append(res)
        print(_fmt(res, trials), flush=True)
    one, two = (r["finished"] / r["wall"] for r in rows)
    print(f"two workers: {two:.1f} trials/s vs one: {one:.1f} trials/s = {two / one:.2f}x (target >= 1.8x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,4,8,16,32")
    p.add_argument("--backends", default="postgresql,sqlite")
    p.add_argument("--modes", default="population,trial")
    p.add_argument("--trials", type=int, default=400)
    p.add_argument("--population", type=int, default=32, help="K of the population workers")
    p.add_argument("--pg-url", default=PG_URL)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a row may take")
    p.add_argument("--keep", action="store_true", help="keep the workers' logs and SQLite files")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="each instant worker writes a cProfile of itself to DIR/<pid>.prof at exit")
    p.add_argument("--gpu", action="store_true", help="the two-GPU run (real training) instead")
    p.add_argument("--gpu-trials", type=int, default=4000)
    p.add_argument("--gpu-storage", default="sqlite", choices=["sqlite", "postgresql"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--gpu-devices", default="cuda:0,cuda:1", help="the two devices (cpu,cpu to try it here)")
    p.add_argument("--gpu-epochs", type=int, default=15)
    p.add_argument("--gpu-subset", type=int, default=None, help="train on this many examples (a quick try)")
    args = p.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench_scale-"))
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        os.environ["BENCH_SCALE_PROFILE"] = str(Path(args.profile).resolve())
    print(f"bench_scale: cpu count {os.cpu_count()}, logs in {logs}", flush=True)
    try:
        if args.gpu:
            gpu(args, logs)
            return
        print(f"{'backend':10s} {'mode':10s} {'N':>3s} {'trials':>6s} {'wall s':>8s} {'trials/s':>9s} "
              f"{'service ms':>11s} {'span ms':>8s} {'cpu ms':>8s} {'host':>6s} {'locks':>6s} {'busy':>7s} {'hold ms':>7s} {'wait ms':>7s}  checks",
              flush=True)
        for backend in args.backends.split(","):
            if backend == "postgresql":
                try:
                    sa.create_engine(args.pg_url).connect().close()
                except Exception as exc:  # noqa: BLE001
                    print(f"postgresql skipped: {exc.__class__.__name__}")
                    continue
            for mode in args.modes.split(","):
                for n in (int(x) for x in args.workers.split(",")):
                    print(_fmt(run_row(backend, mode, n, args, logs), args.trials), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
