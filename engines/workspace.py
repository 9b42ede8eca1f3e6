"""The character workspace: what a character may be called and where its files live.

A character's name is also a folder name, twice over:

    <output>/flenwheel/<character>/        review store, datasets/, edit_pairs/, training/, model_cards/…
    <models/loras>/flenwheel/<character>/  its LoRAs (``char_lora_vN``, ``qwen_lora_vN``) and their cards

Every module that builds one of these paths asks this one, so the rule and the layout have a single home.
Plain Python: no ComfyUI imports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .atomic_files import write_new
from .errors import FlenUserError

PACK_DIR = "flenwheel"   # the pack's folder under ComfyUI's output folder and under models/loras
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def is_character_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def validate_character(name: object) -> str:
    """A character name is also a folder name: letters, digits, '_' and '-', at most 64."""
    if not isinstance(name, str) or not is_character_name(name):
        raise FlenUserError(f"Character name {str(name)[:80]!r} is not allowed: use 1–64 letters, digits, "
                            f"'_' or '-' (it becomes a folder name under output/{PACK_DIR}/).")
    return name


def workspace_root(output_dir: str | os.PathLike) -> Path:
    """``<output>/flenwheel``: the folder holding every character's workspace."""
    return Path(output_dir) / PACK_DIR


def workspace_dir(output_dir: str | os.PathLike, character: str) -> Path:
    """``<output>/flenwheel/<character>``."""
    return workspace_root(output_dir) / validate_character(character)


def workspace_label(character: str, *sub: str) -> str:
    """How messages name a folder of the workspace: ``output/flenwheel/<character>/<sub…>``."""
    return "/".join(("output", PACK_DIR, character, *sub))


def loras_dir(loras_root: str | os.PathLike, character: str) -> Path:
    """``<models/loras>/flenwheel/<character>``: where the character's LoRAs are written."""
    return Path(loras_root) / PACK_DIR / validate_character(character)


def lora_name(character: str, file_name: str) -> str:
    """A LoRA's name as models/loras lists it: ``flenwheel/<character>/<file_name>``."""
    return PurePosixPath(PACK_DIR, validate_character(character), file_name).as_posix()


def character_of_lora(name: str) -> str | None:
    """The character a LoRA name under ``flenwheel/<character>/…`` belongs to; None for other names."""
    parts = PurePosixPath(str(name).replace("\\", "/")).parts
    if len(parts) >= 3 and parts[0] == PACK_DIR and is_character_name(parts[1]):
        return parts[1]
    return None


def next_version(folder: str | os.PathLike, prefix: str) -> int:
    """One past the highest N of any ``<prefix>_vN`` file in ``folder`` (``char_lora_v2.safetensors``,
    ``char_lora_v2.card.json``…): a number that has any file is never handed out again."""
    folder = Path(folder)
    pattern = re.compile(rf"^{re.escape(prefix)}_v([0-9]+)(?:\.|$)")
    taken = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else []) if (m := pattern.match(p.name))]
    return max(taken, default=0) + 1


def write_new_version(folder: str | os.PathLike, prefix: str, data: bytes | Callable[[BinaryIO], object],
                      suffix: str = ".safetensors") -> Path:
    """Writes ``data`` as the next ``<prefix>_vN<suffix>`` in ``folder``, never overwriting: the name is claimed
    atomically, so two writers at once get two versions."""
    def name_for(attempt: int) -> str | None:
        return f"{prefix}_v{next_version(folder, prefix)}{suffix}" if attempt < 1000 else None

    written = write_new(folder, name_for, data)
    if written is None:
        raise FlenUserError(f"Could not claim a new {prefix}_vN name in {folder}.")
    return written[0]
