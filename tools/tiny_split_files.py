"""The tiny models as ComfyUI split files: ComfyUI's key names and dtypes, fp8 variants too.

Same weights as the tiny diffusers folders (the kit rounds them to bf16 values, so a bf16 file holds them
exactly), written into ``diffusion_models/``, ``text_encoders/`` and ``vae/`` of a models folder. FLUX uses BFL's
names, the Qwen-Image VAE Wan 2.1's, the text encoders their original Hugging Face names (Qwen2.5-VL as
transformers 4.x and ComfyUI name it: ``model.…`` and ``visual.…``, no ``lm_head``). Each file carries its
tiny architecture config (``flen_config`` metadata; full-size configs ship in ``engines/configs``) and the
text encoders their trained tokenizer (``flen_tokenizer``), since ComfyUI's bundled tokenizers are the real ones.
Nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

SPLIT_DIRNAME = "flen-tiny"
FLUX_FILES = {
    "diffusion_model": "flux1-dev-tiny.safetensors",
    "diffusion_model_fp8": "flux1-dev-tiny_fp8_e4m3fn.safetensors",
    "diffusion_model_fp8_scaled": "flux1-dev-tiny_fp8_scaled.safetensors",
    "clip_l": "clip_l_tiny.safetensors",
    "t5xxl": "t5xxl_tiny_bf16.safetensors",
    "t5xxl_fp8_scaled": "t5xxl_tiny_fp8_e4m3fn_scaled.safetensors",
    "vae": "ae_tiny.safetensors",
}
QWEN_FILES = {
    "diffusion_model": "qwen_image_edit_2509_tiny_bf16.safetensors",
    "diffusion_model_fp8": "qwen_image_edit_2509_tiny_fp8_e4m3fn.safetensors",
    "diffusion_model_fp8_scaled": "qwen_image_edit_2509_tiny_fp8_scaled.safetensors",
    "text_encoder": "qwen_2.5_vl_tiny.safetensors",
    "text_encoder_fp8_scaled": "qwen_2.5_vl_tiny_fp8_scaled.safetensors",
    "vae": "qwen_image_vae_tiny.safetensors",
}
FOLDER_OF = {"diffusion_model": "diffusion_models", "clip_l": "text_encoders", "t5xxl": "text_encoders",
             "text_encoder": "text_encoders", "vae": "vae"}
_DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float8_e4m3fn": "F8_E4M3"}
# Layers ComfyUI's fp8 files keep in 16 bits: embeddings, norms, the outer projections.
_FP8_KEEP = re.compile(r"(embed|shared|norm|img_in|txt_in|final_layer|time_in|vector_in|guidance_in|"
                       r"time_text_embed|proj_out|patch_embed|merger|lm_head|relative_attention_bias)")


def relative_path(kind: str, files: dict[str, str], key: str) -> str:
    """The name ComfyUI's loaders list for a file (``flen-tiny/<file>``)."""
    return f"{SPLIT_DIRNAME}/{files[key]}"


def folder_of(key: str) -> str:
    return FOLDER_OF[key.split("_fp8")[0]]


# ---- diffusers → ComfyUI names --------------------------------------------------------------------------------------

