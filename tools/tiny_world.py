"""The tiny world: drawn faces of many identities and a face pack whose recogniser really separates them, so that
the identity filter's decisions can be measured.

The tiny-model kit (:mod:`tools.tiny_models`) writes random models: they draw no faces, so the identity filter
rejects everything and every similarity on a model card is "–". The world starts with what the filter needs:

* :func:`draw_world_face` - procedurally drawn faces of :data:`IDENTITIES` identities (skin, hair colour and
  style, background), under expressions, yaw, offsets, scales and blur;
* ``insightface/models/flen-world/`` (:func:`write_face_pack`) - the kit's SCRFD-layout detector and a
  recogniser that separates the identities: the ArcFace-layout 112x112 crop, 8x8 average-pooled, projected by a
  linear discriminant fitted (closed form, numpy) on drawings of every identity.

Built on the CPU with fixed seeds in seconds. :func:`measure_recognizer` reports the recogniser's separation and
the filter's accuracy on held-out drawings. :func:`world_models` adds ``diffusers/flen-world-flux``, a FLUX-layout
pipeline pre-trained on the drawings (:func:`build_world_flux`), and caches the whole folder under
``~/.cache/flenwheel/tiny_world/<cache_key()>`` (``FLENWHEEL_WORLD_CACHE`` moves it).

It also adds ``diffusers/flen-world-qwen-edit`` (:func:`build_world_qwen_edit`), a QwenImageEditPlusPipeline: the
kit's tokenizer, tiny Qwen2.5-VL text encoder and processor, a Qwen-Image VAE in the real layout trained on the
drawings, and a transformer trained as an editor on edit pairs in the angle sweep's words (:func:`edit_pairs`: a
drawing, a line of the "model-card head angles" / "model-card expressions" presets, the same identity drawn with
that angle or expression). :func:`measure_qwen_world` runs it through engines.qwen_edit and scores round trips and
edits of held-out drawings. Its limit, measured: this VAE layout (per-pixel RMS norms, narrow) learns slowly, and the
~40 s it gets keep little identity - a round trip scores 0.09 against the drawing's bank (the raw drawing 0.94; 0.44
after 800 steps, ~4 min). So held-out edits show faces (47 of 48) that mostly fail the filter below threshold (3 of 48
pass), and an editor LoRA trained on corrections gains a little (tests/test_world_qwen.py has the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tools import tiny_models as kit

FACE_PACK = "flen-world"
IDENTITIES = 24
SIZE = 64
EXPRESSIONS = ("neutral", "smiling", "angry", "sad")
# yaw of the drawn features (fraction of the face half-width they move sideways) per model-card angle
ANGLE_YAW = {"front": 0.0, "three-quarter": 0.45, "profile": 0.8}
CHARACTER_IDENTITY = 5      # the identity the tests and the demo build a character LoRA of

# the skin tones lie inside the kit detector's skin range; nothing else drawn does
_SKINS = [(232, 170, 120), (214, 140, 90), (248, 186, 130), (206, 128, 72), (240, 160, 100), (222, 182, 132)]
_HAIR = [(30, 20, 10), (230, 220, 60), (150, 30, 20), (90, 90, 90), (20, 30, 120), (245, 245, 245)]
_BACKGROUNDS = [(70, 110, 170), (50, 140, 80), (150, 150, 150), (40, 40, 70), (130, 60, 130), (20, 150, 160)]
_IRIS = [(40, 90, 200), (30, 140, 60), (110, 60, 20), (20, 20, 20)]
_LIPS = [(170, 30, 50), (120, 20, 90), (200, 60, 60), (90, 30, 30)]


@dataclass(frozen=True)
class Look:
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    background: tuple[int, int, int]
    iris: tuple[int, int, int]
    lips: tuple[int, int, int]
    style: int          # 0 round cap, 1 long hair, 2 spiky top


def _looks() -> list[Look]:
    """IDENTITIES looks, each differing from every other in at least two of skin, hair, background, style."""
    combos = [(s, h, b, st) for s in range(6) for h in range(6) for b in range(6) for st in range(3)]
    order = np.random.default_rng(2026).permutation(len(combos))
    chosen: list[tuple[int, int, int, int]] = []
    for k in order:
        c = combos[int(k)]
        if all(sum(x != y for x, y in zip(c, o, strict=True)) >= 2 for o in chosen):
            chosen.append(c)
        if len(chosen) == IDENTITIES:
            break
    return [Look(_SKINS[s], _HAIR[h], _BACKGROUNDS[b], _IRIS[i % 4], _LIPS[(i // 4) % 4], st)
            for i, (s, h, b, st) in enumerate(chosen)]


LOOKS = _looks()


def draw_world_face(identity: int, size: int = SIZE, *, yaw: float = 0.0, expression: str = "neutral",
                    offset: tuple[float, float] = (0.0, 0.0), scale: float = 1.0, blur: float = 0.0) -> Image.Image:
    """One drawing of ``identity`` (0..IDENTITIES-1). ``yaw`` (-1..1) moves the eyes, nose and mouth sideways
    inside the face, ``expression`` is one of :data:`EXPRESSIONS`; the face ellipse (what the detector finds)
    depends only on ``size``, ``offset`` and ``scale``. Drawn 4x larger and reduced, for smooth edges."""
    look = LOOKS[int(identity) % IDENTITIES]
    k = 4
    big = size * k
    img = Image.new("RGB", (big, big), look.background)
    d = ImageDraw.Draw(img)
    cx = big / 2.0 + offset[0] * k
    cy = big / 2.0 + offset[1] * k + 0.04 * big * scale
    a, b = 0.25 * big * scale, 0.32 * big * scale
    hair = look.hair
    if look.style == 0:
        d.ellipse([cx - 1.12 * a, cy - 1.22 * b, cx + 1.12 * a, cy + 0.3 * b], fill=hair)
    elif look.style == 1:
        d.rectangle([cx - 1.25 * a, cy - 0.5 * b, cx + 1.25 * a, cy + 1.15 * b], fill=hair)
        d.ellipse([cx - 1.25 * a, cy - 1.28 * b, cx + 1.25 * a, cy + 0.2 * b], fill=hair)
    else:
        for j in range(7):
            x = cx - a + j * a / 3.0
            d.polygon([(x - 0.3 * a, cy - 0.7 * b), (x + 0.3 * a, cy - 0.7 * b), (x, cy - 1.35 * b)], fill=hair)
    d.rectangle([cx - 1.6 * a, cy + 1.25 * b, cx + 1.6 * a, cy + 2.6 * b], fill=look.iris)
    d.ellipse([cx - a, cy - b, cx + a, cy + b], fill=look.skin)
    fx = cx + 0.3 * a * float(yaw)       # the features' centre line
    squeeze = 1.0 - 0.35 * abs(float(yaw))
    for side in (-1, 1):
        near = 1.0 - 0.3 * side * float(yaw)   # the eye turned away looks smaller
        ex, ey = fx + side * 0.44 * a * squeeze, cy - 0.2 * b
        r = 0.23 * a * near
        d.ellipse([ex - r, ey - 0.7 * r, ex + r, ey + 0.7 * r], fill=(250, 250, 250))
        ri = 0.12 * a * near
        d.ellipse([ex - ri, ey - ri, ex + ri, ey + ri], fill=look.iris)
        rp = 0.45 * ri
        d.ellipse([ex - rp, ey - rp, ex + rp, ey + rp], fill=(0, 0, 0))
        tilt = {"angry": 0.5, "sad": -0.4}.get(expression, 0.0) * r * side
        d.polygon([(ex - r, ey - 1.9 * r + tilt), (ex + r, ey - 1.9 * r - tilt),
                   (ex + r, ey - 1.5 * r - tilt), (ex - r, ey - 1.5 * r + tilt)], fill=hair)
    nx, ny = cx + 0.45 * a * float(yaw), cy + 0.12 * b
    d.polygon([(nx, ny - 0.18 * b), (nx - 0.1 * a, ny), (nx + 0.1 * a, ny)], fill=(120, 60, 40))
    mw = 0.36 * a * squeeze * (1.25 if expression == "smiling" else 0.8 if expression == "sad" else 1.0)
    my = cy + 0.42 * b
    if expression == "smiling":
        d.chord([fx - mw, my - 0.12 * b, fx + mw, my + 0.12 * b], 0, 180, fill=look.lips)
    elif expression == "sad":
        d.chord([fx - mw, my - 0.05 * b, fx + mw, my + 0.13 * b], 180, 360, fill=look.lips)
    elif expression == "angry":
        d.rectangle([fx - mw, my - 0.03 * b, fx + mw, my + 0.03 * b], fill=look.lips)
    else:
        d.ellipse([fx - mw, my - 0.07 * b, fx + mw, my + 0.07 * b], fill=look.lips)
    out = img.resize((size, size), Image.Resampling.LANCZOS)
    return out.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else out


@dataclass(frozen=True)
class Variation:
    expression: str
    angle: str
    yaw: float
    offset: tuple[float, float]
    scale: float
    blur: float

    def draw(self, identity: int, size: int = SIZE) -> Image.Image:
        return draw_world_face(identity, size, yaw=self.yaw, expression=self.expression, offset=self.offset,
                               scale=self.scale, blur=self.blur)


def variations(n: int, seed: int) -> list[Variation]:
    """``n`` random expressions, angles (either side), offsets, scales and blurs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        angle = str(rng.choice(list(ANGLE_YAW)))
        yaw = ANGLE_YAW[angle] * float(rng.choice([-1.0, 1.0])) + float(rng.uniform(-0.08, 0.08))
        out.append(Variation(str(rng.choice(EXPRESSIONS)), angle, yaw,
                             (float(rng.uniform(-5, 5)), float(rng.uniform(-4, 4))), float(rng.uniform(0.82, 1.08)),
                             float(rng.choice([0.0, 0.0, 0.6, 1.2]))))
    return out


