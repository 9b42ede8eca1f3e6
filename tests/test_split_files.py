"""ComfyUI's split files: the kit writes them in ComfyUI's names and dtypes, the loaders read them (bf16, fp8_e4m3fn,
fp8 scaled, fp8 kept fp8 on the CPU too), outputs equal the diffusers folders', and wrong files get clear errors."""

from __future__ import annotations

import struct

import pytest
import torch

from engines import flux_pipeline, qwen_edit
from engines import split_files as sf
from engines.errors import FlenUserError
from engines.fp8_linear import E4M3, Fp8Linear
from engines.lora_stack import LoraStack
from engines.model_host import LocalHost
from tools import tiny_models as tm
from tools import tiny_split_files as ts

CPU = torch.device("cpu")
# bf16 split files hold the tiny diffusers folders' (bf16-valued) weights exactly: the only difference left is
# float32 summation order. fp8 files round every block weight to 3 mantissa bits.
SAME_TOL = 1e-5
FP8_TOL = 0.05


def _split(tiny_models, arch: str, key: str) -> str:
    files = ts.FLUX_FILES if arch == "flux" else ts.QWEN_FILES
    return str(tiny_models / ts.folder_of(key) / ts.SPLIT_DIRNAME / files[key])


def _flux_files(tiny_models, dm="diffusion_model", t5="t5xxl") -> flux_pipeline.FluxFiles:
    return flux_pipeline.FluxFiles(_split(tiny_models, "flux", dm), _split(tiny_models, "flux", "clip_l"),
                                   _split(tiny_models, "flux", t5), _split(tiny_models, "flux", "vae"))


def _qwen_files(tiny_models, dm="diffusion_model", te="text_encoder") -> qwen_edit.QwenEditFiles:
    return qwen_edit.QwenEditFiles(_split(tiny_models, "qwen", dm), _split(tiny_models, "qwen", te),
                                   _split(tiny_models, "qwen", "vae"))


FLUX_REQUEST = flux_pipeline.FluxRequest(prompts=("a photo of a person, smile",), width=64, height=64, steps=2,
                                         seed=5)
EDIT_REQUEST = qwen_edit.EditRequest(instruction="turn the head to the left", steps=2, seed=5, width=64, height=64)


@pytest.fixture(scope="module")
def flux_reference(tiny_models):
    handle = flux_pipeline.load_flux(tiny_models / "diffusers" / tm.FLUX_DIRNAME, "ref", "fp32", CPU)
    return flux_pipeline.generate(handle, FLUX_REQUEST, LoraStack(), LocalHost())[0]


@pytest.fixture(scope="module")
def qwen_reference(tiny_models):
    handle = qwen_edit.load_qwen_edit(tiny_models / "diffusers" / tm.QWEN_EDIT_DIRNAME, "ref", "fp32", CPU)
    return qwen_edit.edit(handle, [tm.draw_test_face(1, 64)], EDIT_REQUEST, LoraStack(), LocalHost())[0]


# ------------------------------------------------------------------------------------------------ the kit's files

