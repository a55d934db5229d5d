"""Plugins: DENDRO_PLUGINS, --plugin and the dendro.plugins entry points are imported first, by the
API and by every worker `dendro serve` starts, restarts included; serve restarts a dead worker."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from service_helpers import Procs, unique, wait_for

import core
from service._plugins import PluginError, load_plugins
from service.cli import main

#: a plugin as a researcher writes it: a tiny MLP family, and a marker per importing process
PLUGIN = textwrap.dedent('''
    """A test plugin: one model family, and a file per process that imports it."""
    import os
    import sys
    from pathlib import Path

    from torch import nn

    import core

    Path(os.environ["PLUGIN_MARKERS"], str(os.getpid())).write_text(" ".join(sys.argv))


    def _count(*, in_dim, n_classes, hidden, **_):
        return in_dim * hidden + hidden + hidden * n_classes + n_classes


    @core.register_model("{family}", count=_count)
    def plugin_mlp(*, in_dim=64, n_classes=10, hidden=8):
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
''')


def _write_plugin(folder: Path, module: str, family: str) -> Path:
    (folder / "markers").mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(PLUGIN.replace("{family}", family))
    return folder / "markers"


def test_a_plugin_named_in_dendro_plugins_registers_its_family_before_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    markers = _write_plugin(tmp_path, "plug_env_mod", "plugin_env_family")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PLUGIN_MARKERS", str(markers))
    monkeypatch.setenv("DENDRO_PLUGINS", " plug_env_mod , ")
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert main(["study", "list", "--storage", url]) == 0
    assert "plugin_env_family" in core.list_models()
    assert (markers / str(os.getpid())).exists()


def test_plugins_are_imported_once_each_and_entry_points_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "plug_once_mod.py").write_text("import builtins\nbuiltins.PLUG_ONCE = getattr(builtins, 'PLUG_ONCE', 0) + 1\n")
    (tmp_path / "plug_ep_mod.py").write_text("LOADED = True\n")
    dist = tmp_path / "dendro_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dendro-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dendro.plugins]\nmine = plug_ep_mod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_plugins(["plug_once_mod", "plug_once_mod"]) == ["plug_once_mod", "plug_ep_mod"]
    assert load_plugins(["plug_once_mod"], entry_points=False) == ["plug_once_mod"]
    import builtins

    assert builtins.PLUG_ONCE == 1  # type: ignore[attr-defined]
    assert sys.modules["plug_ep_mod"].LOADED


@pytest.mark.parametrize("command", [["worker"], ["serve"], ["search", "--preset", "quick-prototype"],
                                     ["study", "list"]])
def test_a_plugin_that_fails_to_import_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str],
) -> None:
    (tmp_path / "plug_broken_mod.py").write_text("raise RuntimeError('boom\\nand a second line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for plugin, words in [("plug_broken_mod", "plugin 'plug_broken_mod' failed to import: RuntimeError: boom"),
                          ("no_such_plugin_xyz", "plugin 'no_such_plugin_xyz' failed to import: "
                                                 "ModuleNotFoundError: No module named 'no_such_plugin_xyz'")]:
        assert main([*command, "--plugin", plugin, "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"dendro: error: {words}"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["plug_broken_mod.py"]


def test_a_plugin_that_fails_to_import_in_an_entry_point_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    dist = tmp_path / "dendro_bad_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dendro-bad-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dendro.plugins]\nbroken = no_such_ep_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="plugin 'broken' .* failed to import: ModuleNotFoundError"):
        load_plugins([])


@pytest.mark.slow
def test_serve_workers_import_the_plugin_and_a_killed_worker_is_restarted_with_it(
    procs: Procs, tmp_path: Path,
) -> None:
    markers = _write_plugin(tmp_path, "plug_serve_mod", "plugin_mlp")
    env = {"PYTHONPATH": str(tmp_path), "PLUGIN_MARKERS": str(markers), "DENDRO_WORKER_TIMEOUT": "10"}
    url = f"sqlite:///{tmp_path / 'dendro.db'}"
    api = procs.serve(url, "--workers", "1", "--device", "cpu", "--plugin", "plug_serve_mod", env=env)
    name = unique("plugin")
    # the API knows the family: POST validates the spec against the registry
    spec = {"name": name, "model": "plugin_mlp", "dataset": "digits", "max_params": 5000, "n_trials": 2,
            "n_epochs": 1, "subset_size": 200, "batch_size": 128, "sampler": "random", "pruner": "none",
            "search_space": {"hidden": {"type": "int", "low": 4, "high": 16}}}
    api.create(spec)
    study = api.wait_done(name, timeout=90)
    assert study["progress"]["complete"] == 2, study
    assert all(t["metrics"].get("family") in (None, "plugin_mlp") for t in api.trials(name))
    assert f"dendro: storage {url} (from --storage)" in api.log_text()

    def workers() -> list[dict[str, object]]:
        return api.http.get("/v1/workers").json()["data"]

    (first,) = wait_for(workers, 30, "the local worker to register")
    assert str(first["pid"]) in os.listdir(markers), "the worker imported the plugin"
    argv = (markers / str(first["pid"])).read_text()
    assert "worker" in argv and "--plugin plug_serve_mod" in argv, argv
    assert api.http.get("/healthz").json()["workers_alive"] == 1

    os.kill(int(first["pid"]), signal.SIGKILL)
    restarted = wait_for(lambda: [w for w in workers() if w["pid"] != first["pid"]], 30,
                         "serve to restart the killed worker")
    assert "restarting it in" in api.log_text() and "local worker 0 restarted" in api.log_text()
    assert str(restarted[0]["pid"]) in os.listdir(markers), "the restarted worker imported the plugin"
    wait_for(lambda: api.http.get("/healthz").json()["workers_alive"] == 1
             and [w["pid"] for w in workers()] == [restarted[0]["pid"]], 30,
             "/healthz to count the one live worker")

    api.proc.send_signal(signal.SIGTERM)
    assert procs.wait_exit(api.proc, 60) == 0
    wait_for(lambda: not Path(f"/proc/{restarted[0]['pid']}").exists()
             or "zombie" in Path(f"/proc/{restarted[0]['pid']}/status").read_text().lower(),
             30, "the restarted worker to stop with serve")



def test_study_show_without_the_plugin_says_to_load_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import studies

    url = f"sqlite:///{tmp_path / 'p.db'}"
    spec = studies.StudySpec(name="mine", dataset="digits", max_params=3000,
                             search_space={"n_neurons": [4], "n_dendrites": [2], "n_dendrite_inputs": [8]})
    study = studies.create_study(spec, url)
    raw = {**study.user_attrs[studies.SPEC_ATTR], "model": "family_of_a_plugin_not_loaded"}
    study.set_user_attr(studies.SPEC_ATTR, raw)
    assert main(["study", "show", "mine", "--storage", url]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unknown model family 'family_of_a_plugin_not_loaded'" in lines[0]
    assert "give --plugin MODULE or set DENDRO_PLUGINS" in lines[0]
