"""Tiny-model kit: writes randomly initialised, tiny but real model folders for tests and the demo.

``write_tiny_models(models_dir)`` writes, deterministically for a given seed and in a few seconds on CPU:

* ``diffusers/flen-tiny-qwen-image-edit/`` - a ``QwenImageEditPlusPipeline`` folder (tiny transformer, tiny
  Qwen-Image VAE, tiny Qwen2.5-VL text encoder, Qwen2 byte-level BPE tokenizer trained offline, Qwen2-VL
  processor, flow-matching scheduler);
* ``diffusers/flen-tiny-flux/`` - a ``FluxPipeline`` folder (1+1 blocks, CLIP + T5 encoders, one-block VAE);
* ``insightface/models/flen-tiny/`` - an insightface pack: a hand-designed SCRFD-layout detector that finds
  the synthetic faces drawn by :func:`draw_test_face` (and nothing on grey or noise), and a fixed random
  112x112 -> 512 recogniser;
* ``loras/flen-tiny/`` - two LoRAs for each pipeline in the diffusers key format.

Nothing is downloaded. The module imports nothing from ComfyUI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tools import tiny_split_files

QWEN_EDIT_DIRNAME = "flen-tiny-qwen-image-edit"
FLUX_DIRNAME = "flen-tiny-flux"
INSIGHTFACE_PACK = "flen-tiny"
LORA_DIRNAME = "flen-tiny"
LORA_RANK = 4
LORA_FILES = {
    "flux": ("flux_lora_a.safetensors", "flux_lora_b.safetensors"),
    "qwen_edit": ("qwen_edit_lora_a.safetensors", "qwen_edit_lora_b.safetensors"),
}
DETECTOR_FILE = "det_flen_tiny.onnx"
RECOGNIZER_FILE = "w600k_flen_tiny.onnx"

_CORPUS = [
    "a photo of a person, portrait, close-up of a face, studio light",
    "turn the head to the left; turn the head to the right; look up; look down; smile; frown",
    "the same character seen from the side, three-quarter view, back view, full body, sitting, standing",
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then "
    "explain how the user's text instruction should alter or modify the image. Generate a new image that "
    "meets the user's requirements while maintaining consistency with the original input where appropriate.",
    "Picture 1: Picture 2: Picture 3: system user assistant",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,:;'\"()[]{}<>-_+=*/\\|@#$%^&~`",
    "red green blue yellow white black grey hair eyes mouth nose glasses hat beard short long curly",
    "rotate the camera 45 degrees, move the camera closer, wide angle lens, bird's-eye view, low angle",
]


# ----------------------------------------------------------------------------------------------------
# tokenizers (trained offline with the `tokenizers` library)
# ----------------------------------------------------------------------------------------------------


def _pretokenized_counts(pre_tokenizer, normalize=None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for text in _CORPUS:
        text = normalize(text) if normalize else text
        for word, _span in pre_tokenizer.pre_tokenize_str(text):
            counts[word] = counts.get(word, 0) + 1
    return counts


def _train_bpe(counts: dict[str, int], alphabet: list[str], vocab_size: int, specials: list[str],
               suffix: str = "") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE training with deterministic tie-breaking (the `tokenizers` trainer breaks ties in hash
    order, which makes the written tokenizer.json differ between runs)."""
    vocab: dict[str, int] = {}
    for tok in specials + alphabet + ([a + suffix for a in alphabet] if suffix else []):
        vocab.setdefault(tok, len(vocab))
    words = []
    for word in sorted(counts):
        syms = list(word)
        if suffix:
            syms[-1] += suffix
        words.append((syms, counts[word]))
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: dict[tuple[str, str], int] = {}
        for syms, c in words:
            for pair in zip(syms, syms[1:], strict=False):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda pr: (-pairs[pr], pr))
        merged = best[0] + best[1]
        merges.append(best)
        vocab.setdefault(merged, len(vocab))
        for syms, _c in words:
            i = 0
            while i < len(syms) - 1:
                if syms[i] == best[0] and syms[i + 1] == best[1]:
                    syms[i:i + 2] = [merged]
                i += 1
    return vocab, merges


