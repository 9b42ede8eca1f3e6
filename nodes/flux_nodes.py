"""FLENFluxLoader and FLENFluxGenerate: FLUX.1 text-to-image for synthetic data."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..engines import flux_pipeline, prompt_templates
from ..engines.diffusers_folder import PRECISIONS
from ..engines.errors import FlenUserError
from ..engines.lora_stack import LoraStack
from ..engines.split_files import FILE_PRECISIONS
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, FILE_PRECISION_TOOLTIP, FluxPipeType, LoraStackType, MetaType
from .pipeline_cache import PipelineCache

_flux_cache = PipelineCache(flux_pipeline.load_flux)


class FLENFluxLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENFluxLoader",
            display_name="FLEN FLUX Loader",
            category=f"{CATEGORY}/synthesis",
            description="Loads a diffusers FLUX.1 folder from models/diffusers, managed by ComfyUI's VRAM "
                        "manager. Loaded once and reused across runs.",
            inputs=[
                io.Combo.Input("model", options=bridge.diffusers_folders(),
                               tooltip="A diffusers FLUX.1 folder (with model_index.json) in models/diffusers, "
                                       "e.g. black-forest-labs/FLUX.1-dev."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="bf16",
                               tooltip="bf16: full quality. fp8: e4m3 transformer weights (half the memory). "
                                       "nf4: 4-bit bitsandbytes transformer. fp8 and nf4 need an NVIDIA GPU."),
            ],
            outputs=[FluxPipeType.Output(display_name="flux_pipe", tooltip="The loaded FLUX pipeline.")],
        )

    @classmethod
    def execute(cls, model: str, precision: str) -> io.NodeOutput:
        return io.NodeOutput(_flux_cache.get(model, precision))


class FLENFluxFileLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENFluxFileLoader",
            display_name="FLEN FLUX Loader (ComfyUI files)",
            category=f"{CATEGORY}/synthesis",
            description="Loads FLUX.1 from ComfyUI's own split files (diffusion model, CLIP-L, T5-XXL, ae VAE) in "
                        "bf16, fp8_e4m3fn or fp8 scaled; fp8 stays fp8 in memory. Nothing is downloaded: configs "
                        "ship with the pack, the tokenizers with ComfyUI.",
            inputs=[
                io.Combo.Input("diffusion_model", options=bridge.model_files("diffusion_models"),
                               tooltip="models/diffusion_models (or unet): flux1-dev.safetensors or "
                                       "flux1-dev-fp8.safetensors."),
                io.Combo.Input("clip_l", options=bridge.model_files("text_encoders"),
                               tooltip="models/text_encoders (or clip): clip_l.safetensors."),
                io.Combo.Input("t5xxl", options=bridge.model_files("text_encoders"),
                               tooltip="models/text_encoders (or clip): t5xxl_fp16.safetensors or "
                                       "t5xxl_fp8_e4m3fn(_scaled).safetensors."),
                io.Combo.Input("vae", options=bridge.model_files("vae"), tooltip="models/vae: ae.safetensors."),
                io.Combo.Input("precision", options=list(FILE_PRECISIONS), default="auto",
                               tooltip=FILE_PRECISION_TOOLTIP),
            ],
            outputs=[FluxPipeType.Output(display_name="flux_pipe", tooltip="The loaded FLUX pipeline.")],
        )

    @classmethod
    def execute(cls, diffusion_model: str, clip_l: str, t5xxl: str, vae: str, precision: str) -> io.NodeOutput:
        files = flux_pipeline.FluxFiles(
            diffusion_model=bridge.model_file_path("diffusion_models", diffusion_model),
            clip_l=bridge.model_file_path("text_encoders", clip_l),
            t5xxl=bridge.model_file_path("text_encoders", t5xxl),
            vae=bridge.model_file_path("vae", vae),
            clip_tokenizer=bridge.comfy_tokenizer_folder("sd1_tokenizer"),
            t5_tokenizer=bridge.comfy_tokenizer_folder("t5_tokenizer"))
        name = diffusion_model.rsplit("/", 1)[-1].removesuffix(".safetensors")
        return io.NodeOutput(_flux_cache.get_with(
            ("files", files, precision), name,
            lambda: flux_pipeline.load_flux_files(files, name, precision, bridge.compute_device())))


class FLENFluxFromComfy(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENFluxFromComfy",
            display_name="FLEN FLUX from ComfyUI models",
            category=f"{CATEGORY}/synthesis",
            description="Wraps what ComfyUI's own loaders give (Load Diffusion Model, DualCLIPLoader, Load VAE, a "
                        "checkpoint loader, ComfyUI-GGUF's GGUF loaders) into a FLUX pipe for FLEN FLUX Generate and "
                        "FLEN Model Card. Inference only: the trainers need the split-file or diffusers loaders.",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 MODEL from ComfyUI's loaders (UNETLoader, a checkpoint "
                                                 "loader, ComfyUI-GGUF's Unet Loader (GGUF), after any model "
                                                 "patches)."),
                io.Clip.Input("clip", tooltip="clip_l + t5xxl from DualCLIPLoader (type flux) or a checkpoint loader."),
                io.Vae.Input("vae", tooltip="The FLUX VAE (ae.safetensors) from Load VAE."),
                io.String.Input("model_name", default="", optional=True,
                                tooltip="The name recorded in FLEN_META and model cards (e.g. flux1-dev-Q8_0); "
                                        "empty: comfyui-flux."),
            ],
            outputs=[FluxPipeType.Output(display_name="flux_pipe",
                                         tooltip="The FLUX pipe, sampling through ComfyUI's own model.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, model_name: str = "") -> io.NodeOutput:
        return io.NodeOutput(bridge.native_flux_pipe(model, clip, vae, (model_name or "").strip()))


class FLENFluxGenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENFluxGenerate",
            display_name="FLEN FLUX Generate",
            category=f"{CATEGORY}/synthesis",
            description="FLUX text-to-image under a LoRA stack: one image per prompt line × batch, "
                        "with step previews. Returns the images and one FLEN_META record per image.",
            inputs=[
                FluxPipeType.Input("flux_pipe", tooltip="From FLEN FLUX Loader (a diffusers folder or ComfyUI's "
                                                        "split files) or FLEN FLUX from ComfyUI models."),
                io.String.Input("prompts", multiline=True, default="a photo of ohwx_char person, neutral expression",
                                tooltip="One prompt per line; empty lines are ignored. {token} is replaced by "
                                        "instance_token. With variations > 0 the lines are templates: {expression}, "
                                        "{angle}, {pose} and {setting} are filled in."),
                io.Int.Input("width", default=1024, min=64, max=4096, step=16,
                             tooltip="Image width in pixels (a multiple of 16)."),
                io.Int.Input("height", default=1024, min=64, max=4096, step=16,
                             tooltip="Image height in pixels (a multiple of 16)."),
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="Denoising steps."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=30.0, step=0.1,
                               tooltip="FLUX distilled guidance (3–4 for FLUX.1-dev)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the first image; image k of the run uses seed + k."),
                io.Int.Input("batch", default=1, min=1, max=64, tooltip="Images per prompt line."),
                LoraStackType.Input("lora_stack", optional=True,
                                    tooltip="LoRAs to apply (from FLEN LoRA Stack); none runs the base model."),
                io.String.Input("instance_token", default="", optional=True,
                                tooltip="The character LoRA's trigger word (e.g. ohwx_char); replaces {token} in "
                                        "the prompts."),
                io.Int.Input("variations", default=0, min=0, max=prompt_templates.MAX_PROMPTS, optional=True,
                             tooltip="0: each line is one prompt. N > 0: N prompts made from the lines as templates "
                                     "(expressions × angles × poses × settings, seeded by seed), e.g. 200 varied "
                                     "images of the character."),
                io.String.Input("template_values", multiline=True, default="", optional=True,
                                tooltip="Optional lists for the template slots, one per line, e.g. 'setting: beach, "
                                        "office, forest'. Slots not listed use the built-in values."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The generated images."),
                     MetaType.Output(display_name="meta", tooltip="One record per image: prompt, seed, LoRAs, model.")],
        )

    @classmethod
    def execute(cls, flux_pipe: flux_pipeline.FluxHandle, prompts: str, width: int, height: int, steps: int,
                guidance: float, seed: int, batch: int, lora_stack: LoraStack | None = None,
                instance_token: str = "", variations: int = 0, template_values: str = "") -> io.NodeOutput:
        lines = tuple(line.strip() for line in prompts.splitlines() if line.strip())
        if not lines:
            raise FlenUserError("FLEN FLUX Generate: the prompt box is empty; write at least one prompt line.")
        if variations:
            lines = tuple(prompt_templates.expand_templates(
                lines, variations, seed, prompt_templates.parse_slot_values(template_values or "")))
        lines = tuple(prompt_templates.substitute_token(line, instance_token or "") for line in lines)
        request = flux_pipeline.FluxRequest(prompts=lines, width=width, height=height, steps=steps,
                                            guidance=guidance, seed=seed, batch=batch)
        progress = bridge.Progress(len(lines) * batch * steps, latent_format="flux")
        images, metas = flux_pipeline.generate(flux_pipe, request, lora_stack or LoraStack(),
                                               bridge.ComfyModelHost(), on_step=progress)
        return io.NodeOutput(images, metas)


NODES = [FLENFluxLoader, FLENFluxFileLoader, FLENFluxFromComfy, FLENFluxGenerate]