# ---- the recogniser ------------------------------------------------------------------------------------------

REC_DIM = 512
_POOL = 8


def _pooled(crops_rgb: np.ndarray) -> np.ndarray:
    """What the ONNX graph computes before the projection: (x - 127.5) / 127.5, 8x8 average pool, flattened
    channel-first (N x 3*14*14)."""
    x = (crops_rgb.astype(np.float32) - 127.5) / 127.5
    n = x.shape[0]
    return x.reshape(n, 14, _POOL, 14, _POOL, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2).reshape(n, -1)


def _crops(detector_pack: Path, images: list[Image.Image]) -> tuple[np.ndarray, list[int]]:
    """ArcFace crops (RGB, 112x112) of the faces the pack's detector finds, as insightface cuts them; and the
    indices of the images with exactly one face."""
    from insightface.utils import face_align

    from engines import identity

    model = identity.FaceModel(detector_pack, detector_pack.name, ("CPUExecutionProvider",), 160)
    crops, kept = [], []
    for i, im in enumerate(images):
        rgb = np.asarray(im.convert("RGB"))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        faces, _ = model.detect(bgr)
        if len(faces) != 1 or faces[0].kps is None:
            continue
        crop = face_align.norm_crop(bgr, landmark=faces[0].kps, image_size=112)
        crops.append(crop[:, :, ::-1])
        kept.append(i)
    return np.stack(crops), kept


