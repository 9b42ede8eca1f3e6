"""Writes one reference LoRA in the layouts the training tools use (test material, no pack imports).

A reference is ``{diffusers module: (down, up, alpha)}`` for a target transformer; its effect on a module is
``alpha / rank · up · down``. Each writer expresses exactly that effect in its layout: where a layout has no
alpha the scale is folded into ``up``; BFL-named FLUX files fuse q/k/v (and the single blocks' MLP) into
one module with a block-diagonal ``up``. Scales are powers of two and values are rounded to the file's dtype
first, so every conversion is exact.

The BFL table here is written independently of engines/lora_formats.py; the native probe checks the same
files against ComfyUI's own mapping.
"""

from __future__ import annotations

import json

import torch

# For FLUX, the ComfyUI and kohya layouts use BFL names (as those tools write FLUX files); "diffusers_*"
# are the same pairs under diffusers names, which some trainers write.
FLUX_ONLY = ("diffusers_comfy_ab", "diffusers_kohya_fp16", "onetrainer", "xlabs")
BOTH = ("peft", "peft_metadata", "peft_alpha", "peft_lora_dot", "comfy_ab", "comfy_down_alpha", "kohya_fp16",
        "noprefix_down_alpha_bf16", "noprefix_ab", "diffsynth")


def layouts(arch: str) -> tuple[str, ...]:
    return BOTH + (FLUX_ONLY if arch == "flux" else ())


def make_reference(linears: dict[str, tuple[int, int]], seed: int, magnitude: float = 0.1):
    """Every linear module gets a LoRA; ranks 2 or 4 and alphas that make scales 0.5, 1 or 2."""
    g = torch.Generator().manual_seed(seed)
    ref = {}
    for i, (name, (fan_in, fan_out)) in enumerate(sorted(linears.items())):
        rank = 4 if i % 5 else 2
        alpha = rank * (0.5, 1.0, 2.0)[i % 3]
        down = torch.randn(rank, fan_in, generator=g) * magnitude
        up = torch.randn(fan_out, rank, generator=g) * magnitude
        ref[name] = (down, up, alpha)
    return ref


def rounded(ref, dtype):
    return {n: (d.to(dtype).float(), u.to(dtype).float(), a) for n, (d, u, a) in ref.items()}


def deltas(ref, modules=None) -> dict[str, torch.Tensor]:
    return {n: (a / d.shape[0]) * (u @ d) for n, (d, u, a) in ref.items() if modules is None or n in modules}


