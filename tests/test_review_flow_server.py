"""What flows into the review store from the real nodes: identity scores from FLENIdentityFilter, each
candidate's own source from the angle sweep, and edit pairs whose control is the edit's own source."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
from PIL import Image

from tools import tiny_models as tm
from tools.demo import DEMO_SOURCES, enrich_for_review, write_demo_inputs

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def faces(comfy_server):
    folder = comfy_server.base / "input"
    folder.mkdir(parents=True, exist_ok=True)
    images = {"flow_ref_a.png": tm.draw_test_face(1), "flow_ref_b.png": tm.draw_test_face(1, offset=(12, -8)),
              "flow_same.png": tm.draw_test_face(1, offset=(-6, 4)), "flow_other.png": tm.draw_test_face(2)}
    for name, img in images.items():
        img.save(folder / name)
    write_demo_inputs(folder)
    return images


def _filter_prompt(character: str | None = None, gate_threshold: float = 0.5) -> dict:
    """Two reference photos → bank; two candidates (same face, another face) → filter (everything passes) →
    review gate that times out at once with approve_above_score."""
    p = {f"l{k}": {"class_type": "LoadImage", "inputs": {"image": name}}
         for k, name in enumerate(["flow_ref_a.png", "flow_ref_b.png", "flow_same.png", "flow_other.png"])}
    p["refs"] = {"class_type": "ImageBatch", "inputs": {"image1": ["l0", 0], "image2": ["l1", 0]}}
    p["cands"] = {"class_type": "ImageBatch", "inputs": {"image1": ["l2", 0], "image2": ["l3", 0]}}
    p["bank"] = {"class_type": "FLENIdentityReference",
                 "inputs": {"images": ["refs", 0], "face_model": tm.INSIGHTFACE_PACK, "det_size": 640}}
    p["filter"] = {"class_type": "FLENIdentityFilter",
                   "inputs": {"images": ["cands", 0], "identity": ["bank", 0], "threshold": -1.0,
                              "decide_by": "mean", "face_rule": "largest", "several_faces": "reject",
                              "empty_outputs": "empty batch"}}
    if character:
        p["gate"] = {"class_type": "FLENReviewGate",
                     "inputs": {"images": ["filter", 0], "meta": ["filter", 1], "source_images": ["refs", 0],
                                "character": character, "run_id": "scored", "version": "v1", "timeout_s": 1,
                                "timeout_policy": "approve_above_score", "score_threshold": gate_threshold}}
        p["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["gate", 2]}}
    else:
        p["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["filter", 4]}}
    return p


def test_identity_scores_from_the_filter_reach_the_gallery_and_the_gate(comfy, faces):
    table = json.loads(comfy.run(_filter_prompt())["filter"]["text"][0])
    scores = [row["score"] for row in table["rows"]]
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores) and scores[0] > scores[1], table
    middle = (scores[0] + scores[1]) / 2
    character = "sc_" + uuid.uuid4().hex[:8]
    outputs = comfy.run(_filter_prompt(character, gate_threshold=middle), timeout=120)
    summary = json.dumps(outputs["out"])
    assert "1 of 2 approved" in summary, summary  # approve_above_score approved the one above the middle
    items = comfy.get(f"/flenwheel/review/{character}/items", params={"sort": "score_desc"}).json()["items"]
    assert [i["score"] for i in items] == pytest.approx(scores)  # the filter's own scores, best first
    assert [i["status"] for i in items] == ["approved", "pending"]
    above = comfy.get(f"/flenwheel/review/{character}/items", params={"score_min": middle}).json()["items"]
    assert [i["id"] for i in above] == [items[0]["id"]]  # the gallery's score filter finds it


def _photos(comfy_server) -> list[np.ndarray]:
    folder = comfy_server.base / "input" / DEMO_SOURCES
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]


def _which_photo(photos: list[np.ndarray], image: Image.Image) -> int:
    arr = np.asarray(image.convert("RGB"))
    hits = [k for k, photo in enumerate(photos) if photo.shape == arr.shape and np.array_equal(photo, arr)]
    assert len(hits) == 1, f"image matches photos {hits}"
    return hits[0]


def test_sweep_of_three_sources_each_candidate_and_edit_pair_has_its_own_source(comfy, comfy_server, faces):
    character = "own_" + uuid.uuid4().hex[:8]
    comfy.run(enrich_for_review(character), timeout=600)  # 3 photos × 4 head angles → filter → review queue
    items = comfy.get(f"/flenwheel/review/{character}/items", params={"limit": 500}).json()["items"]
    assert len(items) == 3 * 4
    photos = _photos(comfy_server)
    assert len(photos) == 3
    # the photo files in the order the folder loader fed them (the sweep's source_index refers to that order)
    by_index: dict[int, int] = {}
    for item in items:
        assert item["n_sources"] == 1, item  # its own source, not all three
        assert item["n_refs"] == 3  # all three stay available as references for the A/B view
        src = comfy.get(f"/flenwheel/review/{character}/source/{item['id']}/0")
        assert src.status_code == 200
        photo = _which_photo(photos, Image.open(io.BytesIO(src.content)))
        assert by_index.setdefault(item["meta"]["source_index"], photo) == photo
    assert sorted(by_index.values()) == [0, 1, 2]  # three sources, three different photos
    # one correction per source photo: a fixed image, a corrected instruction, a better target
    first = {}
    for item in items:
        first.setdefault(item["meta"]["source_index"], item)
    decide = f"/flenwheel/review/{character}/decide"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "PNG")
    r = comfy.post(f"/flenwheel/review/{character}/items/{first[0]['id']}/fixed", None, data=buf.getvalue(),
                   headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert comfy.post(decide, {"ids": [first[1]["id"]], "action": "correct",
                               "instruction": "turn the head to the left"}).status_code == 200
    other = next(i for i in items if i["meta"]["source_index"] == 2 and i["id"] != first[2]["id"])
    assert comfy.post(decide, {"ids": [first[2]["id"]], "action": "correct",
                               "better_id": other["id"]}).status_code == 200
    prompt = {"pairs": {"class_type": "FLENEditPairWriter",
                        "inputs": {"character": character, "include": "corrections only", "controls": 0}}}
    text = comfy.run(prompt)["pairs"]["text"][0]
    assert "3 pairs with 1 control(s) each" in text, text
    set_dir = comfy_server.base / "output" / "flenwheel" / character / "edit_pairs" / "v1"
    records = [json.loads(line) for line in (set_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 3
    index_of = {i["id"]: i["meta"]["source_index"] for i in items}
    for rec in records:
        (control,) = rec["controls"]
        with Image.open(set_dir / control["file"]) as im:
            assert _which_photo(photos, im) == by_index[index_of[rec["candidate_id"]]], rec
