"""engines.identity_dlib on real photos that registry packages ship: scikit-image's astronaut and insightface's
sample images (the group photo t1.jpg, the aligned Tom_Hanks_54745.png). Real dlib weights from the
face_recognition_models package; nothing is mocked or downloaded.

Pose reference: where a test compares with "the 68-point fit", that is insightface's 3-D mean face
(meanshape_68.pkl) fitted to dlib's 68-point landmarks. The 68-point predictor is non-commercial (iBUG 300-W)
and is used here only as an independent measurement, never by the engine."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines import face_backends as fb
from engines import identity as idn
from engines import identity_dlib as idd
from engines.errors import FlenUserError

INSIGHTFACE_DATA = Path(next(iter(importlib.util.find_spec("insightface").submodule_search_locations))) / "data"


def _photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(INSIGHTFACE_DATA / "images" / name).convert("RGB"))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def group() -> np.ndarray:
    return _photo("t1.jpg")          # six people around a table


@pytest.fixture(scope="module")
def hanks() -> np.ndarray:
    return _photo("Tom_Hanks_54745.png")   # a 112x112 ArcFace-aligned face


@pytest.fixture(scope="module")
def model():
    return fb.load_face_model("", idd.DLIB_MODEL, 640)


def rotated(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Counter-clockwise in the image (PIL's sense), which is roll > 0 in the engine's convention."""
    return np.asarray(Image.fromarray(rgb).rotate(degrees, resample=Image.BICUBIC))


def one_face(model, rgb: np.ndarray, rule: str = "largest"):
    a = model.analyse(rgb, rule)
    assert a.chosen is not None
    return a, a.faces[a.chosen]


# ---- loading ---------------------------------------------------------------------------------------------


def test_weights_come_from_the_installed_package_and_the_choice_is_listed(model):
    folder = idd.models_folder()
    assert folder.parent.name == "face_recognition_models" and folder.name == "models"
    assert (folder / idd.RECOGNISER_FILE).is_file() and (folder / idd.PREDICTOR_FILE).is_file()
    assert idd.available()
    assert fb.model_choices(["buffalo_l"]) == ["buffalo_l", idd.DLIB_MODEL]
    assert fb.load_face_model("/nowhere", idd.DLIB_MODEL, 640) is model
    other = fb.load_face_model("", idd.DLIB_MODEL, 320)
    assert other is not model and other.max_side == 640 and other.recognizer is model.recognizer


def test_missing_packages_are_a_clear_error_naming_pip(monkeypatch):
    # Take the installed packages off the import path: what a ComfyUI without them sees.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "-packages" not in p])
    with pytest.raises(FlenUserError) as err:
        idd.models_folder()
    assert "pip install dlib-bin face_recognition_models" in str(err.value)
    assert "never downloads" in str(err.value)
    assert not idd.available()
    assert fb.model_choices(["buffalo_l"]) == ["buffalo_l"]


def insightface_mean_face() -> np.ndarray:
    """insightface's 3-D mean face (68 points), through insightface's own accessor for its packaged objects."""
    from insightface.data import get_object

    return np.array(get_object("meanshape_68.pkl"), np.float64)


def test_five_point_model_comes_from_insightfaces_mean_face():
    ms = insightface_mean_face()
    ms[:, 1] = -ms[:, 1]                                   # y down -> y up
    left, right = ms[36:42].mean(axis=0), ms[42:48].mean(axis=0)
    ms = (ms - (left + right) / 2) / np.linalg.norm(right - left)
    ms[:, 2] -= ms[[36, 39, 42, 45], 2].mean()             # eye corners' mean depth 0, as in FACE_MODEL_3D
    # x, y and the nose base within 0.05 eye distances; the outer corners are set 0.05 deeper on purpose
    np.testing.assert_allclose(idd.DLIB5_MODEL_3D[:, :2], ms[[45, 42, 36, 39, 33], :2], atol=0.05)
    np.testing.assert_allclose(idd.DLIB5_MODEL_3D[4], ms[33], atol=0.06)


# ---- detection and pose on real photos ---------------------------------------------------------------------


