"""FLENCaptionImages: descriptions of images by the Qwen2.5-VL the user already has (Qwen-Image-Edit's text encoder)."""

from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from ..engines import vl_caption
from ..engines.errors import FlenUserError
from ..engines.image_arrays import to_pil
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, MetaType

_DIFFUSERS = "diffusers/"
_FILE = "text_encoders/"
_cache: dict[tuple[str, str], vl_caption.Captioner] = {}


def _sources() -> list[str]:
    return [_DIFFUSERS + n for n in bridge.diffusers_folders()] + [
        _FILE + n for n in bridge.model_files("text_encoders") if "qwen" in n.lower()]


def _captioner(source: str) -> vl_caption.Captioner:
    dtype = torch.bfloat16 if bridge.compute_device().type == "cuda" else torch.float32
    key = (source, str(dtype))
    if key not in _cache:
        _cache.clear()  # one 7B captioner at a time
        if source.startswith(_DIFFUSERS):
            cap = vl_caption.load_from_folder(bridge.diffusers_folder_path(source[len(_DIFFUSERS):]), dtype)
        elif source.startswith(_FILE):
            cap = vl_caption.load_from_file(bridge.model_file_path("text_encoders", source[len(_FILE):]),
                                            bridge.comfy_tokenizer_folder("qwen25_tokenizer"), dtype)
        else:
            raise FlenUserError(f"Caption source {source[:120]!r} is neither 'diffusers/<folder>' nor "
                                "'text_encoders/<file>'; pick one from the list.")
        _cache[key] = cap
    return _cache[key]


class FLENCaptionImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENCaptionImages",
            display_name="FLEN Caption Images",
            category=f"{CATEGORY}/dataset",
            description="Describes each image (pose, expression, clothing, setting, lighting; never who it is) with "
                        "Qwen2.5-VL, the text encoder of Qwen-Image-Edit-2509, so nothing is downloaded. Greedy "
                        "decoding: the same image gives the same caption. Feed the meta to FLEN Dataset Writer "
                        "with caption_source vlm or template+vlm.",
            inputs=[
                io.Image.Input("images", tooltip="The images to describe (e.g. from FLEN Load Approved)."),
                io.Combo.Input("source", options=_sources(),
                               tooltip="diffusers/<folder>: the Qwen-Image-Edit-2509 folder's text_encoder and "
                                       "processor. text_encoders/<file>: ComfyUI's Qwen2.5-VL file; it must hold "
                                       "the language-model head (lm_head), which ComfyUI's edit files lack."),
                io.String.Input("instance_token", default="ohwx_char person",
                                tooltip="Trigger word + class, put into every caption."),
                io.Int.Input("max_new_tokens", default=vl_caption.DEFAULT_MAX_NEW_TOKENS, min=1,
                             max=vl_caption.MAX_NEW_TOKENS_LIMIT,
                             tooltip="The most tokens a description may have (a short sentence is 20–40)."),
                io.Int.Input("max_pixels", default=vl_caption.DEFAULT_MAX_PIXELS, min=28 * 28, max=1024 * 1024,
                             tooltip="Images are shrunk to at most this many pixels before the VLM sees them "
                                     "(more: slower, finer detail)."),
                MetaType.Input("meta", optional=True,
                               tooltip="FLEN_META records of the images; the description is added to each."),
            ],
            outputs=[io.String.Output(display_name="captions", is_output_list=True,
                                      tooltip="One caption per image: instance token, then the description."),
                     MetaType.Output(display_name="meta",
                                     tooltip="The records with 'description', 'caption' and 'caption_provenance' "
                                             "(settings of the greedy decoding) added.")],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, source: str, instance_token: str, max_new_tokens: int,
                max_pixels: int, meta: list | None = None) -> io.NodeOutput:
        from ..engines.dataset import validate_token

        token = validate_token(instance_token)
        n = images.shape[0]
        if meta is not None and (not isinstance(meta, list) or len(meta) != n):
            raise FlenUserError(f"meta has {len(meta) if isinstance(meta, list) else 'no'} records for {n} images: "
                                "FLEN_META needs exactly one record per image.")
        settings = vl_caption.CaptionSettings(max_new_tokens=max_new_tokens, max_pixels=max_pixels).checked()
        cap = _captioner(source)
        prov = vl_caption.provenance(cap, settings)
        # through ComfyUI's VRAM manager, as every other model of the pack: it offloads the 7B captioner when the
        # editor or a trainer needs the card next, instead of finding it parked there
        device = bridge.ComfyModelHost().prepare(cap.model)
        progress = bridge.Progress(n)
        captions, metas = [], []
        for k in range(n):
            bridge.check_interrupt()
            pil = to_pil(images[k])
            description = vl_caption.describe(cap, pil, settings, device)
            caption = vl_caption.caption_with_token(description, token)
            record = dict(meta[k]) if meta is not None and isinstance(meta[k], dict) else {}
            record.update(description=description, caption=caption, caption_provenance=prov)
            captions.append(caption)
            metas.append(record)
            progress.update(k + 1, n, text=caption[:120], image=pil)
        return io.NodeOutput(captions, metas)


NODES = [FLENCaptionImages]
