"""The pack's custom socket types (DESIGN.md: node contract)."""

from comfy_api.v0_0_2 import io

LoraStackType = io.Custom("FLEN_LORA_STACK")
FluxPipeType = io.Custom("FLEN_FLUX_PIPE")
QwenEditPipeType = io.Custom("FLEN_QWEN_EDIT_PIPE")
MetaType = io.Custom("FLEN_META")  # a list with one dict per image of the IMAGE batch beside it
IdentityType = io.Custom("FLEN_IDENTITY")
DatasetType = io.Custom("FLEN_DATASET")
ModelCardType = io.Custom("FLEN_MODEL_CARD")


class _LoraNameType(str):
    """The socket type of the LoRA-name output: a STRING that also connects to a LoRA combo input such as
    FLEN LoRA Stack's ``lora_name`` (ComfyUI compares socket types with ``!=``; a combo's type is "COMBO"
    or its list of options, which a new LoRA is not in yet)."""

    def __ne__(self, other: object) -> bool:
        if isinstance(other, list) or other in ("COMBO", "*"):
            return False
        if not isinstance(other, str):
            return True
        return "STRING" not in {t.strip() for t in other.split(",")}

    __hash__ = str.__hash__


LoraNameType = io.Custom("STRING")
LoraNameType.io_type = _LoraNameType("STRING")  # io.Custom wraps the name in its own str type

CATEGORY = "FLENwheel"

# The `model` / `base_model` choice of the trainer nodes that defers to their optional pipe input.
FROM_PIPE = "(the connected base pipe)"

# The precision input of both split-file loaders (FLENQwenEditFileLoader, FLENFluxFileLoader).
FILE_PRECISION_TOOLTIP = ("auto: as the files store it — fp8 files stay fp8 (e4m3, with ComfyUI's scale for 'scaled' "
                          "files), 16-bit files become bf16 on a GPU (fp32 on the CPU). bf16 / fp32: that compute "
                          "dtype (fp32 dequantises fp8 files). fp8: quantise a bf16 diffusion model to e4m3 while "
                          "loading (half the memory).")

# The `character` input of every node that reads or writes a character's workspace (engines/workspace.py).
CHARACTER_TOOLTIP = ("The character's workspace under output/flenwheel/<character>/: 1–64 letters, digits, "
                     "'_' or '-'.")
