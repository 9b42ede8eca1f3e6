"""Engines without ComfyUI: LoRA stack, adapter cache, diffusers folder checks, FLUX stages."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from engines import flux_pipeline
from engines.diffusers_folder import read_model_index, torch_dtype_for
from engines.errors import FlenUserError
from engines.lora_stack import LoraEntry, LoraStack, read_safetensors_header
from engines.model_host import LocalHost

SMALL = dict(width=64, height=64, steps=2)


def _entry(models, name, strength=1.0, enabled=True):
    return LoraEntry(name=f"flen-tiny/{name}", path=str(models / "loras" / "flen-tiny" / name),
                     strength=strength, enabled=enabled)


@pytest.fixture(scope="module")
def flux(tiny_models):
    return flux_pipeline.load_flux(tiny_models / "diffusers" / "flen-tiny-flux", "flen-tiny-flux", "fp32",
                                   torch.device("cpu"))


def _gen(flux, stack, seed=3):
    images, metas = flux_pipeline.generate(flux, flux_pipeline.FluxRequest(prompts=("a face",), seed=seed, **SMALL),
                                           stack, LocalHost())
    return images, metas


def test_stack_is_immutable_and_describes_without_paths(tiny_models):
    a = _entry(tiny_models, "flux_lora_a.safetensors", 0.7)
    s1 = LoraStack().extended(a)
    s2 = s1.extended(_entry(tiny_models, "flux_lora_b.safetensors", -0.5, enabled=False))
    assert len(s1.entries) == 1 and len(s2.entries) == 2
    assert s2.active() == (a,)
    assert s2.describe() == [
        {"name": "flen-tiny/flux_lora_a.safetensors", "strength": 0.7, "enabled": True},
        {"name": "flen-tiny/flux_lora_b.safetensors", "strength": -0.5, "enabled": False},
    ]


def test_corrupt_lora_file_is_named(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FlenUserError, match="broken.safetensors"):
        read_safetensors_header(bad)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(FlenUserError, match="not a readable .safetensors"):
        read_safetensors_header(empty)


def test_model_folder_checks(tmp_path, tiny_models):
    with pytest.raises(FlenUserError, match="does not exist"):
        read_model_index(tmp_path / "nope", ("FluxPipeline",))
    (tmp_path / "single").mkdir()
    with pytest.raises(FlenUserError, match="no model_index.json"):
        read_model_index(tmp_path / "single", ("FluxPipeline",))
    with pytest.raises(FlenUserError, match="is a QwenImageEditPlusPipeline folder"):
        read_model_index(tiny_models / "diffusers" / "flen-tiny-qwen-image-edit", ("FluxPipeline",))
    with pytest.raises(FlenUserError, match="needs an NVIDIA GPU"):
        torch_dtype_for("nf4", torch.device("cpu"))
    with pytest.raises(FlenUserError, match="needs an NVIDIA GPU"):
        torch_dtype_for("fp8", torch.device("cpu"))


def test_same_seed_same_image_and_meta(flux):
    a, meta = _gen(flux, LoraStack(), seed=5)
    b, _ = _gen(flux, LoraStack(), seed=5)
    c, _ = _gen(flux, LoraStack(), seed=6)
    assert a.shape == (1, 64, 64, 3) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert meta[0]["seed"] == 5 and meta[0]["prompt"] == "a face" and meta[0]["loras"] == []


def test_strength_zero_reproduces_base_and_weight_change_does_not_reread(flux, tiny_models):
    base, _ = _gen(flux, LoraStack())
    zero = LoraStack().extended(_entry(tiny_models, "flux_lora_a.safetensors", 0.0))
    out0, _ = _gen(flux, zero)
    assert torch.equal(out0, base)
    reads = flux.adapters.file_reads
    full = LoraStack().extended(_entry(tiny_models, "flux_lora_a.safetensors", 1.0))
    out1, meta = _gen(flux, full)
    assert flux.adapters.file_reads == reads  # only set_adapters, no file read
    assert not torch.allclose(out1, base)
    assert meta[0]["loras"][0]["strength"] == 1.0
    off = LoraStack().extended(_entry(tiny_models, "flux_lora_a.safetensors", 1.0, enabled=False))
    assert torch.equal(_gen(flux, off)[0], base)


def test_changed_file_on_disk_is_reloaded(flux, tiny_models, tmp_path):
    src = tiny_models / "loras" / "flen-tiny" / "flux_lora_b.safetensors"
    copy = tmp_path / "b_copy.safetensors"
    copy.write_bytes(src.read_bytes())
    entry = LoraEntry(name="b_copy.safetensors", path=str(copy), strength=1.0)
    _gen(flux, LoraStack().extended(entry))
    reads = flux.adapters.file_reads
    from safetensors.torch import load_file

    tensors = {k: v * 2 for k, v in load_file(copy).items()}
    save_file(tensors, copy)
    os.utime(copy, ns=(1, 1))  # a different mtime even on coarse clocks
    _gen(flux, LoraStack().extended(entry))
    assert flux.adapters.file_reads == reads + 1


def test_lora_for_another_architecture_is_refused_by_name(flux, tiny_models):
    stack = LoraStack().extended(_entry(tiny_models, "qwen_edit_lora_a.safetensors"))
    with pytest.raises(FlenUserError) as err:
        _gen(flux, stack)
    msg = str(err.value)
    assert "qwen_edit_lora_a.safetensors" in msg and "does not fit this FLUX.1 model" in msg
    assert "do not exist in this FLUX.1 model ('transformer.transformer_blocks.1." in msg
    assert "other shapes than the model's layers ('transformer.transformer_blocks.0.attn." in msg


def test_architecture_guess_from_key_names():
    from engines.lora_adapters import guess_architecture

    assert guess_architecture(["transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight"]) == \
        "Qwen-Image(-Edit)"
    assert guess_architecture(["transformer.single_transformer_blocks.3.attn.to_q.lora_A.weight"]) == "FLUX.1"
    assert guess_architecture(["lora_unet_down_blocks_0_attentions_0.lora_down.weight"]) == "Stable Diffusion (UNet)"


def test_odd_size_is_refused(flux):
    with pytest.raises(FlenUserError, match="divisible by"):
        flux_pipeline.generate(flux, flux_pipeline.FluxRequest(prompts=("x",), width=63, height=64, steps=1),
                               LoraStack(), LocalHost())


def test_generate_many_encodes_once_and_matches_single_generations(flux):
    class Counting(LocalHost):
        encoder_loads = 0

        def prepare(self, *modules, working_bytes=0):
            if any("CLIP" in type(m).__name__ or "T5" in type(m).__name__ for m in modules):
                Counting.encoder_loads += 1
            return super().prepare(*modules)

    request = flux_pipeline.FluxRequest(prompts=("-",), **SMALL)
    jobs = [flux_pipeline.FluxJob("a face", 3, {"card_cell": "neutral/front"}),
            flux_pipeline.FluxJob("a smiling face", 4)]
    images, metas = flux_pipeline.generate_many(flux, jobs, request, LoraStack(), Counting())
    assert Counting.encoder_loads == 1
    assert metas[0]["card_cell"] == "neutral/front" and metas[1]["seed"] == 4
    single, _ = flux_pipeline.generate(flux, flux_pipeline.FluxRequest(prompts=("a smiling face",), seed=4, **SMALL),
                                       LoraStack(), LocalHost())
    assert torch.equal(images[1:2], single)


def test_stacked_adapters_equal_peft_per_adapter_loop(flux, tiny_models):
    """The concatenated low-rank pair gives what peft's own loop over the adapters gives, layer by layer,
    with and without grad (in place only when no grad is needed)."""
    stack = (LoraStack().extended(_entry(tiny_models, "flux_lora_a.safetensors", 0.7))
             .extended(_entry(tiny_models, "flux_lora_b.safetensors", -0.4)))
    flux.adapters.apply(stack)
    layers = [m for m in flux.pipe.transformer.modules() if "_flen_stacked_down" in m._buffers]
    assert flux.adapters.stacked_layers == len(layers) > 0
    g = torch.Generator().manual_seed(0)
    checked_two = 0
    for layer in layers:
        down, up = layer._flen_stacked_down, layer._flen_stacked_up
        checked_two += down.shape[0] == sum(layer.r[e.adapter_name] for e in stack.entries) == up.shape[1]
        x = torch.randn(2, 5, layer.in_features, generator=g)
        with torch.no_grad():
            ours = layer(x)
            peft_own = type(layer).forward(layer, x)
        assert torch.allclose(ours, peft_own, atol=1e-5), layer
        x.requires_grad_(True)
        ours_grad = layer(x)
        ours_grad.sum().backward()
        assert x.grad is not None and torch.allclose(ours_grad.detach(), peft_own, atol=1e-5)
    assert checked_two == len(layers)
    flux.adapters.apply(LoraStack())
    assert flux.adapters.stacked_layers == 0
    assert not any(name.startswith("_flen_stacked") for name, _ in flux.pipe.transformer.named_buffers())
    assert not any("forward" in m.__dict__ for m in flux.pipe.transformer.modules())
