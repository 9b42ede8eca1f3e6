"""Device moves that CI cannot see on a GPU, checked on the CPU with the ``meta`` device.

ComfyUI loads and offloads the pack's modules with ``Module.to()``, which moves parameters and buffers
and nothing else: a tensor kept as a plain attribute stays behind, and the first forward on the GPU then
fails ("mat2 is on cpu"). Moving to ``meta`` after the LoRA stack is applied, then walking every tensor
reachable from every module, finds such tensors on a machine without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from engines import flux_pipeline, qwen_edit
from engines.fp8_linear import Fp8Linear, convert_linears_to_fp8
from engines.lora_stack import LoraEntry, LoraStack
from engines.model_host import LocalHost

META = torch.device("meta")


def _tensors(value: object, where: str, seen: set[int]):
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{where}[{k!r}]", seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for k, v in enumerate(value):
            yield from _tensors(v, f"{where}[{k}]", seen)


def _moved_on_use(module: torch.nn.Module, attr: str) -> bool:
    """diffusers' Qwen rotary tables are plain attributes by design: its ``_get_device_freqs`` copies them to
    the input's device on every forward (and they are complex, which a module-wide dtype cast would ruin as
    buffers). The forward on ``meta`` below proves that path works."""
    return attr in ("pos_freqs", "neg_freqs") and hasattr(module, "_get_device_freqs")


def tensors_elsewhere(root: torch.nn.Module, device: torch.device) -> list[str]:
    """Every tensor held by any module of ``root`` (parameters, buffers, plain attributes, tuples of them,
    bound state such as peft's) that is not on ``device``."""
    found = []
    for name, module in root.named_modules():
        seen: set[int] = set()
        for attr, value in vars(module).items():
            if attr == "_modules" or _moved_on_use(module, attr):
                continue  # _modules: walked by named_modules itself
            for where, tensor in _tensors(value, f"{name or '<root>'}.{attr}", seen):
                if tensor.device != device:
                    found.append(f"{where} on {tensor.device}")
    return found


def _entry(models, name: str, strength: float) -> LoraEntry:
    return LoraEntry(name=f"flen-tiny/{name}", path=str(models / "loras" / "flen-tiny" / name), strength=strength)


def _two_loras(models, arch: str) -> LoraStack:
    return (LoraStack().extended(_entry(models, f"{arch}_lora_a.safetensors", 0.8))
            .extended(_entry(models, f"{arch}_lora_b.safetensors", -0.5)))


def _flux_inputs(transformer, device):
    cfg = transformer.config
    seq, txt = 16, 8
    return dict(
        hidden_states=torch.randn(1, seq, cfg.in_channels, device=device),
        encoder_hidden_states=torch.randn(1, txt, cfg.joint_attention_dim, device=device),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device=device),
        timestep=torch.full((1,), 0.5, device=device),
        img_ids=torch.zeros(seq, 3, device=device), txt_ids=torch.zeros(txt, 3, device=device),
        guidance=torch.full((1,), 3.5, device=device) if cfg.guidance_embeds else None, return_dict=False)


def _qwen_inputs(transformer, device):
    cfg = transformer.config
    h = w = 4  # latent patches of the output; the reference image adds the same again
    txt = 6
    return dict(
        hidden_states=torch.randn(1, 2 * h * w, cfg.in_channels, device=device),
        encoder_hidden_states=torch.randn(1, txt, cfg.joint_attention_dim, device=device),
        encoder_hidden_states_mask=torch.ones(1, txt, dtype=torch.long, device=device),
        timestep=torch.full((1,), 0.5, device=device), img_shapes=[[(1, h, w), (1, h, w)]], return_dict=False)


@pytest.fixture(scope="module")
def flux(tiny_models):
    return flux_pipeline.load_flux(tiny_models / "diffusers" / "flen-tiny-flux", "flen-tiny-flux", "fp32",
                                   torch.device("cpu"))


@pytest.fixture(scope="module")
def qwen(tiny_models):
    return qwen_edit.load_qwen_edit(tiny_models / "diffusers" / "flen-tiny-qwen-image-edit",
                                    "flen-tiny-qwen-image-edit", "fp32", torch.device("cpu"))


def _check_moves_with_stack(handle, stack: LoraStack, make_inputs) -> None:
    """As the nodes do it: the stack is applied while the transformer sits offloaded on the CPU, then the
    host loads it onto the compute device (here ``meta``), then it runs."""
    transformer = handle.pipe.transformer
    handle.adapters.apply(stack)
    assert handle.adapters.stacked_layers > 0
    with torch.no_grad():
        reference = transformer(**make_inputs(transformer, torch.device("cpu")))[0]
    assert torch.isfinite(reference).all()

    LocalHost(META).prepare(transformer)
    assert tensors_elsewhere(transformer, META) == []
    with torch.no_grad():
        out = transformer(**make_inputs(transformer, META))[0]
    assert out.device == META and out.shape == reference.shape
    assert tensors_elsewhere(transformer, META) == []


def test_flux_stacked_loras_move_with_the_transformer(tiny_models, flux):
    _check_moves_with_stack(flux, _two_loras(tiny_models, "flux"), _flux_inputs)


def test_qwen_stacked_loras_move_with_the_transformer(tiny_models, qwen):
    _check_moves_with_stack(qwen, _two_loras(tiny_models, "qwen_edit"), _qwen_inputs)


def test_peft_loop_and_fp8_layers_move_with_the_transformer(tiny_models):
    """The other adapter paths: peft's own per-adapter loop (what runs where a layer cannot be stacked) and the
    fp8 layers (e4m3 weight + scale buffer) under LoRA, moved the same way."""
    from engines.lora_adapters import unstack_adapters

    handle = flux_pipeline.load_flux(tiny_models / "diffusers" / "flen-tiny-flux", "flen-tiny-flux", "fp32",
                                     torch.device("cpu"))
    transformer = handle.pipe.transformer
    assert convert_linears_to_fp8(transformer, torch.float32) > 0
    handle.adapters.apply(_two_loras(tiny_models, "flux"))
    unstack_adapters(transformer)  # peft's own forward from here on
    assert any(isinstance(m, Fp8Linear) for m in transformer.modules())
    LocalHost(META).prepare(transformer)
    assert tensors_elsewhere(transformer, META) == []
    with torch.no_grad():
        out = transformer(**_flux_inputs(transformer, META))[0]
    assert out.device == META


def test_walker_finds_a_tensor_left_as_a_plain_attribute():
    """The check itself: a pair kept as a plain attribute (the bug this file exists for) is reported."""
    layer = torch.nn.Linear(4, 4)
    layer.pair = (torch.zeros(2, 4), torch.zeros(4, 2))
    layer.to(META)
    assert tensors_elsewhere(layer, META) == ["<root>.pair[0] on cpu", "<root>.pair[1] on cpu"]
