"""LoRA files as the tools write them: every layout loads with exactly its intended effect, or is refused.

One reference LoRA (every linear layer of the tiny transformer, ranks 2 and 4, scales 0.5/1/2) is written
in each layout (tests/lora_layouts.py) and applied through the AdapterCache the Qwen edit and FLUX nodes use;
each linear layer's effective weight change, measured through its real (stacked) forward, must equal
strength · scale · up · down of the reference, and every other layer must stay unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch
from lora_layouts import deltas, layouts, make_reference, write_layout
from safetensors.torch import save_file

from engines import flux_pipeline, qwen_edit
from engines.errors import FlenUserError
from engines.lora_formats import guess_architecture, linear_modules
from engines.lora_stack import LoraEntry, LoraStack

STRENGTH = 0.75


@pytest.fixture(scope="module")
def handles(tiny_models):
    d = tiny_models / "diffusers"
    return {
        "flux": flux_pipeline.load_flux(d / "flen-tiny-flux", "flen-tiny-flux", "fp32", torch.device("cpu")),
        "qwen_image": qwen_edit.load_qwen_edit(d / "flen-tiny-qwen-image-edit", "flen-tiny-qwen-image-edit", "fp32",
                                               torch.device("cpu")),
    }


def effective_deltas(transformer) -> dict[str, torch.Tensor]:
    """Each linear layer's weight change as its forward computes it: layer(I) - base_layer(I)."""
    out = {}
    with torch.no_grad():
        for name, layer in transformer.named_modules():
            base = getattr(layer, "base_layer", None)
            if base is None or not isinstance(base, torch.nn.Linear):
                continue
            eye = torch.eye(base.in_features)
            out[name] = (layer(eye) - base(eye)).t()
    return out


def _apply(handle, path, name, strength=STRENGTH):
    stack = LoraStack().extended(LoraEntry(name=name, path=str(path), strength=strength))
    handle.adapters.apply(stack)


def _write(tmp_path, name, tensors, meta=None):
    path = tmp_path / name
    save_file(tensors, path, metadata=meta)
    return path


@pytest.mark.parametrize("arch, layout", [(a, lay) for a in ("flux", "qwen_image") for lay in layouts(a)])
def test_every_layout_has_exactly_its_reference_effect(handles, tmp_path, arch, layout):
    handle = handles[arch]
    transformer = handle.pipe.transformer
    linears = linear_modules(transformer)
    ref = make_reference(linears, seed=len(layout))
    tensors, meta, covered, dtype = write_layout(layout, ref, linears, arch)
    path = _write(tmp_path, f"{arch}_{layout}.safetensors", tensors, meta)
    _apply(handle, path, f"{arch}_{layout}.safetensors")
    # the reference after rounding to the file's dtype: what an exact conversion must give
    expected = deltas({n: (d.to(dtype).float(), u.to(dtype).float(), a) for n, (d, u, a) in ref.items()}, covered)
    measured = effective_deltas(transformer)
    assert len(covered) >= (len(linears) if layout != "xlabs" else 8)
    for name in linears:
        want = STRENGTH * expected[name] if name in expected else torch.zeros(linears[name][1], linears[name][0])
        got = measured.get(name, torch.zeros_like(want))
        scale = float(want.abs().max()) or 1.0
        assert torch.allclose(got, want, atol=2e-5 * max(scale, 1.0), rtol=1e-4), \
            f"{layout}: {name} changed by max {float((got - want).abs().max()):.3g} from the reference " \
            f"(largest reference entry {scale:.3g})"
    handle.adapters.apply(LoraStack())
    assert all(float(v.abs().max()) == 0.0 for v in effective_deltas(transformer).values())


