"""engines.identity through the real insightface code on the tiny face pack: bank, scoring, routing, pose."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from engines import face_backends as fb
from engines import identity as idn
from engines.errors import FlenUserError
from engines.image_arrays import batch_to_uint8
from tools import tiny_models as tm

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def face_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces") / "insightface"
    tm.write_insightface_pack(root / "models" / tm.INSIGHTFACE_PACK)
    return root


@pytest.fixture(scope="module")
def model(face_root):
    return fb.load_face_model(face_root, tm.INSIGHTFACE_PACK, 640, CPU)


def face(identity: int, size: int = 256, **kw) -> np.ndarray:
    return np.asarray(tm.draw_test_face(identity, size, **kw))


def blank(size: int = 256) -> np.ndarray:
    return np.full((size, size, 3), 128, np.uint8)


def two_faces(a: int = 1, b: int = 2, scale_b: float = 1.0) -> np.ndarray:
    return np.concatenate([face(a), face(b, scale=scale_b)], axis=1)


@pytest.fixture(scope="module")
def bank(model, face_root):
    photos = [face(1), blank(), face(1, 320, offset=(20, -15), scale=0.8), two_faces(), face(1, 300, scale=1.4)]
    return idn.build_bank(model, photos, face_root)


# ---- loading ---------------------------------------------------------------------------------------------


def test_model_loaded_once_per_pack_providers_and_det_size(face_root, model):
    assert fb.load_face_model(face_root, tm.INSIGHTFACE_PACK, 640, CPU) is model
    other = fb.load_face_model(face_root, tm.INSIGHTFACE_PACK, 320, CPU)
    assert other is not model and other.det_size == 320
    assert model.det_sizes() == [640, 320, 160]
    assert idn.list_packs(face_root) == [tm.INSIGHTFACE_PACK]


def test_providers_end_with_cpu_and_cuda_only_when_usable():
    import onnxruntime

    provs = idn.available_providers()
    assert provs[-1] == "CPUExecutionProvider"
    assert set(provs) <= set(onnxruntime.get_available_providers())


def test_missing_pack_names_folder_and_expected_files(tmp_path):
    root = tmp_path / "insightface"
    with pytest.raises(FlenUserError) as err:
        fb.load_face_model(root, "buffalo_l")
    msg = str(err.value)
    assert str(root / "models" / "buffalo_l") in msg
    assert "det_10g.onnx" in msg and "w600k_r50.onnx" in msg and "never downloads" in msg
    (root / "models" / "empty").mkdir(parents=True)
    with pytest.raises(FlenUserError, match="has no .onnx files"):
        fb.load_face_model(root, "empty")


def test_pack_without_recogniser_is_refused_with_what_was_found(tmp_path, face_root):
    pack = tmp_path / "insightface" / "models" / "half"
    pack.mkdir(parents=True)
    shutil.copy(face_root / "models" / tm.INSIGHTFACE_PACK / tm.DETECTOR_FILE, pack)
    with pytest.raises(FlenUserError, match=r"no recognition model \(found: det_flen_tiny.onnx\)"):
        fb.load_face_model(tmp_path / "insightface", "half", 640, CPU)


def test_nested_antelopev2_style_folder_is_found(tmp_path, face_root):
    nested = tmp_path / "insightface" / "models" / "antelopev2" / "antelopev2"
    shutil.copytree(face_root / "models" / tm.INSIGHTFACE_PACK, nested)
    m = fb.load_face_model(tmp_path / "insightface", "antelopev2", 640, CPU)
    assert m.analyse(face(1)).count == 1


def test_detection_falls_back_to_a_smaller_size(model):
    a = model.analyse(face(1, 300, scale=1.4))   # too large for the detector's windows at 640
    assert a.count == 1 and a.det_size == 320
    assert model.analyse(face(1)).det_size == 640
    assert model.analyse(blank()).count == 0


# ---- bank --------------------------------------------------------------------------------------------------


def test_bank_has_one_normalised_embedding_per_photo_with_one_face(bank):
    assert [r.index for r in bank.references] == [0, 2, 4]
    assert bank.embeddings.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(bank.embeddings, axis=1), 1.0, atol=1e-5)
    assert abs(np.linalg.norm(bank.mean) - 1.0) < 1e-6
    assert bank.skipped == [(1, "no face"), (3, "several faces (2)")]
    np.testing.assert_allclose(bank.references[0].box, tm.drawn_face_box(256), atol=4)
    for r in bank.references:
        yaw, pitch, roll = r.pose
        assert abs(yaw) < 5 and abs(pitch) < 10 and abs(roll) < 5   # drawn faces are frontal
    report = bank.report()
    assert "3 reference photo(s) used, 2 skipped" in report
    assert "photo 2: skipped - no face" in report and "photo 4: skipped - several faces (2)" in report


def test_bank_without_any_usable_photo_is_a_clear_error(model):
    with pytest.raises(FlenUserError) as err:
        idn.build_bank(model, [blank(), two_faces()])
    assert "photo 1: no face" in str(err.value) and "photo 2: several faces (2)" in str(err.value)


def test_coverage_lists_covered_and_missing_bins(bank):
    cov = bank.coverage
    assert cov.covered == ["frontal / level"]
    assert len(cov.missing) == 14 and "3/4 left / level" in cov.missing and "profile right / looking up" in cov.missing
    text = cov.text()
    assert "1 of 15" in text and "frontal / level (3)" in text and "missing: " in text
    chart = cov.chart()
    assert chart.mode == "RGB" and chart.size[0] > chart.size[1] > 100
    more = idn.coverage([(0, 0, 0), (40, 0, 0), (-75, 20, 0), (10, -30, 0)])
    assert set(more.covered) == {"frontal / level", "3/4 right / level", "profile left / looking up",
                                 "frontal / looking down"}


# ---- scoring and routing -----------------------------------------------------------------------------------


def test_identical_image_scores_one_and_other_identity_is_rejected_between(bank, model):
    rows = idn.score_images(bank, model, [face(1), face(2), face(3)], threshold=0.0)
    same, others = rows[0], rows[1:]
    assert same.score_best == pytest.approx(1.0, abs=1e-4) and same.best_reference == 0
    assert same.score_mean > 0.95
    assert max(r.score_mean for r in others) < same.score_mean - 0.1
    threshold = (same.score_mean + max(r.score_mean for r in others)) / 2
    rows = idn.score_images(bank, model, [face(1), face(2), face(3)], threshold=threshold)
    assert [r.passed for r in rows] == [True, False, False]
    assert [r.reason for r in rows] == [None, "below threshold", "below threshold"]
    assert rows[0].faces == 1 and rows[0].yaw is not None and rows[0].box is not None


def test_decide_by_mean_or_best(bank, model):
    mean_rows = idn.score_images(bank, model, [face(1)], threshold=0.9999, decide_by="mean")
    best_rows = idn.score_images(bank, model, [face(1)], threshold=0.9999, decide_by="best")
    assert mean_rows[0].score == mean_rows[0].score_mean < best_rows[0].score == best_rows[0].score_best
    assert not mean_rows[0].passed and best_rows[0].passed
    with pytest.raises(FlenUserError, match="decide_by"):
        idn.score_images(bank, model, [face(1)], decide_by="median")


def test_no_face_and_several_faces_are_routed_with_reasons(bank, model):
    rows = idn.score_images(bank, model, [blank(), two_faces(2, 1, scale_b=0.8), face(1)], threshold=0.9)
    assert [(r.passed, r.reason, r.faces) for r in rows] == [
        (False, "no face", 0), (False, "several faces", 2), (True, None, 1)]
    assert rows[0].score is None
    assert rows[1].score is not None   # the chosen (largest) face is still scored: identity 2, low
    chosen = idn.score_images(bank, model, [two_faces(2, 1, scale_b=0.8)], threshold=0.9,
                              several_faces="use chosen face")
    assert chosen[0].reason == "below threshold"          # largest face is identity 2
    by_score = idn.score_images(bank, model, [two_faces(1, 2, scale_b=0.8)], threshold=0.9,
                                several_faces="use chosen face", face_rule="largest")
    assert by_score[0].passed and by_score[0].box[0] < 256


def test_face_rules_pick_different_faces():
    faces = [idn.Detection(np.array([0, 0, 100, 100], np.float32), None, 0.7),
             idn.Detection(np.array([200, 200, 260, 260], np.float32), None, 0.9),
             idn.Detection(np.array([400, 0, 480, 80], np.float32), None, 0.8)]
    assert idn.choose_face(faces, 480, 480, "largest") == 0
    assert idn.choose_face(faces, 480, 480, "most_central") == 1
    assert idn.choose_face(faces, 480, 480, "highest_score") == 1
    assert idn.choose_face(faces, 960, 200, "most_central") == 2
    with pytest.raises(FlenUserError, match="face rule"):
        idn.choose_face(faces, 480, 480, "smallest")


def test_all_rejected_batch_gives_rows_and_says_nothing_passed(bank, model):
    rows = idn.score_images(bank, model, [face(2), blank()], threshold=0.99)
    assert not any(r.passed for r in rows)
    table = idn.score_table(rows, 0.99, "mean", "largest")
    assert table["passed"] == 0 and table["rejected"] == 2 and len(table["rows"]) == 2
    assert "Nothing passed" in table["summary"] and "1 below threshold" in table["summary"]
    import json

    assert json.loads(json.dumps(table)) == table


def test_to_uint8_from_comfy_image_batch():
    import torch

    batch = torch.stack([torch.from_numpy(face(1).astype(np.float32) / 255.0)] * 2)
    out = batch_to_uint8(batch)
    assert len(out) == 2 and out[0].dtype == np.uint8
    np.testing.assert_array_equal(out[0], face(1))


# ---- pose from 5 keypoints ---------------------------------------------------------------------------------

# A 3-D 5-point face that differs from the engine's generic model (deeper nose, wider mouth, other depths),
# projected with a pinhole camera 15 eye-distances away: the estimate must not rely on being fed its own
# model. (Pitch depends on the face's vertical proportions: a nose 0.05 eye-distances higher reads ~10 deg.)
TEST_FACE = np.array([[-0.5, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, -0.58, 0.60], [-0.44, -1.15, 0.06],
                      [0.44, -1.15, 0.06]])


def project(yaw, pitch, roll=0.0, model=TEST_FACE, distance=15.0, scale=100.0, centre=(320, 240)):
    pts = model @ idn.rotation_matrix(yaw, pitch, roll).T
    xy = pts[:, :2] * (distance / (distance - pts[:, 2:3])) * scale
    return np.stack([centre[0] + xy[:, 0], centre[1] - xy[:, 1]], axis=1)


@pytest.mark.parametrize("yaw", [0, 45, -45])
@pytest.mark.parametrize("pitch", [0, 20, -20])
def test_pose_at_known_yaw_and_pitch(yaw, pitch):
    est_yaw, est_pitch, est_roll = idn.pose_from_keypoints(project(yaw, pitch))
    assert est_yaw == pytest.approx(yaw, abs=7)
    assert est_pitch == pytest.approx(pitch, abs=10)   # perspective + model mismatch bias "down" views most
    assert abs(est_roll) < 7


@pytest.mark.parametrize("yaw", [90, -90])
def test_pose_at_profile_keeps_side_and_lands_in_the_profile_bin(yaw):
    # At +-90 the eyes and mouth corners overlap in pairs; the fit stays defined (the nose gives depth),
    # the side is right and the bin is the profile bin. Pitch is not asserted there.
    est_yaw, est_pitch, _ = idn.pose_from_keypoints(project(yaw, 0))
    assert np.sign(est_yaw) == np.sign(yaw) and abs(est_yaw) > 75
    assert idn.pose_bin(est_yaw, 0)[0] == ("profile right" if yaw > 0 else "profile left")


def test_pose_exact_on_orthographic_views_of_the_generic_model():
    for yaw, pitch, roll in [(0, 0, 0), (30, -10, 5), (-60, 15, -10), (80, 0, 0)]:
        pts = idn.FACE_MODEL_3D @ idn.rotation_matrix(yaw, pitch, roll).T
        kps = np.stack([pts[:, 0], -pts[:, 1]], axis=1) * 80 + 200
        np.testing.assert_allclose(idn.pose_from_keypoints(kps), (yaw, pitch, roll), atol=0.05)


def test_pose_roll_sign_and_image_scale_invariance():
    kps = project(0, 0, 15)
    yaw, pitch, roll = idn.pose_from_keypoints(kps)
    assert roll == pytest.approx(15, abs=2)
    np.testing.assert_allclose(idn.pose_from_keypoints(kps * 3 + 50), (yaw, pitch, roll), atol=0.05)


def test_pose_of_the_tiny_detectors_keypoints_is_frontal(model):
    a = model.analyse(face(1))
    yaw, pitch, roll = a.pose
    assert abs(yaw) < 5 and abs(pitch) < 10 and abs(roll) < 5
    assert idn.pose_bin(yaw, pitch) == ("frontal", "level")
