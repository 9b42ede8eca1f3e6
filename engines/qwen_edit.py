"""Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline) edits of 1–3 images under a LoRA stack.

Two hosted stages: the Qwen2.5-VL encoder turns instruction + condition images into
embeddings, then the transformer and VAE denoise and decode. Only one stage needs the GPU.

diffusers resizes the reference images to module-level constants (1024² for the VAE
reference, 384² for the VL condition), whatever output size is asked for. A reference larger
or smaller than the output is a known cause of pixel shift/zoom, and 1024² costs the same
as the output again on the GPU, so the edit sets the reference area to the output's area.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from .diffusers_folder import load_pipeline
from .errors import FlenUserError
from .flow_schedule import StepCallback
from .lora_adapters import PipelineHandle
from .lora_stack import LoraStack
from .model_host import ModelHost, denoise_bytes, vae_decode_bytes

QWEN_EDIT_CLASSES = ("QwenImageEditPlusPipeline",)
DEFAULT_CONDITION_PIXELS = 384 * 384
MIN_SIDE = 64
MAX_PIXELS = 4096 * 4096

_size_lock = threading.Lock()


@contextlib.contextmanager
def reference_sizes(vae_pixels: int, condition_pixels: int) -> Iterator[None]:
    """Temporarily sets diffusers' reference-resize constants (they are module globals)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as mod

    with _size_lock:
        saved = (mod.VAE_IMAGE_SIZE, mod.CONDITION_IMAGE_SIZE)
        mod.VAE_IMAGE_SIZE, mod.CONDITION_IMAGE_SIZE = vae_pixels, condition_pixels
        try:
            yield
        finally:
            mod.VAE_IMAGE_SIZE, mod.CONDITION_IMAGE_SIZE = saved


@dataclass
class QwenEditHandle(PipelineHandle):
    """A loaded QwenImageEditPlusPipeline."""

    architecture = "qwen_image"
    module_names = ("text_encoder", "transformer", "vae")

    @property
    def size_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor) * 2


def load_qwen_edit(folder: str | Path, name: str, precision: str, device: torch.device) -> QwenEditHandle:
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel

    pipe = load_pipeline(QwenImageEditPlusPipeline, QwenImageTransformer2DModel, folder, QWEN_EDIT_CLASSES,
                         precision, device, QwenEditHandle.module_names)
    return QwenEditHandle(name=name, folder=str(folder), precision=precision, pipe=pipe)


@dataclass(frozen=True)
class QwenEditFiles:
    """ComfyUI's split files of Qwen-Image-Edit-2509 (full paths) and ComfyUI's bundled Qwen2.5 tokenizer."""

    diffusion_model: str
    text_encoder: str
    vae: str
    tokenizer: str | None = None


def qwen_edit_pipe_from_files(files: QwenEditFiles, dtypes, with_transformer: bool = True):
    """A QwenImageEditPlusPipeline from ComfyUI's split files (see engines/split_files.py); without the transformer
    for the trainer's encoding pass. fp8 files stay fp8 in memory."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from . import split_files as sf

    dm_info = sf.expect(files.diffusion_model, ("qwen_image_transformer",), "diffusion_models",
                        "a Qwen-Image-Edit-2509 diffusion model (e.g. qwen_image_edit_2509_fp8_e4m3fn.safetensors)")
    transformer = sf.load_qwen_transformer(files.diffusion_model, dtypes) if with_transformer else None
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        sf.config_for(dm_info, sf.QWEN_EDIT_CONFIGS, "scheduler"))
    text_encoder = sf.load_qwen_vl(files.text_encoder, dtypes)
    vae = sf.load_qwen_vae(files.vae, dtypes)
    tokenizer = sf.qwen_tokenizer(sf.tokenizer_folder(sf.inspect_file(files.text_encoder), files.tokenizer, "Qwen2.5"))
    # Qwen-Image-Edit's processor settings are the Qwen2-VL image processor's defaults.
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    return QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                     processor=processor, transformer=transformer)


def load_qwen_edit_files(files: QwenEditFiles, name: str, precision: str, device: torch.device) -> QwenEditHandle:
    """Qwen-Image-Edit-2509 from ComfyUI's split files: fp8 files stay fp8 in memory."""
    from . import split_files as sf

    pipe = qwen_edit_pipe_from_files(files, sf.file_dtypes(precision, device))
    return QwenEditHandle(name=name, folder=str(files.diffusion_model), precision=precision, pipe=pipe, files=files)


@dataclass(frozen=True)
class EditRequest:
    instruction: str
    negative_prompt: str = ""
    steps: int = 8
    true_cfg: float = 1.0
    seed: int = 0
    batch: int = 1
    width: int = 0  # 0: from megapixels and the first image's aspect ratio
    height: int = 0
    megapixels: float = 1.0
    condition_pixels: int = DEFAULT_CONDITION_PIXELS