def _train_clip_tokenizer(vocab_size: int = 600):
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    proto = CLIPTokenizer()
    counts = _pretokenized_counts(proto.backend_tokenizer.pre_tokenizer,
                                  proto.backend_tokenizer.normalizer.normalize_str)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = _train_bpe(counts, alphabet, vocab_size, ["<|startoftext|>", "<|endoftext|>"], "</w>")
    # transformers annotates merges as strings; its BPE tokenizers take (left, right) pairs too.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]


def _train_t5_tokenizer(vocab_size: int = 300):
    """A Unigram vocabulary: every character plus the most frequent substrings, log-frequency scores."""
    from tokenizers import pre_tokenizers
    from transformers import T5Tokenizer

    counts = _pretokenized_counts(pre_tokenizers.Metaspace())
    subs: dict[str, int] = {}
    chars: set[str] = set()
    for word, c in counts.items():
        chars.update(word)
        for i in range(len(word)):
            for j in range(i + 2, min(len(word), i + 8) + 1):
                subs[word[i:j]] = subs.get(word[i:j], 0) + c
    specials = ["<pad>", "</s>", "<unk>"]
    n_sub = max(0, vocab_size - len(specials) - len(chars))
    best = sorted(subs, key=lambda t: (-subs[t] * len(t), t))[:n_sub]
    pieces = sorted(chars) + best
    total = float(sum(subs.get(p, 0) for p in best) + sum(counts.values()) * 4)
    vocab = [(t, 0.0) for t in specials]
    for piece in pieces:
        freq = subs.get(piece, 0) * len(piece) if len(piece) > 1 else 1
        vocab.append((piece, round(math.log(max(freq, 1) / total), 4)))
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _train_qwen_tokenizer(vocab_size: int = 600):
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    proto = Qwen2Tokenizer()
    counts = _pretokenized_counts(proto.backend_tokenizer.pre_tokenizer)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = _train_bpe(counts, alphabet, vocab_size, list(_QWEN_SPECIALS))
    # transformers annotates merges as strings; its BPE tokenizers take (left, right) pairs too.
    qtok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=4096)  # type: ignore[arg-type]
    qtok.add_special_tokens({"additional_special_tokens": _QWEN_SPECIALS[1:]})
    return qtok


# ----------------------------------------------------------------------------------------------------
# diffusers pipelines
# ----------------------------------------------------------------------------------------------------


def _seeded(seed: int, build):
    import torch

    torch.manual_seed(seed)
    model = build()
    with torch.no_grad():
        for param in model.parameters():
            # bf16 values in fp32: ComfyUI's bf16 split files of these models then hold exactly the same weights
            param.copy_(param.to(torch.bfloat16).float())
    return model.eval()


def build_tiny_flux(seed: int = 0):
    """A tiny FluxPipeline (in memory)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = _train_clip_tokenizer()
    tokenizer_2 = _train_t5_tokenizer()
    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ))
    clip_cfg = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=5, vocab_size=len(tokenizer), hidden_act="gelu",
        projection_dim=32, max_position_embeddings=77,
    )
    text_encoder = _seeded(seed + 1, lambda: CLIPTextModel(clip_cfg))
    # transformers' @strict configs declare only their own fields; the rest (decoder_start_token_id, vocab_size
    # below) go through __post_init__(**kwargs), which the checker cannot see.
    t5_cfg = T5Config(  # type: ignore[call-arg]
        d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=len(tokenizer_2),
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0, is_encoder_decoder=False,
        use_cache=False,
    )
    text_encoder_2 = _seeded(seed + 2, lambda: T5EncoderModel(t5_cfg))
    vae = _seeded(seed + 3, lambda: AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    ))
    scheduler = FlowMatchEulerDiscreteScheduler()
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def build_tiny_qwen_edit(seed: int = 0):
    """A tiny QwenImageEditPlusPipeline (in memory)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = _train_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    transformer = _seeded(seed, lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ))
    # The Qwen-Image VAE's real layout (4 levels of 2 residual blocks), only narrow: Wan's key names (ComfyUI's
    # qwen_image_vae.safetensors) and diffusers' converter assume it.
    vae = _seeded(seed + 1, lambda: AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ))
    te_cfg = Qwen2_5_VLConfig(  # type: ignore[call-arg]
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 4096,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "rope_parameters": {"mrope_section": [1, 1, 2], "rope_type": "default", "rope_theta": 1000000.0},
        },
        vision_config={
            "depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
            "fullatt_block_indexes": [1], "window_size": 112,
        },
        vocab_size=len(tokenizer),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = _seeded(seed + 2, lambda: Qwen2_5_VLForConditionalGeneration(te_cfg))
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
    )
    scheduler = FlowMatchEulerDiscreteScheduler()
    return QwenImageEditPlusPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
        transformer=transformer,
    )


