"""fp8 (e4m3) weight storage for diffusers transformers, with fp8 matmul where the GPU has it.

diffusers' layerwise casting stores e4m3 weights but casts each layer back to bf16 on every
forward; on an H100 that made the Qwen-Image-Edit forward 1.2× slower than ComfyUI's own fp8
model. Here each Linear keeps its e4m3 weight and a per-tensor scale, and on GPUs with fp8
tensor cores (compute capability ≥ 8.9: RTX 4090, H100) multiplies in fp8 with
``torch._scaled_mm``, as ComfyUI's fp8 ops do: activations are clamped to the e4m3 range and cast,
unscaled. Elsewhere (CPU, older GPUs) the weight is dequantised to the compute dtype.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FlenUserError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_GRAD_TARGET = 440.0  # below E4M3_MAX by more than a bf16 rounding step (2 at 448)
# Same spirit as diffusers' layerwise-casting defaults: embeddings, norms and the outer projections
# stay in the compute dtype (small, and sensitive).
SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", r"^proj_in$", r"^proj_out$", r"^img_in$", r"^txt_in$",
                 "time_text_embed", "timestep_embedder")


def fp8_matmul_available(device: torch.device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


_UNIT_SCALES: dict[torch.device, torch.Tensor] = {}


def _unit_scale(device: torch.device) -> torch.Tensor:
    # one tensor per device instead of a fill kernel per matmul (hundreds per forward)
    scale = _UNIT_SCALES.get(device)
    if scale is None:
        scale = _UNIT_SCALES[device] = torch.ones((), device=device, dtype=torch.float32)
    return scale


def e4m3_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D e4m3 matrix, clamped to the e4m3 range (unscaled, as ComfyUI's fp8 ops do)."""
    return x.reshape(-1, x.shape[-1]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


class SharedCast:
    """One e4m3 cast of the activations that sibling projections read in a row (to_q / to_k / to_v, the
    add_*_proj trio, and proj_mlp beside them in FLUX's single blocks): without it each sibling clamps and casts
    the same tensor again. The cast is reused only for the very tensor object the previous sibling got, not
    changed in place since (where the tensor tracks versions: inference tensors don't), and only until every
    sibling has had it, so no activation outlives its block."""

    __slots__ = ("members", "_src", "_version", "_x2", "_left")

    def __init__(self, members: int) -> None:
        self.members = members
        self._src: torch.Tensor | None = None
        self._version: int | None = None
        self._x2: torch.Tensor | None = None
        self._left = 0

    def get(self, x: torch.Tensor) -> torch.Tensor:
        version = None if x.is_inference() else x._version
        if self._left > 0 and self._src is x and self._version == version and self._x2 is not None:
            x2 = self._x2
            self._left -= 1
            if self._left == 0:
                self._src = self._x2 = None
            return x2
        x2 = e4m3_activations(x)
        self._src, self._version, self._x2, self._left = x, version, x2, self.members - 1
        return x2


class _FrozenFp8Linear(torch.autograd.Function):
    """``x @ (s·W)ᵀ + b`` over a frozen e4m3 weight, in fp8 both ways. A LoRA over a frozen base needs only the
    gradient through ``x``: ``dx = dy @ (s·W)``, one more fp8 matmul (``dy`` scaled by its own amax into the e4m3
    range: gradients are far smaller than 448). Nothing is saved for backward but the weight the layer holds
    anyway, where ``F.linear`` on the dequantised weight saves the input and a 16-bit copy of the weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
        shape, n = x.shape, weight.shape[0]
        out = torch._scaled_mm(e4m3_activations(x), weight.t(), scale_a=_unit_scale(x.device),
                               scale_b=weight_scale, bias=bias, out_dtype=compute_dtype)
        ctx.save_for_backward(weight, weight_scale)
        ctx.x_shape, ctx.x_dtype, ctx.compute_dtype = shape, x.dtype, compute_dtype
        return out.reshape(*shape[:-1], n).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, weight_scale = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        # three passes over dy (amax without a |dy| temporary, one scaled copy in dy's dtype, the cast) where
        # abs/float/divide/clamp took six, at up to 4 bytes an element: on FLUX's MLP this quantisation cost more
        # than the fp8 matmul saved. Scaling to 440, not 448, keeps the 16-bit product's rounding inside the
        # e4m3 range without a clamp.
        amax = torch.linalg.vector_norm(g, float("inf")).float()
        inv = (_GRAD_TARGET / amax.clamp(min=1e-30)).to(g.dtype)
        g8 = (g * inv).to(E4M3)
        g_scale = 1.0 / inv.float()  # the multiplier really applied, rounded to dy's dtype
        # _scaled_mm takes its second operand column-major: the (out, in) weight transposed into a contiguous
        # (in, out) copy, seen transposed; one pass over the fp8 bytes, freed after the matmul
        w_cols = weight.t().contiguous().t()
        grad_x = torch._scaled_mm(g8, w_cols, scale_a=g_scale, scale_b=weight_scale, out_dtype=ctx.compute_dtype)
        return grad_x.reshape(ctx.x_shape).to(ctx.x_dtype), None, None, None, None


def frozen_fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                      compute_dtype: torch.dtype) -> torch.Tensor:
    """The linear map of a frozen e4m3 weight with fp8 matmuls in forward and backward (see _FrozenFp8Linear)."""
    out = _FrozenFp8Linear.apply(x, weight, weight_scale, bias, compute_dtype)
    return cast(torch.Tensor, out)


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
                     if bias else None)  # type: ignore[assignment]  # torch types Linear.bias as never None
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        self.shared_cast: SharedCast | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> Fp8Linear:
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, device=w.device)
        if w.device.type != "meta":
            new.set_weight(w)
            if linear.bias is not None:
                new.bias.data = linear.bias.detach().to(compute_dtype)
        return new

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Stores ``w`` (any float dtype) as e4m3 with a per-tensor scale."""
        w = w.detach()
        scale = (w.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
        self.weight = nn.Parameter((w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), requires_grad=False)
        self.weight_scale = torch.full((), scale.item(), dtype=torch.float32, device=w.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(self.compute_dtype) * self.weight_scale.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        fp8_mm = k % 16 == 0 and n % 16 == 0 and fp8_matmul_available(x.device)  # False off CUDA
        if fp8_mm and needs_grad and not self.weight.requires_grad:
            return frozen_fp8_linear(x, self.weight, self.weight_scale, self.bias, self.compute_dtype)
        if fp8_mm and not needs_grad:
            shape = x.shape
            x2 = self.shared_cast.get(x) if self.shared_cast is not None else e4m3_activations(x)
            out = torch._scaled_mm(x2, self.weight.t(), scale_a=_unit_scale(x.device),
                                   scale_b=self.weight_scale, bias=self.bias, out_dtype=self.compute_dtype)
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


def share_sibling_casts(model: nn.Module) -> int:
    """Links the Fp8Linear siblings that diffusers' attention processors call one after another on the same
    input (see :class:`SharedCast`); returns how many groups. Idempotent."""
    groups = 0
    owner_of = {id(attn): parent for parent in model.modules()
                if isinstance(attn := getattr(parent, "attn", None), nn.Module)}
    for module in model.modules():
        for names in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")):
            members = [getattr(module, n, None) for n in names]
            if not all(isinstance(m, Fp8Linear) for m in members):
                continue
            # FLUX's single blocks (attention without the text trio) feed the same normed tokens to proj_mlp
            if names[0] == "to_q" and getattr(module, "add_q_proj", None) is None:
                mlp = getattr(owner_of.get(id(module)), "proj_mlp", None)
                if isinstance(mlp, Fp8Linear):
                    members.append(mlp)
            shared = SharedCast(len(members))
            for m in members:
                m.shared_cast = shared  # type: ignore[union-attr]
            groups += 1
    return groups


def _checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers model folder: the shards its index names, or the single file."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return [single]
    raise FlenUserError(f"{folder} has no diffusion_pytorch_model.safetensors (nor a sharded index). FLENwheel "
                        "loads safetensors only; re-download the model's transformer folder.")


def load_transformer_fp8(model_cls, folder: str | Path, compute_dtype: torch.dtype,
                         skip_patterns: tuple[str, ...] = SKIP_PATTERNS) -> nn.Module:
    """Builds ``model_cls`` from ``folder``'s config with no weights, makes its Linears Fp8Linear, then reads the
    checkpoint one tensor at a time, quantising each Linear weight as it arrives and copying the rest, so each
    shard's file mapping is released once read. Peak resident memory is the fp8 model plus one shard, where
    ``from_pretrained`` + ``convert_linears_to_fp8`` keeps the whole bf16 checkpoint mapped until it is done
    (41 GB for Qwen-Image-Edit's transformer; benchmarks/bench_fp8_load.py). The result equals that route's,
    tensor for tensor."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    folder = Path(folder)
    config = model_cls.load_config(str(folder))
    with init_empty_weights(include_buffers=False):
        model = model_cls.from_config(config)
    convert_linears_to_fp8(model, compute_dtype, skip_patterns)
    modules = dict(model.named_modules())
    expected = {name for name, _ in model.named_parameters()}
    buffers = {name for name, _ in model.named_buffers()}
    seen: set[str] = set()
    for path in _checkpoint_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key not in expected and key not in buffers:
                    raise FlenUserError(f"{path.name} holds '{key}', which {model_cls.__name__} does not have: "
                                        f"{folder} is not a {model_cls.__name__} folder.")
                owner_name, _, attr = key.rpartition(".")
                owner = modules[owner_name]
                tensor = f.get_tensor(key)
                if isinstance(owner, Fp8Linear) and attr == "weight":
                    owner.set_weight(tensor.to(compute_dtype))  # as from_pretrained(dtype=...) would
                elif key in buffers:
                    getattr(owner, attr).data = tensor.to(getattr(owner, attr).dtype, copy=True)
                else:  # a copy, so that no parameter keeps the checkpoint file mapped
                    value = tensor.to(compute_dtype, copy=True) if tensor.is_floating_point() else tensor.clone()
                    setattr(owner, attr, nn.Parameter(value, requires_grad=False))
                seen.add(key)
    missing = sorted(expected - seen)
    if missing:
        raise FlenUserError(f"The checkpoint in {folder} lacks {len(missing)} of {model_cls.__name__}'s weights "
                            f"(e.g. '{missing[0]}'): the download is incomplete. Download the folder again.")
    return model.eval().requires_grad_(False)
