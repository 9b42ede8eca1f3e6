"""The demo: the flywheel on the tiny models, end to end through a real ComfyUI.

    python -m tools.demo [--workdir DIR]

Writes the tiny models, starts ComfyUI headless with the pack in custom_nodes, queues the
shipped workflows through POST /prompt (with the tiny models' names and sizes substituted),
and prints where the results are. Grows as capabilities land.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from engines.workspace import loras_dir, workspace_dir
from tools.comfy_queue import ComfyClient, ComfyServer, comfyui_path, prepare_base_directory
from tools.tiny_models import write_tiny_models
from tools.tiny_workflows import load_api_workflow

DEMO_INPUTS = {"flen_demo_face.png": 1}  # input file → identity drawn by the tiny-model kit
DEMO_SOURCES = "flen_demo_sources"  # input/<folder>/: the 'photos of the character' of the flywheel workflows


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
    from tools.tiny_models import draw_test_face

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
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
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