def _bfl_groups(linears):
    """BFL module -> (diffusers modules whose rows it stacks, swap halves)."""
    groups = {}
    i = 0
    while f"transformer_blocks.{i}.attn.to_q" in linears:
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        groups[f"{b}.img_attn.qkv"] = [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"]
        groups[f"{b}.txt_attn.qkv"] = [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"]
        groups[f"{b}.img_attn.proj"] = [f"{d}.attn.to_out.0"]
        groups[f"{b}.txt_attn.proj"] = [f"{d}.attn.to_add_out"]
        groups[f"{b}.img_mlp.0"] = [f"{d}.ff.net.0.proj"]
        groups[f"{b}.img_mlp.2"] = [f"{d}.ff.net.2"]
        groups[f"{b}.txt_mlp.0"] = [f"{d}.ff_context.net.0.proj"]
        groups[f"{b}.txt_mlp.2"] = [f"{d}.ff_context.net.2"]
        groups[f"{b}.img_mod.lin"] = [f"{d}.norm1.linear"]
        groups[f"{b}.txt_mod.lin"] = [f"{d}.norm1_context.linear"]
        i += 1
    i = 0
    while f"single_transformer_blocks.{i}.attn.to_q" in linears:
        s, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        groups[f"{b}.linear1"] = [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"]
        groups[f"{b}.linear2"] = [f"{s}.proj_out"]
        groups[f"{b}.modulation.lin"] = [f"{s}.norm.linear"]
        i += 1
    groups.update({
        "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
        "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
        "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
        "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
        "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
        "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
        "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
        "final_layer.linear": ["proj_out"],
        "final_layer.adaLN_modulation.1": ["norm_out.linear"],  # (shift, scale) vs diffusers' (scale, shift)
    })
    return {k: v for k, v in groups.items() if all(n in linears for n in v)}


def _to_bfl(ref, linears):
    """The reference as BFL-named modules (down, up, alpha): fused groups get a block-diagonal up at
    scale 2 (alpha = 2 · rank)."""
    out = {}
    for bfl, parts in _bfl_groups(linears).items():
        if len(parts) == 1:
            d, u, a = ref[parts[0]]
            if bfl == "final_layer.adaLN_modulation.1":
                h = u.shape[0] // 2
                u = torch.cat([u[h:], u[:h]])
            out[bfl] = (d, u, a)
            continue
        downs = [ref[p][0] for p in parts]
        rank = sum(d.shape[0] for d in downs)
        up = torch.zeros(sum(ref[p][1].shape[0] for p in parts), rank)
        row = col = 0
        for p in parts:
            d, u, a = ref[p]
            up[row:row + u.shape[0], col:col + d.shape[0]] = u * (a / d.shape[0]) / 2.0
            row, col = row + u.shape[0], col + d.shape[0]
        out[bfl] = (torch.cat(downs), up, 2.0 * rank)
    return out


def _xlabs(ref, linears):
    """XLabs covers the double blocks' attention only: returns (bfl-like modules, covered diffusers modules)."""
    groups = _bfl_groups(linears)
    names = {}
    i = 0
    while f"double_blocks.{i}.img_attn.qkv" in groups:
        b = f"double_blocks.{i}"
        names[f"{b}.processor.qkv_lora1"] = f"{b}.img_attn.qkv"
        names[f"{b}.processor.qkv_lora2"] = f"{b}.txt_attn.qkv"
        names[f"{b}.processor.proj_lora1"] = f"{b}.img_attn.proj"
        names[f"{b}.processor.proj_lora2"] = f"{b}.txt_attn.proj"
        i += 1
    bfl = _to_bfl(ref, linears)
    covered = {p for x in names.values() for p in groups[x]}
    return {x: bfl[src] for x, src in names.items()}, covered


def write_layout(layout: str, ref, linears, arch: str):
    """(tensors, metadata, covered diffusers modules, dtype) of ``ref`` in ``layout``."""
    dtype = {"kohya_fp16": torch.float16, "diffusers_kohya_fp16": torch.float16,
             "noprefix_down_alpha_bf16": torch.bfloat16}.get(layout, torch.float32)
    ref = rounded(ref, dtype)
    covered = set(ref)
    meta: dict[str, str] = {"format": "pt"}
    if layout == "xlabs":
        modules, covered = _xlabs(ref, linears)
    elif arch == "flux" and layout in ("comfy_ab", "comfy_down_alpha", "kohya_fp16"):
        modules = _to_bfl(ref, linears)
    else:
        modules = ref
    with_alpha = layout in ("peft_alpha", "comfy_down_alpha", "kohya_fp16", "noprefix_down_alpha_bf16",
                            "diffusers_kohya_fp16", "onetrainer")
    pair = {"comfy_down_alpha": ("lora_down", "lora_up"), "kohya_fp16": ("lora_down", "lora_up"),
            "noprefix_down_alpha_bf16": ("lora_down", "lora_up"), "diffusers_kohya_fp16": ("lora_down", "lora_up"),
            "onetrainer": ("lora_down", "lora_up"),
            "peft_lora_dot": ("lora.down", "lora.up"), "diffsynth": ("lora_A.default", "lora_B.default"),
            "xlabs": ("down", "up")}.get(layout, ("lora_A", "lora_B"))

    def key(name: str) -> str:
        if layout in ("peft", "peft_metadata", "peft_alpha", "peft_lora_dot"):
            return f"transformer.{name}"
        if layout in ("comfy_ab", "comfy_down_alpha", "diffusers_comfy_ab"):
            return f"diffusion_model.{name}"
        if layout in ("kohya_fp16", "diffusers_kohya_fp16"):
            return "lora_unet_" + name.replace(".", "_")
        if layout == "onetrainer":
            return "lora_transformer_" + name.replace(".", "_")
        return name

    metadata_alpha = 8.0
    alpha_pattern = {}
    tensors = {}
    for name, (d, u, a) in modules.items():
        rank = d.shape[0]
        if with_alpha:
            file_scale = a / rank
            tensors[f"{key(name)}.alpha"] = torch.tensor(a, dtype=dtype)
        elif layout == "peft_metadata":
            alpha = a if a == rank else metadata_alpha  # one module keeps its own alpha via alpha_pattern
            if a == rank:
                alpha_pattern[f"^{name}"] = a  # anchored: peft matches patterns at a path's end
            file_scale = alpha / rank
        else:
            file_scale = 1.0
        tensors[f"{key(name)}.{pair[0]}.weight"] = d.to(dtype).contiguous()
        tensors[f"{key(name)}.{pair[1]}.weight"] = (u * ((a / rank) / file_scale)).to(dtype).contiguous()
    if layout == "peft_metadata":
        meta["lora_adapter_metadata"] = json.dumps({"transformer.r": 4, "transformer.lora_alpha": metadata_alpha,
                                                    "transformer.alpha_pattern": alpha_pattern,
                                                    "transformer.use_rslora": False})
    return tensors, meta, covered, dtype