@runtime_checkable
class ExternalEditPipe(Protocol):
    """A Qwen-Image-Edit pipe that samples outside diffusers: ComfyUI's own MODEL / CLIP / VAE
    (FLENQwenEditFromComfy, built in nodes/comfy_bridge.py). It renders the edits; validation, sizes and meta
    records stay here."""

    name: str
    precision: str
    files: object
    folder: str

    @property
    def size_multiple(self) -> int: ...

    def render(self, jobs: list[EditJob], sizes: list[tuple[int, int]], stack: LoraStack, host: ModelHost,
               on_step: StepCallback | None) -> list[torch.Tensor]:
        """For each job in order, ``request.batch`` images [1, H, W, 3] in 0..1 (seeds seed, seed + 1, …)."""
        ...


def output_size(handle: QwenEditHandle | ExternalEditPipe, request: EditRequest, first: Image.Image) -> tuple[int, int]:
    """Explicit width/height if given, else the pixel budget at the first image's aspect ratio."""
    m = handle.size_multiple
    if request.width or request.height:
        w, h = request.width, request.height
        if not (w and h):
            raise FlenUserError("Give both width and height, or set both to 0 to use the megapixel budget.")
        if w % m or h % m:
            raise FlenUserError(f"This model needs width and height divisible by {m}; got {w}×{h}. "
                                f"Try {w // m * m}×{h // m * m}.")
    else:
        if request.megapixels <= 0:
            raise FlenUserError("megapixels must be above 0 (1.0 is Qwen-Image-Edit's native budget).")
        ratio = first.width / first.height
        area = request.megapixels * 1024 * 1024
        w = max(m, round(math.sqrt(area * ratio) / m) * m)
        h = max(m, round(math.sqrt(area / ratio) / m) * m)
    if min(w, h) < MIN_SIDE or w * h > MAX_PIXELS:
        raise FlenUserError(f"Output size {w}×{h} is outside what the model can take "
                            f"(each side ≥ {MIN_SIDE}, at most {MAX_PIXELS // 1024 // 1024} MP).")
    return w, h


@dataclass
class EditJob:
    """One set of 1–3 input images with its request; ``extra`` is merged into each meta record."""

    images: list[Image.Image]
    request: EditRequest
    extra: dict[str, object] = field(default_factory=dict)


@dataclass
class _Encoded:
    width: int
    height: int
    embeds: torch.Tensor
    mask: torch.Tensor | None
    neg_embeds: torch.Tensor | None
    neg_mask: torch.Tensor | None


def _check_job(handle: QwenEditHandle | ExternalEditPipe, job: EditJob) -> tuple[int, int]:
    if not 1 <= len(job.images) <= 3:
        raise FlenUserError(f"Qwen-Image-Edit-2509 takes 1 to 3 input images; got {len(job.images)}.")
    if not job.request.instruction.strip():
        raise FlenUserError("The edit instruction is empty: say what to change, e.g. 'Rotate the camera "
                            "45 degrees to the left'.")
    return output_size(handle, job.request, job.images[0])


def _encode(pipe, job: EditJob, size: tuple[int, int], device: torch.device) -> _Encoded:
    request = job.request
    cond_images = []
    for img in job.images:
        cw, ch = _dims(request.condition_pixels, img.width / img.height)
        cond_images.append(pipe.image_processor.resize(img, ch, cw))
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt=request.instruction, image=cond_images, device=device)
        neg_embeds = neg_mask = None
        if request.true_cfg > 1.0:
            # diffusers needs a negative prompt for true CFG; a blank one is its documented default.
            neg_embeds, neg_mask = pipe.encode_prompt(prompt=request.negative_prompt or " ",
                                                      image=cond_images, device=device)

    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to("cpu")

    return _Encoded(size[0], size[1], embeds.to("cpu"), cpu(mask), cpu(neg_embeds), cpu(neg_mask))


def _meta(handle, job: EditJob, seed: int, width: int, height: int, stack: LoraStack) -> dict[str, object]:
    request = job.request
    return {
        "kind": "enriched", "instruction": request.instruction,
        "negative_prompt": request.negative_prompt, "seed": seed, "model": handle.name,
        "precision": handle.precision, "loras": stack.describe(), "width": width, "height": height,
        "steps": request.steps, "true_cfg": request.true_cfg, "inputs": len(job.images), **job.extra,
    }


