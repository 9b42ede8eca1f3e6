"""Face identity: insightface packs, the identity bank of the pristine photos, pose, coverage, scoring.

Plain Python (numpy, OpenCV, PIL, insightface, onnxruntime); nothing here imports ComfyUI.

* :func:`load_insightface_model` loads a ``FaceAnalysis`` pack from ``<root>/models/<name>`` once per
  (pack folder, providers, detection size) and never lets insightface download anything: a missing
  or incomplete pack is a :class:`FlenUserError` naming the folder and the files expected.
* :class:`FaceModel.analyse` detects faces (falling back to smaller detection sizes when none is
  found) and embeds only the face that is used.
* :func:`pose_from_keypoints` estimates yaw / pitch / roll from the 5 detector keypoints by fitting a
  generic 3-D 5-point face under scaled orthographic projection (used when the pack has no 3-D
  landmark model; with one, insightface's own pose is used).
* :func:`build_bank` turns reference photos into an :class:`IdentityBank`; :func:`score_images`
  scores candidates against it and routes them to passed / rejected with a reason. Both take any
  :class:`FaceBackend`: an insightface pack (:class:`FaceModel`) or dlib's recogniser
  (:mod:`engines.identity_dlib`); :mod:`engines.face_backends` picks one by name.

Pose convention (degrees): yaw > 0 the face turns toward the image's right, pitch > 0 the face looks
up, roll > 0 the head tilts counter-clockwise in the image.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import FlenUserError

# The default identity threshold (cosine similarity of ArcFace-style embeddings). How it was chosen is in
# web/docs/FLENIdentityFilter.md: above insightface's "same person" band for its buffalo_l / antelopev2
# recognisers (~0.28-0.35), leaning to precision because a wrong face in a LoRA dataset costs more than a
# missed good one; tune per character with the score table.
DEFAULT_THRESHOLD = 0.40
DECIDE_BY = ("mean", "best")
FACE_RULES = ("largest", "most_central", "highest_score")
SEVERAL_FACES = ("reject", "use chosen face")
MIN_DET_SIZE = 128

REASON_NO_FACE = "no face"
REASON_SEVERAL = "several faces"
REASON_BELOW = "below threshold"

KNOWN_PACKS = {
    "buffalo_l": ["det_10g.onnx", "w600k_r50.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx"],
    "antelopev2": ["scrfd_10g_bnkps.onnx", "glintr100.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx"],
}
_GENERIC_FILES = "an SCRFD detector (e.g. det_10g.onnx) and an ArcFace recogniser (e.g. w600k_r50.onnx)"


# ---- providers and packs ----------------------------------------------------------------------------------

def available_providers() -> list[str]:
    """onnxruntime providers to use: CUDA first when onnxruntime-gpu can use it, always CPU last."""
    import onnxruntime

    have = onnxruntime.get_available_providers()
    chosen = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in have and _cuda_driver_present() else []
    return chosen + ["CPUExecutionProvider"]


def _cuda_driver_present() -> bool:
    """onnxruntime-gpu lists CUDA even on machines without an NVIDIA driver; check the driver loads."""
    import ctypes
    import sys

    try:
        ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
        return True
    except OSError:
        return False


def _onnx_dir(folder: Path) -> Path:
    """The folder holding the pack's .onnx files (antelopev2 zips unpack to antelopev2/antelopev2/)."""
    if any(folder.glob("*.onnx")):
        return folder
    nested = folder / folder.name
    if nested.is_dir() and any(nested.glob("*.onnx")):
        return nested
    return folder


def list_packs(root: str | Path) -> list[str]:
    """Names of the pack folders under ``<root>/models`` that hold .onnx files."""
    base = Path(root) / "models"
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and any(_onnx_dir(p).glob("*.onnx")))


