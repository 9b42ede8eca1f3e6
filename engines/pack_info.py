"""Where the pack lies and which version it is: one answer for the nodes, the routes and the tools.

The version is pyproject.toml's (the file ComfyUI's registry reads), so a release changes it in one place.
"""

from __future__ import annotations

import re
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = PACK_ROOT / "workflows"
API_WORKFLOWS_DIR = WORKFLOWS_DIR / "api"


def _version(pyproject: Path) -> str:
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    m = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1) if project else "", re.MULTILINE)
    return m.group(1) if m else "unknown"


PACK_VERSION = _version(PACK_ROOT / "pyproject.toml")
