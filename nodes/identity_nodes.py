"""FLENIdentityReference and FLENIdentityFilter: the automatic face-identity gate before human review."""

from __future__ import annotations

import json
from typing import Any

import torch
from comfy_api.v0_0_2 import io

from ..engines import face_backends
from ..engines import identity as engine
from ..engines.errors import FlenUserError
from ..engines.image_arrays import batch_to_uint8, pil_to_tensor
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, IdentityType, MetaType

EMPTY_MODES = ("skip downstream", "empty batch")
_LICENCE = ("insightface's pretrained packs (buffalo_l, antelopev2, …) are licensed for non-commercial "
            "research only; check the licence of the pack you pick. The dlib entry (listed when dlib-bin and "
            "face_recognition_models are installed) uses dlib's recogniser and 5-point landmarks, released "
            "under CC0: usable commercially; its HOG detector misses strong profiles.")


class FLENIdentityReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENIdentityReference",
            display_name="FLEN Identity Reference",
            category=f"{CATEGORY}/identity",
            description="Builds the identity bank (FLEN_IDENTITY) from the pristine photos of the character: one "
                        "face embedding and head pose per photo, their mean, and which yaw/pitch angles the "
                        "photos cover. Photos with no face or several faces are reported and not used.",
            inputs=[
                io.Image.Input("images", tooltip="The pristine photos of the character (a batch; one face each)."),
                io.Combo.Input("face_model", options=face_backends.model_choices(bridge.insightface_packs()),
                               tooltip="An insightface pack folder in models/insightface/models (e.g. buffalo_l, "
                                       "antelopev2). Nothing is downloaded. " + _LICENCE),
                io.Int.Input("det_size", default=640, min=128, max=2048, step=32,
                             tooltip="Face detector input size in pixels. When no face is found the detector "
                                     "retries at half the size, down to 128. dlib: images are scaled down to "
                                     "twice this on the longer side; when no face is found it upsamples 2x once."),
            ],
            outputs=[
                IdentityType.Output(display_name="identity",
                                    tooltip="The identity bank, for FLEN Identity Filter."),
                io.String.Output(display_name="report",
                                 tooltip="Which photos were used (with pose), which were skipped and why, and the "
                                         "angle coverage."),
                io.Image.Output(display_name="coverage_chart",
                                tooltip="Yaw (columns) × pitch (rows) bins: green = covered (count), red = missing."),
            ],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, face_model: str, det_size: int) -> io.NodeOutput:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
            raise FlenUserError("FLEN Identity Reference got an empty image batch: no photos arrived, so there is "
                                "nothing to find faces in. Check the loader before it (e.g. the folder of "
                                "LoadImageSetFromFolder exists in ComfyUI's input folder and holds the "
                                "character's pristine photos).")
        root = bridge.insightface_root()
        model = face_backends.load_face_model(root, face_model, det_size)
        photos = batch_to_uint8(images)
        progress = bridge.Progress(len(photos))
        bank = engine.build_bank(model, photos, root, on_image=progress)
        report = bank.report()
        return io.NodeOutput(bank, report, pil_to_tensor(bank.coverage.chart()), ui={"text": [report]})


