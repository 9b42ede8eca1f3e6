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
import re
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch

from .errors import FlenUserError
from .fused_ops import prepare_for_inference
from .lora_formats import ConvertedLora, guess_architecture, load_lora_file  # noqa: F401  (re-exported)
from .lora_stack import LoraEntry, LoraStack

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin


def load_adapter(transformer: ModelMixin, converted: ConvertedLora, adapter_name: str) -> None:
    """Adds ``converted`` to ``transformer`` as the peft adapter ``adapter_name``. Each module's scale is
    folded into its up matrix and every module gets lora_alpha == rank, so peft's scaling is 1 and the
    adapter's effect at strength s is exactly s · scale · up · down, whatever layout the file had."""
    from peft import LoraConfig

    ranks = {name: int(m.down.shape[0]) for name, m in converted.modules.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    # peft matches these as regexes ending a module path: anchor them so 'proj_out' is not also
    # 'single_transformer_blocks.0.proj_out'.
    odd = {f"^{re.escape(n)}": r for n, r in ranks.items() if r != common}
    config = LoraConfig(r=common, lora_alpha=common, rank_pattern=odd, alpha_pattern=dict(odd),
                        target_modules="^(?:" + "|".join(re.escape(n) for n in sorted(ranks)) + ")$",
                        lora_dropout=0.0, init_lora_weights=False)
    with warnings.catch_warnings():  # several adapters on one model is what a stack is
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        transformer.add_adapter(config, adapter_name=adapter_name)
    _lift_fp8_lora_weights(transformer)  # before the copy: an fp8 LoRA weight would round the file's values
    layers = dict(transformer.named_modules())
    with torch.no_grad():
        for name, module in converted.modules.items():
            layer = layers[name]
            if layer.scaling[adapter_name] != 1.0 or layer.r[adapter_name] != ranks[name]:
                raise RuntimeError(f"peft gave {name} rank {layer.r[adapter_name]}, scaling "
                                   f"{layer.scaling[adapter_name]}")  # a peft change: must not pass silently
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            a.copy_(module.down.to(device=a.device, dtype=torch.float32))
            b.copy_((module.up.float() * module.scale).to(device=b.device))
    missing = [n for n in converted.modules if adapter_name not in getattr(layers[n], "lora_A", {})]
    if missing:
        raise RuntimeError(f"peft left out {missing[:3]}")


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
        # Checked above: every lora_A is a Linear, and peft pairs a Linear lora_A with a Linear lora_B.
        downs = [cast(torch.nn.Linear, module.lora_A[a]) for a in names]
        ups = [cast(torch.nn.Linear, module.lora_B[a]) for a in names]
        dtype = downs[0].weight.dtype
        with torch.no_grad():
            down = torch.cat([d.weight.to(dtype) for d in downs], dim=0)
            up = torch.cat([u.weight.to(dtype) * module.scaling[a] for u, a in zip(ups, names, strict=True)], dim=1)
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
    def __init__(self, pipe: Any, architecture: str) -> None:
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
        self.file_reads += 1
        converted = load_lora_file(entry.name, entry.path, self.pipe.transformer, self.architecture)
        adapter = entry.adapter_name
        load_adapter(self.pipe.transformer, converted, adapter)
        self._loaded[entry.path] = _Loaded(adapter, stamp)
        return adapter

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
    pipe: Any
    files: object = None  # the ComfyUI split files it came from (FluxFiles / QwenEditFiles), else None
    adapters: AdapterCache = field(init=False)

    architecture: ClassVar[str] = ""  # set by subclasses: the target of LoRA conversion (engines.lora_formats)
    module_names: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        transformer = getattr(self.pipe, "transformer", None)
        if isinstance(transformer, torch.nn.Module):
            prepare_for_inference(transformer)
        self.adapters = AdapterCache(self.pipe, architecture=self.architecture)

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self.pipe, n) for n in self.module_names}
