"""The review store: candidates waiting for a human, and every decision taken on them.

One SQLite database (WAL, synchronous=FULL) per character workspace
``<output>/flenwheel/<character>/review.sqlite``, image files beside it:

    candidates/<uuid>.png        the candidate (written atomically: temp file + os.replace)
    candidates/<uuid>.thumb.jpg  ~256 px thumbnail for the gallery grid
    sources/<sha256>.png         source/reference images (content-addressed, shared by candidates)
    corrections/<uuid>.png       fixed images uploaded by the reviewer

Every decision (approve, reject, correct, undo) is one transaction, committed before the call
returns, and appended to the ``decisions`` table (who, when, what, previous status), so nothing
is ever lost and everything can be undone. Plain Python: no ComfyUI imports. The file names in
the database are the store's own; nothing ever takes a path from a client.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .atomic_files import atomic_write
from .errors import FlenUserError
from .image_arrays import pil_to_float, to_pil
from .png_files import png_bytes
from .safe_images import open_image, open_rgb
from .workspace import is_character_name, validate_character, workspace_dir, workspace_root

STATUSES = ("pending", "approved", "rejected", "corrected")
ACTIONS = ("approve", "reject", "correct", "undo")
# Order matters: the gallery's reason digits 1–6 map onto this tuple.
REASONS = ("identity_drift", "artefacts", "wrong_angle", "wrong_expression", "pixel_shift", "other")
# what the gallery shows for each reason (its keys 1–6 follow REASONS' order); served by the review routes
REASON_LABELS = {"identity_drift": "identity drift", "artefacts": "artefacts", "wrong_angle": "wrong angle",
                 "wrong_expression": "wrong expression", "pixel_shift": "pixel shift/zoom", "other": "other"}
# Orders the gallery offers (fixed SQL, chosen by key: nothing from a client reaches the statement).
SORTS = {"id": "id", "score_desc": "score IS NULL, score DESC, id", "score_asc": "score IS NULL, score ASC, id",
         "newest": "id DESC"}
THUMB_SIZE = 256
DB_NAME = "review.sqlite"
_MAX_TEXT = 4000
# leaves room for the instance token the dataset writer may prepend, under its 2000-character caption limit
MAX_CAPTION = 1500


# ---- schema -----------------------------------------------------------------------------------
# Each entry moves the database from version i to i+1 (PRAGMA user_version). Never edit a
# released entry: append a new one.

MIGRATIONS: list[str] = [
    # v1: candidates and the decision log
    """
    CREATE TABLE candidates (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        character TEXT NOT NULL,
        run_id TEXT NOT NULL,
        version TEXT NOT NULL DEFAULT '',
        image TEXT NOT NULL,
        thumb TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        sources TEXT NOT NULL DEFAULT '[]',
        prompt TEXT NOT NULL DEFAULT '',
        loras TEXT NOT NULL DEFAULT '[]',
        seed INTEGER,
        model TEXT NOT NULL DEFAULT '',
        score REAL,
        label TEXT NOT NULL DEFAULT '',
        meta TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
    );
    CREATE INDEX candidates_status ON candidates(status, id);
    CREATE INDEX candidates_run ON candidates(run_id, id);
    CREATE TABLE decisions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        candidate_id INTEGER NOT NULL REFERENCES candidates(id),
        action TEXT NOT NULL,
        prev_status TEXT NOT NULL,
        new_status TEXT NOT NULL,
        reasons TEXT NOT NULL DEFAULT '[]',
        note TEXT NOT NULL DEFAULT '',
        who TEXT NOT NULL DEFAULT '',
        at REAL NOT NULL,
        undone_by INTEGER
    );
    CREATE INDEX decisions_candidate ON decisions(candidate_id, id);
    """,
    # v2: pose per candidate; corrections (instruction, better target, fixed image); undo links
    """
    ALTER TABLE candidates ADD COLUMN pose TEXT NOT NULL DEFAULT '';
    ALTER TABLE decisions ADD COLUMN instruction TEXT NOT NULL DEFAULT '';
    ALTER TABLE decisions ADD COLUMN better_id INTEGER;
    ALTER TABLE decisions ADD COLUMN fixed_image TEXT NOT NULL DEFAULT '';
    ALTER TABLE decisions ADD COLUMN undoes INTEGER;
    CREATE INDEX candidates_label ON candidates(label, id);
    CREATE INDEX candidates_score ON candidates(score);
    """,
    # v3: reference photos per candidate (the identity bank's photos, for the gallery's A/B view), kept apart
    # from ``sources``, which are only the images the edit itself took (the controls of its edit pair)
    """
    ALTER TABLE candidates ADD COLUMN refs TEXT NOT NULL DEFAULT '[]';
    """,
    # v4: the caption a reviewer sees and may edit with the decision. ``caption`` starts as the captioner's
    # (FLEN Caption Images' meta); ``caption_edited`` says a reviewer changed it. A decision that touched the
    # caption keeps the text before and after (NULL: it left the caption alone), so undo can restore it.
    """
    ALTER TABLE candidates ADD COLUMN caption TEXT NOT NULL DEFAULT '';
    ALTER TABLE candidates ADD COLUMN caption_edited INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE decisions ADD COLUMN caption TEXT;
    ALTER TABLE decisions ADD COLUMN caption_before TEXT;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def _backfill_captions(conn: sqlite3.Connection) -> None:
    """v4 on an older database: candidates that came with a caption in their meta (FLEN Caption Images
    before the queue) show it. In Python rather than SQL: not every SQLite a ComfyUI runs on has JSON1."""
    rows = conn.execute("SELECT id, meta FROM candidates WHERE caption=''").fetchall()
    for cid, raw in rows:
        try:
            meta = json.loads(raw)
        except (TypeError, ValueError):
            continue
        caption = meta_caption(meta) if isinstance(meta, dict) else ""
        if caption:
            conn.execute("UPDATE candidates SET caption=? WHERE id=?", (caption, cid))


