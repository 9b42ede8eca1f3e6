"""FLENFluxFromComfy / FLENQwenEditFromComfy: the pack's generate and edit nodes on ComfyUI's own MODEL / CLIP / VAE.

The probe (tests/native_pipe_probe.py, a subprocess with ComfyUI and the pack on the path) builds ComfyUI's native
objects from the tiny kit's split files — what UNETLoader, DualCLIPLoader / CLIPLoader and VAELoader would return
for full-size files; its docstring lists exactly which hard-coded widths it takes from the tiny files instead — and
runs the pack's nodes on them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tools.comfy_queue import comfyui_path

REPO = Path(__file__).resolve().parents[1]
# fp32 on the CPU, same weights, same noise, same sigmas: only the order of float operations differs
PARITY_TOLERANCE = 1e-5


def _probe(tiny_models: Path, tmp_path: Path, which: str) -> dict:
    (tmp_path / "FLENwheel").symlink_to(REPO, target_is_directory=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "native_pipe_probe.py"), str(comfyui_path()), str(tmp_path),
         str(tiny_models), which], cwd=comfyui_path(), capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_flux_generate_on_comfyui_native_model_matches_the_split_file_path(tiny_models, tmp_path):
    r = _probe(tiny_models, tmp_path, "flux")
    assert r["shape"] == [2, 32, 32, 3] and r["finite"]  # one image per prompt line
    assert r["same_seed"] == 0.0 and r["other_seed"] > 0.05  # deterministic per seed, the seed matters
    # a LoRA of the stack changes the image through ComfyUI's patching; strength 0 and a later run without it do not
    assert r["lora_change"] > 1e-3 and r["lora_zero"] == 0.0 and r["after_lora"] == 0.0
    assert r["lora_meta"] == [{"name": "flen-tiny/flux_lora_a.safetensors", "strength": 1.0, "enabled": True}]
    assert r["meta"]["model"] == "tiny-native" and r["meta"]["precision"] == "comfyui float32"
    # ComfyUI's sampler on ComfyUI's model gives the pack's own split-file output (the same weights and seed)
    assert r["vs_split_files"] < PARITY_TOLERANCE
    assert r["vs_split_files_lora"] < PARITY_TOLERANCE and r["split_files_lora_change"] > 1e-3
    # also with FLUX.1-dev's resolution-dependent schedule, which really changes the image
    assert r["vs_split_files_dynamic"] < PARITY_TOLERANCE and r["dynamic_change"] > 1e-3
    # layouts ComfyUI alone cannot map for FLUX go through the pack's converter, with the split-file path's result
    for layout in ("noprefix_ab", "xlabs"):
        got = r["converted"][layout]
        assert "does not fit" in got["comfy_alone"], layout  # FLEN Apply LoRA Stack (ComfyUI's mapping) refuses it
        assert got["vs_split_files"] < PARITY_TOLERANCE and got["change"] > 1e-3, (layout, got)
    # one progress bar over both images' steps, each step with a preview
    assert [tuple(p) for p in r["progress"]] == [(i, 6, True) for i in range(1, 7)]
    assert "cannot train on" in r["trainer_error"] and "FLEN FLUX Loader (ComfyUI files)" in r["trainer_error"]
    assert "VAE makes 4-channel latents but the MODEL takes 1" in r["wrong_vae_error"]


def test_qwen_edit_and_sweep_on_comfyui_native_model(tiny_models, tmp_path):
    """No comparison with the split-file path here: ComfyUI's Qwen-Image text conditioning is its own (it cuts the
    template at the second <|im_start|>, diffusers drops a fixed 64 tokens), so the two paths differ by design."""
    r = _probe(tiny_models, tmp_path, "qwen")
    assert r["shape"] == [4, 64, 80, 3] and r["finite"]  # 2 sources × batch 2 at the asked 80×64
    assert [m["seed"] for m in r["metas"]] == [3, 4, 5, 6] and [m["source_index"] for m in r["metas"]] == [0, 0, 1, 1]
    assert r["same_seed"] == 0.0 and r["other_seed"] > 0.05 and r["batch_seeds_differ"] > 0.05
    assert r["lora_change"] > 1e-3 and r["lora_zero"] == 0.0
    assert r["lora_meta"] == [{"name": "flen-tiny/qwen_edit_lora_a.safetensors", "strength": 1.0, "enabled": True}]
    assert r["cfg_change"] > 1e-4 and r["cfg_meta"] == 3.0  # true CFG > 1 runs the negative prompt
    assert r["ref_change"] > 1e-3  # image2 is a second reference (VL image and reference latent)
    assert r["vl_image_slots"] == 1
    assert [tuple(p) for p in r["progress"]] == [(i, 8, True) for i in range(1, 9)]
    assert r["sweep_shape"] == [4, 64, 80, 3] and r["sweep_labels"] == r["sweep_meta_labels"]
    assert len(r["sweep_labels"]) == 4
    assert "cannot train on" in r["trainer_error"] and "FLEN Qwen Edit Loader (ComfyUI files)" in r["trainer_error"]
    assert "wrong text encoder" in r["wrong_clip_error"] and "type qwen_image" in r["wrong_clip_error"]