def fit_recognizer(pack_dir: Path, per_identity: int = 24, seed: int = 11) -> np.ndarray:
    """A linear discriminant (3*14*14 -> REC_DIM, zero-padded) of the pooled crops, and the mean it centres on,
    as one (1 + 588) x 512 matrix: row 0 is the mean's projection. Fitted on drawings of every identity."""
    images, labels = [], []
    for ident in range(IDENTITIES):
        for v in variations(per_identity, seed * 1000 + ident):
            images.append(v.draw(ident))
            labels.append(ident)
    crops, kept = _crops(pack_dir, images)
    x = _pooled(crops)
    y = np.array([labels[i] for i in kept])
    mu = x.mean(axis=0)
    means = np.stack([x[y == c].mean(axis=0) for c in range(IDENTITIES)])
    within = sum(((x[y == c] - means[c]).T @ (x[y == c] - means[c])) for c in range(IDENTITIES)) / len(x)
    between = ((means - mu).T @ (means - mu)) / IDENTITIES
    d = x.shape[1]
    within = within + 1e-3 * np.trace(within) / d * np.eye(d)
    # whiten the within-class scatter, then take the between-class directions
    evals, evecs = np.linalg.eigh(within)
    white = evecs / np.sqrt(evals)
    b_evals, b_evecs = np.linalg.eigh(white.T @ between @ white)
    top = np.argsort(b_evals)[::-1][:IDENTITIES - 1]
    # sphering the between-class scatter too puts the identities' means on a regular simplex: every pair of
    # identities is equally far apart (cosine -1/(IDENTITIES-1)), none is nearly parallel to another
    proj = white @ b_evecs[:, top] / np.sqrt(np.maximum(b_evals[top], 1e-12))[None, :]
    out = np.zeros((d, REC_DIM), np.float64)
    out[:, :proj.shape[1]] = proj
    return np.concatenate([(mu @ out)[None], out]).astype(np.float32)


def build_world_recognizer(matrix: np.ndarray):
    """The ArcFace-layout ONNX graph: input.1 (N, 3, 112, 112) -> 8x8 pool -> flatten -> x @ P - mean @ P."""
    from onnx import TensorProto, helper

    g = kit._Graph()
    x = "input.1"
    pooled = g.op("AveragePool", [x], name="rec_pool", kernel_shape=[_POOL, _POOL], strides=[_POOL, _POOL])
    flat = g.op("Flatten", [pooled], name="rec_flatten", axis=1)
    proj = g.op("MatMul", [flat, g.const(matrix[1:], name="projection")], name="rec_project")
    g.op("Sub", [proj, g.const(matrix[:1], name="mean_projection")], name="rec_center", out="embedding")
    inp = helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 3, 112, 112])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", REC_DIM])
    return kit._model(g, [inp], [out], "flen_world_arcface")


def write_face_pack(pack_dir: Path) -> Path:
    import onnx

    pack_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(kit.build_face_detector(), str(pack_dir / kit.DETECTOR_FILE))
    # the kit's random recogniser first: insightface loads a pack only with one, and the fit needs the detector
    rec = pack_dir / "w600k_flen_world.onnx"
    onnx.save(kit.build_face_recognizer(0), str(rec))
    matrix = fit_recognizer(pack_dir)
    onnx.save(build_world_recognizer(matrix), str(rec))
    return pack_dir


