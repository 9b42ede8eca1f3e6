"""The LoRA stack: an ordered list of (LoRA file, strength, on/off) shared by every pipeline.

A stack is immutable so a node can extend an upstream stack without changing what other
branches of the graph see.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .errors import FlenUserError
from .safetensors_files import NotSafetensors, read_header


@dataclass(frozen=True)
class LoraEntry:
    name: str  # as listed by ComfyUI's models/loras (relative, forward slashes)
    path: str  # absolute path, resolved by the node through folder_paths
    strength: float
    enabled: bool = True

    @property
    def adapter_name(self) -> str:
        # diffusers adapter names must be valid module-attribute-like names.
        safe = "".join(c if c.isalnum() else "_" for c in Path(self.name).with_suffix("").as_posix())
        return f"flen_{safe}"


@dataclass(frozen=True)
class LoraStack:
    entries: tuple[LoraEntry, ...] = ()

    def extended(self, entry: LoraEntry) -> LoraStack:
        return LoraStack(self.entries + (entry,))

    def scaled(self, factor: float) -> LoraStack:
        """The same entries with every strength multiplied by ``factor`` (per-sweep weights)."""
        if factor == 1.0:
            return self
        return LoraStack(tuple(replace(e, strength=e.strength * factor) for e in self.entries))

    def active(self) -> tuple[LoraEntry, ...]:
        """Entries that are on. Entries at strength 0 stay: they are cached, not re-read."""
        return tuple(e for e in self.entries if e.enabled)

    def describe(self) -> list[dict[str, object]]:
        """What goes into FLEN_META and provenance: names and strengths, never paths."""
        return [{"name": e.name, "strength": e.strength, "enabled": e.enabled} for e in self.entries]


def read_safetensors_header(path: str | Path) -> dict[str, object]:
    """Reads only the JSON header of a .safetensors file (tensor names, shapes, metadata).

    Raises FlenUserError for a file that is not safetensors, so a corrupt or truncated LoRA is
    reported by name instead of failing deep inside diffusers.
    """
    p = Path(path)
    try:
        return read_header(p)[0]
    except (OSError, NotSafetensors) as exc:
        raise FlenUserError(
            f"LoRA file '{p.name}' is not a readable .safetensors file ({exc}). "
            "Re-download or re-export it; FLENwheel loads safetensors only."
        ) from exc
