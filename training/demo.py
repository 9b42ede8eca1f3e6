"""The demo: the flywheel on the tiny models, end to end through a real ComfyUI.

    python -m training.demo [--workdir DIR]

Writes the tiny models, starts ComfyUI headless with the pack in custom_nodes, queues the
shipped workflows through POST /prompt (with the tiny models' names and sizes substituted),
and prints where the results are. Grows as capabilities land.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

from .comfy_queue import ComfyClient, ComfyServer, prepare_base_directory
from .tiny_models import write_tiny_models

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"

# The trainers on the tiny models: a few steps at 64×64, no checkpoints or sample previews.
TINY_TRAINING = {"steps": 4, "rank": 4, "learning_rate": 0.01, "resolution": 64, "checkpoint_every": 0,
                 "sample_every": 0}

# Shipped workflows name real models; on the tiny kit the same graphs run with these values.
TINY_SUBSTITUTIONS: dict[str, dict[str, dict[str, object]]] = {
    "flen_synthetic_flux": {
        "1": {"model": "flen-tiny-flux", "precision": "fp32"},
        "2": {"lora_name": "flen-tiny/flux_lora_a.safetensors"},
        "3": {"lora_name": "flen-tiny/flux_lora_b.safetensors"},
        "4": {"width": 64, "height": 64, "steps": 4},
        "5": {"filename_prefix": "flenwheel/demo/synthetic"},
    },
    "flen_angle_sweep": {
        "1": {"image": "flen_demo_face.png"},
        "2": {"model": "flen-tiny-qwen-image-edit", "precision": "fp32"},
        "3": {"lora_name": "flen-tiny/qwen_edit_lora_a.safetensors"},
        "4": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors", "strength": 0.5},
        "5": {"width": 64, "height": 64, "steps": 2},
        "6": {"filename_prefix": "flenwheel/demo/sweep"},
    },
    # issue 9: the flywheel workflows (sources: input/flen_demo_sources/, see write_demo_inputs)
    "flywheel1_enrich": {
        "1": {"folder": "flen_demo_sources"},
        "2": {"face_model": "flen-tiny"},
        "4": {"model": "flen-tiny-qwen-image-edit", "precision": "fp32"},
        "5": {"lora_name": "flen-tiny/qwen_edit_lora_a.safetensors"},
        "6": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors", "strength": 0.5},
        "7": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors"},
        "8": {"width": 64, "height": 64, "steps": 2},
        "10": {"character": "flen_demo"},
    },
    "flywheel1_synthesize": {
        "1": {"model": "flen-tiny-flux", "precision": "fp32"},
        "2": {"lora_name": "flen-tiny/flux_lora_a.safetensors"},
        "3": {"width": 64, "height": 64, "steps": 2, "variations": 4},
        "4": {"folder": "flen_demo_sources"},
        "5": {"face_model": "flen-tiny"},
        "7": {"character": "flen_demo"},
    },
    "flywheel_interactive": {
        "1": {"folder": "flen_demo_sources"},
        "2": {"face_model": "flen-tiny"},
        "3": {"model": "flen-tiny-qwen-image-edit", "precision": "fp32"},
        "4": {"lora_name": "flen-tiny/qwen_edit_lora_a.safetensors"},
        "5": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors", "strength": 0.5},
        "6": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors"},
        "7": {"width": 64, "height": 64, "steps": 2},
        "9": {"character": "flen_demo", "timeout_s": 1, "timeout_policy": "approve_all"},  # nobody at the screen
        "10": {"character": "flen_demo"},
    },
    "compare_versions": {
        "1": {"model": "flen-tiny-flux", "precision": "fp32"},
        "2": {"folder": "flen_demo_sources"},
        "3": {"face_model": "flen-tiny"},
        "4": {"lora_name": "flen-tiny/flux_lora_a.safetensors"},
        "5": {"lora_name": "flen-tiny/flux_lora_b.safetensors"},
        "6": {"width": 64, "height": 64, "steps": 1, "cell_size": 64},
        "7": {"width": 64, "height": 64, "steps": 1, "cell_size": 64},
    },
    "flywheel1_train": {
        "1": {"character": "flen_demo"},
        "2": {"character": "flen_demo"},
        "3": {"model": "flen-tiny-flux", "precision": "fp32", **TINY_TRAINING,
              "advanced": "bucket_multiple: 16\nmax_sequence_length: 16"},
        "5": {"model": "flen-tiny-flux", "precision": "fp32"},
        "6": {"folder": "flen_demo_sources"},
        "7": {"face_model": "flen-tiny"},
        "8": {"width": 64, "height": 64, "steps": 1, "cell_size": 64},
    },
    "flywheel2_editor": {
        "1": {"character": "flen_demo"},
        "2": {"model": "flen-tiny-qwen-image-edit", "precision": "fp32", **TINY_TRAINING,
              "advanced": "bucket_multiple: 16\ncondition_resolution: 64"},
        "3": {"model": "flen-tiny-qwen-image-edit", "precision": "fp32"},
        "4": {"lora_name": "flen-tiny/qwen_edit_lora_a.safetensors"},
        "5": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors", "strength": 0.5},
        "7": {"folder": "flen_demo_sources"},
        "8": {"width": 64, "height": 64, "steps": 2},
    },
}
DEMO_INPUTS = {"flen_demo_face.png": 1}  # input file → identity drawn by the tiny-model kit
DEMO_SOURCES = "flen_demo_sources"  # input/<folder>/: the 'photos of the character' of the flywheel workflows


def load_api_workflow(name: str, tiny: bool = True) -> dict:
    """The API-format twin of a shipped workflow, with tiny-model substitutions applied."""
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))
    if tiny:
        prompt = copy.deepcopy(prompt)
        for node_id, values in TINY_SUBSTITUTIONS.get(name, {}).items():
            prompt[node_id]["inputs"].update(values)
    return prompt


def with_character(prompt: dict, character: str) -> dict:
    """Every node of the prompt that names a character gets this one."""
    for node in prompt.values():
        if "character" in node["inputs"]:
            node["inputs"]["character"] = character
    return prompt


def enrich_for_review(character: str, version: str = "v1", editor_lora: str | None = None) -> dict:
    """flywheel1_enrich on the tiny models, its review queue fed from the identity filter's *rejected* side:
    the tiny editor draws no faces, so the filter rejects every edit, and the demo queues them for review
    anyway. With editor_lora, the workflow's editor-LoRA slot (off as shipped) is switched on with it."""
    prompt = with_character(load_api_workflow("flywheel1_enrich"), character)
    queue = next(k for k, v in prompt.items() if v["class_type"] == "FLENReviewQueue")
    flt = next(k for k, v in prompt.items() if v["class_type"] == "FLENIdentityFilter")
    prompt[queue]["inputs"].update(images=[flt, 2], meta=[flt, 3], version=version)
    if editor_lora:
        prompt["7"]["inputs"].update(lora_name=editor_lora, enabled=True)
    return prompt