class FLENIdentityFilter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENIdentityFilter",
            display_name="FLEN Identity Filter",
            category=f"{CATEGORY}/identity",
            description="Scores every image's face against the identity bank and routes it to passed or rejected "
                        "(reason: no face / several faces / below threshold). A batch where nothing passes gives "
                        "empty batches, not an error. The score table shows in the node and in the history.",
            inputs=[
                io.Image.Input("images", tooltip="Candidate images (e.g. edits from the angle sweep)."),
                IdentityType.Input("identity", tooltip="The identity bank from FLEN Identity Reference."),
                io.Float.Input("threshold", default=engine.DEFAULT_THRESHOLD, min=-1.0, max=1.0, step=0.01,
                               tooltip="Minimum cosine similarity to pass. Default 0.40 suits insightface's "
                                       "ArcFace packs (buffalo_l, antelopev2); left at 0.40 with a dlib bank it "
                                       "means dlib's default, 0.92 (different people score 0.8-0.9 there). See "
                                       "the node's doc page for how both were chosen; tune with the score table."),
                io.Combo.Input("decide_by", options=list(engine.DECIDE_BY), default="mean",
                               tooltip="mean: similarity to the mean of all references (steady). best: to the "
                                       "closest single reference (kinder to angles only one reference shows)."),
                io.Combo.Input("face_rule", options=list(engine.FACE_RULES), default="largest",
                               tooltip="Which face of an image is scored: the largest box, the one nearest the "
                                       "centre, or the detector's most confident."),
                io.Combo.Input("several_faces", options=list(engine.SEVERAL_FACES), default="reject",
                               tooltip="reject: images with more than one face go to rejected ('several faces'). "
                                       "use chosen face: score the face picked by face_rule and ignore the rest."),
                io.Combo.Input("empty_outputs", options=list(EMPTY_MODES), default=EMPTY_MODES[0],
                               tooltip="When no image passes (or none is rejected): 'skip downstream' skips the "
                                       "nodes fed by that empty side (SaveImage and Preview fail on an empty "
                                       "batch); 'empty batch' outputs a 0-image batch and an empty meta list. "
                                       "Either way the run goes on."),
                MetaType.Input("meta", optional=True,
                               tooltip="Records of the images (one per image); each output record gets the "
                                       "scores, pose and reason added."),
            ],
            outputs=[
                io.Image.Output(display_name="passed", tooltip="Images that passed (an empty batch if none)."),
                MetaType.Output(display_name="passed_meta", tooltip="One record per passed image."),
                io.Image.Output(display_name="rejected", tooltip="Images that were rejected (empty batch if none)."),
                MetaType.Output(display_name="rejected_meta",
                                tooltip="One record per rejected image, with its reason."),
                io.String.Output(display_name="score_table",
                                 tooltip="JSON: threshold, summary and one row per image (scores, pose, box, "
                                         "faces, reason)."),
            ],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, identity: engine.IdentityBank, threshold: float, decide_by: str,
                face_rule: str, several_faces: str, empty_outputs: str = EMPTY_MODES[0],
                meta: list | None = None) -> io.NodeOutput:
        bank = identity
        if not isinstance(bank, engine.IdentityBank):
            raise FlenUserError("FLEN Identity Filter: the identity input must come from FLEN Identity Reference.")
        n = int(images.shape[0])
        if meta is not None and len(meta) != n:
            raise FlenUserError(f"FLEN Identity Filter: meta has {len(meta)} record(s) but images has {n}; "
                                "connect the meta that came with these images.")
        model = face_backends.bank_model(bank)
        threshold = face_backends.effective_threshold(bank, threshold)
        progress = bridge.Progress(n)
        rows = engine.score_images(bank, model, batch_to_uint8(images), threshold=threshold, decide_by=decide_by,
                                   face_rule=face_rule, several_faces=several_faces, on_image=progress)
        table = engine.score_table(rows, threshold, decide_by, face_rule)
        passed_meta: list[dict[str, Any]] = []
        rejected_meta: list[dict[str, Any]] = []
        for row in rows:
            record = dict(meta[row.index]) if meta is not None else {"index": row.index}
            record["identity"] = {k: v for k, v in row.as_dict().items() if k != "index"}
            record["identity"].update(threshold=threshold, decide_by=decide_by, pack=bank.pack)
            record["scores"] = {**dict(record.get("scores") or {}), "identity": row.score}
            record["reason"] = row.reason
            (passed_meta if row.passed else rejected_meta).append(record)
        keep = [r.index for r in rows if r.passed]
        drop = [r.index for r in rows if not r.passed]
        side = []
        for idx, records in ((keep, passed_meta), (drop, rejected_meta)):
            if idx:
                side += [images[idx], records]
            elif empty_outputs == "empty batch":
                side += [torch.zeros((0, *images.shape[1:3], 3), dtype=images.dtype), []]
            else:
                side += [bridge.skip_downstream(), bridge.skip_downstream()]
        table_json = json.dumps(table)
        return io.NodeOutput(*side, table_json, ui={"text": [table_json]})


NODES = [FLENIdentityReference, FLENIdentityFilter]