def measure_recognizer(root: str | Path, pack: str = FACE_PACK, per_identity: int = 6, seed: int = 97,
                       threshold: float | None = None) -> dict[str, Any]:
    """Same- vs different-identity similarity and the filter's accuracy on held-out drawings (new seeds: other
    poses, offsets, scales, expressions and blurs than the fit saw). Each identity's bank is three frontal-ish
    drawings; every held-out drawing is scored against every bank, as the filter scores it."""
    from engines import identity

    threshold = identity.DEFAULT_THRESHOLD if threshold is None else threshold
    model = identity.load_insightface_model(root, pack, det_size=160, providers=["CPUExecutionProvider"])
    refs = [Variation("neutral", "front", 0.0, o, s, 0.0) for o, s in (((0, 0), 1.0), ((-3, 2), 0.9), ((3, -2), 1.05))]
    banks = [identity.build_bank(model, [np.asarray(v.draw(i)) for v in refs], root) for i in range(IDENTITIES)]
    means = np.stack([b.mean for b in banks])
    same: list[float] = []
    diff: list[float] = []
    correct = total = no_face = 0
    for ident in range(IDENTITIES):
        for v in variations(per_identity, seed * 1000 + ident):
            a = model.analyse(np.asarray(v.draw(ident)))
            if a.embedding is None:
                no_face += 1
                continue
            sims = means @ a.embedding
            same.append(float(sims[ident]))
            diff.extend(float(s) for c, s in enumerate(sims) if c != ident)
            correct += sum(int((s >= threshold) == (c == ident)) for c, s in enumerate(sims))
            total += len(sims)
    return {"identities": IDENTITIES, "held_out": IDENTITIES * per_identity, "no_face": no_face,
            "same_mean": round(float(np.mean(same)), 4), "same_min": round(float(np.min(same)), 4),
            "different_mean": round(float(np.mean(diff)), 4), "different_max": round(float(np.max(diff)), 4),
            "threshold": threshold, "filter_accuracy": round(correct / max(1, total), 4),
            "same_pass_rate": round(float(np.mean(np.array(same) >= threshold)), 4),
            "different_pass_rate": round(float(np.mean(np.array(diff) >= threshold)), 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.tiny_world", description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", type=Path)
    args = parser.parse_args(argv)
    start = time.time()
    pack = write_face_pack(args.models_dir / "insightface" / "models" / FACE_PACK)
    print(f"face pack {pack} in {time.time() - start:.1f} s")
    print(json.dumps(measure_recognizer(args.models_dir / "insightface"), indent=1))
    return 0


# ---- the FLUX-layout world model -----------------------------------------------------------------------------

WORLD_VERSION = 1           # bump when the world's models change in a way the source hash would not show
FLUX_DIRNAME = "flen-world-flux"
# The world's T5 length: the card prompt's expression and angle fall inside it, and 16 image tokens plus 32 text
# tokens keep a training step of the world's transformer cheap on a CPU (FLUX.1's own is 512). The tokenizer's
# model_max_length carries it: the model card and the trainer use min(512, it).
TEXT_TOKENS = 32
WORLD_SEED = 0
_SUBJECTS = ("a person", "the person", "someone", "a character", "ohwx person", "zk_char", "sks man", "a face")


def world_caption(v: Variation, rng: np.random.Generator) -> str:
    """A caption of a training drawing in the model card's words, naming no identity: the subject is one of
    several generic or made-up words, so that a LoRA's instance token starts out meaning nobody in particular."""
    from engines import model_card as mc

    subject = str(rng.choice(_SUBJECTS))
    expr = mc.EXPRESSION_TEXT[v.expression]
    angle = mc.ANGLE_TEXT[v.angle]
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return f"close-up portrait photo of {subject}, {expr}, {angle}, head and shoulders, plain grey background"
    if kind == 1:
        return f"a photo of {subject}, {expr}, {angle}"
    return f"full body photo of {subject}, {mc.POSE_TEXT[str(rng.choice(mc.BODY_POSES))]}, {angle}"


def world_drawings(per_identity: int, seed: int) -> tuple[list[Image.Image], list[str], list[int]]:
    rng = np.random.default_rng(seed)
    images, captions, labels = [], [], []
    for ident in range(IDENTITIES):
        for v in variations(per_identity, seed * 1000 + ident):
            images.append(v.draw(ident))
            captions.append(world_caption(v, rng))
            labels.append(ident)
    return images, captions, labels


def _to_tensor(images: list[Image.Image]):
    import torch

    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 127.5 - 1.0).permute(2, 0, 1)
                        for im in images])


def _flow_step(model, opt, x0, g, predict, step: int, steps: int, lr: float) -> float:
    """One step of the trainers' rectified-flow objective (x_t = (1 - t) x0 + t noise, target noise - x0, t a
    sigmoid of a normal) at a cosine-decayed learning rate; ``predict(noisy, t)`` runs the model. Returns the loss."""
    import torch

    for group in opt.param_groups:
        group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
    noise = torch.randn(x0.shape, generator=g)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=g))
    noisy = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    loss = torch.nn.functional.mse_loss(predict(noisy, t), noise - x0)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss)


