"""Paths that come from a prompt: resolved inside folders the server chose, or refused.

Anyone who can reach ComfyUI's port can queue a prompt (ComfyUI has no login), so a path typed into a
node is untrusted. :func:`resolve_inside` turns such a text into a path inside one of a few allowed
roots (given by the caller, who gets them from ComfyUI's folder_paths) and refuses everything else:
absolute paths elsewhere, ``..`` escapes, and symlinks that lead out. Its messages never say whether
the file exists outside the roots, and never show the server's absolute paths.

Plain Python: no ComfyUI imports.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import FlenUserError


@dataclass(frozen=True)
class Root:
    """An allowed folder and how messages name it (``models/loras``, ``output/flenwheel``…)."""

    path: Path
    label: str


def real(path: str | os.PathLike) -> Path:
    """The path with every symlink followed (it need not exist)."""
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when ``path`` is ``root`` or below it, once symlinks on both are followed."""
    p, r = real(path), real(root)
    return p == r or r in p.parents


def inside_any(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> bool:
    return any(is_inside(path, r) for r in roots)


def resolve_inside(text: str, roots: Sequence[Root], what: str, *, must_exist: str = "") -> Path:
    """``text`` (relative to the first root, or absolute inside one of them) → the real path.

    ``must_exist``: "" (no check), "file" or "dir"; a missing one inside the roots is reported by its
    relative name. Anything outside the roots is refused with the same words whether or not it exists.
    """
    if not roots:
        raise FlenUserError(f"{what}: no folder is configured to read it from.")
    where = " or ".join(r.label for r in roots)
    raw = str(text or "").strip()
    if not raw:
        raise FlenUserError(f"{what} is empty: give a name inside {where}.")
    if "\x00" in raw or raw.startswith("~"):
        raise FlenUserError(f"{what} must be a name inside {where}, not {raw[:80]!r}.")
    given = Path(raw)
    candidates = [given] if given.is_absolute() else [r.path / given for r in roots]
    for cand in candidates:
        p = real(cand)
        root = next((r for r in roots if is_inside(p, r.path)), None)
        if root is None:
            continue
        if must_exist == "file" and not p.is_file() or must_exist == "dir" and not p.is_dir():
            if given.is_absolute() or cand is candidates[-1]:
                rel = p.relative_to(real(root.path)).as_posix()
                kind = "file" if must_exist == "file" else "folder"
                raise FlenUserError(f"{what}: there is no {kind} '{rel}' in {root.label}.")
            continue
        return p
    raise FlenUserError(f"{what} must be a name inside {where} (relative, without '..'); "
                        f"{raw[:80]!r} is not allowed. Paths outside the pack's folders are refused.")


def refuse_inside(path: str | os.PathLike, roots: Sequence[Root], what: str) -> None:
    """Raises when ``path`` (symlinks followed) lies in one of ``roots`` (folders clients can write to)."""
    for r in roots:
        if is_inside(path, r.path):
            raise FlenUserError(f"{what} lies in ComfyUI's {r.label} folder, which anyone who can reach the server "
                                "can write to through its upload routes: refused.")
