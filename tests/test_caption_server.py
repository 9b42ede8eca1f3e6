"""FLEN Caption Images in a real ComfyUI: the tiny Qwen2.5-VL's descriptions reach the dataset's .txt files and
manifest through FLENLoadApproved → FLENCaptionImages → FLENDatasetWriter (caption_source vlm / template+vlm)."""

from __future__ import annotations

import uuid

import pytest
from review_prompts import review_prompt

from engines import dataset as ds
from tools.tiny_models import QWEN_EDIT_DIRNAME

pytestmark = pytest.mark.server

TOKEN = "ohwx_char person"


def caption_prompt(character: str, source: str, caption_source: str, max_new_tokens: int = 10) -> dict:
    return {"load": {"class_type": "FLENLoadApproved", "inputs": {"character": character, "run_id": "",
                                                                 "version": ""}},
            "cap": {"class_type": "FLENCaptionImages",
                    "inputs": {"images": ["load", 0], "meta": ["load", 1], "source": source,
                               "instance_token": TOKEN, "max_new_tokens": max_new_tokens,
                               "max_pixels": 128 * 128}},
            "write": {"class_type": "FLENDatasetWriter",
                      "inputs": {"images": ["load", 0], "meta": ["cap", 1], "character": character,
                                 "instance_token": TOKEN, "caption_template": "{token}, {labels}",
                                 "caption_source": caption_source, "version": "new", "phase": "head",
                                 "kind": "auto", "near_duplicates": "keep", "phash_threshold": 6}}}


@pytest.fixture
def approved(comfy):
    character = "cap_" + uuid.uuid4().hex[:10]
    comfy.run(review_prompt(character, run_id="r1"))
    ids = [i["id"] for i in comfy.get(f"/flenwheel/review/{character}/items").json()["items"]]
    assert comfy.post(f"/flenwheel/review/{character}/decide",
                      {"ids": ids[:2], "action": "approve"}).status_code == 200
    return character


def _dataset(comfy_server, character, version="v1"):
    return ds.load_dataset(comfy_server.base / "output" / "flenwheel" / character / "datasets" / version)


def test_vlm_captions_reach_txt_files_and_manifest(comfy, comfy_server, approved):
    outputs = comfy.run(caption_prompt(approved, "diffusers/" + QWEN_EDIT_DIRNAME, "vlm"))
    assert "wrote 2 images" in outputs["write"]["text"][0]
    d = _dataset(comfy_server, approved)
    assert d.consistent and len(d.items) == 2
    records, _ = ds.read_manifest(d.path / "manifest.jsonl")
    for rec, item in zip(records, d.items, strict=True):
        meta = rec["meta"]
        description = meta["description"]
        assert description
        assert rec["caption"] == f"{TOKEN}, {description}"
        with open(item["caption_path"], encoding="utf-8") as fh:
            assert fh.read() == rec["caption"]
        prov = meta["caption_provenance"]
        assert prov["decoding"] == "greedy" and prov["max_new_tokens"] == 10 and prov["max_pixels"] == 128 * 128
        assert prov["source"] == QWEN_EDIT_DIRNAME


def test_template_plus_vlm_and_the_split_file_without_head(comfy, comfy_server, approved):
    comfy.run(caption_prompt(approved, "diffusers/" + QWEN_EDIT_DIRNAME, "template+vlm", max_new_tokens=6))
    records, _ = ds.read_manifest(_dataset(comfy_server, approved).path / "manifest.jsonl")
    for rec in records:
        assert rec["caption"].startswith(TOKEN + ", ")
        assert rec["caption"].endswith(rec["meta"]["description"])
    err = comfy.run_error(caption_prompt(approved, "text_encoders/flen-tiny/qwen_2.5_vl_tiny.safetensors", "vlm"))
    assert "no language-model head (lm_head.weight)" in err["exception_message"]


def test_a_vlm_caption_edited_in_the_review_reaches_the_dataset_as_the_reviewers(comfy, comfy_server):
    """Tiny Qwen2.5-VL → FLEN Review Queue → caption edited through the decide route → FLEN Load Approved →
    FLEN Dataset Writer (caption_source vlm): the edited caption is the one written, token enforced, and the
    manifest says 'reviewer'; the unedited one keeps the VLM caption."""
    from review_prompts import COLORS, captioned_review_prompt

    character = "capr_" + uuid.uuid4().hex[:10]
    comfy.run(captioned_review_prompt(character, "diffusers/" + QWEN_EDIT_DIRNAME, TOKEN, colors=COLORS[:3],
                                      run_id="r1"))
    items = comfy.get(f"/flenwheel/review/{character}/items").json()["items"]
    assert all(i["caption"] == i["meta"]["caption"] and i["caption"].startswith(TOKEN) for i in items)
    edited, kept, rejected = items
    decide = f"/flenwheel/review/{character}/decide"
    r = comfy.post(decide, {"ids": [edited["id"]], "action": "approve",
                            "caption": "sitting on a red chair,\nwarm evening light"})  # no token: the writer adds it
    assert r.status_code == 200 and r.json()["items"][0]["caption_edited"]
    assert comfy.post(decide, {"ids": [kept["id"]], "action": "approve"}).status_code == 200
    # an edit that is undone leaves nothing behind
    comfy.post(decide, {"ids": [rejected["id"]], "action": "approve", "caption": "never written"})
    comfy.post(decide, {"ids": [rejected["id"]], "action": "undo"})
    comfy.post(decide, {"ids": [rejected["id"]], "action": "reject", "reasons": ["artefacts"]})

    prompt = {"load": {"class_type": "FLENLoadApproved", "inputs": {"character": character, "run_id": "",
                                                                   "version": ""}},
              "write": {"class_type": "FLENDatasetWriter",
                        "inputs": {"images": ["load", 0], "meta": ["load", 1], "character": character,
                                   "instance_token": TOKEN, "caption_template": "{token}, {labels}",
                                   "caption_source": "vlm", "version": "new", "phase": "head", "kind": "auto",
                                   "near_duplicates": "keep", "phash_threshold": 6}}}
    outputs = comfy.run(prompt)
    assert "wrote 2 images" in outputs["write"]["text"][0]
    d = _dataset(comfy_server, character)
    assert d.consistent and len(d.items) == 2
    records, _ = ds.read_manifest(d.path / "manifest.jsonl")
    by_id = {rec["review"]["candidate_id"]: (rec, item) for rec, item in zip(records, d.items, strict=True)}
    rec, item = by_id[edited["id"]]
    assert rec["caption"] == f"{TOKEN}, sitting on a red chair, warm evening light"
    with open(item["caption_path"], encoding="utf-8") as fh:
        assert fh.read() == rec["caption"]
    assert rec["caption_source"] == "reviewer"
    assert rec["meta"]["caption_edited"] is True and rec["meta"]["description"] == edited["meta"]["description"]
    rec, item = by_id[kept["id"]]
    assert rec["caption"] == kept["caption"] == f"{TOKEN}, {kept['meta']['description']}"
    with open(item["caption_path"], encoding="utf-8") as fh:
        assert fh.read() == rec["caption"]
    assert rec["caption_source"] == "vlm" and "reviewer_caption" not in rec["meta"]
    assert "never written" not in (d.path / "manifest.jsonl").read_text(encoding="utf-8")
