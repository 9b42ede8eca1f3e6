"""How engines ask for their torch modules to be on the compute device.

Engines never import ComfyUI. Inside ComfyUI the host is the VRAM bridge
(``nodes/comfy_bridge.py``), which hands the modules to ComfyUI's model management; outside
it (CLI, tests of engines) ``LocalHost`` just moves them.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ModelHost(Protocol):
    def prepare(self, *modules: torch.nn.Module) -> torch.device:
        """Puts these modules on the compute device (others may be offloaded); returns it."""
        ...

    def check_interrupt(self) -> None:
        """Raises if the user asked to stop."""
        ...


class LocalHost:
    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def prepare(self, *modules: torch.nn.Module) -> torch.device:
        for m in modules:
            m.to(self.device)
        return self.device

    def check_interrupt(self) -> None:
        return None