def test_kit_writes_comfyui_names_folders_and_dtypes(tiny_models):
    flux = sf.read_header(_split(tiny_models, "flux", "diffusion_model"))[0]
    assert "double_blocks.0.img_attn.qkv.weight" in flux and "single_blocks.0.linear1.weight" in flux
    assert "final_layer.adaLN_modulation.1.weight" in flux
    assert {d for d, _ in flux.values()} == {"BF16"}
    fp8 = sf.read_header(_split(tiny_models, "flux", "diffusion_model_fp8"))[0]
    assert fp8["double_blocks.0.img_attn.qkv.weight"][0] == "F8_E4M3" and fp8["img_in.weight"][0] == "BF16"
    assert not any(k.endswith(".scale_weight") for k in fp8)
    scaled = sf.read_header(_split(tiny_models, "flux", "diffusion_model_fp8_scaled"))[0]
    assert "scaled_fp8" in scaled and "double_blocks.0.img_attn.qkv.scale_weight" in scaled
    vae = sf.read_header(_split(tiny_models, "qwen", "vae"))[0]
    assert "decoder.middle.0.residual.0.gamma" in vae and "encoder.downsamples.0.residual.0.gamma" in vae
    te = sf.read_header(_split(tiny_models, "qwen", "text_encoder"))[0]
    assert "model.embed_tokens.weight" in te and "visual.blocks.0.attn.qkv.weight" in te
    assert not any(k.startswith("lm_head") for k in te)
    clip = sf.read_header(_split(tiny_models, "flux", "clip_l"))[0]
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in clip
    kinds = {key: sf.inspect_file(_split(tiny_models, arch, key)).kind
             for arch, names in (("flux", ts.FLUX_FILES), ("qwen", ts.QWEN_FILES)) for key in names}
    assert kinds["diffusion_model_fp8_scaled"] in ("flux_transformer", "qwen_image_transformer")
    assert {kinds[k] for k in ("clip_l", "t5xxl", "text_encoder", "vae")} == {"clip_text", "t5_encoder",
                                                                              "qwen25_vl", "wan_vae"}
    assert sf.inspect_file(_split(tiny_models, "flux", "diffusion_model_fp8_scaled")).storage == "fp8_scaled"
    assert sf.inspect_file(_split(tiny_models, "qwen", "diffusion_model_fp8")).storage == "fp8_e4m3fn"


def test_kit_layouts_are_what_diffusers_converters_read(tiny_models):
    """diffusers' own converters of LDM / Wan names (independent of this pack's maps) turn the kit's VAE files back
    into exactly the tiny diffusers folders' tensors. (diffusers' FLUX converter assumes the full width; the BFL
    layout is checked against ComfyUI's own FLUX model in test_comfy_layout.py.)"""
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_wan_vae_to_diffusers
    from safetensors.torch import load_file

    flux_dir = tiny_models / "diffusers" / tm.FLUX_DIRNAME
    qwen_dir = tiny_models / "diffusers" / tm.QWEN_EDIT_DIRNAME
    pairs = [
        (convert_ldm_vae_checkpoint(load_file(_split(tiny_models, "flux", "vae")),
                                    dict(AutoencoderKL.load_config(flux_dir / "vae"))),
         AutoencoderKL.from_pretrained(flux_dir / "vae").state_dict()),
        (convert_wan_vae_to_diffusers(load_file(_split(tiny_models, "qwen", "vae"))),
         AutoencoderKLQwenImage.from_pretrained(qwen_dir / "vae").state_dict()),
    ]
    for converted, reference in pairs:
        assert set(converted) == set(reference)
        for key, value in reference.items():
            assert torch.equal(converted[key].float(), value.float()), key


# --------------------------------------------------------------------------------------- same outputs as diffusers

def test_flux_from_bf16_split_files_equals_the_diffusers_folder(tiny_models, flux_reference):
    handle = flux_pipeline.load_flux_files(_flux_files(tiny_models), "split", "fp32", CPU)
    images, metas = flux_pipeline.generate(handle, FLUX_REQUEST, LoraStack(), LocalHost())
    assert metas[0]["model"] == "split"
    assert (images - flux_reference).abs().max().item() < SAME_TOL
    assert images.std() > 1e-3


def test_qwen_edit_from_bf16_split_files_equals_the_diffusers_folder(tiny_models, qwen_reference):
    handle = qwen_edit.load_qwen_edit_files(_qwen_files(tiny_models), "split", "auto", CPU)
    assert handle.pipe.text_encoder.lm_head.weight is handle.pipe.text_encoder.model.language_model.embed_tokens.weight
    images, _ = qwen_edit.edit(handle, [tm.draw_test_face(1, 64)], EDIT_REQUEST, LoraStack(), LocalHost())
    assert (images - qwen_reference).abs().max().item() < SAME_TOL


@pytest.mark.parametrize("dm, te", [("diffusion_model_fp8", "t5xxl"),
                                    ("diffusion_model_fp8_scaled", "t5xxl_fp8_scaled")])
