"""Reading a .safetensors file's JSON header (tensor names, dtypes, shapes, metadata) without its tensors.

The callers word the error for their reader (a LoRA, a model file, ai-toolkit's output); this module only
says what is wrong with the bytes. Plain Python: no ComfyUI imports.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

MAX_HEADER_BYTES = 100_000_000


class NotSafetensors(ValueError):
    """The file is not a safetensors file; ``gguf`` is True when it is a GGUF file instead."""

    def __init__(self, reason: str, gguf: bool = False) -> None:
        super().__init__(reason)
        self.gguf = gguf


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The header as stored (``__metadata__`` included) and the offset where the tensor data starts.
    Raises NotSafetensors for other bytes, OSError when the file cannot be read."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if raw[:4] == b"GGUF":
            raise NotSafetensors("a GGUF file", gguf=True)
        if len(raw) != 8:
            raise NotSafetensors("file shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or n > MAX_HEADER_BYTES:
            raise NotSafetensors(f"implausible header length {n}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NotSafetensors(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise NotSafetensors("malformed header (not a JSON object)")
    return header, 8 + n
