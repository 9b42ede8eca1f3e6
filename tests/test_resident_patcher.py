"""The bridge's ResidentPatcher driven by ComfyUI's own model-management code (tests/resident_patcher_probe.py,
in a subprocess with ComfyUI on the path; ``meta`` stands in for the GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tools.comfy_queue import comfyui_path

REPO = Path(__file__).resolve().parents[1]


def test_comfyui_loads_and_unloads_a_pack_module_without_copying_it_back():
    r = subprocess.run([sys.executable, str(REPO / "tests" / "resident_patcher_probe.py"), str(comfyui_path()),
                        str(REPO)], cwd=comfyui_path(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["resident"] is True
    assert out["on_device_after_load"] == ["meta"] and out["device_attr"] == "meta"
    assert out["loaded_size_is_model_size"] is True
    assert out["partial_unload_freed"] == 0 and out["lowvram_after_partial"] is False
    assert out["model_unload_returned"] is True
    assert out["on_host_after_unload"] == ["cpu"]
    assert out["same_host_storage"] is True  # the host copy came back: no copy was made
    assert out["loaded_size_after_unload"] == 0
    assert out["swapped_back_bytes"] > 0 and out["copied_back_bytes"] == 0
    # a quantised parameter type goes ModelPatcher's own way, and still moves
    assert out["quantised_resident"] is False and out["quantised_on_device"] == "meta"