def test_flux_fp8_files_stay_fp8_on_the_cpu_and_run(tiny_models, flux_reference, dm, te):
    handle = flux_pipeline.load_flux_files(_flux_files(tiny_models, dm, te), "fp8", "auto", CPU)
    qkv = handle.pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == E4M3
    assert isinstance(handle.pipe.transformer.x_embedder, torch.nn.Linear)  # 16-bit in the file, 16-bit here
    images, _ = flux_pipeline.generate(handle, FLUX_REQUEST, LoraStack(), LocalHost())
    diff = (images - flux_reference).abs().max().item()
    assert 0 < diff < FP8_TOL


@pytest.mark.parametrize("dm, te", [("diffusion_model_fp8", "text_encoder"),
                                    ("diffusion_model_fp8_scaled", "text_encoder_fp8_scaled")])
def test_qwen_fp8_files_stay_fp8_and_run(tiny_models, qwen_reference, dm, te):
    handle = qwen_edit.load_qwen_edit_files(_qwen_files(tiny_models, dm, te), "fp8", "auto", CPU)
    layer = handle.pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == E4M3
    if te.endswith("scaled"):
        q = handle.pipe.text_encoder.model.language_model.layers[0].self_attn.q_proj
        assert isinstance(q, Fp8Linear) and q.weight.dtype == E4M3
    images, _ = qwen_edit.edit(handle, [tm.draw_test_face(1, 64)], EDIT_REQUEST, LoraStack(), LocalHost())
    diff = (images - qwen_reference).abs().max().item()
    assert 0 < diff < FP8_TOL


def test_scaled_fp8_keeps_the_files_bytes_and_scale(tiny_models):
    """The e4m3 bytes go into the Fp8Linear untouched with ComfyUI's scale_weight; dequantised on the CPU they equal
    ComfyUI's own dequantisation (weight × scale_weight), split along BFL's fused qkv."""
    from safetensors.torch import load_file

    path = _split(tiny_models, "flux", "diffusion_model_fp8_scaled")
    raw = load_file(path)
    model = sf.load_flux_transformer(path, sf.file_dtypes("auto", CPU))
    layer = model.transformer_blocks[0].attn.to_k
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    fused = raw["double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(layer.weight.view(torch.uint8), fused[hidden:2 * hidden].view(torch.uint8))
    assert layer.weight_scale.item() == raw["double_blocks.0.img_attn.qkv.scale_weight"].item() != 1.0
    expected = fused[hidden:2 * hidden].float() * raw["double_blocks.0.img_attn.qkv.scale_weight"]
    assert torch.equal(layer.dequantized_weight(), expected)
    plain = sf.load_flux_transformer(_split(tiny_models, "flux", "diffusion_model_fp8"), sf.file_dtypes("auto", CPU))
    assert plain.transformer_blocks[0].attn.to_k.weight_scale.item() == 1.0


def test_checkpoint_style_prefix_is_stripped(tiny_models, tmp_path):
    """ComfyUI also writes diffusion models with ``model.diffusion_model.`` in front (diffusers does not strip it
    for Qwen-Image); the loader does, and gives the same weights."""
    from safetensors.torch import load_file

    src = _split(tiny_models, "qwen", "diffusion_model_fp8_scaled")
    sd = load_file(src)
    path = tmp_path / "qwen_prefixed.safetensors"
    ts.write_safetensors(path, {f"model.diffusion_model.{k}": v for k, v in sd.items()},
                         sf.inspect_file(src).metadata)
    assert sf.inspect_file(path).prefix == "model.diffusion_model."
    dtypes = sf.file_dtypes("auto", CPU)
    a, b = sf.load_qwen_transformer(src, dtypes), sf.load_qwen_transformer(str(path), dtypes)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va.view(torch.uint8) if va.dtype == E4M3 else va,
                                        vb.view(torch.uint8) if vb.dtype == E4M3 else vb)


