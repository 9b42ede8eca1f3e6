"""How engines ask for their torch modules to be on the compute device.

Engines never import ComfyUI. Inside ComfyUI the host is the VRAM bridge
(``nodes/comfy_bridge.py``), which hands the modules to ComfyUI's model management; outside
it (CLI, tests of engines) ``LocalHost`` just moves them.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ModelHost(Protocol):
    def prepare(self, *modules: torch.nn.Module, working_bytes: int = 0) -> torch.device:
        """Puts these modules on the compute device (others may be offloaded); returns it. ``working_bytes``:
        the memory the next step needs beyond the weights (activations), so that enough is freed for it."""
        ...

    def check_interrupt(self) -> None:
        """Raises if the user asked to stop."""
        ...


class LocalHost:
    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def prepare(self, *modules: torch.nn.Module, working_bytes: int = 0) -> torch.device:
        for m in modules:
            m.to(self.device)
        return self.device

    def check_interrupt(self) -> None:
        return None


# Working memory of one step at a latent size, as ComfyUI estimates it for the same models (comfy/sd.py's VAE
# ``memory_used_decode``, comfy/model_base.py's ``memory_required`` with the model's memory_usage_factor):
# without it, a 24 GB card keeps T5 beside the FLUX transformer and the 1024² VAE decode runs out of memory.
def vae_decode_bytes(latent_h: int, latent_w: int, per_pixel: int = 2178, element_size: int = 2) -> int:
    return per_pixel * latent_h * latent_w * 64 * element_size


def denoise_bytes(latent_h: int, latent_w: int, usage_factor: float, batch: int = 1, element_size: int = 2) -> int:
    return int(batch * latent_h * latent_w * element_size * 0.01 * usage_factor * 1024 * 1024)
