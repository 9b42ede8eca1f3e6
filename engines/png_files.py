"""PNG files that carry their provenance and never replace an existing file."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .atomic_files import chmod_like_open

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def safe_label(label: str) -> str:
    """A label reduced to what every file system accepts (yaw_left_45, smiling…)."""
    return _UNSAFE.sub("-", label).strip("-")[:48]


def write_png_new(folder: Path, name_for: Callable[[int], str], start: int, image: Image.Image,
                  text: dict[str, object]) -> tuple[Path, int]:
    """Writes ``image`` under the first free name ``name_for(n)`` for n ≥ start; returns (path, n).

    The file appears complete or not at all (temp file, fsync, hard link to the final name), and an
    existing file is never replaced: a name taken meanwhile makes it try the next number.
    """
    folder.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    fd, tmp = tempfile.mkstemp(prefix=".flen-", suffix=".png.tmp", dir=folder)
    try:
        chmod_like_open(fd)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info, compress_level=4)
            f.flush()
            os.fsync(f.fileno())
        n = start
        while True:
            final = folder / name_for(n)
            try:
                os.link(tmp, final)  # fails if the name exists: no overwrite, ever
                return final, n
            except FileExistsError:
                n += 1
    finally:
        os.unlink(tmp)