# ----------------------------------------------------------------------------------------------------
# LoRAs
# ----------------------------------------------------------------------------------------------------

_LORA_TARGETS = {
    "flux": ["to_q", "to_k", "to_v", "to_out.0"],
    "qwen_edit": ["to_q", "to_k", "to_v", "to_out.0"],
}


def _lora_state_dict(transformer, targets, seed: int) -> dict:
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    cfg = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets, init_lora_weights=False)
    transformer.add_adapter(cfg, adapter_name="tiny")
    sd = get_peft_model_state_dict(transformer, adapter_name="tiny")
    out = {}
    for key in sorted(sd):
        # keep the LoRA clearly visible but bounded on the tiny random models
        out[f"transformer.{key}"] = (sd[key].detach().float() * 0.5).contiguous().clone()
    transformer.delete_adapters("tiny")
    return out


def _write_lora(path: Path, sd: dict, base: str) -> None:
    """Write a float32 safetensors file byte-for-byte deterministically (sorted keys and metadata; the
    safetensors library orders metadata in hash order)."""
    meta = {"flen_tiny_base": base, "format": "pt", "lora_alpha": str(LORA_RANK), "lora_rank": str(LORA_RANK)}
    header: dict = {"__metadata__": meta}
    blobs, offset = [], 0
    for key in sorted(sd):
        arr = sd[key].detach().cpu().float().contiguous().numpy().astype("<f4")
        data = arr.tobytes()
        header[key] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for data in blobs:
            fh.write(data)


# ----------------------------------------------------------------------------------------------------
# synthetic faces
# ----------------------------------------------------------------------------------------------------

# skin colour range the detector accepts (RGB, inclusive, with a soft edge); every identity's skin lies inside
SKIN_LO = (196, 112, 56)
SKIN_HI = (255, 196, 140)
# face ellipse half-axes and feature positions, as fractions of the image size (before `scale`)
_FACE_A, _FACE_B = 0.25, 0.32
_EYE_DX, _EYE_DY, _EYE_R, _IRIS_R = 0.44, -0.20, 0.115, 0.06   # fractions of the face half-axes a / b
_NOSE_DY, _NOSE_W, _NOSE_H = 0.12, 0.10, 0.08
_MOUTH_DX, _MOUTH_DY, _MOUTH_H = 0.36, 0.42, 0.07

_SKINS = [(232, 170, 120), (214, 140, 90), (248, 186, 130), (206, 128, 72), (240, 160, 100), (222, 182, 132)]
_IRIS = [(40, 90, 200), (30, 140, 60), (110, 60, 20), (20, 20, 20), (120, 120, 150), (150, 40, 150)]
_HAIR = [(30, 20, 10), (230, 220, 60), (140, 30, 20), (60, 60, 60), (20, 20, 80), (240, 240, 240)]
_LIPS = [(170, 30, 50), (120, 20, 90), (200, 60, 60), (90, 30, 30), (230, 20, 120), (150, 70, 160)]
_BACKGROUNDS = [(70, 110, 160), (60, 140, 90), (150, 150, 150), (40, 40, 70), (120, 70, 120), (90, 130, 140)]


