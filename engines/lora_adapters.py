"""Applies a LoRA stack to a diffusers pipeline as named adapters, loading each file once.

Changing a strength or switching an entry off only calls ``set_adapters``; a file is read
again only when it changed on disk. Once the adapters are set, each LoRA layer's active adapters
are concatenated into one low-rank pair with the strengths folded in (``stack_adapters``): peft runs
every adapter separately and makes several full-size passes over the layer's output for each, which
cost Qwen-Image-Edit 18 % per step with two LoRAs on an H100; one pair added in place costs a
fraction of that and gives the same sum.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .errors import FlenUserError
from .lora_stack import LoraEntry, LoraStack

_ARCH_LABEL = {"flux": "FLUX.1", "qwen_image": "Qwen-Image(-Edit)"}


def guess_architecture(keys: list[str]) -> str:
    """A human label for what a LoRA was trained on, from its key names (for error messages)."""
    joined = " ".join(keys[:2000])
    if "img_mlp" in joined or "txt_mlp" in joined or "img_mod" in joined:
        return "Qwen-Image(-Edit)"
    if "single_transformer_blocks" in joined or "single_blocks" in joined:
        return "FLUX.1"
    if "down_blocks" in joined or "lora_unet_down" in joined or "input_blocks" in joined:
        return "Stable Diffusion (UNet)"
    return "an unknown architecture"


def _module_targets(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Maps each transformer module a LoRA patches to (in_features, out_features)."""
    targets: dict[str, list[int]] = {}
    for key, tensor in state_dict.items():
        if not key.startswith("transformer."):
            continue
        for marker, slot in ((".lora_A.", 0), (".lora_B.", 1)):
            if marker in key:
                module = key[len("transformer."):key.index(marker)]
                dims = targets.setdefault(module, [-1, -1])
                dims[slot] = int(tensor.shape[1] if slot == 0 else tensor.shape[0])
    return {k: (v[0], v[1]) for k, v in targets.items()}


def check_fits(entry_name: str, state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module,
               architecture: str) -> None:
    """Raises FlenUserError naming the LoRA and the mismatch when it does not fit ``transformer``."""
    targets = _module_targets(state_dict)
    label = _ARCH_LABEL.get(architecture, architecture)
    if not targets:
        raise FlenUserError(
            f"LoRA '{entry_name}' has no transformer weights that {label} can use "
            f"(it looks like a LoRA for {guess_architecture(list(state_dict))}). Pick a {label} LoRA."
        )
    modules = dict(transformer.named_modules())
    missing = [m for m in targets if m not in modules]
    wrong_shape = []
    for name, (fan_in, fan_out) in targets.items():
        mod = modules.get(name)
        base = getattr(mod, "base_layer", mod)
        if isinstance(base, torch.nn.Linear) and (base.in_features, base.out_features) != (fan_in, fan_out):
            wrong_shape.append(f"{name} expects {base.in_features}→{base.out_features}, LoRA has {fan_in}→{fan_out}")
    if missing or wrong_shape:
        detail = (f"{len(missing)} of its {len(targets)} modules do not exist in this model "
                  f"(e.g. '{missing[0]}')" if missing else f"shapes differ: {wrong_shape[0]}")
        raise FlenUserError(
            f"LoRA '{entry_name}' does not fit this {label} model: {detail}. It looks like a LoRA for "
            f"{guess_architecture(list(state_dict))}; remove it from the stack or pick a {label} LoRA."
        )


_FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}


def _lift_fp8_lora_weights(transformer: torch.nn.Module) -> None:
    """peft gives new LoRA layers the dtype of the layer they wrap; on an fp8-stored transformer that is
    fp8, which has no matmul. LoRA weights are small: keep them in bf16."""
    for name, param in transformer.named_parameters():
        if "lora_" in name and param.dtype in _FP8:
            param.data = param.data.to(torch.bfloat16)


_STACKED_DOWN, _STACKED_UP = "_flen_stacked_down", "_flen_stacked_up"


