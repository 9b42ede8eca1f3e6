"""The flow-matching noise schedule of the diffusers pipelines, as a plain list of sigmas.

ComfyUI's own MODEL samples with whatever sigmas it is given; handing it the schedule diffusers' FLUX and
Qwen-Image-Edit pipelines compute (resolution-dependent shift, Qwen's terminal stretch) keeps the pack's native
path on the same schedule as its diffusers and split-file paths, instead of ComfyUI's fixed-shift defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

# what a sampler calls after each step (step, total, latents so far): the nodes show progress and previews
StepCallback = Callable[[int, int, torch.Tensor], None]


def flow_shift_mu(config: dict, image_seq_len: int) -> float:
    """diffusers' ``calculate_shift``: the exponent of the resolution-dependent time shift."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def flow_sigmas(config: dict, steps: int, image_seq_len: int) -> torch.Tensor:
    """steps + 1 sigmas, 1 → 0, exactly as the pipelines set their FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flow_shift_mu(config, image_seq_len))
    return scheduler.sigmas.detach().to("cpu", torch.float32)


def flow_shift(config: dict, image_seq_len: int) -> float:
    """The constant time shift that matches the schedule's first steps (ComfyUI's ModelSampling ``shift``)."""
    if config.get("use_dynamic_shifting"):
        return math.exp(flow_shift_mu(config, image_seq_len))
    return float(config.get("shift", 1.0))
