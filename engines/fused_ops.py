"""Where diffusers runs several kernels and ComfyUI's own models one: the RMSNorm and FLUX's rotary embedding.

Measured on an H200 against ComfyUI's native fp8 forward in the same run (benchmarks/bench_fp8_forward.py;
benchmarks/RESULTS.md). Both replacements leave the parameters and the module tree as they were, so state
dicts, LoRA targeting, the shared fp8 casts and the VRAM host see the same model.

RMSNorm. diffusers' ``RMSNorm.forward`` runs six elementwise passes (upcast, square, mean, rsqrt, scale, downcast) and
a seventh for the weight; the query/key norms of every FLUX and Qwen-Image block run it on the whole
[tokens × heads × 128] activations, several times per block. ComfyUI's own models call
``torch.nn.functional.rms_norm``, one fused kernel on CUDA: this is where a good part of the pack's gap to
ComfyUI's native fp8 Qwen-Image forward came from.

FLUX's rotary embedding. diffusers applies it in its "real" form: split, negate, stack, two upcasts, two
products, a sum and a downcast per query and per key. The same rotation as one complex product (upcast,
multiply, downcast) is what diffusers' own Qwen-Image path does; :class:`FluxRopeAttnProcessor` runs FLUX's
attention with it, and is otherwise diffusers' ``FluxAttnProcessor`` (same projections, in the same order,
same attention dispatch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fp8_linear import share_sibling_casts


class FusedRMSNorm(nn.Module):
    """``F.rms_norm`` over the last dimensions, with diffusers' RMSNorm's parameter and attributes."""

    def __init__(self, normalized_shape: tuple[int, ...], eps: float, weight: nn.Parameter | None) -> None:
        super().__init__()
        self.dim = torch.Size(normalized_shape)
        self.eps = float(eps)
        self.elementwise_affine = weight is not None
        self.weight = weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # diffusers' RMSNorm returns the weight's dtype (the input's when there is no weight)
        if self.weight is not None and hidden_states.dtype != self.weight.dtype:
            hidden_states = hidden_states.to(self.weight.dtype)
        return F.rms_norm(hidden_states, self.dim, self.weight, self.eps)

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


def rotate_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, S, H, D] by complex ``freqs`` [S, D/2] (pairs of neighbouring channels)."""
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * freqs[None, :, None, :]
    return torch.view_as_real(rotated).flatten(3).to(x.dtype)


class FluxRopeAttnProcessor:
    """diffusers' FLUX attention with the rotary embedding as one complex product (see the module doc)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self) -> None:
        self._freqs_key: tuple[torch.Tensor, torch.Tensor] | None = None
        self._freqs: torch.Tensor | None = None

    def _complex_freqs(self, rotary: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> torch.Tensor:
        cos, sin = rotary  # [S, D], each frequency repeated for its pair of channels
        key = self._freqs_key
        if key is None or key[0] is not cos or key[1] is not sin or self._freqs is None:
            # every block of one forward gets the same (cos, sin) tensors
            self._freqs = torch.complex(cos[:, 0::2].float(), sin[:, 0::2].float()).to(device)
            self._freqs_key = (cos, sin)
        return self._freqs

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | tuple:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, enc_query, enc_key, enc_value = _get_qkv_projections(attn, hidden_states,
                                                                              encoder_hidden_states)
        head_dim = attn.head_dim
        query = attn.norm_q(query.unflatten(-1, (-1, head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, head_dim)))
        value = value.unflatten(-1, (-1, head_dim))
        if attn.added_kv_proj_dim is not None:
            query = torch.cat([attn.norm_added_q(enc_query.unflatten(-1, (-1, head_dim))), query], dim=1)
            key = torch.cat([attn.norm_added_k(enc_key.unflatten(-1, (-1, head_dim))), key], dim=1)
            value = torch.cat([enc_value.unflatten(-1, (-1, head_dim)), value], dim=1)
        if image_rotary_emb is not None:
            freqs = self._complex_freqs(image_rotary_emb, query.device)
            query, key = rotate_complex(query, freqs), rotate_complex(key, freqs)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1],
                                            out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


def use_flux_rope_processor(model: nn.Module) -> int:
    """Gives every FLUX attention module of ``model`` a :class:`FluxRopeAttnProcessor` where it runs diffusers'
    plain ``FluxAttnProcessor`` (IP-Adapter and other processors are left alone); returns how many."""
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
    except ImportError:  # a diffusers without FLUX
        return 0
    shared = FluxRopeAttnProcessor()  # one instance: the complex frequencies are built once per forward
    count = 0
    for module in model.modules():
        if isinstance(module, FluxAttention) and type(module.processor) is FluxAttnProcessor:
            module.set_processor(shared)
            count += 1
    return count


def prepare_for_inference(transformer: nn.Module) -> None:
    """The inference set-up every pipeline handle gets, before any adapter wraps a layer."""
    fuse_rms_norms(transformer)
    use_flux_rope_processor(transformer)
    share_sibling_casts(transformer)
