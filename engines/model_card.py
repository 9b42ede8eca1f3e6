"""The model card: a fixed benchmark of a character LoRA version, scored for identity, as a labelled grid
image plus a JSON report; and the comparison of two or more cards.

Plain Python (torch, numpy, PIL); nothing here imports ComfyUI. The steps are separate so each can be
used (and tested) alone:

* :func:`parse_prompt_set` — the benchmark set, one cell per line ``row | column | seed | prompt``
  (:data:`DEFAULT_PROMPT_SET`: portraits neutral / smiling / angry / sad × front / three-quarter / profile,
  full body T-pose / standing / sitting × front / three-quarter = 18 cells, fixed seeds).
* :func:`render_cells` — generates one image per cell with FLUX under a LoRA stack (engines.flux_pipeline).
* :func:`score_cells` — scores the cell images against the identity bank (engines.identity).
* :func:`assemble_card` — turns cells + images + scores into a :class:`ModelCard`: the report (per-cell
  scores, aggregates, per-row and per-column breakdown, LoRA name and provenance, seeds, settings) and the
  grid image (rows and columns named, score on each cell, failed cells marked). Given the same inputs it
  gives the same report and the same PNG bytes: nothing time- or path-dependent goes into either.
* :func:`save_card` — writes ``<lora stem>.card.json`` and ``.card.png`` beside the LoRA, atomically and
  never over an existing card (``.card-2``, ``.card-3``… instead). :func:`load_card` reads one back.
* :func:`compare_cards` — two or more cards → side-by-side grid (each cell, every version), metric table
  with deltas against the first card, bar chart, and which version wins which cell.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import identity
from .atomic_files import write_new_file
from .errors import FlenUserError
from .lora_stack import LoraStack, read_safetensors_header
from .png_files import png_bytes
from .prompt_templates import substitute_token
from .safe_images import open_image

CARD_FORMAT = 1
PNG_KEY = "flen_model_card"

EXPRESSIONS = ("neutral", "smiling", "angry", "sad")
ANGLES = ("front", "three-quarter", "profile")
BODY_POSES = ("T-pose", "standing", "sitting")
BODY_ANGLES = ("front", "three-quarter")
EXPRESSION_TEXT = {"neutral": "neutral expression", "smiling": "smiling", "angry": "angry expression",
                   "sad": "sad expression"}
ANGLE_TEXT = {"front": "front view, looking at the camera", "three-quarter": "three-quarter view",
              "profile": "side profile view"}
POSE_TEXT = {"T-pose": "standing in a T-pose with arms stretched out to the sides",
             "standing": "standing relaxed, arms at the sides", "sitting": "sitting on a chair"}


def _default_prompt_set() -> str:
    lines = ["# row | column | seed | prompt     ({token} = the LoRA's instance token; lines with # are notes)"]
    for i, expr in enumerate(EXPRESSIONS):
        for j, angle in enumerate(ANGLES):
            lines.append(f"{expr} | {angle} | {1001 + 3 * i + j} | close-up portrait photo of {{token}}, "
                         f"{EXPRESSION_TEXT[expr]}, {ANGLE_TEXT[angle]}, head and shoulders, plain grey "
                         "background, soft studio light")
    for i, pose in enumerate(BODY_POSES):
        for j, angle in enumerate(BODY_ANGLES):
            lines.append(f"{pose} | {angle} | {2001 + 2 * i + j} | full body photo of {{token}}, {POSE_TEXT[pose]}, "
                         f"{ANGLE_TEXT[angle]}, plain grey background, soft studio light")
    return "\n".join(lines)


DEFAULT_PROMPT_SET = _default_prompt_set()


# ---- the benchmark set -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CardCell:
    row: str        # expression or body pose
    column: str     # camera angle
    seed: int
    prompt: str     # as written, with {token}

    @property
    def key(self) -> str:
        return f"{self.row} / {self.column}"


def parse_prompt_set(text: str) -> list[CardCell]:
    """One cell per line: ``row | column | seed | prompt``; empty lines and lines starting with # are skipped."""
    cells: list[CardCell] = []
    seen: set[tuple[str, str]] = set()
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|", 3)]
        if len(parts) != 4 or not all(parts):
            raise FlenUserError(f"Prompt set line {n} ('{line[:80]}') should read 'row | column | seed | prompt', "
                                "e.g. 'smiling | profile | 1006 | portrait photo of {token}, smiling, profile'.")
        row, column, seed_text, prompt = parts
        try:
            seed = int(seed_text)
        except ValueError:
            raise FlenUserError(f"Prompt set line {n}: the seed '{seed_text}' is not a whole number.") from None
        if not 0 <= seed <= 0xFFFFFFFF:
            raise FlenUserError(f"Prompt set line {n}: the seed {seed} is outside 0..4294967295.")
        if (row, column) in seen:
            raise FlenUserError(f"Prompt set line {n}: the cell '{row} / {column}' appears twice; each row and "
                                "column pair names one cell.")
        seen.add((row, column))
        cells.append(CardCell(row, column, seed, prompt))
    if not cells:
        raise FlenUserError("The prompt set is empty: write one line per cell, 'row | column | seed | prompt'.")
    return cells


