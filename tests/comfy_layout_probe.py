"""Run in a subprocess (ComfyUI on sys.path): do the tiny kit's split files have ComfyUI's own layout?

argv: COMFYUI_PATH MODELS_DIR. Prints one JSON line.

Each tiny diffusion-model file goes the way ComfyUI's UNETLoader takes it (``comfy.sd.load_diffusion_model``:
``load_torch_file``, the prefix check, ``model_detection.model_config_from_unet``, which also recognises the fp8
"scaled" form), up to one step: ComfyUI 0.3.64's detector hard-codes the full models' widths (FLUX 3072 wide with
4096-wide context, Qwen-Image 24×128 heads), so a tiny file cannot get through ``UNETLoader`` itself. The probe
sets those widths from the file's own config, builds ComfyUI's model from the detected config and loads the file
strictly (no missing or unexpected key, every shape equal); for FLUX it then compares ComfyUI's forward with the
diffusers transformer's forward on the same inputs (BFL names are the ones that need a key map). The tiny Qwen VAE
loads strictly into ComfyUI's WanVAE.
"""

import json
import sys

comfy_path, models_dir = sys.argv[1:3]
sys.path.insert(0, comfy_path)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import comfy.ldm.wan.vae  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

DM = f"{models_dir}/diffusion_models/flen-tiny"
FLUX = ["flux1-dev-tiny.safetensors", "flux1-dev-tiny_fp8_e4m3fn.safetensors", "flux1-dev-tiny_fp8_scaled.safetensors"]
QWEN = ["qwen_image_edit_2509_tiny_bf16.safetensors", "qwen_image_edit_2509_tiny_fp8_e4m3fn.safetensors",
        "qwen_image_edit_2509_tiny_fp8_scaled.safetensors"]


def own_config(path: str) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["flen_config"])["transformer"]


def comfy_model(path: str):
    """ComfyUI's load_diffusion_model_state_dict, with the hard-coded widths replaced by the file's."""
    sd = comfy.utils.load_torch_file(path)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
    model_config = comfy.model_detection.model_config_from_unet(sd, "")
    assert model_config is not None, f"ComfyUI does not recognise {path}"
    cfg = own_config(path)
    uc = model_config.unet_config
    if uc["image_model"] == "flux":
        uc.update(hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                  num_heads=cfg["num_attention_heads"], context_in_dim=cfg["joint_attention_dim"],
                  axes_dim=cfg["axes_dims_rope"], out_channels=uc["in_channels"])
    else:
        uc.update({k: cfg[k] for k in ("patch_size", "out_channels", "attention_head_dim", "num_attention_heads",
                                       "joint_attention_dim", "axes_dims_rope")})
    scaled = model_config.scaled_fp8
    weight_dtype = comfy.utils.weight_dtype(sd)
    dtype = torch.float8_e4m3fn if weight_dtype == torch.float8_e4m3fn or scaled is not None else torch.float32
    model_config.set_inference_dtype(dtype, torch.float32)
    model = model_config.get_model(sd, "")
    net = model.diffusion_model
    result = net.load_state_dict(model_config.process_unet_state_dict(dict(sd)), strict=False)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    shapes_ok = all(tuple(sd[k].shape) == expected[k] for k in sd if k in expected)
    return model, {"image_model": uc["image_model"], "class": type(model).__name__,
                   "scaled_fp8": str(scaled) if scaled is not None else None,
                   "missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys),
                   "shapes_ok": shapes_ok, "fp8_weights": sum(1 for v in net.state_dict().values()
                                                              if v.dtype == torch.float8_e4m3fn)}


def flux_forward_difference(model, path: str) -> float:
    """ComfyUI's FLUX forward against diffusers' on the tiny diffusers folder, same inputs."""
    from diffusers import FluxTransformer2DModel

    ref = FluxTransformer2DModel.from_pretrained(f"{models_dir}/diffusers/flen-tiny-flux/transformer").eval()
    cfg = ref.config
    torch.manual_seed(0)
    c = cfg.in_channels // 4
    x = torch.randn(1, c, 8, 8)
    context = torch.randn(1, 5, cfg.joint_attention_dim)
    y = torch.randn(1, cfg.pooled_projection_dim)
    t = torch.tensor([0.7])
    g = torch.tensor([3.5])
    with torch.no_grad():
        native = model.diffusion_model(x, t, context, y=y, guidance=g if cfg.guidance_embeds else None).float()
        packed = x.view(1, c, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, c * 4)
        ids = torch.zeros(4, 4, 3)
        ids[..., 1] = torch.arange(4)[:, None]
        ids[..., 2] = torch.arange(4)[None, :]
        out = ref(hidden_states=packed, encoder_hidden_states=context, pooled_projections=y, timestep=t,
                  img_ids=ids.reshape(16, 3), txt_ids=torch.zeros(5, 3),
                  guidance=g if cfg.guidance_embeds else None).sample
        out = out.view(1, 4, 4, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, c, 8, 8)
    return float((native - out).abs().max())


report = {}
for name in FLUX + QWEN:
    path = f"{DM}/{name}"
    model, info = comfy_model(path)
    if name == FLUX[0]:
        info["forward_max_diff"] = flux_forward_difference(model, path)
    report[name] = info

vae_sd = comfy.utils.load_torch_file(f"{models_dir}/vae/flen-tiny/qwen_image_vae_tiny.safetensors")
with safe_open(f"{models_dir}/vae/flen-tiny/qwen_image_vae_tiny.safetensors", "pt") as f:
    vcfg = json.loads(f.metadata()["flen_config"])["vae"]
wan = comfy.ldm.wan.vae.WanVAE(dim=vcfg["base_dim"], z_dim=vcfg["z_dim"], dim_mult=vcfg["dim_mult"],
                               num_res_blocks=vcfg["num_res_blocks"], attn_scales=vcfg["attn_scales"],
                               temperal_downsample=vcfg["temperal_downsample"], dropout=0.0)
r = wan.load_state_dict(vae_sd, strict=False)
report["qwen_image_vae_tiny.safetensors"] = {"missing": list(r.missing_keys), "unexpected": list(r.unexpected_keys)}
print(json.dumps(report))