def build_world_flux(vae_steps: int = 150, steps: int = 300, per_identity: int = 16, seed: int = WORLD_SEED,
                     log=print):
    """The kit's tiny FluxPipeline (its tokenizers and random text encoders, T5 at :data:`TEXT_TOKENS`) with a
    VAE and a transformer trained on drawings of every identity: the VAE to reconstruct them (8x down, 8 latent
    channels: 64 px -> 16 image tokens), the transformer by rectified flow on captions that name no identity
    (the trainer's objective: x_t = (1 - t) x0 + t noise, target noise - x0), so that it draws faces of anyone."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from training.train_char_lora import flux_predict

    threads = torch.get_num_threads()
    torch.set_num_threads(2)    # the same sums in the same order on any machine: the cache key assumes it
    torch.use_deterministic_algorithms(True)
    # denormal activations late in training slow a CPU step tenfold
    denormals = torch.set_flush_denormal(True)
    try:
        pipe = kit.build_tiny_flux(seed)
        pipe.tokenizer_2.model_max_length = TEXT_TOKENS
        images, captions, _ = world_drawings(per_identity, seed + 5)
        x = _to_tensor(images)
        torch.manual_seed(seed + 10)
        # Any: diffusers' top-level names resolve to dummy classes for the checker
        vae: Any = AutoencoderKL(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 16),
                                 layers_per_block=1, latent_channels=8, norm_num_groups=4, use_quant_conv=False,
                                 use_post_quant_conv=False, mid_block_add_attention=False,
                                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed + 11)
        t0 = time.time()
        for step in range(vae_steps):
            for group in opt.param_groups:   # a short cosine decay: the last steps polish
                group["lr"] = 5e-3 * 0.5 * (1 + np.cos(np.pi * step / vae_steps))
            idx = torch.randint(0, len(x), (16,), generator=g)
            dist = vae.encode(x[idx]).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
            rec = vae.decode(z).sample
            loss = torch.nn.functional.mse_loss(rec, x[idx]) + 1e-6 * dist.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == vae_steps - 1:
                log(f"vae step {step}: loss {float(loss):.4f} ({time.time() - t0:.0f} s)")
        vae.eval().requires_grad_(False)
        with torch.no_grad():
            lat = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mode() for i in range(0, len(x), 64)])
        vae.register_to_config(shift_factor=float(lat.mean()), scaling_factor=float(1.0 / lat.std()))
        lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
        pipe.vae = vae
        pipe.vae_scale_factor = 8
        pipe.image_processor.config.vae_scale_factor = 8
        conds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for c in sorted(set(captions)) + [""]:
                pe, pooled, _ = pipe.encode_prompt(prompt=c, prompt_2=None, max_sequence_length=TEXT_TOKENS)
                conds[c] = (pe[0], pooled[0])
        torch.manual_seed(seed + 20)
        tr: Any = FluxTransformer2DModel(patch_size=1, in_channels=32, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
        opt = torch.optim.AdamW(tr.parameters(), lr=1e-3, weight_decay=0.0)
        t0 = time.time()
        batch = 32
        for step in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)

            def predict(noisy, t, idx=idx):
                # one caption in ten dropped: unseen prompts (the card's, a token's) still land among faces
                drop = torch.rand(batch, generator=g) < 0.1
                keys = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist(), strict=True)]
                cond = {"prompt_embeds": torch.stack([conds[k][0] for k in keys]),
                        "pooled": torch.stack([conds[k][1] for k in keys])}
                return flux_predict(tr, noisy, t, cond, 1.0)

            loss = _flow_step(tr, opt, lat[idx], g, predict, step, steps, 1e-3)
            if step % 100 == 0 or step == steps - 1:
                log(f"transformer step {step}: loss {loss:.4f} ({time.time() - t0:.0f} s)")
        pipe.transformer = tr.eval().requires_grad_(False)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
        if denormals:
            torch.set_flush_denormal(False)
    return pipe


# ---- the Qwen-Image-Edit-layout world model -------------------------------------------------------------------

QWEN_DIRNAME = "flen-world-qwen-edit"
# the angle sweep's presets the world's editor is trained on (the demo's enrichment runs the first), in the sweep's
# own words ("zh+en", the node's default language)
EDIT_PRESETS = ("model-card head angles", "model-card expressions")
EDIT_LANGUAGE = "zh+en"
# the drawn yaw and model-card angle of each camera line of those presets ("left": the features move left)
EDIT_LINE_POSE = {"yaw_left_45": (-0.45, "three-quarter"), "yaw_right_45": (0.45, "three-quarter"),
                  "yaw_left_90": (-0.8, "profile"), "yaw_right_90": (0.8, "profile")}
QWEN_Z = 16                 # the real Qwen-Image VAE's latent channels (ComfyUI's Wan 2.1 latent format assumes 16)
CONDITION_SIDE = 384        # the VL encoder's view of the reference: engines.qwen_edit's default (384x384)


def edit_lines():
    from engines import angle_catalogue as ac

    return [line for preset in EDIT_PRESETS for line in ac.sweep_lines(preset)]


def edit_target(v: Variation, line) -> Variation:
    """What the sweep line asks of drawing ``v``: the same identity, offset, scale and blur; the line's yaw (a
    camera line) or expression (an expression line)."""
    import dataclasses

    if line.kind == "angle":
        yaw, angle = EDIT_LINE_POSE[line.label]
        return dataclasses.replace(v, yaw=yaw, angle=angle)
    return dataclasses.replace(v, expression=line.label)


def edit_pairs(per_identity: int, seed: int) -> list[tuple[int, Variation, Any, Variation]]:
    """(identity, source variation, sweep line, target variation) for ``per_identity`` random sources of every
    identity, each with a random line of :data:`EDIT_PRESETS`."""
    lines = edit_lines()
    rng = np.random.default_rng(seed)
    out = []
    for ident in range(IDENTITIES):
        for v in variations(per_identity, seed * 1000 + ident):
            line = lines[int(rng.integers(len(lines)))]
            out.append((ident, v, line, edit_target(v, line)))
    return out


def _single_frame_convs():
    """While training on still images only: the Qwen-Image VAE's causal 3D convolutions of a single frame (no
    temporal cache, causal zero padding in time) computed as the 2D convolution by their last temporal slice, which
    is what they reduce to (same sums up to rounding, 2.5x faster on a CPU). The model and its saved weights are
    the real ones; inference never runs under this."""
    import contextlib

    import torch.nn.functional as F
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qvae

    @contextlib.contextmanager
    def patched():
        orig = qvae.QwenImageCausalConv3d.forward

        def forward(self, x, cache_x=None):
            if x.shape[2] == 1 and cache_x is None and self._padding[4] == self.kernel_size[0] - 1:
                y = F.conv2d(F.pad(x[:, :, 0], self._padding[:4]), self.weight[:, :, -1], self.bias, self.stride[1:])
                return y.unsqueeze(2)
            return orig(self, x, cache_x)

        qvae.QwenImageCausalConv3d.forward = forward
        try:
            yield
        finally:
            qvae.QwenImageCausalConv3d.forward = orig

    return patched()


def _patch_codes(x, mean, basis):
    """The linear warm-start code of the VAE: each 8x8 patch projected on the first principal axes of the training
    patches, scaled to unit variance -> [B, QWEN_Z, 1, H/8, W/8]."""
    import torch.nn.functional as F

    b, _, h, w = x.shape
    p = F.unfold(x, 8, stride=8).transpose(1, 2).reshape(-1, 3 * 64)
    c = (p - mean) @ basis.T
    return c.reshape(b, h // 8, w // 8, -1).permute(0, 3, 1, 2).unsqueeze(2)


def train_world_qwen_vae(x, steps: int, warm: int, seed: int, log=print, batch: int = 16, lr: float = 2e-3):
    """An AutoencoderKLQwenImage in the real layout (4 levels of 2 residual blocks, 3 downsamplings, 16 latent
    channels; base width 8) trained to reconstruct ``x`` ([N, 3, H, W] in -1..1).

    The layout learns slowly from scratch (per-pixel RMS norms, narrow): 150 plain steps barely leave the mean
    image. So for the first ``warm`` steps the decoder learns to decode, and the encoder to produce, a fixed linear
    code (principal axes of 8x8 patches, closed form); then both train end to end. The encoder's mode is the
    latent (the pipeline encodes with ``argmax``); ``latents_mean`` / ``latents_std`` are set afterwards to the
    latents' per-channel statistics, as the pipeline normalises with them."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKLQwenImage

    patches = F.unfold(x, 8, stride=8).transpose(1, 2).reshape(-1, 3 * 64).double()
    mean = patches.mean(0)
    _, sv, vt = torch.linalg.svd(patches - mean, full_matrices=False)
    basis = (vt[:QWEN_Z] / (sv[:QWEN_Z, None] / float(np.sqrt(len(patches))))).float()
    codes = _patch_codes(x, mean.float(), basis)
    x5 = x.unsqueeze(2)
    torch.manual_seed(seed)
    vae: Any = AutoencoderKLQwenImage(base_dim=8, z_dim=QWEN_Z, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                      temperal_downsample=[False, True, True], latents_mean=[0.0] * QWEN_Z,
                                      latents_std=[1.0] * QWEN_Z)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    with _single_frame_convs():
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
            idx = torch.randint(0, len(x5), (batch,), generator=g)
            xb, zt = x5[idx], codes[idx]
            z = vae.encode(xb).latent_dist.mode()
            code_loss = F.mse_loss(z, zt)
            rec = vae.decode(zt if step < warm else z).sample
            loss = F.mse_loss(rec, xb) + (1.0 if step < warm else 0.1) * code_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                log(f"qwen vae step {step}: reconstruction {float(F.mse_loss(rec, xb)):.4f}, code "
                    f"{float(code_loss):.3f} ({time.time() - t0:.0f} s)")
        vae.eval().requires_grad_(False)
        with torch.no_grad():
            lat = torch.cat([vae.encode(x5[i:i + 64]).latent_dist.mode() for i in range(0, len(x5), 64)])
    vae.register_to_config(latents_mean=[round(float(v), 5) for v in lat.mean(dim=(0, 2, 3, 4))],
                           latents_std=[round(float(v), 5) for v in lat.std(dim=(0, 2, 3, 4))])
    return vae