def pack_folder(root: str | Path, name: str) -> Path:
    """Checks that ``<root>/models/<name>`` holds ONNX files; returns the folder that holds them."""
    # ComfyUI 0.3.64 does not check V3 combo values against their options: the name may be anything
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise FlenUserError(f"Face model pack {str(name)[:80]!r} is not a pack name: choose one of the packs listed "
                            "(folders of models/insightface/models).")
    folder = Path(root) / "models" / name
    expected = ", ".join(KNOWN_PACKS.get(name, [])) or _GENERIC_FILES
    if not folder.is_dir():
        raise FlenUserError(
            f"Face model pack '{name}' not found: there is no folder {folder}. Put the pack's .onnx files "
            f"there ({expected}) and refresh the node list (press R). FLENwheel never downloads models.")
    onnx_dir = _onnx_dir(folder)
    if not any(onnx_dir.glob("*.onnx")):
        raise FlenUserError(
            f"Face model pack '{name}' in {folder} has no .onnx files. Expected: {expected}. "
            "FLENwheel never downloads models.")
    return onnx_dir


@dataclass
class Detection:
    box: np.ndarray            # x1, y1, x2, y2 (pixels)
    kps: np.ndarray | None     # 5 x 2 keypoints
    score: float
    pose: tuple[float, float, float] | None = None   # from a 3-D landmark model, when the pack has one


@dataclass
class Analysis:
    """What one image gives: all detections, the chosen one, its normalised embedding and pose."""
    faces: list[Detection]
    chosen: int | None = None
    embedding: np.ndarray | None = None
    pose: tuple[float, float, float] | None = None
    det_size: int | None = None

    @property
    def count(self) -> int:
        return len(self.faces)

    @property
    def box(self) -> list[float] | None:
        return None if self.chosen is None else [round(float(v), 1) for v in self.faces[self.chosen].box]


class FaceBackend(Protocol):
    """What build_bank / score_images need of a face model (insightface pack or dlib)."""
    name: str
    providers: tuple[str, ...]
    det_size: int

    def analyse(self, rgb: np.ndarray, face_rule: str = "largest") -> Analysis: ...