def layout_axes(cells: Sequence[CardCell]) -> tuple[list[str], list[str]]:
    """Row and column names in order of first appearance."""
    rows: list[str] = []
    cols: list[str] = []
    for c in cells:
        if c.row not in rows:
            rows.append(c.row)
        if c.column not in cols:
            cols.append(c.column)
    return rows, cols


@dataclass(frozen=True)
class CardSettings:
    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 3.5
    instance_token: str = "ohwx_char"
    threshold: float = identity.DEFAULT_THRESHOLD
    cell_px: int = 192

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---- rendering and scoring ---------------------------------------------------------------------------------

def render_cells(handle, cells: Sequence[CardCell], settings: CardSettings, stack: LoraStack, host,
                 on_step: Callable[[int, int, object], None] | None = None):
    """One FLUX image per cell at the cell's seed. Returns (IMAGE tensor [N, H, W, 3], meta records)."""
    from . import flux_pipeline

    request = flux_pipeline.FluxRequest(prompts=("-",), width=settings.width, height=settings.height,
                                        steps=settings.steps, guidance=settings.guidance)
    jobs = [flux_pipeline.FluxJob(substitute_token(cell.prompt, settings.instance_token), cell.seed,
                                  {"kind": "model_card", "card_cell": cell.key, "angle": cell.column, "row": cell.row})
            for cell in cells]
    return flux_pipeline.generate_many(handle, jobs, request, stack, host, on_step=on_step)


def score_cells(bank: identity.IdentityBank, model: identity.FaceModel, images: Sequence[np.ndarray],
                threshold: float = identity.DEFAULT_THRESHOLD,
                on_image: Callable[[int, int], None] | None = None) -> list[identity.ScoreRow]:
    """Identity scores of the cell images (RGB uint8): similarity to the bank mean, faces, pose."""
    return identity.score_images(bank, model, images, threshold=threshold, decide_by="mean",
                                 face_rule="largest", several_faces="reject", on_image=on_image)


# ---- the report ------------------------------------------------------------------------------------------------

def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 6)


def aggregate(cells: Sequence[dict]) -> dict:
    """Aggregates of report cells: mean and min similarity over cells where a face was found, the
    face-detection rate and the pass rate over all cells."""
    n = len(cells)
    sims = [c["similarity"] for c in cells if c["similarity"] is not None]
    return {"cells": n,
            "faces_found": sum(1 for c in cells if c["face_found"]),
            "passed": sum(1 for c in cells if c["passed"]),
            "mean_similarity": _round(sum(sims) / len(sims)) if sims else None,
            "min_similarity": _round(min(sims)) if sims else None,
            "face_rate": _round(sum(1 for c in cells if c["face_found"]) / n) if n else None,
            "pass_rate": _round(sum(1 for c in cells if c["passed"]) / n) if n else None}


def breakdown(cells: Sequence[dict], by: str) -> dict[str, dict]:
    """Aggregates per row (expression / body pose) or per column (angle), in order of appearance."""
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(c[by], []).append(c)
    return {k: aggregate(v) for k, v in groups.items()}


BASE_NAME = "base (no LoRA)"


def base_record(stack: LoraStack) -> dict:
    """The card's record for the base model alone (no LoRA of the stack is on): the baseline a character LoRA's
    cards are compared against."""
    return {"name": BASE_NAME, "base": True, "stack": stack.describe()}


