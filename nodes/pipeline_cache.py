"""Keeps one loaded pipeline per loader kind, registered with the VRAM bridge.

A loaded pipeline is reused across runs (ComfyUI's own output cache is dropped by
"free memory"); loading another model of the same kind releases the previous one, since a
24 GB card holds one of each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import torch

from . import comfy_bridge as bridge


class _HasModules(Protocol):
    @property
    def modules(self) -> dict[str, torch.nn.Module]: ...


H = TypeVar("H", bound=_HasModules)


class PipelineCache(Generic[H]):
    def __init__(self, load: Callable[[str, str, str, torch.device], H]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._handle: H | None = None

    def get(self, name: str, precision: str) -> H:
        folder = bridge.diffusers_folder_path(name)
        return self.get_with((folder, precision), name,
                             lambda: self._load(folder, name, precision, bridge.compute_device()))

    def get_with(self, key: tuple, name: str, load: Callable[[], H]) -> H:
        """The cached handle for ``key`` (e.g. the split files and precision), else ``load()``'s."""
        with self._lock:
            if self._handle is not None and self._key == key:
                return self._handle
            if self._handle is not None:
                for module in self._handle.modules.values():
                    bridge.release(module)
                self._handle = self._key = None
            handle = load()
            for label, module in handle.modules.items():
                bridge.register(module, f"{name}/{label}")
            self._handle, self._key = handle, key
            return handle
