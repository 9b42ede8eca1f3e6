"""Random-weight ComfyUI split files at full width, for the GPU smoke run's ``native`` part.

    python benchmarks/native_files.py DIR flux|qwen [--depth N] [--device cuda]

Writes what ComfyUI users download, with random weights: FLUX.1-dev (fp8_e4m3fn diffusion model in BFL names,
clip_l, t5xxl fp8_e4m3fn, ae) or Qwen-Image-Edit-2509 (fp8_e4m3fn diffusion model, Qwen2.5-VL 7B fp8 scaled,
qwen_image_vae) under DIR/{diffusion_models,text_encoders,vae}/flen-random/, plus a random rank-4 LoRA per model
under DIR/loras/flen-random/. Shapes come from the configs the pack ships (engines/configs); ``--depth`` cuts every
block stack to N blocks (a quick check on a machine without a GPU: ComfyUI still lists and validates the files).
Weights are drawn tensor by tensor on ``--device`` and cast to the file's dtype at once, so host memory holds
about one file. Prints one JSON line with the files' names and sizes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUB = "flen-random"
FLUX = {"diffusion_model": "flux1-dev-random_fp8_e4m3fn.safetensors", "clip_l": "clip_l.safetensors",
        "t5xxl": "t5xxl_fp8_e4m3fn.safetensors", "vae": "ae.safetensors", "lora": "flux_random_lora.safetensors"}
QWEN = {"diffusion_model": "qwen_image_edit_2509_random_fp8_e4m3fn.safetensors",
        "text_encoder": "qwen_2.5_vl_7b_random_fp8_scaled.safetensors", "vae": "qwen_image_vae.safetensors",
        "lora": "qwen_random_lora.safetensors"}
_ONES = re.compile(r"(norm|ln_q|ln_|gamma|\.scale$)")


def _meta_state_dict(build) -> dict:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    return dict(model.state_dict())


def _fill(shapes: dict, dtype_of, device: str, seed: int) -> dict:
    """Random tensors of the shapes (norm weights 1), each cast at once to ``dtype_of(key, tensor)``."""
    import torch

    g = torch.Generator(device).manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        meta = shapes[key]
        if _ONES.search(key) and meta.ndim == 1:
            t = torch.ones(meta.shape, device=device, dtype=torch.bfloat16)
        else:
            t = torch.randn(meta.shape, generator=g, device=device, dtype=torch.bfloat16) * 0.02
        out.update({k: v.cpu() for k, v in dtype_of(key, t).items()})
    return out


def _fp8(scaled: bool):
    from tools import tiny_split_files as ts

    return lambda key, t: ts.to_fp8({key: t}, scaled=scaled)


def _cast(dtype):
    return lambda key, t: {key: t.to(dtype)}


def _lora(hidden: int, device: str) -> dict:
    import torch

    g = torch.Generator(device).manual_seed(7)
    out = {}
    def rand(*shape: int):
        return (torch.randn(*shape, generator=g, device=device) * 0.05).to(torch.bfloat16).cpu()

    for m in ("to_q", "to_k", "to_v"):
        base = f"transformer.transformer_blocks.0.attn.{m}"
        out[f"{base}.lora_A.weight"], out[f"{base}.lora_B.weight"] = rand(4, hidden), rand(hidden, 4)
    return out


def write(root: Path, arch: str, depth: int | None, device: str) -> dict:
    import torch
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel, QwenImageTransformer2DModel

    from engines import split_files as sf
    from tools import tiny_split_files as ts

    def cfg(model: str, component: str, **cut) -> dict:
        c = sf.shipped_config(model, component)
        return {**c, **({k: depth for k in cut} if depth else {})}

    files: dict[str, tuple[str, dict]] = {}
    if arch == "flux":
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        tc = cfg(sf.FLUX_CONFIGS, "transformer", num_layers=1, num_single_layers=1)
        shapes = _meta_state_dict(lambda: FluxTransformer2DModel.from_config(tc))
        bfl = ts.flux_to_bfl(shapes, tc["num_layers"], tc["num_single_layers"])
        files["diffusion_model"] = ("diffusion_models", _fill(bfl, _fp8(False), device, 0))
        clip_cfg = CLIPTextConfig(**cfg(sf.FLUX_CONFIGS, "text_encoder", num_hidden_layers=1))
        clip = {("" if k.startswith("text_model.") else "text_model.") + k: v
                for k, v in _meta_state_dict(lambda: CLIPTextModel(clip_cfg)).items() if "position_ids" not in k}
        files["clip_l"] = ("text_encoders", _fill(clip, _cast(torch.float16), device, 1))
        t5_cfg = T5Config(**cfg(sf.FLUX_CONFIGS, "text_encoder_2", num_layers=1))
        t5 = {k: v for k, v in _meta_state_dict(lambda: T5EncoderModel(t5_cfg)).items()
              if k != "encoder.embed_tokens.weight"}
        files["t5xxl"] = ("text_encoders", _fill(t5, _fp8(False), device, 2))
        vc = sf.shipped_config(sf.FLUX_CONFIGS, "vae")
        vae = ts.ldm_vae_from_diffusers(_meta_state_dict(lambda: AutoencoderKL.from_config(vc)),
                                        len(vc["block_out_channels"]))
        files["vae"] = ("vae", _fill(vae, _cast(torch.float32), device, 3))
        hidden = tc["num_attention_heads"] * tc["attention_head_dim"]
        names = FLUX
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        tc = cfg(sf.QWEN_EDIT_CONFIGS, "transformer", num_layers=1)
        shapes = _meta_state_dict(lambda: QwenImageTransformer2DModel.from_config(tc))
        files["diffusion_model"] = ("diffusion_models", _fill(shapes, _fp8(False), device, 0))
        te = sf.shipped_config(sf.QWEN_EDIT_CONFIGS, "text_encoder")
        if depth:
            te = {**te, "text_config": {**te["text_config"], "num_hidden_layers": depth},
                  "vision_config": {**te["vision_config"], "depth": depth, "fullatt_block_indexes": [depth - 1]}}
        te_cfg = Qwen2_5_VLConfig(**te)
        vl = ts.qwen_vl_to_comfy(_meta_state_dict(lambda: Qwen2_5_VLForConditionalGeneration(te_cfg)))
        files["text_encoder"] = ("text_encoders", _fill(vl, _fp8(True), device, 1))
        vc = sf.shipped_config(sf.QWEN_EDIT_CONFIGS, "vae")
        vae = ts.wan_vae_from_diffusers(_meta_state_dict(lambda: AutoencoderKLQwenImage.from_config(vc)))
        files["vae"] = ("vae", _fill(vae, _cast(torch.bfloat16), device, 3))
        hidden = tc["num_attention_heads"] * tc["attention_head_dim"]
        names = QWEN
    files["lora"] = ("loras", _lora(hidden, device))
    report = {"arch": arch, "depth": depth or "full"}
    for key, (folder, sd) in files.items():
        path = root / folder / SUB / names[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        ts.write_safetensors(path, sd, {})
        report[key] = {"name": f"{SUB}/{names[key]}", "mib": round(path.stat().st_size / 2**20)}
        sd.clear()
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("arch", choices=["flux", "qwen"])
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    print(json.dumps(write(a.root, a.arch, a.depth, a.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
