"""The canvas in a real ComfyUI: one character per workflow, reading nodes that name the known
characters, and the shipped workflows' first run, notes, titles and defaults."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from review_prompts import review_prompt

from tools.demo import load_api_workflow, write_demo_inputs
from tools.tiny_workflows import TINY_SUBSTITUTIONS

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
UI = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "workflows").glob("*.json"))}
API = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "workflows" / "api").glob("*.json"))}


@pytest.mark.parametrize("name", sorted(API))
def test_a_workflow_names_its_character_once(name):
    api = API[name]
    typed = {k: v["inputs"]["character"] for k, v in api.items()
             if "character" in v["inputs"] and isinstance(v["inputs"]["character"], str)}
    users = [k for k, v in api.items() if isinstance(v["inputs"].get("character"), list)]
    assert len(typed) <= 1, f"{name}: the character is typed in {sorted(typed)}"
    if users:
        (char_node,) = typed
        assert api[char_node]["class_type"] == "FLENCharacter"
        assert all(api[k]["inputs"]["character"] == [char_node, 0] for k in users)


def test_a_typo_in_the_character_fails_naming_the_known_ones(comfy):
    known = "known_" + uuid.uuid4().hex[:8]
    comfy.run(review_prompt(known))
    typo = known[:-1] + "x"
    for name, node_type in (("flywheel1_train", "FLENLoadApproved"), ("flywheel2_editor", "FLENEditPairWriter")):
        prompt = load_api_workflow(name)
        (char_node,) = [k for k, v in prompt.items() if v["class_type"] == "FLENCharacter"]
        prompt[char_node]["inputs"]["character"] = typo
        error = comfy.run_error(prompt)
        assert error["node_type"] == node_type, error
        assert f"No character '{typo}'" in error["exception_message"] and known in error["exception_message"]
    shown = comfy.run({"c": {"class_type": "FLENCharacter", "inputs": {"character": typo}}})["c"]["text"][0]
    assert "no workspace yet" in shown and known in shown  # the node itself shows the typo before a run writes
    shown = comfy.run({"c": {"class_type": "FLENCharacter", "inputs": {"character": known}}})["c"]["text"][0]
    assert "existing workspace" in shown


@pytest.mark.parametrize("name", sorted(UI))
def test_every_shipped_workflow_has_its_note_title_and_description(comfy, name):
    notes = [n for n in UI[name]["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 200, name
    cards = comfy.get("/flenwheel/templates").json()["templates"]
    assert cards[name]["title"] == UI[name]["extra"]["title"] and cards[name]["title"] != name
    assert len(cards[name]["description"]) > 40


def test_qwen_loader_defaults_to_fp8_and_the_shipped_workflows_use_comfyuis_split_files(comfy):
    spec = comfy.get("/object_info/FLENQwenEditLoader").json()["FLENQwenEditLoader"]
    assert spec["input"]["required"]["precision"][1]["default"] == "fp8"
    loaders = [v for api in API.values() for v in api.values()
               if v["class_type"] in ("FLENQwenEditLoader", "FLENFluxLoader", "FLENQwenEditFileLoader",
                                      "FLENFluxFileLoader")]
    assert len(loaders) == 8 and {v["class_type"] for v in loaders} == {"FLENQwenEditFileLoader", "FLENFluxFileLoader"}
    qwen = {tuple(sorted(v["inputs"].items())) for v in loaders if v["class_type"] == "FLENQwenEditFileLoader"}
    assert qwen == {(("diffusion_model", "qwen_image_edit_2509_fp8_e4m3fn.safetensors"), ("precision", "auto"),
                     ("text_encoder", "qwen_2.5_vl_7b_fp8_scaled.safetensors"), ("vae", "qwen_image_vae.safetensors"))}
    flux = {v["inputs"]["diffusion_model"] for v in loaders if v["class_type"] == "FLENFluxFileLoader"}
    assert flux == {"flux1-dev.safetensors"}
    for name, trainer, slot in (("flywheel1_train", "FLENTrainCharacterLoRA", "flux_pipe"),
                                ("flywheel2_editor", "FLENTrainEditorLoRA", "qwen_pipe")):
        (node,) = [v for v in API[name].values() if v["class_type"] == trainer]
        assert node["inputs"]["model"] == "(the connected base pipe)"
        assert API[name][node["inputs"][slot][0]]["class_type"].endswith("FileLoader")


def test_synthetic_flux_first_run_needs_only_your_character_lora(comfy, comfy_server):
    """As shipped, with only the models swapped for the tiny kit's (the FLUX folder and the character LoRA the
    user has): the optional second LoRA must not stop the run."""
    write_demo_inputs(comfy_server.base / "input")
    prompt = json.loads(json.dumps(API["flen_synthetic_flux"]))
    tiny = TINY_SUBSTITUTIONS["flen_synthetic_flux"]
    assert set(tiny) == {"1", "2", "4", "5"}
    for node_id, values in tiny.items():
        prompt[node_id]["inputs"].update(values)
    entry = comfy.wait(comfy.queue(prompt), timeout=300)
    assert entry["status"]["status_str"] == "success"
