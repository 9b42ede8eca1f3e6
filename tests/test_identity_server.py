"""FLENIdentityReference and FLENIdentityFilter in a real ComfyUI, through POST /prompt, on the tiny face pack."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tools import tiny_models as tm
from tools.demo import output_files

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def inputs(comfy_server):
    """Reference and candidate images in the server's input folder."""
    folder = comfy_server.base / "input"
    folder.mkdir(parents=True, exist_ok=True)
    images = {
        "idf_ref_a.png": tm.draw_test_face(1),
        "idf_ref_b.png": tm.draw_test_face(1, 320, offset=(20, -15), scale=0.8),
        "idf_same.png": tm.draw_test_face(1),
        "idf_other.png": tm.draw_test_face(2),
        "idf_blank.png": Image.fromarray(np.full((256, 256, 3), 128, np.uint8)),
        "idf_two.png": Image.fromarray(np.concatenate([np.asarray(tm.draw_test_face(1)),
                                                       np.asarray(tm.draw_test_face(2))], axis=1)),
    }
    for name, img in images.items():
        img.save(folder / name)
    return images


def _load(node_id: str, name: str) -> dict:
    return {node_id: {"class_type": "LoadImage", "inputs": {"image": name}}}


def _prompt(references: list[str], candidates: list[str], threshold: float, prefix: str,
            empty_outputs: str = "skip downstream") -> dict:
    """LoadImage ×n → ImageBatch → FLENIdentityReference; LoadImage ×m → ImageBatch → FLENIdentityFilter →
    SaveImage (passed, rejected), SaveImage (coverage chart)."""
    prompt: dict = {}

    def batch(names: list[str], base: int) -> list:
        ref = None
        for k, name in enumerate(names):
            nid = str(base + 2 * k)
            prompt.update(_load(nid, name))
            if ref is None:
                ref = [nid, 0]
            else:
                bid = str(base + 2 * k + 1)
                prompt[bid] = {"class_type": "ImageBatch", "inputs": {"image1": ref, "image2": [nid, 0]}}
                ref = [bid, 0]
        return ref

    refs = batch(references, 100)
    cands = batch(candidates, 200)
    prompt["10"] = {"class_type": "FLENIdentityReference",
                    "inputs": {"images": refs, "face_model": tm.INSIGHTFACE_PACK, "det_size": 640}}
    prompt["11"] = {"class_type": "FLENIdentityFilter",
                    "inputs": {"images": cands, "identity": ["10", 0], "threshold": threshold, "decide_by": "mean",
                               "face_rule": "largest", "several_faces": "reject",
                               "empty_outputs": empty_outputs}}
    prompt["12"] = {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": f"{prefix}_pass"}}
    prompt["13"] = {"class_type": "SaveImage", "inputs": {"images": ["11", 2], "filename_prefix": f"{prefix}_rej"}}
    prompt["14"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 2], "filename_prefix": f"{prefix}_cov"}}
    return prompt


def _table(outputs: dict) -> dict:
    assert "text" in outputs["11"], outputs["11"]
    return json.loads(outputs["11"]["text"][0])


def test_reference_and_filter_route_images_and_the_score_table_is_in_the_outputs(comfy, comfy_server, inputs):
    # all candidates are 256x256 so they batch; the two-face image is 512 wide, so it is filtered separately
    prompt = _prompt(["idf_ref_a.png", "idf_ref_b.png"], ["idf_same.png", "idf_other.png", "idf_blank.png"],
                     threshold=0.9, prefix="idf_route")
    outputs = comfy.run(prompt)
    table = _table(outputs)
    assert table["threshold"] == 0.9 and table["passed"] == 1 and table["rejected"] == 2
    rows = table["rows"]
    assert [r["reason"] for r in rows] == [None, "below threshold", "no face"]
    assert rows[0]["score_best"] == pytest.approx(1.0, abs=1e-3) and rows[1]["score"] < 0.9
    assert "1 of 3 image(s) passed" in table["summary"]
    passed = output_files(comfy_server.base, {"12": outputs["12"]})
    rejected = output_files(comfy_server.base, {"13": outputs["13"]})
    chart = output_files(comfy_server.base, {"14": outputs["14"]})
    assert len(passed) == 1 and len(rejected) == 2 and len(chart) == 1
    with Image.open(passed[0]) as im:
        assert np.abs(np.asarray(im.convert("RGB"), int) - np.asarray(inputs["idf_same.png"], int)).max() <= 1
    assert "frontal / level (2)" in outputs["10"]["text"][0]