def _palette(identity: int):
    i = int(identity)
    rng = np.random.default_rng(1000 + i)
    skin = tuple(int(c) for c in _SKINS[i % len(_SKINS)])
    iris = _IRIS[(i * 5 + 1) % len(_IRIS)]
    hair = _HAIR[(i * 7 + 2) % len(_HAIR)]
    lips = _LIPS[(i * 11 + 3) % len(_LIPS)]
    bg = _BACKGROUNDS[(i * 13 + 4) % len(_BACKGROUNDS)]
    style = int(rng.integers(0, 3))
    return skin, iris, hair, lips, bg, style


def _face_geometry(size: int, offset=(0, 0), scale: float = 1.0):
    cx = size / 2.0 + offset[0]
    cy = size / 2.0 + offset[1] + 0.04 * size * scale
    a = _FACE_A * size * scale
    b = _FACE_B * size * scale
    return cx, cy, a, b


def drawn_face_keypoints(size: int = 256, *, offset=(0, 0), scale: float = 1.0) -> np.ndarray:
    """The 5 landmarks (eyes, nose tip, mouth corners; x, y) of the face :func:`draw_test_face` draws."""
    cx, cy, a, b = _face_geometry(size, offset, scale)
    return np.array([
        [cx - _EYE_DX * a, cy + _EYE_DY * b],
        [cx + _EYE_DX * a, cy + _EYE_DY * b],
        [cx, cy + _NOSE_DY * b],
        [cx - _MOUTH_DX * a, cy + _MOUTH_DY * b],
        [cx + _MOUTH_DX * a, cy + _MOUTH_DY * b],
    ], dtype=np.float32)


def drawn_face_box(size: int = 256, *, offset=(0, 0), scale: float = 1.0) -> np.ndarray:
    """The box (x1, y1, x2, y2) the tiny detector reports for the face :func:`draw_test_face` draws."""
    cx, cy, a, b = _face_geometry(size, offset, scale)
    return np.array([cx - a, cy - b, cx + a, cy + b], dtype=np.float32)


def _draw_face_on(draw: ImageDraw.ImageDraw, identity: int, size: int, offset, scale: float) -> None:
    skin, iris, hair, lips, _bg, style = _palette(identity)
    cx, cy, a, b = _face_geometry(size, offset, scale)

    def ell(x0, y0, x1, y1, fill):
        draw.ellipse([x0, y0, x1, y1], fill=fill)

    # hair (outside the face ellipse: drawn first, the face covers it)
    if style == 0:      # round cap
        ell(cx - 1.12 * a, cy - 1.22 * b, cx + 1.12 * a, cy + 0.3 * b, hair)
    elif style == 1:    # long hair
        draw.rectangle([cx - 1.2 * a, cy - 0.5 * b, cx + 1.2 * a, cy + 1.1 * b], fill=hair)
        ell(cx - 1.2 * a, cy - 1.25 * b, cx + 1.2 * a, cy + 0.2 * b, hair)
    else:               # spiky top
        for k in range(7):
            x = cx - a + k * a / 3.0
            spike = [(x - 0.3 * a, cy - 0.7 * b), (x + 0.3 * a, cy - 0.7 * b), (x, cy - 1.3 * b)]
            draw.polygon(spike, fill=hair)
    # neck + shoulders in a non-skin shirt colour
    draw.rectangle([cx - 1.6 * a, cy + 1.25 * b, cx + 1.6 * a, cy + 2.5 * b], fill=iris)
    # face
    ell(cx - a, cy - b, cx + a, cy + b, skin)
    # eyes: white, iris, pupil
    for sx in (-1, 1):
        ex, ey = cx + sx * _EYE_DX * a, cy + _EYE_DY * b
        r = _EYE_R * 2 * a
        ell(ex - r, ey - 0.7 * r, ex + r, ey + 0.7 * r, (250, 250, 250))
        ri = _IRIS_R * 2 * a
        ell(ex - ri, ey - ri, ex + ri, ey + ri, iris)
        rp = 0.45 * ri
        ell(ex - rp, ey - rp, ex + rp, ey + rp, (0, 0, 0))
        # eyebrow
        draw.rectangle([ex - r, ey - 2.1 * r, ex + r, ey - 1.6 * r], fill=hair)
    # nose
    nx, ny = cx, cy + _NOSE_DY * b
    draw.polygon([(nx, ny - 2.2 * _NOSE_H * b), (nx - _NOSE_W * a, ny), (nx + _NOSE_W * a, ny)],
                 fill=(120, 60, 40))
    # mouth
    mdx, my0, my1 = _MOUTH_DX * a, cy + (_MOUTH_DY - _MOUTH_H) * b, cy + (_MOUTH_DY + _MOUTH_H) * b
    ell(cx - mdx, my0, cx + mdx, my1, lips)


