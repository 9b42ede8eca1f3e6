"""Run in a subprocess (ComfyUI on sys.path): compares FLENApplyLoraStack with LoraLoaderModelOnly.

argv: COMFYUI_PATH PACK_PARENT MODELS_DIR. Prints one JSON line with the comparison.

argv: COMFYUI_PATH PACK_PARENT MODELS_DIR --trained LORA_FILE flux|qwen_image: instead, checks a LoRA the
pack's trainers wrote against the native ComfyUI model of that tiny transformer: which of its keys
ComfyUI's own key mapping leaves unused, and the largest difference between ComfyUI's patched weights and
diffusers' fused weights (``load_lora_weights`` + ``fuse_lora``), compared under ComfyUI's key names.

argv: COMFYUI_PATH PACK_PARENT MODELS_DIR --matrix flux|qwen_image OUT_DIR: instead, writes every layout of
tests/lora_layouts.py to OUT_DIR, applies each through FLENApplyLoraStack and reports each native weight's change
against the reference (or the refusal), plus the messages for files that must be refused.
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


def check_matrix(arch, out_dir, strength=0.75):
    """Every layout of tests/lora_layouts.py through FLENApplyLoraStack on the native model: the change of
    every native weight against the reference (converted to ComfyUI's names by ComfyUI's own converter),
    and the messages for files that must be refused."""
    from lora_layouts import deltas, layouts, make_reference, write_layout
    from safetensors.torch import save_file

    model, tdir = build_native(arch)
    if arch == "flux":
        from diffusers import FluxTransformer2DModel as Cls
    else:
        from diffusers import QwenImageTransformer2DModel as Cls
    dtr = Cls.from_pretrained(tdir)
    linears = {n: (m.in_features, m.out_features) for n, m in dtr.named_modules() if isinstance(m, torch.nn.Linear)}
    base = weights(model)
    result = {"layouts": {}, "refused": {}}
    for layout in layouts(arch):
        ref = make_reference(linears, seed=len(layout))
        tensors, meta, covered, dtype = write_layout(layout, ref, linears, arch)
        path = f"{out_dir}/{arch}_{layout}.safetensors"
        save_file(tensors, path, metadata=meta)
        rounded = {n: (d.to(dtype).float(), u.to(dtype).float(), a) for n, (d, u, a) in ref.items()}
        want = {k: torch.zeros_like(v) for k, v in dtr.state_dict().items()}
        for name, delta in deltas(rounded, covered).items():
            want[f"{name}.weight"] = strength * delta
        if arch == "flux":
            want = comfy.model_detection.convert_diffusers_mmdit(want, "")
        try:
            patched = FLENApplyLoraStack.execute(model, LoraStack((LoraEntry(layout, path, strength),))).result[0]
        except FlenUserError as exc:  # a layout ComfyUI does not map for this model must be refused, not ignored
            result["layouts"][layout] = {"refused": str(exc)}
            continue
        got = weights(patched)
        diffs = [float((got[k].float() - base[k].float() - want[k].float()).abs().max()) for k in base]
        result["layouts"][layout] = {"max_abs_diff": max(diffs), "keys_missing": sorted(set(base) - set(want)),
                                     "largest_change": max(float(w.abs().max()) for w in want.values())}

    def refused(label, tensors):
        path = f"{out_dir}/{label}.safetensors"
        save_file(tensors, path)
        try:
            FLENApplyLoraStack.execute(model, LoraStack((LoraEntry(f"{label}.safetensors", path, 1.0),)))
            result["refused"][label] = None
        except FlenUserError as exc:
            result["refused"][label] = str(exc)

    good, _, _, _ = write_layout("peft", make_reference(linears, 5), linears, arch)
    # the pack's tiny LoRA for the other architecture: the same diffusers module names, other widths
    refused("other_arch_same_names",
            load_file(f"{models_dir}/loras/flen-tiny/{'qwen_edit' if arch == 'flux' else 'flux'}_lora_a.safetensors"))
    refused("partial", {**good, "transformer.transformer_blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 8),
                        "transformer.transformer_blocks.9.attn.to_q.lora_B.weight": torch.zeros(8, 4)})
    refused("with_text_encoder", {**good, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                  torch.zeros(4, 32), "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
                                  torch.zeros(32, 4)})
    fan_in, fan_out = linears["proj_out"]
    refused("lokr_wrong_shape", {"transformer.proj_out.lokr_w1": torch.ones(2, 2),
                                 "transformer.proj_out.lokr_w2": torch.ones(fan_out // 2, fan_in // 2 + 1)})
    refused("lokr_fits", {"transformer.proj_out.lokr_w1": torch.ones(2, 2),
                          "transformer.proj_out.lokr_w2": torch.ones(fan_out // 2, fan_in // 2)})
    return result


if len(sys.argv) > 4 and sys.argv[4] == "--trained":
    print("RESULT " + json.dumps(check_trained(sys.argv[5], sys.argv[6])))
    sys.exit(0)
if len(sys.argv) > 4 and sys.argv[4] == "--matrix":
    from safetensors.torch import load_file  # noqa: E402

    print("RESULT " + json.dumps(check_matrix(sys.argv[5], sys.argv[6])))
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