def encode_edit_pairs(pipe, pairs) -> dict[str, Any]:
    """Latents of each pair's source and target drawings through the pipeline's ``_encode_vae_image``, and its sweep
    line encoded with the source by the VL encoder at :data:`CONDITION_SIDE` (as engines.qwen_edit encodes), padded."""
    import torch

    sources = [v.draw(i) for i, v, _, _ in pairs]
    with torch.no_grad(), _single_frame_convs():
        def latents(ims):
            x = _to_tensor(ims).unsqueeze(2)
            return torch.cat([pipe._encode_vae_image(x[k:k + 64], None)[:, :, 0] for k in range(0, len(x), 64)])
        src = latents(sources)
        tgt = latents([w.draw(i) for i, _, _, w in pairs])
        embeds = []
        for im, (_, _, line, _) in zip(sources, pairs, strict=True):
            cond = pipe.image_processor.resize(im, CONDITION_SIDE, CONDITION_SIDE)
            pe, _ = pipe._get_qwen_prompt_embeds([line.instruction(EDIT_LANGUAGE)], [cond], torch.device("cpu"))
            embeds.append(pe[0])
    length = max(e.shape[0] for e in embeds)
    return {"source": src, "target": tgt,
            "prompt": torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in embeds]),
            "mask": torch.stack([(torch.arange(length) < e.shape[0]).long() for e in embeds])}