def draw_test_face(identity: int, size: int = 256, *, offset: tuple[int, int] = (0, 0),
                   scale: float = 1.0) -> Image.Image:
    """A synthetic face-like RGB image that the tiny detector detects.

    Different ``identity`` values differ in skin tone, eye, hair, lip and background colours and hair style;
    the face geometry (and so the detector's box and landmarks) depends only on ``size``, ``offset`` and
    ``scale``: see :func:`drawn_face_box` and :func:`drawn_face_keypoints`.
    """
    bg = _palette(identity)[4]
    img = Image.new("RGB", (int(size), int(size)), bg)
    _draw_face_on(ImageDraw.Draw(img), identity, int(size), offset, float(scale))
    return img


# ----------------------------------------------------------------------------------------------------
# insightface pack (ONNX, built with the onnx package)
# ----------------------------------------------------------------------------------------------------

# The detector: a soft "skin colour" mask, its moments (mass, centroid, variance) summed over square windows
# centred on every anchor, and a score that is high only where a window holds one whole ellipse-like skin blob
# (nothing in the window's outer ring, mass consistent with the second moments). Box and landmarks follow
# from the centroid and spread, calibrated on a rendered face. Two windows (anchors) per stride:
DET_STRIDES = (8, 16, 32)
DET_WINDOWS = {8: (6, 10), 16: (8, 12), 32: (10, 18)}   # window sizes in cells of the stride (even)
DET_MASK_GAIN = 0.6         # sigmoid gain per 8-bit level at the colour range's edges
DET_MIN_AREA = 150.0        # px^2 of skin in the detector's input
DET_RING_MAX = 0.04
DET_SHAPE_TOL = 0.2
_OPSET = 17


def _skin_mask_np(rgb: np.ndarray) -> np.ndarray:
    p = rgb.astype(np.float64)
    terms = []
    for c in range(3):
        terms.append(DET_MASK_GAIN * (p[..., c] - SKIN_LO[c]))
        terms.append(DET_MASK_GAIN * (SKIN_HI[c] - p[..., c]))
    return 1.0 / (1.0 + np.exp(-np.min(np.stack(terms), axis=0)))


def _calibrate_detector(size: int = 1024) -> dict:
    """Moments of the rendered face's skin mask -> constants for the box, landmarks and shape test."""
    m = _skin_mask_np(np.asarray(draw_test_face(0, size)))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    m0 = m.sum()
    cx, cy = (m * xs).sum() / m0, (m * ys).sum() / m0
    sx = math.sqrt((m * (xs - cx) ** 2).sum() / m0)
    sy = math.sqrt((m * (ys - cy) ** 2).sum() / m0)
    box = drawn_face_box(size)
    kps = drawn_face_keypoints(size)
    return {
        "area": m0 / (sx * sy),
        "box": [(cx - box[0]) / sx, (cy - box[1]) / sy, (box[2] - cx) / sx, (box[3] - cy) / sy],
        "kps": [[(kx - cx) / sx, (ky - cy) / sy] for kx, ky in kps],
    }


class _Graph:
    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def const(self, value, name=None, dtype=np.float32):
        from onnx import numpy_helper

        self._n += 1
        name = name or f"c{self._n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, name=None, out=None, **attrs):
        from onnx import helper

        self._n += 1
        out = out or f"t{self._n}"
        outs = out if isinstance(out, list) else [out]
        name = name or f"n{self._n}_{op_type.lower()}"
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return out


