"""Tests of the tiny-model kit (tools/tiny_models.py): real loads, real runs, no skips."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # conftest.py normally does this
    sys.path.insert(0, str(REPO))

from tools import tiny_models as tm  # noqa: E402


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run_cli(models_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "tools.tiny_models", str(models_dir), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("tiny_models") / "models"
    r = _run_cli(models)
    assert r.returncode == 0, r.stderr[-3000:]
    return models


def _bgr(img) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])


# ----------------------------------------------------------------------------------------------- files


def test_cli_writes_the_four_folders(tiny_models_dir):
    m = tiny_models_dir
    assert (m / "diffusers" / tm.QWEN_EDIT_DIRNAME / "model_index.json").is_file()
    assert (m / "diffusers" / tm.FLUX_DIRNAME / "model_index.json").is_file()
    pack = m / "insightface" / "models" / tm.INSIGHTFACE_PACK
    assert sorted(p.name for p in pack.glob("*.onnx")) == sorted([tm.DETECTOR_FILE, tm.RECOGNIZER_FILE])
    loras = m / "loras" / tm.LORA_DIRNAME
    expected = sorted(tm.LORA_FILES["flux"] + tm.LORA_FILES["qwen_edit"])
    assert sorted(p.name for p in loras.iterdir()) == expected
    qwen_mb = sum(p.stat().st_size for p in (m / "diffusers" / tm.QWEN_EDIT_DIRNAME).rglob("*")) / 1e6
    flux_mb = sum(p.stat().st_size for p in (m / "diffusers" / tm.FLUX_DIRNAME).rglob("*")) / 1e6
    assert qwen_mb < 30 and flux_mb < 2


def test_write_tiny_models_returns_paths(tmp_path):
    paths = tm.write_tiny_models(tmp_path / "models", seed=3)
    assert set(paths) == {"qwen_edit", "flux", "insightface_root", "insightface_pack", "loras", "split_files"}
    assert paths["insightface_root"] == tmp_path / "models" / "insightface"
    assert paths["insightface_pack"] == paths["insightface_root"] / "models" / "flen-tiny"
    split = paths.pop("split_files")
    for p in paths.values():
        assert p.is_dir()
    # ComfyUI's own folders, one file per component and variant
    assert {p.parent.parent.name for p in split.values()} == {"diffusion_models", "text_encoders", "vae"}
    assert all(p.is_file() and p.suffix == ".safetensors" for p in split.values())
    assert len(split) == 13


def test_deterministic_and_seed_dependent(tiny_models_dir, tmp_path):
    again = tmp_path / "again"
    other = tmp_path / "other"
    assert _run_cli(again).returncode == 0
    assert _run_cli(other, "--seed", "1").returncode == 0
    h0, h1, h2 = _hashes(tiny_models_dir), _hashes(again), _hashes(other)
    assert len(h0) >= 30
    assert h0 == h1
    assert h0.keys() == h2.keys()
    changed = {k for k in h0 if h0[k] != h2[k]}
    for name in ("diffusers/flen-tiny-flux/transformer/diffusion_pytorch_model.safetensors",
                 "diffusers/flen-tiny-qwen-image-edit/transformer/diffusion_pytorch_model.safetensors",
                 "loras/flen-tiny/flux_lora_a.safetensors", "loras/flen-tiny/qwen_edit_lora_b.safetensors",
                 "diffusion_models/flen-tiny/flux1-dev-tiny_fp8_scaled.safetensors",
                 "text_encoders/flen-tiny/qwen_2.5_vl_tiny.safetensors", "vae/flen-tiny/ae_tiny.safetensors"):
        assert name in changed


# ------------------------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="session")
def flux_pipe(tiny_models_dir):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(tiny_models_dir / "diffusers" / tm.FLUX_DIRNAME)


@pytest.fixture(scope="session")
def qwen_pipe(tiny_models_dir):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(tiny_models_dir / "diffusers" / tm.QWEN_EDIT_DIRNAME)


@pytest.fixture
def small_qwen_sizes(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as qe

    monkeypatch.setattr(qe, "VAE_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr(qe, "CONDITION_IMAGE_SIZE", 64 * 64)


def _flux(pipe) -> np.ndarray:
    import torch

    out = pipe("a photo of a person", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


def _qwen(pipe) -> np.ndarray:
    import torch

    image = tm.draw_test_face(1, 64)
    out = pipe(image=[image], prompt="turn the head to the left", height=64, width=64, num_inference_steps=2,
               true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


def _check_image(img: np.ndarray) -> None:
    assert img.shape == (64, 64, 3)
    assert np.isfinite(img).all()
    assert img.std() > 1e-3


def test_flux_pipeline_loads_and_runs(flux_pipe):
    assert type(flux_pipe).__name__ == "FluxPipeline"
    _check_image(_flux(flux_pipe))


def test_qwen_edit_pipeline_loads_and_runs(qwen_pipe, small_qwen_sizes):
    assert type(qwen_pipe).__name__ == "QwenImageEditPlusPipeline"
    tok = qwen_pipe.tokenizer
    for special in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert qwen_pipe.text_encoder.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    _check_image(_qwen(qwen_pipe))


def test_pil_output_sizes(flux_pipe, qwen_pipe, small_qwen_sizes):
    import torch

    gen = torch.Generator().manual_seed(0)
    img = flux_pipe("x", height=64, width=96, num_inference_steps=2, generator=gen).images[0]
    assert img.size == (96, 64)
    img = qwen_pipe(image=[tm.draw_test_face(2, 64)], prompt="x", height=64, width=96, num_inference_steps=2,
                    true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (96, 64)


@pytest.mark.parametrize("kind", ["flux", "qwen_edit"])
def test_loras_load_mix_and_change_output(kind, tiny_models_dir, small_qwen_sizes):
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    folder = tm.FLUX_DIRNAME if kind == "flux" else tm.QWEN_EDIT_DIRNAME
    pipe = DiffusionPipeline.from_pretrained(tiny_models_dir / "diffusers" / folder)
    run = _flux if kind == "flux" else _qwen
    base = run(pipe)
    lora_dir = tiny_models_dir / "loras" / tm.LORA_DIRNAME
    name_a, name_b = tm.LORA_FILES[kind]
    with safe_open(str(lora_dir / name_a), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k)
                        for k in keys)
    pipe.load_lora_weights(str(lora_dir), weight_name=name_a, adapter_name="a")
    pipe.load_lora_weights(str(lora_dir), weight_name=name_b, adapter_name="b")
    pipe.set_adapters(["a"], [1.0])
    out_a = run(pipe)
    pipe.set_adapters(["b"], [1.0])
    out_b = run(pipe)
    pipe.set_adapters(["a", "b"], [0.7, 0.5])
    out_ab = run(pipe)
    pipe.set_adapters(["a", "b"], [0.0, 0.0])
    out_zero = run(pipe)
    for out in (out_a, out_b, out_ab):
        assert np.isfinite(out).all()
        assert np.abs(out - base).max() > 1e-3
    assert np.abs(out_a - out_b).max() > 1e-3
    np.testing.assert_array_equal(out_zero, base)


# ----------------------------------------------------------------------------------------------- faces


@pytest.fixture(scope="session")
def face_app(tiny_models_dir):
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=tm.INSIGHTFACE_PACK, root=str(tiny_models_dir / "insightface"),
                       providers=["CPUExecutionProvider"])
    assert set(app.models) == {"detection", "recognition"}
    app.prepare(ctx_id=-1, det_size=(640, 640))
    return app


def test_draw_test_face_identities_differ():
    a, b = np.asarray(tm.draw_test_face(1)), np.asarray(tm.draw_test_face(2))
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10
    np.testing.assert_array_equal(a, np.asarray(tm.draw_test_face(1)))


def test_one_face_with_embedding(face_app):
    faces = face_app.get(_bgr(tm.draw_test_face(1)))
    assert len(faces) == 1
    f = faces[0]
    assert f.normed_embedding.shape == (512,)
    assert abs(np.linalg.norm(f.normed_embedding) - 1.0) < 1e-4
    assert f.det_score > 0.9
    np.testing.assert_allclose(f.bbox, tm.drawn_face_box(256), atol=4)
    np.testing.assert_allclose(f.kps, tm.drawn_face_keypoints(256), atol=3)


def test_no_face_on_blank_or_noise(face_app):
    assert face_app.get(np.full((256, 256, 3), 128, np.uint8)) == []
    assert face_app.get(np.zeros((300, 200, 3), np.uint8)) == []
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert face_app.get(noise) == []


def test_two_faces_side_by_side(face_app):
    two = np.concatenate([np.asarray(tm.draw_test_face(1)), np.asarray(tm.draw_test_face(2))], axis=1)
    faces = face_app.get(np.ascontiguousarray(two[:, :, ::-1]))
    assert len(faces) == 2
    centres = sorted((f.bbox[0] + f.bbox[2]) / 2 for f in faces)
    assert abs(centres[0] - 128) < 4 and abs(centres[1] - 384) < 4


@pytest.mark.parametrize("det_size", [(640, 640), (320, 320), (160, 160), (128, 128)])
def test_detection_at_several_det_sizes_and_positions(face_app, det_size, tiny_models_dir):
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=tm.INSIGHTFACE_PACK, root=str(tiny_models_dir / "insightface"),
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=det_size)
    for size, offset, scale in ((256, (0, 0), 1.0), (320, (30, -20), 0.7), (400, (-60, 10), 0.5)):
        faces = app.get(_bgr(tm.draw_test_face(3, size, offset=offset, scale=scale)))
        assert len(faces) == 1, (det_size, size, offset, scale)
        tol = max(4.0, 0.05 * size * scale)
        expected = tm.drawn_face_box(size, offset=offset, scale=scale)
        np.testing.assert_allclose(faces[0].bbox, expected, atol=tol)


def test_identity_similarity(face_app):
    def emb(img):
        faces = face_app.get(_bgr(img))
        assert len(faces) == 1
        return faces[0].normed_embedding

    e1 = emb(tm.draw_test_face(1))
    assert float(e1 @ emb(tm.draw_test_face(1))) == pytest.approx(1.0, abs=1e-5)
    same_moved = float(e1 @ emb(tm.draw_test_face(1, 320, offset=(20, -15), scale=0.8)))
    others = [float(e1 @ emb(tm.draw_test_face(i))) for i in (0, 2, 3, 4, 5)]
    assert same_moved > 0.95
    assert max(others) < 0.8
    assert max(others) < same_moved - 0.15
