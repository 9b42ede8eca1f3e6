"""Run in a subprocess (ComfyUI on sys.path): compares FLENApplyLoraStack with LoraLoaderModelOnly.

argv: COMFYUI_PATH PACK_PARENT MODELS_DIR. Prints one JSON line with the comparison.

argv: COMFYUI_PATH PACK_PARENT MODELS_DIR --trained LORA_FILE flux|qwen_image: instead, checks a LoRA the
pack's trainers wrote against the native ComfyUI model of that tiny transformer: which of its keys
ComfyUI's own key mapping leaves unused, and the largest difference between ComfyUI's patched weights and
diffusers' fused weights (``load_lora_weights`` + ``fuse_lora``), compared under ComfyUI's key names.
"""

import json
import sys

comfy_path, pack_parent, models_dir = sys.argv[1:4]
sys.path[:0] = [comfy_path, pack_parent]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import folder_paths  # noqa: E402

folder_paths.add_model_folder_path("loras", f"{models_dir}/loras", is_default=True)
import comfy.model_detection  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from FLENwheel.engines.errors import FlenUserError  # noqa: E402
from FLENwheel.engines.lora_stack import LoraEntry, LoraStack  # noqa: E402
from FLENwheel.nodes.lora_stack_nodes import FLENApplyLoraStack  # noqa: E402

import nodes  # noqa: E402  (ComfyUI's own nodes.py)


def build_native(arch="flux"):
    """The native ComfyUI model of a tiny transformer. ComfyUI's detector hard-codes FLUX.1's full width
    (3072), so the tiny transformer is built the way ComfyUI builds FLUX, with the widths taken from its
    diffusers config."""
    tdir = f"{models_dir}/diffusers/{'flen-tiny-flux' if arch == 'flux' else 'flen-tiny-qwen-image-edit'}/transformer"
    cfg = json.load(open(f"{tdir}/config.json"))
    if arch == "qwen_image":  # ComfyUI's Qwen-Image keeps diffusers' key names; widths from the config
        sd = comfy.utils.load_torch_file(f"{tdir}/diffusion_pytorch_model.safetensors", safe_load=True)
        unet_config = comfy.model_detection.detect_unet_config(sd, "")
        unet_config.update({k: cfg[k] for k in ("patch_size", "out_channels", "attention_head_dim",
                                                  "num_attention_heads", "joint_attention_dim", "axes_dims_rope",
                                                  "guidance_embeds")})
        model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
        native = model_config.get_model(sd, "")
        native.load_model_weights(sd, "")
        return comfy.model_patcher.ModelPatcher(native, load_device=torch.device("cpu"),
                                                offload_device=torch.device("cpu")), tdir
    sd = comfy.model_detection.convert_diffusers_mmdit(
        comfy.utils.load_torch_file(f"{tdir}/diffusion_pytorch_model.safetensors", safe_load=True), "")
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    unet_config.update(hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                       num_heads=cfg["num_attention_heads"], context_in_dim=cfg["joint_attention_dim"],
                       axes_dim=cfg["axes_dims_rope"], out_channels=cfg["in_channels"], patch_size=1,
                       in_channels=cfg["in_channels"])
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    native = model_config.get_model(sd, "")
    native.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(native, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu")), tdir


def weights(patcher):
    patcher.patch_model()
    sd = {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    patcher.unpatch_model()
    return sd



def check_trained(lora_file, arch):
    """ComfyUI's own mapping and patching of a trained LoRA vs diffusers' fused weights."""
    import logging

    import comfy.lora
    import comfy.sd
    from safetensors.torch import load_file

    model, tdir = build_native(arch)
    lora = load_file(lora_file)
    messages = []

    class Catch(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Catch()
    logging.getLogger().addHandler(handler)
    try:
        patched, _ = comfy.sd.load_lora_for_models(model, None, {k: v.clone() for k, v in lora.items()}, 1.0, 0)
    finally:
        logging.getLogger().removeHandler(handler)
    unused = sorted({m.split("lora key not loaded: ", 1)[1] for m in messages if "lora key not loaded" in m})
    base, ours = weights(model), weights(patched)
    changed = [k for k in base if not torch.equal(base[k], ours[k])]
    if arch == "flux":
        from diffusers import FluxPipeline as Pipe
    else:
        from diffusers import QwenImageEditPlusPipeline as Pipe
    pipe = Pipe.from_pretrained(str(tdir).rsplit("/", 1)[0])
    pipe.load_lora_weights(lora_file, adapter_name="trained")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    fused = {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}
    if arch == "flux":
        fused = comfy.model_detection.convert_diffusers_mmdit(fused, "")
    missing = sorted(k for k in ours if k not in fused)
    diffs = {k: float((ours[k].float() - fused[k].float()).abs().max()) for k in ours if k in fused}
    return {"lora_keys": len(lora), "unused_keys": unused, "changed_by_lora": len(changed),
            "max_abs_diff": max(diffs.values()), "max_abs_diff_changed": max(diffs[k] for k in changed),
            "native_keys_missing_in_diffusers": missing}


if len(sys.argv) > 4 and sys.argv[4] == "--trained":
    print("RESULT " + json.dumps(check_trained(sys.argv[5], sys.argv[6])))
    sys.exit(0)

model, _tdir = build_native("flux")

def entry(name, strength, enabled=True):
    return LoraEntry(name=name, path=folder_paths.get_full_path("loras", name), strength=strength, enabled=enabled)


a, b = "flen-tiny/flux_lora_a.safetensors", "flen-tiny/flux_lora_b.safetensors"
base = weights(model)
native = nodes.LoraLoaderModelOnly().load_lora_model_only(model, a, 0.7)[0]
native = nodes.LoraLoaderModelOnly().load_lora_model_only(native, b, -0.4)[0]
stack = LoraStack((entry(a, 0.7), entry("flen-tiny/qwen_edit_lora_a.safetensors", 1.0, enabled=False),
                   entry(b, -0.4)))
ours = FLENApplyLoraStack.execute(model, stack).result[0]
w_native, w_ours = weights(native), weights(ours)
changed = [k for k in base if not torch.equal(base[k], w_native[k])]
result = {
    "keys_equal": sorted(w_native) == sorted(w_ours),
    "max_abs_diff": max(float((w_native[k] - w_ours[k]).abs().max()) for k in w_native),
    "changed_by_lora": len(changed),
}
from safetensors.torch import save_file  # noqa: E402

foreign = f"{pack_parent}/sd_unet_lora.safetensors"  # an SD-1.5-style LoRA: nothing maps onto FLUX
save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 32),
           "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(32, 4)}, foreign)
try:
    FLENApplyLoraStack.execute(model, LoraStack((LoraEntry("sd_unet_lora.safetensors", foreign, 1.0),)))
    result["foreign_error"] = None
except FlenUserError as exc:
    result["foreign_error"] = str(exc)
print("RESULT " + json.dumps(result))
