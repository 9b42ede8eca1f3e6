"""FLENQwenEditLoader, FLENQwenEdit and FLENAngleSweep: Qwen-Image-Edit-2509 enrichment."""

from __future__ import annotations

import dataclasses

import torch
from comfy_api.v0_0_2 import io

from ..engines import qwen_edit
from ..engines.angle_catalogue import LANGUAGES, PRESETS, sweep_lines
from ..engines.diffusers_folder import PRECISIONS
from ..engines.errors import FlenUserError
from ..engines.image_arrays import to_pil
from ..engines.lora_stack import LoraStack
from ..engines.split_files import FILE_PRECISIONS
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, FILE_PRECISION_TOOLTIP, LoraStackType, MetaType, QwenEditPipeType
from .pipeline_cache import PipelineCache

_qwen_cache = PipelineCache(qwen_edit.load_qwen_edit)


def _edit_settings_inputs(default_steps: int = 40, default_cfg: float = 4.0) -> list:
    """Inputs shared by the single edit and the sweep."""
    return [
        io.String.Input("negative_prompt", multiline=True, default="",
                        tooltip="What to avoid; used only when true_cfg > 1."),
        io.Int.Input("steps", default=default_steps, min=1, max=200,
                     tooltip="Denoising steps: 40 for the base model, 4–8 with a Lightning LoRA."),
        io.Float.Input("true_cfg", default=default_cfg, min=1.0, max=20.0, step=0.1,
                       tooltip="True classifier-free guidance; 1 turns it off (twice as fast, use with "
                               "Lightning LoRAs), 4 is the base model's default."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=True,
                     tooltip="Seed of the first image; later images use seed + 1, + 2, …"),
        io.Float.Input("megapixels", default=1.0, min=0.001, max=16.0, step=0.05,
                       tooltip="Output pixel budget at the first image's aspect ratio (1.0 ≈ 1024×1024). "
                               "Ignored when width and height are set."),
        io.Int.Input("width", default=0, min=0, max=4096, step=16,
                     tooltip="Exact output width (multiple of 16); 0 uses the megapixel budget."),
        io.Int.Input("height", default=0, min=0, max=4096, step=16,
                     tooltip="Exact output height (multiple of 16); 0 uses the megapixel budget."),
        LoraStackType.Input("lora_stack", optional=True,
                            tooltip="LoRAs for the editor (angles, face preservation, qwen_lora_vN…) "
                                    "from FLEN LoRA Stack."),
    ]


def _request(instruction: str, negative_prompt: str, steps: int, true_cfg: float, seed: int,
             megapixels: float, width: int, height: int, batch: int = 1) -> qwen_edit.EditRequest:
    return qwen_edit.EditRequest(instruction=instruction, negative_prompt=negative_prompt, steps=steps,
                                 true_cfg=true_cfg, seed=seed, batch=batch, width=width, height=height,
                                 megapixels=megapixels)


class FLENQwenEditLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENQwenEditLoader",
            display_name="FLEN Qwen Edit Loader",
            category=f"{CATEGORY}/enrich",
            description="Loads a diffusers Qwen-Image-Edit-2509 folder (QwenImageEditPlusPipeline) from "
                        "models/diffusers, managed by ComfyUI's VRAM manager; loaded once, reused across runs.",
            inputs=[
                io.Combo.Input("model", options=bridge.diffusers_folders(),
                               tooltip="A diffusers Qwen-Image-Edit-2509 folder (with model_index.json) "
                                       "in models/diffusers."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="fp8",
                               tooltip="fp8 (default): e4m3 transformer weights, what fits a 24 GB card. bf16: "
                                       "full quality (≈41 GB transformer, needs offloading on 24 GB). nf4: 4-bit "
                                       "bitsandbytes transformer. fp8 and nf4 need an NVIDIA GPU (fp32: CPU "
                                       "tests)."),
            ],
            outputs=[QwenEditPipeType.Output(display_name="qwen_pipe", tooltip="The loaded editor.")],
        )

    @classmethod
    def execute(cls, model: str, precision: str) -> io.NodeOutput:
        return io.NodeOutput(_qwen_cache.get(model, precision))


class FLENQwenEditFileLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENQwenEditFileLoader",
            display_name="FLEN Qwen Edit Loader (ComfyUI files)",
            category=f"{CATEGORY}/enrich",
            description="Loads Qwen-Image-Edit-2509 from ComfyUI's own split files (diffusion model, Qwen2.5-VL "
                        "text encoder, VAE) in bf16, fp8_e4m3fn or fp8 scaled; fp8 stays fp8 in memory. Nothing is "
                        "downloaded: configs ship with the pack, the tokenizer with ComfyUI.",
            inputs=[
                io.Combo.Input("diffusion_model", options=bridge.model_files("diffusion_models"),
                               tooltip="models/diffusion_models (or unet): qwen_image_edit_2509_fp8_e4m3fn.safetensors "
                                       "or qwen_image_edit_2509_bf16.safetensors."),
                io.Combo.Input("text_encoder", options=bridge.model_files("text_encoders"),
                               tooltip="models/text_encoders (or clip): qwen_2.5_vl_7b_fp8_scaled.safetensors or "
                                       "qwen_2.5_vl_7b.safetensors."),
                io.Combo.Input("vae", options=bridge.model_files("vae"),
                               tooltip="models/vae: qwen_image_vae.safetensors."),
                io.Combo.Input("precision", options=list(FILE_PRECISIONS), default="auto",
                               tooltip=FILE_PRECISION_TOOLTIP),
            ],
            outputs=[QwenEditPipeType.Output(display_name="qwen_pipe", tooltip="The loaded editor.")],
        )

    @classmethod
    def execute(cls, diffusion_model: str, text_encoder: str, vae: str, precision: str) -> io.NodeOutput:
        files = qwen_edit.QwenEditFiles(
            diffusion_model=bridge.model_file_path("diffusion_models", diffusion_model),
            text_encoder=bridge.model_file_path("text_encoders", text_encoder),
            vae=bridge.model_file_path("vae", vae),
            tokenizer=bridge.comfy_tokenizer_folder("qwen25_tokenizer"))
        name = diffusion_model.rsplit("/", 1)[-1].removesuffix(".safetensors")
        return io.NodeOutput(_qwen_cache.get_with(
            ("files", files, precision), name,
            lambda: qwen_edit.load_qwen_edit_files(files, name, precision, bridge.compute_device())))


