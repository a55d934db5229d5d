"""Helpers of the service tests: run `dendro serve` and `dendro worker` as real processes, poll with deadlines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

DENDRO = Path(sys.executable).with_name("dendro")
PG_URL = os.environ.get("DENDRO_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
#: heartbeats every second and a 4 s grace period, so a dead worker's trial is retried fast
FAST_RETRY = {"DENDRO_HEARTBEAT_INTERVAL": "1", "DENDRO_GRACE_PERIOD": "4"}
#: how long after its last beat a FAST_RETRY worker's lease is surely stale: the grace period,
#: one beat interval (the last beat may have come just before the kill) and a second of slack
FAST_RETRY_STALE = 4 + 1 + 1
#: every epoch takes at least 0.1 s (a testing-only fault hook): a warm worker trains a tiny
#: trial's epoch in milliseconds, faster than a test can see it running and stop or kill it
SLOW_EPOCHS = {"DENDRO_FAULT_EPOCH_SECONDS": "0.1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique(prefix: str) -> str:
    """Study names are unique per test: the PostgreSQL database is shared."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def tiny_spec(name: str, **overrides: Any) -> dict[str, Any]:
    """A study on digits whose trials take a fraction of a second per epoch on one CPU core."""
    spec: dict[str, Any] = {
        "name": name,
        "model": "dendritic_simple",
        "dataset": "digits",
        "max_params": 3000,
        "n_trials": 3,
        "n_epochs": 2,
        "batch_size": 256,
        "subset_size": 300,
        "sampler": "random",
        "pruner": "none",
        "search_space": {
            "n_neurons": {"type": "int", "low": 4, "high": 10},
            "n_dendrites": {"type": "int", "low": 2, "high": 6},
            "n_dendrite_inputs": {"type": "int", "low": 4, "high": 16},
            "lr": {"type": "float", "low": 0.001, "high": 0.03, "log": True},
        },
    }
    spec.update(overrides)
    return spec


class Api:
    """A running `dendro serve` and an HTTP client over its socket."""

    def __init__(self, proc: subprocess.Popen[bytes], base_url: str, log: Path, storage: str) -> None:
        self.proc, self.base_url, self.log, self.storage = proc, base_url, log, storage
        # a connection per request: a kept-alive one can be closed by the server (uvicorn's 5 s
        # keep-alive timeout) just as the client sends on it, and a POST is not retried
        self.http = httpx.Client(base_url=base_url, timeout=30.0,
                                 limits=httpx.Limits(max_keepalive_connections=0))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def create(self, spec: dict[str, Any], **kw: Any) -> dict[str, Any]:
        r = self.http.post("/v1/studies", json=spec, **kw)
        assert r.status_code == 201, r.text
        return r.json()

    def _read(self, path: str, **kw: Any) -> Any:
        """GET ``path``, retrying a 503 as the service asks (its answer to a transient database
        error, e.g. while the chaos tests kill workers mid-transaction) a few times."""
        for _ in range(10):
            r = self.http.get(path, **kw)
            if r.status_code != 503:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        return r.json()

    def study(self, name: str) -> dict[str, Any]:
        return self._read(f"/v1/studies/{name}")  # type: ignore[no-any-return]

    def trials(self, name: str, **params: Any) -> list[dict[str, Any]]:
        return self._read(f"/v1/studies/{name}/trials", params={"limit": 1000, **params})["data"]  # type: ignore[no-any-return]

    def running(self, name: str) -> list[dict[str, Any]]:
        return self.trials(name, state="running")

    def wait_done(self, name: str, timeout: float) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            s = self.study(name)
            p = s["progress"]
            return s if p["finished"] >= s["n_trials"] and p["running"] == 0 else None

        return wait_for(done, timeout, f"study {name} to finish", interval=0.25)


class Procs:
    """The subprocesses of one test or fixture: each logs to a file, all are killed at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        # No DENDRO_* setting of the calling shell leaks into the processes under test.
        base = {k: v for k, v in os.environ.items() if not k.startswith("DENDRO_")}
        log = self.folder / f"{name}-{len(self.procs)}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [str(DENDRO), *args], stdout=fh, stderr=subprocess.STDOUT, cwd=cwd or self.folder,
                env={**base, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True,
            )
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def worker(self, storage: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.start("worker", "worker", "--storage", storage, "--device", "cpu",
                          "--data-dir", str(self.folder), *args, env=env)

    def serve(self, storage: str, *args: str, env: dict[str, str] | None = None, timeout: float = 90.0) -> Api:
        port = free_port()
        proc = self.start("serve", "serve", "--host", "127.0.0.1", "--port", str(port),
                          "--storage", storage, "--data-dir", str(self.folder), *args, env=env)
        api = Api(proc, f"http://127.0.0.1:{port}", self.logs[proc.pid], storage)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"dendro serve exited with {proc.returncode}:\n{api.log_text()[-3000:]}")
            try:
                api.http.get("/healthz", timeout=2.0)  # 200, or 503 while the database is down
                return True
            except httpx.TransportError:
                return False

        wait_for(up, timeout, f"dendro serve on port {port}", interval=0.2)
        return api

    def wait_exit(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process {proc.args} still running after {timeout:.0f}s:\n"
                                 f"{self.log(proc)[-3000:]}") from None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            proc.wait(10)