def flux_to_bfl(sd: dict, num_layers: int, num_single_layers: int) -> dict:
    import torch

    out: dict = {}

    def mv(src: str, dst: str) -> None:
        for s in ("weight", "bias"):
            if f"{src}.{s}" in sd:
                out[f"{dst}.{s}"] = sd[f"{src}.{s}"]

    def cat(srcs: list[str], dst: str) -> None:
        for s in ("weight", "bias"):
            out[f"{dst}.{s}"] = torch.cat([sd[f"{x}.{s}"] for x in srcs])

    mv("x_embedder", "img_in")
    mv("context_embedder", "txt_in")
    mv("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    mv("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    mv("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    mv("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    mv("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
    mv("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    mv("proj_out", "final_layer.linear")
    for s in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{s}"].chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
    for i in range(num_layers):
        t, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        mv(t + "norm1.linear", b + "img_mod.lin")
        mv(t + "norm1_context.linear", b + "txt_mod.lin")
        cat([t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"], b + "img_attn.qkv")
        cat([t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"], b + "txt_attn.qkv")
        out[b + "img_attn.norm.query_norm.scale"] = sd[t + "attn.norm_q.weight"]
        out[b + "img_attn.norm.key_norm.scale"] = sd[t + "attn.norm_k.weight"]
        out[b + "txt_attn.norm.query_norm.scale"] = sd[t + "attn.norm_added_q.weight"]
        out[b + "txt_attn.norm.key_norm.scale"] = sd[t + "attn.norm_added_k.weight"]
        mv(t + "attn.to_out.0", b + "img_attn.proj")
        mv(t + "attn.to_add_out", b + "txt_attn.proj")
        mv(t + "ff.net.0.proj", b + "img_mlp.0")
        mv(t + "ff.net.2", b + "img_mlp.2")
        mv(t + "ff_context.net.0.proj", b + "txt_mlp.0")
        mv(t + "ff_context.net.2", b + "txt_mlp.2")
    for i in range(num_single_layers):
        t, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        mv(t + "norm.linear", b + "modulation.lin")
        cat([t + "attn.to_q", t + "attn.to_k", t + "attn.to_v", t + "proj_mlp"], b + "linear1")
        mv(t + "proj_out", b + "linear2")
        out[b + "norm.query_norm.scale"] = sd[t + "attn.norm_q.weight"]
        out[b + "norm.key_norm.scale"] = sd[t + "attn.norm_k.weight"]
    return out


def ldm_vae_from_diffusers(sd: dict, num_blocks: int) -> dict:
    """diffusers AutoencoderKL names → the LDM / BFL ``ae.safetensors`` names (attention as 1×1 convs)."""
    out: dict = {}
    for key, value in sd.items():
        k = key
        k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        m = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.*)", k)
        if m:
            i, part, j, rest = m.groups()
            k = f"encoder.down.{i}.block.{j}.{rest}" if part == "resnets" else f"encoder.down.{i}.downsample.{rest}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", k)
        if m:
            i, part, j, rest = m.groups()
            bid = num_blocks - 1 - int(i)
            k = f"decoder.up.{bid}.block.{j}.{rest}" if part == "resnets" else f"decoder.up.{bid}.upsample.{rest}"
        m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", k)
        if m:
            k = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", k)
        if m:
            rest = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
            head, _, tail = m.group(2).rpartition(".")
            k = f"{m.group(1)}.mid.attn_1.{rest[head]}.{tail}"
            if tail == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        out[k] = value
    return out


_RES = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
        "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
        "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def wan_vae_from_diffusers(sd: dict) -> dict:
    """diffusers AutoencoderKLQwenImage names → Wan 2.1's (ComfyUI's ``qwen_image_vae.safetensors``); the inverse
    of diffusers' ``convert_wan_vae_to_diffusers`` for its layout (4 levels, 2 residual blocks each)."""
    fixed = {"encoder.conv_in": "encoder.conv1", "decoder.conv_in": "decoder.conv1", "quant_conv": "conv1",
             "post_quant_conv": "conv2", "encoder.conv_out": "encoder.head.2", "decoder.conv_out": "decoder.head.2"}
    out: dict = {}
    for key, value in sd.items():
        stem, _, tail = key.rpartition(".")
        if stem in fixed:
            out[f"{fixed[stem]}.{tail}"] = value
            continue
        m = re.match(r"(encoder|decoder)\.norm_out\.gamma$", key)
        if m:
            out[f"{m.group(1)}.head.0.gamma"] = value
            continue
        m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)$", key)
        if m:
            out[f"{m.group(1)}.middle.{2 * int(m.group(2))}.{_RES[m.group(3)]}"] = value
            continue
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)$", key)
        if m:
            out[f"{m.group(1)}.middle.1.{m.group(2)}"] = value
            continue
        m = re.match(r"encoder\.down_blocks\.(\d+)\.(.*)$", key)
        if m:
            rest = m.group(2)
            out[f"encoder.downsamples.{m.group(1)}.{_RES.get(rest, rest)}"] = value
            continue
        m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", key)
        if m:
            out[f"decoder.upsamples.{4 * int(m.group(1)) + int(m.group(2))}.{_RES[m.group(3)]}"] = value
            continue
        m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", key)
        if m:
            out[f"decoder.upsamples.{4 * int(m.group(1)) + 3}.{m.group(2)}"] = value
            continue
        out[key] = value
    return out


def qwen_vl_to_comfy(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        if key.startswith("model.language_model."):
            out["model." + key[len("model.language_model."):]] = value
        elif key.startswith("model.visual."):
            out["visual." + key[len("model.visual."):]] = value
        # ComfyUI's Qwen2.5-VL file has no language-model head
    return out


# ---- dtypes and writing ----------------------------------------------------------------------------------------------

def to_fp8(sd: dict, scaled: bool) -> dict:
    """ComfyUI's two fp8 forms: fp8_e4m3fn (a plain cast) and scaled (weight / scale_weight, a ``scaled_fp8``
    marker). Embeddings, norms and outer projections stay 16-bit, as in ComfyUI's files."""
    import torch

    out = {}
    for key, value in sd.items():
        if key.endswith(".weight") and value.ndim == 2 and not _FP8_KEEP.search(key):
            if scaled:
                scale = (value.float().abs().amax() / 448.0).clamp(min=1e-12)
                out[key] = (value.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
                out[key[:-len(".weight")] + ".scale_weight"] = scale.reshape(())
            else:
                out[key] = value.float().clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            out[key] = value
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def write_safetensors(path: Path, sd: dict, metadata: dict[str, str]) -> None:
    """Byte-for-byte deterministic safetensors (sorted keys and metadata), any of bf16/fp16/fp32/e4m3."""
    import torch

    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": _DTYPE_NAMES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for data in blobs:
            fh.write(data)
    tmp.replace(path)


def _cast(sd: dict, dtype) -> dict:
    return {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _config_meta(**components) -> dict[str, str]:
    return {"flen_config": json.dumps(components, sort_keys=True, default=list)}


def _tokenizer_meta(tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return {"flen_tokenizer": json.dumps(files, sort_keys=True)}


def _plain_config(model) -> dict:
    cfg = dict(model.config)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _hf_config(model) -> dict:
    d = model.config.to_dict()
    for k in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(k, None)
    for sub in ("text_config", "vision_config"):
        if isinstance(d.get(sub), dict):
            for k in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
                d[sub].pop(k, None)
    return d


def write_flux(pipe, models_dir: Path) -> dict[str, Path]:
    import torch

    t = pipe.transformer
    bfl = flux_to_bfl(t.state_dict(), t.config.num_layers, t.config.num_single_layers)
    tmeta = _config_meta(transformer=_plain_config(t), scheduler=_plain_config(pipe.scheduler))
    # ComfyUI's clip_l.safetensors keeps transformers 4.x's ``text_model.`` prefix
    clip_sd = {k if k.startswith("text_model.") else "text_model." + k: v
               for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("embeddings.position_ids")}
    t5_sd = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    vae = pipe.vae
    vae_sd = ldm_vae_from_diffusers(vae.state_dict(), len(vae.config.block_out_channels))
    te_meta = {**_config_meta(text_encoder=_hf_config(pipe.text_encoder)), **_tokenizer_meta(pipe.tokenizer)}
    t5_meta = {**_config_meta(text_encoder_2=_hf_config(pipe.text_encoder_2)), **_tokenizer_meta(pipe.tokenizer_2)}
    items = {
        "diffusion_model": (_cast(bfl, torch.bfloat16), tmeta),
        "diffusion_model_fp8": (to_fp8(_cast(bfl, torch.bfloat16), scaled=False), tmeta),
        "diffusion_model_fp8_scaled": (to_fp8(_cast(bfl, torch.bfloat16), scaled=True), tmeta),
        "clip_l": (_cast(clip_sd, torch.bfloat16), te_meta),
        "t5xxl": (_cast(t5_sd, torch.bfloat16), t5_meta),
        "t5xxl_fp8_scaled": (to_fp8(_cast(t5_sd, torch.bfloat16), scaled=True), t5_meta),
        "vae": (_cast(vae_sd, torch.float32), _config_meta(vae=_plain_config(vae))),  # BFL's ae is fp32
    }
    return _write_all(models_dir, FLUX_FILES, items)


def write_qwen_edit(pipe, models_dir: Path) -> dict[str, Path]:
    import torch

    t = pipe.transformer
    tsd = _cast(t.state_dict(), torch.bfloat16)
    tmeta = _config_meta(transformer=_plain_config(t), scheduler=_plain_config(pipe.scheduler))
    te_sd = _cast(qwen_vl_to_comfy(pipe.text_encoder.state_dict()), torch.bfloat16)
    te_meta = {**_config_meta(text_encoder=_hf_config(pipe.text_encoder)), **_tokenizer_meta(pipe.tokenizer)}
    vae = pipe.vae
    items = {
        "diffusion_model": (tsd, tmeta),
        "diffusion_model_fp8": (to_fp8(tsd, scaled=False), tmeta),
        "diffusion_model_fp8_scaled": (to_fp8(tsd, scaled=True), tmeta),
        "text_encoder": (te_sd, te_meta),
        "text_encoder_fp8_scaled": (to_fp8(te_sd, scaled=True), te_meta),
        "vae": (_cast(wan_vae_from_diffusers(vae.state_dict()), torch.bfloat16), _config_meta(vae=_plain_config(vae))),
    }
    return _write_all(models_dir, QWEN_FILES, items)


def _write_all(models_dir: Path, names: dict[str, str], items: dict) -> dict[str, Path]:
    paths = {}
    for key, (sd, meta) in items.items():
        folder = models_dir / folder_of(key) / SPLIT_DIRNAME
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / names[key]
        write_safetensors(path, sd, meta)
        paths[key] = path
    return paths


# ---- a Qwen2.5-VL file with its language-model head (captioning from a split file) ------------------------------

QWEN_VL_WITH_HEAD = "qwen_2.5_vl_tiny_with_lm_head.safetensors"


def write_qwen_vl_with_head(models_dir: Path, qwen_edit_folder: Path) -> Path:
    """ComfyUI's layout of the tiny Qwen2.5-VL plus ``lm_head.weight`` from the diffusers folder's text encoder:
    the form of a full Qwen2.5-VL-Instruct file, which the captioner can generate from."""
    from safetensors import safe_open

    src = models_dir / folder_of("text_encoder") / SPLIT_DIRNAME / QWEN_FILES["text_encoder"]
    with safe_open(str(src), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata() or {})
    with safe_open(str(Path(qwen_edit_folder) / "text_encoder" / "model.safetensors"), framework="pt") as f:
        sd["lm_head.weight"] = f.get_tensor("lm_head.weight").to(sd[next(iter(sd))].dtype)
    out = src.parent / QWEN_VL_WITH_HEAD
    write_safetensors(out, sd, meta)
    return out
