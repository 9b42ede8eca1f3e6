"""pyproject.toml's dependencies (what ComfyUI's registry and pip read) are requirements.txt's (what the set-up
scripts and the README's install install), and the version the server reports is pyproject's."""

from __future__ import annotations

from pathlib import Path

import tomllib

from engines.pack_info import PACK_VERSION

REPO = Path(__file__).resolve().parents[1]


def _requirements() -> list[str]:
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def test_pyproject_dependencies_are_requirements_txt():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["dependencies"] == _requirements()
    assert {"dlib-bin>=20.0", "face_recognition_models==0.3.0"} <= set(project["dependencies"])


def test_pack_version_is_pyprojects():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert PACK_VERSION == project["version"] != "unknown"
