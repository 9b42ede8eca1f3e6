"""FLENAIToolkitLauncher: trains a LoRA on a FLENwheel dataset with the user's ai-toolkit checkout."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..engines import dataset as ds
from ..engines import review_store
from ..engines.errors import FlenUserError
from ..training import ai_toolkit
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, DatasetType, LoraNameType


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
                io.Combo.Input("base_model", options=bridge.diffusers_folders(),
                               tooltip="The base model's diffusers folder in models/diffusers (FLUX.1-dev for flux, "
                                       "Qwen-Image-Edit-2509 for qwen_image_edit_2509)."),
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
                character: str = "") -> io.NodeOutput:
        checkout = checkout_path(ai_toolkit_folder)
        path, owner = ds.version_dir_of(dataset, bridge.output_directory())
        dataset = {**dataset, "path": str(path), "character": owner}
        character = (character or "").strip() or owner
        settings = ai_toolkit.AIToolkitSettings(
            kind=job_kind, base_model=bridge.diffusers_folder_path(base_model), character=character, steps=steps,
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
            workspace=review_store.workspace_root(bridge.output_directory()) / settings.character,
            loras_root=bridge.loras_root(), on_progress=on_progress, check_interrupt=bridge.check_interrupt,
            refused=bridge.client_writable_roots(),
            freeze_by=f"FLENAIToolkitLauncher prompt {bridge.current_prompt_id()}")
        summary = result.summary()
        bridge.progress_text(summary)
        return io.NodeOutput(result.lora_name, result.config_path, ui={"text": [summary]})


NODES = [FLENAIToolkitLauncher]
