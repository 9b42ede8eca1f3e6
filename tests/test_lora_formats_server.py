"""LoRA layouts through a real ComfyUI (POST /prompt): FLENLoraStack → FLENFluxGenerate / FLENQwenEdit.

The same reference LoRA is written in several layouts next to the canonical diffusers/peft file; each layout
must give the canonical file's image (within PNG rounding), which clearly differs from the image at half the
strength — so a layout loaded at ×0.5 or ×2, or only in part, fails. A partial file fails the prompt with
a message naming the layout and the modules. (FLENApplyLoraStack needs a native ComfyUI MODEL, which
ComfyUI 0.3.64 cannot build from the tiny transformers; its matrix runs in tests/test_apply_lora_stack.py
on ComfyUI's real ModelPatcher.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_layouts import make_reference, write_layout
from PIL import Image
from safetensors.torch import save_file

from tools.demo import output_files, write_demo_inputs

pytestmark = pytest.mark.server

SUBDIR = "flen-layouts"
LAYOUTS = {
    "flux": ("kohya_fp16", "comfy_down_alpha", "onetrainer", "peft_metadata"),
    "qwen_image": ("noprefix_down_alpha_bf16", "diffsynth", "kohya_fp16", "peft_metadata"),
}
FOLDERS = {"flux": "flen-tiny-flux", "qwen_image": "flen-tiny-qwen-image-edit"}


def _linears(tiny_models, arch):
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    cls = FluxTransformer2DModel if arch == "flux" else QwenImageTransformer2DModel
    model = cls.from_pretrained(tiny_models / "diffusers" / FOLDERS[arch] / "transformer")
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _write_files(tiny_models, arch) -> list[str]:
    linears = _linears(tiny_models, arch)
    ref = make_reference(linears, seed=11, magnitude=0.2)
    folder = tiny_models / "loras" / SUBDIR
    folder.mkdir(exist_ok=True)
    names = []
    for layout in ("peft",) + LAYOUTS[arch]:
        tensors, meta, _, _ = write_layout(layout, ref, linears, arch)
        save_file(tensors, folder / f"{arch}_{layout}.safetensors", metadata=meta)
        names.append(f"{SUBDIR}/{arch}_{layout}.safetensors")
    partial = dict(write_layout("peft", ref, linears, arch)[0])
    partial["transformer.transformer_blocks.5.attn.to_q.lora_A.weight"] = torch.zeros(4, 8)
    partial["transformer.transformer_blocks.5.attn.to_q.lora_B.weight"] = torch.zeros(8, 4)
    save_file(partial, folder / f"{arch}_partial.safetensors")
    return names


def _prompt(arch, lora_name, strength, prefix):
    stack = {"class_type": "FLENLoraStack", "inputs": {"lora_name": lora_name, "strength": strength,
                                                       "enabled": True}}
    save = {"class_type": "SaveImage", "inputs": {"images": ["gen", 0], "filename_prefix": prefix}}
    if arch == "flux":
        return {"stack": stack, "save": save,
                "loader": {"class_type": "FLENFluxLoader", "inputs": {"model": FOLDERS[arch], "precision": "fp32"}},
                "gen": {"class_type": "FLENFluxGenerate", "inputs": {
                    "flux_pipe": ["loader", 0], "prompts": "a photo of a person", "width": 64, "height": 64,
                    "steps": 2, "guidance": 3.5, "seed": 1, "batch": 1, "lora_stack": ["stack", 0]}}}
    return {"stack": stack, "save": save,
            "image": {"class_type": "LoadImage", "inputs": {"image": "flen_demo_face.png"}},
            "loader": {"class_type": "FLENQwenEditLoader", "inputs": {"model": FOLDERS[arch], "precision": "fp32"}},
            "gen": {"class_type": "FLENQwenEdit", "inputs": {
                "qwen_pipe": ["loader", 0], "image1": ["image", 0], "lora_stack": ["stack", 0],
                "instruction": "让人物微笑", "negative_prompt": "", "steps": 2, "true_cfg": 1.0, "seed": 3,
                "megapixels": 0.004, "width": 0, "height": 0, "batch": 1}}}


def _image(comfy, comfy_server, arch, lora_name, strength, prefix) -> np.ndarray:
    files = output_files(comfy_server.base, comfy.run(_prompt(arch, lora_name, strength, prefix)))
    assert len(files) == 1
    with Image.open(files[0]) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("arch", ["flux", "qwen_image"])
def test_layouts_through_the_nodes_give_the_reference_image(comfy, comfy_server, tiny_models, arch):
    write_demo_inputs(comfy_server.base / "input")
    names = _write_files(tiny_models, arch)
    canonical = _image(comfy, comfy_server, arch, names[0], 1.0, f"layouts/{arch}_ref")
    half = _image(comfy, comfy_server, arch, names[0], 0.5, f"layouts/{arch}_half")
    sensitivity = float(np.abs(canonical - half).mean())
    assert sensitivity > 2.0, f"the LoRA hardly changes the image ({sensitivity:.2f}); the test would be blind"
    for name in names[1:]:
        img = _image(comfy, comfy_server, arch, name, 1.0, f"layouts/{arch}_{name.rsplit('/', 1)[1][:-12]}")
        assert float(np.abs(img - canonical).max()) <= 2, name  # PNG rounding of float-level differences
    error = comfy.run_error(_prompt(arch, f"{SUBDIR}/{arch}_partial.safetensors", 1.0, f"layouts/{arch}_partial"))
    message = error["exception_message"]
    assert error["node_type"] == ("FLENFluxGenerate" if arch == "flux" else "FLENQwenEdit")
    assert "cannot be applied completely" in message and "'transformer.transformer_blocks.5.attn.to_q'" in message
    assert "diffusers / peft" in message and "never applies part of a LoRA" in message