def lora_record(stack: LoraStack, read_file: bool = True) -> dict:
    """The card's LoRA (the first LoRA of the stack that is on), its provenance and the whole stack."""
    active = stack.active()
    if not active:
        raise FlenUserError("The model card needs the character LoRA: connect a FLEN LoRA Stack whose first "
                            "enabled LoRA is the version to benchmark (char_lora_vN).")
    entry = active[0]
    record: dict = {"name": entry.name, "strength": entry.strength, "stack": stack.describe()}
    if read_file:
        header = read_safetensors_header(entry.path)
        raw_meta = header.get("__metadata__")
        meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        record["provenance"] = {k: meta[k] for k in sorted(meta)}
        h = hashlib.sha256()
        with open(entry.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        record["sha256"] = h.hexdigest()
    return record


@dataclass
class ModelCard:
    """FLEN_MODEL_CARD: the report, the grid and the cell images; paths once saved."""
    report: dict
    grid: Image.Image
    images: list[np.ndarray]
    json_path: str | None = None
    png_path: str | None = None

    @property
    def label(self) -> str:
        return Path(str(self.report.get("lora", {}).get("name", "card"))).stem


def assemble_card(cells: Sequence[CardCell], images: Sequence[np.ndarray], rows: Sequence[identity.ScoreRow],
                  settings: CardSettings, lora: dict, generation: dict | None = None,
                  bank: identity.IdentityBank | None = None) -> ModelCard:
    """Report + grid from the cells, their images (RGB uint8, one per cell) and their identity scores."""
    if not (len(cells) == len(images) == len(rows)):
        raise FlenUserError(f"Model card: {len(cells)} cell(s), {len(images)} image(s) and {len(rows)} score(s) "
                            "must match one to one.")
    row_names, col_names = layout_axes(cells)
    geometry = _Geometry(row_names, col_names, settings.cell_px)
    report_cells = []
    for cell, score in zip(cells, rows, strict=True):
        report_cells.append({
            "key": cell.key, "row": cell.row, "column": cell.column, "seed": cell.seed,
            "template": cell.prompt, "prompt": substitute_token(cell.prompt, settings.instance_token),
            "face_found": score.faces > 0, "faces": score.faces,
            "similarity": _round(score.score_mean), "similarity_best": _round(score.score_best),
            "passed": bool(score.passed), "reason": score.reason,
            "pose": None if score.yaw is None else {"yaw": score.yaw, "pitch": score.pitch, "roll": score.roll},
            "box": geometry.image_box(cell.row, cell.column),
        })
    report = {
        "flen_model_card": CARD_FORMAT,
        "lora": lora,
        "generation": {**(generation or {}), **settings.as_dict()},
        "identity": None if bank is None else {"pack": bank.pack, "references": len(bank.references),
                                               "threshold": settings.threshold, "score": "cosine to the bank mean"},
        "layout": {"rows": row_names, "columns": col_names, "cell_px": settings.cell_px,
                   "size": list(geometry.size)},
        "seeds": {c.key: c.seed for c in cells},
        "prompt_set": "\n".join(f"{c.row} | {c.column} | {c.seed} | {c.prompt}" for c in cells),
        "cells": report_cells,
        "aggregates": aggregate(report_cells),
        "per_row": breakdown(report_cells, "row"),
        "per_column": breakdown(report_cells, "column"),
    }
    grid = render_grid(report, images)
    return ModelCard(report=report, grid=grid, images=[np.asarray(i) for i in images])


# ---- drawing -------------------------------------------------------------------------------------------------

_FONT_FILES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf",
               "/usr/share/fonts/TTF/DejaVuSans.ttf")
_fonts: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}

BG = (24, 24, 28)
FG = (230, 230, 230)
GOOD = (46, 160, 67)
WARN = (220, 150, 40)
BAD = (200, 50, 50)
EMPTY = (44, 44, 50)


def font(size: int):
    """DejaVu Sans when installed, else PIL's own scalable default, else its bitmap default."""
    if size not in _fonts:
        chosen: ImageFont.FreeTypeFont | ImageFont.ImageFont | None = None
        for path in _FONT_FILES:
            if os.path.isfile(path):
                try:
                    chosen = ImageFont.truetype(path, size)
                    break
                except OSError:
                    continue
        if chosen is None:
            try:
                chosen = ImageFont.load_default(size=size)
            except (TypeError, OSError, ImportError):
                chosen = ImageFont.load_default()
        _fonts[size] = chosen
    return _fonts[size]


def _fit(draw: ImageDraw.ImageDraw, text: str, fnt, width: int) -> str:
    if draw.textlength(text, font=fnt) <= width:
        return text
    while text and draw.textlength(text + "…", font=fnt) > width:
        text = text[:-1]
    return text + "…"


def _text_w(text: str, fnt) -> float:
    return fnt.getlength(text) if hasattr(fnt, "getlength") else len(text) * 7


def wrap(text: str, fnt, width: float) -> list[str]:
    """The text in lines of at most ``width`` pixels: broken at spaces, a word longer than a line broken inside.
    Labels are wrapped, never cut: at a small cell size a cut label ('three-quar…') says nothing."""
    width = max(width, _text_w("W", fnt))
    lines: list[str] = []
    line = ""
    text = str(text)
    # words, and the parts of hyphenated words ('three-' 'quarter'): a line may end after a hyphen
    for m in re.finditer(r"[^\s-]*-+(?=\S)|\S+", text):
        word = m.group()
        joiner = " " if m.start() > 0 and text[m.start() - 1].isspace() else ""
        candidate = f"{line}{joiner}{word}" if line else word
        if _text_w(candidate, fnt) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while _text_w(word, fnt) > width:  # a word wider than the line: split it where it must
            k = len(word)
            while k > 1 and _text_w(word[:k], fnt) > width:
                k -= 1
            lines.append(word[:k])
            word = word[k:]
        line = word
    if line or not lines:
        lines.append(line)
    return lines


