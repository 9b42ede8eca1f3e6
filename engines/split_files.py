"""ComfyUI's split model files (diffusion_models / text_encoders / vae): what a file is, and loading it.

A ComfyUI user has single safetensors files in ComfyUI's own key names (BFL names for FLUX, Wan names for the
Qwen-Image VAE, the original Hugging Face names of the text encoders) in bf16, fp16, fp32, fp8_e4m3fn or
ComfyUI's fp8 "scaled" form (a ``scaled_fp8`` marker and one ``<layer>.scale_weight`` per fp8 weight).
Here each file is recognised from its keys and dtypes (so a wrong file gets a message that names it and what
it looks like), then streamed tensor by tensor into a diffusers / transformers module built with no weights
from an architecture config: fp8 weights stay e4m3 in ``Fp8Linear`` layers (the file's scale, or 1), so an
fp8 file never passes through bf16 in host memory. The configs of the full-size models ship in
``engines/configs/<model>/``; a file may carry its own (the tiny test models do) in its ``flen_config``
metadata.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from . import safetensors_files
from .diffusers_folder import PRECISIONS
from .errors import FlenUserError
from .fp8_linear import E4M3, SKIP_PATTERNS, Fp8Linear

log = logging.getLogger("FLENwheel")

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
FLUX_CONFIGS = "flux1-dev"
QWEN_EDIT_CONFIGS = "qwen-image-edit-2509"
DIFFUSION_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")

# What each kind of file is, for messages.
LABELS = {
    "flux_transformer": "a FLUX.1 diffusion model (BFL key names)",
    "flux_transformer_diffusers": "a FLUX.1 diffusion model (diffusers key names)",
    "qwen_image_transformer": "a Qwen-Image / Qwen-Image-Edit diffusion model",
    "sd_unet": "a Stable Diffusion / SDXL UNet",
    "wan_transformer": "a Wan video diffusion model",
    "full_checkpoint": "a full checkpoint (diffusion model, VAE and text encoders in one file)",
    "t5_encoder": "a T5 text encoder (e.g. t5xxl)",
    "clip_text": "a CLIP text encoder",
    "qwen25_vl": "a Qwen2.5-VL text encoder",
    "llm": "a language-model text encoder without a vision part",
    "ldm_vae": "a FLUX / Stable Diffusion style VAE (ae.safetensors layout)",
    "wan_vae": "a Wan 2.1 / Qwen-Image VAE",
    "wan22_vae": "a Wan 2.2 VAE",
    "lora": "a LoRA",
    "unknown": "no model FLENwheel knows",
}
_SLOT_ADVICE = {
    "diffusion_models": "ComfyUI's models/diffusion_models (or models/unet)",
    "text_encoders": "ComfyUI's models/text_encoders (or models/clip)",
    "vae": "ComfyUI's models/vae",
}


@dataclass
class FileInfo:
    """What a safetensors file holds, read from its header only."""

    path: Path
    kind: str
    prefix: str
    keys: dict[str, tuple[str, list[int]]]  # key -> (safetensors dtype, shape), prefix kept
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        return LABELS.get(self.kind, self.kind)

    @property
    def storage(self) -> str:
        """bf16, fp16, fp32, fp8_e4m3fn or fp8_scaled (the form of its largest weights)."""
        dtypes = [d for k, (d, s) in self.keys.items() if k.endswith(".weight") and len(s) >= 2]
        if any(k.endswith(_SCALE_SUFFIXES) for k in self.keys) or any(k.endswith("scaled_fp8") for k in self.keys):
            return "fp8_scaled"
        if "F8_E4M3" in dtypes:
            return "fp8_e4m3fn"
        counts = {d: dtypes.count(d) for d in set(dtypes)}
        top = max(counts, key=counts.__getitem__) if counts else "F32"
        return {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}.get(top, top.lower())

    def config(self, component: str) -> dict | None:
        """The config the file carries for ``component`` (tiny test models do), else None."""
        raw = self.metadata.get("flen_config")
        if not raw:
            return None
        try:
            return json.loads(raw).get(component)
        except ValueError as exc:
            raise FlenUserError(f"'{self.name}' has unreadable flen_config metadata ({exc}).") from exc

    def shape(self, key: str) -> list[int]:
        return self.keys[self.prefix + key][1]

    def has(self, key: str) -> bool:
        return self.prefix + key in self.keys

    def count_blocks(self, stem: str) -> int:
        pat = re.compile(re.escape(self.prefix + stem) + r"(\d+)\.")
        return len({int(m.group(1)) for k in self.keys if (m := pat.match(k))})


def read_header(path: str | Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """A safetensors header (key -> dtype, shape; metadata) with clear errors for other formats."""
    p = Path(path)
    try:
        header = safetensors_files.read_header(p)[0]
    except safetensors_files.NotSafetensors as exc:
        if exc.gguf:
            raise FlenUserError(
                f"'{p.name}' is a GGUF file (quantised with llama.cpp's format). FLENwheel's file loaders read "
                "safetensors only (bf16, fp16, fp8_e4m3fn or ComfyUI's fp8 scaled). Load a GGUF with "
                "ComfyUI-GGUF's 'Unet Loader (GGUF)' and use ComfyUI's native nodes, or download the "
                "safetensors file (see the README's model table).") from None
        if p.stat().st_size < 8:
            raise FlenUserError(f"'{p.name}' is empty or truncated; download it again.") from None
        kind = "a pickle checkpoint (.ckpt/.pt/.bin)" if p.suffix in (".ckpt", ".pt", ".pth", ".bin") else \
            "not a safetensors file"
        raise FlenUserError(f"'{p.name}' is {kind} ({exc}). FLENwheel loads .safetensors files only; download the "
                            "safetensors version of the model.") from exc
    except OSError as exc:
        raise FlenUserError(f"'{p.name}' cannot be read ({exc}); check the file and its permissions.") from exc
    meta = header.pop("__metadata__", None) or {}
    return {k: (v["dtype"], list(v["shape"])) for k, v in header.items()}, meta


def _classify(keys: dict[str, tuple[str, list[int]]]) -> tuple[str, str]:
    names = set(keys)
    has_ckpt_parts = any(k.startswith(("first_stage_model.", "cond_stage_model.", "conditioner.",
                                       "text_encoders.")) for k in names)
    prefix = ""
    for pre in DIFFUSION_PREFIXES:
        if any(k.startswith(pre) for k in names):
            prefix = pre
            break
    if prefix and has_ckpt_parts:
        return "full_checkpoint", prefix

    def has(k: str) -> bool:
        return prefix + k in names

    if any(".lora_" in k or "lora_down" in k or "lora_up" in k for k in list(names)[:5000]):
        return "lora", prefix
    if has("double_blocks.0.img_attn.qkv.weight"):
        return "flux_transformer", prefix
    if has("txt_norm.weight") and has("transformer_blocks.0.img_mod.1.weight"):
        return "qwen_image_transformer", prefix
    if has("transformer_blocks.0.attn.to_q.weight") and any(
            k.startswith(prefix + "single_transformer_blocks.") for k in names):
        return "flux_transformer_diffusers", prefix
    if has("input_blocks.0.0.weight") or any(k.startswith("model.diffusion_model.input_blocks.") for k in names):
        return "sd_unet", prefix
    if has("blocks.0.self_attn.q.weight") and has("patch_embedding.weight"):
        return "wan_transformer", prefix
    if "decoder.middle.0.residual.0.gamma" in names:
        return ("wan22_vae" if "decoder.upsamples.0.upsamples.0.residual.2.weight" in names else "wan_vae"), ""
    if "decoder.up.0.block.0.conv1.weight" in names or "first_stage_model.decoder.up.0.block.0.conv1.weight" in names:
        return "ldm_vae", ""
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in names:
        return "t5_encoder", ""
    if "text_model.encoder.layers.0.self_attn.q_proj.weight" in names:
        return "clip_text", ""
    if "model.layers.0.self_attn.q_proj.weight" in names:
        return ("qwen25_vl" if "visual.blocks.0.attn.qkv.weight" in names else "llm"), ""
    return "unknown", prefix


def inspect_file(path: str | Path) -> FileInfo:
    keys, meta = read_header(path)
    kind, prefix = _classify(keys)
    return FileInfo(Path(path), kind, prefix, keys, meta)


def _quant_check(info: FileInfo) -> None:
    dtypes = {d for d, _ in info.keys.values()}
    if "F8_E5M2" in dtypes:
        raise FlenUserError(f"'{info.name}' stores fp8_e5m2 weights; FLENwheel's file loaders take bf16, fp16, "
                            "fp8_e4m3fn and ComfyUI's fp8 scaled files. Use the fp8_e4m3fn or bf16 file instead.")
    int_weights = any(k.endswith(".weight") and d in ("U8", "I8") for k, (d, _) in info.keys.items())
    if int_weights or any(k.endswith((".absmax", ".quant_map", ".SCB")) for k in info.keys):
        raise FlenUserError(f"'{info.name}' holds bitsandbytes / int8 quantised weights, which the file loaders do "
                            "not read. Use the bf16 or fp8_e4m3fn file and choose precision 'nf4' on the diffusers "
                            "loader, or ComfyUI's native loaders for this file.")


def expect(path: str | Path, kinds: tuple[str, ...], slot: str, needed: str) -> FileInfo:
    """Inspects ``path`` and raises a FlenUserError naming the file, what it looks like and what to use, unless
    it is one of ``kinds`` in a supported storage format."""
    info = inspect_file(path)
    if info.kind not in kinds:
        where = next((f" It belongs in {_SLOT_ADVICE[s]}." for s, ks in _SLOT_KINDS.items()
                      if info.kind in ks and s != slot), "")
        raise FlenUserError(f"'{info.name}' in the {slot} slot looks like {info.label}, but this slot needs "
                            f"{needed}.{where} Pick {needed} from {_SLOT_ADVICE.get(slot, slot)}.")
    _quant_check(info)
    return info


_SLOT_KINDS = {
    "diffusion_models": ("flux_transformer", "flux_transformer_diffusers", "qwen_image_transformer", "sd_unet",
                         "wan_transformer"),
    "text_encoders": ("t5_encoder", "clip_text", "qwen25_vl", "llm"),
    "vae": ("ldm_vae", "wan_vae", "wan22_vae"),
}


def shipped_config(model: str, component: str) -> dict:
    path = CONFIG_ROOT / model / f"{component}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def config_for(info: FileInfo, model: str, component: str) -> dict:
    """The file's own config if it carries one, else the shipped full-size one."""
    own = info.config(component)
    return dict(own) if own is not None else shipped_config(model, component)


