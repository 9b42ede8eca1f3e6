"""FLENLoraStack: a chainable list of LoRAs with a strength and an on/off each."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..engines.lora_stack import LoraEntry, LoraStack
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, LoraStackType


class FLENLoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENLoraStack",
            display_name="FLEN LoRA Stack",
            category=f"{CATEGORY}/loras",
            description="Adds one LoRA to a stack. Chain several; the same stack drives FLENwheel's "
                        "Qwen edit and FLUX nodes, and FLENApplyLoraStack for ComfyUI's native models.",
            inputs=[
                io.Combo.Input("lora_name", options=bridge.lora_names(),
                               tooltip="A LoRA file from ComfyUI's models/loras folder (safetensors)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="How strongly the LoRA applies. 0 keeps it loaded but without effect; "
                                       "negative values push away from what it learned."),
                io.Boolean.Input("enabled", default=True,
                                 tooltip="Off leaves the entry in the stack but skips it, without rewiring."),
                LoraStackType.Input("lora_stack", optional=True,
                                    tooltip="An upstream stack to extend; leave empty to start a new one."),
            ],
            outputs=[LoraStackType.Output(display_name="lora_stack",
                                          tooltip="The upstream stack plus this LoRA.")],
        )

    @classmethod
    def execute(cls, lora_name: str, strength: float, enabled: bool,
                lora_stack: LoraStack | None = None) -> io.NodeOutput:
        base = lora_stack if lora_stack is not None else LoraStack()
        # An entry that is off is never read, so its file need not exist yet: the shipped workflows name the
        # editor LoRA qwen_lora_v1, switched off, before flywheel 2 has trained it.
        path = bridge.lora_path(lora_name) if enabled else bridge.find_lora_path(lora_name) or ""
        entry = LoraEntry(name=lora_name, path=path, strength=float(strength), enabled=bool(enabled))
        return io.NodeOutput(base.extended(entry))


class FLENApplyLoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENApplyLoraStack",
            display_name="FLEN Apply LoRA Stack",
            category=f"{CATEGORY}/loras",
            description="Applies a FLEN LoRA stack to ComfyUI's native MODEL through ComfyUI's own LoRA loading "
                        "(the same result as chaining LoraLoaderModelOnly nodes), for ComfyUI-format checkpoints.",
            inputs=[
                io.Model.Input("model", tooltip="A ComfyUI MODEL (e.g. from Load Diffusion Model)."),
                LoraStackType.Input("lora_stack", tooltip="The stack from FLEN LoRA Stack nodes; entries that "
                                                          "are off are skipped."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the stack's LoRAs patched in.")],
        )

    @classmethod
    def execute(cls, model, lora_stack: LoraStack) -> io.NodeOutput:
        for entry in lora_stack.active():
            model = bridge.apply_lora_to_native_model(model, entry.path, entry.name, entry.strength)
        return io.NodeOutput(model)


NODES = [FLENLoraStack, FLENApplyLoraStack]
