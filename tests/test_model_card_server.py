"""FLENModelCard and FLENCompareVersions in a real ComfyUI, through POST /prompt, on the tiny FLUX and face pack."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from engines.model_card import DEFAULT_PROMPT_SET
from tools import tiny_models as tm
from tools.demo import output_files

pytestmark = pytest.mark.server

CHARACTER = "mc_alice"


@pytest.fixture(scope="module")
def versions(comfy_server, tiny_models):
    """char_lora_v1/v2 under models/loras/flenwheel/<character>/ and a reference photo in input/."""
    folder = comfy_server.base / "models" / "loras" / "flenwheel" / CHARACTER
    folder.mkdir(parents=True, exist_ok=True)
    for v, src in ((1, "flux_lora_a.safetensors"), (2, "flux_lora_b.safetensors")):
        shutil.copy(tiny_models / "loras" / tm.LORA_DIRNAME / src, folder / f"char_lora_v{v}.safetensors")
    inputs = comfy_server.base / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    tm.draw_test_face(1).save(inputs / "mc_reference.png")
    yield folder
    shutil.rmtree(folder)


def _card_nodes(prompt: dict, nid: int, version: int) -> str:
    """FLENLoraStack(char_lora_vN) → FLENModelCard (shares loader "1" and identity "3"); returns the card node id."""
    stack, card = str(nid), str(nid + 1)
    prompt[stack] = {"class_type": "FLENLoraStack",
                     "inputs": {"lora_name": f"flenwheel/{CHARACTER}/char_lora_v{version}.safetensors",
                                "strength": 1.0, "enabled": True}}
    prompt[card] = {"class_type": "FLENModelCard",
                    "inputs": {"flux_pipe": ["1", 0], "lora_stack": [stack, 0], "identity": ["3", 0],
                               "instance_token": "ohwx_alice", "prompt_set": DEFAULT_PROMPT_SET, "width": 64,
                               "height": 64, "steps": 1, "guidance": 3.5, "threshold": 0.4, "cell_size": 64,
                               "save_beside_lora": True}}
    prompt[str(nid + 2)] = {"class_type": "SaveImage",
                            "inputs": {"images": [card, 1], "filename_prefix": f"mc_grid_v{version}"}}
    return card


def _base_prompt() -> dict:
    return {
        "1": {"class_type": "FLENFluxLoader", "inputs": {"model": tm.FLUX_DIRNAME, "precision": "fp32"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "mc_reference.png"}},
        "3": {"class_type": "FLENIdentityReference",
              "inputs": {"images": ["2", 0], "face_model": tm.INSIGHTFACE_PACK, "det_size": 640}},
    }


@pytest.fixture
def prompt_set(comfy):
    """The node's default prompt set (the 18-cell benchmark), as the server offers it."""
    spec = comfy.get("/object_info/FLENModelCard").json()["FLENModelCard"]
    default = spec["input"]["required"]["prompt_set"][1]["default"]
    assert default == DEFAULT_PROMPT_SET
    return default


