"""Datasets in a real ComfyUI: review queue → decisions over the review routes → FLENLoadApproved →
FLENDatasetWriter through POST /prompt; edit pairs from corrections; frozen versions refused."""

from __future__ import annotations

import json
import uuid

import pytest
from PIL import Image
from review_prompts import COLORS, review_prompt

from engines import dataset as ds

pytestmark = pytest.mark.server



def rgb(c: int) -> tuple[int, int, int]:
    return (c >> 16 & 255, c >> 8 & 255, c & 255)


def writer_prompt(character: str, version: str = "new", run_id: str = "") -> dict:
    return {"load": {"class_type": "FLENLoadApproved", "inputs": {"character": character, "run_id": run_id,
                                                                 "version": ""}},
            "write": {"class_type": "FLENDatasetWriter",
                      "inputs": {"images": ["load", 0], "meta": ["load", 1], "character": character,
                                 "instance_token": "ohwx_char person", "caption_template": "{token}, {labels}",
                                 "version": version, "phase": "head", "kind": "auto", "near_duplicates": "flag",
                                 "phash_threshold": 6, "class_prompt": "a photo of a person"}}}


@pytest.fixture
def judged(comfy):
    """Four candidates queued; over HTTP: 0 and 2 approved, 1 rejected, 3 approved then undone."""
    character = "ds_" + uuid.uuid4().hex[:10]
    comfy.run(review_prompt(character, run_id="night1"))
    ids = [i["id"] for i in comfy.get(f"/flenwheel/review/{character}/items").json()["items"]]
    decide = f"/flenwheel/review/{character}/decide"
    assert comfy.post(decide, {"ids": [ids[0], ids[2]], "action": "approve", "who": "ann"}).status_code == 200
    assert comfy.post(decide, {"ids": [ids[1]], "action": "reject", "reasons": ["identity_drift"]}).status_code == 200
    assert comfy.post(decide, {"ids": [ids[3]], "action": "approve"}).status_code == 200
    assert comfy.post(decide, {"ids": [ids[3]], "action": "undo"}).status_code == 200
    return character, ids


def test_load_approved_into_dataset_writer_writes_only_approved_with_provenance(comfy, comfy_server, judged):
    character, ids = judged
    outputs = comfy.run(writer_prompt(character))
    summary = outputs["write"]["text"][0]
    assert summary.startswith("Created dataset v1") and "wrote 2 images" in summary
    vdir = comfy_server.base / "output" / "flenwheel" / character / "datasets" / "v1"
    d = ds.load_dataset(vdir)
    assert d.consistent and not d.notes and d.counts["images"] == 2 and d.counts["head"] == 2
    colours = []
    for item in d.items:
        with Image.open(item["image_path"]) as im:
            colours.append(im.convert("RGB").getpixel((5, 5)))
    assert colours == [rgb(COLORS[0]), rgb(COLORS[2])]
    for item, cid in zip(d.items, [ids[0], ids[2]], strict=True):
        review = item["review"]
        assert review["candidate_id"] == cid and review["status"] == "approved" and review["decision"] == "approve"
        assert review["who"] == "ann" and review["at"] > 0 and review["run_id"] == "night1"
        assert item["caption"] == "ohwx_char person" and item["kind"] == "pristine"
        assert item["source"].endswith(".png") and "candidates" in item["source"]
        assert (vdir / item["caption_file"]).read_text() == "ohwx_char person"
    assert d.info["class_prompt"] == "a photo of a person" and d.info["status"] == "draft"

    # Re-queued after another approval: the loader re-runs, the writer adds a new version.
    comfy.post(f"/flenwheel/review/{character}/decide", {"ids": [ids[3]], "action": "approve"})
    outputs = comfy.run(writer_prompt(character))
    assert "Created dataset v2" in outputs["write"]["text"][0]
    assert ds.load_dataset(vdir.parent / "v2").counts["images"] == 3
    assert ds.load_dataset(vdir).counts["images"] == 2  # v1 untouched


def test_frozen_version_is_refused_through_the_queue(comfy, comfy_server, judged):
    character, _ids = judged
    comfy.run(writer_prompt(character))
    vdir = comfy_server.base / "output" / "flenwheel" / character / "datasets" / "v1"
    ds.freeze(vdir, by="test trainer")
    error = comfy.run_error(writer_prompt(character, version="v1", run_id="night1"))
    assert error["node_type"] == "FLENDatasetWriter"
    assert "is frozen (used by test trainer)" in error["exception_message"]
    assert ds.load_dataset(vdir).counts["images"] == 2


def test_empty_batch_is_a_clear_error(comfy):
    character = "ds_" + uuid.uuid4().hex[:10]
    comfy.run(review_prompt(character, run_id="r"))  # nothing approved
    error = comfy.run_error(writer_prompt(character))
    assert error["node_type"] == "FLENDatasetWriter" and "batch is empty" in error["exception_message"]


