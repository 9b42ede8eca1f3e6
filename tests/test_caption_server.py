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
