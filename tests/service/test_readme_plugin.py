"""The README's plugin example, run verbatim: a real `dendro serve` with the plugin, a real REST call.

The example's blocks are marked in README.md with ``<!-- plugin-example: FILE -->`` on the
line before a fenced code block. Every marked block is saved as FILE in an empty directory;
the ``sh`` blocks are then run in order, in one bash session, there. Nothing is rewritten:
only the environment is the test's (a free DENDRO_PORT, this interpreter first on PATH).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from service_helpers import free_port

README = Path(__file__).resolve().parents[2] / "README.md"
#: a marker, then (after blank lines at most) a fenced block: ```lang ... ```
BLOCK = re.compile(
    r"<!--\s*plugin-example:\s*(?P<file>[\w.-]+)\s*-->\s*\n"
    r"(?P<fence>`{3,})(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)\n(?P=fence)[ \t]*(?:\n|$)",
    re.S,
)
TIMEOUT = 300


def _blocks(text: str) -> list[tuple[str, str, str]]:
    """(file, language, body) of every marked block, in order."""
    return [(m["file"], m["lang"], m["body"] + "\n") for m in BLOCK.finditer(text)]


def test_the_marker_convention_finds_the_blocks_in_order() -> None:
    text = (
        "intro\n<!-- plugin-example: a.py -->\n```python\nprint(1)\n```\n"
        "prose\n<!-- plugin-example: run.sh -->\n\n```sh\necho hi\n```\n"
        "```sh\nnot marked\n```\n"
    )
    assert _blocks(text) == [("a.py", "python", "print(1)\n"), ("run.sh", "sh", "echo hi\n")]


@pytest.mark.slow
def test_the_readme_plugin_example_runs_verbatim(tmp_path: Path) -> None:
    text = README.read_text() if README.is_file() else ""
    blocks = _blocks(text)
    if not blocks:
        pytest.skip("README.md has no <!-- plugin-example: FILE --> blocks yet (the example is in "
                    "bench/results/README_plugin_example.md until it is merged)")
    for name, _, body in blocks:
        (tmp_path / name).write_text(body)
    assert [lang for _, lang, _ in blocks if lang in ("sh", "bash")], "the example has no shell blocks"
    script = "set -e\n" + "".join(body for _, lang, body in blocks if lang in ("sh", "bash"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DENDRO_")}
    env.update({
        "DENDRO_PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    proc = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the README example did not finish in {TIMEOUT}s; its output:\n{out[-6000:]}")
    finally:
        # the server the example started in the background, and its worker, if still there
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"the README example failed ({proc.returncode}):\n{out[-6000:]}"
    accuracy = re.search(r"test accuracy (\d\.\d+)", out)
    assert accuracy is not None, out[-6000:]
    assert float(accuracy[1]) > 0.5, out[-6000:]  # three classes: chance is 1/3
