"""The pack in a real ComfyUI 0.3.64: nodes, web extension, templates, a shipped workflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tools.comfy_queue import PromptFailed
from tools.demo import load_api_workflow, output_files, write_demo_inputs

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
EXPECTED_NODES = {"FLENLoraStack", "FLENFluxLoader", "FLENFluxGenerate"}
EXPECTED_NODES |= {"FLENReviewQueue", "FLENLoadApproved", "FLENReviewGate"}  # review
EXPECTED_NODES |= {"FLENIdentityReference", "FLENIdentityFilter"}  # identity
EXPECTED_NODES |= {"FLENApplyLoraStack", "FLENQwenEditLoader", "FLENQwenEdit", "FLENAngleSweep",
                   "FLENSaveImages"}
EXPECTED_NODES |= {"FLENDatasetWriter", "FLENEditPairWriter"}
EXPECTED_NODES |= {"FLENModelCard", "FLENCompareVersions"}
EXPECTED_NODES |= {"FLENTrainCharacterLoRA", "FLENTrainEditorLoRA"}
EXPECTED_NODES |= {"FLENAIToolkitLauncher"}
EXPECTED_NODES |= {"FLENCharacter"}  # one character per workflow
EXPECTED_NODES |= {"FLENQwenEditFileLoader", "FLENFluxFileLoader"}  # ComfyUI's split files
EXPECTED_NODES |= {"FLENQwenEditFromComfy", "FLENFluxFromComfy"}  # ComfyUI's own MODEL / CLIP / VAE
EXPECTED_NODES |= {"FLENCaptionImages"}  # captions from Qwen2.5-VL


def test_object_info_lists_pack_nodes_with_categories_tooltips_and_docs(comfy):
    info = comfy.get("/object_info").json()
    pack = {k: v for k, v in info.items() if v.get("python_module", "").endswith("FLENwheel")}
    assert set(pack) == EXPECTED_NODES
    for node_id, spec in pack.items():
        assert spec["category"].startswith("FLENwheel/"), node_id
        assert (REPO / "web" / "docs" / f"{node_id}.md").is_file(), f"no doc page for {node_id}"
        for section in ("required", "optional"):
            for name, (_type, opts) in spec["input"].get(section, {}).items():
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_log_has_no_import_failure_and_pack_loaded(comfy_server):
    log = comfy_server.log()
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if "FLENwheel" in line)
    assert "custom_nodes/FLENwheel" in log  # ComfyUI's import-time listing names the pack


def test_web_extension_is_served(comfy):
    scripts = comfy.get("/extensions").json()
    assert "/extensions/FLENwheel/js/flenwheel.js" in scripts
    js = comfy.get("/extensions/FLENwheel/js/flenwheel.js")
    assert js.status_code == 200 and "FLENwheel.core" in js.text
    assert comfy.get("/flenwheel/status").json() == {"pack": "FLENwheel", "version": "0.1.0"}


def test_shipped_workflows_are_listed_as_templates(comfy):
    templates = comfy.get("/api/workflow_templates").json()
    shipped = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert sorted(templates["FLENwheel"]) == shipped


def test_lora_stack_node_offers_loras_from_models_folder(comfy):
    spec = comfy.get("/object_info/FLENLoraStack").json()["FLENLoraStack"]
    options = spec["input"]["required"]["lora_name"][1]["options"]
    assert "flen-tiny/flux_lora_a.safetensors" in options
    assert "flen-tiny/qwen_edit_lora_b.safetensors" in options


def test_shipped_flux_workflow_runs_and_saves_images(comfy, comfy_server):
    outputs = comfy.run(load_api_workflow("flen_synthetic_flux"))
    files = output_files(comfy_server.base, outputs)
    assert len(files) == 2  # two prompt lines × batch 1
    for f in files:
        with Image.open(f) as im:
            assert im.size == (64, 64)
            saved_prompt = json.loads(im.info["prompt"])
        loras = [n["inputs"]["lora_name"] for n in saved_prompt.values() if n["class_type"] == "FLENLoraStack"]
        assert loras == ["flen-tiny/flux_lora_a.safetensors"]  # the optional second LoRA ships bypassed
    a, b = (Image.open(f).convert("RGB") for f in files)
    assert a.tobytes() != b.tobytes()  # different prompts and seeds give different images


def test_unknown_lora_is_refused_with_its_name(comfy):
    prompt = load_api_workflow("flen_synthetic_flux")
    prompt["2"]["inputs"]["lora_name"] = "not_there.safetensors"
    error = comfy.run_error(prompt)
    assert error["node_type"] == "FLENLoraStack"
    assert "LoRA 'not_there.safetensors' not found in models/loras" in error["exception_message"]


def test_a_switched_off_lora_need_not_exist_yet(comfy, comfy_server):
    """flywheel1_enrich ships its editor-LoRA slot off, naming qwen_lora_v1 before flywheel 2 has made it: the
    first run must go through; the same entry switched on fails naming the file."""
    write_demo_inputs(comfy_server.base / "input")
    shipped = json.loads((Path(__file__).resolve().parents[1] / "workflows" / "api" / "flywheel1_enrich.json")
                         .read_text(encoding="utf-8"))["7"]["inputs"]
    assert shipped["enabled"] is False and not shipped["lora_name"].startswith("flen-tiny/")
    prompt = load_api_workflow("flywheel1_enrich")
    prompt["7"]["inputs"].update(lora_name=shipped["lora_name"], enabled=False)
    outputs = comfy.run(prompt)
    assert outputs
    prompt["7"]["inputs"]["enabled"] = True
    error = comfy.run_error(prompt)
    assert error["node_type"] == "FLENLoraStack"
    assert f"LoRA '{shipped['lora_name']}' not found in models/loras" in error["exception_message"]


def test_generate_with_empty_prompt_reports_what_to_do(comfy):
    prompt = load_api_workflow("flen_synthetic_flux")
    prompt["4"]["inputs"]["prompts"] = "  \n \n"
    error = comfy.run_error(prompt)
    assert error["node_type"] == "FLENFluxGenerate"
    assert "prompt box is empty" in error["exception_message"]


def test_a_prompt_with_an_invalid_output_branch_is_refused_not_half_run(comfy):
    """ComfyUI runs the valid outputs of a prompt and silently drops the others: the client refuses instead
    (the switched-off-LoRA test above once passed on a prompt whose every output had been dropped)."""
    prompt = load_api_workflow("flywheel1_enrich")
    prompt["1"]["inputs"]["folder"] = "no_such_folder_here"  # only the branches below node 1 become invalid
    with pytest.raises(PromptFailed) as refused:
        comfy.queue(prompt)
    message = str(refused.value)
    assert "would skip part of the prompt" in message
    assert "LoadImageSetFromFolderNode" in message and "no_such_folder_here" in message
    queue = comfy.get("/queue").json()
    assert not queue["queue_pending"] and not queue["queue_running"]
