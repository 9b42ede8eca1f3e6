"""Helpers of the trainer tests: tiny datasets, one in-process training run, the native-ComfyUI probe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from engines import dataset as ds
from tools.comfy_queue import comfyui_path
from tools.tiny_models import draw_test_face
from training.lora_training import Trainer, config_from_dict

REPO = Path(__file__).resolve().parents[1]


def char_dataset(output_dir: Path, character: str, n: int = 3, size: int = 32, template: str = "") -> Path:
    """A character dataset version of ``n`` drawn faces (one landscape, for a second bucket)."""
    images = [draw_test_face(i, size=size) for i in range(n - 1)]
    images.append(draw_test_face(n, size=size * 2).resize((size * 2, size)))
    extra = {"template": template} if template else {}
    result = ds.write_dataset(output_dir, character, images, token="ohwx_char person", phase="head",
                              class_prompt="a photo of a person", **extra)
    return result.dataset.path


def train(config_cls, task_cls, events: list | None = None, **settings):
    """One run in this process; returns (path of the new LoRA or None, the task, the events)."""
    events = [] if events is None else events
    cfg = config_from_dict(config_cls, settings)
    task = task_cls(cfg)
    path = Trainer(task, task.run_dir(), emit_fn=lambda ev, **d: events.append({"flen_event": ev, **d})).run()
    return path, task, events


def read_lora(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def native_probe(tmp_path: Path, models: Path, lora: Path, arch: str) -> dict:
    """tests/native_lora_probe.py --trained: ComfyUI's key mapping and patched weights vs diffusers' fused."""
    parent = tmp_path / "pack_parent"
    parent.mkdir(exist_ok=True)
    if not (parent / "FLENwheel").exists():
        (parent / "FLENwheel").symlink_to(REPO, target_is_directory=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "native_lora_probe.py"), str(comfyui_path()), str(parent),
         str(models), "--trained", str(lora), arch], cwd=comfyui_path(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])
