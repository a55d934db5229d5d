"""docker-compose.yml: PostgreSQL with a health check, the API, GPU workers; valid for `docker compose`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _command(service: dict[str, Any]) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd)


def test_compose_runs_the_api_and_gpu_workers_after_a_healthy_postgres() -> None:
    services = _compose()["services"]
    db = services["postgres"]
    assert db["image"].startswith("postgres")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])

    api, worker = services["api"], services["worker"]
    assert "dendro serve" in _command(api) and "0.0.0.0" in _command(api)
    assert "dendro worker" in _command(worker) and "--device cuda" in _command(worker)
    for svc in (api, worker):
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert svc["environment"]["DENDRO_STORAGE"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in svc["environment"]["DENDRO_STORAGE"]

    # the workers' compiled kernels live on the data volume, shared and kept across containers
    assert worker["environment"]["TRITON_CACHE_DIR"].startswith("/data/")
    assert "data:/data" in worker["volumes"]
    assert api["environment"]["DENDRO_DATA_DIR"] == worker["environment"]["DENDRO_DATA_DIR"] == "/data"

    deploy = worker["deploy"]
    assert "replicas" in deploy
    (gpu,) = deploy["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_the_image_installs_the_package_on_python_3_11_slim() -> None:
    assert _compose()["services"]["api"]["build"] == "."
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert "FROM python:3.11-slim" in lines
    assert "RUN pip install ." in lines
    for package in ("core", "studies", "service"):
        assert any(line.startswith(f"COPY {package} ") for line in lines), package


def _compose_client() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "no docker client on this machine"
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        said = (probe.stderr or probe.stdout).strip().splitlines()
        return f"the docker client has no compose plugin ({said[0] if said else probe.returncode})"
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    missing = _compose_client()
    if missing:
        pytest.skip(missing)
    # `config` parses, interpolates and validates against the compose schema; no engine needed.
    r = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--services"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert set(r.stdout.split()) == {"postgres", "api", "worker"}
