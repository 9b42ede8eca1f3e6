"""The demo: the flywheel on the tiny models, end to end through a real ComfyUI.

    python -m tools.demo [--workdir DIR]

Writes the tiny models and the tiny world (tools/tiny_world.py: a FLUX-layout model pre-trained on drawn faces
of 24 identities and a face pack whose recogniser separates them), starts ComfyUI headless with the pack in
custom_nodes, queues the shipped workflows through POST /prompt (the models' names and sizes substituted), and
prints what the loop measured: the identity filter's passes and rejections, and the 18-cell model card of the
base model, char_lora_v1 and char_lora_v2 per row. The Qwen editor is still the random tiny one: it draws no
faces, so its edits feed only the editor flywheel (as corrections), not the character's dataset.
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
from tools.tiny_models import LORA_DIRNAME, LORA_FILES, write_tiny_models
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


def enrich_for_review(character: str, version: str = "v1", editor_lora: str | None = None,
                      prompt: dict | None = None) -> dict:
    """flywheel1_enrich (on the tiny models, or ``prompt``), its review queue fed from the identity filter's
    *rejected* side, so that the reviewer has edits to correct (the tiny editor draws no faces: the filter rejects
    them all). With editor_lora, the workflow's editor-LoRA slot (off as shipped) is switched on with it."""
    prompt = prompt or with_character(load_api_workflow("flywheel1_enrich"), character)
    queue = next(k for k, v in prompt.items() if v["class_type"] == "FLENReviewQueue")
    flt = next(k for k, v in prompt.items() if v["class_type"] == "FLENIdentityFilter")
    prompt[queue]["inputs"].update(images=[flt, 2], meta=[flt, 3], version=version)
    if editor_lora:
        prompt["7"]["inputs"].update(lora_name=editor_lora, enabled=True)
    return prompt


def _pending(client: ComfyClient, character: str, run_id: str | None = None) -> list[int]:
    params: dict[str, Any] = {"status": "pending", "limit": 500}
    if run_id is not None:
        params["run"] = run_id
    r = client.get(f"/flenwheel/review/{character}/items", params=params)
    r.raise_for_status()
    return [i["id"] for i in r.json()["items"]]


def scripted_review(client: ComfyClient, character: str, correct: int = 2, reject: int | None = 1,
                    reasons: tuple[str, ...] = ("artefacts",), run_id: str | None = None) -> dict:
    """A scripted reviewer judges every pending candidate (of ``run_id``, or all) through the review routes, as a
    person would in the gallery: the first `correct` get a corrected instruction, the next `reject` (None: all
    the rest) are rejected, the rest approved. Returns the store's counts."""
    ids = _pending(client, character, run_id)
    if not ids:
        raise RuntimeError(f"nothing pending for review of {character}")
    decide = f"/flenwheel/review/{character}/decide"
    end = len(ids) if reject is None else correct + reject
    steps: list[tuple[list[int], dict[str, Any]]] = [
        (ids[:correct], {"action": "correct", "instruction": "rotate the camera 45 degrees to the left, "
                                                             "keep the face identical"}),
        (ids[correct:end], {"action": "reject", "reasons": list(reasons)}),
        (ids[end:], {"action": "approve"})]
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


# ---- the character loop on the tiny world ------------------------------------------------------------------

WORLD_PHOTOS = "flen_world_photos"   # input/<folder>/: drawings of the world's character, the 'photos'
WORLD_PHOTO_COUNT = 12
WORLD_PHOTO_SEED = 2101
WORLD_TOKEN = "ohwx_char"
# The world's FLUX model has 16 image tokens: a LoRA learns the character in 100 steps of 4 at 64 px (these are
# the settings tests/test_world_card.py measured the card margin with).
WORLD_TRAINING = {"precision": "fp32", "steps": 100, "rank": 8, "learning_rate": 2e-3, "resolution": 64, "seed": 1,
                  "checkpoint_every": 0, "sample_every": 0, "tensorboard": False,
                  "advanced": "bucket_multiple: 16\nbatch_size: 4\nguidance: 1.0"}
WORLD_RENDER = {"width": 64, "height": 64, "steps": 8, "guidance": 1.0}
# the tiny kit's editor LoRAs, which the shipped workflows' stacks name (tools/tiny_workflows.py)
KIT_EDITOR_LORAS = {f"{LORA_DIRNAME}/{name}" for name in LORA_FILES["qwen_edit"]}
# the editor LoRA's settings that gave the world's measured gain (tests/test_world_qwen.py)
WORLD_EDITOR_TRAINING = {"precision": "fp32", "steps": 300, "rank": 16, "learning_rate": 5e-3, "resolution": 64,
                         "seed": 1, "checkpoint_every": 0, "sample_every": 0, "tensorboard": False,
                         "advanced": "bucket_multiple: 16"}
