"""Files that appear whole or not at all: temp file in the same folder, fsync, rename, fsync the folder.

Two ways to land the temp file: ``atomic_write`` replaces (for the pack's own bookkeeping files), ``write_new``
and ``write_new_file`` never do (for what a user keeps: images, LoRAs, cards). The temp name ends in ".part",
not the real suffix, so a trainer or gallery scanning a folder for *.png never picks up half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (os.umask can only be read by
    setting it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode open() would give a new file: 0o666 less the umask. mkstemp makes 0o600 files, which another
    user (a trainer or container running as someone else) cannot read."""
    return 0o666 & ~current_umask()


def chmod_like_open(fd: int) -> None:
    if os.name == "posix":
        os.fchmod(fd, new_file_mode())


def fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a reader sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".part", not the real suffix: a trainer scanning the folder for *.png never sees a half file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        chmod_like_open(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_new(folder: str | os.PathLike, name_for: Callable[[int], str | None],
              data: bytes | Callable[[BinaryIO], object]) -> tuple[Path, int] | None:
    """Writes ``data`` (bytes, or a function that writes into the open file) under the first of the names
    ``name_for(0)``, ``name_for(1)``… that no file has yet; returns (path, attempt), or None once ``name_for``
    gives None (every name it offered was taken).

    Never replaces a file: the data goes to an fsynced temp file in ``folder`` and a hard link claims the name,
    which fails rather than replace, so two writers racing for one name end up with different names. Where the
    file system has no hard links, an exclusive create plus copy claims it instead."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        chmod_like_open(fd)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        attempt = 0
        while (name := name_for(attempt)) is not None:
            target = folder / name
            if _claim(Path(tmp), target):
                fsync_dir(folder)
                return target, attempt
            attempt += 1
        return None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_new_file(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> bool:
    """Writes ``data`` to ``path`` whole unless ``path`` exists: then it writes nothing and returns False."""
    path = Path(path)
    return write_new(path.parent, lambda attempt: path.name if attempt == 0 else None, data) is not None


def _claim(tmp: Path, target: Path) -> bool:
    try:
        os.link(tmp, target)   # fails if target exists: never overwrites
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system
        pass
    try:
        with open(target, "xb") as out, open(tmp, "rb") as fin:
            shutil.copyfileobj(fin, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        return True
    except FileExistsError:
        return False