# The longest captions a cell can get (cell_status): the caption area is tall enough for the longest, wrapped.
_CAPTION_SAMPLES = ("sim -0.000 low", "NO FACE", "9 FACES", "not in the set")
_LINE_H = 15


class _Geometry:
    LABEL_W = 120
    TITLE_H = 44
    GAP = 6
    MIN_W = 520

    def __init__(self, rows: Sequence[str], cols: Sequence[str], cell_px: int, sub: int = 1,
                 captions: Sequence[str] = _CAPTION_SAMPLES, caption_rows: int = 1,
                 title: Sequence[str] | None = None) -> None:
        self.rows, self.cols, self.cell, self.sub = list(rows), list(cols), int(cell_px), int(sub)
        self.slot_w = self.sub * self.cell + (self.sub - 1) * 2
        f_head, f_cap = font(13), font(12)
        self.col_lines = {c: wrap(c, f_head, self.slot_w) for c in self.cols}
        self.row_lines = {r: wrap(r, f_head, self.LABEL_W - 12) for r in self.rows}
        self.HEAD_H = 8 + _LINE_H * max([len(v) for v in self.col_lines.values()] + [1])
        self.caption_lines = max(len(wrap(c, f_cap, self.slot_w - 4)) for c in captions)
        self.CAPTION_H = 6 + 14 * self.caption_lines * caption_rows
        row_need = _LINE_H * max([len(v) for v in self.row_lines.values()] + [1])
        self.slot_h = max(self.cell + self.CAPTION_H, row_need + 4)
        # a title known up front (the comparison's) is wrapped and the title area grows to hold it; the model
        # card's two lines (LoRA name, aggregates) are laid out before its scores exist and keep two lines
        self.title_lines = None
        if title is not None:
            self.title_lines = [part for line in title for part in wrap(line, font(14), self.size[0] - 16)]
            self.TITLE_H = max(44, 8 + 18 * len(self.title_lines))

    @property
    def size(self) -> tuple[int, int]:
        w = max(self.MIN_W, self.LABEL_W + len(self.cols) * (self.slot_w + self.GAP) + self.GAP)
        h = self.TITLE_H + self.HEAD_H + len(self.rows) * (self.slot_h + self.GAP) + self.GAP
        return w, h

    def slot_origin(self, row: str, col: str) -> tuple[int, int]:
        r, c = self.rows.index(row), self.cols.index(col)
        return (self.LABEL_W + self.GAP + c * (self.slot_w + self.GAP),
                self.TITLE_H + self.HEAD_H + self.GAP + r * (self.slot_h + self.GAP))

    def image_box(self, row: str, col: str, k: int = 0) -> list[int]:
        x, y = self.slot_origin(row, col)
        x += k * (self.cell + 2)
        return [x, y, x + self.cell, y + self.cell]

    def draw_axes(self, draw: ImageDraw.ImageDraw, title: list[str]) -> None:
        f_title, f_head = font(14), font(13)
        if self.title_lines is not None:
            for i, line in enumerate(self.title_lines):
                draw.text((8, 4 + 18 * i), line, fill=FG, font=f_title)
        else:
            for i, line in enumerate(title[:2]):
                draw.text((8, 4 + 18 * i), _fit(draw, line, f_title, self.size[0] - 16), fill=FG, font=f_title)
        for col in self.cols:
            x, _ = self.slot_origin(self.rows[0], col)
            lines = self.col_lines[col]
            y0 = self.TITLE_H + 2 + (self.HEAD_H - 8 - _LINE_H * len(lines))  # bottom-aligned, over its column
            for i, text in enumerate(lines):
                tw = draw.textlength(text, font=f_head)
                draw.text((x + (self.slot_w - tw) / 2, y0 + _LINE_H * i), text, fill=FG, font=f_head)
        for row in self.rows:
            _, y = self.slot_origin(row, self.cols[0])
            lines = self.row_lines[row]
            y0 = y + max(0, (self.cell - _LINE_H * len(lines)) // 2)
            for i, text in enumerate(lines):
                draw.text((8, y0 + _LINE_H * i), text, fill=FG, font=f_head)

    def caption(self, draw: ImageDraw.ImageDraw, x: int, y: int, text: str, color, fnt) -> int:
        """Draws a caption wrapped to the slot; returns the y below it."""
        for line in wrap(text, fnt, self.slot_w - 4):
            draw.text((x, y), line, fill=color, font=fnt)
            y += 14
        return y


def _to_pil(img: np.ndarray, px: int) -> Image.Image:
    pil = Image.fromarray(np.asarray(img, np.uint8)).convert("RGB")
    if pil.size != (px, px):
        scale = px / max(pil.size)
        resized = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))),
                             Image.Resampling.LANCZOS)
        pil = Image.new("RGB", (px, px), EMPTY)
        pil.paste(resized, ((px - resized.width) // 2, (px - resized.height) // 2))
    return pil


def cell_status(cell: dict) -> tuple[str, tuple[int, int, int]]:
    """Caption and colour of a cell: the similarity (green passed, amber below threshold) or the failure."""
    if not cell["face_found"]:
        return "NO FACE", BAD
    if cell["faces"] > 1:
        return f"{cell['faces']} FACES", BAD
    text = f"sim {cell['similarity']:.3f}"
    return (text, GOOD) if cell["passed"] else (text + " low", WARN)


def _mark_failed(draw: ImageDraw.ImageDraw, box: list[int], color) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle([x0 - 2, y0 - 2, x1 + 1, y1 + 1], outline=color, width=3)
    if color == BAD:  # a cross in the corner: visible even on a small cell
        s = max(8, (x1 - x0) // 6)
        draw.line([x1 - s - 3, y0 + 3, x1 - 3, y0 + s + 3], fill=color, width=3)
        draw.line([x1 - s - 3, y0 + s + 3, x1 - 3, y0 + 3], fill=color, width=3)


def render_grid(report: dict, images: Sequence[np.ndarray]) -> Image.Image:
    lay = report["layout"]
    geometry = _Geometry(lay["rows"], lay["columns"], lay["cell_px"])
    canvas = Image.new("RGB", geometry.size, BG)
    draw = ImageDraw.Draw(canvas)
    agg = report["aggregates"]
    lora = report["lora"]
    title = [f"Model card: {lora.get('name', '?')} (strength {lora.get('strength', '?')})",
             f"mean sim {fmt(agg['mean_similarity'])} · min {fmt(agg['min_similarity'])} · faces "
             f"{agg['faces_found']}/{agg['cells']} · passed {agg['passed']}/{agg['cells']}"]
    geometry.draw_axes(draw, title)
    filled = set()
    f_cap = font(12)
    for cell, img in zip(report["cells"], images, strict=True):
        box = geometry.image_box(cell["row"], cell["column"])
        filled.add((cell["row"], cell["column"]))
        canvas.paste(_to_pil(img, geometry.cell), (box[0], box[1]))
        text, color = cell_status(cell)
        if color != GOOD:
            _mark_failed(draw, box, color)
        geometry.caption(draw, box[0] + 2, box[3] + 3, text, color, f_cap)
    for row in geometry.rows:
        for col in geometry.cols:
            if (row, col) not in filled:
                x, y = geometry.slot_origin(row, col)
                draw.rectangle([x, y, x + geometry.slot_w - 1, y + geometry.cell - 1], fill=EMPTY)
                geometry.caption(draw, x + 4, y + geometry.cell + 3, "not in the set", (140, 140, 140), f_cap)
    return canvas


def fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


# ---- saving and loading ------------------------------------------------------------------------------------

def report_json(report: dict) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def free_stem(folder: Path, stem: str, suffixes: Sequence[str]) -> str:
    """``stem`` or ``stem-2``, ``stem-3``… : the first for which no ``stem<suffix>`` exists."""
    n = 1
    while True:
        candidate = stem if n == 1 else f"{stem}-{n}"
        if not any((folder / f"{candidate}{s}").exists() for s in suffixes):
            return candidate
        n += 1


def save_files(folder: str | Path, stem: str, files: dict[str, bytes]) -> dict[str, str]:
    """Writes each ``suffix -> bytes`` as ``<stem or stem-N><suffix>`` in ``folder``, never over existing files.
    Returns suffix -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for _attempt in range(1000):
        chosen = free_stem(folder, stem, list(files))
        written: dict[str, str] = {}
        for suffix, data in files.items():
            path = folder / f"{chosen}{suffix}"
            if not write_new_file(path, data):
                break   # someone else took this name meanwhile: keep what we wrote, try the next number
            written[suffix] = str(path)
        else:
            return written
        for p in written.values():
            os.unlink(p)
    raise FlenUserError(f"Could not find a free file name for {stem} in {folder}.")


def save_card(card: ModelCard, lora_path: str | Path) -> ModelCard:
    """Saves ``<stem>.card.json`` + ``<stem>.card.png`` beside the LoRA file (never overwriting)."""
    lora_path = Path(lora_path)
    stem = lora_path.name[:-len(".safetensors")] if lora_path.name.endswith(".safetensors") else lora_path.stem
    text = report_json(card.report)
    paths = save_files(lora_path.parent, stem + ".card", {
        ".json": text.encode("utf-8"),
        ".png": png_bytes(card.grid, {PNG_KEY: json.dumps(card.report, ensure_ascii=False)}),
    })
    card.json_path, card.png_path = paths[".json"], paths[".png"]
    return card


def load_card(path: str | Path) -> ModelCard:
    """A saved card from its ``.card.json`` (its grid from the ``.card.png`` of the same name) or its PNG."""
    p = Path(path)
    if p.suffix == ".png":
        json_path, png_path = p.with_suffix(".json"), p
    else:
        json_path, png_path = p, p.with_suffix(".png")
    if not png_path.is_file():
        raise FlenUserError(f"Model card image {png_path} not found (it is written beside the card's .json).")
    try:
        im, _ = open_image(png_path, f"Model card image {png_path.name}")
        with im:
            grid = im.convert("RGB")
            embedded = im.info.get(PNG_KEY)
        if json_path.is_file():
            report = json.loads(json_path.read_text(encoding="utf-8"))
        elif embedded is None:
            raise ValueError("no .json beside it and no card embedded in the image")
        else:
            report = json.loads(embedded)
    except (OSError, ValueError, TypeError) as exc:
        raise FlenUserError(f"{p} is not a readable FLENwheel model card ({exc}).") from exc
    if not isinstance(report, dict) or report.get("flen_model_card") != CARD_FORMAT:
        raise FlenUserError(f"{p} is not a FLENwheel model card (format {CARD_FORMAT}).")
    images = [np.asarray(grid.crop(tuple(c["box"]))) for c in report["cells"]]
    return ModelCard(report=report, grid=grid, images=images, json_path=str(json_path), png_path=str(png_path))


# ---- comparing versions ------------------------------------------------------------------------------------

METRICS = ("mean_similarity", "min_similarity", "face_rate", "pass_rate")
TIE = 1e-4


@dataclass
class Comparison:
    report: dict
    grid: Image.Image
    chart: Image.Image
    paths: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """The metric table as text (monospace)."""
        versions = self.report["versions"]
        head = f"{'metric':<16}" + "".join(f"{v:>22}" for v in versions)
        lines = [head]
        for m in METRICS:
            vals = self.report["metrics"][m]
            deltas = self.report["deltas"][m]
            row = f"{m:<16}"
            for k, v in enumerate(versions):
                cell = fmt(vals[v]) if k == 0 else f"{fmt(vals[v])} ({fmt(deltas[v], True)})"
                row += f"{cell:>22}"
            lines.append(row)
        per_row = self.report.get("per_row") or {}
        if per_row:
            lines += ["", f"{'mean per row':<16}" + "".join(f"{v:>22}" for v in versions)]
            for row, g in per_row.items():
                line = f"{row:<16}"
                for k, v in enumerate(versions):
                    val = g["mean_similarity"][v]
                    cell = fmt(val) if k == 0 else f"{fmt(val)} ({fmt(g['delta'][v], True)})"
                    line += f"{cell:>22}"
                lines.append(line)
        lines.append("")
        lines += self.report["summary"]
        return "\n".join(lines)


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else _round(a - b)


def _labels(cards: Sequence[ModelCard]) -> list[str]:
    out: list[str] = []
    for c in cards:
        base, label, n = c.label, c.label, 2
        while label in out:
            label, n = f"{base} #{n}", n + 1
        out.append(label)
    return out


def compare_cards(cards: Sequence[ModelCard], cell_px: int | None = None) -> Comparison:
    """Compares cards cell by cell (cells match by row and column, and must share prompt and seed to count);
    deltas are against the first card."""
    if len(cards) < 2:
        raise FlenUserError(f"Comparing versions needs at least two model cards; got {len(cards)}.")
    versions = _labels(cards)
    by_key = [{c["key"]: (i, c) for i, c in enumerate(card.report["cells"])} for card in cards]
    base_cells = cards[0].report["cells"]
    common, mismatched = [], []
    for cell in base_cells:
        key = cell["key"]
        if any(key not in m for m in by_key[1:]):
            continue
        others = [m[key] for m in by_key[1:]]
        if any(o[1]["template"] != cell["template"] or o[1]["seed"] != cell["seed"] for o in others):
            mismatched.append(key)
            continue
        common.append(key)
    if not common:
        raise FlenUserError("These model cards share no comparable cell (same row, column, prompt and seed). Render "
                            "both versions with the same prompt set to compare them.")
    settings_differ = sorted(
        k for k in ("width", "height", "steps", "guidance", "instance_token", "threshold", "model", "precision")
        if len({json.dumps(c.report.get("generation", {}).get(k)) for c in cards}) > 1)
    cells_of = [[m[k][1] for k in common] for m in by_key]
    metrics: dict[str, dict[str, Any]] = {m: {} for m in METRICS}
    for v, cells in zip(versions, cells_of, strict=True):
        agg = aggregate(cells)
        for m in METRICS:
            metrics[m][v] = agg[m]
    deltas = {m: {v: _delta(metrics[m][v], metrics[m][versions[0]]) for v in versions} for m in METRICS}
    per_cell = []
    wins: dict[str, list[str]] = {v: [] for v in versions}
    for j, key in enumerate(common):
        sims = {v: cells_of[i][j]["similarity"] for i, v in enumerate(versions)}
        scored = {v: s for v, s in sims.items() if s is not None}
        if not scored:
            best = None
        else:
            top = max(scored.values())
            leaders = [v for v, s in scored.items() if top - s <= TIE]
            best = leaders[0] if len(leaders) == 1 else "tie"
        if best not in (None, "tie"):
            wins[best].append(key)
        per_cell.append({"key": key, "row": cells_of[0][j]["row"], "column": cells_of[0][j]["column"],
                         "similarity": sims,
                         "delta": {v: _delta(sims[v], sims[versions[0]]) for v in versions},
                         "face_found": {v: cells_of[i][j]["face_found"] for i, v in enumerate(versions)},
                         "best": best})
    summary = []
    for v in versions[1:]:
        better = sum(1 for c in per_cell if _gt(c["similarity"][v], c["similarity"][versions[0]]))
        worse = sum(1 for c in per_cell if _gt(c["similarity"][versions[0]], c["similarity"][v]))
        summary.append(f"{v} vs {versions[0]}: mean similarity {fmt(deltas['mean_similarity'][v], True)}, "
                       f"min {fmt(deltas['min_similarity'][v], True)}, face rate "
                       f"{fmt(deltas['face_rate'][v], True)}; better on {better} cell(s), worse on {worse}, "
                       f"equal on {len(per_cell) - better - worse}.")
    if mismatched:
        summary.append(f"Not compared (prompt or seed differ): {', '.join(mismatched)}.")
    if settings_differ:
        summary.append(f"Warning: the cards differ in {', '.join(settings_differ)}; deltas mix LoRA and settings.")
    report = {
        "flen_model_card_comparison": CARD_FORMAT,
        "versions": versions,
        "cards": [{"version": v, "lora": c.report.get("lora", {}).get("name"), "card": c.json_path,
                   "sha256": c.report.get("lora", {}).get("sha256")} for v, c in zip(versions, cards, strict=True)],
        "baseline": versions[0],
        "compared_cells": common, "mismatched_cells": mismatched, "settings_differ": settings_differ,
        "metrics": metrics, "deltas": deltas,
        "per_row": _group_deltas(per_cell, versions, "row"),
        "per_column": _group_deltas(per_cell, versions, "column"),
        "cells": per_cell, "wins": wins, "summary": summary,
    }
    px = int(cell_px or cards[0].report["layout"]["cell_px"])
    grid = _comparison_grid(report, [[m[k][0] for k in common] for m in by_key], cards, px)
    return Comparison(report=report, grid=grid, chart=_comparison_chart(report))


def _gt(a: float | None, b: float | None) -> bool:
    if a is None:
        return False
    return b is None or a - b > TIE


def _group_deltas(per_cell: list[dict], versions: list[str], by: str) -> dict:
    groups: dict[str, dict] = {}
    for c in per_cell:
        g = groups.setdefault(c[by], {v: [] for v in versions})
        for v in versions:
            if c["similarity"][v] is not None:
                g[v].append(c["similarity"][v])
    out = {}
    for name, g in groups.items():
        means = {v: _round(sum(s) / len(s)) if s else None for v, s in g.items()}
        out[name] = {"mean_similarity": means,
                     "delta": {v: _delta(means[v], means[versions[0]]) for v in versions}}
    return out


def _comparison_grid(report: dict, indices: list[list[int]], cards: Sequence[ModelCard], px: int) -> Image.Image:
    versions = report["versions"]
    rows, cols = layout_axes([CardCell(c["row"], c["column"], 0, "") for c in report["cells"]])
    letters = [chr(ord("A") + k) if k < 26 else str(k + 1) for k in range(len(versions))]
    title = ["Versions: " + "  ".join(f"{a} = {v}" for a, v in zip(letters, versions, strict=True)),
             " ; ".join(report["summary"][:1])]
    geometry = _Geometry(rows, cols, px, sub=len(versions),
                         captions=[f"{letters[-1]}: {c} (-0.000)" for c in _CAPTION_SAMPLES],
                         caption_rows=len(versions), title=title)
    canvas = Image.new("RGB", geometry.size, BG)
    draw = ImageDraw.Draw(canvas)
    geometry.draw_axes(draw, title)
    f_cap = font(12)
    for j, cell in enumerate(report["cells"]):
        for k, v in enumerate(versions):
            card = cards[k]
            src = card.report["cells"][indices[k][j]]
            box = geometry.image_box(cell["row"], cell["column"], k)
            canvas.paste(_to_pil(card.images[indices[k][j]], px), (box[0], box[1]))
            text, color = cell_status(src)
            if cell["best"] == v:
                draw.rectangle([box[0] - 1, box[1] - 1, box[2], box[3]], outline=GOOD, width=3)
            elif color != GOOD:
                _mark_failed(draw, box, color)
            x, y = geometry.slot_origin(cell["row"], cell["column"])
            d = cell["delta"][v]
            line = f"{letters[k]}: {text}" + ("" if k == 0 or d is None else f" ({fmt(d, True)})")
            geometry.caption(draw, x + 2, y + geometry.cell + 3 + 14 * geometry.caption_lines * k, line, color, f_cap)
    return canvas


_BAR_COLORS = [(90, 140, 220), (230, 140, 60), (120, 190, 90), (200, 90, 160), (160, 160, 80), (90, 190, 190)]


def _comparison_chart(report: dict) -> Image.Image:
    """Left: grouped bars of the metrics per version (0..1). Right: per-cell similarity delta of each version
    against the baseline (bars up = better)."""
    versions = report["versions"]
    cells = report["cells"]
    w_left, w_right, h = 360, max(400, 28 * len(cells) + 104), 300
    img = Image.new("RGB", (w_left + w_right, h), BG)
    d = ImageDraw.Draw(img)
    f = font(12)
    top, bottom = 40, h - 60
    d.text((10, 8), "metrics per version (0..1)", fill=FG, font=f)
    axis = 44  # the y axis, with its values left of it
    group_w = (w_left - axis - 10) / len(METRICS)
    bar_w = max(4.0, (group_w - 12) / len(versions))
    d.line([axis, bottom, w_left - 10, bottom], fill=FG)
    d.line([axis, top, axis, bottom], fill=FG)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - t * (bottom - top)
        label = f"{t:.2f}"
        d.line([axis - 3, y, axis, y], fill=FG)
        if t:
            d.line([axis + 1, y, w_left - 10, y], fill=(60, 60, 60))
        d.text((axis - 5 - d.textlength(label, font=f), y - 7), label, fill=FG, font=f)
    for gi, m in enumerate(METRICS):
        x0 = axis + gi * group_w + 6
        for k, v in enumerate(versions):
            val = report["metrics"][m][v]
            hgt = 0 if val is None else max(0.0, min(1.0, val)) * (bottom - top)
            color = _BAR_COLORS[k % len(_BAR_COLORS)]
            d.rectangle([x0 + k * bar_w, bottom - hgt, x0 + (k + 1) * bar_w - 2, bottom], fill=color)
        d.text((x0, bottom + 6), m.replace("_similarity", " sim").replace("_rate", " rate"), fill=FG, font=f)
    for k, v in enumerate(versions):
        d.rectangle([30 + 120 * k, h - 22, 40 + 120 * k, h - 12], fill=_BAR_COLORS[k % len(_BAR_COLORS)])
        d.text((44 + 120 * k, h - 25), _fit(d, v, f, 100), fill=FG, font=f)
    # per-cell deltas
    x_base = w_left + 64  # room for the delta axis' values
    mid = (top + bottom) / 2
    d.text((w_left + 20, 8), f"similarity delta per cell vs {versions[0]}", fill=FG, font=f)
    deltas = [c["delta"][v] for c in cells for v in versions[1:] if c["delta"][v] is not None]
    scale = max([abs(x) for x in deltas] + [0.05])
    d.line([x_base, mid, x_base + w_right - 84, mid], fill=FG)
    d.line([x_base - 2, top, x_base - 2, bottom], fill=FG)
    for t in (1.0, 0.5, 0.0, -0.5, -1.0):
        y = mid - t * (mid - top)
        label = fmt(t * scale, True) if t else "0"
        d.line([x_base - 5, y, x_base - 2, y], fill=FG)
        d.text((x_base - 7 - d.textlength(label, font=f), y - 7), label, fill=FG, font=f)
    slot = (w_right - 84) / max(1, len(cells))
    sub = max(2.0, (slot - 4) / max(1, len(versions) - 1))
    for j, c in enumerate(cells):
        for k, v in enumerate(versions[1:], start=1):
            dv = c["delta"][v]
            if dv is None:
                continue
            x = x_base + j * slot + (k - 1) * sub
            y = mid - dv / scale * (mid - top)
            d.rectangle([x, min(mid, y), x + sub - 1, max(mid, y)], fill=GOOD if dv > TIE else BAD if dv < -TIE else FG)
        if math.isfinite(slot) and slot >= 14:
            d.text((x_base + j * slot, bottom + 6 + 12 * (j % 2)), str(j + 1), fill=(150, 150, 150), font=f)
    d.text((x_base, h - 25), "cells numbered as in the report", fill=FG, font=f)
    return img


def save_comparison(comparison: Comparison, folder: str | Path, stem: str) -> Comparison:
    paths = save_files(folder, stem, {
        ".compare.json": report_json(comparison.report).encode("utf-8"),
        ".compare.png": png_bytes(comparison.grid),
        ".chart.png": png_bytes(comparison.chart),
    })
    comparison.paths = {"json": paths[".compare.json"], "grid": paths[".compare.png"], "chart": paths[".chart.png"]}
    return comparison