# the synthetic set in the words the world's model was trained on (no comma inside a value: commas split them)
WORLD_SYNTH = {"prompts": "a photo of {token} person, {expression}, {angle}", "variations": 16,
               "template_values": "expression: neutral expression, smiling, angry expression, sad expression\n"
                                  "angle: front view, three-quarter view, side profile view"}


# the random tiny editor's edits show no face: the reviewer corrects a few (edit pairs for the editor's own LoRA) and
# rejects the rest, so none reaches the character's dataset
EDIT_REJECT_REASONS = ("identity_drift",)


def world_photos() -> list[tuple[str, Any, str]]:
    """(file name, drawing, the caption a reviewer would write for it) of each of the character's photos."""
    from engines import model_card as mc
    from tools import tiny_world as world

    out = []
    for k, v in enumerate(world.variations(WORLD_PHOTO_COUNT, WORLD_PHOTO_SEED)):
        caption = f"a photo of {WORLD_TOKEN} person, {mc.EXPRESSION_TEXT[v.expression]}, {mc.ANGLE_TEXT[v.angle]}"
        out.append((f"photo_{k + 1:02d}.png", v.draw(world.CHARACTER_IDENTITY), caption))
    return out


def install_world(base: Path) -> Path:
    """The world's models (built once per kit version and cached; see tiny_world.world_models) copied into the
    demo's models folder, and the character's photos into input/; returns the world cache's models folder."""
    from tools import tiny_world as world

    models = world.world_models()
    for sub in (Path("diffusers") / world.FLUX_DIRNAME, Path("diffusers") / world.QWEN_DIRNAME,
                Path("insightface") / "models" / world.FACE_PACK):
        dest = base / "models" / sub
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(models / sub, dest)
    photos = base / "input" / WORLD_PHOTOS
    photos.mkdir(parents=True, exist_ok=True)
    for name, image, _caption in world_photos():
        image.save(photos / name)
    return models


def world_workflow(name: str, character: str) -> dict:
    """A shipped workflow on the tiny world: the split-file loaders become the diffusers-folder loaders on the
    world's FLUX and Qwen-Image-Edit models, identity references come from the world's photos through the
    world's face pack. The workflows' camera and Lightning LoRAs are the tiny kit's, made for its editor's
    layout, not the world's: they are switched off (the world's editor was trained on the sweep's lines)."""
    from tools import tiny_world as world

    prompt = with_character(load_api_workflow(name), character)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "FLENFluxFileLoader":
            node["class_type"] = "FLENFluxLoader"
            node["inputs"] = {"model": world.FLUX_DIRNAME, "precision": "fp32"}
        elif kind == "FLENQwenEditFileLoader":
            node["class_type"] = "FLENQwenEditLoader"
            node["inputs"] = {"model": world.QWEN_DIRNAME, "precision": "fp32"}
        elif kind == "FLENLoraStack" and str(inputs.get("lora_name")) in KIT_EDITOR_LORAS:
            inputs["enabled"] = False
        elif kind == "FLENAngleSweep":
            inputs.update(width=world.SIZE, height=world.SIZE)
        elif kind == "FLENTrainEditorLoRA":
            inputs.update(WORLD_EDITOR_TRAINING)
        elif kind == "FLENIdentityReference":
            inputs.update(face_model=world.FACE_PACK, det_size=160)
        elif kind == "LoadImageSetFromFolderNode":
            inputs["folder"] = WORLD_PHOTOS
        elif kind == "FLENTrainCharacterLoRA":
            inputs.update(WORLD_TRAINING)
        elif kind == "FLENModelCard":
            inputs.update(WORLD_RENDER, cell_size=64, instance_token=WORLD_TOKEN)
        elif kind == "FLENFluxGenerate":
            inputs.update(WORLD_RENDER, **WORLD_SYNTH, instance_token=WORLD_TOKEN)
        elif kind == "FLENDatasetWriter":
            inputs["instance_token"] = f"{WORLD_TOKEN} person"
    return prompt


def world_enrich(character: str, version: str, editor_lora: str | None = None) -> dict:
    """enrich_for_review on the world: its photos as sources, its editor, its face pack as the identity. Both
    sides of the identity filter go to review, as runs of their own (:func:`enrich_runs`): the passed edits to be
    approved, the rejected ones to be corrected or rejected."""
    prompt = enrich_for_review(character, version, editor_lora, prompt=world_workflow("flywheel1_enrich", character))
    queue, flt = _node(prompt, "FLENReviewQueue"), _node(prompt, "FLENIdentityFilter")
    passed_run, rejected_run = enrich_runs(version)
    prompt[queue]["inputs"]["run_id"] = rejected_run
    passed = {**prompt[queue], "inputs": {**prompt[queue]["inputs"], "images": [flt, 0], "meta": [flt, 1],
                                          "run_id": passed_run}}
    prompt[str(max(int(k) for k in prompt) + 1)] = passed
    return prompt


