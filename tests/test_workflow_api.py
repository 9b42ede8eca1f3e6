"""workflows/api/<name>.json are generated from workflows/<name>.json by tools.workflow_api, and that
conversion agrees with the real ComfyUI frontend's graphToPrompt, also on muted / bypassed / virtual nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import workflow_api

REPO = Path(__file__).resolve().parents[1]
NAMES = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return workflow_api.fetch_object_info(comfy_server.url)


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_api_twin_is_the_generated_conversion_of_its_ui_file(object_info, name):
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text(encoding="utf-8"))
    twin = (REPO / "workflows" / "api" / f"{name}.json").read_text(encoding="utf-8")
    assert workflow_api.dumps(workflow_api.convert(ui, object_info)) == twin, (
        f"workflows/api/{name}.json is out of step: run `python -m tools.workflow_api`")


@pytest.mark.server
def test_check_mode_reports_a_stale_twin_and_regenerate_fixes_it(object_info, tmp_path):
    (tmp_path / "api").mkdir()
    for name in NAMES[:2]:
        (tmp_path / f"{name}.json").write_bytes((REPO / "workflows" / f"{name}.json").read_bytes())
        (tmp_path / "api" / f"{name}.json").write_bytes((REPO / "workflows" / "api" / f"{name}.json").read_bytes())
    assert workflow_api.regenerate(object_info, tmp_path, check=True) == []
    hand_edited = tmp_path / "api" / f"{NAMES[0]}.json"
    hand_edited.write_text(hand_edited.read_text().replace('"inputs"', '"inputs" ', 1))
    assert workflow_api.regenerate(object_info, tmp_path, check=True) == [NAMES[0]]
    assert workflow_api.regenerate(object_info, tmp_path) == [NAMES[0]]
    assert workflow_api.regenerate(object_info, tmp_path, check=True) == []


@pytest.mark.server
def test_unknown_node_type_is_a_clear_error(object_info):
    ui = {"nodes": [{"id": 1, "type": "NoSuchNode", "mode": 0, "inputs": [], "outputs": [],
                     "widgets_values": []}], "links": []}
    with pytest.raises(workflow_api.WorkflowError, match="NoSuchNode"):
        workflow_api.convert(ui, object_info)


def _node(nid, kind, inputs=(), outputs=(), values=None, mode=0, title=None, pos=(0, 0)):
    node = {"id": nid, "type": kind, "pos": [pos[0], pos[1]], "size": [300, 120], "flags": {}, "order": nid,
            "mode": mode, "inputs": list(inputs), "outputs": list(outputs), "properties": {}}
    if values is not None:
        node["widgets_values"] = values
    if title:
        node["title"] = title
    return node


def _tricky_workflow() -> dict:
    """Upload widget, seed control widget, bypass, reroute, primitive, notes, a muted loader."""
    nodes = [
        _node(1, "LoadImage", outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1]},
                                       {"name": "MASK", "type": "MASK", "links": None}],
              values=["flen_demo_face.png", "image"]),
        _node(2, "ImageInvert", mode=4, inputs=[{"name": "image", "type": "IMAGE", "link": 1}],
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [2]}]),
        _node(3, "Reroute", inputs=[{"name": "", "type": "*", "link": 2}],
              outputs=[{"name": "", "type": "IMAGE", "links": [3, 8]}], values=None),
        _node(4, "FLENSaveImages",
              inputs=[{"name": "images", "type": "IMAGE", "link": 3},
                      {"name": "meta", "type": "FLEN_META", "link": 7, "shape": 7},
                      {"name": "filename_prefix", "type": "STRING", "link": 4,
                       "widget": {"name": "filename_prefix"}}],
              values=["stale_prefix"]),
        _node(5, "PrimitiveNode", outputs=[{"name": "STRING", "type": "STRING", "links": [4],
                                            "widget": {"name": "filename_prefix"}}],
              values=["from_primitive"], title="prefix"),
        _node(6, "MarkdownNote", values=["# a note"]),
        _node(7, "Note", values=["another note"]),
        _node(8, "FLENFluxLoader", mode=2, outputs=[{"name": "flux_pipe", "type": "FLEN_FLUX_PIPE", "links": [5]}],
              values=["flen-tiny-flux", "fp32"]),
        _node(9, "FLENFluxGenerate",
              inputs=[{"name": "flux_pipe", "type": "FLEN_FLUX_PIPE", "link": 5},
                      {"name": "lora_stack", "type": "FLEN_LORA_STACK", "link": None, "shape": 7}],
              outputs=[{"name": "images", "type": "IMAGE", "links": [6]},
                       {"name": "meta", "type": "FLEN_META", "links": [7]}],
              values=["a [photo]", 64, 64, 2, 3.5, 42, "randomize", 1, "tok", 0, ""]),
        _node(10, "PreviewImage", inputs=[{"name": "images", "type": "IMAGE", "link": 6}]),
        _node(11, "ImageBatch", inputs=[{"name": "image1", "type": "IMAGE", "link": 8},
                                        {"name": "image2", "type": "IMAGE", "link": None}],
              outputs=[{"name": "IMAGE", "type": "IMAGE", "links": None}]),
    ]
    links = [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"],
             [4, 5, 0, 4, 2, "STRING"], [5, 8, 0, 9, 0, "FLEN_FLUX_PIPE"], [6, 9, 0, 10, 0, "IMAGE"],
             [7, 9, 1, 4, 1, "FLEN_META"], [8, 3, 0, 11, 0, "IMAGE"]]
    return {"last_node_id": 11, "last_link_id": 8, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def frontend_prompt(page, ui: dict) -> dict:
    """The API prompt ComfyUI's own frontend makes of a UI workflow (loadGraphData, then graphToPrompt)."""
    return page.evaluate(
        """async (wf) => {
            await window.app.loadGraphData(wf, true, false);
            const { output } = await window.app.graphToPrompt();
            return output;
        }""", ui)


@pytest.mark.browser
def test_conversion_matches_the_frontend_on_tricky_graphs(comfy_page, object_info):
    ui = _tricky_workflow()
    converted = frontend_prompt(comfy_page, ui)
    ours = workflow_api.convert(ui, object_info)
    assert {k: (v["class_type"], v["inputs"]) for k, v in ours.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in converted.items()}
    assert ours["4"]["inputs"]["filename_prefix"] == "from_primitive"
    assert ours["4"]["inputs"]["images"] == ["1", 0]            # through the reroute and the bypassed node
    assert "flux_pipe" not in ours["9"]["inputs"] and "8" not in ours  # muted loader left out
    assert ours["9"]["inputs"]["seed"] == 42 and ours["9"]["inputs"]["batch"] == 1


@pytest.mark.browser
@pytest.mark.parametrize("name", NAMES)
def test_shipped_workflow_converts_like_the_frontend(comfy_page, object_info, name):
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text(encoding="utf-8"))
    converted = frontend_prompt(comfy_page, ui)
    ours = workflow_api.convert(ui, object_info)
    assert {k: (v["class_type"], v["inputs"], v["_meta"]) for k, v in ours.items()} == \
        {k: (v["class_type"], v["inputs"], v["_meta"]) for k, v in converted.items()}
