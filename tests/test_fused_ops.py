"""The fused kernels the pack swaps into diffusers' transformers: RMSNorm as one ``F.rms_norm``, and one e4m3
cast of the activations that sibling fp8 projections share. Both must leave the model's results and module tree
as they were."""

import pytest
import torch

from engines.fp8_linear import (
    E4M3,
    Fp8Linear,
    SharedCast,
    convert_linears_to_fp8,
    e4m3_activations,
    share_sibling_casts,
)
from engines.fused_ops import FusedRMSNorm, fuse_rms_norms

NAMES = {"flux": "flen-tiny-flux", "qwen": "flen-tiny-qwen-image-edit"}


def _transformer(tiny_models, arch):
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    cls = FluxTransformer2DModel if arch == "flux" else QwenImageTransformer2DModel
    return cls.from_pretrained(tiny_models / "diffusers" / NAMES[arch] / "transformer").eval()


def _inputs(model, arch):
    g = torch.Generator().manual_seed(0)
    if arch == "flux":
        cfg = model.config
        return dict(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
                    encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                    timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                    guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None, return_dict=False)
    cfg = model.config
    return dict(hidden_states=torch.randn(1, 32, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
                encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long), timestep=torch.tensor([0.5]),
                img_shapes=[[(1, 4, 4), (1, 4, 4)]], return_dict=False)


def test_flux_norms_are_torch_rms_norm_already(tiny_models):
    model = _transformer(tiny_models, "flux")
    assert isinstance(model.transformer_blocks[0].attn.norm_q, torch.nn.RMSNorm)
    assert fuse_rms_norms(model) == 0  # diffusers' FLUX calls F.rms_norm itself: nothing to replace


def test_fused_norms_replace_every_rms_norm_and_keep_the_output(tiny_models):
    from diffusers.models.normalization import RMSNorm

    arch = "qwen"
    model = _transformer(tiny_models, arch)
    inputs = _inputs(model, arch)
    keys_before = list(model.state_dict())
    with torch.no_grad():
        ref = model(**inputs)[0]
    originals = sum(type(m) is RMSNorm for m in model.modules())
    assert originals > 0
    assert fuse_rms_norms(model) == originals
    assert not any(type(m) is RMSNorm for m in model.modules())
    assert sum(type(m) is FusedRMSNorm for m in model.modules()) == originals
    assert list(model.state_dict()) == keys_before  # LoRA keys and the VRAM host see the same tree
    assert fuse_rms_norms(model) == 0
    with torch.no_grad():
        out = model(**inputs)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fused_norm_matches_diffusers_in_bf16_and_passes_gradients():
    from diffusers.models.normalization import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(128, eps=1e-6).to(torch.bfloat16)
    norm.weight.data.normal_(1.0, 0.2)
    fused = FusedRMSNorm((128,), 1e-6, norm.weight)
    x = (torch.randn(2, 3, 40, 128) * 4).to(torch.bfloat16).requires_grad_(True)
    ref, out = norm(x), fused(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding, one ulp
    out.float().sum().backward()
    assert fused.weight.grad is not None and x.grad is not None and torch.isfinite(x.grad).all()


def test_shared_cast_reuses_one_cast_per_tensor_until_every_sibling_had_it():
    shared = SharedCast(3)
    x = torch.randn(4, 5, 32)
    first = shared.get(x)
    assert first.dtype == E4M3 and first.shape == (20, 32)
    assert torch.equal(first.float(), e4m3_activations(x).float())
    assert shared.get(x) is first and shared.get(x) is first  # the two siblings
    assert shared.get(x) is not first  # a fourth call is a new group: cast again
    other = torch.randn(4, 5, 32)
    assert not torch.equal(shared.get(other).float(), first.float())  # another tensor is never served the cast


def test_shared_cast_recasts_a_tensor_changed_in_place():
    shared = SharedCast(3)
    x = torch.randn(6, 32)
    first = shared.get(x)
    x.mul_(2.0)
    second = shared.get(x)
    assert second is not first
    torch.testing.assert_close(second.float(), e4m3_activations(x).float())


def test_shared_cast_holds_no_activation_after_the_last_sibling():
    import weakref

    shared = SharedCast(2)
    x = torch.randn(6, 32)
    shared.get(x)
    x2 = shared.get(x)
    ref = weakref.ref(x)
    del x
    assert ref() is None  # the cast does not keep the block's activations alive
    assert x2.dtype == E4M3


def test_shared_cast_works_on_inference_tensors():
    shared = SharedCast(2)
    with torch.inference_mode():
        x = torch.randn(6, 32)
        first = shared.get(x)
        assert shared.get(x) is first


@pytest.mark.parametrize("arch", ["flux", "qwen"])
def test_siblings_linked_as_diffusers_calls_them(tiny_models, arch):
    model = _transformer(tiny_models, arch)
    convert_linears_to_fp8(model, torch.float32)
    groups = share_sibling_casts(model)
    if arch == "flux":
        n_double, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
        assert groups == 2 * n_double + n_single
        single = model.single_transformer_blocks[0]
        shared = single.attn.to_q.shared_cast
        assert shared is not None and shared.members == 4
        assert single.proj_mlp.shared_cast is shared and single.attn.to_v.shared_cast is shared
        double = model.transformer_blocks[0].attn
        assert double.to_q.shared_cast is double.to_k.shared_cast is not double.add_q_proj.shared_cast
        assert double.to_q.shared_cast.members == 3 and double.add_v_proj.shared_cast.members == 3
    else:
        assert groups == 2 * len(model.transformer_blocks)
        attn = model.transformer_blocks[0].attn
        assert attn.to_q.shared_cast is attn.to_v.shared_cast and attn.to_q.shared_cast.members == 3
    unlinked = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear) and m.shared_cast is None]
    assert all(not n.endswith(("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")) for n in unlinked)


