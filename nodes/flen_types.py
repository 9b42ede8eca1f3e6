"""The pack's custom socket types (DESIGN.md: node contract)."""

from comfy_api.v0_0_2 import io

LoraStackType = io.Custom("FLEN_LORA_STACK")
FluxPipeType = io.Custom("FLEN_FLUX_PIPE")
QwenEditPipeType = io.Custom("FLEN_QWEN_EDIT_PIPE")
MetaType = io.Custom("FLEN_META")  # a list with one dict per image of the IMAGE batch beside it
IdentityType = io.Custom("FLEN_IDENTITY")
DatasetType = io.Custom("FLEN_DATASET")

CATEGORY = "FLENwheel"
