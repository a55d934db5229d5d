"""Exports on a full or unwritable disk: a clear error and no partial file presented as whole."""

from __future__ import annotations

import json
import resource
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from service_helpers import DENDRO

import studies

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A finished two-trial study in its own SQLite file: (storage URL, study name)."""
    from tests.conftest import TINY_SPACE

    folder = tmp_path_factory.mktemp("export")
    url = f"sqlite:///{folder / 'export.db'}"
    spec = studies.StudySpec(name="exported", model="dendritic_simple", dataset="digits",
                             search_space=TINY_SPACE, max_params=1500, n_trials=2, n_epochs=1,
                             batch_size=64, subset_size=300, pruner="none")
    studies.run_study(spec, url, show_progress=False, device="cpu")
    return url, "exported"


def _export(url: str, name: str, out: Path, formats: str, cwd: Path,
            preexec: Callable[[], Any] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DENDRO), "study", "export", name, "--storage", url, "--out", str(out),
                           "--format", formats], capture_output=True, text=True, cwd=cwd, timeout=120,
                          preexec_fn=preexec)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_an_export_onto_a_full_disk_fails_clearly_and_leaves_only_whole_files(
    exported_study: tuple[str, str], tmp_path: Path
) -> None:
    url, name = exported_study
    out = tmp_path / "out"
    limit = 256 * 1024  # the JSON and CSV fit, the HTML report (plotly inside, megabytes) does not

    def full_disk() -> None:
        # Writes past this size fail with EFBIG, as on a full disk (Python ignores SIGXFSZ).
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = _export(url, name, out, "json,csv,html", tmp_path, full_disk)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dendro: error: cannot write the export to "), r.stderr
    assert "File too large" in lines[0] and "Traceback" not in r.stderr
    left = _leftovers(out)
    assert f"{name}.html" not in left, "no partial report"
    assert not [f for f in left if f.endswith(".tmp")], f"temporary files left: {left}"
    # What is there is whole.
    assert set(left) <= {f"{name}.json", f"{name}.csv"}
    if f"{name}.json" in left:
        json.loads((out / f"{name}.json").read_text())

    # With room again, the same command writes all three.
    ok = _export(url, name, out, "json,csv,html", tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert _leftovers(out) == sorted(f"{name}.{f}" for f in ("csv", "html", "json"))
    assert (out / f"{name}.html").read_text().rstrip().endswith("</html>")


def test_an_export_into_a_path_that_cannot_be_a_folder_fails_clearly(
    exported_study: tuple[str, str], tmp_path: Path
) -> None:
    url, name = exported_study
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = _export(url, name, blocker / "out", "json", tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("dendro: error: cannot write the export to "), r.stderr
    assert "Traceback" not in r.stderr
    assert blocker.read_text() == "not a folder"


def test_an_export_into_a_read_only_folder_fails_clearly(
    exported_study: tuple[str, str], tmp_path: Path
) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the full-disk test covers the failure path")
    url, name = exported_study
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        r = _export(url, name, out, "json,csv", tmp_path)
        assert r.returncode == 2
        assert "Permission denied" in r.stderr and "Traceback" not in r.stderr
        assert _leftovers(out) == []
    finally:
        out.chmod(0o755)