def test_astronaut_has_one_near_frontal_face(model, astronaut):
    a, det = one_face(model, astronaut)
    assert a.count == 1 and a.det_size == 512
    x1, y1, x2, y2 = det.box
    assert 170 < x1 < 190 and 75 < y1 < 95 and 80 < x2 - x1 < 100          # her face, not the badge
    left_eye, right_eye, nose, mouth_l, mouth_r = det.kps
    assert x1 < left_eye[0] < nose[0] < right_eye[0] < x2 and left_eye[1] < nose[1] < mouth_l[1] < y2
    assert mouth_l[0] < mouth_r[0]
    yaw, pitch, roll = a.pose
    # Measured (-5.1, -14.0, -1.4); the 68-point fit reads (1.1, -2.0, -4.2). 5 points give a coarse pitch
    # (one point, the nose base, is off the eye line), so the bounds are those of that disagreement.
    assert abs(yaw) < 10 and abs(roll) < 5 and abs(pitch) < 20
    assert idn.pose_bin(yaw, pitch) == ("frontal", "level")
    # the main (insightface-layout) pose code on the derived keypoints agrees with the 5-point fit
    np.testing.assert_allclose(idn.pose_from_keypoints(det.kps), a.pose, atol=1.5)


def test_mirrored_photo_mirrors_yaw_and_roll(model, astronaut, group):
    a, _ = one_face(model, astronaut)
    b, _ = one_face(model, np.ascontiguousarray(astronaut[:, ::-1]))
    assert np.sign(b.pose[0]) == -np.sign(a.pose[0]) and abs(a.pose[0] + b.pose[0]) < 1.0
    assert abs(a.pose[2] + b.pose[2]) < 1.0
    # a clearly turned face: the man at the top right of the group photo turns toward the image's left
    crop = np.ascontiguousarray(group[20:260, 800:1070])
    c, _ = one_face(model, crop)
    d, _ = one_face(model, np.ascontiguousarray(crop[:, ::-1]))
    assert c.pose[0] < -20 and d.pose[0] > 20 and abs(c.pose[0] + d.pose[0]) < 8   # measured -30.8 / +35.9
    assert idn.pose_bin(*c.pose[:2])[0] == "3/4 left" and idn.pose_bin(*d.pose[:2])[0] == "3/4 right"
    np.testing.assert_allclose(idn.pose_from_keypoints(c.faces[c.chosen].kps), c.pose, atol=5)


@pytest.mark.parametrize("degrees", [20, -20])
def test_rotated_photo_reads_the_rotation_as_roll(model, astronaut, degrees):
    base, _ = one_face(model, astronaut)
    # HOG may add a weak false face on the badge (score ~0.2): take the most confident face
    turned, det = one_face(model, rotated(astronaut, degrees), "highest_score")
    assert det.score > 0.5
    assert turned.pose[2] - base.pose[2] == pytest.approx(degrees, abs=3)
    assert abs(turned.pose[0]) < 10
    np.testing.assert_allclose(idn.pose_from_keypoints(det.kps), turned.pose, atol=1.5)


def _pose_68(predictor, rgb: np.ndarray, box: np.ndarray) -> tuple[float, float, float]:
    import dlib

    ms = insightface_mean_face()
    ms[:, 1] = -ms[:, 1]
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    shape = predictor(rgb, dlib.rectangle(x1, y1, x2 - 1, y2 - 1))
    return idn.pose_from_keypoints(np.array([[p.x, p.y] for p in shape.parts()], np.float64), ms)


def test_pose_of_real_faces_agrees_with_a_68_point_fit(model, astronaut, group, hanks):
    import dlib

    predictor = dlib.shape_predictor(str(idd.models_folder() / "shape_predictor_68_face_landmarks.dat"))
    faces = []
    for rgb in (astronaut, rotated(astronaut, 20), group, hanks):
        for det in model.detect(rgb)[0]:
            if det.score > 0.5 or rgb is group:
                faces.append((det.pose, _pose_68(predictor, rgb, det.box)))
    assert len(faces) == 9
    diff = np.abs(np.array([p for p, _ in faces]) - np.array([r for _, r in faces]))
    # Measured max |difference| on these 9 faces: yaw 10.1 (Hanks), pitch 12.7, roll 3.8; mean 5 / 7 / 2.
    # (The outer eye corners' depth was chosen on these photos; with insightface's mean face as is the
    # means are 6 / 10 / 2.)
    assert diff[:, 0].max() < 12 and diff[:, 1].max() < 15 and diff[:, 2].max() < 5


