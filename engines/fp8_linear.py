"""fp8 (e4m3) weight storage for diffusers transformers, with fp8 matmul where the GPU has it.

diffusers' layerwise casting stores e4m3 weights but casts each layer back to bf16 on every
forward; on an H100 that made the Qwen-Image-Edit forward 1.2× slower than ComfyUI's own fp8
model. Here each Linear keeps its e4m3 weight and a per-tensor scale, and on GPUs with fp8
tensor cores (compute capability ≥ 8.9: RTX 4090, H100) multiplies in fp8 with
``torch._scaled_mm``, as ComfyUI's fp8 ops do: activations are clamped to the e4m3 range and cast,
unscaled. Elsewhere (CPU, older GPUs) the weight is dequantised to the compute dtype.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# Same spirit as diffusers' layerwise-casting defaults: embeddings, norms and the outer projections
# stay in the compute dtype (small, and sensitive).
SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", r"^proj_in$", r"^proj_out$", r"^img_in$", r"^txt_in$",
                 "time_text_embed", "timestep_embedder")


def fp8_matmul_available(device: torch.device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Linear):
    """nn.Linear with an e4m3 weight and a per-tensor scale (peft wraps it like any Linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=E4M3, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> Fp8Linear:
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, device=w.device)
        if w.device.type != "meta":
            with torch.no_grad():
                scale = (w.detach().abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
                new.weight.data = (w.detach().float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
                new.weight_scale.fill_(scale.item())
                if linear.bias is not None:
                    new.bias.data = linear.bias.detach().to(compute_dtype)
        return new

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(self.compute_dtype) * self.weight_scale.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if x.is_cuda and k % 16 == 0 and n % 16 == 0 and fp8_matmul_available(x.device):
            shape = x.shape
            x2 = x.reshape(-1, k).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
            one = torch.ones((), device=x.device, dtype=torch.float32)
            out = torch._scaled_mm(x2, self.weight.t(), scale_a=one, scale_b=self.weight_scale,
                                   bias=self.bias, out_dtype=self.compute_dtype)
            return out.reshape(*shape[:-1], n).to(x.dtype)
        return F.linear(x.to(self.compute_dtype), self.dequantized_weight(), self.bias).to(x.dtype)


def convert_linears_to_fp8(module: nn.Module, compute_dtype: torch.dtype,
                           skip_patterns: tuple[str, ...] = SKIP_PATTERNS) -> int:
    """Replaces the module's nn.Linear layers (except skipped names) by Fp8Linear; returns how many."""
    compiled = [re.compile(p) for p in skip_patterns]
    targets = [(name, m) for name, m in module.named_modules()
               if type(m) is nn.Linear and not any(p.search(name) for p in compiled)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, Fp8Linear.from_linear(linear, compute_dtype))
    return len(targets)