def test_pipelines_come_with_fused_norms_and_linked_casts(tiny_models):
    """Every handle the loaders return goes through PipelineHandle's set-up (fp8 itself needs CUDA: the fp8
    layers are converted by hand here, as the fp8 loaders do)."""
    from diffusers.models.normalization import RMSNorm

    from engines.qwen_edit import QwenEditHandle, load_qwen_edit

    handle = load_qwen_edit(tiny_models / "diffusers" / NAMES["qwen"], "tiny", "fp32", torch.device("cpu"))
    transformer = handle.pipe.transformer
    assert any(type(m) is FusedRMSNorm for m in transformer.modules())
    assert not any(type(m) is RMSNorm for m in transformer.modules())
    convert_linears_to_fp8(transformer, torch.float32)
    assert transformer.transformer_blocks[0].attn.to_q.shared_cast is None
    from engines.flux_pipeline import load_flux
    from engines.fused_ops import FluxRopeAttnProcessor

    flux = load_flux(tiny_models / "diffusers" / NAMES["flux"], "tiny", "fp32", torch.device("cpu"))
    assert isinstance(flux.pipe.transformer.single_transformer_blocks[0].attn.processor, FluxRopeAttnProcessor)
    QwenEditHandle(name="tiny", folder=handle.folder, precision="fp8", pipe=handle.pipe)
    assert transformer.transformer_blocks[0].attn.to_q.shared_cast is not None


def test_flux_rope_processor_gives_diffusers_output(tiny_models):
    """The complex-product rotary embedding is diffusers' rotation: same transformer output, with and without
    the text stream (double and single blocks), and one processor for every attention module."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from engines.fused_ops import FluxRopeAttnProcessor, use_flux_rope_processor

    model = _transformer(tiny_models, "flux")
    inputs = _inputs(model, "flux")
    g = torch.Generator().manual_seed(1)
    inputs["img_ids"] = torch.randint(0, 16, (16, 3), generator=g).float()  # positions that really rotate
    inputs["txt_ids"] = torch.randint(0, 16, (8, 3), generator=g).float()
    with torch.no_grad():
        ref = model(**inputs)[0]
    n_attn = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert use_flux_rope_processor(model) == n_attn
    processors = {id(b.attn.processor) for b in [*model.transformer_blocks, *model.single_transformer_blocks]}
    assert len(processors) == 1
    assert isinstance(model.transformer_blocks[0].attn.processor, FluxRopeAttnProcessor)
    assert not isinstance(model.transformer_blocks[0].attn.processor, FluxAttnProcessor)
    assert use_flux_rope_processor(model) == 0
    with torch.no_grad():
        out = model(**inputs)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    inputs["img_ids"] = inputs["img_ids"].flip(0)  # another forward's positions: the cached frequencies follow
    with torch.no_grad():
        moved = model(**inputs)[0]
    assert not torch.allclose(moved, out, atol=1e-4)


def test_rotate_complex_is_the_pairwise_rotation():
    from engines.fused_ops import rotate_complex

    x = torch.randn(1, 3, 2, 4)
    angle = torch.randn(3, 2)
    freqs = torch.polar(torch.ones_like(angle), angle)
    out = rotate_complex(x, freqs)
    c, s = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(out[..., 0::2], even * c - odd * s)
    torch.testing.assert_close(out[..., 1::2], even * s + odd * c)


@pytest.mark.parametrize("arch", ["flux", "qwen"])
def test_trainers_load_the_fused_kernels(tiny_models, arch):
    """The trainers' transformer (training.lora_training.load_transformer, both trainers) gets the same fused
    norm and rotary embedding as inference, so the loss curves test (test_train_*_lora) runs through them."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
    from diffusers.models.normalization import RMSNorm

    from engines.fused_ops import FluxRopeAttnProcessor
    from training.lora_training import TrainConfig, load_transformer

    cls = FluxTransformer2DModel if arch == "flux" else QwenImageTransformer2DModel
    cfg = TrainConfig(model=str(tiny_models / "diffusers" / NAMES[arch]), dataset="d", output_dir="o",
                      precision="fp32")
    model = load_transformer(cls, cfg, torch.device("cpu"), torch.float32)
    assert not any(type(m) is RMSNorm for m in model.modules())
    if arch == "flux":
        assert isinstance(model.transformer_blocks[0].attn.processor, FluxRopeAttnProcessor)
    else:
        assert any(type(m) is FusedRMSNorm for m in model.modules())