def scripted_review(client: ComfyClient, character: str, correct: int = 2, reject: int = 1) -> dict:
    """A scripted reviewer judges every pending candidate through the review routes, as a person would in
    the gallery: the first `correct` get a corrected instruction, the next `reject` are rejected, the rest
    approved. Returns the store's counts."""
    items = client.get(f"/flenwheel/review/{character}/items", params={"status": "pending", "limit": 500})
    ids = [i["id"] for i in items.json()["items"]]
    if not ids:
        raise RuntimeError(f"nothing pending for review of {character}")
    decide = f"/flenwheel/review/{character}/decide"
    steps = [(ids[:correct], {"action": "correct", "instruction": "rotate the camera 45 degrees to the left, "
                                                                  "keep the face identical"}),
             (ids[correct:correct + reject], {"action": "reject", "reasons": ["artefacts"]}),
             (ids[correct + reject:], {"action": "approve"})]
    counts: dict = {}
    for chunk, body in steps:
        if chunk:
            r = client.post(decide, {"ids": chunk, "who": "demo reviewer", **body})
            r.raise_for_status()
            counts = r.json()["counts"]
    return counts


def write_demo_inputs(input_dir: Path) -> None:
    """Synthetic faces the tiny detector finds, as the demo's 'photos'."""
    from .tiny_models import draw_test_face

    input_dir.mkdir(parents=True, exist_ok=True)
    for name, identity in DEMO_INPUTS.items():
        draw_test_face(identity, size=256).save(input_dir / name)
    sources = input_dir / DEMO_SOURCES
    sources.mkdir(exist_ok=True)
    for k, (offset, scale) in enumerate((((0, 0), 1.0), ((-12, 6), 0.9), ((10, -4), 1.1))):
        draw_test_face(1, size=256, offset=offset, scale=scale).save(sources / f"photo_{k + 1:02d}.png")


def output_files(base: Path, outputs: dict) -> list[Path]:
    files = []
    for node_out in outputs.values():
        for image in node_out.get("images", []):
            if image.get("type") == "output":
                files.append(base / "output" / image.get("subfolder", "") / image["filename"])
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path,
                        default=Path(os.environ.get("FLEN_DEMO_DIR", Path.home() / "flenwheel-demo")),
                        help="ComfyUI base directory for the demo (models, output, user); kept afterwards.")
    args = parser.parse_args(argv)
    base: Path = args.workdir.resolve()
    t0 = time.monotonic()
    print(f"[demo] writing tiny models to {base / 'models'}", flush=True)
    write_tiny_models(base / "models", seed=0)
    prepare_base_directory(base, None)
    write_demo_inputs(base / "input")
    server = ComfyServer(base, python=sys.executable)
    print("[demo] starting ComfyUI headless with FLENwheel", flush=True)
    server.start()
    try:
        client = ComfyClient(server.url)
        files = []
        for name in ("flen_synthetic_flux", "flen_angle_sweep"):
            print(f"[demo] queueing workflows/{name}.json through POST /prompt", flush=True)
            files += output_files(base, client.run(load_api_workflow(name), timeout=600))
    finally:
        server.stop()
    if not files:
        print("[demo] the workflow finished but saved no images", file=sys.stderr)
        return 1
    print(f"[demo] done in {time.monotonic() - t0:.0f} s. Results:")
    for f in files:
        print(f"  {f}")
    print(f"[demo] ComfyUI log: {server.log_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