def test_model_cards_of_two_versions_and_their_comparison_are_written(comfy, comfy_server, versions, prompt_set):
    assert len([ln for ln in prompt_set.splitlines() if ln.strip() and not ln.startswith("#")]) == 18
    prompt = _base_prompt()
    v1 = _card_nodes(prompt, 10, 1)
    v2 = _card_nodes(prompt, 20, 2)
    prompt["30"] = {"class_type": "FLENCompareVersions",
                    "inputs": {"card_a": [v1, 0], "card_b": [v2, 0], "card_files": "", "save": True}}
    prompt["31"] = {"class_type": "SaveImage", "inputs": {"images": ["30", 0], "filename_prefix": "mc_compare"}}
    prompt["32"] = {"class_type": "SaveImage", "inputs": {"images": ["30", 1], "filename_prefix": "mc_chart"}}
    outputs = comfy.run(prompt, timeout=240)

    for version, node in ((1, v1), (2, v2)):
        report_path = versions / f"char_lora_v{version}.card.json"
        png_path = versions / f"char_lora_v{version}.card.png"
        assert report_path.is_file() and png_path.is_file()
        report = json.loads(report_path.read_text())
        assert report["lora"]["name"] == f"flenwheel/{CHARACTER}/char_lora_v{version}.safetensors"
        assert len(report["cells"]) == 18 and report["aggregates"]["cells"] == 18
        assert report["cells"][0]["prompt"].count("ohwx_alice") == 1
        assert report["identity"]["pack"] == tm.INSIGHTFACE_PACK
        assert f"saved {report_path}" in outputs[node]["text"][0]
        with Image.open(png_path) as im:
            assert im.size == tuple(report["layout"]["size"])
        grid = output_files(comfy_server.base, {"g": outputs[str(int(node) + 1)]})
        assert len(grid) == 1
        with Image.open(grid[0]) as saved, Image.open(png_path) as card_png:
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(card_png.convert("RGB")))

    table = outputs["30"]["text"][0]
    assert "char_lora_v2 vs char_lora_v1" in table and "mean_similarity" in table
    model_cards = comfy_server.base / "output" / "flenwheel" / CHARACTER / "model_cards"
    names = sorted(p.name for p in model_cards.iterdir())
    assert "char_lora_v1_vs_char_lora_v2.compare.json" in names
    assert "char_lora_v1_vs_char_lora_v2.compare.png" in names and "char_lora_v1_vs_char_lora_v2.chart.png" in names
    comparison = json.loads((model_cards / "char_lora_v1_vs_char_lora_v2.compare.json").read_text())
    assert comparison["versions"] == ["char_lora_v1", "char_lora_v2"] and len(comparison["compared_cells"]) == 18
    assert len(output_files(comfy_server.base, {"a": outputs["31"], "b": outputs["32"]})) == 2

    # the saved cards, listed by name under models/loras: v1 against itself shows zero deltas
    files = f"flenwheel/{CHARACTER}/char_lora_v1.card.json\nflenwheel/{CHARACTER}/char_lora_v1.card.json"
    outputs = comfy.run({
        "1": {"class_type": "FLENCompareVersions", "inputs": {"card_files": files, "save": True}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": "mc_self"}}})
    assert "better on 0 cell(s), worse on 0, equal on 18" in outputs["1"]["text"][0]
    self_cmp = json.loads((model_cards / "char_lora_v1_vs_char_lora_v1.compare.json").read_text())
    assert all(d in (0, None) for m in self_cmp["deltas"].values() for d in m.values())


def test_a_second_card_of_the_same_version_gets_a_new_name(comfy, versions, prompt_set):
    first = versions / "char_lora_v1.card.json"
    assert first.exists(), "needs the cards written by the test above"
    before = first.read_bytes()
    prompt = _base_prompt()
    card = _card_nodes(prompt, 10, 1)
    prompt[card]["inputs"]["cell_size"] = 80   # a changed input, so ComfyUI does not serve the cached result
    comfy.run(prompt, timeout=240)
    assert first.read_bytes() == before
    assert (versions / "char_lora_v1.card-2.json").is_file() and (versions / "char_lora_v1.card-2.png").is_file()


def test_bad_inputs_are_clear_errors(comfy, versions, prompt_set):
    prompt = _base_prompt()
    card = _card_nodes(prompt, 10, 1)
    prompt[card]["inputs"]["prompt_set"] = "neutral | front | one | a photo of {token}"
    error = comfy.run_error(prompt)
    assert error["node_type"] == "FLENModelCard" and "seed 'one' is not a whole number" in error["exception_message"]
    error = comfy.run_error({"1": {"class_type": "FLENCompareVersions",
                                   "inputs": {"card_files": "flenwheel/nobody/char_lora_v9.card.json", "save": False}}})
    assert error["node_type"] == "FLENCompareVersions"
    assert "Model card 'flenwheel/nobody/char_lora_v9.card.json' not found under models/loras" in \
        error["exception_message"]


def test_flux_generate_fills_templates_and_the_instance_token(comfy, comfy_server):
    prompt = {
        "1": {"class_type": "FLENFluxLoader", "inputs": {"model": tm.FLUX_DIRNAME, "precision": "fp32"}},
        "2": {"class_type": "FLENFluxGenerate",
              "inputs": {"flux_pipe": ["1", 0], "prompts": "a photo of {token}, {expression}, {setting}",
                         "width": 64, "height": 64, "steps": 1, "guidance": 3.5, "seed": 11, "batch": 1,
                         "instance_token": "ohwx_alice", "variations": 3,
                         "template_values": "setting: beach, office"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "mc_varied"}},
    }
    outputs = comfy.run(prompt)
    files = output_files(comfy_server.base, outputs)
    assert len(files) == 3
    for f in files:
        with Image.open(f) as im:
            assert im.size == (64, 64)
    prompt["2"]["inputs"]["variations"] = 0
    prompt["2"]["inputs"]["prompts"] = "a photo of {token}"
    prompt["2"]["inputs"]["instance_token"] = ""
    error = comfy.run_error(prompt)
    assert error["node_type"] == "FLENFluxGenerate" and "no instance token is set" in error["exception_message"]
