"""Face identity with dlib: a second back-end whose weights ship inside registry packages.

Plain Python (numpy, OpenCV, dlib); nothing here imports ComfyUI. Needs ``pip install dlib-bin
face_recognition_models`` (dlib-bin imports as ``dlib``; face_recognition_models holds the weights).

* Detector: dlib's HOG frontal face detector (built into dlib, CPU, fast). It finds frontal and
  three-quarter faces; it misses strong profiles (|yaw| beyond ~45-60 degrees) and faces smaller than
  its 80 px window. It looks at the image at its own size, or scaled down to ``2 * det_size`` on the
  longer side when larger (HOG loses small faces quickly when an image is scaled down: at 640 px it finds
  4 of the 6 faces of insightface's group photo, at its own 1280 px all 6); when no face is found it
  looks again with one 2x upsampling (faces down to ~40 px). Landmarks and the embedding are computed on
  the full image.
* Landmarks: ``shape_predictor_5_face_landmarks.dat`` (two corners of each eye and the base of the
  nose). The 68-point predictor in the same package was trained on iBUG 300-W, which is licensed for
  non-commercial use only; it is not used.
* Embedding: ``dlib_face_recognition_resnet_model_v1.dat``, 128-d, normalised here (cosine scores).
  The resnet recogniser and the 5-point predictor were released by dlib's author under CC0 (public
  domain); dlib itself is under the Boost licence.
* Pose: the 5 dlib points are fitted with a generic 3-D model of those points (:data:`DLIB5_MODEL_3D`,
  from insightface's 68-point mean face) under scaled orthographic projection. The detection's
  keypoints are given in insightface's layout (left eye, right eye, nose tip, left / right mouth corner):
  the eye centres are the measured corner midpoints; the nose tip and mouth corners are *not measured*
  (the 5-point predictor has none) but projected from :data:`identity.FACE_MODEL_3D` under that fit, so
  that :func:`identity.pose_from_keypoints` on them agrees with the fit.

Scores: different people score ~0.80-0.90 in cosine with this recogniser, far above the ArcFace scale;
the default threshold :data:`DEFAULT_THRESHOLD` (0.92) is dlib's own decision rule (Euclidean
distance 0.6 between raw descriptors, 99.38% on LFW) at the typical raw descriptor norm (~1.45):
1 - 0.6**2 / (2 * 1.45**2) = 0.914, rounded up toward precision.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

from . import identity as idn
from .errors import FlenUserError

DLIB_MODEL = "dlib (face_recognition_models, commercial-use weights)"
INSTALL_HINT = "pip install dlib-bin face_recognition_models"
RECOGNISER_FILE = "dlib_face_recognition_resnet_model_v1.dat"
PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
PROVIDERS: tuple[str, ...] = ("dlib CPU",)
# dlib's recogniser has its own scale (different people score ~0.8-0.9): see the module's docstring.
DEFAULT_THRESHOLD = 0.92

# dlib's 5 points in its own order: outer and inner corner of the eye on the image's right, outer and inner
# corner of the eye on the image's left, base of the nose (subnasale). Same frame and units as
# identity.FACE_MODEL_3D (eye centres at x = -+0.5, y = 0, z = 0; x right, y up, z toward the camera). From
# insightface's meanshape_68 (points 45, 42, 36, 39, 33; eye centre distance 1), with the outer corners set
# 0.05 deeper, which agreed best with a full 68-point fit on the package sample photos.
DLIB5_MODEL_3D = np.array([
    [0.72, 0.0, -0.10],
    [0.28, 0.0, 0.05],
    [-0.72, 0.0, -0.10],
    [-0.28, 0.0, 0.05],
    [0.0, -0.67, 0.43],
], dtype=np.float64)


def models_folder() -> Path:
    """The ``models`` folder of the installed face_recognition_models package (found without importing it:
    its ``__init__`` needs pkg_resources, which recent setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FlenUserError(
            "The dlib face model needs the packages dlib-bin and face_recognition_models, which hold its "
            f"weights: run `{INSTALL_HINT}` in ComfyUI's Python environment and restart ComfyUI. "
            "FLENwheel never downloads models.")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    missing = [f for f in (RECOGNISER_FILE, PREDICTOR_FILE) if not (folder / f).is_file()]
    if missing:
        raise FlenUserError(
            f"face_recognition_models is installed but {folder} lacks {', '.join(missing)}; reinstall it "
            f"(`pip install --force-reinstall face_recognition_models`). FLENwheel never downloads models.")
    return folder


def available() -> bool:
    """dlib imports and face_recognition_models holds the weights (nothing is loaded)."""
    if importlib.util.find_spec("dlib") is None:
        return False
    try:
        models_folder()
    except FlenUserError:
        return False
    return True


_weights_lock = threading.Lock()
_weights: dict[str, tuple] = {}


def _load_weights(folder: Path) -> tuple:
    """(HOG detector, 5-point predictor, recogniser), loaded once per folder."""
    key = str(folder.resolve())
    with _weights_lock:
        if key not in _weights:
            try:
                import dlib
            except ImportError as exc:
                raise FlenUserError(
                    f"The dlib face model needs dlib: run `{INSTALL_HINT}` in ComfyUI's Python environment "
                    "and restart ComfyUI.") from exc
            _weights[key] = (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(folder / PREDICTOR_FILE)),
                             dlib.face_recognition_model_v1(str(folder / RECOGNISER_FILE)))
        return _weights[key]


