"""fp8 storage: what the fp8 precision of the loaders does to a transformer's Linear layers."""

import pytest
import torch
from torch import nn

from engines.fp8_linear import E4M3, Fp8Linear, convert_linears_to_fp8


def test_fp8_linear_matches_the_bf16_layer_within_fp8_precision():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    q = Fp8Linear.from_linear(lin, torch.bfloat16)
    assert q.weight.dtype == E4M3 and q.weight_scale.item() > 0
    x = torch.randn(5, 7, 64, dtype=torch.bfloat16)
    ref, out = lin(x).float(), q(x).float()
    assert out.shape == ref.shape
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.06  # e4m3 keeps 3 mantissa bits
    assert not torch.equal(out, ref)  # really quantised


def test_convert_skips_norms_and_outer_projections_and_runs_the_tiny_transformer(tiny_models):
    from diffusers import QwenImageTransformer2DModel

    path = tiny_models / "diffusers" / "flen-tiny-qwen-image-edit" / "transformer"
    model = QwenImageTransformer2DModel.from_pretrained(path).eval()
    n = convert_linears_to_fp8(model, torch.float32)
    assert n > 0
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["proj_out"] == "Linear" and kinds["img_in"] == "Linear"
    assert kinds["transformer_blocks.0.attn.to_q"] == "Fp8Linear"
    assert all(kinds[k] == "Linear" for k in kinds if "norm" in k and kinds[k] in ("Linear", "Fp8Linear"))


@pytest.mark.parametrize("bias", [True, False])
def test_meta_construction_for_benchmarks(bias):
    with torch.device("meta"):
        lin = nn.Linear(32, 16, bias=bias)
    q = Fp8Linear.from_linear(lin, torch.bfloat16)
    assert q.weight.device.type == "meta" and q.weight.dtype == E4M3


@pytest.mark.parametrize("arch", ["flux", "qwen"])
def test_streaming_fp8_load_equals_load_then_convert(tiny_models, arch):
    """Quantising while reading gives, tensor for tensor, what loading bf16 and converting gives; a pipeline
    built around it keeps the e4m3 weights (diffusers must not cast a passed-in transformer)."""
    from diffusers import (
        FluxPipeline,
        FluxTransformer2DModel,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )

    from engines.fp8_linear import load_transformer_fp8

    cls, pipe_cls, name = ((FluxTransformer2DModel, FluxPipeline, "flen-tiny-flux") if arch == "flux" else
                           (QwenImageTransformer2DModel, QwenImageEditPlusPipeline, "flen-tiny-qwen-image-edit"))
    folder = tiny_models / "diffusers" / name
    streamed = load_transformer_fp8(cls, folder / "transformer", torch.bfloat16)
    reference = cls.from_pretrained(folder, subfolder="transformer", dtype=torch.bfloat16)
    assert convert_linears_to_fp8(reference, torch.bfloat16) > 0
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    n_fp8 = 0
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        if value.dtype == E4M3:
            n_fp8 += 1
            assert torch.equal(ours[key].view(torch.uint8), value.view(torch.uint8)), key
        else:
            assert torch.equal(ours[key], value), key
    assert n_fp8 == sum(isinstance(m, Fp8Linear) for m in reference.modules()) > 0
    assert not any(p.device.type == "meta" for p in streamed.parameters())
    pipe = pipe_cls.from_pretrained(folder, transformer=streamed, dtype=torch.bfloat16)
    assert pipe.transformer is streamed
    assert any(p.dtype == E4M3 for p in pipe.transformer.parameters())


def test_streaming_fp8_load_names_an_incomplete_or_foreign_checkpoint(tiny_models, tmp_path):
    import shutil

    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
    from safetensors.torch import load_file, save_file

    from engines.errors import FlenUserError
    from engines.fp8_linear import load_transformer_fp8

    src = tiny_models / "diffusers" / "flen-tiny-flux" / "transformer"
    broken = tmp_path / "transformer"
    shutil.copytree(src, broken)
    weights = load_file(broken / "diffusion_pytorch_model.safetensors")
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, broken / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FlenUserError, match=f"lacks 1 of FluxTransformer2DModel's weights .*'{dropped}'"):
        load_transformer_fp8(FluxTransformer2DModel, broken, torch.bfloat16)
    qwen_cfg = tiny_models / "diffusers" / "flen-tiny-qwen-image-edit" / "transformer" / "config.json"
    shutil.copy(qwen_cfg, broken / "config.json")  # a FLUX checkpoint under a Qwen config
    with pytest.raises(FlenUserError, match="is not a QwenImageTransformer2DModel folder"):
        load_transformer_fp8(QwenImageTransformer2DModel, broken, torch.bfloat16)
    (broken / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FlenUserError, match="has no diffusion_pytorch_model.safetensors"):
        load_transformer_fp8(QwenImageTransformer2DModel, broken, torch.bfloat16)


