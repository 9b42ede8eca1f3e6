"""FLENAIToolkitLauncher: trains a LoRA on a FLENwheel dataset with the user's ai-toolkit checkout."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..engines import dataset as ds
from ..engines import workspace
from ..engines.errors import FlenUserError
from ..training import ai_toolkit
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, FROM_PIPE, DatasetType, FluxPipeType, LoraNameType, QwenEditPipeType

QWEN_EXTRAS_NEEDED = ("ai-toolkit reads Qwen-Image-Edit-2509's text encoder, tokenizer, processor and VAE from a "
                      "diffusers folder (extras_name_or_path); it cannot take ComfyUI's qwen_2.5_vl_7b / "
                      "qwen_image_vae files. Put the Qwen-Image-Edit-2509 diffusers folder (Qwen/Qwen-Image-Edit-2509, "
                      "with model_index.json; its transformer/ is not read when a split diffusion-model file is "
                      "connected) in models/diffusers and pick it as base_model, or train on the split files with "
                      "FLEN Train Editor LoRA.")


def checkouts() -> dict:
    return ai_toolkit.find_checkouts(ai_toolkit.configured_sources(bridge.user_directory()))


def checkout_options() -> list[str]:
    return list(checkouts()) or [ai_toolkit.NOT_CONFIGURED]


def checkout_path(name: str):
    """The configured checkout of this name (from the server's configuration, never from the prompt)."""
    found = checkouts()
    if name not in found:
        if not found:
            raise FlenUserError("No ai-toolkit checkout is configured on this server. " + ai_toolkit.configure_hint())
        raise FlenUserError(f"ai-toolkit checkout {name!r} is not configured here; choose one of "
                            f"{', '.join(found)}.")
    return ai_toolkit.validate_checkout(found[name], bridge.client_writable_roots())


def base_model_of(job_kind: str, base_model: str, qwen_pipe, flux_pipe) -> tuple[str, str]:
    """(diffusers folder, single transformer file or "") for the job, from base_model and the connected pipe."""
    pipe, other = (qwen_pipe, flux_pipe) if job_kind == "qwen_image_edit_2509" else (flux_pipe, qwen_pipe)
    if other is not None:
        want = "qwen_pipe" if job_kind == "qwen_image_edit_2509" else "flux_pipe"
        raise FlenUserError(f"job_kind '{job_kind}' trains on the pipe in '{want}', but a loader is connected to "
                            f"the other pipe input; connect it to '{want}' or change job_kind.")
    files = getattr(pipe, "files", None) if pipe is not None else None
    if files is not None and job_kind == "flux":
        raise FlenUserError(ai_toolkit.FLUX_NEEDS)
    if pipe is not None and files is None:
        return str(pipe.folder), ""  # a diffusers-folder loader
    if base_model == FROM_PIPE:
        if pipe is None:
            raise FlenUserError(f"base_model is '{FROM_PIPE}' but nothing is connected to "
                                f"'{'qwen_pipe' if job_kind == 'qwen_image_edit_2509' else 'flux_pipe'}'. Connect a "
                                "loader or pick a diffusers folder.")
        raise FlenUserError(QWEN_EXTRAS_NEEDED)
    folder = str(bridge.diffusers_folder_path(base_model))
    return folder, str(files.diffusion_model) if files is not None else ""


class FLENAIToolkitLauncher(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENAIToolkitLauncher",
            display_name="FLEN AI-Toolkit Launcher",
            category=f"{CATEGORY}/training",
            description="Writes an ai-toolkit job config for a FLENwheel dataset (FLUX character LoRA) or edit-pair "
                        "set (Qwen-Image-Edit-2509 LoRA with control folders) and runs it in your ai-toolkit "
                        "checkout as a child process, after freeing ComfyUI's VRAM. Progress and loss show on the "
                        "node; Cancel stops the child. The LoRA lands in models/loras/flenwheel/<character>/ as "
                        "char_lora_vN / qwen_lora_vN (never overwriting), with provenance in its metadata.",
            inputs=[
                DatasetType.Input("dataset", tooltip="FLEN_DATASET from FLEN Dataset Writer (FLUX job) or FLEN Edit "
                                                     "Pair Writer (Qwen-Image-Edit-2509 job). It is frozen when used."),
                io.Combo.Input("job_kind", options=list(ai_toolkit.JOB_KINDS), default="flux",
                               tooltip="flux: FLUX character LoRA (char_lora_vN) from a character dataset. "
                                       "qwen_image_edit_2509: editor LoRA (qwen_lora_vN) from an edit-pair set."),
                io.Combo.Input("ai_toolkit_folder", options=checkout_options(),
                               tooltip="Which ai-toolkit checkout runs the job: one the server's operator "
                                       f"configured ({ai_toolkit.CHECKOUT_ENV} or user/{ai_toolkit.SETTINGS_FILE}; "
                                       "a prompt can never name a folder, since the checkout's run.py is "
                                       "executed). Its venv/ python is used when present."),
                io.Combo.Input("base_model", options=[*bridge.diffusers_folders(), FROM_PIPE],
                               tooltip="The base model's diffusers folder in models/diffusers (FLUX.1-dev for flux, "
                                       "Qwen-Image-Edit-2509 for qwen_image_edit_2509). With a split-file qwen_pipe "
                                       "connected, ai-toolkit takes the transformer from its diffusion-model file "
                                       "and the text encoder, tokenizer, processor and VAE from this folder."),
                io.Int.Input("steps", default=2000, min=1, max=100000, tooltip="Training steps (500–4000 typical)."),
                io.Int.Input("rank", default=16, min=1, max=256,
                             tooltip="LoRA rank (ai-toolkit network.linear); alpha is set equal to it."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-6, max=1e-2, step=1e-5, round=1e-7,
                               tooltip="Learning rate (ai-toolkit train.lr), e.g. 0.0001."),
                io.String.Input("resolutions", default="512, 768, 1024",
                                tooltip="Training resolutions (bucket sizes), multiples of 64, comma separated."),
                io.Int.Input("sample_every", default=250, min=0, max=100000,
                             tooltip="Sample images every N steps (into the run folder's samples/); 0 disables "
                                     "sampling."),
                io.Int.Input("save_every", default=250, min=1, max=100000,
                             tooltip="Save an intermediate checkpoint every N steps (ai-toolkit keeps the last 4)."),
                io.String.Input("character", default="", optional=True,
                                tooltip="Character whose LoRA folder receives the result "
                                        "(models/loras/flenwheel/<character>/); empty: the dataset's character."),
                QwenEditPipeType.Input("qwen_pipe", optional=True,
                                       tooltip="qwen_image_edit_2509 jobs: train on what this loader names — its "
                                               "diffusers folder, or its ComfyUI diffusion-model file (bf16 or "
                                               "fp8_e4m3fn; the rest still comes from base_model's folder)."),
                FluxPipeType.Input("flux_pipe", optional=True,
                                   tooltip="flux jobs: train on this loader's diffusers folder. ai-toolkit cannot "
                                           "take FLUX's split files (a clear error says so)."),
            ],
            outputs=[LoraNameType.Output(display_name="lora_name",
                                         tooltip="The new LoRA relative to models/loras: connect it to FLEN LoRA "
                                                 "Stack's lora_name."),
                     io.String.Output(display_name="config_path", tooltip="The ai-toolkit job config that was run.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, dataset: dict, job_kind: str, ai_toolkit_folder: str, base_model: str, steps: int, rank: int,
                learning_rate: float, resolutions: str, sample_every: int, save_every: int,
                character: str = "", qwen_pipe=None, flux_pipe=None) -> io.NodeOutput:
        base, transformer_file = base_model_of(job_kind, base_model, qwen_pipe, flux_pipe)
        checkout = checkout_path(ai_toolkit_folder)
        path, owner = ds.version_dir_of(dataset, bridge.output_directory())
        dataset = {**dataset, "path": str(path), "character": owner}
        character = (character or "").strip() or owner
        settings = ai_toolkit.AIToolkitSettings(
            kind=job_kind, base_model=base, transformer_file=transformer_file, character=character, steps=steps,
            rank=rank, learning_rate=float(learning_rate), resolutions=ai_toolkit.parse_resolutions(resolutions),
            sample_every=sample_every, save_every=save_every).validate()
        bridge.free_vram()
        progress = bridge.Progress(steps)
        bridge.progress_text("ai-toolkit: starting…")

        def on_progress(p: ai_toolkit.ProgressLine) -> None:
            progress(min(p.step, p.total), p.total)
            loss = f", loss {p.loss:.4g}" if p.loss is not None else ""
            bridge.progress_text(f"ai-toolkit step {p.step}/{p.total}{loss}")

        result = ai_toolkit.launch(
            dataset, settings, checkout=checkout,
            workspace=workspace.workspace_dir(bridge.output_directory(), settings.character),
            loras_root=bridge.loras_root(), on_progress=on_progress, check_interrupt=bridge.check_interrupt,
            refused=bridge.client_writable_roots(),
            freeze_by=f"FLENAIToolkitLauncher prompt {bridge.current_prompt_id()}")
        summary = result.summary()
        bridge.progress_text(summary)
        return io.NodeOutput(result.lora_name, result.config_path, ui={"text": [summary]})


NODES = [FLENAIToolkitLauncher]
