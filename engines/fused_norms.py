"""diffusers' RMSNorm as one fused kernel.

diffusers' ``RMSNorm.forward`` runs six elementwise passes (upcast, square, mean, rsqrt, scale, downcast) and
a seventh for the weight; the query/key norms of every FLUX and Qwen-Image block run it on the whole
[tokens × heads × 128] activations, several times per block. ComfyUI's own models call
``torch.nn.functional.rms_norm``, one fused kernel on CUDA: this is where a good part of the pack's gap to
ComfyUI's native fp8 forward came from (benchmarks/bench_fp8_forward.py). The replacement keeps the
parameter name (``weight``), so state dicts, LoRA targeting and the VRAM host see the same module tree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusedRMSNorm(nn.Module):
    """``F.rms_norm`` over the last dimensions, with diffusers' RMSNorm's parameter and attributes."""

    def __init__(self, normalized_shape: tuple[int, ...], eps: float, weight: nn.Parameter | None) -> None:
        super().__init__()
        self.dim = torch.Size(normalized_shape)
        self.eps = float(eps)
        self.elementwise_affine = weight is not None
        self.weight = weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight: torch.Tensor | None = self.weight
        if weight is not None and weight.dtype != hidden_states.dtype:
            # diffusers computes in fp32 and returns the weight's dtype when that is 16-bit
            hidden_states = hidden_states.to(weight.dtype) if weight.dtype in (torch.float16, torch.bfloat16) \
                else hidden_states
            if weight.dtype != hidden_states.dtype:
                weight = weight.to(hidden_states.dtype)
        return F.rms_norm(hidden_states, self.dim, weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.dim)}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


def _is_diffusers_rms_norm(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "RMSNorm" and cls.__module__ == "diffusers.models.normalization"


def fuse_rms_norms(model: nn.Module) -> int:
    """Replaces every diffusers ``RMSNorm`` without a bias in ``model`` by :class:`FusedRMSNorm` (same
    parameter object); returns how many. Idempotent."""
    targets = [(name, m) for name, m in model.named_modules()
               if _is_diffusers_rms_norm(m) and getattr(m, "bias", None) is None]
    for name, norm in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FusedRMSNorm(tuple(norm.dim), norm.eps, norm.weight))
    return len(targets)