def test_the_faces_of_the_group_photo_have_different_poses(model, group):
    faces, size = model.detect(group)
    assert len(faces) == 6 and size == 1280
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    yaws = [f.pose[0] for f in faces]
    rolls = [f.pose[2] for f in faces]
    assert max(yaws) - min(yaws) > 25 and max(rolls) - min(rolls) > 30
    bins = {idn.pose_bin(f.pose[0], f.pose[1])[0] for f in faces}
    assert bins == {"frontal", "3/4 left"}
    turned = min(faces, key=lambda f: f.pose[0])                 # the man at the top right
    assert turned.box[0] > 850 and turned.box[1] < 100
    tilted = max(faces, key=lambda f: f.pose[2])                 # the woman at the left, head on one side
    assert tilted.box[0] < 100 and tilted.pose[2] > 15


def test_small_faces_are_found_by_upsampling_and_a_blank_has_none(model, astronaut):
    small = np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.LANCZOS))   # face ~44 px
    a = model.analyse(small)
    assert a.count == 1 and a.det_size == 512
    large = np.asarray(Image.fromarray(astronaut).resize((2048, 2048), Image.LANCZOS))
    b = model.analyse(large)                                      # scaled down to 1280 to detect
    assert b.count == 1 and b.det_size == 1280 and 700 < b.faces[0].box[0] < 760
    blank = model.analyse(np.full((256, 256, 3), 128, np.uint8))
    assert blank.count == 0 and blank.det_size is None and blank.embedding is None


# ---- identity ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bank(model, astronaut):
    return idn.build_bank(model, [astronaut])


def _single_faces(group: np.ndarray, model) -> list[np.ndarray]:
    crops = []
    for f in model.detect(group)[0]:
        x1, y1, x2, y2 = f.box.astype(int)
        m = (x2 - x1) // 2
        crops.append(np.ascontiguousarray(group[max(0, y1 - m):y2 + m, max(0, x1 - m):x2 + m]))
    return crops


def test_same_photo_scores_one_and_other_people_are_rejected_at_the_default(bank, model, astronaut, group, hanks):
    assert bank.pack == idd.DLIB_MODEL and bank.embeddings.shape == (1, 128)
    np.testing.assert_allclose(np.linalg.norm(bank.embeddings, axis=1), 1.0, atol=1e-5)
    assert fb.bank_model(bank) is model
    threshold = fb.effective_threshold(bank, idn.DEFAULT_THRESHOLD)
    assert threshold == idd.DEFAULT_THRESHOLD == 0.92
    assert fb.effective_threshold(bank, 0.95) == 0.95
    same = [astronaut, np.ascontiguousarray(astronaut[:, ::-1]),
            np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.LANCZOS))]
    others = [hanks] + _single_faces(group, model)
    rows = idn.score_images(bank, model, same + others, threshold=threshold)
    assert [r.faces for r in rows] == [1] * 10
    assert rows[0].score == pytest.approx(1.0, abs=1e-4)
    assert min(r.score for r in rows[:3]) > 0.97                   # measured: flipped 0.9925, 256 px 0.988
    # measured: Hanks 0.871, the six people of the group photo 0.83-0.89
    assert max(r.score for r in rows[3:]) < threshold - 0.02
    assert [r.passed for r in rows] == [True] * 3 + [False] * 7
    assert {r.reason for r in rows[3:]} == {"below threshold"}
    # at the ArcFace threshold every one of them would pass: the scales differ
    assert all(r.score > idn.DEFAULT_THRESHOLD for r in rows)
    # every pair of the 8 different people (astronaut, Hanks, the six): measured 0.81-0.90, below 0.92
    emb = np.stack([model.analyse(x).embedding for x in [astronaut] + others])
    pairs = (emb @ emb.T)[np.triu_indices(len(emb), 1)]
    assert len(pairs) == 28 and 0.75 < pairs.min() and pairs.max() < threshold


def test_group_photo_is_routed_as_several_faces(bank, model, group, astronaut):
    rows = idn.score_images(bank, model, [group], threshold=0.92)
    assert rows[0].reason == "several faces" and rows[0].faces == 6 and not rows[0].passed
    two = idn.build_bank(model, [group, astronaut])
    assert two.skipped == [(0, "several faces (6)")] and [r.index for r in two.references] == [1]
    assert "dlib" in two.report() and "frontal / level" in two.report()