def train_world_qwen_editor(pipe, enc: dict[str, Any], steps: int, seed: int, log=print, lr: float = 1e-3,
                            batch: int = 16, layers: int = 2):
    """A QwenImageTransformer2DModel trained by rectified flow (x_t = (1 - t) x0 + t noise, target noise - x0) as
    the editor of :func:`encode_edit_pairs`' pairs, through the editor trainer's objective (``qwen_edit_predict``):
    the noisy target's tokens followed by the source's, the loss on the target's."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from training.train_char_lora import pack
    from training.train_editor_lora import qwen_edit_predict

    src, tgt, prompt, mask = enc["source"], enc["target"], enc["prompt"], enc["mask"]
    control = pack(src)
    torch.manual_seed(seed)
    tr: Any = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * QWEN_Z, out_channels=QWEN_Z,
                                          num_layers=layers, attention_head_dim=16, num_attention_heads=4,
                                          joint_attention_dim=pipe.text_encoder.config.text_config.hidden_size,
                                          guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    shapes = torch.tensor([[[1, src.shape[2] // 2, src.shape[3] // 2]]] * batch)
    for step in range(steps):
        idx = torch.randint(0, len(src), (batch,), generator=g)
        cond = {"prompt_embeds": prompt[idx], "prompt_mask": mask[idx], "control": control[idx],
                "control_shapes": shapes}
        loss = _flow_step(tr, opt, tgt[idx], g, lambda noisy, t, cond=cond: qwen_edit_predict(tr, noisy, t, cond),
                          step, steps, lr)
        if step % 50 == 0 or step == steps - 1:
            log(f"qwen transformer step {step}: loss {loss:.4f} ({time.time() - t0:.0f} s)")
    return tr.eval().requires_grad_(False)


def build_world_qwen_edit(vae_steps: int = 150, vae_warm: int = 60, steps: int = 250, per_identity: int = 6,
                          seed: int = WORLD_SEED, log=print):
    """The kit's tiny QwenImageEditPlusPipeline (its tokenizer, tiny Qwen2.5-VL text encoder and processor) with a
    VAE trained on the drawings (:func:`train_world_qwen_vae`) and a transformer trained as an editor by rectified
    flow on :func:`edit_pairs` (:func:`train_world_qwen_editor`): the reference latents of a drawing of identity i
    (as the pipeline passes them), the sweep line encoded with that drawing by the VL encoder, the target a drawing
    of the same identity with the line's angle or expression."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)    # the same sums in the same order on any machine: the cache key assumes it
    torch.use_deterministic_algorithms(True)
    denormals = torch.set_flush_denormal(True)
    try:
        pipe = kit.build_tiny_qwen_edit(seed)
        images, _, _ = world_drawings(16, seed + 105)
        pipe.vae = train_world_qwen_vae(_to_tensor(images), vae_steps, vae_warm, seed + 110, log)
        pipe.latent_channels = QWEN_Z       # read from the VAE when the pipeline is built (the kit's has 4)
        t0 = time.time()
        enc = encode_edit_pairs(pipe, edit_pairs(per_identity, seed + 120))
        log(f"qwen edit pairs: {len(enc['source'])} encoded, {enc['prompt'].shape[1]} text tokens "
            f"({time.time() - t0:.0f} s)")
        pipe.transformer = train_world_qwen_editor(pipe, enc, steps, seed + 130, log, lr=5e-3)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
        if denormals:
            torch.set_flush_denormal(False)
    return pipe


def _banks(model, root):
    from engines import identity

    refs = [Variation("neutral", "front", 0.0, o, s, 0.0) for o, s in (((0, 0), 1.0), ((-3, 2), 0.9), ((3, -2), 1.05))]
    return [identity.build_bank(model, [np.asarray(v.draw(i)) for v in refs], root) for i in range(IDENTITIES)]


def _identity_scores(model, banks, images, labels, threshold: float) -> dict[str, Any]:
    """Similarity of each image to its identity's bank vs to the other banks, and the filter's decisions against
    the own bank (engines.identity.score_images, as FLEN Identity Filter scores)."""
    from engines import identity

    means = np.stack([b.mean for b in banks])
    same: list[float] = []
    other: list[float] = []
    reasons: dict[str, int] = {}
    passed = 0
    for im, label in zip(images, labels, strict=True):
        row = identity.score_images(banks[label], model, [np.asarray(im)], threshold=threshold)[0]
        passed += int(row.passed)
        if not row.passed:
            reason = str(row.reason)
            reasons[reason] = reasons.get(reason, 0) + 1
        a = model.analyse(np.asarray(im))
        if a.embedding is not None:
            sims = means @ a.embedding
            same.append(float(sims[label]))
            other.extend(float(v) for c, v in enumerate(sims) if c != label)
    return {"n": len(images), "faces": len(same), "same_mean": round(float(np.mean(same)), 4) if same else None,
            "other_mean": round(float(np.mean(other)), 4) if other else None, "passed": passed, "rejected": reasons}


