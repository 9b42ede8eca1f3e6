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
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from engines.pack_info import WORKFLOWS_DIR as WORKFLOWS
from engines.workspace import loras_dir, workspace_dir

from .comfy_queue import ComfyClient, ComfyServer, comfyui_path, prepare_base_directory
from .tiny_models import write_tiny_models

# The trainers on the tiny models: a few steps at 64×64, no checkpoints or sample previews.
TINY_TRAINING = {"steps": 4, "rank": 4, "learning_rate": 0.01, "resolution": 64, "checkpoint_every": 0,
                 "sample_every": 0}

# The tiny kit's ComfyUI split files (training/tiny_split_files.py) in place of the real ones the shipped workflows'
# split-file loaders name; "auto" computes in fp32 on the CPU.
TINY_QWEN_FILES: dict[str, object] = {"diffusion_model": "flen-tiny/qwen_image_edit_2509_tiny_bf16.safetensors",
                   "text_encoder": "flen-tiny/qwen_2.5_vl_tiny.safetensors",
                   "vae": "flen-tiny/qwen_image_vae_tiny.safetensors", "precision": "auto"}
TINY_FLUX_FILES: dict[str, object] = {"diffusion_model": "flen-tiny/flux1-dev-tiny.safetensors",
                   "clip_l": "flen-tiny/clip_l_tiny.safetensors", "t5xxl": "flen-tiny/t5xxl_tiny_bf16.safetensors",
                   "vae": "flen-tiny/ae_tiny.safetensors", "precision": "auto"}

