"""Checks and loads diffusers pipeline folders from models/diffusers, with a precision choice."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import FlenUserError

PRECISIONS = ("bf16", "fp32", "nf4", "fp8")  # the diffusers loaders and the trainers


def read_model_index(folder: str | Path, expected_classes: tuple[str, ...]) -> dict[str, object]:
    """Validates that ``folder`` is a diffusers pipeline folder of one of ``expected_classes``."""
    p = Path(folder)
    if not p.is_dir():
        raise FlenUserError(
            f"Model folder '{p}' does not exist. Put a diffusers folder (with model_index.json) "
            "under ComfyUI's models/diffusers/ and pick it in the loader."
        )
    index_file = p / "model_index.json"
    if not index_file.is_file():
        raise FlenUserError(
            f"'{p.name}' is not a diffusers pipeline folder: it has no model_index.json. "
            "Single-file checkpoints belong in models/diffusion_models and load with ComfyUI's "
            "own loaders; this loader needs the diffusers folder layout."
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FlenUserError(f"'{index_file}' is not valid JSON ({exc}); re-download the model folder.") from exc
    cls = index.get("_class_name")
    if cls not in expected_classes:
        raise FlenUserError(
            f"'{p.name}' is a {cls} folder, but this loader needs one of: {', '.join(expected_classes)}."
        )
    return index


def torch_dtype_for(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for a precision choice; quantised choices need CUDA."""
    if precision not in PRECISIONS:
        raise FlenUserError(f"Unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    if precision in ("fp8", "nf4") and device.type != "cuda":
        raise FlenUserError(
            f"Precision '{precision}' needs an NVIDIA GPU (CUDA), but ComfyUI runs on '{device.type}'. "
            "Choose bf16 (or fp32) on this machine."
        )
    return torch.float32 if precision == "fp32" else torch.bfloat16


def nf4_config(dtype: torch.dtype):
    """bitsandbytes' 4-bit NF4 quantisation as diffusers takes it, computing in ``dtype``."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_quantised_transformer(model_cls: type, folder: str | Path, precision: str, dtype: torch.dtype):
    """The ``transformer`` subfolder of a diffusers folder at ``precision`` 'nf4' or 'fp8'; None for the others
    (the pipeline then loads it itself in ``dtype``)."""
    if precision == "nf4":
        return model_cls.from_pretrained(  # type: ignore[attr-defined]
            folder, subfolder="transformer", dtype=dtype, quantization_config=nf4_config(dtype))
    if precision == "fp8":
        from .fp8_linear import load_transformer_fp8

        # e4m3 weights (half of bf16), fp8 matmul on GPUs that have it; quantised while reading, so the
        # bf16 transformer (24 GB FLUX, 41 GB Qwen) is never in RAM at once (see engines/fp8_linear.py).
        return load_transformer_fp8(model_cls, Path(folder) / "transformer", dtype)
    return None


def load_pipeline(pipeline_cls: type, transformer_cls: type, folder: str | Path, expected_classes: tuple[str, ...],
                  precision: str, device: torch.device, modules: tuple[str, ...]):
    """A diffusers pipeline folder at ``precision`` (the transformer quantised for 'nf4' / 'fp8'), its
    ``modules`` frozen in eval mode: the one loader of the FLUX and Qwen-Image-Edit diffusers folders."""
    read_model_index(folder, expected_classes)
    dtype = torch_dtype_for(precision, device)
    transformer = load_quantised_transformer(transformer_cls, folder, precision, dtype)
    kwargs = {"transformer": transformer} if transformer is not None else {}
    pipe = pipeline_cls.from_pretrained(folder, dtype=dtype, **kwargs)  # type: ignore[attr-defined]
    for name in modules:
        getattr(pipe, name).eval().requires_grad_(False)
    return pipe
