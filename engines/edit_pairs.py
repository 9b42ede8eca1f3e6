"""Edit-pair sets for training the Qwen editor: control image(s) + instruction → target.

One folder per set in the character workspace ``<output>/flenwheel/<character>/edit_pairs/vN/``::

    targets/<stem>.png, <stem>.txt   target image and its instruction caption
                                     (ai-toolkit ``folder_path``; musubi-tuner ``image_directory``)
    control_1/<stem>.png             first control, same file name as its target
    control_2/, control_3/           further controls (ai-toolkit ``control_path``: a list of up to 3)
    musubi_control/<stem>.png        musubi-tuner ``control_directory``: one control keeps the target's
    musubi_control/<stem>_0.png, …   name; several are numbered ``<stem>_0``, ``<stem>_1``…
    manifest.jsonl, dataset.json     provenance per pair, version record (as for datasets)
    ai_toolkit_dataset.yaml          the ``datasets:`` entry for an ai-toolkit job
    musubi_dataset.toml              a musubi-tuner dataset config

Every pair of a set has the same number of controls (ai-toolkit pairs the n-th control folder with
every target). A pair whose target or a control is missing or unreadable, or whose control count
differs from the set's, is reported and left out: never written half. The whole set is built in a
temp folder and renamed into place, so a crash leaves no set or the complete set.

Plain Python: no ComfyUI imports.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from . import dataset as ds
from .errors import FlenUserError
from .png_files import png_bytes
from .safe_images import open_image
from .workspace import validate_character

EDIT_PAIRS_DIR = "edit_pairs"
MAX_CONTROLS = 3
TARGETS = "targets"
MUSUBI_CONTROL = "musubi_control"


def control_dir(n: int) -> str:
    """ai-toolkit control folder of the n-th control (1-based)."""
    return f"control_{n}"


def musubi_control_name(stem: str, k: int, n_controls: int) -> str:
    return f"{stem}.png" if n_controls == 1 else f"{stem}_{k}.png"


@dataclass
class EditPair:
    """One pair: ``controls`` are the edit's input images (paths, arrays or PIL), ``target`` what the
    edit should give; ``instruction`` is its caption."""

    target: Any
    controls: list[Any]
    instruction: str
    provenance: dict[str, Any] = field(default_factory=dict)
    name: str = ""


@dataclass
class EditPairResult:
    dataset: ds.Dataset | None
    reports: list[dict[str, Any]]  # one per input pair: index, name, status (written|skipped), reason

    @property
    def written(self) -> int:
        return sum(1 for r in self.reports if r["status"] == "written")

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return [r for r in self.reports if r["status"] == "skipped"]

    def summary(self) -> str:
        d = self.dataset
        text = (f"Wrote edit-pair set {d.version} ({d.path}): {self.written} pairs with {d.counts.get('controls', 0)} "
                f"control(s) each. Hash {d.hash[:19]}…") if d else "No edit-pair set written."
        if self.skipped:
            text += f" Skipped {len(self.skipped)}: " + "; ".join(
                f"{r['name'] or '#' + str(r['index'])}: {r['reason']}" for r in self.skipped[:10])
        return text


def _load(image: Any, what: str) -> tuple[Image.Image, list[str]]:
    if image is None:
        raise FlenUserError(f"{what} is missing")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FlenUserError(f"{what} file {path.name} is missing")
        try:
            im, _ = open_image(path, f"{what} file {path.name}")
            with im:
                return ds.prepare_image(im)
        except FlenUserError:
            raise
        except Exception:
            raise FlenUserError(f"{what} file {path.name} is not a readable image") from None
    return ds.prepare_image(image)


def _instruction(text: Any) -> str:
    clean = ds._clean_text(text)
    if not clean:
        raise FlenUserError("the instruction is empty")
    if len(clean) > 2000:
        raise FlenUserError("the instruction is longer than 2000 characters")
    return clean


def _check(pair: EditPair) -> tuple[Image.Image, list[Image.Image], str, list[str]]:
    if pair.target is None:
        raise FlenUserError("control without a target: the pair has no target image")
    if not pair.controls:
        raise FlenUserError("target without a control: the pair has no control image")
    if len(pair.controls) > MAX_CONTROLS:
        raise FlenUserError(f"{len(pair.controls)} controls; ai-toolkit and musubi-tuner take at most {MAX_CONTROLS}")
    target, notes = _load(pair.target, "target")
    controls = []
    for k, c in enumerate(pair.controls, 1):
        im, _ = _load(c, f"control {k}")
        controls.append(im)
    return target, controls, _instruction(pair.instruction), notes


def ai_toolkit_entry(set_dir: Path, n_controls: int) -> dict[str, Any]:
    """The ``datasets:`` entry of an ai-toolkit Qwen-Image-Edit-2509 job for this set."""
    return {"folder_path": str(set_dir / TARGETS),
            "control_path": [str(set_dir / control_dir(k)) for k in range(1, n_controls + 1)],
            "caption_ext": "txt", "caption_dropout_rate": 0.05, "resolution": [512, 768, 1024]}


def musubi_toml(set_dir: Path) -> str:
    """A musubi-tuner dataset config (Qwen-Image-Edit-2509) for this set."""
    def q(p: Path) -> str:
        return json.dumps(str(p))  # TOML basic strings share JSON's escapes

    return ("[general]\nresolution = [1024, 1024]\ncaption_extension = \".txt\"\nbatch_size = 1\n"
            "enable_bucket = true\nbucket_no_upscale = false\n\n[[datasets]]\n"
            f"image_directory = {q(set_dir / TARGETS)}\ncontrol_directory = {q(set_dir / MUSUBI_CONTROL)}\n"
            f"cache_directory = {q(set_dir / 'cache')}\nnum_repeats = 1\n")


def _yaml(entry: dict[str, Any]) -> str:
    lines = ["datasets:"]
    first = True
    for key, value in entry.items():
        prefix = "  - " if first else "    "
        first = False
        if isinstance(value, list) and key == "control_path":
            lines.append(f"{prefix}{key}:")
            lines.extend(f"      - {json.dumps(v)}" for v in value)
        else:
            lines.append(f"{prefix}{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def write_edit_pairs(output_dir: str | os.PathLike, character: str, pairs: list[EditPair], *,
                     n_controls: int = 0, skipped: list[dict[str, Any]] | None = None,
                     written_by: str = "") -> EditPairResult:
    """Validates every pair, then writes the valid ones as a new set ``edit_pairs/vN``.

    ``n_controls`` 0 takes the most common control count of the valid pairs. ``skipped``: reports of
    items the caller already left out (they are passed through). Raises FlenUserError when no pair is
    complete (the message lists why)."""
    character = validate_character(character)
    if not 0 <= int(n_controls) <= MAX_CONTROLS:
        raise FlenUserError(f"controls must be 0 (automatic) to {MAX_CONTROLS}.")
    reports: list[dict[str, Any]] = list(skipped or [])
    offset = len(reports)
    valid = []
    for k, pair in enumerate(pairs):
        entry = {"index": offset + k, "name": pair.name, "status": "skipped", "reason": ""}
        reports.append(entry)
        try:
            target, controls, instruction, notes = _check(pair)
        except FlenUserError as exc:
            entry["reason"] = str(exc)
            continue
        valid.append((entry, pair, target, controls, instruction, notes))
    n = int(n_controls) or (Counter(len(v[3]) for v in valid).most_common(1)[0][0] if valid else 0)
    complete = []
    for v in valid:
        if len(v[3]) != n:
            v[0]["reason"] = (f"mismatched controls: {len(v[3])} control(s) where this set has {n} (every pair of "
                              "a set needs the same number)")
        else:
            complete.append(v)
    if not complete:
        why = "; ".join(f"{r['name'] or '#' + str(r['index'])}: {r['reason']}" for r in reports[:8])
        raise FlenUserError("No complete edit pair to write" + (f" ({why})." if why else
                                                                 ": no corrections or approved edits yet."))

    def build(tmp: Path, info: dict[str, Any]) -> None:
        records = []
        for i, (entry, pair, target, controls, instruction, notes) in enumerate(complete, 1):
            stem = f"{character}_e{i:05d}"
            tdata = png_bytes(target)
            rec: dict[str, Any] = {
                "index": i, "file": f"{TARGETS}/{stem}.png", "caption_file": f"{TARGETS}/{stem}.txt",
                "caption": instruction, "instruction": instruction, "sha256": ds.sha256_bytes(tdata),
                "width": target.width, "height": target.height, "conversions": notes, "controls": [],
                "added_at": time.time(), "written_by": written_by, "name": pair.name,
                **json.loads(json.dumps(pair.provenance, default=str))}
            ds.atomic_write(tmp / rec["caption_file"], instruction.encode("utf-8"))
            ds.atomic_write(tmp / rec["file"], tdata)
            for k, control in enumerate(controls):
                cdata = png_bytes(control)
                c: dict[str, Any] = {"file": f"{control_dir(k + 1)}/{stem}.png",
                     "musubi_file": f"{MUSUBI_CONTROL}/{musubi_control_name(stem, k, n)}",
                     "sha256": ds.sha256_bytes(cdata), "width": control.width, "height": control.height}
                ds.atomic_write(tmp / c["file"], cdata)
                ds.atomic_write(tmp / c["musubi_file"], cdata)
                rec["controls"].append(c)
            ds.append_line(tmp / ds.MANIFEST_NAME, rec)
            records.append(rec)
            entry.update(status="written", reason="", file=rec["file"])
        info.update(hash=ds.content_hash(records), counts=ds.counts_of(records), n_controls=n)
        final = tmp.parent / info["version"]
        ds.atomic_write(tmp / "ai_toolkit_dataset.yaml", _yaml(ai_toolkit_entry(final, n)).encode("utf-8"))
        ds.atomic_write(tmp / "musubi_dataset.toml", musubi_toml(final).encode("utf-8"))

    root = ds.datasets_root(output_dir, character, EDIT_PAIRS_DIR)
    vdir = ds.create_version(root, {"kind": "edit_pairs", "character": character, "n_controls": n}, build)
    return EditPairResult(ds.load_dataset(vdir, verify=False), reports)


# ---- from the review store --------------------------------------------------------------------

INCLUDE = ("corrections and approved edits", "corrections only", "approved edits only")


def pairs_from_review(store: Any, include: str = INCLUDE[0], run_id: str | None = None,
                      version: str | None = None) -> tuple[list[EditPair], list[dict[str, Any]]]:
    """Edit pairs from a review store (engines.review_store.ReviewStore): each correction and, optionally,
    each approved edit. Returns the pairs and reports for items that are not edits at all.

    A correction with a fixed image or a better candidate trains "sources + instruction → that image";
    one with only a corrected instruction re-labels the candidate: "sources + corrected instruction →
    what the editor made". An approved edit trains "sources + its instruction → itself"."""
    if include not in INCLUDE:
        raise FlenUserError(f"include must be one of: {', '.join(INCLUDE)}.")
    root = Path(store.root)
    pairs: list[EditPair] = []
    skipped: list[dict[str, Any]] = []

    def base(item_id: int) -> dict[str, Any]:
        try:
            item = store.get(item_id)
        except KeyError:
            return {}
        return {"model": item.get("model"), "seed": item.get("seed"), "loras": item.get("loras"),
                "identity_score": item.get("score"), "label": item.get("label")}

    if include != INCLUDE[2]:
        for c in store.corrections(run_id=run_id, version=version):
            controls = [root / s for s in c.get("sources") or []]
            corrected = c.get("corrected_instruction") or ""
            if c.get("fixed_image"):
                target, origin = root / c["fixed_image"], "fixed_image"
            elif c.get("better_image"):
                target, origin = root / c["better_image"], "better_target"
            else:
                target, origin = root / c["image"], "relabelled"
            prov = {"source": "review_correction", "origin": origin, "candidate_id": c["candidate_id"],
                    "run_id": c.get("run_id"), "review_version": c.get("version"),
                    "original_instruction": c.get("prompt"), "corrected_instruction": corrected,
                    "better_id": c.get("better_id"), "note": c.get("note"),
                    "review": {"status": "corrected", "who": c.get("who"), "at": c.get("at")},
                    **base(c["candidate_id"])}
            pairs.append(EditPair(target, controls, corrected or c.get("prompt") or "", prov,
                                  f"candidate {c['candidate_id']}"))
    if include != INCLUDE[1]:
        for item in store.approved(run_id=run_id, version=version):
            name = f"candidate {item['id']}"
            if not item.get("sources") or not item.get("prompt"):
                skipped.append({"index": len(skipped), "name": name, "status": "skipped",
                                "reason": "not an edit (no source image or instruction)"})
                continue
            prov = {"source": "review_approved", "origin": "approved_edit", "candidate_id": item["id"],
                    "run_id": item.get("run_id"), "review_version": item.get("version"),
                    "original_instruction": item.get("prompt"), "review": {"status": "approved"},
                    **base(item["id"])}
            pairs.append(EditPair(root / item["image"], [root / s for s in item["sources"]], item["prompt"], prov,
                                  name))
    return pairs, skipped
