"""PNG files that carry their provenance and never replace an existing file."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .atomic_files import write_new

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def safe_label(label: str) -> str:
    """A label reduced to what every file system accepts (yaw_left_45, smiling…)."""
    return _UNSAFE.sub("-", label).strip("-")[:48]


def png_bytes(image: Image.Image, text: dict[str, object] | None = None) -> bytes:
    """``image`` as PNG bytes, with ``text`` as tEXt chunks (a value that is not text as JSON)."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


def write_png_new(folder: Path, name_for: Callable[[int], str], start: int, image: Image.Image,
                  text: dict[str, object]) -> tuple[Path, int]:
    """Writes ``image`` under the first free name ``name_for(n)`` for n ≥ start; returns (path, n).

    The file appears complete or not at all, and an existing file is never replaced: a name taken meanwhile
    makes it try the next number (``atomic_files.write_new``).
    """
    written = write_new(folder, lambda attempt: name_for(start + attempt), png_bytes(image, text))
    if written is None:  # name_for offers a name for every number
        raise RuntimeError(f"no free PNG name in {folder}")
    path, attempt = written
    return path, start + attempt