def edit_many(handle: QwenEditHandle | ExternalEditPipe, jobs: list[EditJob], stack: LoraStack, host: ModelHost,
              on_step: StepCallback | None = None) -> tuple[torch.Tensor, list[dict[str, object]]]:
    """Runs every job ``request.batch`` times (seeds seed, seed+1, …), in job order.

    All instructions are encoded first, then all images are denoised: the text encoder (7B) and the
    transformer do not fit a 24 GB card together, so this pays one swap per call instead of two per
    image. Returns [N, H, W, 3] images in 0..1 and one meta record per image.
    """
    if not jobs:
        raise FlenUserError("Nothing to edit: the batch of input images is empty.")
    sizes = [_check_job(handle, job) for job in jobs]
    if isinstance(handle, ExternalEditPipe):
        rendered = handle.render(jobs, sizes, stack, host, on_step)
        return torch.cat(rendered, dim=0), [_meta(handle, job, job.request.seed + b, w, h, stack)
                                            for job, (w, h) in zip(jobs, sizes, strict=True)
                                            for b in range(job.request.batch)]
    pipe = handle.pipe
    handle.adapters.apply(stack)
    total = sum(job.request.batch * job.request.steps for job in jobs)

    device = host.prepare(pipe.text_encoder)
    encoded = [_encode(pipe, job, size, device) for job, size in zip(jobs, sizes, strict=True)]

    out: list[torch.Tensor] = []
    metas: list[dict[str, object]] = []
    done = 0
    for job, enc in zip(jobs, encoded, strict=True):
        request, width, height = job.request, enc.width, enc.height
        with reference_sizes(width * height, request.condition_pixels):
            for b in range(request.batch):
                seed = request.seed + b
                lat_h, lat_w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
                # the reference latents double the tokens; the decode (Wan VAE) follows in the same stage
                working = max(denoise_bytes(lat_h, lat_w, usage_factor=2.5, batch=2 if request.true_cfg > 1 else 1)
                              * 2, vae_decode_bytes(lat_h, lat_w, per_pixel=2000))
                device = host.prepare(pipe.transformer, pipe.vae, working_bytes=working)

                def _step(_pipe, i, _t, kwargs, _done=done, _w=width, _h=height):
                    host.check_interrupt()
                    if on_step is not None:
                        latents = _pipe._unpack_latents(kwargs["latents"], _h, _w, _pipe.vae_scale_factor)
                        on_step(_done + i + 1, total, latents)
                    return {}

                def dev(t: torch.Tensor | None, _d=device) -> torch.Tensor | None:
                    return None if t is None else t.to(_d)

                with torch.no_grad():
                    packed = pipe(
                        image=list(job.images), prompt_embeds=dev(enc.embeds), prompt_embeds_mask=dev(enc.mask),
                        negative_prompt_embeds=dev(enc.neg_embeds), negative_prompt_embeds_mask=dev(enc.neg_mask),
                        true_cfg_scale=request.true_cfg, width=width, height=height,
                        num_inference_steps=request.steps, generator=torch.Generator("cpu").manual_seed(seed),
                        output_type="latent", callback_on_step_end=_step,
                    ).images
                    result = decode_latents(pipe, packed, height, width)
                done += request.steps
                out.append(result.float().clamp(0, 1).permute(0, 2, 3, 1).cpu())
                metas.append(_meta(handle, job, seed, width, height, stack))
    return torch.cat(out, dim=0), metas


def edit(handle: QwenEditHandle | ExternalEditPipe, images: list[Image.Image], request: EditRequest, stack: LoraStack,
         host: ModelHost, on_step: StepCallback | None = None) -> tuple[torch.Tensor, list[dict[str, object]]]:
    """Edits one set of 1–3 input images ``request.batch`` times (see edit_many)."""
    return edit_many(handle, [EditJob(list(images), request)], stack, host, on_step)


def decode_latents(pipe, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """diffusers' own decode of packed Qwen-Image latents → [B, 3, H, W] in 0..1.

    Done here rather than inside the pipeline call so that a decode that does not fit beside the
    transformer (1024² on a 24 GB card) can retry tiled, as ComfyUI's VAE Decode does.
    """
    vae = pipe.vae
    latents = pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor).to(vae.dtype)
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
    latents = latents / inv_std + mean
    try:
        image = vae.decode(latents, return_dict=False)[0][:, :, 0]
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        vae.enable_tiling()
        image = vae.decode(latents, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type="pt")


def _dims(target_area: int, ratio: float) -> tuple[int, int]:
    # Same rounding as diffusers' calculate_dimensions (multiples of 32).
    w = math.sqrt(target_area * ratio)
    h = w / ratio
    return max(32, round(w / 32) * 32), max(32, round(h / 32) * 32)


def check_image_batch(name: str, images: torch.Tensor) -> None:
    """Validates a ComfyUI IMAGE tensor for the editor, with messages that say what to do."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise FlenUserError(f"'{name}' is an empty batch: connect at least one image.")
    channels = images.shape[-1]
    if channels == 4:
        raise FlenUserError(f"'{name}' has an alpha channel (RGBA). Flatten it onto a background first "
                            "(e.g. ComfyUI's 'Join Image with Alpha' / 'Split Image with Alpha').")
    if channels != 3:
        raise FlenUserError(f"'{name}' has {channels} channels; the editor needs RGB images.")