def enrich_runs(version: str) -> tuple[str, str]:
    """The review runs of an enrichment on the world: the identity filter's passed side, then its rejected side."""
    return f"enrich-{version}-passed", f"enrich-{version}-rejected"


def review_enrichment(client: ComfyClient, character: str, version: str) -> dict:
    """The scripted reviewer on a world enrichment: approves what the identity filter passed, corrects the
    instruction of two rejected edits and rejects the other rejected ones; returns the store's counts."""
    passed_run, rejected_run = enrich_runs(version)
    counts: dict = {}
    if _pending(client, character, passed_run):
        counts = scripted_review(client, character, correct=0, reject=0, run_id=passed_run)
    if _pending(client, character, rejected_run):
        counts = scripted_review(client, character, correct=2, reject=None, reasons=EDIT_REJECT_REASONS,
                                 run_id=rejected_run)
    return counts


def queue_photos(client: ComfyClient, character: str) -> str:
    """The character's photos themselves go to review too: approved, they are the dataset's core."""
    run_id = "photos"
    client.run({"1": {"class_type": "LoadImageSetFromFolderNode",
                      "inputs": {"folder": WORLD_PHOTOS, "resize_method": "Stretch"}},
                "2": {"class_type": "FLENReviewQueue",
                      "inputs": {"images": ["1", 0], "character": character, "run_id": run_id, "version": "v1"}}},
               timeout=300)
    return run_id


def review_photos(client: ComfyClient, character: str, run_id: str) -> int:
    """The scripted reviewer looks at each queued photo (the image the gallery shows), recognises which drawing
    it is and approves it with a caption saying what it shows, as a person would type it in the gallery."""
    import io as _io

    import numpy as np
    from PIL import Image

    known = [(np.asarray(im.convert("RGB"), np.int16), caption) for _name, im, caption in world_photos()]
    ids = _pending(client, character, run_id)
    for item in ids:
        r = client.get(f"/flenwheel/review/{character}/image/{item}")
        r.raise_for_status()
        seen = np.asarray(Image.open(_io.BytesIO(r.content)).convert("RGB"), np.int16)
        caption = min(known, key=lambda k: float(np.abs(k[0] - seen).mean()) if k[0].shape == seen.shape
                      else float("inf"))[1]
        d = client.post(f"/flenwheel/review/{character}/decide",
                        {"ids": [item], "action": "approve", "who": "demo reviewer", "caption": caption})
        d.raise_for_status()
    return len(ids)


def _filter_text(outputs: dict, prompt: dict) -> str:
    """The identity filter's one-line summary (its text output is a JSON report)."""
    import json

    return str(json.loads(_text(outputs, _node(prompt, "FLENIdentityFilter")))["summary"])


def base_card_prompt(character: str, cards: list[str]) -> dict:
    """compare_versions with its first card the base model alone (every LoRA off), then the saved cards."""
    prompt = world_workflow("compare_versions", character)
    card_a, cmp_node = _node(prompt, "FLENModelCard"), _node(prompt, "FLENCompareVersions")
    stack = prompt[card_a]["inputs"]["lora_stack"][0]
    prompt[stack]["inputs"]["enabled"] = False
    prompt[card_a]["inputs"]["save_beside_lora"] = False
    prompt = {k: v for k, v in prompt.items()   # the workflow's second card and its stack are not needed
              if v["class_type"] not in ("FLENModelCard", "FLENLoraStack") or k in (card_a, stack)}
    prompt[cmp_node]["inputs"] = {"card_a": [card_a, 0], "save": True,
                                  "card_files": "\n".join(f"flenwheel/{character}/{c}.card.json" for c in cards)}
    return prompt