# ---- training over a frozen fp8 base: fp8 matmuls both ways (torch's _scaled_mm also runs on the CPU) ----

def _fp8_layer(bias: bool = True) -> tuple[nn.Linear, Fp8Linear]:
    torch.manual_seed(1)
    lin = nn.Linear(64, 48, bias=bias).to(torch.bfloat16)
    q = Fp8Linear.from_linear(lin, torch.bfloat16)
    lin.weight.data = q.dequantized_weight()  # the same weights: only the matmuls differ
    return lin, q


def test_frozen_fp8_linear_gradient_through_x_matches_the_dequantised_layer():
    from engines.fp8_linear import frozen_fp8_linear

    lin, q = _fp8_layer()
    x = torch.randn(3, 10, 64, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(3, 10, 48)
    out = frozen_fp8_linear(x, q.weight, q.weight_scale, q.bias, torch.bfloat16)
    ((out.float() - target) ** 2).mean().backward()
    g_fp8, x.grad = x.grad, None
    ((lin(x).float() - target) ** 2).mean().backward()
    g_ref = x.grad
    assert out.shape == (3, 10, 48) and g_fp8.shape == x.shape and g_fp8.dtype == x.dtype
    rel = (g_fp8.float() - g_ref.float()).norm() / g_ref.float().norm()
    assert rel < 0.08  # e4m3 on both operands of the backward matmul
    assert not torch.equal(g_fp8, g_ref)  # really the fp8 matmul
    # a wrong transpose or scale would give an unrelated or a scaled gradient
    cos = torch.nn.functional.cosine_similarity(g_fp8.float().flatten(), g_ref.float().flatten(), dim=0)
    assert cos > 0.995


@pytest.mark.parametrize("size", [1e-12, 1.0, 1e6])
def test_frozen_fp8_backward_scales_any_gradient_into_range(size):
    """dy of any magnitude, with one element exactly at its amax: no overflow to NaN, no flush to zero, the
    gradient's scale kept (a scale that were not the multiplier really applied would show as a ratio != 1)."""
    from engines.fp8_linear import frozen_fp8_linear

    lin, q = _fp8_layer(bias=False)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    dy = (torch.randn(4, 48) * size).to(torch.bfloat16)
    dy[0, 0] = dy.abs().max() * 1.0
    frozen_fp8_linear(x, q.weight, q.weight_scale, None, torch.bfloat16).backward(dy)
    g_fp8 = x.grad.float()
    g_ref = dy.float() @ q.dequantized_weight().float()
    assert torch.isfinite(g_fp8).all() and g_fp8.abs().max() > 0
    ratio = (g_fp8 * g_ref).sum() / (g_ref * g_ref).sum()
    assert ratio == pytest.approx(1.0, abs=0.02)


def test_fp8_layer_under_a_lora_routes_training_through_fp8_and_saves_no_weight_copy(monkeypatch):
    """On a GPU with fp8 tensor cores (here: the CPU, told it has them) a LoRA step over an Fp8Linear base runs
    the fp8 autograd path: the LoRA gradients match the dequantised path, and autograd keeps no 16-bit copy
    of the base weight (F.linear on the dequantised weight would keep one)."""
    from peft import LoraConfig, inject_adapter_in_model

    from engines import fp8_linear

    def lora_grads(fp8_mm: bool):
        monkeypatch.setattr(fp8_linear, "fp8_matmul_available", lambda device: fp8_mm)
        torch.manual_seed(2)
        base = nn.Sequential()
        base.add_module("proj", _fp8_layer()[1])
        model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["proj"],
                                                   init_lora_weights=False), base)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
        saved: list[torch.Tensor] = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        big16 = [t for t in saved if t.dtype == torch.bfloat16 and t.numel() == 48 * 64]
        return grads, big16

    g8, copies8 = lora_grads(True)
    gref, copies_ref = lora_grads(False)
    assert set(g8) == set(gref) and len(g8) == 2
    for name in g8:
        cos = torch.nn.functional.cosine_similarity(g8[name].flatten(), gref[name].flatten(), dim=0)
        assert cos > 0.99, name
    assert copies_ref and not copies8
