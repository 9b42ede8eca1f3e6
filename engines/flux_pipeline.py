"""FLUX.1 text-to-image on a diffusers folder, under a LoRA stack, in three hosted stages.

The pipeline is split into encode (text encoders), denoise (transformer) and decode (VAE) so
that the model host only needs one stage's weights on the GPU at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .diffusers_folder import load_pipeline
from .errors import FlenUserError
from .flow_schedule import StepCallback
from .lora_adapters import PipelineHandle
from .lora_stack import LoraStack
from .model_host import ModelHost, denoise_bytes, vae_decode_bytes

FLUX_CLASSES = ("FluxPipeline",)


@dataclass
class FluxHandle(PipelineHandle):
    """A loaded FluxPipeline."""

    architecture = "flux"
    module_names = ("text_encoder", "text_encoder_2", "transformer", "vae")

    @property
    def size_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor) * 2


def load_flux(folder: str | Path, name: str, precision: str, device: torch.device) -> FluxHandle:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = load_pipeline(FluxPipeline, FluxTransformer2DModel, folder, FLUX_CLASSES, precision, device,
                         FluxHandle.module_names)
    return FluxHandle(name=name, folder=str(folder), precision=precision, pipe=pipe)


@dataclass(frozen=True)
class FluxFiles:
    """ComfyUI's split files of FLUX.1 (full paths) and ComfyUI's bundled tokenizer folders."""

    diffusion_model: str
    clip_l: str
    t5xxl: str
    vae: str
    clip_tokenizer: str | None = None
    t5_tokenizer: str | None = None


def flux_pipe_from_files(files: FluxFiles, dtypes, with_transformer: bool = True):
    """A FluxPipeline from ComfyUI's split files (see engines/split_files.py); without the transformer for the
    trainer's encoding pass. fp8 files stay fp8 in memory."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from . import split_files as sf

    dm_info = sf.expect(files.diffusion_model, ("flux_transformer", "flux_transformer_diffusers"), "diffusion_models",
                        "a FLUX.1 diffusion model (e.g. flux1-dev.safetensors)")
    transformer = sf.load_flux_transformer(files.diffusion_model, dtypes) if with_transformer else None
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(sf.config_for(dm_info, sf.FLUX_CONFIGS, "scheduler"))
    clip = sf.load_clip_l(files.clip_l, dtypes)
    t5 = sf.load_t5(files.t5xxl, dtypes)
    vae = sf.load_flux_vae(files.vae, dtypes)
    tokenizer = sf.clip_tokenizer(sf.tokenizer_folder(sf.inspect_file(files.clip_l), files.clip_tokenizer, "CLIP"))
    tokenizer_2 = sf.t5_tokenizer(sf.tokenizer_folder(sf.inspect_file(files.t5xxl), files.t5_tokenizer, "T5"))
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=tokenizer_2, transformer=transformer)


def load_flux_files(files: FluxFiles, name: str, precision: str, device: torch.device) -> FluxHandle:
    """FLUX.1 from ComfyUI's split files: fp8 files stay fp8 in memory."""
    from . import split_files as sf

    pipe = flux_pipe_from_files(files, sf.file_dtypes(precision, device))
    return FluxHandle(name=name, folder=str(files.diffusion_model), precision=precision, pipe=pipe, files=files)


@dataclass(frozen=True)
class FluxRequest:
    prompts: tuple[str, ...]
    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 3.5
    seed: int = 0
    batch: int = 1
    max_sequence_length: int = 512


@dataclass(frozen=True)
class FluxJob:
    """One image: its prompt and seed; ``extra`` is merged into its meta record."""

    prompt: str
    seed: int
    extra: dict = field(default_factory=dict)


@runtime_checkable
class ExternalFluxPipe(Protocol):
    """A FLUX pipe that samples outside diffusers: ComfyUI's own MODEL / CLIP / VAE (FLENFluxFromComfy, built in
    nodes/comfy_bridge.py). It renders the images; validation and meta records stay here."""

    name: str
    precision: str
    files: object
    folder: str

    @property
    def size_multiple(self) -> int: ...

    def render(self, jobs: list[FluxJob], request: FluxRequest, stack: LoraStack, host: ModelHost,
               on_step: StepCallback | None) -> list[torch.Tensor]:
        """One [1, H, W, 3] image in 0..1 per job, in job order."""
        ...


def text_length(pipe, requested: int) -> int:
    """The T5 sequence length prompts are encoded at: the requested one, but no longer than the model's tokenizer
    says it reads (FLUX.1's T5 reads 512; a tiny world's model fewer, and its LoRAs are trained at that length)."""
    tokenizer = getattr(pipe, "tokenizer_2", None)
    limit = getattr(tokenizer, "model_max_length", None)
    return min(int(requested), int(limit)) if isinstance(limit, int) and limit > 0 else int(requested)