# data steps run in the same transaction as the migration to that version
_BACKFILLS = {4: _backfill_captions}


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Applies the missing migrations, each in its own transaction; returns the new version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise FlenUserError(f"The review store was written by a newer FLENwheel (schema {version}, this one "
                            f"knows {SCHEMA_VERSION}); update the pack.")
    while version < target:
        statements = [s.strip() for s in MIGRATIONS[version].split(";") if s.strip()]
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                conn.execute(statement)
            if version + 1 in _BACKFILLS:
                _BACKFILLS[version + 1](conn)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        version += 1
    return version


# ---- files ------------------------------------------------------------------------------------

def _thumb_bytes(img: Image.Image) -> bytes:
    thumb = img.convert("RGB")
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _json(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def _clip_text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FlenUserError(f"{what} must be text.")
    if len(value) > _MAX_TEXT:
        raise FlenUserError(f"{what} is longer than {_MAX_TEXT} characters.")
    return value


def clean_caption(value: Any) -> str:
    """A reviewer's caption: text, stripped, at most MAX_CAPTION characters, no control characters but
    newlines (the dataset writer folds those into one line)."""
    if not isinstance(value, str):
        raise FlenUserError("caption must be text.")
    value = value.replace("\r\n", "\n").strip()
    if len(value) > MAX_CAPTION:
        raise FlenUserError(f"The caption is {len(value)} characters long; keep it under {MAX_CAPTION}.")
    bad = sorted({c for c in value if c != "\n" and not c.isprintable()})
    if bad:
        raise FlenUserError(f"The caption contains the control character(s) {', '.join(repr(c) for c in bad)}; "
                            "write plain text (line breaks are fine).")
    return value


def meta_caption(meta: dict[str, Any]) -> str:
    """The caption a candidate arrives with: FLEN Caption Images writes ``caption`` (instance token and
    description) and ``description``; the caption wins, the bare description is the fallback."""
    for key in ("caption", "description"):
        value = meta.get(key)
        if isinstance(value, str) and value.strip():
            text = "".join(c if c == "\n" or c.isprintable() else " " for c in value.strip())
            return text[:MAX_CAPTION]
    return ""


# ---- the store --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    total: int
    offset: int
    limit: int


_COLUMNS = ("id, character, run_id, version, image, thumb, width, height, sources, refs, prompt, loras, seed, "
            "model, score, label, pose, meta, created_at, status, caption, caption_edited")


def meta_score(meta: dict[str, Any]) -> float | None:
    """The identity score of a FLEN_META record: FLENIdentityFilter writes it to ``scores.identity`` (and
    ``identity.score``); hand-made records may carry a top-level ``identity_score`` or ``score``."""
    candidates: list[Any] = [meta.get("identity_score"), meta.get("score")]
    scores = meta.get("scores")
    if isinstance(scores, dict):
        candidates.append(scores.get("identity"))
    identity = meta.get("identity")
    if isinstance(identity, dict):
        candidates.append(identity.get("score"))
    for value in candidates:
        if value in (None, "") or isinstance(value, bool):
            continue
        try:
            score = float(value)
        except (TypeError, ValueError):
            continue
        if score == score:  # NaN is no score
            return score
    return None


def _source_index(meta: dict[str, Any], n_sources: int) -> int | None:
    idx = meta.get("source_index")
    if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n_sources:
        return None
    return idx


def own_sources(meta: dict[str, Any], k: int, n_images: int, source_names: list[str]) -> list[str]:
    """The source images candidate k was made from: they become the controls of its edit pair.

    The edit nodes record ``source_index`` (which image of their input batch an edit came from), so a
    candidate gets exactly its own source even when every source photo is wired to the queue. A synthetic
    image (FLUX, made from text) has none. Without an index: one source per candidate when the counts match,
    a single source shared by all; several sources that match nothing are only references, never controls
    (an edit never takes 15 inputs)."""
    idx = _source_index(meta, len(source_names))
    if idx is not None:
        return [source_names[idx]]
    if meta.get("kind") == "synthetic" or not source_names:
        return []
    if len(source_names) == n_images:
        return [source_names[k]]
    if len(source_names) == 1:
        return list(source_names)
    return []


class ReviewStore:
    """One character's workspace. Thread-safe (one connection behind a lock)."""

    def __init__(self, output_dir: str | os.PathLike, character: str) -> None:
        self.character = validate_character(character)
        self.root = workspace_dir(output_dir, character)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / DB_NAME
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            migrate(self._conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- writing candidates --

    def add_candidates(self, images: list[Any], metas: list[dict[str, Any]] | None = None, *, run_id: str,
                       version: str = "", sources: list[Any] | None = None) -> list[int]:
        """Stores images (HWC 0..1 arrays or PIL) as pending candidates; returns their ids.

        ``sources``: the source photos the batch came from. Each candidate keeps its own source (see
        :func:`own_sources`); all of them are its references (the identity bank's photos, for the A/B
        view). Files are written before the rows that name them, so a crash leaves at worst an
        unreferenced file, never a row without its image."""
        run_id = _clip_text(run_id, "run_id") or time.strftime("run-%Y%m%d-%H%M%S")
        metas = list(metas or [])
        source_names = [self._store_source(s) for s in (sources or [])]
        rows = []
        for k, image in enumerate(images):
            meta = dict(metas[k]) if k < len(metas) and isinstance(metas[k], dict) else {}
            pil = to_pil(image)
            stem = uuid.uuid4().hex
            image_name, thumb_name = f"candidates/{stem}.png", f"candidates/{stem}.thumb.jpg"
            atomic_write(self.root / image_name, png_bytes(pil))
            atomic_write(self.root / thumb_name, _thumb_bytes(pil))
            mine = own_sources(meta, k, len(images), source_names)
            refs = list(dict.fromkeys(source_names))
            rows.append(self._candidate_row(meta, run_id, version, image_name, thumb_name, pil.size, mine, refs))
        ids = []
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    cur = self._conn.execute(
                        "INSERT INTO candidates (character, run_id, version, image, thumb, width, height, sources, "
                        "refs, prompt, loras, seed, model, score, label, pose, meta, created_at, caption, status) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,'pending')", row)
                    # lastrowid is set after every successful INSERT.
                    assert cur.lastrowid is not None
                    ids.append(cur.lastrowid)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return ids

    def _store_source(self, image: Any) -> str:
        data = png_bytes(to_pil(image))
        name = f"sources/{hashlib.sha256(data).hexdigest()[:32]}.png"
        if not (self.root / name).exists():
            atomic_write(self.root / name, data)
        return name

    def _candidate_row(self, meta: dict[str, Any], run_id: str, version: str, image: str, thumb: str,
                       size: tuple[int, int], sources: list[str], refs: list[str]) -> tuple:
        def first(*keys: str) -> Any:
            for key in keys:
                if meta.get(key) not in (None, ""):
                    return meta[key]
            return None

        score = meta_score(meta)
        seed = first("seed")
        try:
            seed = None if seed is None else int(seed)
        except (TypeError, ValueError):
            seed = None
        label = first("label", "angle", "expression") or ""
        pose = first("pose")
        return (self.character, run_id, str(version or meta.get("version") or ""), image, thumb, size[0], size[1],
                _json(sources), _json(refs), str(first("instruction", "prompt") or ""), _json(meta.get("loras") or []),
                seed,
                str(first("model") or ""), score, str(label), _json(pose) if pose is not None else "", _json(meta),
                time.time(), meta_caption(meta))

    # -- reading --

    def _row_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        d["sources"] = json.loads(d["sources"])
        d["refs"] = json.loads(d["refs"])
        d["loras"] = json.loads(d["loras"])
        d["meta"] = json.loads(d["meta"])
        d["pose"] = json.loads(d["pose"]) if d.get("pose") else None
        d["caption_edited"] = bool(d.get("caption_edited"))
        return d

    def get(self, candidate_id: int) -> dict[str, Any]:
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM candidates WHERE id=?", (candidate_id,)).fetchone()
        if row is None:
            raise KeyError(candidate_id)
        return self._with_corrections([self._row_dict(row)])[0]

    def _with_corrections(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Adds ``correction`` (the one in force, or None) to corrected items, so the gallery shows it on the
        card and in the detail view without a request per item."""
        ids = [i["id"] for i in items if i["status"] == "corrected"]
        found: dict[int, dict[str, Any]] = {}
        if ids:
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT candidate_id, instruction, better_id, fixed_image, reasons, note, who, at FROM decisions "
                    f"WHERE action='correct' AND undone_by IS NULL AND candidate_id IN ({','.join('?' * len(ids))}) "
                    "ORDER BY id", ids).fetchall()
            for r in rows:  # later rows win: the latest correction not undone is the one in force
                found[r["candidate_id"]] = {"instruction": r["instruction"], "better_id": r["better_id"],
                                            "has_fixed_image": bool(r["fixed_image"]),
                                            "reasons": json.loads(r["reasons"]), "note": r["note"],
                                            "who": r["who"], "at": r["at"]}
        for item in items:
            item["correction"] = found.get(item["id"])
        return items

    def exists(self, candidate_id: int) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM candidates WHERE id=?", (candidate_id,)).fetchone() is not None

    @staticmethod
    def _where(run_id: str | None = None, status: str | None = None, score_min: float | None = None,
               score_max: float | None = None, label: str | None = None, version: str | None = None,
               ids: list[int] | None = None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if run_id:
            clauses.append("run_id=?")
            args.append(run_id)
        if status:
            if status not in STATUSES:
                raise FlenUserError(f"Unknown status {status!r}; one of {', '.join(STATUSES)}.")
            clauses.append("status=?")
            args.append(status)
        if score_min is not None:
            clauses.append("score>=?")
            args.append(float(score_min))
        if score_max is not None:
            clauses.append("score<=?")
            args.append(float(score_max))
        if label:
            clauses.append("label=?")
            args.append(label)
        if version:
            clauses.append("version=?")
            args.append(version)
        if ids is not None:
            clauses.append(f"id IN ({','.join('?' * len(ids))})")
            args.extend(int(i) for i in ids)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def list(self, offset: int = 0, limit: int = 60, sort: str = "id", **filters: Any) -> Page:
        """One page of candidates; ``sort`` is one of SORTS (unscored items last when sorting by score)."""
        offset, limit = max(0, int(offset)), max(1, min(500, int(limit)))
        if sort not in SORTS:
            raise FlenUserError(f"Unknown sort {sort!r}; one of {', '.join(SORTS)}.")
        where, args = self._where(**filters)
        with self._lock:
            total = self._conn.execute(f"SELECT COUNT(*) FROM candidates{where}", args).fetchone()[0]
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM candidates{where} ORDER BY {SORTS[sort]} "
                                      "LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
        return Page(self._with_corrections([self._row_dict(r) for r in rows]), total, offset, limit)

    def counts(self, **filters: Any) -> dict[str, int]:
        filters.pop("status", None)
        where, args = self._where(**filters)
        out = dict.fromkeys(STATUSES, 0)
        with self._lock:
            for status, n in self._conn.execute(f"SELECT status, COUNT(*) FROM candidates{where} GROUP BY status",
                                                args):
                out[status] = n
        out["total"] = sum(out[s] for s in STATUSES)
        return out

    def runs(self) -> builtins.list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT run_id, COUNT(*) AS n, SUM(status='pending') AS pending, MIN(created_at) AS created_at "
                "FROM candidates GROUP BY run_id ORDER BY created_at").fetchall()
        return [dict(r) for r in rows]

    def labels(self) -> builtins.list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute(
                "SELECT DISTINCT label FROM candidates WHERE label<>'' ORDER BY label")]

    def state_token(self) -> str:
        """Changes whenever a candidate or a decision is added (for node cache invalidation)."""
        with self._lock:
            c = self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM candidates").fetchone()[0]
            d = self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM decisions").fetchone()[0]
        return f"{c}:{d}"

    def history(self, candidate_id: int) -> builtins.list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM decisions WHERE candidate_id=? ORDER BY id",
                                      (candidate_id,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["reasons"] = json.loads(d["reasons"])
            out.append(d)
        return out

    def file_path(self, candidate_id: int, kind: str, index: int = 0) -> Path:
        """The store's own file for a candidate: kind is image, thumb, source (index), ref (index) or fixed."""
        item = self.get(candidate_id)
        if kind == "image":
            name = item["image"]
        elif kind == "thumb":
            name = item["thumb"]
        elif kind == "source":
            if not 0 <= index < len(item["sources"]):
                raise KeyError(index)
            name = item["sources"][index]
        elif kind == "ref":
            if not 0 <= index < len(item["refs"]):
                raise KeyError(index)
            name = item["refs"][index]
        elif kind == "fixed":
            corr = self.correction(candidate_id)
            if not corr or not corr["fixed_image"]:
                raise KeyError("fixed")
            name = corr["fixed_image"]
        else:
            raise KeyError(kind)
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents:  # names are the store's own; belt and braces
            raise KeyError(name)
        return path

    def load_image(self, candidate_id: int) -> np.ndarray:
        """HWC float32 array in 0..1."""
        return self.load_image_checked(candidate_id)[0]

    def load_image_checked(self, candidate_id: int) -> tuple[np.ndarray, bool]:
        """(HWC float32 array in 0..1, whether the file on disk is truncated: what is there is decoded, the
        rest black, and the caller flags it)."""
        path = self.file_path(candidate_id, "image")
        im, truncated = open_image(path, f"Candidate {candidate_id}'s image {path.name}", allow_truncated=True)
        with im:
            return pil_to_float(im), truncated

    # -- decisions --

    def decide(self, candidate_id: int, action: str, *, reasons: builtins.list[str] | None = None, note: str = "",
               instruction: str = "", better_id: int | None = None, fixed_image: bytes | None = None,
               who: str = "", caption: str | None = None) -> dict[str, Any]:
        """Records one decision and commits it before returning the updated candidate.

        ``caption``: the reviewer's caption, stored with the decision in the same transaction (None leaves
        the caption as it is). An undo restores the caption the undone decision replaced."""
        if action not in ACTIONS:
            raise FlenUserError(f"Unknown action {action!r}; one of {', '.join(ACTIONS)}.")
        if caption is not None:
            if action == "undo":
                raise FlenUserError("An undo takes no caption: it restores the caption from before the decision "
                                    "it undoes.")
            caption = clean_caption(caption)
        note, instruction, who = _clip_text(note, "note"), _clip_text(instruction, "instruction"), _clip_text(
            who, "who")[:120]
        reasons = list(reasons or [])
        bad = [r for r in reasons if r not in REASONS]
        if bad:
            raise FlenUserError(f"Unknown reason {bad[0]!r}; one of {', '.join(REASONS)}.")
        if action == "reject" and not reasons:
            reasons = ["other"]
        if action == "correct" and not (instruction or better_id is not None or fixed_image):
            raise FlenUserError("A correction needs a corrected instruction, a better candidate, or a fixed image.")
        inherited = self.correction(candidate_id) if action == "correct" else None
        if inherited and self.get(candidate_id)["status"] == "corrected":
            # A correction is built up in steps (the panel saves the instruction, then uploads the fixed image):
            # what this step does not give is kept from the correction in force.
            instruction = instruction or inherited["instruction"]
            if better_id is None and not fixed_image:
                better_id = inherited["better_id"]
            reasons = reasons or inherited["reasons"]
            note = note or inherited["note"]
            inherited_fixed = "" if fixed_image or better_id is not None else inherited["fixed_image"]
        else:
            inherited_fixed = ""
        if fixed_image:
            # the declared size is checked before decoding: a 20 KB PNG can claim 13000² pixels
            pil = open_rgb(bytes(fixed_image), "The uploaded fixed image")
            fixed_name = f"corrections/{uuid.uuid4().hex}.png"
            atomic_write(self.root / fixed_name, png_bytes(pil))
        else:
            fixed_name = inherited_fixed
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute("SELECT status, caption FROM candidates WHERE id=?",
                                         (candidate_id,)).fetchone()
                if row is None:
                    raise KeyError(candidate_id)
                prev = row["status"]
                caption_before = None if caption is None else row["caption"]
                if better_id is not None:
                    if int(better_id) == int(candidate_id) or self._conn.execute(
                            "SELECT 1 FROM candidates WHERE id=?", (int(better_id),)).fetchone() is None:
                        raise FlenUserError(f"Better target {better_id} is not another candidate of this character.")
                if action == "undo":
                    last = self._conn.execute(
                        "SELECT id, prev_status, caption, caption_before FROM decisions WHERE candidate_id=? "
                        "AND action<>'undo' AND undone_by IS NULL ORDER BY id DESC LIMIT 1",
                        (candidate_id,)).fetchone()
                    if last is None:
                        self._conn.execute("ROLLBACK")
                        return {**self.get(candidate_id), "undone": None}
                    new = last["prev_status"]
                    if last["caption"] is not None and last["caption"] != last["caption_before"]:
                        caption, caption_before = last["caption_before"], row["caption"]
                else:
                    last = None
                    new = {"approve": "approved", "reject": "rejected", "correct": "corrected"}[action]
                cur = self._conn.execute(
                    "INSERT INTO decisions (candidate_id, action, prev_status, new_status, reasons, note, who, at, "
                    "instruction, better_id, fixed_image, undoes, caption, caption_before) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (candidate_id, action, prev, new, _json(reasons), note, who, time.time(), instruction,
                     None if better_id is None else int(better_id), fixed_name,
                     None if last is None else last["id"], caption, caption_before))
                if last is not None:
                    self._conn.execute("UPDATE decisions SET undone_by=? WHERE id=?", (cur.lastrowid, last["id"]))
                self._conn.execute("UPDATE candidates SET status=? WHERE id=?", (new, candidate_id))
                if caption is not None and caption != caption_before:
                    # edited while a decision in force changed the caption: an undo of the only edit clears it
                    self._conn.execute(
                        "UPDATE candidates SET caption=?, caption_edited=EXISTS(SELECT 1 FROM decisions "
                        "WHERE candidate_id=? AND action<>'undo' AND undone_by IS NULL AND caption IS NOT NULL "
                        "AND caption<>caption_before) WHERE id=?", (caption, candidate_id, candidate_id))
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        return {**self.get(candidate_id), "decision_id": cur.lastrowid}

    def approve(self, candidate_id: int, who: str = "", caption: str | None = None) -> dict[str, Any]:
        return self.decide(candidate_id, "approve", who=who, caption=caption)

    def reject(self, candidate_id: int, reasons: builtins.list[str] | None = None, note: str = "",
               who: str = "") -> dict:
        return self.decide(candidate_id, "reject", reasons=reasons, note=note, who=who)

    def correct(self, candidate_id: int, instruction: str = "", better_id: int | None = None,
                fixed_image: bytes | None = None, note: str = "", who: str = "") -> dict[str, Any]:
        return self.decide(candidate_id, "correct", instruction=instruction, better_id=better_id,
                           fixed_image=fixed_image, note=note, who=who)

    def undo(self, candidate_id: int, who: str = "") -> dict[str, Any]:
        return self.decide(candidate_id, "undo", who=who)

    def correction(self, candidate_id: int) -> dict[str, Any] | None:
        """The correction in force for a candidate (its latest 'correct' decision not undone)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM decisions WHERE candidate_id=? AND action='correct' AND undone_by IS NULL "
                "ORDER BY id DESC LIMIT 1", (candidate_id,)).fetchone()
        if row is None:
            return None
        d = dict(row)
        d["reasons"] = json.loads(d["reasons"])
        return d

    def approved(self, run_id: str | None = None, version: str | None = None) -> builtins.list[dict[str, Any]]:
        where, args = self._where(run_id=run_id, version=version, status="approved")
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM candidates{where} ORDER BY id", args).fetchall()
        return [self._row_dict(r) for r in rows]

    def corrections_in_workspace(self, run_id: str | None = None,
                                 version: str | None = None) -> builtins.list[dict[str, Any]]:
        """``corrections`` with absolute paths (and the workspace folder), for nodes downstream that read the
        files: FLEN Load Approved's corrections output."""
        out = self.corrections(run_id=run_id, version=version)
        for c in out:
            c["workspace"] = str(self.root)
            for key in ("image", "better_image", "fixed_image"):
                if c.get(key):
                    c[key] = str(self.root / c[key])
            c["sources"] = [str(self.root / s) for s in c["sources"]]
        return out

    def corrections(self, run_id: str | None = None, version: str | None = None) -> builtins.list[dict[str, Any]]:
        """Corrected candidates with their correction: the raw material of edit pairs. File names
        are relative to the workspace folder (``root``)."""
        where, args = self._where(run_id=run_id, version=version, status="corrected")
        with self._lock:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM candidates{where} ORDER BY id", args).fetchall()
        out = []
        for r in rows:
            item = self._row_dict(r)
            corr = self.correction(item["id"]) or {}
            out.append({"candidate_id": item["id"], "run_id": item["run_id"], "version": item["version"],
                        "image": item["image"], "sources": item["sources"], "prompt": item["prompt"],
                        "label": item["label"], "corrected_instruction": corr.get("instruction", ""),
                        "better_id": corr.get("better_id"),
                        "better_image": self.get(corr["better_id"])["image"] if corr.get("better_id") else None,
                        "fixed_image": corr.get("fixed_image") or None, "note": corr.get("note", ""),
                        "who": corr.get("who", ""), "at": corr.get("at")})
        return out


# ---- one store per workspace, shared by the nodes and the routes of a process -----------------

_stores_lock = threading.Lock()
_stores: dict[tuple[str, str], ReviewStore] = {}


def open_store(output_dir: str | os.PathLike, character: str) -> ReviewStore:
    key = (str(Path(output_dir).resolve()), validate_character(character))
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = ReviewStore(output_dir, character)
        return store


def existing_store(output_dir: str | os.PathLike, character: str) -> ReviewStore | None:
    """The store if its workspace already has a database, else None (never creates one)."""
    if not (workspace_dir(output_dir, character) / DB_NAME).is_file():
        return None
    return open_store(output_dir, character)


def list_characters(output_dir: str | os.PathLike) -> list[str]:
    root = workspace_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob(f"*/{DB_NAME}") if is_character_name(p.parent.name))


def review_provenance(output_dir: str | os.PathLike, metas: list[dict]) -> builtins.list[dict]:
    """``metas`` with the review decision in force (who, when, why) added to each record that came out of a
    review store (``candidate_id`` and ``character``): the provenance a dataset keeps of each image."""
    out = []
    stores: dict[str, ReviewStore | None] = {}
    for meta in metas:
        meta = dict(meta) if isinstance(meta, dict) else {}
        cid, character = meta.get("candidate_id"), meta.get("character")
        if cid is not None and isinstance(character, str):
            if character not in stores:
                try:
                    stores[character] = existing_store(output_dir, character)
                except FlenUserError:
                    stores[character] = None
            store = stores[character]
            review = {"candidate_id": cid, "status": meta.get("status"), "run_id": meta.get("run_id"),
                      "version": meta.get("version"), "character": character}
            if store is not None:
                try:
                    history = [h for h in store.history(int(cid)) if h["action"] != "undo" and not h["undone_by"]]
                except (KeyError, ValueError, TypeError):
                    history = []
                if history:
                    last = history[-1]
                    review.update(decision=last["action"], who=last["who"], at=last["at"],
                                  reasons=last["reasons"], note=last["note"])
            meta["review"] = review
        out.append(meta)
    return out
