"""ComfyUI's own loading code reads the tiny kit's split files: the layout is ComfyUI's, not the pack's.

ComfyUI 0.3.64's UNETLoader cannot load a tiny diffusion model at all: its model detector hard-codes the full
models' widths (FLUX.1 3072 wide, Qwen-Image 24 heads of 128), so every tiny tensor would mismatch. The probe
(tests/comfy_layout_probe.py, in a subprocess with ComfyUI on the path) therefore runs UNETLoader's own steps —
``comfy.utils.load_torch_file``, the prefix check, ``model_detection.model_config_from_unet`` (which also
recognises the fp8 "scaled" form), ``get_model`` — with only those hard-coded widths taken from the file, then
loads each file strictly into ComfyUI's own model class and, for FLUX, compares ComfyUI's forward with diffusers'.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tools.comfy_queue import comfyui_path

REPO = Path(__file__).resolve().parents[1]


def _probe(models: Path) -> dict:
    r = subprocess.run([sys.executable, str(REPO / "tests" / "comfy_layout_probe.py"), str(comfyui_path()),
                        str(models)], cwd=comfyui_path(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_comfyui_recognises_and_strictly_loads_the_tiny_diffusion_model_files(tiny_models):
    report = _probe(tiny_models)
    flux = {k: v for k, v in report.items() if k.startswith("flux1-dev-tiny")}
    qwen = {k: v for k, v in report.items() if k.startswith("qwen_image_edit_2509_tiny")}
    assert len(flux) == 3 and len(qwen) == 3
    for name, info in {**flux, **qwen}.items():
        assert info["class"] == ("Flux" if name in flux else "QwenImage"), name
        assert info["shapes_ok"] and info["unexpected"] == [], (name, info["unexpected"])
        if "scaled" in name:
            assert info["scaled_fp8"] == "torch.float8_e4m3fn"  # ComfyUI took it for its own scaled form
            # what ComfyUI's scaled ops create themselves (as 1) for layers a scaled file leaves 16-bit
            assert all(re.search(r"\.scale_(input|weight)$", k) for k in info["missing"]), name
            assert not any(k.endswith(".scale_weight") and "blocks" in k and ("attn" in k or "mlp" in k)
                           for k in info["missing"]), name
        else:
            assert info["scaled_fp8"] is None and info["missing"] == [], (name, info["missing"])
        assert (info["fp8_weights"] > 0) == ("fp8" in name), name
    # BFL names need the pack's key map; ComfyUI's FLUX gives diffusers' output on the same inputs
    assert flux["flux1-dev-tiny.safetensors"]["forward_max_diff"] < 1e-5
    assert report["qwen_image_vae_tiny.safetensors"] == {"missing": [], "unexpected": []}