# Shipped workflows name real models; on the tiny kit the same graphs run with these values.
TINY_SUBSTITUTIONS: dict[str, dict[str, dict[str, object]]] = {
    "flen_synthetic_flux": {
        "1": TINY_FLUX_FILES,
        "2": {"lora_name": "flen-tiny/flux_lora_a.safetensors"},
        "4": {"width": 64, "height": 64, "steps": 4},
        "5": {"filename_prefix": "flenwheel/demo/synthetic"},
    },
    "flen_angle_sweep": {
        "1": {"image": "flen_demo_face.png"},
        "2": TINY_QWEN_FILES,
        "3": {"lora_name": "flen-tiny/qwen_edit_lora_a.safetensors"},
        "4": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors", "strength": 0.5},
        "5": {"width": 64, "height": 64, "steps": 2},
        "6": {"filename_prefix": "flenwheel/demo/sweep"},
    },
    # the flywheel workflows (sources: input/flen_demo_sources/, see write_demo_inputs)
    "flywheel1_enrich": {
        "1": {"folder": "flen_demo_sources"},
        "2": {"face_model": "flen-tiny"},
        "4": TINY_QWEN_FILES,
        "5": {"lora_name": "flen-tiny/qwen_edit_lora_a.safetensors"},
        "6": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors", "strength": 0.5},
        "7": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors"},
        "8": {"width": 64, "height": 64, "steps": 2},
        "13": {"character": "flen_demo"},  # the workflow's one FLEN Character node
    },
    "flywheel1_synthesize": {
        "1": TINY_FLUX_FILES,
        "2": {"lora_name": "flen-tiny/flux_lora_a.safetensors"},
        "3": {"width": 64, "height": 64, "steps": 2, "variations": 4},
        "4": {"folder": "flen_demo_sources"},
        "5": {"face_model": "flen-tiny"},
        "10": {"character": "flen_demo"},
    },
    "flywheel_interactive": {
        "1": {"folder": "flen_demo_sources"},
        "2": {"face_model": "flen-tiny"},
        "3": TINY_QWEN_FILES,
        "4": {"lora_name": "flen-tiny/qwen_edit_lora_a.safetensors"},
        "5": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors", "strength": 0.5},
        "6": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors"},
        "7": {"width": 64, "height": 64, "steps": 2},
        "9": {"timeout_s": 1, "timeout_policy": "approve_all"},  # nobody at the screen
        "13": {"character": "flen_demo"},
    },
    "compare_versions": {
        "1": TINY_FLUX_FILES,
        "2": {"folder": "flen_demo_sources"},
        "3": {"face_model": "flen-tiny"},
        "4": {"lora_name": "flen-tiny/flux_lora_a.safetensors"},
        "5": {"lora_name": "flen-tiny/flux_lora_b.safetensors"},
        "6": {"width": 64, "height": 64, "steps": 1, "cell_size": 64},
        "7": {"width": 64, "height": 64, "steps": 1, "cell_size": 64},
    },
    # the trainers train on what their connected loader names (the tiny split files)
    "flywheel1_train": {
        "11": {"character": "flen_demo"},
        "3": {"precision": "fp32", **TINY_TRAINING, "advanced": "bucket_multiple: 16\nmax_sequence_length: 16"},
        "5": TINY_FLUX_FILES,
        "6": {"folder": "flen_demo_sources"},
        "7": {"face_model": "flen-tiny"},
        "8": {"width": 64, "height": 64, "steps": 1, "cell_size": 64},
    },
    "flywheel2_editor": {
        "11": {"character": "flen_demo"},
        "2": {"precision": "fp32", **TINY_TRAINING, "advanced": "bucket_multiple: 16\ncondition_resolution: 64"},
        "3": TINY_QWEN_FILES,
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


# The same tiny models as diffusers folders, for the diffusers-folder loaders (FLENQwenEditLoader, FLENFluxLoader).
TINY_DIFFUSERS_LOADERS = {
    "FLENQwenEditFileLoader": ("FLENQwenEditLoader", {"model": "flen-tiny-qwen-image-edit", "precision": "fp32"}),
    "FLENFluxFileLoader": ("FLENFluxLoader", {"model": "flen-tiny-flux", "precision": "fp32"}),
}


def with_split_files(prompt: dict, **overrides: str) -> dict:
    """``overrides`` change the inputs of every split-file loader of the prompt that has them (e.g.
    diffusion_model=... for an fp8 variant of the tiny kit's files)."""
    for node in prompt.values():
        if node["class_type"] in TINY_DIFFUSERS_LOADERS:
            node["inputs"].update({k: v for k, v in overrides.items() if k in node["inputs"]})
    return prompt


def with_diffusers_folders(prompt: dict) -> dict:
    """Every split-file loader of the prompt becomes the diffusers-folder loader on the tiny kit's folders (same
    node id, so whatever it feeds, a trainer included, now gets the folder)."""
    for node in prompt.values():
        swap = TINY_DIFFUSERS_LOADERS.get(node["class_type"])
        if swap is not None:
            node["class_type"] = swap[0]
            node["inputs"] = dict(swap[1])
    return prompt


def with_character(prompt: dict, character: str) -> dict:
    """Every node of the prompt that names a character gets this one (the FLEN Character node, in the shipped
    workflows: the inputs it feeds are links and stay so)."""
    for node in prompt.values():
        if "character" in node["inputs"] and not isinstance(node["inputs"]["character"], list):
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
    steps: list[tuple[list[int], dict[str, Any]]] = [
        (ids[:correct], {"action": "correct", "instruction": "rotate the camera 45 degrees to the left, "
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


CHARACTER = "flen_demo"


def _node(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def _text(outputs: dict, node_id: str) -> str:
    return (outputs.get(node_id, {}).get("text") or [""])[0]


def run_loop(client: ComfyClient, base: Path, say) -> dict[str, Path]:
    """The whole flywheel on the tiny models; returns what it made (label → path)."""
    c = CHARACTER
    out = workspace_dir(base / "output", c)
    loras = loras_dir(base / "models" / "loras", c)
    made: dict[str, Path] = {}

    say("1/9 flywheel1_enrich: source photos → angle sweep (Qwen edit + LoRA stack) → identity filter → review queue")
    say("     (the tiny models draw no faces, so the identity filter rejects every edit: the demo queues the "
        "filter's rejected side for review anyway)")
    client.run(enrich_for_review(c, "v1"), timeout=600)
    counts = scripted_review(client, c)
    say(f"2/9 scripted reviewer, through the review routes: {counts}")

    say("3/9 flywheel1_train: approved → dataset v1 → char_lora_v1 → model card")
    train = with_character(load_api_workflow("flywheel1_train"), c)
    outputs = client.run(train, timeout=600)
    say("     " + _text(outputs, _node(train, "FLENDatasetWriter")).splitlines()[0])
    say("     " + _text(outputs, _node(train, "FLENTrainCharacterLoRA")))
    made.update({"dataset v1": out / "datasets" / "v1", "char_lora_v1": loras / "char_lora_v1.safetensors",
                 "model card v1": loras / "char_lora_v1.card.json"})

    say("4/9 flywheel1_synthesize: char_lora_v1 → FLUX synthetic set → identity filter → review queue (v2)")
    synth = with_character(load_api_workflow("flywheel1_synthesize"), c)
    synth[_node(synth, "FLENLoraStack")]["inputs"]["lora_name"] = f"flenwheel/{c}/char_lora_v1.safetensors"
    flt, queue = _node(synth, "FLENIdentityFilter"), _node(synth, "FLENReviewQueue")
    synth[queue]["inputs"].update(images=[flt, 2], meta=[flt, 3], version="v2")
    client.run(synth, timeout=600)
    say(f"     reviewed: {scripted_review(client, c, correct=0, reject=1)}")

    say("5/9 flywheel2_editor: corrections → edit pairs v1 → qwen_lora_v1 → angle sweep with it")
    editor = with_character(load_api_workflow("flywheel2_editor"), c)
    outputs = client.run(editor, timeout=600)
    say("     " + _text(outputs, _node(editor, "FLENTrainEditorLoRA")))
    made.update({"edit pairs v1": out / "edit_pairs" / "v1", "qwen_lora_v1": loras / "qwen_lora_v1.safetensors"})

    say("6/9 flywheel1_enrich again, with qwen_lora_v1 switched on in the stack")
    client.run(enrich_for_review(c, "v2", editor_lora=f"flenwheel/{c}/qwen_lora_v1.safetensors"), timeout=600)
    say(f"7/9 scripted reviewer: {scripted_review(client, c)}")

    say("8/9 flywheel1_train again: everything approved → dataset v2 → char_lora_v2 → model card")
    outputs = client.run(with_character(load_api_workflow("flywheel1_train"), c), timeout=600)
    say("     " + _text(outputs, _node(train, "FLENDatasetWriter")).splitlines()[0])
    say("     " + _text(outputs, _node(train, "FLENTrainCharacterLoRA")))
    made.update({"dataset v2": out / "datasets" / "v2", "char_lora_v2": loras / "char_lora_v2.safetensors",
                 "model card v2": loras / "char_lora_v2.card.json"})

    say("9/9 compare_versions: the model cards of char_lora_v1 and char_lora_v2 side by side")
    cmp_prompt = load_api_workflow("compare_versions")
    node = _node(cmp_prompt, "FLENCompareVersions")
    cmp_prompt = {k: v for k, v in cmp_prompt.items() if k == node or v["class_type"] == "PreviewImage"}
    cmp_prompt[node]["inputs"] = {"card_files": f"flenwheel/{c}/char_lora_v1.card.json\n"
                                                f"flenwheel/{c}/char_lora_v2.card.json", "save": True}
    outputs = client.run(cmp_prompt, timeout=600)
    table = _text(outputs, node)
    say("     " + "\n     ".join(table.splitlines()))
    saved = [Path(line[len("saved "):]) for line in table.splitlines() if line.startswith("saved ")]
    made["comparison"] = next((p for p in saved if p.name.endswith(".compare.json")), out / "model_cards")
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path,
                        default=Path(os.environ.get("FLEN_DEMO_DIR", Path.home() / "flenwheel-demo")),
                        help="ComfyUI base directory for the demo (models, output, user); kept afterwards.")
    args = parser.parse_args(argv)
    base: Path = args.workdir.resolve()
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[demo {time.monotonic() - t0:5.0f} s] {msg}", flush=True)

    say(f"writing tiny models to {base / 'models'}")
    write_tiny_models(base / "models", seed=0)
    for old in (workspace_dir(base / "output", CHARACTER), loras_dir(base / "models" / "loras", CHARACTER)):
        if old.exists():  # a fresh loop each run: v1 and v2 again, not v3 and v4
            say(f"removing the previous demo run's {old}")
            shutil.rmtree(old)
    prepare_base_directory(base, None)
    write_demo_inputs(base / "input")
    server = ComfyServer(base, python=sys.executable)
    say("starting ComfyUI headless with FLENwheel; every step below is a shipped workflow queued through "
        "POST /prompt")
    server.start()
    try:
        client = ComfyClient(server.url)
        say(f"review gallery while the demo runs: {server.url}/flenwheel/review/page")
        made = run_loop(client, base, say)
    finally:
        server.stop()
    missing = [label for label, path in made.items() if not path.exists()]
    say("done. What the loop made:")
    for label, path in made.items():
        print(f"  {label:14s} {path}{'   (MISSING)' if not path.exists() else ''}")
    print(f"[demo] ComfyUI log: {server.log_path}")
    print("[demo] the demo stopped its ComfyUI. To look at the review gallery again:\n"
          f"  cd {comfyui_path()} && {sys.executable} main.py --cpu --port 8188 --base-directory {base}\n"
          "  then open http://127.0.0.1:8188/flenwheel/review/page (character flen_demo)")
    if missing:
        print(f"[demo] missing outputs: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
