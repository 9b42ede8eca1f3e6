"""FLENReviewQueue and FLENLoadApproved: candidates into the review store, judged items back out."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from comfy_api.v0_0_2 import io
from PIL import Image

from ..engines import review_store, workspace
from ..engines.errors import FlenUserError
from ..engines.image_arrays import pil_to_float, to_pil
from ..engines.safe_images import truncation_note
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, CHARACTER_TOOLTIP, MetaType


def unknown_character(character: str, what: str) -> FlenUserError:
    """The error of a node that reads a character's workspace when there is none: names the known ones, since
    the usual cause is a typo (which would otherwise read as 'nothing there yet')."""
    known = review_store.list_characters(bridge.output_directory())
    listed = ", ".join(known) if known else "none yet"
    return FlenUserError(f"No character '{character}' in output/flenwheel/ ({what}). Known characters: {listed}. "
                         "Check the name in the workflow's FLEN Character node, or queue candidates for this "
                         "character first (FLEN Review Queue).")


def _store(character: str) -> review_store.ReviewStore:
    return review_store.open_store(bridge.output_directory(), character.strip())


def _default_run_id() -> str:
    return bridge.current_prompt_id() or time.strftime("run-%Y%m%d-%H%M%S")


def queue_candidates(images: torch.Tensor, meta: list | None, character: str, run_id: str, version: str,
                     source_images: torch.Tensor | None) -> tuple[review_store.ReviewStore, str, list[int]]:
    """Shared by FLENReviewQueue and FLENReviewGate: stores the batch as pending candidates."""
    store = _store(character)
    if images is None or images.shape[0] == 0:
        raise FlenUserError("The image batch is empty: nothing to review.")
    if meta is not None and not isinstance(meta, list):
        raise FlenUserError("meta must be a FLEN_META list (one record per image).")
    run_id = run_id.strip() or _default_run_id()
    sources = [] if source_images is None else [source_images[k] for k in range(source_images.shape[0])]
    warned = flag_truncated(images, meta)
    ids = store.add_candidates([images[k] for k in range(images.shape[0])], warned, run_id=run_id,
                               version=version.strip(), sources=sources)
    return store, run_id, ids


def flag_truncated(images: torch.Tensor, meta: list | None) -> list | None:
    """``meta`` with a ``warnings`` entry on each image that looks like a cut-off file decoded half black/grey
    (ComfyUI's loaders decode truncated PNG/JPEG files without a word)."""
    notes = [truncation_note(images[k].cpu().numpy()) for k in range(images.shape[0])]
    if not any(notes):
        return meta
    records = [dict(m) if isinstance(m, dict) else {} for m in (meta or [{} for _ in notes])]
    for record, note in zip(records, notes, strict=False):
        if note:
            record["warnings"] = [*(record.get("warnings") or []), note]
    return records


def truncation_summary(meta: list | None) -> str:
    n = sum(1 for m in meta or [] if isinstance(m, dict) and m.get("warnings"))
    return f" {n} images look truncated (bottom rows flat black/grey): see their meta 'warnings'." if n else ""


def review_inputs() -> list:
    return [
        io.String.Input("character", default="my_character", tooltip=CHARACTER_TOOLTIP),
        io.String.Input("run_id", default="", optional=True,
                        tooltip="Groups this batch in the gallery; empty uses the prompt id."),
        io.String.Input("version", default="", optional=True,
                        tooltip="Flywheel version the candidates belong to (e.g. v1); free text, may be empty."),
        MetaType.Input("meta", optional=True,
                       tooltip="One FLEN_META record per image (prompt, seed, LoRAs, score, angle label…)."),
        io.Image.Input("source_images", optional=True,
                       tooltip="The source photos the batch was made from (wire all of them): each candidate "
                               "keeps its own, by the source_index its record carries (the edit nodes write "
                               "it), as its edit pair's control and the gallery's A/B image; all are kept as "
                               "its identity references."),
    ]


def review_store_fingerprint(character: str) -> str:
    """A node fingerprint that changes whenever the character's review store changes: decisions are taken in
    the gallery, outside the graph, so nodes that read them must re-run then."""
    try:
        store = review_store.existing_store(bridge.output_directory(), character.strip())
    except FlenUserError:
        return "invalid"
    return "none" if store is None else store.state_token()


class FLENReviewQueue(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENReviewQueue",
            display_name="FLEN Review Queue",
            category=f"{CATEGORY}/review",
            description="Stores an image batch as pending candidates in the character's review store and "
                        "returns at once (for batch runs). Judge them later in the FLENwheel review gallery.",
            inputs=[io.Image.Input("images", tooltip="The candidates to review."), *review_inputs()],
            outputs=[io.String.Output(display_name="summary", tooltip="What was stored, in words."),
                     io.String.Output(display_name="run_id", tooltip="The run id the candidates were stored under."),
                     io.Int.Output(display_name="count", tooltip="How many candidates were stored.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images: torch.Tensor, character: str, run_id: str = "", version: str = "",
                meta: list | None = None, source_images: torch.Tensor | None = None) -> io.NodeOutput:
        store, run_id, ids = queue_candidates(images, meta, character, run_id, version, source_images)
        counts = store.counts()
        summary = (f"Queued {len(ids)} candidates for review ({character}, run {run_id}); "
                   f"{counts['pending']} pending in total." + truncation_summary(store_metas(store, ids)))
        return io.NodeOutput(summary, run_id, len(ids), ui={"text": [summary]})


def store_metas(store: review_store.ReviewStore, ids: list[int]) -> list[dict]:
    return [store.get(i).get("meta") or {} for i in ids]


def _to_batch(paths: list[np.ndarray]) -> tuple[torch.Tensor, bool]:
    """Stacks HWC images; images of another size than the first are resized to it."""
    h, w = paths[0].shape[:2]
    resized = False
    out = []
    for arr in paths:
        if arr.shape[:2] != (h, w):
            arr = pil_to_float(to_pil(arr).resize((w, h), Image.Resampling.LANCZOS))
            resized = True
        out.append(torch.from_numpy(np.ascontiguousarray(arr)))
    return torch.stack(out), resized


def approved_outputs(store: review_store.ReviewStore, items: list[dict]) -> tuple[torch.Tensor, list[dict], bool]:
    if not items:
        return torch.zeros((0, 64, 64, 3), dtype=torch.float32), [], False
    loaded = [store.load_image_checked(item["id"]) for item in items]
    batch, resized = _to_batch([arr for arr, _ in loaded])
    metas = [{**item["meta"], "candidate_id": item["id"], "character": item["character"], "run_id": item["run_id"],
              "version": item["version"], "status": item["status"], "identity_score": item["score"],
              "label": item["label"], "review_image": str(store.root / item["image"])} for item in items]
    for record, item in zip(metas, items, strict=True):
        # the caption shown in the gallery replaces the captioner's; one a reviewer changed is also given apart
        # (reviewer_caption), so a captioner run after this node cannot pass its own off as the reviewer's
        if item["caption"]:
            record["caption"] = item["caption"]
        record["caption_edited"] = item["caption_edited"]
        if item["caption_edited"] and item["caption"]:
            record["reviewer_caption"] = item["caption"]
    for record, (_, truncated) in zip(metas, loaded, strict=True):
        if truncated:
            record["warnings"] = [*(record.get("warnings") or []),
                                  "truncated file in the review store: its missing part decodes black"]
    return batch, metas, resized


class FLENLoadApproved(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENLoadApproved",
            display_name="FLEN Load Approved",
            category=f"{CATEGORY}/review",
            description="Pulls the approved candidates of a character (optionally one run and/or version) out of "
                        "the review store as an IMAGE batch with FLEN_META, and the corrections as JSON "
                        "(for edit pairs). Nothing approved yet gives an empty batch and a message.",
            inputs=[
                io.String.Input("character", default="my_character", tooltip=CHARACTER_TOOLTIP),
                io.String.Input("run_id", default="", optional=True, tooltip="Only this run; empty: all runs."),
                io.String.Input("version", default="", optional=True,
                                tooltip="Only this flywheel version; empty: all versions."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="Approved images (resized to the first's size "
                                                                    "if sizes differ)."),
                     MetaType.Output(display_name="meta",
                                     tooltip="One record per approved image, with its caption from the gallery "
                                             "(reviewer_caption when a reviewer edited it)."),
                     io.String.Output(display_name="corrections",
                                      tooltip="JSON list of corrections: candidate, corrected instruction, better "
                                              "target or fixed image (absolute paths in the workspace)."),
                     io.String.Output(display_name="summary", tooltip="What was loaded, in words.")],
        )

    @classmethod
    def fingerprint_inputs(cls, character: str, run_id: str = "", version: str = "") -> str:
        return review_store_fingerprint(character)

    @classmethod
    def execute(cls, character: str, run_id: str = "", version: str = "") -> io.NodeOutput:
        character = character.strip()
        store = review_store.existing_store(bridge.output_directory(), character)
        if store is None:
            raise unknown_character(character, "FLEN Load Approved reads its approved candidates")
        items = store.approved(run_id=run_id.strip() or None, version=version.strip() or None)
        batch, metas, resized = approved_outputs(store, items)
        corrections = store.corrections_in_workspace(run_id=run_id.strip() or None, version=version.strip() or None)
        scope = f"{character}" + (f", run {run_id.strip()}" if run_id.strip() else "") + (
            f", version {version.strip()}" if version.strip() else "")
        if items:
            msg = f"Loaded {len(items)} approved images ({scope}); {len(corrections)} corrections."
            if resized:
                msg += " Some images were resized to the first image's size."
            msg += truncation_summary(metas)
        else:
            msg = f"Nothing approved yet ({scope}): judge candidates in the FLENwheel review gallery."
        return io.NodeOutput(batch, metas, json.dumps(corrections, ensure_ascii=False), msg, ui={"text": [msg]})


class FLENCharacter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENCharacter",
            display_name="FLEN Character",
            category=f"{CATEGORY}/review",
            description="The character a workflow works on, typed once: its output feeds the character input of "
                        "every FLENwheel node of the workflow. It shows whether that workspace exists and which "
                        "characters do, so a typo shows up before a run writes into a new, empty workspace.",
            inputs=[io.String.Input("character", default="my_character",
                                    tooltip=CHARACTER_TOOLTIP + " The one place to type it in a workflow.")],
            outputs=[io.String.Output(display_name="character",
                                      tooltip="The character name, for the character inputs of the other nodes.")],
            is_output_node=True,  # its text (workspace found or not) shows even when nothing else runs
        )

    @classmethod
    def fingerprint_inputs(cls, character: str) -> str:
        return ",".join(review_store.list_characters(bridge.output_directory()))  # the text lists them

    @classmethod
    def execute(cls, character: str) -> io.NodeOutput:
        name = workspace.validate_character(character.strip())
        known = review_store.list_characters(bridge.output_directory())
        if name in known:
            text = f"Character '{name}': existing workspace {workspace.workspace_label(name)}/."
        else:
            text = (f"Character '{name}': no workspace yet (a writing node creates "
                    f"{workspace.workspace_label(name)}/). "
                    f"Known characters: {', '.join(known) if known else 'none yet'}.")
        return io.NodeOutput(name, ui={"text": [text]})


NODES = [FLENCharacter, FLENReviewQueue, FLENLoadApproved]
