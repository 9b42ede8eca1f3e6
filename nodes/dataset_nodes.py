"""FLENDatasetWriter and FLENEditPairWriter: versioned training sets out of approved images and corrections."""

from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from ..engines import dataset, edit_pairs, review_store
from ..engines.errors import FlenUserError
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, CHARACTER_TOOLTIP, DatasetType, MetaType
from .review_nodes import review_store_fingerprint, unknown_character


class FLENDatasetWriter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENDatasetWriter",
            display_name="FLEN Dataset Writer",
            category=f"{CATEGORY}/dataset",
            description="Writes images with captions (template + instance token + angle/expression labels, the "
                        "VLM's description, or the caption a reviewer edited in the gallery) into "
                        "a versioned dataset output/flenwheel/<character>/datasets/vN/, by phase (head/body) and "
                        "kind (pristine/enriched/synthetic), with a manifest of provenance and a content hash. "
                        "Frozen versions (used by a trainer) are never changed.",
            inputs=[
                io.Image.Input("images", tooltip="The images to add (e.g. from FLEN Load Approved)."),
                io.String.Input("character", default="my_character", tooltip=CHARACTER_TOOLTIP),
                io.String.Input("instance_token", default="ohwx_char person",
                                tooltip="Trigger word + class, put into every caption (no commas, quotes, "
                                        "slashes or braces)."),
                io.String.Input("caption_template", default=dataset.DEFAULT_TEMPLATE,
                                tooltip="Caption of each image: {token} is required; {labels} (angle, expression, "
                                        "pose), {angle}, {expression}, {pose}, {label}, {class}, {phase}, {kind}."),
                io.String.Input("version", default="new",
                                tooltip="'new' creates the next vN; an existing draft such as 'v2' adds to it "
                                        "(a frozen version refuses)."),
                io.Combo.Input("phase", options=["auto", *dataset.PHASES], default="auto",
                               tooltip="head (head and expressions) or body (full body); auto takes each record's "
                                       "'phase', else head."),
                io.Combo.Input("kind", options=["auto", *dataset.KINDS], default="auto",
                               tooltip="pristine (source photos), enriched (Qwen edits), synthetic (FLUX); auto "
                                       "reads each record."),
                io.Combo.Input("near_duplicates", options=list(dataset.NEAR_DUPLICATE_MODES), default="flag",
                               tooltip="Perceptual-hash near-duplicates of images already in the version: flag "
                                       "(written, marked in the manifest), drop (not written) or keep."),
                io.Int.Input("phash_threshold", default=dataset.PHASH_THRESHOLD, min=0, max=32,
                             tooltip="Hamming distance (of 64 bits) at or below which two images count as "
                                     "near-duplicates."),
                io.String.Input("class_prompt", default="", optional=True,
                                tooltip="Optional class prompt (e.g. 'a photo of a person'), recorded for prior "
                                        "preservation."),
                io.Combo.Input("caption_source", options=list(dataset.CAPTION_SOURCES), default="template",
                               optional=True,
                               tooltip="template: the caption template only. vlm: '{token}, {description}' from "
                                       "FLEN Caption Images (connect its meta). template+vlm: the template with "
                                       "{description} (appended if the template has none). A caption a reviewer "
                                       "edited in the review gallery wins over all three (token added if missing)."),
                MetaType.Input("meta", optional=True,
                               tooltip="One FLEN_META record per image: labels and provenance for the manifest."),
            ],
            outputs=[DatasetType.Output(display_name="dataset",
                                        tooltip="FLEN_DATASET: path, version, hash, counts, token (for trainers)."),
                     io.String.Output(display_name="summary", tooltip="What was written, in words.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images: torch.Tensor, character: str, instance_token: str, caption_template: str,
                version: str, phase: str, kind: str, near_duplicates: str, phash_threshold: int,
                class_prompt: str = "", caption_source: str = "template",
                meta: list | None = None) -> io.NodeOutput:
        if images is None or images.shape[0] == 0:
            raise FlenUserError("The image batch is empty: nothing to write. (Nothing approved yet? Judge "
                                "candidates in the FLENwheel review gallery first.)")
        if meta is not None and not isinstance(meta, list):
            raise FlenUserError("meta must be a FLEN_META list (one record per image).")
        metas = review_store.review_provenance(bridge.output_directory(), meta) if meta is not None else None
        caption_template = dataset.template_for_source(caption_template, caption_source, metas)
        result = dataset.write_dataset(
            bridge.output_directory(), character.strip(), [images[k] for k in range(images.shape[0])], metas,
            token=instance_token, version=version.strip() or "new", template=caption_template,
            class_prompt=class_prompt, phase=phase, kind=kind, near_duplicates=near_duplicates,
            phash_threshold=phash_threshold, written_by=f"FLENDatasetWriter prompt {bridge.current_prompt_id()}",
            caption_source=caption_source)
        summary = result.summary()
        return io.NodeOutput(result.dataset.as_flen_dataset(), summary, ui={"text": [summary]})


class FLENEditPairWriter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENEditPairWriter",
            display_name="FLEN Edit Pair Writer",
            category=f"{CATEGORY}/dataset",
            description="Turns the reviewer's corrections (and approved edits) of a character into a new edit-pair "
                        "set output/flenwheel/<character>/edit_pairs/vN/: targets with instruction captions and "
                        "1–3 controls with matching file names, in the layouts ai-toolkit (control_path) and "
                        "musubi-tuner (control_directory) read. Incomplete pairs are reported, never written.",
            inputs=[
                io.String.Input("character", default="my_character", tooltip=CHARACTER_TOOLTIP),
                io.Combo.Input("include", options=list(edit_pairs.INCLUDE), default=edit_pairs.INCLUDE[0],
                               tooltip="Which review items become pairs: corrections (fixed image, better target "
                                       "or corrected instruction) and/or approved edits."),
                io.Int.Input("controls", default=0, min=0, max=edit_pairs.MAX_CONTROLS,
                             tooltip="Control images per pair (1–3); 0 takes the most common count. Pairs with "
                                     "another count are reported and left out."),
                io.String.Input("run_id", default="", optional=True, tooltip="Only this review run; empty: all."),
                io.String.Input("version", default="", optional=True,
                                tooltip="Only this flywheel version of the review store; empty: all."),
            ],
            outputs=[DatasetType.Output(display_name="edit_pairs",
                                        tooltip="FLEN_DATASET of the edit-pair set: path, version, hash, counts."),
                     io.String.Output(display_name="summary",
                                      tooltip="What was written and which items were skipped, and why.")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, character: str, include: str, controls: int, run_id: str = "",
                           version: str = "") -> str:
        return review_store_fingerprint(character)  # a new set only when the review store changed

    @classmethod
    def execute(cls, character: str, include: str, controls: int, run_id: str = "",
                version: str = "") -> io.NodeOutput:
        character = character.strip()
        store = review_store.existing_store(bridge.output_directory(), character)
        if store is None:
            raise unknown_character(character, "FLEN Edit Pair Writer reads its corrections")
        pairs, skipped = edit_pairs.pairs_from_review(store, include, run_id.strip() or None,
                                                      version.strip() or None)
        result = edit_pairs.write_edit_pairs(bridge.output_directory(), character, pairs, n_controls=controls,
                                             skipped=skipped,
                                             written_by=f"FLENEditPairWriter prompt {bridge.current_prompt_id()}")
        summary = result.summary()
        return io.NodeOutput(result.dataset.as_flen_dataset(), summary, ui={"text": [summary]})


NODES = [FLENDatasetWriter, FLENEditPairWriter]