def _resize(rgb: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def points_to_kps(points: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """dlib's 5 points (5 x 2, its order) -> (insightface-layout keypoints 5 x 2, (yaw, pitch, roll))."""
    points = np.asarray(points, np.float64)
    fit = idn.fit_pose(points, DLIB5_MODEL_3D)
    kps = np.empty((5, 2), np.float64)
    kps[0] = points[[2, 3]].mean(axis=0)       # eye on the image's left
    kps[1] = points[[0, 1]].mean(axis=0)       # eye on the image's right
    kps[2:] = fit.project(idn.FACE_MODEL_3D[2:])
    return kps.astype(np.float32), idn.pose_angles(fit.rotation)


class DlibFaceModel:
    """dlib's HOG detector + 5-point predictor + resnet recogniser; same interface as identity.FaceModel."""

    def __init__(self, folder: Path, det_size: int) -> None:
        self.name = DLIB_MODEL
        self.path = folder
        self.providers = PROVIDERS
        self.det_size = int(det_size)
        self.detector, self.predictor, self.recognizer = _load_weights(folder)
        self._lock = threading.Lock()   # dlib's network objects keep state between calls

    @property
    def max_side(self) -> int:
        """Longest side the detector looks at before upsampling (larger images are scaled down to it)."""
        return 2 * self.det_size

    def landmarks(self, rgb: np.ndarray, box: np.ndarray):
        """dlib's full_object_detection (5 points) for a box (x1, y1, x2, y2) on the full image."""
        import dlib

        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        return self.predictor(rgb, dlib.rectangle(x1, y1, x2 - 1, y2 - 1))

    def detect_shapes(self, rgb: np.ndarray) -> tuple[list[idn.Detection], list, int | None]:
        """Detections (most confident first), their dlib shapes, and the longest side that found them."""
        rgb = np.ascontiguousarray(rgb)
        longest = max(rgb.shape[:2])
        scale = min(1.0, self.max_side / longest)
        small = rgb if scale == 1.0 else _resize(rgb, scale)
        with self._lock:
            for upsample in (0, 1):
                rects, scores, _kinds = self.detector.run(small, upsample, 0.0)
                if rects:
                    break
            else:
                return [], [], None
            order = np.argsort(-np.asarray(scores), kind="stable")
            dets, shapes = [], []
            for i in order:
                r = rects[int(i)]
                box = np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float32) / np.float32(scale)
                shape = self.landmarks(rgb, box)
                kps, pose = points_to_kps(np.array([[p.x, p.y] for p in shape.parts()], np.float64))
                dets.append(idn.Detection(box=box, kps=kps, score=float(scores[int(i)]), pose=pose))
                shapes.append(shape)
        return dets, shapes, int(round(longest * scale)) * (2 if upsample else 1)

    def detect(self, rgb: np.ndarray) -> tuple[list[idn.Detection], int | None]:
        dets, _shapes, size = self.detect_shapes(rgb)
        return dets, size

    def analyse(self, rgb: np.ndarray, face_rule: str = "largest") -> idn.Analysis:
        """Detects faces in an RGB uint8 image, chooses one by ``face_rule``, embeds only that one."""
        rgb = np.ascontiguousarray(rgb)
        faces, shapes, size = self.detect_shapes(rgb)
        result = idn.Analysis(faces=faces, det_size=size)
        if not faces:
            return result
        idx = idn.choose_face(faces, rgb.shape[1], rgb.shape[0], face_rule)
        with self._lock:
            emb = np.asarray(self.recognizer.compute_face_descriptor(rgb, shapes[idx]), np.float32)
        result.chosen = idx
        result.embedding = emb / max(float(np.linalg.norm(emb)), 1e-12)
        result.pose = faces[idx].pose
        return result


_models_lock = threading.Lock()
_models: dict[tuple[str, int], DlibFaceModel] = {}


def load_dlib_model(det_size: int = 640) -> DlibFaceModel:
    """dlib's back-end with the weights of the installed face_recognition_models, once per det_size."""
    folder = models_folder()
    key = (str(folder.resolve()), int(det_size))
    with _models_lock:
        if key not in _models:
            _models[key] = DlibFaceModel(folder, int(det_size))
        return _models[key]
