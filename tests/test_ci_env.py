""".ci/env.sh, the set-up both README commands share: switching between the demo and the tests never reinstalls
the runtime set. Runs the real script with a stand-in interpreter that records what pip would install."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../calls.log"
"""


def _setup(tmp_path: Path, with_tests: bool) -> list[str]:
    venv, comfy = tmp_path / "venv", tmp_path / "ComfyUI"
    log = venv / "calls.log"
    if not venv.exists():
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").write_text(FAKE_PYTHON)
        (venv / "bin" / "python").chmod(0o755)
        comfy.mkdir()
        (comfy / "main.py").write_text("")
        (comfy / "requirements.txt").write_text("torch\naiohttp\n")
    log.write_text("")
    env = {**os.environ, "FLEN_VENV": str(venv), "COMFYUI_PATH": str(comfy), "FLEN_WITH_TESTS": "1" if with_tests
           else "0"}
    subprocess.run(["bash", "-c", f'source "{REPO}/.ci/env.sh"'], env=env, check=True, capture_output=True,
                   text=True, timeout=60)
    return [line for line in log.read_text().splitlines() if line.strip()]


def test_switching_between_demo_and_tests_never_reinstalls_the_runtime_set(tmp_path):
    first = _setup(tmp_path, with_tests=False)  # .ci/demo on a fresh venv: the runtime set
    assert any("torch==2.14.1" in c for c in first) and not any("requirements-dev.txt" in c for c in first)
    then_tests = _setup(tmp_path, with_tests=True)  # .ci/test: only the extras on top
    assert then_tests == [f"-m pip install -q -r {REPO}/requirements-dev.txt"]
    assert _setup(tmp_path, with_tests=False) == []  # back to the demo: nothing
    assert _setup(tmp_path, with_tests=True) == []  # and the tests again: nothing
    (tmp_path / "ComfyUI" / "requirements.txt").write_text("torch\naiohttp\nnew-package\n")
    changed = _setup(tmp_path, with_tests=True)  # a changed runtime list: runtime set, then the extras again
    assert any("torch==2.14.1" in c for c in changed) and changed[-1].endswith("requirements-dev.txt")