# ---- key maps: target (diffusers / transformers) key -> where it comes from in the file -----------------------

@dataclass(frozen=True)
class Source:
    key: str  # the file's key, prefix included
    rows: tuple[int, int] | None = None  # a slice of dim 0 (fused qkv → q, k, v)
    swap_halves: bool = False  # BFL's final modulation is (shift, scale); diffusers' is (scale, shift)
    squeeze: bool = False  # 1×1 conv attention weights of LDM VAEs are Linear weights in diffusers


Plan = dict[str, Source]


def identity_plan(info: FileInfo, rename: Callable[[str], str | None] = lambda k: k) -> Plan:
    plan: Plan = {}
    for key in info.keys:
        if key.endswith(_SCALE_SUFFIXES) or key.endswith("scaled_fp8"):
            continue
        short = key[len(info.prefix):] if key.startswith(info.prefix) else key
        target = rename(short)
        if target is not None:
            plan[target] = Source(key)
    return plan


def flux_bfl_plan(info: FileInfo, hidden: int) -> Plan:
    """BFL's FLUX names → diffusers' FluxTransformer2DModel names (the inverse of ``flux_to_bfl``)."""
    p = info.prefix
    plan: Plan = {}

    def put(target: str, key: str, **kw) -> None:
        if p + key in info.keys:
            plan[target] = Source(p + key, **kw)

    def both(target: str, key: str) -> None:
        for s in ("weight", "bias"):
            put(f"{target}.{s}", f"{key}.{s}")

    both("x_embedder", "img_in")
    both("context_embedder", "txt_in")
    both("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    both("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    both("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    both("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    both("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
    both("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    both("proj_out", "final_layer.linear")
    for s in ("weight", "bias"):
        put(f"norm_out.linear.{s}", f"final_layer.adaLN_modulation.1.{s}", swap_halves=True)
    for i in range(info.count_blocks("double_blocks.")):
        b, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        both(t + "norm1.linear", b + "img_mod.lin")
        both(t + "norm1_context.linear", b + "txt_mod.lin")
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for j, name in enumerate(names):
                for s in ("weight", "bias"):
                    put(f"{t}attn.{name}.{s}", f"{b}{stream}_attn.qkv.{s}", rows=(j * hidden, (j + 1) * hidden))
        put(t + "attn.norm_q.weight", b + "img_attn.norm.query_norm.scale")
        put(t + "attn.norm_k.weight", b + "img_attn.norm.key_norm.scale")
        put(t + "attn.norm_added_q.weight", b + "txt_attn.norm.query_norm.scale")
        put(t + "attn.norm_added_k.weight", b + "txt_attn.norm.key_norm.scale")
        both(t + "attn.to_out.0", b + "img_attn.proj")
        both(t + "attn.to_add_out", b + "txt_attn.proj")
        both(t + "ff.net.0.proj", b + "img_mlp.0")
        both(t + "ff.net.2", b + "img_mlp.2")
        both(t + "ff_context.net.0.proj", b + "txt_mlp.0")
        both(t + "ff_context.net.2", b + "txt_mlp.2")
    for i in range(info.count_blocks("single_blocks.")):
        b, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        both(t + "norm.linear", b + "modulation.lin")
        rows = info.shape(b + "linear1.weight")[0]
        for j, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            for s in ("weight", "bias"):
                put(f"{t}{name}.{s}", f"{b}linear1.{s}", rows=(j * hidden, (j + 1) * hidden))
        for s in ("weight", "bias"):
            put(f"{t}proj_mlp.{s}", f"{b}linear1.{s}", rows=(3 * hidden, rows))
        both(t + "proj_out", b + "linear2")
        put(t + "attn.norm_q.weight", b + "norm.query_norm.scale")
        put(t + "attn.norm_k.weight", b + "norm.key_norm.scale")
    return plan


def qwen_vl_rename(key: str) -> str | None:
    """ComfyUI's (and transformers 4.x's) Qwen2.5-VL names → transformers 5's."""
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("visual."):
        return "model.visual." + key[len("visual."):]
    return key


def wan_vae_plan(info: FileInfo) -> Plan:
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    # diffusers' own converter is a pure rename: feed it the key names and read the renaming back.
    markers = {k: torch.empty(0) for k in info.keys}
    converted = convert_wan_vae_to_diffusers(markers)
    back = {id(v): k for k, v in markers.items()}
    return {target: Source(back[id(v)]) for target, v in converted.items()}


def ldm_vae_state_dict(path: Path, info: FileInfo, config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    return convert_ldm_vae_checkpoint(load_file(str(path)), config)


# ---- streaming load ---------------------------------------------------------------------------------------------

def _replace_linear(model: nn.Module, name: str, compute_dtype: torch.dtype) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    lin = getattr(parent, child)
    setattr(parent, child, Fp8Linear(lin.in_features, lin.out_features, lin.bias is not None, compute_dtype,
                                     device="meta"))


def _fetch(f, src: Source) -> torch.Tensor:
    if src.rows is not None:
        t = f.get_slice(src.key)[src.rows[0]:src.rows[1]]
    else:
        t = f.get_tensor(src.key)
    if src.swap_halves:
        a, b = t.chunk(2, dim=0)
        t = torch.cat([b.view(torch.uint8), a.view(torch.uint8)]).view(t.dtype) if t.dtype == E4M3 else \
            torch.cat([b, a])
    if src.squeeze and t.ndim == 4:
        t = t[:, :, 0, 0]
    return t


_M = TypeVar("_M", bound=nn.Module)


def load_into(model: nn.Module, path: str | Path, info: FileInfo, plan: Plan, compute_dtype: torch.dtype,
              quantise: bool = False, keep_fp8: bool = True, skip_fp8: Iterable[str] = (),
              what: str = "this model", optional: Iterable[str] = ()) -> nn.Module:
    """Streams ``plan``'s tensors from ``path`` into ``model`` (built on the meta device).

    Linear weights the file stores as fp8_e4m3fn become ``Fp8Linear`` weights as they are, with the file's
    ``scale_weight`` (ComfyUI's scaled form) or 1 (``keep_fp8``; else they are dequantised). With ``quantise``,
    16-bit Linear weights are quantised to e4m3 as they are read (the skip patterns of ``fp8_linear``).
    Everything else is cast to ``compute_dtype``. Layers whose name matches ``skip_fp8`` are never fp8.
    """
    from safetensors import safe_open

    path = Path(path)
    skip = [re.compile(s) for s in skip_fp8]
    default_skip = [re.compile(s) for s in SKIP_PATTERNS]
    modules = dict(model.named_modules())
    linears = {n for n, m in modules.items() if type(m) is nn.Linear}
    fp8_layers: set[str] = set()
    for target, src in plan.items():
        owner, _, attr = target.rpartition(".")
        if attr != "weight" or owner not in linears or any(s.search(owner) for s in skip):
            continue
        stored = info.keys[src.key][0]
        if (stored == "F8_E4M3" and keep_fp8) or (quantise and stored != "F8_E4M3"
                                                   and not any(s.search(owner) for s in default_skip)):
            fp8_layers.add(owner)
    for name in sorted(fp8_layers):
        _replace_linear(model, name, compute_dtype)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    seen: set[str] = set()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for target, src in plan.items():
            if target not in params and target not in buffers:
                log.debug("FLENwheel: %s: ignoring %s (not part of %s)", path.name, src.key, what)
                continue
            expected = (params[target] if target in params else buffers[target]).shape
            tensor = _fetch(f, src)
            if tuple(tensor.shape) != tuple(expected):
                raise FlenUserError(
                    f"'{path.name}' holds '{src.key}' with shape {list(tensor.shape)}, but {what} needs "
                    f"{list(expected)} there: the file is a different size or variant of the model. Use the file "
                    "named in the README's model table.")
            owner_name, _, attr = target.rpartition(".")
            owner = modules[owner_name]
            scale_key = src.key.rsplit(".", 1)[0] + ".scale_weight"
            scale = f.get_tensor(scale_key).float() if scale_key in info.keys and tensor.dtype == E4M3 else None
            if isinstance(owner, Fp8Linear) and attr == "weight":
                if tensor.dtype == E4M3:
                    owner.weight = nn.Parameter(tensor.clone(), requires_grad=False)
                    owner.weight_scale = (scale.reshape(()).clone() if scale is not None
                                          else torch.ones((), dtype=torch.float32))
                else:
                    owner.set_weight(tensor.to(compute_dtype))
            else:
                if tensor.dtype == E4M3:
                    tensor = tensor.float() * (scale if scale is not None else 1.0)
                if target in buffers and target not in params:
                    dtype = buffers[target].dtype if buffers[target].dtype.is_floating_point else tensor.dtype
                    owner._buffers[attr] = tensor.to(dtype, copy=True)
                else:
                    value = tensor.to(compute_dtype, copy=True) if tensor.is_floating_point() else tensor.clone()
                    setattr(owner, attr, nn.Parameter(value, requires_grad=False))
            seen.add(target)
    optional = set(optional)
    missing = sorted(t for t in params if t not in seen and t not in optional)
    if missing:
        raise FlenUserError(
            f"'{path.name}' lacks {len(missing)} of the weights {what} needs (e.g. '{missing[0]}'): the file is "
            "incomplete or another variant of the model. Download it again or use the file the README names.")
    return model


def build_empty(factory: Callable[[], _M]) -> _M:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def finish(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


# ---- components ---------------------------------------------------------------------------------------------------

FILE_PRECISIONS = ("auto", *(p for p in PRECISIONS if p != "nf4"))  # nf4 quantises diffusers folders only


@dataclass(frozen=True)
class FileDtypes:
    compute: torch.dtype
    quantise: bool  # 16-bit diffusion-model weights → e4m3 while reading
    keep_fp8: bool  # fp8 weights of the file stay fp8


def file_dtypes(precision: str, device: torch.device) -> FileDtypes:
    """auto: the file's own storage (fp8 stays fp8, 16-bit becomes the compute dtype), computing in bf16 on a GPU
    and fp32 elsewhere; bf16 / fp32: that compute dtype (fp32 dequantises fp8 files); fp8: 16-bit diffusion-model
    weights quantised to e4m3 while reading."""
    if precision not in FILE_PRECISIONS:
        raise FlenUserError(f"Unknown precision '{precision}'; choose one of {', '.join(FILE_PRECISIONS)}.")
    gpu_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {
        "auto": FileDtypes(gpu_dtype, False, True),
        "bf16": FileDtypes(torch.bfloat16, False, True),
        "fp32": FileDtypes(torch.float32, False, False),
        "fp8": FileDtypes(gpu_dtype, True, True),
    }[precision]


def load_flux_transformer(path: str | Path, dtypes: FileDtypes) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    info = expect(path, ("flux_transformer", "flux_transformer_diffusers"), "diffusion_models",
                  "a FLUX.1 diffusion model (e.g. flux1-dev.safetensors)")
    cfg = config_for(info, FLUX_CONFIGS, "transformer")
    if info.kind == "flux_transformer":
        cfg["num_layers"] = info.count_blocks("double_blocks.")
        cfg["num_single_layers"] = info.count_blocks("single_blocks.")
        cfg["guidance_embeds"] = info.has("guidance_in.in_layer.weight")
    model = build_empty(lambda: FluxTransformer2DModel.from_config(cfg))
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    plan = flux_bfl_plan(info, hidden) if info.kind == "flux_transformer" else identity_plan(info)
    load_into(model, path, info, plan, dtypes.compute, quantise=dtypes.quantise, keep_fp8=dtypes.keep_fp8,
              what="the FLUX.1 transformer")
    return finish(model)


def load_qwen_transformer(path: str | Path, dtypes: FileDtypes) -> nn.Module:
    from diffusers import QwenImageTransformer2DModel

    info = expect(path, ("qwen_image_transformer",), "diffusion_models",
                  "a Qwen-Image-Edit-2509 diffusion model (e.g. qwen_image_edit_2509_fp8_e4m3fn.safetensors)")
    cfg = config_for(info, QWEN_EDIT_CONFIGS, "transformer")
    cfg["num_layers"] = info.count_blocks("transformer_blocks.")
    model = build_empty(lambda: QwenImageTransformer2DModel.from_config(cfg))
    load_into(model, path, info, identity_plan(info), dtypes.compute, quantise=dtypes.quantise,
              keep_fp8=dtypes.keep_fp8, what="the Qwen-Image-Edit transformer")
    return finish(model)


def load_clip_l(path: str | Path, dtypes: FileDtypes) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    info = expect(path, ("clip_text",), "text_encoders", "CLIP-L (clip_l.safetensors)")
    cfg = CLIPTextConfig(**config_for(info, FLUX_CONFIGS, "text_encoder"))
    width = info.shape("text_model.final_layer_norm.weight")[0]
    if width != cfg.hidden_size:
        raise FlenUserError(f"'{info.name}' is a CLIP text encoder {width} wide; FLUX needs CLIP-L "
                            f"({cfg.hidden_size} wide, clip_l.safetensors), not CLIP-G or another.")
    model = build_empty(lambda: CLIPTextModel(cfg))
    prefixed = any(k.startswith("text_model.") for k, _ in model.named_parameters())

    def rename(key: str) -> str | None:
        # ComfyUI's file has transformers 4.x's names; transformers 5 dropped the ``text_model.`` level
        return key if prefixed or not key.startswith("text_model.") else key[len("text_model."):]

    load_into(model, path, info, identity_plan(info, rename), dtypes.compute, keep_fp8=dtypes.keep_fp8,
              what="CLIP-L")
    return finish(model)


def load_t5(path: str | Path, dtypes: FileDtypes) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    info = expect(path, ("t5_encoder",), "text_encoders", "T5-XXL (t5xxl_fp16 or t5xxl_fp8_e4m3fn(_scaled))")
    cfg = T5Config(**config_for(info, FLUX_CONFIGS, "text_encoder_2"))
    model = build_empty(lambda: T5EncoderModel(cfg))

    def rename(key: str) -> str | None:
        return None if key == "encoder.embed_tokens.weight" else key

    # transformers runs T5's feed-forward output layer in its own weight dtype (casting activations to it):
    # it must not be an fp8 layer.
    load_into(model, path, info, identity_plan(info, rename), dtypes.compute, keep_fp8=dtypes.keep_fp8,
              skip_fp8=(r"DenseReluDense\.wo$",), what="T5-XXL", optional=("encoder.embed_tokens.weight",))
    model.encoder.embed_tokens = model.shared
    return finish(model)


def load_qwen_vl(path: str | Path, dtypes: FileDtypes) -> nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    info = expect(path, ("qwen25_vl",), "text_encoders",
                  "Qwen2.5-VL-7B (qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled.safetensors)")
    cfg = Qwen2_5_VLConfig(**config_for(info, QWEN_EDIT_CONFIGS, "text_encoder"))
    model = build_empty(lambda: Qwen2_5_VLForConditionalGeneration(cfg))
    load_into(model, path, info, identity_plan(info, qwen_vl_rename), dtypes.compute, keep_fp8=dtypes.keep_fp8,
              what="the Qwen2.5-VL text encoder", optional=("lm_head.weight",))
    if model.lm_head.weight.device.type == "meta":
        # ComfyUI's file has no language-model head; the edit uses hidden states only, so the head may share
        # the embedding (no extra memory) to keep forward() working.
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return finish(model)


def load_flux_vae(path: str | Path, dtypes: FileDtypes) -> nn.Module:
    from diffusers import AutoencoderKL

    info = expect(path, ("ldm_vae",), "vae", "FLUX's VAE (ae.safetensors)")
    cfg = config_for(info, FLUX_CONFIGS, "vae")
    channels = info.shape("decoder.conv_in.weight")[1] if info.has("decoder.conv_in.weight") else None
    if channels is not None and channels != cfg["latent_channels"]:
        raise FlenUserError(f"'{info.name}' is a VAE with {channels} latent channels (a Stable Diffusion / SDXL VAE); "
                            f"FLUX needs its own 16-channel VAE, ae.safetensors.")
    model = build_empty(lambda: AutoencoderKL.from_config(cfg))
    sd = ldm_vae_state_dict(Path(path), info, cfg)
    expected = model.state_dict()
    for key, value in sd.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise FlenUserError(f"'{info.name}' holds '{key}' with shape {list(value.shape)}, but FLUX's VAE needs "
                                f"{list(expected[key].shape)}: it is another VAE. Use ae.safetensors.")
    sd = {k: (v.float() if v.dtype == E4M3 else v).to(dtypes.compute) for k, v in sd.items()}
    missing, _ = model.load_state_dict(sd, strict=False, assign=True)
    if missing:
        raise FlenUserError(f"'{info.name}' lacks {len(missing)} of the VAE's weights (e.g. '{missing[0]}'); "
                            "use FLUX's ae.safetensors.")
    return finish(model)


def load_qwen_vae(path: str | Path, dtypes: FileDtypes) -> nn.Module:
    from diffusers import AutoencoderKLQwenImage

    info = expect(path, ("wan_vae",), "vae", "the Qwen-Image VAE (qwen_image_vae.safetensors)")
    cfg = config_for(info, QWEN_EDIT_CONFIGS, "vae")
    model = build_empty(lambda: AutoencoderKLQwenImage.from_config(cfg))
    load_into(model, path, info, wan_vae_plan(info), dtypes.compute, keep_fp8=False, what="the Qwen-Image VAE")
    return finish(model)


def tokenizer_folder(info: FileInfo, fallback: str | Path | None, what: str) -> str:
    """The tokenizer files a file carries (tiny test models) written to a temporary folder, else ``fallback``
    (ComfyUI's bundled tokenizer folder)."""
    import tempfile

    raw = info.metadata.get("flen_tokenizer")
    if raw:
        import hashlib
        import os

        # one folder per tokenizer content, reused by later loads (no growing pile of temporary folders)
        folder = Path(tempfile.gettempdir()) / f"flen_tok_{hashlib.sha256(raw.encode()).hexdigest()[:16]}"
        if not folder.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix="flen_tok_tmp_"))
            for name, text in json.loads(raw).items():
                (tmp / Path(name).name).write_text(text, encoding="utf-8")
            try:
                os.replace(tmp, folder)
            except OSError:  # another process wrote the same folder first
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return str(folder)
    if fallback is None or not Path(fallback).is_dir():
        raise FlenUserError(f"The {what} tokenizer that ComfyUI ships ({fallback}) is missing from this ComfyUI "
                            "install; update or repair ComfyUI.")
    return str(fallback)


def clip_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    # ComfyUI's bundled CLIP tokenizer declares 8192 tokens (ComfyUI chunks prompts itself); FLUX's CLIP-L has 77
    # positions and diffusers pads to the tokenizer's length.
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def t5_tokenizer(folder: str):
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(folder)


def qwen_tokenizer(folder: str):
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(folder)