def _model(g: _Graph, inputs, outputs, name: str):
    import onnx
    from onnx import helper

    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits)
    opsets = [helper.make_opsetid("", _OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="flenwheel")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_face_detector():
    """The hand-designed SCRFD-layout detector (9 outputs: scores, boxes, landmarks for strides 8/16/32)."""
    from onnx import TensorProto, helper

    cal = _calibrate_detector()
    g = _Graph()
    x = "input.1"
    # pixel values p = 128 * x + 127.5 (SCRFD's preprocessing); six linear tests of the skin colour range
    w = np.zeros((6, 3, 1, 1), np.float32)
    b = np.zeros((6,), np.float32)
    for c in range(3):
        w[2 * c, c] = DET_MASK_GAIN * 128.0
        b[2 * c] = DET_MASK_GAIN * (127.5 - SKIN_LO[c])
        w[2 * c + 1, c] = -DET_MASK_GAIN * 128.0
        b[2 * c + 1] = DET_MASK_GAIN * (SKIN_HI[c] - 127.5)
    lin = g.op("Conv", [x, g.const(w), g.const(b)], kernel_shape=[1, 1])
    m = g.op("Sigmoid", [g.op("ReduceMin", [lin], axes=[1], keepdims=1)])
    one = g.const(1.0)
    half = g.const(0.5)
    ones = g.op("Add", [g.op("Mul", [m, g.const(0.0)]), one])
    xs = g.op("Sub", [g.op("CumSum", [ones, g.const(3, dtype=np.int64)]), half])
    ys = g.op("Sub", [g.op("CumSum", [ones, g.const(2, dtype=np.int64)]), half])
    mx = g.op("Mul", [m, xs])
    my = g.op("Mul", [m, ys])
    m5 = g.op("Concat", [m, mx, my, g.op("Mul", [mx, xs]), g.op("Mul", [my, ys])], axis=1)
    pooled = {8: g.op("AveragePool", [m5], kernel_shape=[8, 8], strides=[8, 8])}
    pooled[16] = g.op("AveragePool", [pooled[8]], kernel_shape=[2, 2], strides=[2, 2])
    pooled[32] = g.op("AveragePool", [pooled[16]], kernel_shape=[2, 2], strides=[2, 2])
    eps = g.const(1e-6)
    outputs = {"score": [], "bbox": [], "kps": []}
    for s in DET_STRIDES:
        p = pooled[s]
        m_cells = g.op("Slice", [p, g.const([0], dtype=np.int64), g.const([1], dtype=np.int64),
                                 g.const([1], dtype=np.int64)])
        ones_s = g.op("Add", [g.op("Mul", [m_cells, g.const(0.0)]), one])
        stride = g.const(float(s))
        px = g.op("Mul", [g.op("Sub", [g.op("CumSum", [ones_s, g.const(3, dtype=np.int64)]), one]), stride])
        py = g.op("Mul", [g.op("Sub", [g.op("CumSum", [ones_s, g.const(2, dtype=np.int64)]), one]), stride])
        inv_s = g.const(1.0 / s)
        scores, boxes, kpss = [], [], []
        for n in DET_WINDOWS[s]:
            h = n // 2
            o = g.op("AveragePool", [p], kernel_shape=[n, n], strides=[1, 1], pads=[h, h, h - 1, h - 1],
                     count_include_pad=1)
            o_in = g.op("AveragePool", [m_cells], kernel_shape=[n - 2, n - 2], strides=[1, 1],
                        pads=[h - 1, h - 1, h - 2, h - 2], count_include_pad=1)
            names = [f"{o}_m{k}" for k in range(5)]
            g.op("Split", [o, g.const([1, 1, 1, 1, 1], dtype=np.int64)], out=names, axis=1)
            o_m, o_x, o_y, o_xx, o_yy = names
            m0 = g.op("Mul", [o_m, g.const(float((n * s) ** 2))])
            m_in = g.op("Mul", [o_in, g.const(float(((n - 2) * s) ** 2))])
            den = g.op("Add", [o_m, eps])
            cx = g.op("Div", [o_x, den])
            cy = g.op("Div", [o_y, den])
            vx = g.op("Sub", [g.op("Div", [o_xx, den]), g.op("Mul", [cx, cx])])
            vy = g.op("Sub", [g.op("Div", [o_yy, den]), g.op("Mul", [cy, cy])])
            sx = g.op("Sqrt", [g.op("Add", [g.op("Relu", [vx]), eps])])
            sy = g.op("Sqrt", [g.op("Add", [g.op("Relu", [vy]), eps])])
            ring = g.op("Div", [g.op("Sub", [m0, m_in]), g.op("Add", [m0, eps])])
            ratio = g.op("Div", [m0, g.op("Add", [g.op("Mul", [g.op("Mul", [sx, sy]), g.const(cal["area"])]),
                                                  eps])])
            ring_margin = g.op("Sub", [g.const(DET_RING_MAX), ring])
            t_ring = g.op("Sigmoid", [g.op("Mul", [ring_margin, g.const(100.0)])])
            t_shape = g.op("Sigmoid", [g.op("Mul", [g.op("Sub", [g.const(DET_SHAPE_TOL),
                                                                 g.op("Abs", [g.op("Sub", [ratio, one])])]),
                                                    g.const(30.0)])])
            t_area = g.op("Sigmoid", [g.op("Mul", [g.op("Sub", [m0, g.const(DET_MIN_AREA)]), g.const(0.1)])])
            scores.append(g.op("Mul", [g.op("Mul", [t_ring, t_shape]), t_area]))
            kl, kt, kr, kb = cal["box"]
            x1 = g.op("Sub", [cx, g.op("Mul", [sx, g.const(kl)])])
            y1 = g.op("Sub", [cy, g.op("Mul", [sy, g.const(kt)])])
            x2 = g.op("Add", [cx, g.op("Mul", [sx, g.const(kr)])])
            y2 = g.op("Add", [cy, g.op("Mul", [sy, g.const(kb)])])
            dists = [g.op("Sub", [px, x1]), g.op("Sub", [py, y1]),
                     g.op("Sub", [x2, px]), g.op("Sub", [y2, py])]
            boxes.append(g.op("Mul", [g.op("Concat", dists, axis=1), inv_s]))
            kd = []
            for ux, uy in cal["kps"]:
                kd.append(g.op("Sub", [g.op("Add", [cx, g.op("Mul", [sx, g.const(ux)])]), px]))
                kd.append(g.op("Sub", [g.op("Add", [cy, g.op("Mul", [sy, g.const(uy)])]), py]))
            kpss.append(g.op("Mul", [g.op("Concat", kd, axis=1), inv_s]))
        for kind, parts, width in (("score", scores, 1), ("bbox", boxes, 4), ("kps", kpss, 10)):
            cat = g.op("Concat", parts, axis=1)
            tr = g.op("Transpose", [cat], perm=[0, 2, 3, 1])
            out = g.op("Reshape", [tr, g.const([-1, width], dtype=np.int64)], out=f"{kind}_{s}")
            outputs[kind].append((out, width))
    inp = helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, "height", "width"])
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{name}", width])
            for kind in ("score", "bbox", "kps") for name, width in outputs[kind]]
    return _model(g, [inp], outs, "flen_tiny_scrfd")