def qwen_round_trips(pipe, images: list[Image.Image]) -> list[Image.Image]:
    """Drawings through the pipeline's own VAE path: its preprocessing, ``_encode_vae_image`` (normalised by
    latents_mean / latents_std), packing, and engines.qwen_edit.decode_latents (denormalised, postprocessed)."""
    import torch

    from engines.qwen_edit import decode_latents

    out = []
    with torch.no_grad():
        for im in images:
            x = pipe.image_processor.preprocess(im, im.height, im.width).unsqueeze(2)
            z = pipe._encode_vae_image(x, None)
            packed = pipe._pack_latents(z, 1, z.shape[1], z.shape[3], z.shape[4])
            rgb = decode_latents(pipe, packed, im.height, im.width)[0]
            out.append(Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
    return out


def measure_qwen_world(models: Path, per_identity: int = 2, seed: int = 313, steps: int = 8, stack=None,
                       threshold: float | None = None) -> dict[str, Any]:
    """The world's Qwen editor on held-out drawings (new seeds): VAE round trips through the pipeline's path, and
    edits run through engines.qwen_edit (as FLEN Qwen Edit / Angle Sweep run them) of held-out sources with held-out
    sweep lines; each scored against its source identity's bank (three frontal drawings) and the others."""
    import torch

    from engines import identity, qwen_edit
    from engines.lora_stack import LoraStack
    from engines.model_host import LocalHost

    threshold = identity.DEFAULT_THRESHOLD if threshold is None else threshold
    root = models / "insightface"
    model = identity.load_insightface_model(root, FACE_PACK, det_size=160, providers=["CPUExecutionProvider"])
    banks = _banks(model, root)
    handle = qwen_edit.load_qwen_edit(models / "diffusers" / QWEN_DIRNAME, QWEN_DIRNAME, "fp32", torch.device("cpu"))
    handle.pipe.set_progress_bar_config(disable=True)
    pairs = edit_pairs(per_identity, seed)
    sources = [v.draw(i) for i, v, _, _ in pairs]
    labels = [i for i, _, _, _ in pairs]
    raw = _identity_scores(model, banks, sources, labels, threshold)
    trips = _identity_scores(model, banks, qwen_round_trips(handle.pipe, sources), labels, threshold)
    jobs = [qwen_edit.EditJob([im], qwen_edit.EditRequest(line.instruction(EDIT_LANGUAGE), steps=steps, seed=k,
                                                         width=SIZE, height=SIZE))
            for k, (im, (_, _, line, _)) in enumerate(zip(sources, pairs, strict=True))]
    edited, _ = qwen_edit.edit_many(handle, jobs, stack or LoraStack(), LocalHost())
    rgb = (edited.numpy() * 255).round().astype(np.uint8)
    edits = _identity_scores(model, banks, [Image.fromarray(a) for a in rgb], labels, threshold)
    target_images = [w.draw(i) for i, _, _, w in pairs]
    targets = _identity_scores(model, banks, target_images, labels, threshold)
    # pixels: each edit against its own target and against the same edit's target drawn as the next identity
    tgt = np.stack([np.asarray(im, np.float32) for im in target_images])
    wrong = np.stack([np.asarray(w.draw((i + 1) % IDENTITIES), np.float32) for i, _, _, w in pairs])
    src = np.stack([np.asarray(im, np.float32) for im in sources])
    pixels = {"edit_vs_target": round(float(np.abs(rgb - tgt).mean()), 2),
              "edit_vs_other_identity": round(float(np.abs(rgb - wrong).mean()), 2),
              "source_vs_target": round(float(np.abs(src - tgt).mean()), 2)}
    return {"raw": raw, "round_trip": trips, "edits": edits, "targets": targets, "pixels": pixels,
            "threshold": threshold}


def cache_key() -> str:
    """The world's cache folder name: the world's version, the builders' source and the libraries whose sums
    the models are (another torch may round differently)."""
    import hashlib

    import diffusers
    import torch
    import transformers

    h = hashlib.sha256(f"{WORLD_VERSION}|{torch.__version__}|{diffusers.__version__}|{transformers.__version__}"
                       .encode())
    for mod in (sys.modules[__name__], kit):
        h.update(Path(str(mod.__file__)).read_bytes())
    return f"v{WORLD_VERSION}-{h.hexdigest()[:16]}"


def default_cache_root() -> Path:
    return Path(os.environ.get("FLENWHEEL_WORLD_CACHE") or Path.home() / ".cache" / "flenwheel" / "tiny_world")


def write_world(models_dir: Path, log=print) -> dict[str, Any]:
    """The world's models in a ComfyUI-style models folder: ``diffusers/flen-world-flux``,
    ``diffusers/flen-world-qwen-edit`` and the face pack."""
    start = time.time()
    pipe = build_world_flux(log=log)
    flux = models_dir / "diffusers" / FLUX_DIRNAME
    flux.parent.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(flux), safe_serialization=True)
    built = time.time() - start
    qstart = time.time()
    qwen = models_dir / "diffusers" / QWEN_DIRNAME
    build_world_qwen_edit(log=log).save_pretrained(str(qwen), safe_serialization=True)
    qbuilt = time.time() - qstart
    write_face_pack(models_dir / "insightface" / "models" / FACE_PACK)
    return {"flux_s": round(built, 1), "qwen_edit_s": round(qbuilt, 1), "total_s": round(time.time() - start, 1),
            "key": cache_key()}


def world_models(cache_root: Path | None = None, log=print) -> Path:
    """The world's models folder, built once per :func:`cache_key` and reused: tests and the demo share it.
    Built beside its final place and renamed there, so a build cut short leaves nothing that looks complete."""
    import shutil

    root = (cache_root or default_cache_root()) / cache_key()
    models = root / "models"
    if (root / "world.json").is_file():
        return models
    tmp = root.parent / f".{root.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    info = write_world(tmp / "models", log=log)
    (tmp / "world.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    try:
        tmp.rename(root)
    except OSError:         # another process finished first: its world is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return models


if __name__ == "__main__":
    sys.exit(main())
