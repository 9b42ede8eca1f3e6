"""Versioned training sets: what the trainers learn from, traceable to every image and decision.

One folder per version in the character workspace ``<output>/flenwheel/<character>/datasets/``::

    datasets/v3/
      dataset.json                 version record: status (draft|frozen), token, template, hash, counts
      manifest.jsonl               one JSON line per image: file, caption, kind, phase, provenance, hashes
      head/pristine/<stem>.png     the image …
      head/pristine/<stem>.txt     … and its caption, same stem (what ai-toolkit's ``folder_path`` and
      head/enriched/ …             musubi-tuner's ``image_directory`` read: every leaf folder is one
      body/synthetic/ …            trainer dataset entry)

Stems are unique in a version (``<character>_<nnnnn>``), so the leaf folders can also be merged.

Durability. Every file is written atomically (temp file, fsync, ``os.replace``); per image the caption
is written first, then the image, then its manifest line, appended with one ``write`` on an
``O_APPEND`` descriptor and fsynced. So at any instant every image in a folder has its caption, and
every manifest line names files that exist. A crash can leave a torn last manifest line (ignored by
the loader) or an image + caption without a manifest line (an *orphan*, listed by the loader); the
next writer or :func:`freeze` removes both before it does anything else. The manifest is the truth.

Versions. ``new`` creates ``v<N+1>`` (built in a temp folder and renamed into place). Writing into an
existing version adds to it while it is a draft and is refused once it is frozen; trainers call
:func:`freeze` before they read a version, so a LoRA always names a version that can no longer change.
While a writer runs, ``dataset.json`` carries a ``writing`` record; it goes only when the run has written
everything. A run killed half-way (SIGKILL, a server crash) leaves it behind: :func:`freeze`, and so every
trainer, refuses such a version, and the next writer run into it repairs it and finishes it (images the
killed run already wrote, byte for byte, are not written twice).
The content hash depends on the images' and captions' bytes only: it changes when and only when an
image or a caption changes (not with provenance, file names or order).

Plain Python: no ComfyUI imports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import string
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from .atomic_files import atomic_write, sha256_file
from .atomic_files import fsync_dir as _fsync_dir
from .errors import FlenUserError
from .png_files import png_bytes
from .safe_images import truncation_note
from .workspace import validate_character, workspace_dir, workspace_root

fcntl: ModuleType | None
try:  # POSIX: a real cross-process lock; elsewhere a process-wide lock only
    import fcntl as _fcntl

    fcntl = _fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FORMAT = "flenwheel-dataset"
FORMAT_VERSION = 1
INFO_NAME = "dataset.json"
MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".lock"
DATASETS_DIR = "datasets"
PHASES = ("head", "body")
KINDS = ("pristine", "enriched", "synthetic")
NEAR_DUPLICATE_MODES = ("flag", "drop", "keep")
DEFAULT_TEMPLATE = "{token}, {labels}"
CAPTION_FIELDS = ("token", "class", "labels", "label", "angle", "expression", "pose", "phase", "kind", "character",
                  "description")
# where captions come from: the template, the VLM description (FLEN Caption Images' meta), or both
CAPTION_SOURCES = ("template", "vlm", "template+vlm")
# what the manifest records for an image whose caption a reviewer edited in the gallery: it wins over the above
REVIEWER_SOURCE = "reviewer"


def reviewer_caption_of(meta: dict[str, Any]) -> str:
    """The caption a reviewer edited in the gallery (FLEN Load Approved's ``reviewer_caption``), or ''."""
    value = meta.get("reviewer_caption") if isinstance(meta, dict) else None
    return _clean_text(value) if isinstance(value, str) else ""


def validate_caption_source(source: str) -> str:
    if source not in CAPTION_SOURCES:
        raise FlenUserError(f"caption_source must be one of {', '.join(CAPTION_SOURCES)}.")
    return source


def template_for_source(template: str, source: str, metas: list[dict[str, Any]] | None) -> str:
    """The template a caption source means; vlm sources need a description in every record (but those a
    reviewer captioned, whose caption is theirs)."""
    if validate_caption_source(source) == "template":
        return template
    missing = [k for k, m in enumerate(metas or [{}])
               if not (isinstance(m, dict) and (m.get("description") or reviewer_caption_of(m)))]
    if missing:
        raise FlenUserError(f"caption_source '{source}' needs a VLM description for every image, but record "
                            f"#{missing[0]} has none: put FLEN Caption Images before the writer and connect its "
                            "meta output, or choose caption_source 'template'.")
    if source == "vlm":
        return "{token}, {description}"
    template = template if template.strip() else DEFAULT_TEMPLATE
    return template if "{description}" in template else template + ", {description}"
PHASH_THRESHOLD = 6
_MEAN_COLOUR_TOLERANCE = 24  # 0..255: flat images of different colours share a pHash; they are not duplicates
_VERSION_RE = re.compile(r"^v([1-9][0-9]{0,5})$")
_BAD_TOKEN_CHARS = set('/\\:*?"<>|{},')
_MAX_TOKEN = 100
_MAX_CAPTION = 2000



def append_line(path: Path, record: dict[str, Any]) -> None:
    """Appends one JSON line with a single write on an O_APPEND descriptor, then fsyncs."""
    data = (json.dumps(record, ensure_ascii=False, sort_keys=True, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Complete lines of a manifest and the problems found (a torn last line is reported, not fatal)."""
    if not path.is_file():
        return [], []
    data = path.read_bytes()
    records, issues = [], []
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty unless the last append was torn
    if tail.strip():
        issues.append(f"torn last manifest line ({len(tail)} bytes) ignored")
    for k, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            issues.append(f"manifest line {k} is not valid JSON; ignored")
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            issues.append(f"manifest line {k} is not a JSON object; ignored")
    return records, issues


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- locks ------------------------------------------------------------------------------------

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on a folder for this process's threads and (on POSIX) other processes."""
    folder = Path(folder)
    key = str(folder.resolve())
    with _thread_locks_guard:
        tlock = _thread_locks.setdefault(key, threading.Lock())
    with tlock:
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


# ---- inputs: token, template, captions, images ----------------------------------------------

def validate_token(token: object) -> str:
    """The instance token (trigger word + class, e.g. ``ohwx_char person``) goes into every caption and
    into trainer configs: one line of printable text without path, quote, brace or comma characters."""
    if not isinstance(token, str) or not token.strip():
        raise FlenUserError("The instance token is empty: give the trigger word the LoRA should learn, "
                            "e.g. 'ohwx_char person'.")
    token = token.strip()
    bad = sorted({c for c in token if c in _BAD_TOKEN_CHARS or not c.isprintable()})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise FlenUserError(f"The instance token {token[:60]!r} contains {shown}: captions and trainer configs "
                            "cannot hold these. Use letters, digits, spaces, '_', '-' or '.' (e.g. "
                            "'ohwx_char person').")
    if len(token) > _MAX_TOKEN:
        raise FlenUserError(f"The instance token is {len(token)} characters long; keep it under {_MAX_TOKEN}.")
    return " ".join(token.split())


def validate_template(template: object) -> str:
    """A caption template: text with {token} and optional {labels}, {angle}, {expression}, {pose}, …"""
    if not isinstance(template, str) or not template.strip():
        template = DEFAULT_TEMPLATE
    template = " ".join(template.split())
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise FlenUserError(f"Caption template {template!r} is malformed ({exc}); write fields as {{token}}, "
                            "{labels}…, and a literal brace as {{ or }}.") from None
    unknown = [f for f in fields if f not in CAPTION_FIELDS]
    if unknown:
        raise FlenUserError(f"Caption template field {{{unknown[0]}}} is unknown; use "
                            + ", ".join("{" + f + "}" for f in CAPTION_FIELDS) + ".")
    if "token" not in fields:
        raise FlenUserError(f"Caption template {template!r} has no {{token}}: every caption must carry the "
                            "instance token, or the LoRA never learns its trigger word.")
    return template


def _clean_text(value: Any) -> str:
    if value is None or isinstance(value, (dict, list, tuple)):
        return ""
    text = "".join(c if c.isprintable() else " " for c in str(value))
    return " ".join(text.split())


def _human(label: str) -> str:
    return _clean_text(label).replace("_", " ")


def labels_of(meta: dict[str, Any]) -> dict[str, str]:
    """angle / expression / pose / label words of a FLEN_META record (angle-sweep labels by their kind)."""
    label = _clean_text(meta.get("label"))
    label_kind = meta.get("label_kind")
    angle = _clean_text(meta.get("angle")) or (label if label_kind == "angle" else "")
    expression = _clean_text(meta.get("expression")) or (label if label_kind == "expression" else "")
    pose = _clean_text(meta.get("pose")) if isinstance(meta.get("pose"), str) else ""
    return {"angle": angle, "expression": expression, "pose": pose, "label": label}


def render_caption(template: str, token: str, meta: dict[str, Any], *, phase: str, kind: str,
                   class_prompt: str = "", character: str = "") -> str:
    labels = labels_of(meta)
    words: list[str] = []
    for key in ("angle", "expression", "pose", "label"):
        w = _human(labels[key])
        if w and w not in words:
            words.append(w)
    values = {"token": token, "class": _clean_text(class_prompt), "labels": ", ".join(words),
              "label": _human(labels["label"]), "angle": _human(labels["angle"]),
              "expression": _human(labels["expression"]), "pose": _human(labels["pose"]), "phase": phase,
              "kind": kind, "character": character,
              "description": _clean_text(meta.get("description")) if isinstance(meta.get("description"), str) else ""}
    text = template.format_map(values)
    parts = [" ".join(p.split()) for p in text.split(",")]
    caption = ", ".join(p for p in parts if p)
    if len(caption) > _MAX_CAPTION:
        raise FlenUserError(f"A caption is {len(caption)} characters long (limit {_MAX_CAPTION}); shorten the "
                            "template or the labels.")
    return caption


def reviewer_caption(text: str, token: str) -> str:
    """A reviewer's caption as the dataset writes it: one line, with the instance token (put in front when the
    reviewer left it out: the LoRA must see its trigger word in every caption)."""
    caption = _clean_text(text)
    if not re.search(r"(?<!\w)" + re.escape(token) + r"(?!\w)", caption):
        caption = f"{token}, {caption}" if caption else token
    if len(caption) > _MAX_CAPTION:
        raise FlenUserError(f"A reviewer's caption is {len(caption)} characters long (limit {_MAX_CAPTION}); "
                            "shorten it in the review gallery.")
    return caption


def prepare_image(image: Any) -> tuple[Image.Image, list[str]]:
    """An HWC (or HW) array/tensor in 0..1 or uint8, or a PIL image → RGB PIL image and notes on what
    was converted. Grayscale is expanded to RGB; transparency is flattened onto white."""
    notes: list[str] = []
    if isinstance(image, Image.Image):
        im = image
        if im.width == 0 or im.height == 0:
            raise FlenUserError("An image has zero width or height.")
        if im.mode in ("L", "LA", "1", "I", "I;16", "F"):
            notes.append("grayscale converted to RGB")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            arr = np.asarray(im, dtype=np.float32) / 255.0
            return _flatten_alpha(arr, notes)
        return im.convert("RGB"), notes
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise FlenUserError(f"An image has shape {tuple(arr.shape)}: expected height × width × 1–4 channels "
                            "(ComfyUI IMAGE).")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise FlenUserError("An image has zero width or height.")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    else:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise FlenUserError("An image contains NaN or infinite values: the node before produced a broken "
                                "image.")
        arr = np.clip(arr, 0.0, 1.0)
    if arr.shape[2] in (1, 2):
        notes.append("grayscale converted to RGB")
        arr = np.concatenate([np.repeat(arr[:, :, :1], 3, axis=2), arr[:, :, 1:]], axis=2)
    if arr.shape[2] == 4:
        return _flatten_alpha(arr, notes)
    return Image.fromarray((arr * 255.0).round().astype(np.uint8), "RGB"), notes


def _flatten_alpha(arr: np.ndarray, notes: list[str]) -> tuple[Image.Image, list[str]]:
    rgb, alpha = arr[:, :, :3], arr[:, :, 3:4]
    if (alpha < 1.0).any():
        notes.append("transparency flattened onto white")
        rgb = rgb * alpha + (1.0 - alpha)
    else:
        notes.append("opaque alpha channel dropped")
    return Image.fromarray((np.clip(rgb, 0, 1) * 255.0).round().astype(np.uint8), "RGB"), notes


# ---- perceptual hash --------------------------------------------------------------------------

_DCT32 = np.cos(np.pi * (2 * np.arange(32)[None, :] + 1) * np.arange(32)[:, None] / 64.0)


def phash(im: Image.Image) -> str:
    """64-bit DCT perceptual hash (as imagehash.phash), 16 hex digits."""
    gray = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ gray @ _DCT32.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def mean_colour(im: Image.Image) -> list[int]:
    return [int(round(v)) for v in np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)]


def is_near_duplicate(a: dict[str, Any], b: dict[str, Any], threshold: int) -> bool:
    """Same structure (pHash within ``threshold`` bits) and about the same colour."""
    if not a.get("phash") or not b.get("phash"):
        return False
    dist = bin(int(a["phash"], 16) ^ int(b["phash"], 16)).count("1")
    colour = max(abs(x - y) for x, y in zip(a.get("mean_rgb") or [0, 0, 0], b.get("mean_rgb") or [0, 0, 0],
                                             strict=False))
    return dist <= threshold and colour <= _MEAN_COLOUR_TOLERANCE


# ---- hash and counts --------------------------------------------------------------------------

def content_hash(records: list[dict[str, Any]]) -> str:
    """sha256 over the multiset of (image bytes, caption bytes[, control bytes…]) hashes."""
    lines = []
    for r in records:
        controls = ",".join(c.get("sha256", "") for c in r.get("controls") or [])
        lines.append(f"{r.get('sha256', '')}:{sha256_bytes(str(r.get('caption', '')).encode('utf-8'))}:{controls}")
    return "sha256:" + sha256_bytes("\n".join(sorted(lines)).encode("utf-8"))


def counts_of(records: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {"images": len(records)}
    for key, values in (("phase", PHASES), ("kind", KINDS)):
        c = Counter(r.get(key) for r in records)
        for v in values:
            out[v] = c.get(v, 0)
    out["near_duplicates"] = sum(1 for r in records if r.get("near_duplicate_of"))
    if any("controls" in r for r in records):
        out["pairs"] = len(records)
        out["controls"] = max((len(r.get("controls") or []) for r in records), default=0)
    return out


# ---- versions ---------------------------------------------------------------------------------

def datasets_root(output_dir: str | os.PathLike, character: str, folder: str = DATASETS_DIR) -> Path:
    return workspace_dir(output_dir, character) / folder


def version_dir_of(value: Any, output_dir: str | os.PathLike, folders: tuple[str, ...] = (DATASETS_DIR, "edit_pairs"),
                   ) -> tuple[Path, str]:
    """The version folder a FLEN_DATASET value names, checked to be ``<output>/flenwheel/<character>/
    <datasets|edit_pairs>/vN`` (a prompt can hand a node a literal FLEN_DATASET dict, so its path is
    untrusted). Returns (real folder, character)."""
    raw = value.get("path") if isinstance(value, dict) else value
    if not isinstance(raw, (str, os.PathLike)) or not str(raw).strip():
        raise FlenUserError("Connect a FLEN_DATASET from FLEN Dataset Writer or FLEN Edit Pair Writer.")
    root = Path(os.path.realpath(workspace_root(output_dir)))
    path = Path(os.path.realpath(str(raw)))
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = ()
    if len(parts) != 3 or parts[1] not in folders or version_number(parts[2]) is None:
        raise FlenUserError("This FLEN_DATASET does not name a dataset version of the pack (output/flenwheel/"
                            "<character>/datasets/vN or edit_pairs/vN): connect FLEN Dataset Writer or FLEN Edit "
                            "Pair Writer instead of typing a dataset.")
    validate_character(parts[0])
    if not (path / INFO_NAME).is_file():
        raise FlenUserError(f"Dataset version {parts[0]}/{parts[1]}/{parts[2]} does not exist.")
    return path, parts[0]


def version_number(name: str) -> int | None:
    m = _VERSION_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def list_versions(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and version_number(p.name) and (p / INFO_NAME).is_file()]
    return sorted(names, key=lambda name: version_number(name) or 0)  # every name has a number


def read_info(version_dir: Path) -> dict[str, Any]:
    path = Path(version_dir) / INFO_NAME
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FlenUserError(f"{version_dir} is not a FLENwheel dataset version (no {INFO_NAME}).") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FlenUserError(f"{path} is unreadable; the version cannot be used.") from None
    if info.get("format") != FORMAT:
        raise FlenUserError(f"{path} is not a FLENwheel dataset record.")
    return info


def _write_info(version_dir: Path, info: dict[str, Any]) -> None:
    atomic_write(Path(version_dir) / INFO_NAME,
                 json.dumps(info, ensure_ascii=False, indent=2, sort_keys=True).encode("utf-8"))


def create_version(root: Path, info: dict[str, Any], build: Any = None) -> Path:
    """Creates the next ``vN`` under ``root``: built completely in a temp folder (``build(tmp)`` may add
    files), then renamed into place, so a version folder is never seen half made."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with folder_lock(root):
        for stale in root.glob(".tmp-v*"):  # left by a crash: never a version, safe to remove
            _rmtree(stale)
        existing = [n for p in root.iterdir() if p.is_dir() and (n := version_number(p.name))]
        n = max(existing, default=0) + 1
        name = f"v{n}"
        tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            record = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": name, "status": "draft",
                      "created_at": time.time(), "frozen_by": [], **info}
            record["version"] = name
            if build is not None:
                build(tmp, record)
            _write_info(tmp, record)
            _fsync_dir(tmp)
            os.rename(tmp, root / name)
        except BaseException:
            _rmtree(tmp)
            raise
        _fsync_dir(root)
    return root / name


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def incomplete_message(version_dir: Path, info: dict[str, Any]) -> str:
    version = info.get("version", Path(version_dir).name)
    writing = info.get("writing")
    marker: dict[str, Any] = writing if isinstance(writing, dict) else {}
    by = str(marker.get("by") or "a dataset writer")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(marker.get("started_at") or 0)))
    records, _ = read_manifest(Path(version_dir) / MANIFEST_NAME)
    return (f"Dataset {version} at {version_dir} is incomplete: {by} began writing it at {when} and did not finish "
            f"(stopped, killed or the server crashed); {len(records)} images of it are on disk. Run FLEN Dataset "
            f"Writer again with version = '{version}' and the same images to finish it (it repairs the version and "
            "skips the images already written), or delete the folder to discard it.")


def frozen_message(version_dir: Path, info: dict[str, Any]) -> str:
    users = ", ".join(u.get("by", "?") for u in info.get("frozen_by") or []) or "a trainer"
    return (f"Dataset {info.get('version', Path(version_dir).name)} at {version_dir} is frozen (used by {users}): "
            "it can no longer change, so every LoRA trained on it stays traceable. Write a new version "
            "instead (version = 'new').")


def recover(version_dir: Path) -> list[str]:
    """Repairs what a crash can leave in a draft (caller holds the folder lock): a torn manifest tail is
    cut off, temp files and image/caption files without a manifest line are removed. Returns what was
    done."""
    version_dir = Path(version_dir)
    done: list[str] = []
    manifest = version_dir / MANIFEST_NAME
    if manifest.is_file():
        data = manifest.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            atomic_write(manifest, data[:end])
            done.append("cut a torn last manifest line")
    records, _ = read_manifest(manifest)
    known = set()
    for r in records:
        for key in ("file", "caption_file"):
            if r.get(key):
                known.add(r[key])
        for c in r.get("controls") or []:
            known.update(v for k, v in c.items() if k.endswith("file") and v)
    for path in sorted(version_dir.rglob("*")):
        if not path.is_file() or path.parent == version_dir:
            continue
        rel = path.relative_to(version_dir).as_posix()
        if path.name.startswith(".tmp-") or rel not in known:
            path.unlink()
            done.append(f"removed {rel}")
    return done


def freeze(version_dir: str | os.PathLike, by: str, note: str = "") -> dict[str, Any]:
    """Marks a version as used for training: it never changes again. Idempotent; each caller is recorded
    in ``frozen_by``. Repairs crash leftovers first and checks every file against the manifest, so a
    frozen version is always complete. Returns the version record (with ``hash`` and ``counts``)."""
    version_dir = Path(version_dir)
    with folder_lock(version_dir):
        info = read_info(version_dir)
        if info.get("writing"):  # we hold the lock, so no writer is still at it: it was killed
            raise FlenUserError(incomplete_message(version_dir, info))
        if info.get("status") != "frozen":
            recover(version_dir)
            ds = load_dataset(version_dir, verify=True)
            if ds.problems:
                raise FlenUserError(f"Dataset {version_dir} cannot be frozen: " + "; ".join(ds.problems[:5]))
            if not ds.items:
                raise FlenUserError(f"Dataset {version_dir} is empty: nothing to train on.")
            info.update(status="frozen", frozen_at=time.time(), hash=ds.hash, counts=ds.counts)
        info.setdefault("frozen_by", []).append({"by": str(by)[:200], "at": time.time(), "note": str(note)[:500]})
        _write_info(version_dir, info)
    return info


# ---- loading ----------------------------------------------------------------------------------

@dataclass
class Dataset:
    """A version read back: its record, manifest items (with absolute paths), hash and counts."""

    path: Path
    info: dict[str, Any]
    items: list[dict[str, Any]]
    hash: str
    counts: dict[str, int]
    folders: list[Path]
    problems: list[str] = field(default_factory=list)  # missing/changed files: the version is damaged
    notes: list[str] = field(default_factory=list)  # crash leftovers (torn tail, orphans): harmless

    @property
    def version(self) -> str:
        return self.info.get("version", self.path.name)

    @property
    def frozen(self) -> bool:
        return self.info.get("status") == "frozen"

    @property
    def incomplete(self) -> bool:
        """A writer began this version and has not finished it (or was killed)."""
        return bool(self.info.get("writing"))

    @property
    def consistent(self) -> bool:
        return not self.problems

    def as_flen_dataset(self) -> dict[str, Any]:
        return flen_dataset(self.path, self.info, self.hash, self.counts)


def flen_dataset(path: Path, info: dict[str, Any], hash_: str, counts: dict[str, int]) -> dict[str, Any]:
    """The FLEN_DATASET value handed to trainer nodes (plain JSON-able dict)."""
    return {"path": str(path), "version": info.get("version"), "hash": hash_, "counts": dict(counts),
            "kind": info.get("kind", "character"), "character": info.get("character"),
            "status": info.get("status", "draft"), "instance_token": info.get("instance_token"),
            "trigger_word": info.get("trigger_word"), "class_prompt": info.get("class_prompt", ""),
            "manifest": str(Path(path) / MANIFEST_NAME)}


def load_dataset(path: str | os.PathLike, verify: bool = True) -> Dataset:
    """Reads a dataset (or edit-pair) version. ``verify`` re-hashes every file against the manifest."""
    path = Path(path)
    info = read_info(path)
    records, notes = read_manifest(path / MANIFEST_NAME)
    problems: list[str] = []
    items = []
    known: set[str] = set()
    for r in records:
        item = dict(r)
        files = [(r.get("file"), r.get("sha256"))]
        if r.get("caption_file"):
            files.append((r["caption_file"], sha256_bytes(str(r.get("caption", "")).encode("utf-8"))))
        for c in r.get("controls") or []:
            files.extend((v, c.get("sha256")) for k, v in c.items() if k.endswith("file") and k != "caption_file")
        for rel, digest in files:
            if not rel:
                problems.append(f"manifest entry without a file: {str(r)[:80]}")
                continue
            known.add(rel)
            full = path / rel
            if not full.is_file():
                problems.append(f"{rel} is missing")
            elif verify and digest and sha256_file(full) != digest:
                problems.append(f"{rel} changed after it was written")
        item["image_path"] = str(path / r.get("file", ""))
        if r.get("caption_file"):
            item["caption_path"] = str(path / r["caption_file"])
        items.append(item)
    folders = sorted({(path / r["file"]).parent for r in records if r.get("file") and r.get("phase") is not None}
                     | ({path / "targets"} if info.get("kind") == "edit_pairs" else set()))
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.parent != path:
            rel = p.relative_to(path).as_posix()
            if rel not in known:
                notes.append(f"{rel} is not in the manifest (crash leftover; removed by the next write or freeze)")
    return Dataset(path, info, items, content_hash(records), counts_of(records), folders, problems, notes)


# ---- writing a character dataset --------------------------------------------------------------

@dataclass
class WriteResult:
    dataset: Dataset
    items: list[dict[str, Any]]  # per input image: index, status (written|flagged|dropped), file, notes
    created: bool
    finished_interrupted: bool = False  # this run repaired and finished a version a killed run left half done
    incomplete_others: list[str] = field(default_factory=list)  # other versions a killed run left half done

    @property
    def written(self) -> int:
        return sum(1 for i in self.items if i["status"] != "dropped")

    @property
    def dropped(self) -> int:
        return sum(1 for i in self.items if i["status"] == "dropped")

    @property
    def flagged(self) -> int:
        return sum(1 for i in self.items if i["status"] == "flagged")

    def summary(self) -> str:
        ds = self.dataset
        c = ds.counts
        text = (f"{'Created' if self.created else 'Added to'} dataset {ds.version} ({ds.path}): wrote {self.written} "
                f"images ({self.flagged} flagged as near-duplicates, {self.dropped} near-duplicates dropped); "
                f"the version now holds {c['images']} (head {c['head']}, body {c['body']}; pristine "
                f"{c['pristine']}, enriched {c['enriched']}, synthetic {c['synthetic']}). Hash {ds.hash[:19]}…")
        if self.finished_interrupted:
            skipped = sum(1 for i in self.items if "already written by the interrupted run" in i["notes"])
            text += (f" Finished {ds.version}, which an interrupted run had left incomplete ({skipped} images were "
                     "already there).")
        converted = [f"#{i['index']}: {', '.join(i['notes'])}" for i in self.items
                     if i["notes"] and "already written by the interrupted run" not in i["notes"]]
        if converted:
            text += " Converted: " + "; ".join(converted[:10]) + ("…" if len(converted) > 10 else "")
        warned = [f"#{i['index']}: {', '.join(i['warnings'])}" for i in self.items if i.get("warnings")]
        if warned:
            text += " Warnings: " + "; ".join(warned[:10]) + ("…" if len(warned) > 10 else "")
        if self.incomplete_others:
            text += (f" Incomplete (a writer was interrupted): {', '.join(self.incomplete_others)}; finish one by "
                     "writing into it again (version = its name), or delete its folder.")
        return text


def _choose(value: str, options: tuple[str, ...], meta_value: Any, fallback: str, what: str) -> str:
    if value not in ("auto", *options):
        raise FlenUserError(f"Unknown {what} {value!r}; one of auto, {', '.join(options)}.")
    if value != "auto":
        return value
    return meta_value if meta_value in options else fallback


def _auto_kind(meta: dict[str, Any]) -> str:
    if meta.get("kind") in KINDS:
        return meta["kind"]
    if meta.get("instruction"):
        return "enriched"
    if meta.get("prompt"):
        return "synthetic"
    return "pristine"


def _provenance(meta: dict[str, Any]) -> dict[str, Any]:
    review = meta.get("review")
    if not isinstance(review, dict) and meta.get("candidate_id") is not None:
        review = {"candidate_id": meta.get("candidate_id"), "status": meta.get("status"),
                  "run_id": meta.get("run_id"), "version": meta.get("version")}
    extra = {k: v for k, v in meta.items() if k not in ("review",)}
    return {"source": meta.get("source") or meta.get("review_image") or meta.get("source_image") or "",
            "instruction": meta.get("instruction") or "", "prompt": meta.get("prompt") or "",
            "seed": meta.get("seed"), "loras": meta.get("loras") or [], "model": meta.get("model") or "",
            "identity_score": meta.get("identity_score", meta.get("score")), "review": review or None,
            "meta": json.loads(json.dumps(extra, default=str))}


def write_dataset(output_dir: str | os.PathLike, character: str, images: list[Any],
                  metas: list[dict[str, Any]] | None = None, *, token: str, version: str = "new",
                  template: str = DEFAULT_TEMPLATE, class_prompt: str = "", phase: str = "auto",
                  kind: str = "auto", near_duplicates: str = "flag", phash_threshold: int = PHASH_THRESHOLD,
                  written_by: str = "", caption_source: str = "template") -> WriteResult:
    """Writes images (+ one meta dict each) into ``datasets/<version>`` of the character's workspace.

    ``caption_source`` is recorded per image (the template is already what it means, see
    :func:`template_for_source`); an image a reviewer captioned in the gallery gets that caption instead,
    recorded as ``reviewer``.

    Everything is validated before the first byte is written; a bad input raises FlenUserError and
    changes nothing."""
    character = validate_character(character)
    token = validate_token(token)
    template = validate_template(template)
    caption_source = validate_caption_source(caption_source)
    class_prompt = _clean_text(class_prompt)
    if near_duplicates not in NEAR_DUPLICATE_MODES:
        raise FlenUserError(f"near_duplicates must be one of {', '.join(NEAR_DUPLICATE_MODES)}.")
    images = list(images)
    if not images:
        raise FlenUserError("The image batch is empty: nothing to write. (Nothing approved yet? Judge candidates "
                            "in the FLENwheel review gallery first.)")
    if metas is None:
        metas = [{} for _ in images]
    if not isinstance(metas, list) or len(metas) != len(images):
        raise FlenUserError(f"meta has {len(metas) if isinstance(metas, list) else 'no'} records for "
                            f"{len(images)} images: FLEN_META needs exactly one record per image.")
    metas = [m if isinstance(m, dict) else {} for m in metas]
    prepared = []
    for k, (image, meta) in enumerate(zip(images, metas, strict=True)):
        try:
            pil, notes = prepare_image(image)
        except FlenUserError as exc:
            raise FlenUserError(f"Image #{k}: {exc}") from None
        ph = _choose(phase, PHASES, meta.get("phase"), "head", "phase")
        kd = _choose(kind, KINDS, _auto_kind(meta), "pristine", "kind")
        edited = reviewer_caption_of(meta)
        try:
            caption = reviewer_caption(edited, token) if edited else render_caption(
                template, token, meta, phase=ph, kind=kd, class_prompt=class_prompt, character=character)
        except FlenUserError as exc:
            raise FlenUserError(f"Image #{k}: {exc}") from None
        trunc = truncation_note(np.asarray(pil))
        prepared.append((k, pil, notes, meta, ph, kd, (caption, REVIEWER_SOURCE if edited else caption_source),
                         [trunc] if trunc else []))

    root = datasets_root(output_dir, character)
    trigger = token.split()[0]
    marker = {"by": written_by or "a dataset writer", "pid": os.getpid(), "started_at": time.time(),
              "images": len(prepared)}
    base_info = {"kind": "character", "character": character, "instance_token": token, "trigger_word": trigger,
                 "class_prompt": class_prompt, "caption_template": template, "hash": content_hash([]),
                 "counts": counts_of([]), "writing": marker}
    created = False
    if version in ("", "new"):
        vdir = create_version(root, base_info)
        created = True
    else:
        if version_number(version) is None:
            raise FlenUserError(f"Version {version!r} is not a version name: use 'new' or an existing draft "
                                "such as 'v2'.")
        vdir = root / version
        if not (vdir / INFO_NAME).is_file():
            have = ", ".join(list_versions(root)) or "none yet"
            raise FlenUserError(f"Dataset version {version} of '{character}' does not exist (versions: {have}); "
                                "use 'new' to create one.")
    report: list[dict[str, Any]] = []
    with folder_lock(vdir):
        info = read_info(vdir)
        if info.get("status") == "frozen":
            raise FlenUserError(frozen_message(vdir, info))
        if info.get("kind", "character") != "character":
            raise FlenUserError(f"{vdir} is an edit-pair set, not a character dataset.")
        if info.get("instance_token") and info["instance_token"] != token:
            raise FlenUserError(f"Dataset {version} uses the instance token {info['instance_token']!r}, not "
                                f"{token!r}: one version has one trigger word. Use that token or write a new "
                                "version.")
        # an earlier run into this version was killed half-way: this run repairs and finishes it
        interrupted = not created and bool(info.get("writing"))
        info["writing"] = marker
        _write_info(vdir, info)
        repaired = recover(vdir)
        existing, _ = read_manifest(vdir / MANIFEST_NAME)
        next_index = max((int(r.get("index", 0)) for r in existing), default=0) + 1
        pool = list(existing)
        already = {r.get("sha256") for r in existing} if interrupted else set()
        for k, pil, notes, meta, ph, kd, (caption, source), warns in prepared:
            data = png_bytes(pil)
            digest = sha256_bytes(data)
            if digest in already:
                report.append({"index": k, "status": "dropped", "file": None,
                               "notes": [*notes, "already written by the interrupted run"], "near_duplicate_of": None})
                continue
            rec: dict[str, Any] = {"phash": phash(pil), "mean_rgb": mean_colour(pil)}
            dup = None
            if near_duplicates != "keep":
                dup = next((p for p in pool if is_near_duplicate(rec, p, phash_threshold)), None)
            if dup is not None and near_duplicates == "drop":
                report.append({"index": k, "status": "dropped", "file": None, "notes": notes,
                               "near_duplicate_of": dup.get("file"), "warnings": warns})
                continue
            stem = f"{character}_{next_index:05d}"
            folder = f"{ph}/{kd}"
            rec.update({"index": next_index, "file": f"{folder}/{stem}.png", "caption_file": f"{folder}/{stem}.txt",
                        "caption": caption, "caption_source": source, "phase": ph, "kind": kd, "width": pil.width,
                        "height": pil.height,
                        "sha256": digest, "labels": labels_of(meta),
                        "near_duplicate_of": dup.get("file") if dup else None, "conversions": notes,
                        "warnings": warns,
                        "added_at": time.time(), "written_by": written_by, **_provenance(meta)})
            # caption first, then the image, then the manifest line: see the module docstring
            atomic_write(vdir / rec["caption_file"], caption.encode("utf-8"))
            atomic_write(vdir / rec["file"], data)
            append_line(vdir / MANIFEST_NAME, rec)
            pool.append(rec)
            next_index += 1
            report.append({"index": k, "status": "flagged" if dup else "written", "file": rec["file"],
                           "notes": notes, "near_duplicate_of": rec["near_duplicate_of"], "warnings": warns})
        info.update(hash=content_hash(pool), counts=counts_of(pool), updated_at=time.time())
        info.pop("writing", None)  # only now is the version whole
        if interrupted:
            info.setdefault("repaired", []).append({"at": time.time(), "by": marker["by"], "done": repaired[:50]})
        if class_prompt and not info.get("class_prompt"):
            info["class_prompt"] = class_prompt
        _write_info(vdir, info)
    return WriteResult(load_dataset(vdir, verify=False), report, created, interrupted,
                       _incomplete_versions(root, exclude=vdir.name))


def _incomplete_versions(root: Path, exclude: str = "") -> list[str]:
    out = []
    for name in list_versions(root):
        if name != exclude:
            with contextlib.suppress(FlenUserError):
                if read_info(root / name).get("writing"):
                    out.append(name)
    return out