def _sd15():
    return {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(32, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}


def _refusal(handle, tmp_path, name, tensors, meta=None) -> str:
    path = _write(tmp_path, name, tensors, meta)
    before = handle.adapters.file_reads
    with pytest.raises(FlenUserError) as err:
        _apply(handle, path, name)
    assert handle.adapters.file_reads == before + 1
    assert name in str(err.value)
    assert f"flen_{name.removesuffix('.safetensors')}" not in getattr(handle.pipe.transformer, "peft_config", {})
    return str(err.value)


def test_sd15_file_is_named_as_such_with_its_own_key_names(handles, tmp_path):
    msg = _refusal(handles["flux"], tmp_path, "sd15.safetensors", _sd15())
    assert "layout 'lora_unet_…lora_down/up + alpha', kohya / musubi-tuner" in msg
    assert "apparently for Stable Diffusion (UNet)." in msg and msg.startswith("LoRA 'sd15.safetensors' does not fit")
    assert "'lora_unet_down_blocks_0_attentions_0_proj_in'" in msg  # the file's name, not a mangled one
    assert "does not fit this FLUX.1 model" in msg and "Pick a FLUX.1 LoRA" in msg


def test_flux_bfl_file_on_qwen_is_called_a_flux_lora(handles, tmp_path):
    flux_linears = linear_modules(handles["flux"].pipe.transformer)
    tensors, _, _, _ = write_layout("kohya_fp16", make_reference(flux_linears, 1), flux_linears, "flux")
    msg = _refusal(handles["qwen_image"], tmp_path, "flux_bfl.safetensors", tensors)
    assert msg.endswith("apparently for FLUX.1.")
    assert "does not fit this Qwen-Image(-Edit) model" in msg


@pytest.mark.parametrize("arch", ["flux", "qwen_image"])
def test_partial_files_are_refused_naming_the_modules(handles, tmp_path, arch):
    handle = handles[arch]
    linears = linear_modules(handle.pipe.transformer)
    layout = "diffusers_kohya_fp16" if arch == "flux" else "kohya_fp16"  # proj_out under its diffusers name
    tensors, meta, _, _ = write_layout(layout, make_reference(linears, 2), linears, arch)
    extra = dict(tensors)
    extra["lora_unet_transformer_blocks_7_attn_to_q.lora_down.weight"] = torch.zeros(4, 32, dtype=torch.float16)
    extra["lora_unet_transformer_blocks_7_attn_to_q.lora_up.weight"] = torch.zeros(32, 4, dtype=torch.float16)
    msg = _refusal(handle, tmp_path, "partial.safetensors", extra, meta)
    assert "cannot be applied completely" in msg and "1 do not exist" in msg
    assert "'lora_unet_transformer_blocks_7_attn_to_q'" in msg and "never applies part of a LoRA" in msg
    half = {k: v for k, v in tensors.items() if not k.startswith("lora_unet_proj_out.lora_up")}
    msg = _refusal(handle, tmp_path, "half.safetensors", half)
    assert "1 have only half of a down/up pair ('lora_unet_proj_out')" in msg
    wrong = dict(tensors)
    wrong["lora_unet_proj_out.lora_down.weight"] = torch.zeros(4, 7, dtype=torch.float16)
    msg = _refusal(handle, tmp_path, "wrong_shape.safetensors", wrong)
    assert "1 have other shapes than the model's layers ('lora_unet_proj_out is 7→" in msg
    te = dict(tensors)
    te["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 32)
    te["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(32, 4)
    msg = _refusal(handle, tmp_path, "with_te.safetensors", te)
    assert "1 are text-encoder modules" in msg


@pytest.mark.parametrize("kind, keys, says", [
    ("dora", {"transformer.proj_out.lora_A.weight": (4, 32), "transformer.proj_out.lora_B.weight": (4, 4),
              "transformer.proj_out.lora_magnitude_vector": (4,)}, "DoRA"),
    ("dora_kohya", {"lora_unet_proj_out.lora_down.weight": (4, 32), "lora_unet_proj_out.lora_up.weight": (4, 4),
                    "lora_unet_proj_out.alpha": (), "lora_unet_proj_out.dora_scale": (4, 1)}, "DoRA"),
    ("lokr", {"lycoris_proj_out.lokr_w1": (2, 2), "lycoris_proj_out.lokr_w2": (2, 16)}, "LoKr (LyCORIS)"),
    ("loha", {"lycoris_proj_out.hada_w1_a": (4, 2), "lycoris_proj_out.hada_w1_b": (2, 32),
              "lycoris_proj_out.hada_w2_a": (4, 2), "lycoris_proj_out.hada_w2_b": (2, 32)}, "LoHa (LyCORIS)"),
    ("diff", {"diffusion_model.proj_out.diff": (4, 32)}, "full-weight differences"),
    ("empty", {"some.random.tensor": (3,)}, "holds no LoRA weights: none of its 1 tensors"),
])
def test_dora_lycoris_and_foreign_files_are_refused_clearly(handles, tmp_path, kind, keys, says):
    tensors = {k: torch.ones(shape) for k, shape in keys.items()}
    msg = _refusal(handles["flux"], tmp_path, f"{kind}.safetensors", tensors)
    assert says in msg
    if kind in ("dora", "dora_kohya", "lokr", "loha"):
        assert "FLENApplyLoraStack" in msg and "plain LoRA" in msg


def test_peft_metadata_alpha_is_honoured_and_rslora_too(handles, tmp_path):
    """The same pair under three metadata settings: no metadata (scale 1), lora_alpha 16 at rank 4 (×4),
    and use_rslora (16/√4 = ×8)."""
    handle = handles["flux"]
    g = torch.Generator().manual_seed(9)
    down, up = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    tensors = {"transformer.context_embedder.lora_A.weight": down, "transformer.context_embedder.lora_B.weight": up}
    for label, cfg, factor in (("none", None, 1.0), ("alpha16", {"lora_alpha": 16, "r": 4}, 4.0),
                               ("rslora", {"lora_alpha": 16, "r": 4, "use_rslora": True}, 8.0)):
        meta = {"lora_adapter_metadata": json.dumps(cfg)} if cfg else None
        path = _write(tmp_path, f"meta_{label}.safetensors", tensors, meta)
        _apply(handle, path, f"meta_{label}.safetensors", strength=1.0)
        got = effective_deltas(handle.pipe.transformer)["context_embedder"]
        assert torch.allclose(got, factor * up @ down, atol=1e-4), label
    handle.adapters.apply(LoraStack())


def test_architecture_guess_puts_bfl_flux_before_qwen():
    assert guess_architecture(["lora_unet_double_blocks_0_img_mlp_0.lora_down.weight"]) == "FLUX.1"
    assert guess_architecture(["diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight"]) == "FLUX.1"
    assert guess_architecture(["transformer_blocks.0.img_mlp.net.0.proj.lora_down.weight"]) == "Qwen-Image(-Edit)"


def test_lora_on_fp8_stored_layers_keeps_bf16_weights_with_the_folded_scale(tiny_models, tmp_path):
    """On the pack's fp8 layers the LoRA pair is bf16 (an fp8 pair would round the file's values) and holds
    the file's values with the layout's scale folded into up."""
    from diffusers import FluxTransformer2DModel

    from engines.fp8_linear import Fp8Linear, convert_linears_to_fp8
    from engines.lora_adapters import load_adapter
    from engines.lora_formats import load_lora_file

    transformer = FluxTransformer2DModel.from_pretrained(tiny_models / "diffusers" / "flen-tiny-flux" / "transformer")
    assert convert_linears_to_fp8(transformer, torch.bfloat16) > 0
    linears = linear_modules(transformer)
    tensors, meta, _, _ = write_layout("kohya_fp16", make_reference(linears, 4), linears, "flux")
    path = _write(tmp_path, "fp8.safetensors", tensors, meta)
    converted = load_lora_file("fp8.safetensors", path, transformer, "flux")
    load_adapter(transformer, converted, "fp8_test")
    layers = dict(transformer.named_modules())
    checked = 0
    for name, module in converted.modules.items():
        layer = layers[name]
        if not isinstance(layer.base_layer, Fp8Linear):
            continue
        b = layer.lora_B["fp8_test"].weight
        assert layer.lora_A["fp8_test"].weight.dtype == b.dtype == torch.bfloat16
        assert torch.equal(b, (module.up.float() * module.scale).to(torch.bfloat16))
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("layout", ["kohya_fp16", "comfy_ab"])
def test_flux_dev_guidance_in_maps_too(tmp_path, layout):
    """FLUX.1-dev has a guidance embedder (the tiny pipeline, like schnell, has none): BFL ``guidance_in``
    lands on it like every other module."""
    from diffusers import FluxTransformer2DModel

    from engines.lora_adapters import load_adapter
    from engines.lora_formats import load_lora_file

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    linears = linear_modules(transformer)
    assert "time_text_embed.guidance_embedder.linear_1" in linears
    ref = make_reference(linears, seed=3)
    tensors, meta, covered, dtype = write_layout(layout, ref, linears, "flux")
    assert any("guidance_in" in k for k in tensors)
    path = _write(tmp_path, "dev.safetensors", tensors, meta)
    load_adapter(transformer, load_lora_file("dev.safetensors", path, transformer, "flux"), "dev")
    expected = deltas({n: (d.to(dtype).float(), u.to(dtype).float(), a) for n, (d, u, a) in ref.items()}, covered)
    measured = effective_deltas(transformer)
    assert set(measured) == set(linears) == set(expected)
    for name, want in expected.items():
        assert torch.allclose(measured[name], want, atol=2e-5, rtol=1e-4), name