class FaceModel:
    """A loaded insightface pack: detector + recogniser (+ 3-D landmarks when present), loaded once."""

    def __init__(self, onnx_dir: Path, name: str, providers: Sequence[str], det_size: int) -> None:
        from insightface.app import FaceAnalysis

        self.name = name
        self.path = onnx_dir
        self.providers = tuple(providers)
        self.det_size = int(det_size)
        # An absolute folder as `name` makes insightface load it directly (no model-store download path).
        app = FaceAnalysis(name=str(onnx_dir), root=str(onnx_dir.parent),
                           allowed_modules=["detection", "recognition", "landmark_3d_68"],
                           providers=list(self.providers))
        missing = [t for t in ("detection", "recognition") if t not in app.models]
        if missing:
            found = ", ".join(sorted(p.name for p in onnx_dir.glob("*.onnx")))
            raise FlenUserError(
                f"Face model pack '{name}' in {onnx_dir} has no {' and no '.join(missing)} model "
                f"(found: {found}). A pack needs {_GENERIC_FILES}.")
        ctx = 0 if "CUDAExecutionProvider" in self.providers else -1
        app.prepare(ctx_id=ctx, det_size=(self.det_size, self.det_size))
        self.app = app
        self.detector = app.models["detection"]
        self.recognizer = app.models["recognition"]
        self.landmarks3d = app.models.get("landmark_3d_68")

    def det_sizes(self) -> list[int]:
        """The detection size, then smaller ones (halving, multiples of 32, down to 128) as fall-backs."""
        sizes, s = [], self.det_size
        while s >= MIN_DET_SIZE:
            sizes.append(s)
            s = (s // 2) // 32 * 32
        return sizes or [self.det_size]

    def detect(self, bgr: np.ndarray) -> tuple[list[Detection], int | None]:
        for size in self.det_sizes():
            boxes, kpss = self.detector.detect(bgr, input_size=(size, size))
            if boxes.shape[0]:
                return [Detection(box=boxes[i, :4].astype(np.float32),
                                  kps=None if kpss is None else kpss[i].astype(np.float32),
                                  score=float(boxes[i, 4])) for i in range(boxes.shape[0])], size
        return [], None

    def analyse(self, rgb: np.ndarray, face_rule: str = "largest") -> Analysis:
        """Detects faces in an RGB uint8 image, chooses one by ``face_rule``, embeds only that one."""
        from insightface.app.common import Face

        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        faces, size = self.detect(bgr)
        result = Analysis(faces=faces, det_size=size)
        if not faces:
            return result
        idx = choose_face(faces, rgb.shape[1], rgb.shape[0], face_rule)
        det = faces[idx]
        face = Face(bbox=det.box, kps=det.kps, det_score=det.score)
        self.recognizer.get(bgr, face)
        emb = np.asarray(face.embedding, np.float32)
        result.chosen = idx
        result.embedding = emb / max(float(np.linalg.norm(emb)), 1e-12)
        if self.landmarks3d is not None:
            self.landmarks3d.get(bgr, face)
            if face.get("pose") is not None:
                pitch, yaw, roll = (float(v) for v in face.pose)
                result.pose = (yaw, pitch, roll)
        if result.pose is None and det.kps is not None:
            result.pose = pose_from_keypoints(det.kps)
        return result


_models_lock = threading.Lock()
_models: dict[tuple[str, tuple[str, ...], int], FaceModel] = {}


def load_insightface_model(root: str | Path, name: str, det_size: int = 640,
                           providers: Sequence[str] | None = None) -> FaceModel:
    """The pack ``<root>/models/<name>``, loaded once per (folder, providers, det_size)."""
    onnx_dir = pack_folder(root, name)
    provs = tuple(providers) if providers else tuple(available_providers())
    key = (str(onnx_dir.resolve()), provs, int(det_size))
    with _models_lock:
        model = _models.get(key)
        if model is None:
            model = FaceModel(onnx_dir, name, provs, int(det_size))
            _models[key] = model
        return model


def choose_face(faces: Sequence[Detection], width: int, height: int, rule: str = "largest") -> int:
    """Index of the face to use: the largest box, the box nearest the image centre, or the best score."""
    if rule not in FACE_RULES:
        raise FlenUserError(f"Unknown face rule '{rule}'; use one of {', '.join(FACE_RULES)}.")
    if rule == "largest":
        values = [-(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    elif rule == "most_central":
        values = [((f.box[0] + f.box[2]) / 2 - width / 2) ** 2 + ((f.box[1] + f.box[3]) / 2 - height / 2) ** 2
                  for f in faces]
    else:
        values = [-f.score for f in faces]
    return int(np.argmin(values))


# ---- pose from 5 keypoints -------------------------------------------------------------------------------

# A generic 3-D 5-point face (left eye, right eye, nose tip, left and right mouth corner as seen in the
# image), in units of the eye distance; x right, y up, z toward the camera. x and y are the ArcFace
# alignment template (so its frontal projection is what detectors report for a frontal face); z are
# typical depths relative to the eyes.
FACE_MODEL_3D = np.array([
    [-0.5, 0.0, 0.0],
    [0.5, 0.0, 0.0],
    [0.0, -0.574, 0.55],
    [-0.41, -1.160, 0.10],
    [0.41, -1.160, 0.10],
], dtype=np.float64)


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head rotation for the module's convention (degrees): R = Ry(yaw) @ Rx(-pitch) @ Rz(roll)."""
    a, b, c = math.radians(yaw), math.radians(-pitch), math.radians(roll)
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return ry @ rx @ rz


@dataclass
class PoseFit:
    """A scaled orthographic fit of a 3-D point model to image points: image = centre + scale * R[:2] (X - m)."""
    rotation: np.ndarray       # 3 x 3, rows orthonormal
    scale: float               # pixels per model unit
    image_centre: np.ndarray   # mean of the image points (x right, y up)
    model_centre: np.ndarray   # mean of the model points

    def project(self, points: np.ndarray) -> np.ndarray:
        """Image positions (x right, y down) of other points of the model's frame under this fit."""
        q = (np.asarray(points, np.float64) - self.model_centre) @ self.rotation[:2].T * self.scale
        q += self.image_centre
        q[:, 1] = -q[:, 1]
        return q


def fit_pose(kps: np.ndarray, model: np.ndarray = FACE_MODEL_3D) -> PoseFit:
    """Least-squares affine projection of ``model`` (N x 3) onto the image points (N x 2, y down), made the
    nearest scaled rotation."""
    p = np.asarray(kps, np.float64).reshape(-1, 2).copy()
    p[:, 1] = -p[:, 1]                       # image y down -> y up
    pc = p.mean(axis=0)
    p -= pc
    mc = model.mean(axis=0)
    m = model - mc
    proj, *_ = np.linalg.lstsq(m, p, rcond=None)   # m @ proj ~ p ; proj is 3 x 2
    u, s, vt = np.linalg.svd(proj.T, full_matrices=False)   # nearest matrix with orthonormal rows
    rows = u @ vt
    rot = np.stack([rows[0], rows[1], np.cross(rows[0], rows[1])])
    return PoseFit(rot, float(s.mean()), pc, mc)


def pose_from_keypoints(kps: np.ndarray, model: np.ndarray = FACE_MODEL_3D) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from 5 image keypoints (x right, y down), by a least-squares scaled
    orthographic fit of the generic 3-D face. Exact for noise-free orthographic views; with 5 points the
    fit is well-posed at every yaw, but real detectors rarely give usable keypoints beyond |yaw| ~ 70.
    Another ``model`` (N x 3, same frame) takes N image points."""
    return pose_angles(fit_pose(kps, model).rotation)


def pose_angles(rot: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) of a rotation made by :func:`rotation_matrix`, rounded to 0.01 degree."""
    b = math.asin(max(-1.0, min(1.0, -rot[1, 2])))
    yaw = math.degrees(math.atan2(rot[0, 2], rot[2, 2]))
    roll = math.degrees(math.atan2(rot[1, 0], rot[1, 1]))
    return (round(yaw, 2), round(-math.degrees(b), 2), round(roll, 2))


# ---- coverage ----------------------------------------------------------------------------------------------

YAW_BINS = (("profile left", -180.0, -60.0), ("3/4 left", -60.0, -20.0), ("frontal", -20.0, 20.0),
            ("3/4 right", 20.0, 60.0), ("profile right", 60.0, 180.0))
PITCH_BINS = (("looking down", -180.0, -15.0), ("level", -15.0, 15.0), ("looking up", 15.0, 180.0))


def _bin(value: float, bins) -> str:
    for label, lo, hi in bins:
        if lo <= value < hi:
            return label
    return bins[-1][0]


def pose_bin(yaw: float, pitch: float) -> tuple[str, str]:
    return _bin(yaw, YAW_BINS), _bin(pitch, PITCH_BINS)


@dataclass
class Coverage:
    counts: dict[tuple[str, str], int]

    @property
    def covered(self) -> list[str]:
        return [f"{y} / {p}" for (y, p), n in self.counts.items() if n > 0]

    @property
    def missing(self) -> list[str]:
        return [f"{y} / {p}" for (y, p), n in self.counts.items() if n == 0]

    def text(self) -> str:
        lines = [f"Coverage: {len(self.covered)} of {len(self.counts)} yaw/pitch bins "
                 "(yaw bins at +-20 and +-60 deg, pitch bins at +-15 deg)."]
        lines.append("covered: " + ("; ".join(f"{b} ({self.counts[_split(b)]})" for b in self.covered) or "none"))
        lines.append("missing: " + ("; ".join(self.missing) or "none") + " - sweep these angles to fill them.")
        return "\n".join(lines)

    def chart(self, cell: int = 64):
        """A small grid: columns = yaw bins, rows = pitch bins (up on top); green = covered with the count,
        red = missing."""
        from PIL import Image, ImageDraw

        label_w, label_h = 96, 28
        w = label_w + cell * len(YAW_BINS)
        h = label_h + cell * len(PITCH_BINS)
        img = Image.new("RGB", (w, h), (32, 32, 32))
        d = ImageDraw.Draw(img)
        for ci, (ylabel, _lo, _hi) in enumerate(YAW_BINS):
            d.text((label_w + ci * cell + 4, 8), ylabel.replace("profile", "prof."), fill=(230, 230, 230))
        for ri, (plabel, _lo, _hi) in enumerate(reversed(PITCH_BINS)):
            y0 = label_h + ri * cell
            d.text((4, y0 + cell // 2 - 6), plabel, fill=(230, 230, 230))
            for ci, (ylabel, _a, _b) in enumerate(YAW_BINS):
                n = self.counts[(ylabel, plabel)]
                x0 = label_w + ci * cell
                color = (46, 160, 67) if n else (170, 50, 50)
                d.rectangle([x0 + 2, y0 + 2, x0 + cell - 3, y0 + cell - 3], fill=color)
                d.text((x0 + cell // 2 - 4, y0 + cell // 2 - 6), str(n), fill=(255, 255, 255))
        return img


def _split(label: str) -> tuple[str, str]:
    y, p = label.split(" / ")
    return y, p


def coverage(poses: Sequence[tuple[float, float, float]]) -> Coverage:
    counts = {(y[0], p[0]): 0 for p in PITCH_BINS for y in YAW_BINS}
    for yaw, pitch, _roll in poses:
        counts[pose_bin(yaw, pitch)] += 1
    return Coverage(counts)


# ---- identity bank -----------------------------------------------------------------------------------------

@dataclass
class Reference:
    index: int                       # position in the reference batch
    embedding: np.ndarray            # normalised
    pose: tuple[float, float, float]
    box: list[float]
    det_score: float


@dataclass
class IdentityBank:
    """FLEN_IDENTITY: what the filter compares against, and the face pack that made it."""
    pack: str
    pack_root: str
    providers: tuple[str, ...]
    det_size: int
    references: list[Reference]
    skipped: list[tuple[int, str]] = field(default_factory=list)   # (index, reason)

    @property
    def embeddings(self) -> np.ndarray:
        return np.stack([r.embedding for r in self.references])

    @property
    def mean(self) -> np.ndarray:
        m = self.embeddings.mean(axis=0)
        return m / max(float(np.linalg.norm(m)), 1e-12)

    @property
    def coverage(self) -> Coverage:
        return coverage([r.pose for r in self.references])

    def report(self) -> str:
        lines = [f"Identity bank ({self.pack}): {len(self.references)} reference photo(s) used, "
                 f"{len(self.skipped)} skipped."]
        for r in self.references:
            y, p, ro = r.pose
            lines.append(f"  photo {r.index + 1}: yaw {y:+.0f}, pitch {p:+.0f}, roll {ro:+.0f} "
                         f"({' / '.join(pose_bin(y, p))}), box {[int(v) for v in r.box]}")
        for idx, reason in self.skipped:
            lines.append(f"  photo {idx + 1}: skipped - {reason}")
        lines.append(self.coverage.text())
        return "\n".join(lines)


def build_bank(model: FaceBackend, images: Sequence[np.ndarray], root: str | Path = "",
               on_image: Callable[[int, int], None] | None = None) -> IdentityBank:
    """One reference per photo with exactly one face; photos with none or several are listed as skipped.
    Raises FlenUserError when no photo is usable."""
    refs, skipped = [], []
    for i, rgb in enumerate(images):
        a = model.analyse(rgb, "largest")
        if a.count == 0:
            skipped.append((i, REASON_NO_FACE))
        elif a.count > 1:
            skipped.append((i, f"{REASON_SEVERAL} ({a.count})"))
        else:
            # One face: analyse() chose it, so its embedding and box are set.
            assert a.embedding is not None and a.box is not None
            refs.append(Reference(index=i, embedding=a.embedding, pose=a.pose or (0.0, 0.0, 0.0),
                                  box=a.box, det_score=a.faces[0].score))
        if on_image is not None:
            on_image(i + 1, len(images))
    if not refs:
        detail = "; ".join(f"photo {i + 1}: {r}" for i, r in skipped)
        raise FlenUserError(
            f"None of the {len(images)} reference photo(s) shows exactly one face ({detail}). Give "
            f"FLEN Identity Reference photos with one clearly visible face each (face pack '{model.name}').")
    return IdentityBank(pack=model.name, pack_root=str(root), providers=model.providers, det_size=model.det_size,
                        references=refs, skipped=skipped)


# ---- scoring -----------------------------------------------------------------------------------------------

@dataclass
class ScoreRow:
    index: int
    passed: bool
    reason: str | None
    faces: int
    score: float | None
    score_mean: float | None
    score_best: float | None
    best_reference: int | None
    yaw: float | None
    pitch: float | None
    roll: float | None
    box: list[float] | None
    # cosine to each reference photo, in the bank's order (the gallery's detail view lists them)
    reference_scores: list[float] | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def score_images(bank: IdentityBank, model: FaceBackend, images: Sequence[np.ndarray], *,
                 threshold: float = DEFAULT_THRESHOLD, decide_by: str = "mean", face_rule: str = "largest",
                 several_faces: str = "reject",
                 on_image: Callable[[int, int], None] | None = None) -> list[ScoreRow]:
    """One row per image: the chosen face's cosine to the bank mean and to the best single reference;
    ``decide_by`` says which one is compared with ``threshold``. Each image is analysed once."""
    if decide_by not in DECIDE_BY:
        raise FlenUserError(f"Unknown decide_by '{decide_by}'; use one of {', '.join(DECIDE_BY)}.")
    if several_faces not in SEVERAL_FACES:
        raise FlenUserError(f"Unknown several_faces '{several_faces}'; use one of {', '.join(SEVERAL_FACES)}.")
    refs, mean = bank.embeddings, bank.mean
    rows = []
    for i, rgb in enumerate(images):
        a = model.analyse(rgb, face_rule)
        if a.count == 0:
            rows.append(ScoreRow(i, False, REASON_NO_FACE, 0, None, None, None, None, None, None, None, None))
        else:
            sims = refs @ a.embedding
            best = int(np.argmax(sims))
            s_mean, s_best = float(mean @ a.embedding), float(sims[best])
            score = s_mean if decide_by == "mean" else s_best
            if a.count > 1 and several_faces == "reject":
                reason = REASON_SEVERAL
            elif score < threshold:
                reason = REASON_BELOW
            else:
                reason = None
            yaw, pitch, roll = a.pose or (None, None, None)
            rows.append(ScoreRow(i, reason is None, reason, a.count, round(score, 4), round(s_mean, 4),
                                 round(s_best, 4), bank.references[best].index, yaw, pitch, roll, a.box,
                                 [round(float(x), 4) for x in sims]))
        if on_image is not None:
            on_image(i + 1, len(images))
    return rows


def summary(rows: Sequence[ScoreRow], threshold: float, decide_by: str) -> str:
    passed = sum(r.passed for r in rows)
    reasons: dict[str, int] = {}
    for r in rows:
        if r.reason:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
    why = ", ".join(f"{n} {k}" for k, n in reasons.items())
    text = (f"{passed} of {len(rows)} image(s) passed (score to the {decide_by} >= {threshold:.2f})"
            + (f"; rejected: {why}" if why else "") + ".")
    if rows and passed == 0:
        text += " Nothing passed: the passed outputs are empty batches."
    return text


def score_table(rows: Sequence[ScoreRow], threshold: float, decide_by: str, face_rule: str) -> dict:
    """The JSON-able score table that the node returns and the gallery shows."""
    return {"threshold": threshold, "decide_by": decide_by, "face_rule": face_rule,
            "passed": sum(r.passed for r in rows), "rejected": sum(not r.passed for r in rows),
            "summary": summary(rows, threshold, decide_by), "rows": [r.as_dict() for r in rows]}