def _meta(handle, job: FluxJob, request: FluxRequest, stack: LoraStack) -> dict[str, object]:
    return {
        "kind": "synthetic", "prompt": job.prompt, "seed": job.seed, "model": handle.name,
        "precision": handle.precision, "loras": stack.describe(),
        "width": request.width, "height": request.height, "steps": request.steps,
        "guidance": request.guidance, **job.extra,
    }


def generate_many(handle: FluxHandle | ExternalFluxPipe, jobs: list[FluxJob], request: FluxRequest, stack: LoraStack,
                  host: ModelHost, on_step: StepCallback | None = None) -> tuple[torch.Tensor, list[dict[str, object]]]:
    """One image per job at ``request``'s size, steps and guidance (its prompts, seed and batch are unused).

    Three stages, each paid once per call: all prompts are encoded (CLIP + T5), then all images are
    denoised (transformer), then all are decoded (VAE) — on a 24 GB card T5 and the transformer do not
    both fit, so a model card of 18 cells swaps twice instead of 36 times.
    """
    if not jobs:
        raise FlenUserError("No prompt given: write at least one non-empty line.")
    multiple = handle.size_multiple
    if request.width % multiple or request.height % multiple:
        raise FlenUserError(f"FLUX needs width and height divisible by {multiple}; got "
                            f"{request.width}×{request.height}.")
    if isinstance(handle, ExternalFluxPipe):
        rendered = handle.render(jobs, request, stack, host, on_step)
        return torch.cat(rendered, dim=0), [_meta(handle, job, request, stack) for job in jobs]
    pipe = handle.pipe
    handle.adapters.apply(stack)
    total = len(jobs) * request.steps
    msl = text_length(pipe, request.max_sequence_length)

    device = host.prepare(pipe.text_encoder, pipe.text_encoder_2)
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for job in jobs:
            if job.prompt not in encoded:
                embeds, pooled, _ = pipe.encode_prompt(
                    prompt=job.prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                    max_sequence_length=msl)
                encoded[job.prompt] = (embeds.cpu(), pooled.cpu())

    latents_out: list[torch.Tensor] = []
    for k, job in enumerate(jobs):
        lat_h, lat_w = request.height // pipe.vae_scale_factor, request.width // pipe.vae_scale_factor
        device = host.prepare(pipe.transformer, working_bytes=denoise_bytes(lat_h, lat_w, usage_factor=2.8))
        embeds, pooled = encoded[job.prompt]

        def _step(_pipe, i, _t, kwargs, _done=k * request.steps):
            host.check_interrupt()
            if on_step is not None:
                latents = _pipe._unpack_latents(kwargs["latents"], request.height, request.width,
                                                _pipe.vae_scale_factor)
                on_step(_done + i + 1, total, latents)
            return {}

        with torch.no_grad():
            packed = pipe(
                prompt_embeds=embeds.to(device), pooled_prompt_embeds=pooled.to(device),
                width=request.width, height=request.height, num_inference_steps=request.steps,
                guidance_scale=request.guidance, generator=torch.Generator("cpu").manual_seed(job.seed),
                output_type="latent", callback_on_step_end=_step, max_sequence_length=msl,
            ).images
        latents_out.append(pipe._unpack_latents(packed, request.height, request.width, pipe.vae_scale_factor).cpu())

    device = host.prepare(pipe.vae, working_bytes=vae_decode_bytes(request.height // pipe.vae_scale_factor,
                                                                   request.width // pipe.vae_scale_factor))
    images: list[torch.Tensor] = []
    metas: list[dict[str, object]] = []
    with torch.no_grad():
        for job, latents in zip(jobs, latents_out, strict=True):
            latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            decoded = pipe.vae.decode(latents.to(device, pipe.vae.dtype), return_dict=False)[0]
            images.append(((decoded.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu())
            metas.append(_meta(handle, job, request, stack))
    return torch.cat(images, dim=0), metas


def generate(handle: FluxHandle | ExternalFluxPipe, request: FluxRequest, stack: LoraStack, host: ModelHost,
             on_step: StepCallback | None = None) -> tuple[torch.Tensor, list[dict[str, object]]]:
    """Images for every prompt × batch (image k of the run uses seed + k); see generate_many."""
    if not request.prompts:
        raise FlenUserError("No prompt given: write at least one non-empty line.")
    jobs = [FluxJob(prompt, request.seed + p * request.batch + b)
            for p, prompt in enumerate(request.prompts) for b in range(request.batch)]
    return generate_many(handle, jobs, request, stack, host, on_step)
