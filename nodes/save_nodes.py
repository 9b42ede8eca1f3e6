"""FLENSaveImages: like SaveImage, plus each image's FLEN_META record and label in the file."""

from __future__ import annotations

from pathlib import Path

import torch
from comfy_api.v0_0_2 import io, ui
from PIL import Image

from ..engines.errors import FlenUserError
from ..engines.image_arrays import to_pil, to_uint8
from ..engines.png_files import safe_label, write_png_new
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, MetaType


def _to_pil(image: torch.Tensor) -> Image.Image:
    """RGB as ComfyUI's IMAGE, and also RGBA (kept: PNG holds transparency) or one channel (grayscale)."""
    if image.shape[-1] == 3:
        return to_pil(image)
    arr = to_uint8(image)
    return Image.fromarray(arr[:, :, 0], mode="L") if arr.shape[-1] == 1 else Image.fromarray(arr, mode="RGBA")


class FLENSaveImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENSaveImages",
            display_name="FLEN Save Images",
            category=f"{CATEGORY}/io",
            description="Saves images to the output folder like Save Image (the workflow is embedded), and also "
                        "writes each image's FLEN_META record (label, instruction, seed, LoRAs, scores) into the "
                        "PNG as 'flen_meta' and its label into the file name. Never overwrites a file.",
            inputs=[
                io.Image.Input("images", tooltip="The images to save."),
                io.String.Input("filename_prefix", default="flenwheel/images",
                                tooltip="Sub-folder and file-name prefix inside ComfyUI's output folder."),
                MetaType.Input("meta", optional=True,
                               tooltip="One record per image (from FLENwheel nodes); its 'label' goes into the "
                                       "file name, the whole record into the PNG."),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images: torch.Tensor, filename_prefix: str, meta: list[dict] | None = None) -> io.NodeOutput:
        if images.ndim != 4 or images.shape[0] == 0:
            raise FlenUserError("FLEN Save Images got an empty batch: nothing to save.")
        if images.shape[-1] not in (1, 3, 4):
            raise FlenUserError(f"FLEN Save Images got images with {images.shape[-1]} channels; it saves grayscale "
                                "(1), RGB (3) or RGBA (4) images.")
        if meta is not None and len(meta) != images.shape[0]:
            raise FlenUserError(f"'meta' has {len(meta)} records for {images.shape[0]} images; connect the meta "
                                "output that belongs to this image batch.")
        folder, stem, counter, subfolder = bridge.save_image_path(filename_prefix, images.shape[2], images.shape[1])
        common: dict[str, object] = {}
        if cls.hidden.prompt:
            common["prompt"] = cls.hidden.prompt
        for key, value in (cls.hidden.extra_pnginfo or {}).items():
            common[key] = value
        results = []
        for i, image in enumerate(images):
            record = meta[i] if meta is not None else None
            label = safe_label(str(record.get("label", ""))) if record else ""
            text = dict(common)
            if record is not None:
                text["flen_meta"] = record
            # stem_00001_label.png keeps ComfyUI's counter scan working for the next save.
            path, counter = write_png_new(Path(folder), lambda n, lb=label: f"{stem}_{n:05}_{lb}.png", counter,
                                          _to_pil(image), text)
            counter += 1
            results.append(ui.SavedResult(path.name, subfolder, io.FolderType.output))
        return io.NodeOutput(ui=ui.SavedImages(results))


NODES = [FLENSaveImages]