def test_precision_fp8_quantises_a_bf16_file_and_fp32_dequantises_an_fp8_one(tiny_models):
    quantised = sf.load_qwen_transformer(_split(tiny_models, "qwen", "diffusion_model"), sf.file_dtypes("fp8", CPU))
    assert isinstance(quantised.transformer_blocks[0].attn.to_q, Fp8Linear)
    assert type(quantised.proj_out) is torch.nn.Linear  # the outer projections stay in the compute dtype
    full = sf.load_qwen_transformer(_split(tiny_models, "qwen", "diffusion_model_fp8"), sf.file_dtypes("fp32", CPU))
    assert type(full.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert full.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32


def test_shipped_full_size_configs_build_the_real_architectures():
    """The configs that replace the diffusers folders' (nothing downloads) describe the full-size models."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel, QwenImageTransformer2DModel

    with init_empty_weights():
        flux = FluxTransformer2DModel.from_config(sf.shipped_config(sf.FLUX_CONFIGS, "transformer"))
        qwen = QwenImageTransformer2DModel.from_config(sf.shipped_config(sf.QWEN_EDIT_CONFIGS, "transformer"))
        vae = AutoencoderKL.from_config(sf.shipped_config(sf.FLUX_CONFIGS, "vae"))
    assert 11.8e9 < sum(p.numel() for p in flux.parameters()) < 12.0e9
    assert 20.3e9 < sum(p.numel() for p in qwen.parameters()) < 20.5e9
    assert 83e6 < sum(p.numel() for p in vae.parameters()) < 84.5e6


def test_comfyuis_bundled_tokenizers_serve_the_real_models():
    """The real models' tokenizers come from ComfyUI's checkout (nothing downloads), shaped as diffusers needs."""
    from tools.comfy_queue import comfyui_path

    root = comfyui_path() / "comfy"
    clip = sf.clip_tokenizer(str(root / "sd1_tokenizer"))
    assert clip.model_max_length == 77 and clip("a photo").input_ids == [49406, 320, 1125, 49407]
    assert len(clip) == sf.shipped_config(sf.FLUX_CONFIGS, "text_encoder")["vocab_size"]
    t5 = sf.t5_tokenizer(str(root / "text_encoders" / "t5_tokenizer"))
    assert t5.model_max_length == 512 and t5("a photo").input_ids[-1] == t5.eos_token_id == 1
    assert len(t5) <= sf.shipped_config(sf.FLUX_CONFIGS, "text_encoder_2")["vocab_size"]
    qwen = sf.qwen_tokenizer(str(root / "text_encoders" / "qwen25_tokenizer"))
    cfg = sf.shipped_config(sf.QWEN_EDIT_CONFIGS, "text_encoder")
    ids = qwen("<|vision_start|><|image_pad|><|vision_end|>").input_ids
    assert ids == [cfg["vision_start_token_id"], cfg["image_token_id"], cfg["vision_end_token_id"]]


# ------------------------------------------------------------------------------------------------------ bad input

def _fake_safetensors(path, tensors: dict[str, tuple[str, list[int]]]) -> str:
    import json

    header, offset = {}, 0
    for key, (dtype, shape) in tensors.items():
        n = 1
        for s in shape:
            n *= s
        size = n * {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1}[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * offset)
    return str(path)


def test_a_text_encoder_in_the_diffusion_model_slot_is_named(tiny_models):
    with pytest.raises(FlenUserError) as err:
        sf.load_qwen_transformer(_split(tiny_models, "qwen", "text_encoder"), sf.file_dtypes("auto", CPU))
    msg = str(err.value)
    assert "'qwen_2.5_vl_tiny.safetensors'" in msg and "Qwen2.5-VL text encoder" in msg
    assert "models/text_encoders" in msg and "Qwen-Image-Edit-2509 diffusion model" in msg


def test_a_file_for_another_architecture_is_named(tiny_models):
    with pytest.raises(FlenUserError, match=r"'flux1-dev-tiny.safetensors' in the diffusion_models slot looks like "
                                            r"a FLUX.1 diffusion model .*needs a Qwen-Image-Edit-2509"):
        sf.load_qwen_transformer(_split(tiny_models, "flux", "diffusion_model"), sf.file_dtypes("auto", CPU))
    with pytest.raises(FlenUserError, match="looks like a Wan 2.1 / Qwen-Image VAE.*FLUX's VAE"):
        sf.load_flux_vae(_split(tiny_models, "qwen", "vae"), sf.file_dtypes("auto", CPU))
    with pytest.raises(FlenUserError, match="looks like a T5 text encoder.*CLIP-L"):
        sf.load_clip_l(_split(tiny_models, "flux", "t5xxl"), sf.file_dtypes("auto", CPU))


def test_gguf_pickle_e5m2_and_sd_files_are_refused_clearly(tmp_path):
    gguf = tmp_path / "qwen-image-edit-2509-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + b"\3\0\0\0" + b"\0" * 64)
    with pytest.raises(FlenUserError, match=r"'qwen-image-edit-2509-Q4_K_M.gguf' is a GGUF file.*ComfyUI-GGUF"):
        sf.load_qwen_transformer(str(gguf), sf.file_dtypes("auto", CPU))
    ckpt = tmp_path / "flux1-dev.ckpt"
    ckpt.write_bytes(b"PK\3\4" + b"\0" * 100)
    with pytest.raises(FlenUserError, match=r"'flux1-dev.ckpt' is a pickle checkpoint.*\.safetensors files only"):
        sf.inspect_file(ckpt)
    e5m2 = _fake_safetensors(tmp_path / "flux_e5m2.safetensors", {
        "double_blocks.0.img_attn.qkv.weight": ("F8_E5M2", [6, 2]), "img_in.weight": ("BF16", [2, 4])})
    with pytest.raises(FlenUserError, match="fp8_e5m2.*fp8_e4m3fn or bf16 file"):
        sf.load_flux_transformer(e5m2, sf.file_dtypes("auto", CPU))
    unet = _fake_safetensors(tmp_path / "sdxl.safetensors", {"model.diffusion_model.input_blocks.0.0.weight":
                                                             ("F16", [4, 4])})
    with pytest.raises(FlenUserError, match="'sdxl.safetensors'.*Stable Diffusion / SDXL UNet"):
        sf.load_flux_transformer(unet, sf.file_dtypes("auto", CPU))
    sd_vae = _fake_safetensors(tmp_path / "sdxl_vae.safetensors", {"decoder.up.0.block.0.conv1.weight":
                                                                   ("F16", [4, 4]), "decoder.conv_in.weight":
                                                                   ("F16", [512, 4, 3, 3])})
    with pytest.raises(FlenUserError, match="4 latent channels.*ae.safetensors"):
        sf.load_flux_vae(sd_vae, sf.file_dtypes("auto", CPU))


def test_a_truncated_variant_is_named_with_the_missing_weight(tiny_models, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(_split(tiny_models, "qwen", "diffusion_model"))
    sd.pop("transformer_blocks.1.attn.to_q.weight")
    path = tmp_path / "qwen_partial.safetensors"
    ts.write_safetensors(path, sd, sf.inspect_file(_split(tiny_models, "qwen", "diffusion_model")).metadata)
    with pytest.raises(FlenUserError, match=r"'qwen_partial.safetensors' lacks 1 of the weights.*"
                                            r"transformer_blocks.1.attn.to_q.weight"):
        sf.load_qwen_transformer(str(path), sf.file_dtypes("auto", CPU))
    # a full-size file of another width: the shipped config does not fit its shapes
    plain = dict(sd)
    path2 = tmp_path / "qwen_other.safetensors"
    ts.write_safetensors(path2, plain, {})
    with pytest.raises(FlenUserError, match="'qwen_other.safetensors' holds .* with shape .* needs"):
        sf.load_qwen_transformer(str(path2), sf.file_dtypes("auto", CPU))