def _aligned_crop(rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    import cv2

    # the ArcFace 112x112 landmark template (as insightface's face_align.norm_crop uses)
    dst = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                    [70.7299, 92.2041]], np.float32)
    mat, _ = cv2.estimateAffinePartial2D(kps.astype(np.float32), dst, method=cv2.LMEDS)
    return cv2.warpAffine(rgb, mat, (112, 112), borderValue=0.0)


def build_face_recognizer(seed: int = 0):
    """A fixed random recogniser: 112x112x3 (RGB, (x-127.5)/127.5) -> 8x8 average pool -> minus a mean face
    -> random projection to 512. Same pixels give the same embedding; different identities point elsewhere."""
    from onnx import TensorProto, helper

    feats = []
    for identity in range(12):
        img = np.asarray(draw_test_face(identity, 256)).astype(np.float32)
        crop = _aligned_crop(img, drawn_face_keypoints(256))
        feats.append(((crop - 127.5) / 127.5).reshape(14, 8, 14, 8, 3).mean(axis=(1, 3)).transpose(2, 0, 1))
    mean_face = np.mean(feats, axis=0)[None].astype(np.float32)
    rng = np.random.default_rng(seed + 7)
    proj = (rng.standard_normal((3 * 14 * 14, 512)) / math.sqrt(3 * 14 * 14)).astype(np.float32)
    g = _Graph()
    x = "input.1"
    pooled = g.op("AveragePool", [x], name="rec_pool", kernel_shape=[8, 8], strides=[8, 8])
    centred = g.op("Sub", [pooled, g.const(mean_face, name="mean_face")], name="rec_center")
    flat = g.op("Flatten", [centred], name="rec_flatten", axis=1)
    g.op("MatMul", [flat, g.const(proj, name="projection")], name="rec_project", out="embedding")
    inp = helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 3, 112, 112])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 512])
    return _model(g, [inp], [out], "flen_tiny_arcface")


