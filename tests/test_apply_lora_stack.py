"""FLENApplyLoraStack patches a native ComfyUI model exactly like LoraLoaderModelOnly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.comfy_queue import comfyui_path

REPO = Path(__file__).resolve().parents[1]


def test_stack_on_native_model_equals_lora_loader_model_only(tiny_models, tmp_path):
    (tmp_path / "FLENwheel").symlink_to(REPO, target_is_directory=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "native_lora_probe.py"), str(comfyui_path()), str(tmp_path),
         str(tiny_models)], cwd=comfyui_path(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["keys_equal"]
    assert result["changed_by_lora"] > 0  # the LoRAs really patched weights
    assert result["max_abs_diff"] == 0.0  # same weights as ComfyUI's own loader, exactly
    assert "sd_unet_lora.safetensors" in result["foreign_error"]
    assert "does not fit" in result["foreign_error"]


# Layouts ComfyUI 0.3.64 maps onto the native model; the others must be refused, never ignored.
NATIVE = {
    "flux": {"peft", "peft_metadata", "peft_alpha", "peft_lora_dot", "comfy_ab", "comfy_down_alpha", "kohya_fp16",
             "onetrainer"},
    "qwen_image": {"peft", "peft_metadata", "peft_alpha", "peft_lora_dot", "comfy_ab", "comfy_down_alpha",
                   "kohya_fp16", "noprefix_down_alpha_bf16", "noprefix_ab", "diffsynth"},
}


@pytest.mark.parametrize("arch", ["flux", "qwen_image"])
def test_every_layout_on_native_model_has_its_reference_effect_or_is_refused(tiny_models, tmp_path, arch):
    """The layout matrix of test_lora_formats through FLENApplyLoraStack: each native weight's change equals
    the reference (converted to ComfyUI's names by ComfyUI's own converter, so the BFL fusing in
    tests/lora_layouts.py is checked against ComfyUI's too); a layout ComfyUI cannot map, a LoRA for the other
    architecture with the same module names (ComfyUI only logs 'shape … is invalid'), and partial files are
    refused with FlenUserError."""
    from lora_layouts import layouts

    (tmp_path / "FLENwheel").symlink_to(REPO, target_is_directory=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "native_lora_probe.py"), str(comfyui_path()), str(tmp_path),
         str(tiny_models), "--matrix", arch, str(tmp_path)], cwd=comfyui_path(), capture_output=True, text=True,
        timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert set(result["layouts"]) == set(layouts(arch))
    for layout, got in result["layouts"].items():
        if layout in NATIVE[arch]:
            assert "refused" not in got, (layout, got)
            assert got["keys_missing"] == [] and got["largest_change"] > 0.05
            assert got["max_abs_diff"] < 1e-6, (layout, got)
        else:
            assert "does not fit" in got["refused"] and "ComfyUI does not know this layout" in got["refused"]
    refused = result["refused"]
    other = refused["other_arch_same_names"]
    assert "does not fit" in other and "shapes differ" in other and "the weight is" in other
    for label in ("partial", "with_text_encoder"):
        assert "cannot be applied completely" in refused[label] and "refuses a partial LoRA" in refused[label]
    assert "'transformer.transformer_blocks.9.attn.to_q.lora_A.weight'" in refused["partial"]
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in refused["with_text_encoder"]
    assert "is invalid" in refused["lokr_wrong_shape"]
    assert refused["lokr_fits"] is None  # LyCORIS is ComfyUI's to apply when it fits