class FLENQwenEditFromComfy(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENQwenEditFromComfy",
            display_name="FLEN Qwen Edit from ComfyUI models",
            category=f"{CATEGORY}/enrich",
            description="Wraps what ComfyUI's own loaders give (Load Diffusion Model, Load CLIP type qwen_image, Load "
                        "VAE, ComfyUI-GGUF's GGUF loaders) into a Qwen-Image-Edit-2509 pipe for FLEN Qwen Edit and "
                        "FLEN Angle Sweep. Inference only: the editor trainer needs the split-file or diffusers "
                        "loaders.",
            inputs=[
                io.Model.Input("model", tooltip="A Qwen-Image-Edit-2509 MODEL from ComfyUI's loaders (UNETLoader, "
                                                 "ComfyUI-GGUF's Unet Loader (GGUF), after any model patches)."),
                io.Clip.Input("clip", tooltip="Qwen2.5-VL 7B from Load CLIP, type qwen_image "
                                              "(qwen_2.5_vl_7b_fp8_scaled.safetensors or the bf16 file)."),
                io.Vae.Input("vae", tooltip="The Qwen-Image VAE (qwen_image_vae.safetensors) from Load VAE."),
                io.String.Input("model_name", default="", optional=True,
                                tooltip="The name recorded in FLEN_META (e.g. qwen-image-edit-2509-Q4_K_M); empty: "
                                        "comfyui-qwen-image-edit."),
            ],
            outputs=[QwenEditPipeType.Output(display_name="qwen_pipe",
                                             tooltip="The editor, sampling through ComfyUI's own model.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, model_name: str = "") -> io.NodeOutput:
        return io.NodeOutput(bridge.native_qwen_edit_pipe(model, clip, vae, (model_name or "").strip()))


def _sources(images: torch.Tensor, name: str) -> list:
    qwen_edit.check_image_batch(name, images)
    return [to_pil(img) for img in images]


class FLENQwenEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENQwenEdit",
            display_name="FLEN Qwen Edit",
            category=f"{CATEGORY}/enrich",
            description="Edits 1–3 input images with an instruction under a LoRA stack. Each image of "
                        "image1's batch is edited separately (image2/3 are shared or matched by index).",
            inputs=[
                QwenEditPipeType.Input("qwen_pipe", tooltip="From FLEN Qwen Edit Loader (a diffusers folder or "
                                                            "ComfyUI's split files) or FLEN Qwen Edit from "
                                                            "ComfyUI models."),
                io.Image.Input("image1", tooltip="The image to edit (a batch edits each image in turn)."),
                io.String.Input("instruction", multiline=True, default="将镜头向左旋转45度",
                                tooltip="What to change, in Chinese or English."),
                *_edit_settings_inputs(),
                io.Int.Input("batch", default=1, min=1, max=64, tooltip="Edits per input image (seeds differ)."),
                io.Image.Input("image2", optional=True,
                               tooltip="Optional second image (e.g. a face reference or a pose)."),
                io.Image.Input("image3", optional=True, tooltip="Optional third image."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The edited images."),
                     MetaType.Output(display_name="meta",
                                     tooltip="One record per image: instruction, seed, LoRAs, model, size.")],
        )

    @classmethod
    def execute(cls, qwen_pipe: qwen_edit.QwenEditHandle, image1: torch.Tensor, instruction: str,
                negative_prompt: str, steps: int, true_cfg: float, seed: int, megapixels: float, width: int,
                height: int, batch: int, lora_stack: LoraStack | None = None, image2: torch.Tensor | None = None,
                image3: torch.Tensor | None = None) -> io.NodeOutput:
        firsts = _sources(image1, "image1")
        extras = [(_sources(t, n), n) for t, n in ((image2, "image2"), (image3, "image3")) if t is not None]
        for imgs, n in extras:
            if len(imgs) not in (1, len(firsts)):
                raise FlenUserError(f"'{n}' has {len(imgs)} images but image1 has {len(firsts)}: give {n} one "
                                    f"image (shared by all) or exactly {len(firsts)} (matched by index).")
        base = _request(instruction, negative_prompt, steps, true_cfg, seed, megapixels, width, height, batch)
        jobs = [qwen_edit.EditJob([first] + [imgs[i if len(imgs) > 1 else 0] for imgs, _ in extras],
                                  dataclasses.replace(base, seed=seed + i * batch), {"source_index": i})
                for i, first in enumerate(firsts)]
        progress = bridge.Progress(len(firsts) * batch * steps, latent_format="qwen_image")
        images, metas = qwen_edit.edit_many(qwen_pipe, jobs, lora_stack or LoraStack(), bridge.ComfyModelHost(),
                                            on_step=progress)
        return io.NodeOutput(images, metas)


class FLENAngleSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENAngleSweep",
            display_name="FLEN Angle Sweep",
            category=f"{CATEGORY}/enrich",
            description="Runs the edit for every source image × camera angle / expression of a preset plus "
                        "custom lines; returns a labelled batch and the prompt list for native edit nodes.",
            inputs=[
                QwenEditPipeType.Input("qwen_pipe", tooltip="From FLEN Qwen Edit Loader (a diffusers folder or "
                                                            "ComfyUI's split files) or FLEN Qwen Edit from "
                                                            "ComfyUI models."),
                io.Image.Input("images", tooltip="Source photos; each is swept through every line."),
                io.Combo.Input("preset", options=list(PRESETS), default="model-card head angles",
                               tooltip="A named set of camera angles / expressions (see the node's doc page)."),
                io.String.Input("custom_lines", multiline=True, default="",
                                tooltip="Extra instructions, one per line: 'label: instruction' or just the "
                                        "instruction. Lines starting with # are ignored."),
                io.Combo.Input("language", options=list(LANGUAGES), default="zh+en",
                               tooltip="Instruction language for catalogue lines. The Multiple-angles LoRA was "
                                       "trained on the Chinese phrasing; zh+en gives both."),
                io.Float.Input("lora_strength_scale", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="Multiplies every strength of the LoRA stack for this sweep only."),
                *_edit_settings_inputs(default_steps=8, default_cfg=1.0),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="All edits: source 1's lines, then source 2's…"),
                MetaType.Output(display_name="meta", tooltip="One record per image, with its angle label."),
                io.String.Output(display_name="prompts", is_output_list=True,
                                 tooltip="One instruction per line of the sweep, for ComfyUI's native edit nodes."),
                io.String.Output(display_name="labels", is_output_list=True,
                                 tooltip="The label of each line of the sweep."),
            ],
        )

    @classmethod
    def execute(cls, qwen_pipe: qwen_edit.QwenEditHandle, images: torch.Tensor, preset: str, custom_lines: str,
                language: str, lora_strength_scale: float, negative_prompt: str, steps: int, true_cfg: float,
                seed: int, megapixels: float, width: int, height: int,
                lora_stack: LoraStack | None = None) -> io.NodeOutput:
        lines = sweep_lines(preset, custom_lines)
        sources = _sources(images, "images")
        stack = (lora_stack or LoraStack()).scaled(lora_strength_scale)
        prompts = [line.instruction(language) for line in lines]
        jobs = [
            qwen_edit.EditJob([source], _request(prompt, negative_prompt, steps, true_cfg,
                                                 seed + i * len(lines) + j, megapixels, width, height),
                              {"source_index": i, "label": line.label, "label_kind": line.kind, "preset": preset})
            for i, source in enumerate(sources)
            for j, (line, prompt) in enumerate(zip(lines, prompts, strict=True))
        ]
        progress = bridge.Progress(len(jobs) * steps, latent_format="qwen_image")
        images, metas = qwen_edit.edit_many(qwen_pipe, jobs, stack, bridge.ComfyModelHost(), on_step=progress)
        return io.NodeOutput(images, metas, prompts, [line.label for line in lines])


NODES = [FLENQwenEditLoader, FLENQwenEditFileLoader, FLENQwenEditFromComfy, FLENQwenEdit, FLENAngleSweep]
