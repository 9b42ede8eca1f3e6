"""FLENApplyLoraStack patches a native ComfyUI model exactly like LoraLoaderModelOnly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from training.comfy_queue import comfyui_path

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
