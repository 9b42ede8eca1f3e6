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