def run_loop(client: ComfyClient, base: Path, say) -> dict[str, Path]:
    """The whole flywheel, the character's side on the tiny world; returns what it made (label → path)."""
    c = CHARACTER
    out = workspace_dir(base / "output", c)
    loras = loras_dir(base / "models" / "loras", c)
    made: dict[str, Path] = {}

    say(f"1/9 the character's {WORLD_PHOTO_COUNT} photos (tiny-world drawings) → review queue; flywheel1_enrich: "
        "photos → angle sweep (Qwen edit + LoRA stack) → identity filter → review queue")
    photos_run = queue_photos(client, c)
    enrich = world_enrich(c, "v1")
    outputs = client.run(enrich, timeout=600)
    say("     identity filter on the world editor's edits: " + _filter_text(outputs, enrich))
    say("     (both sides go to review: the passed edits to approve, the filter's rejected side to correct)")
    approved = review_photos(client, c, photos_run)
    edits = review_enrichment(client, c, "v1")
    say(f"2/9 scripted reviewer, through the review routes: {approved} photos approved, each with a caption typed "
        f"in; edits: {edits}")

    say("3/9 flywheel1_train: approved → dataset v1 → char_lora_v1 (on the world's FLUX) → model card")
    train = world_workflow("flywheel1_train", c)
    outputs = client.run(train, timeout=600)
    say("     " + _text(outputs, _node(train, "FLENDatasetWriter")).splitlines()[0])
    say("     " + _text(outputs, _node(train, "FLENTrainCharacterLoRA")))
    say("     " + _text(outputs, _node(train, "FLENModelCard")).splitlines()[0])
    made.update({"dataset v1": out / "datasets" / "v1", "char_lora_v1": loras / "char_lora_v1.safetensors",
                 "model card v1": loras / "char_lora_v1.card.json"})

    say("4/9 flywheel1_synthesize: char_lora_v1 → FLUX synthetic set → identity filter → review queue (v2)")
    synth = world_workflow("flywheel1_synthesize", c)
    synth[_node(synth, "FLENLoraStack")]["inputs"]["lora_name"] = f"flenwheel/{c}/char_lora_v1.safetensors"
    synth[_node(synth, "FLENReviewQueue")]["inputs"]["version"] = "v2"
    outputs = client.run(synth, timeout=600)
    say("     identity filter: " + _filter_text(outputs, synth))
    say(f"     reviewed (the filter's passed side): {scripted_review(client, c, correct=0, reject=0)}")

    say("5/9 flywheel2_editor: corrections and approved edits → edit pairs v1 → qwen_lora_v1 (on the world's "
        "editor) → angle sweep with it")
    editor = world_workflow("flywheel2_editor", c)
    outputs = client.run(editor, timeout=600)
    say("     " + _text(outputs, _node(editor, "FLENTrainEditorLoRA")))
    made.update({"edit pairs v1": out / "edit_pairs" / "v1", "qwen_lora_v1": loras / "qwen_lora_v1.safetensors"})

    say("6/9 flywheel1_enrich again, with qwen_lora_v1 switched on in the stack")
    enrich2 = world_enrich(c, "v2", editor_lora=f"flenwheel/{c}/qwen_lora_v1.safetensors")
    outputs = client.run(enrich2, timeout=600)
    say("     identity filter with qwen_lora_v1: " + _filter_text(outputs, enrich2))
    say("     (the same photos and sweep lines the LoRA was trained on: held-out sources are measured by "
        "tests/test_world_qwen.py)")
    say(f"7/9 scripted reviewer (passed edits approved, two rejected ones corrected): "
        f"{review_enrichment(client, c, 'v2')}")

    say("8/9 flywheel1_train again: everything approved (photos, edits, synthetic) → dataset v2 → char_lora_v2 "
        "→ card")
    outputs = client.run(world_workflow("flywheel1_train", c), timeout=600)
    say("     " + _text(outputs, _node(train, "FLENDatasetWriter")).splitlines()[0])
    say("     " + _text(outputs, _node(train, "FLENTrainCharacterLoRA")))
    say("     " + _text(outputs, _node(train, "FLENModelCard")).splitlines()[0])
    made.update({"dataset v2": out / "datasets" / "v2", "char_lora_v2": loras / "char_lora_v2.safetensors",
                 "model card v2": loras / "char_lora_v2.card.json"})

    say("9/9 compare_versions: the model card of the base model alone, char_lora_v1 and char_lora_v2 (mean "
        "identity similarity to the photos; per row of the card)")
    cmp_prompt = base_card_prompt(c, ["char_lora_v1", "char_lora_v2"])
    outputs = client.run(cmp_prompt, timeout=600)
    table = _text(outputs, _node(cmp_prompt, "FLENCompareVersions"))
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
    say("the tiny world (cached after its first build, a few minutes on 2 cores): "
        f"{install_world(base)}")
    for old in (workspace_dir(base / "output", CHARACTER), loras_dir(base / "models" / "loras", CHARACTER)):
        if old.exists():  # a fresh loop each run: v1 and v2 again, not v3 and v4
            say(f"removing the previous demo run's {old}")
            shutil.rmtree(old)
    prepare_base_directory(base, None)
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
