"""50 HTTP clients polling a study while 4 workers run it: requests/s, p50/p99 latency, errors.

    python bench/bench_load.py [--storages sqlite,postgres] [--clients 50] [--duration 20]
                               [--workers 4] [--pg-url URL] [--api-src DIR] [--nice N]

For each storage: `dendro serve` on a free port, a study created by REST (digits, tiny
models, enough trials to keep the workers busy), `--workers` real `dendro worker`
processes on the CPU, then ``--clients`` asyncio clients (one event loop, one connection
each) that poll, in turn, ``GET /v1/studies/{name}``, ``GET /v1/studies/{name}/trials``
(the first page of 50) and ``GET /v1/studies/{name}/best`` for ``--duration`` seconds.
Latency is measured by the client, from sending the request to reading the whole body.
An error is a transport error or any status other than 200. The table also shows how
many trials the workers finished meanwhile. ``--api-src`` runs the API from another
source tree (e.g. ``git archive HEAD | tar -x -C /tmp/before``) for before/after figures;
``--nice`` lowers the workers' CPU priority (on one machine the workers otherwise take
every core from the API; in a deployment they run on GPU hosts of their own).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent
PG_URL = os.environ.get("DENDRO_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SPACE = {
    "n_neurons": {"type": "int", "low": 4, "high": 10},
    "n_dendrites": {"type": "int", "low": 2, "high": 6},
    "n_dendrite_inputs": {"type": "int", "low": 4, "high": 16},
    "lr": {"type": "float", "low": 0.001, "high": 0.03, "log": True},
}


@dataclass
class Result:
    storage: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    trials_before: int = 0
    trials_after: int = 0
    error_samples: list[str] = field(default_factory=list)
    by_path: dict[str, list[float]] = field(default_factory=dict)
    server: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DENDRO_")}
    return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


async def _client(http: httpx.AsyncClient, paths: list[str], stop_at: float, res: Result, k: int,
                  interval: float) -> None:
    i = k  # clients start at different endpoints
    await asyncio.sleep(interval * k / 50)  # spread the clients over the interval
    while time.monotonic() < stop_at:
        path = paths[i % len(paths)]
        i += 1
        t0 = time.perf_counter()
        try:
            r = await http.get(path)
            await r.aread()
            ok = r.status_code == 200
            if not ok and len(res.error_samples) < 5:
                res.error_samples.append(f"{path}: {r.status_code} {r.text[:200]}")
        except httpx.HTTPError as exc:
            ok = False
            if len(res.error_samples) < 5:
                res.error_samples.append(f"{path}: {exc!r}")
        res.latencies.append(time.perf_counter() - t0)
        with contextlib.suppress(Exception):  # the API's own share (its Server-Timing header)
            res.server.append(float(r.headers["server-timing"].split("dur=")[1]) / 1000)
        res.by_path.setdefault(path.rsplit("/", 1)[-1] if path.count("/") > 3 else "study", []).append(
            res.latencies[-1])
        res.errors += not ok
        if interval:
            await asyncio.sleep(interval)


async def _poll(base: str, name: str, clients: int, duration: float, interval: float, res: Result) -> None:
    paths = [f"/v1/studies/{name}", f"/v1/studies/{name}/trials", f"/v1/studies/{name}/best"]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
        t0 = time.monotonic()
        await asyncio.gather(*[_client(http, paths, t0 + duration, res, k, interval) for k in range(clients)])
        res.seconds = time.monotonic() - t0


def run_one(storage: str, args: argparse.Namespace) -> Result:
    folder = Path(tempfile.mkdtemp(prefix=f"bench-load-{storage}-"))
    url = args.pg_url if storage == "postgres" else f"sqlite:///{folder / 'load.db'}"
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    api_env = _env({**({"PYTHONPATH": args.api_src} if args.api_src else {}),
                    "DENDRO_SNAPSHOT_MAX_AGE": str(args.snapshot_max_age)})
    api_cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--storage", url, "--data-dir", str(folder)]
    log = open(folder / "serve.log", "wb")  # noqa: SIM115 - closed with the processes
    procs.append(subprocess.Popen(api_cmd, stdout=log, stderr=subprocess.STDOUT, env=api_env,
                                  cwd=args.api_src or None, start_new_session=True))
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, timeout=30)
    name = f"load-{uuid.uuid4().hex[:8]}"
    res = Result(storage)
    try:
        def up() -> bool:
            try:
                return http.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        _wait(up, 90, "the API")
        spec = {"name": name, "model": "dendritic_simple", "dataset": "digits", "max_params": 3000,
                "n_trials": 100_000, "n_epochs": args.epochs, "batch_size": 256, "subset_size": 300,
                "sampler": "random", "pruner": "none", "search_space": SPACE}
        r = http.post("/v1/studies", json=spec)
        r.raise_for_status()
        wlog = open(folder / "workers.log", "wb")  # noqa: SIM115
        cmd = [str(BIN / "dendro"), "worker", "--storage", url, "--device", "cpu", "--studies", name,
               "--data-dir", str(folder)]
        if args.nice:
            cmd = ["nice", "-n", str(args.nice), *cmd]
        # The cores shared out, as `dendro serve --workers N` does: no oversubscribed torch threads.
        threads = str(max(1, (os.cpu_count() or 1) // args.workers))
        if args.worker_sessions:  # each worker a session (and so a scheduler group) of its own
            for _ in range(args.workers):
                procs.append(subprocess.Popen(cmd, stdout=wlog, stderr=subprocess.STDOUT,
                                              env=_env({"OMP_NUM_THREADS": threads}), start_new_session=True))
        else:  # the workers together in one session, as on a machine of their own
            line = " ".join(shlex.quote(c) for c in cmd)
            group = subprocess.Popen(["bash", "-c", f"for i in $(seq {args.workers}); do {line} & done; wait"],
                                     stdout=wlog, stderr=subprocess.STDOUT,
                                     env=_env({"OMP_NUM_THREADS": threads}), start_new_session=True)
            procs.append(group)
            if args.nice:  # with autogroup scheduling a session's niceness is its group's
                with contextlib.suppress(OSError):
                    Path(f"/proc/{group.pid}/autogroup").write_text(str(args.nice))
        # Measure with the workers training and a few finished trials to show.
        _wait(lambda: http.get(f"/v1/studies/{name}").json()["progress"]["finished"] >= args.warm_trials,
              180, "the first trials")
        res.trials_before = http.get(f"/v1/studies/{name}").json()["progress"]["finished"]
        asyncio.run(_poll(base, name, args.clients, args.duration, args.interval, res))
        res.trials_after = http.get(f"/v1/studies/{name}").json()["progress"]["finished"]
        http.post(f"/v1/studies/{name}/stop")
    finally:
        for p in procs[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)  # the workers stop at their next epoch
        deadline = time.monotonic() + 30
        for p in procs[1:]:
            while time.monotonic() < deadline and _group_alive(p.pid):
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        try:
            if storage == "postgres":
                http.delete(f"/v1/studies/{name}")
        except httpx.HTTPError:
            pass
        os.killpg(procs[0].pid, signal.SIGTERM)
        procs[0].wait(30)
        log.close()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"logs kept in {folder}", file=sys.stderr)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storages", default="sqlite,postgres")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds a client waits between two requests (0: back to back, saturation)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per trial (tiny models on digits)")
    p.add_argument("--warm-trials", type=int, default=20, help="finished trials before measuring")
    p.add_argument("--pg-url", default=PG_URL)
    p.add_argument("--api-src", help="run the API from this source tree (before/after figures)")
    p.add_argument("--nice", type=int, default=0, help="niceness of the worker processes")
    p.add_argument("--keep", action="store_true", help="keep the servers' logs")
    p.add_argument("--snapshot-max-age", type=float, default=0.0,
                   help="the API's DENDRO_SNAPSHOT_MAX_AGE (0: a fresh read for every request)")
    p.add_argument("--worker-sessions", action="store_true",
                   help="start each worker in a session of its own: with the kernel's autogroup "
                        "scheduling each then gets as much CPU as the API (worst case on one machine)")
    args = p.parse_args()

    results = [run_one(s.strip(), args) for s in args.storages.split(",") if s.strip()]
    print(f"\n{args.clients} clients x {args.duration:.0f} s polling study, trials (50 a page) and best; "
          f"{args.workers} workers training on the CPU (nice {args.nice}, "
          f"{'a session each' if args.worker_sessions else 'one session'}); {os.cpu_count()} cores; "
          f"DENDRO_SNAPSHOT_MAX_AGE={args.snapshot_max_age}")
    print(f"{'storage':<10} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'errors':>7} {'trials done meanwhile':>22}")
    for r in results:
        print(f"{r.storage:<10} {len(r.latencies):>9} {len(r.latencies) / r.seconds:>8.0f} {r.pct(0.50):>8.1f} "
              f"{r.pct(0.99):>8.1f} {max(r.latencies) * 1000:>8.1f} {r.errors:>7} "
              f"{r.trials_after - r.trials_before:>22}")
        for path, xs in sorted([*r.by_path.items(), ("(server)", r.server)]):
            xs = sorted(xs)
            print(f"  {path:<8} {len(xs):>9} {'':>8} {xs[len(xs) // 2] * 1000:>8.1f} "
                  f"{xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1000:>8.1f} {xs[-1] * 1000:>8.1f}")
        for e in r.error_samples:
            print(f"  error: {e}")


if __name__ == "__main__":
    main()