def write_insightface_pack(pack_dir: str | Path, seed: int = 0) -> Path:
    import onnx

    pack_dir = Path(pack_dir)
    pack_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(build_face_detector(), str(pack_dir / DETECTOR_FILE))
    onnx.save(build_face_recognizer(seed), str(pack_dir / RECOGNIZER_FILE))
    return pack_dir


# ----------------------------------------------------------------------------------------------------
# the kit
# ----------------------------------------------------------------------------------------------------


def _save_pipeline(pipe, path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)
    pipe.save_pretrained(str(path), safe_serialization=True)


def write_tiny_models(models_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write the tiny models into ``models_dir`` (a ComfyUI-style ``models`` folder); returns their paths.

    Keys: ``qwen_edit``, ``flux`` (diffusers folders), ``insightface_root`` (``models_dir/insightface``, the
    ``root`` for ``FaceAnalysis(name="flen-tiny")``), ``insightface_pack`` (the pack folder) and ``loras``
    (the folder with ``flux_lora_a/b.safetensors`` and ``qwen_edit_lora_a/b.safetensors``).
    """
    import torch

    models_dir = Path(models_dir)
    paths = {
        "qwen_edit": models_dir / "diffusers" / QWEN_EDIT_DIRNAME,
        "flux": models_dir / "diffusers" / FLUX_DIRNAME,
        "insightface_root": models_dir / "insightface",
        "insightface_pack": models_dir / "insightface" / "models" / INSIGHTFACE_PACK,
        "loras": models_dir / "loras" / LORA_DIRNAME,
    }
    for key in ("qwen_edit", "flux", "loras"):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
    paths["loras"].mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        flux = build_tiny_flux(seed)
        _save_pipeline(flux, paths["flux"])
        qwen = build_tiny_qwen_edit(seed)
        _save_pipeline(qwen, paths["qwen_edit"])
        # before the LoRAs below wrap the transformers' layers
        split = {f"flux_{k}": v for k, v in tiny_split_files.write_flux(flux, models_dir).items()}
        split.update({f"qwen_edit_{k}": v for k, v in tiny_split_files.write_qwen_edit(qwen, models_dir).items()})
    for key, pipe in (("flux", flux), ("qwen_edit", qwen)):
        for k, fname in enumerate(LORA_FILES[key]):
            sd = _lora_state_dict(pipe.transformer, _LORA_TARGETS[key], seed * 1000 + 101 + 17 * k)
            _write_lora(paths["loras"] / fname, sd, base=key)
    write_insightface_pack(paths["insightface_pack"], seed)
    return {**paths, "split_files": split}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.tiny_models",
                                     description="Write FLENwheel's tiny test models into a models folder.")
    parser.add_argument("models_dir", help="models folder to write into (e.g. ComfyUI/models)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    paths = write_tiny_models(args.models_dir, seed=args.seed)
    for key, path in paths.items():
        if isinstance(path, dict):
            for sub, file in path.items():
                print(f"{sub:37s} {file}  ({file.stat().st_size / 1e6:.2f} MB)")
            continue
        files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else []
        size = sum(p.stat().st_size for p in files)
        print(f"{key:17s} {path}  ({len(files)} files, {size / 1e6:.2f} MB)")
    print(f"wrote the tiny models in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