def test_several_faces_are_rejected_with_their_reason(comfy, inputs):
    outputs = comfy.run(_prompt(["idf_ref_a.png"], ["idf_two.png"], threshold=0.5, prefix="idf_two"))
    rows = _table(outputs)["rows"]
    assert rows[0]["reason"] == "several faces" and rows[0]["faces"] == 2


def test_nothing_passes_skips_what_is_downstream_and_the_run_goes_on(comfy, comfy_server, inputs):
    outputs = comfy.run(_prompt(["idf_ref_a.png"], ["idf_other.png", "idf_blank.png"], threshold=0.99,
                                prefix="idf_none"))
    table = _table(outputs)
    assert table["passed"] == 0 and "Nothing passed" in table["summary"]
    assert "12" not in outputs          # the SaveImage of the (empty) passed side was skipped, no error
    assert len(output_files(comfy_server.base, {"13": outputs["13"]})) == 2


def test_nothing_passes_gives_an_empty_batch_on_request(comfy, inputs):
    prompt = _prompt(["idf_ref_a.png"], ["idf_other.png", "idf_blank.png"], threshold=0.98, prefix="idf_empty",
                     empty_outputs="empty batch")
    del prompt["12"]
    # the empty passed batch and its empty meta feed a second filter: 0 images in, 0 rows out, no error
    prompt["15"] = {"class_type": "FLENIdentityFilter",
                    "inputs": {"images": ["11", 0], "meta": ["11", 1], "identity": ["10", 0], "threshold": 0.5,
                               "decide_by": "best", "face_rule": "largest", "several_faces": "reject",
                               "empty_outputs": "skip downstream"}}
    prompt["16"] = {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "idf_never"}}
    outputs = comfy.run(prompt)
    assert _table(outputs)["passed"] == 0
    second = json.loads(outputs["15"]["text"][0])
    assert second["rows"] == [] and second["passed"] == 0 and second["rejected"] == 0


def test_reference_without_a_face_is_a_clear_execution_error(comfy, inputs):
    error = comfy.run_error(_prompt(["idf_blank.png"], ["idf_same.png"], threshold=0.5, prefix="idf_err"))
    assert error["node_type"] == "FLENIdentityReference"
    assert "None of the 1 reference photo(s) shows exactly one face (photo 1: no face)" in error["exception_message"]


def test_face_model_combo_lists_the_pack_and_says_the_licence(comfy):
    spec = comfy.get("/object_info/FLENIdentityReference").json()["FLENIdentityReference"]
    combo = spec["input"]["required"]["face_model"]
    assert tm.INSIGHTFACE_PACK in combo[1]["options"]
    assert "non-commercial research only" in combo[1]["tooltip"]


# ---- the dlib back-end on real photos (weights from face_recognition_models) ---------------------------------

DLIB = "dlib (face_recognition_models, commercial-use weights)"


@pytest.fixture(scope="module")
def real_inputs(comfy_server):
    """scikit-image's astronaut and insightface's Tom Hanks sample (scaled to 512x512 so they batch)."""
    import importlib.util
    from pathlib import Path

    from skimage import data

    folder = comfy_server.base / "input"
    folder.mkdir(parents=True, exist_ok=True)
    samples = Path(next(iter(importlib.util.find_spec("insightface").submodule_search_locations))) / "data" / "images"
    Image.fromarray(data.astronaut()).save(folder / "idf_astronaut.png")
    Image.open(samples / "Tom_Hanks_54745.png").convert("RGB").resize((512, 512), Image.LANCZOS).save(
        folder / "idf_hanks.png")
    return folder


def test_dlib_back_end_builds_the_bank_and_filters_real_photos(comfy, comfy_server, real_inputs):
    spec = comfy.get("/object_info/FLENIdentityReference").json()["FLENIdentityReference"]
    assert DLIB in spec["input"]["required"]["face_model"][1]["options"]
    prompt = _prompt(["idf_astronaut.png"], ["idf_astronaut.png", "idf_hanks.png"], threshold=0.40,
                     prefix="idf_dlib")
    prompt["10"]["inputs"]["face_model"] = DLIB
    outputs = comfy.run(prompt)
    report = outputs["10"]["text"][0]
    assert f"Identity bank ({DLIB}): 1 reference photo(s) used" in report and "frontal / level" in report
    table = _table(outputs)
    assert table["threshold"] == 0.92                     # 0.40 left as is on a dlib bank: dlib's default
    rows = table["rows"]
    assert [r["reason"] for r in rows] == [None, "below threshold"]
    assert rows[0]["score"] == pytest.approx(1.0, abs=1e-3) and rows[1]["score"] < 0.9
    assert abs(rows[0]["yaw"]) < 10 and rows[0]["faces"] == 1
    assert len(output_files(comfy_server.base, {"12": outputs["12"]})) == 1