def _stacked_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Installed on a peft LoRA layer's instance: base output plus (x·Aᵀ)·Bᵀ with every active adapter
    concatenated into A and B and the scalings folded into B."""
    result = self.base_layer(x, *args, **kwargs)
    down, up = self._flen_stacked_down, self._flen_stacked_up
    if not result.is_contiguous():
        result = result.contiguous()
    flat = result.view(-1, result.shape[-1])
    low = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).to(down.dtype), down).to(result.dtype)
    if torch.is_grad_enabled() and (flat.requires_grad or low.requires_grad):
        return torch.addmm(flat, low, up.t()).view_as(result)
    flat.addmm_(low, up.t())  # in place: one read and one write of the output, not peft's several
    return result


def stack_adapters(transformer: torch.nn.Module) -> int:
    """Replaces peft's per-adapter loop by one concatenated low-rank pair on every LoRA layer whose
    active adapters are plain LoRA (no DoRA or other variants, no dropout in training); returns how many
    layers were stacked. Call it on an unstacked model, and undo it (``unstack_adapters``) before peft's adapter
    state changes; ``AdapterCache.apply`` does both."""
    from peft.tuners.lora import LoraLayer

    stacked = 0
    for module in transformer.modules():
        if not isinstance(module, LoraLayer) or not isinstance(module, torch.nn.Module):
            continue
        if module.disable_adapters or module.merged or not hasattr(module, "lora_A"):
            continue
        names = [a for a in module.active_adapters if a in module.lora_A]
        if not names or any(a in getattr(module, "lora_variant", {}) for a in names):
            continue
        if not all(isinstance(module.lora_A[a], torch.nn.Linear) for a in names):
            continue  # conv or embedding LoRA layers keep peft's own forward
        if any(getattr(module.lora_dropout[a], "p", 0.0) and module.training for a in names):
            continue
        dtype = module.lora_A[names[0]].weight.dtype
        with torch.no_grad():
            down = torch.cat([module.lora_A[a].weight.to(dtype) for a in names], dim=0)
            up = torch.cat([module.lora_B[a].weight.to(dtype) * module.scaling[a] for a in names], dim=1)
        # Registered buffers, not plain attributes: Module.to() (ComfyUI's load and offload) moves
        # buffers only, and a pair left behind on the CPU breaks the first forward on the GPU.
        # Non-persistent, so they never reach a state_dict or a saved LoRA.
        module.register_buffer(_STACKED_DOWN, down.contiguous(), persistent=False)
        module.register_buffer(_STACKED_UP, up.contiguous(), persistent=False)
        module.forward = types.MethodType(_stacked_forward, module)
        stacked += 1
    return stacked


def unstack_adapters(transformer: torch.nn.Module) -> None:
    """Gives every LoRA layer back peft's own forward (before loading, deleting or re-weighting adapters)."""
    for module in transformer.modules():
        if _STACKED_DOWN in module._buffers:
            module.__dict__.pop("forward", None)
            del module._buffers[_STACKED_DOWN]
            del module._buffers[_STACKED_UP]


@dataclass
class _Loaded:
    adapter: str
    stamp: tuple[int, int]


class AdapterCache:
    def __init__(self, pipe: object, architecture: str) -> None:
        self.pipe = pipe
        self.architecture = architecture
        self._loaded: dict[str, _Loaded] = {}  # by absolute path
        self.file_reads = 0  # how many LoRA files were read from disk (tests watch this)
        self.stacked_layers = 0  # LoRA layers running the concatenated pair (see stack_adapters)

    def _ensure_loaded(self, entry: LoraEntry) -> str:
        try:
            st = os.stat(entry.path)
        except OSError as exc:
            raise FlenUserError(f"LoRA '{entry.name}' is missing from models/loras ({exc}).") from exc
        stamp = (st.st_size, st.st_mtime_ns)
        known = self._loaded.get(entry.path)
        if known is not None and known.stamp == stamp:
            return known.adapter
        if known is not None:
            self.pipe.delete_adapters(known.adapter)
        state_dict = self._read(entry)
        check_fits(entry.name, state_dict, self.pipe.transformer, self.architecture)
        adapter = entry.adapter_name
        self.pipe.load_lora_weights(state_dict, adapter_name=adapter)
        _lift_fp8_lora_weights(self.pipe.transformer)
        self._loaded[entry.path] = _Loaded(adapter, stamp)
        return adapter

    def _read(self, entry: LoraEntry) -> dict[str, torch.Tensor]:
        from .lora_stack import read_safetensors_header

        read_safetensors_header(entry.path)  # clear message for corrupt files before diffusers sees them
        self.file_reads += 1
        try:
            result = self.pipe.lora_state_dict(entry.path)
        except Exception as exc:  # diffusers raises many types for foreign formats
            raise FlenUserError(f"LoRA '{entry.name}' could not be read as a LoRA: {exc}") from exc
        state_dict = result[0] if isinstance(result, tuple) else result
        return dict(state_dict)

    def apply(self, stack: LoraStack) -> None:
        unstack_adapters(self.pipe.transformer)
        self.stacked_layers = 0
        active = stack.active()
        if not active:
            if self._loaded:
                self.pipe.disable_lora()
            return
        names = [self._ensure_loaded(e) for e in active]
        weights = [float(e.strength) for e in active]
        if len(set(names)) != len(names):
            raise FlenUserError("The same LoRA is in the stack twice; keep one entry and set its strength.")
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=weights)
        self.stacked_layers = stack_adapters(self.pipe.transformer)


@dataclass
class PipelineHandle:
    """A loaded diffusers pipeline, its LoRA adapter cache, and the modules the VRAM host manages."""

    name: str
    folder: str
    precision: str
    pipe: object
    files: object = None  # the ComfyUI split files it came from (FluxFiles / QwenEditFiles), else None
    adapters: AdapterCache = field(init=False)

    architecture: ClassVar[str] = ""  # set by subclasses: which LoRAs fit (see check_fits)
    module_names: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.adapters = AdapterCache(self.pipe, architecture=self.architecture)

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self.pipe, n) for n in self.module_names}