def test_edit_pair_writer_from_corrections(comfy, comfy_server, judged):
    character, ids = judged
    decide = f"/flenwheel/review/{character}/decide"
    comfy.post(decide, {"ids": [ids[1]], "action": "correct", "instruction": "make the face green"})
    prompt = {"pairs": {"class_type": "FLENEditPairWriter",
                        "inputs": {"character": character, "include": "corrections only", "controls": 0,
                                   "run_id": "", "version": ""}}}
    outputs = comfy.run(prompt)
    assert "Wrote edit-pair set v1" in outputs["pairs"]["text"][0]
    d = ds.load_dataset(comfy_server.base / "output" / "flenwheel" / character / "edit_pairs" / "v1")
    assert d.consistent and d.counts["pairs"] == 1 and d.counts["controls"] == 1
    (item,) = d.items
    assert item["candidate_id"] == ids[1] and item["origin"] == "relabelled"
    assert (d.path / "targets" / "{}.txt".format(item["file"].split("/")[1][:-4])).read_text() == \
        "make the face green"
    with Image.open(d.path / item["controls"][0]["file"]) as im:
        assert im.convert("RGB").getpixel((0, 0)) == rgb(COLORS[0])  # the source is the control
    with Image.open(d.path / item["file"]) as im:
        assert im.convert("RGB").getpixel((0, 0)) == rgb(COLORS[1])  # what the editor made is the target
    assert json.loads(json.dumps(d.as_flen_dataset()))["kind"] == "edit_pairs"
    # approved candidates without an instruction are not edits: nothing complete → a clear error
    prompt["pairs"]["inputs"]["include"] = "approved edits only"
    error = comfy.run_error(prompt)
    assert error["node_type"] == "FLENEditPairWriter"
    assert "No complete edit pair" in error["exception_message"] and "not an edit" in error["exception_message"]


SCOPED_COLORS = [0xFF0000, 0x00FF00, 0x0000FF, 0xFFFF00, 0xFF00FF, 0x00FFFF]
SCOPES = [("r1", "v1"), ("r2", "v1"), ("r2", "v2")]  # two candidates each: the first approved, the second corrected


@pytest.fixture
def scoped(comfy):
    character = "sc_" + uuid.uuid4().hex[:10]
    for k, (run_id, version) in enumerate(SCOPES):
        prompt = review_prompt(character, colors=SCOPED_COLORS[2 * k:2 * k + 2], run_id=run_id)
        prompt["queue"]["inputs"]["version"] = version
        comfy.run(prompt)
    items = comfy.get(f"/flenwheel/review/{character}/items").json()["items"]
    ids = sorted(i["id"] for i in items)
    assert len(ids) == 6
    by_id = {i["id"]: i for i in items}
    assert [(by_id[i]["run_id"], by_id[i]["version"]) for i in ids] == [s for s in SCOPES for _ in range(2)]
    decide = f"/flenwheel/review/{character}/decide"
    assert comfy.post(decide, {"ids": ids[0::2], "action": "approve"}).status_code == 200
    for i in ids[1::2]:
        assert comfy.post(decide, {"ids": [i], "action": "correct", "instruction": f"fix {i}"}).status_code == 200
    return character, ids


@pytest.mark.parametrize("run_id, version, expected", [
    ("", "", [0, 2, 4]), ("r2", "", [2, 4]), ("", "v1", [0, 2]), ("r2", "v2", [4]), ("r1", "v1", [0]),
])
def test_load_approved_keeps_to_the_run_and_version_asked_for(comfy, comfy_server, scoped, run_id, version,
                                                              expected):
    character, ids = scoped
    prompt = {"load": {"class_type": "FLENLoadApproved",
                       "inputs": {"character": character, "run_id": run_id, "version": version}},
              "save": {"class_type": "SaveImage", "inputs": {"images": ["load", 0], "filename_prefix": character}},
              "meta": {"class_type": "PreviewAny", "inputs": {"source": ["load", 1]}}}
    outputs = comfy.run(prompt)
    colours = []
    for img in outputs["save"]["images"]:
        with Image.open(comfy_server.base / "output" / img["subfolder"] / img["filename"]) as im:
            colours.append(im.convert("RGB").getpixel((0, 0)))
    assert colours == [rgb(SCOPED_COLORS[k]) for k in expected]
    metas = json.loads(outputs["meta"]["text"][0])
    assert [m["candidate_id"] for m in metas] == [ids[k] for k in expected]
    assert all((not run_id or m["run_id"] == run_id) and (not version or m["version"] == version) for m in metas)


def test_edit_pair_writer_keeps_to_the_run_and_version_asked_for(comfy, comfy_server, scoped):
    character, ids = scoped
    pairs_root = comfy_server.base / "output" / "flenwheel" / character / "edit_pairs"
    for n, (run_id, version, expected) in enumerate([("r2", "", [3, 5]), ("", "v1", [1, 3]), ("r2", "v1", [3]),
                                                     ("", "", [1, 3, 5])], start=1):
        prompt = {"pairs": {"class_type": "FLENEditPairWriter",
                            "inputs": {"character": character, "include": "corrections only", "controls": 0,
                                       "run_id": run_id, "version": version}}}
        assert f"Wrote edit-pair set v{n}" in comfy.run(prompt)["pairs"]["text"][0]
        d = ds.load_dataset(pairs_root / f"v{n}")
        assert sorted(item["candidate_id"] for item in d.items) == [ids[k] for k in expected], (run_id, version)
