"""Every shipped API workflow runs to success through POST /prompt on the tiny models."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from tools.demo import (
    enrich_for_review,
    load_api_workflow,
    scripted_review,
    with_character,
    write_demo_inputs,
)
from tools.tiny_workflows import TINY_SUBSTITUTIONS

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
NAMES = sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json"))
# These start from review decisions: the test queues candidates and a scripted reviewer judges them first.
FROM_REVIEW = {"flywheel1_train", "flywheel2_editor"}


@pytest.fixture(scope="module")
def inputs(comfy_server):
    write_demo_inputs(comfy_server.base / "input")


@pytest.mark.parametrize("name", NAMES)
def test_tiny_substitutions_name_existing_nodes_and_inputs(name):
    """tools/demo.py patches the twins by node id: the ids and input names must stay as shipped."""
    assert name in TINY_SUBSTITUTIONS, f"no tiny-model substitutions for workflows/api/{name}.json"
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    for node_id, values in TINY_SUBSTITUTIONS[name].items():
        assert node_id in api, f"{name}: node {node_id} is gone"
        assert set(values) <= set(api[node_id]["inputs"]), (name, node_id, set(values) - set(api[node_id]["inputs"]))


def _by_class(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_to_success_on_the_tiny_models(comfy, comfy_server, inputs, name):
    prompt = load_api_workflow(name)
    if name in FROM_REVIEW:
        character = "wf_" + uuid.uuid4().hex[:8]
        comfy.run(enrich_for_review(character), timeout=600)
        counts = scripted_review(comfy, character)
        # 3 photos × 4 head angles: 2 corrected, 1 rejected, the other 9 approved
        assert counts["corrected"] == 2 and counts["rejected"] == 1 and counts["approved"] == 9, counts
        with_character(prompt, character)
    entry = comfy.wait(comfy.queue(prompt), timeout=600)
    assert entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    for node_id in _by_class(prompt, "FLENIdentityFilter"):
        table = json.loads(outputs[node_id]["text"][0])
        assert table["passed"] + table["rejected"] == len(table["rows"]) > 0
    for node_id in _by_class(prompt, "FLENIdentityReference"):
        assert "3 reference photo(s) used" in outputs[node_id]["text"][0]
    loras = Path(comfy_server.base, "models", "loras")
    if name == "flywheel1_train":
        (train,) = _by_class(prompt, "FLENTrainCharacterLoRA")
        lora = f"flenwheel/{character}/char_lora_v1.safetensors"
        assert lora in outputs[train]["text"][0]
        assert (loras / lora).is_file() and (loras / lora).with_suffix(".card.json").is_file()
        (writer,) = _by_class(prompt, "FLENDatasetWriter")
        assert "9" in outputs[writer]["text"][0]
        assert Path(comfy_server.base, "output", "flenwheel", character, "datasets", "v1").is_dir()
    if name == "flywheel2_editor":
        (train,) = _by_class(prompt, "FLENTrainEditorLoRA")
        lora = f"flenwheel/{character}/qwen_lora_v1.safetensors"
        assert lora in outputs[train]["text"][0] and (loras / lora).is_file()
        assert Path(comfy_server.base, "output", "flenwheel", character, "edit_pairs", "v1").is_dir()
        (preview,) = _by_class(prompt, "PreviewImage")
        assert len(outputs[preview]["images"]) == 3 * 4
    if name == "compare_versions":
        (cmp_id,) = _by_class(prompt, "FLENCompareVersions")
        assert "flux_lora_b vs flux_lora_a" in outputs[cmp_id]["text"][0]
        folder = Path(comfy_server.base, "output", "flenwheel", "model_cards")
        assert any(p.name.endswith(".compare.json") for p in folder.iterdir())


def test_interactive_gate_waits_for_the_reviewer_and_feeds_the_dataset(comfy, comfy_server, inputs):
    """The tiny editor's images have no face, so the test feeds the gate the filter's rejected side; a scripted
    reviewer judges the batch through the review routes, as a person would in the gallery."""
    character = "wf_" + uuid.uuid4().hex[:8]
    prompt = load_api_workflow("flywheel_interactive")
    gate, writer = _by_class(prompt, "FLENReviewGate")[0], _by_class(prompt, "FLENDatasetWriter")[0]
    (flt,) = _by_class(prompt, "FLENIdentityFilter")
    prompt[gate]["inputs"].update(images=[flt, 2], meta=[flt, 3], character=character, timeout_s=0)
    prompt[writer]["inputs"]["character"] = character
    pid = comfy.queue(prompt)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        waiting = [w for w in comfy.get("/flenwheel/review/waiting").json()["waiting"] if w["character"] == character]
        if waiting:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the review gate never waited")
    ids = [i["id"] for i in comfy.get(f"/flenwheel/review/{character}/items").json()["items"]]
    assert len(ids) == 3 * 4  # 3 source photos × the preset's 4 head angles, all rejected (no face)
    r = comfy.post(f"/flenwheel/review/{character}/decide", {"ids": ids[:2], "action": "approve"})
    assert r.status_code == 200, r.text
    time.sleep(0.5)
    assert comfy.get(f"/history/{pid}").json().get(pid) is None  # still waiting for the rest
    r = comfy.post(f"/flenwheel/review/{character}/decide", {"ids": ids[2:], "action": "reject",
                                                            "reasons": ["artefacts"]})
    assert r.status_code == 200, r.text
    outputs = comfy.wait(pid, timeout=120)["outputs"]
    summary = outputs[writer]["text"][0]
    assert "2" in summary and "v1" in summary, summary
    datasets = comfy_server.base / "output" / "flenwheel" / character / "datasets"
    assert (datasets / "v1").is_dir()
