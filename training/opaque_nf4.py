"""NF4 base layers as one opaque operator, so that compiled blocks (TrainConfig.compile_blocks) hold no more
memory than eager ones.

Traced by torch.compile inside checkpointed blocks, bitsandbytes' ``Linear4bit`` layers made the blocks hold far
more than in eager mode (measured on an H200: FLUX at 1024² 18.9 against 8.3 GiB; Qwen-Image-Edit ran out of
24 GiB). Here a layer's forward is one custom operator (``flenwheel::nf4_linear``: bitsandbytes' own
dequantisation and matmul) whose inside the compiler cannot see, and its backward dequantises again
(``flenwheel::nf4_linear_grad_input``), so the graphs keep only the layer's input and its 4-bit weight: FLUX
compiled then peaked at 8.16 GiB, Qwen-Image-Edit at 14.25 GiB (benchmarks/RESULTS.md).

Only the frozen base goes through it: the LoRA's own layers are plain and stay visible to the compiler.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _weight(packed: Tensor, absmax: Tensor, absmax2: Tensor | None, code2: Tensor | None, offset: Tensor | None,
            blocksize: int, blocksize2: int, out_features: int, in_features: int, dtype: torch.dtype) -> Tensor:
    if absmax2 is not None and code2 is not None and offset is not None:    # double quantisation: absmax is 8-bit
        absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, absmax2, code2, blocksize2, torch.float32)
        absmax = absmax + offset
    return torch.ops.bitsandbytes.dequantize_4bit(packed, absmax.float(), blocksize, "nf4",
                                                  [out_features, in_features], dtype)


@torch.library.custom_op("flenwheel::nf4_linear", mutates_args=())
def nf4_linear(x: Tensor, packed: Tensor, absmax: Tensor, absmax2: Tensor | None, code2: Tensor | None,
               offset: Tensor | None, bias: Tensor | None, blocksize: int, blocksize2: int, out_features: int,
               in_features: int) -> Tensor:
    w = _weight(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@nf4_linear.register_fake
def _(x, packed, absmax, absmax2, code2, offset, bias, blocksize, blocksize2, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("flenwheel::nf4_linear_grad_input", mutates_args=())
def nf4_linear_grad_input(grad: Tensor, packed: Tensor, absmax: Tensor, absmax2: Tensor | None,
                          code2: Tensor | None, offset: Tensor | None, blocksize: int, blocksize2: int,
                          out_features: int, in_features: int) -> Tensor:
    w = _weight(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features,
                grad.dtype)
    return grad @ w


@nf4_linear_grad_input.register_fake
def _(grad, packed, absmax, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features):
    return grad.new_empty((*grad.shape[:-1], in_features))


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, packed, absmax, absmax2, code2, offset, _bias, blocksize, blocksize2, out_features, in_features = inputs
    ctx.save_for_backward(packed, absmax, absmax2, code2, offset)
    ctx.meta = (blocksize, blocksize2, out_features, in_features)
    ctx.x_needs_grad = x.requires_grad


def _backward(ctx: Any, grad: Tensor) -> tuple:
    packed, absmax, absmax2, code2, offset = ctx.saved_tensors
    gx = nf4_linear_grad_input(grad, packed, absmax, absmax2, code2, offset, *ctx.meta) if ctx.x_needs_grad \
        else None
    return gx, None, None, None, None, None, None, None, None, None, None


nf4_linear.register_autograd(_backward, setup_context=_setup_context)


def _opaque_forward(self: Any, x: Tensor) -> Tensor:
    qs = self.weight.quant_state
    nested = bool(getattr(qs, "nested", False))
    out = nf4_linear(x.to(self.compute_dtype) if self.compute_dtype is not None else x, self.weight.data, qs.absmax,
                     qs.state2.absmax if nested else None, qs.state2.code if nested else None,
                     qs.offset if nested else None, self.bias, int(qs.blocksize),
                     int(qs.state2.blocksize) if nested else 0, int(qs.shape[0]), int(qs.shape[1]))
    return out.to(x.dtype)


def make_nf4_opaque(model: torch.nn.Module) -> int:
    """Every bitsandbytes NF4 ``Linear4bit`` of ``model`` computes through :func:`nf4_linear` from now on (same
    numbers: the same dequantisation and matmul); returns how many. FP4 and 8-bit layers are left as they are."""
    import sys
    import types

    if "bitsandbytes" not in sys.modules:  # nothing was quantised: no need to import it now
        return 0
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module.weight, "quant_type", "") == "nf4" \
                and getattr(module.weight, "quant_state", None) is not None:
            module.forward = types.MethodType(_opaque_forward, module)  # type: ignore[method-assign]
            count += 1
    return count
