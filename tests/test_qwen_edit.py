"""Qwen-Image-Edit engine on the tiny pipeline: LoRA stacking, determinism, sizes, bad input."""

from __future__ import annotations

import pytest
import torch

from engines import qwen_edit
from engines.angle_catalogue import PRESETS, parse_custom_lines, sweep_lines
from engines.errors import FlenUserError
from engines.lora_stack import LoraEntry, LoraStack
from engines.model_host import LocalHost
from tools.tiny_models import draw_test_face

QWEN = "flen-tiny-qwen-image-edit"


def _entry(models, name, strength=1.0):
    return LoraEntry(name=f"flen-tiny/{name}", path=str(models / "loras" / "flen-tiny" / name), strength=strength)


def _load(models):
    return qwen_edit.load_qwen_edit(models / "diffusers" / QWEN, QWEN, "fp32", torch.device("cpu"))


@pytest.fixture(scope="module")
def qwen(tiny_models):
    return _load(tiny_models)


@pytest.fixture(scope="module")
def face():
    return draw_test_face(1, size=64)


def _edit(handle, face, stack=LoraStack(), seed=7, **kw):
    req = qwen_edit.EditRequest(instruction="将镜头向左旋转45度", steps=2, seed=seed, width=64, height=64,
                                condition_pixels=64 * 64, **kw)
    return qwen_edit.edit(handle, [face], req, stack, LocalHost())


def test_edit_is_deterministic_per_seed_and_records_meta(qwen, face):
    a, meta = _edit(qwen, face, seed=7)
    b, _ = _edit(qwen, face, seed=7)
    c, _ = _edit(qwen, face, seed=8)
    assert a.shape == (1, 64, 64, 3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert meta[0]["instruction"] == "将镜头向左旋转45度" and meta[0]["seed"] == 7
    assert (meta[0]["width"], meta[0]["height"]) == (64, 64) and meta[0]["model"] == QWEN


def test_reference_size_constants_are_restored(qwen, face):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as mod

    before = (mod.VAE_IMAGE_SIZE, mod.CONDITION_IMAGE_SIZE)
    _edit(qwen, face)
    assert (mod.VAE_IMAGE_SIZE, mod.CONDITION_IMAGE_SIZE) == before == (1024 * 1024, 384 * 384)


def test_strength_zero_is_base_and_weight_change_does_not_reread(qwen, face, tiny_models):
    base, _ = _edit(qwen, face)
    zero = LoraStack().extended(_entry(tiny_models, "qwen_edit_lora_a.safetensors", 0.0))
    assert torch.equal(_edit(qwen, face, zero)[0], base)
    reads = qwen.adapters.file_reads
    one = LoraStack().extended(_entry(tiny_models, "qwen_edit_lora_a.safetensors", 1.0))
    changed, _ = _edit(qwen, face, one)
    assert qwen.adapters.file_reads == reads
    assert not torch.allclose(changed, base)


def test_two_stacked_loras_equal_the_same_loras_fused(qwen, face, tiny_models):
    w1, w2 = 0.8, -0.6
    stack = (LoraStack().extended(_entry(tiny_models, "qwen_edit_lora_a.safetensors", w1))
             .extended(_entry(tiny_models, "qwen_edit_lora_b.safetensors", w2)))
    unmerged, _ = _edit(qwen, face, stack)
    assert qwen.adapters.stacked_layers > 0  # the concatenated pair (stack_adapters) made this image

    fused = _load(tiny_models)
    pipe = fused.pipe
    for e in stack.entries:
        pipe.load_lora_weights(e.path, adapter_name=e.adapter_name)
    pipe.set_adapters([e.adapter_name for e in stack.entries], adapter_weights=[w1, w2])
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    merged, _ = _edit(fused, face)
    assert torch.allclose(unmerged, merged, atol=1e-4)
    assert not torch.allclose(merged, _edit(fused, face, seed=99)[0])  # sanity: output depends on inputs


def test_flux_lora_on_qwen_is_refused_with_name_and_mismatch(qwen, face, tiny_models):
    stack = LoraStack().extended(_entry(tiny_models, "flux_lora_a.safetensors"))
    with pytest.raises(FlenUserError) as err:
        _edit(qwen, face, stack)
    msg = str(err.value)
    assert "flux_lora_a.safetensors" in msg and "does not fit this Qwen-Image(-Edit) model" in msg


def test_sizes_the_model_cannot_take(qwen, face):
    with pytest.raises(FlenUserError, match="divisible by"):
        qwen_edit.edit(qwen, [face], qwen_edit.EditRequest(instruction="x", width=70, height=64), LoraStack(),
                       LocalHost())
    with pytest.raises(FlenUserError, match="outside what the model can take"):
        qwen_edit.edit(qwen, [face], qwen_edit.EditRequest(instruction="x", width=16, height=16), LoraStack(),
                       LocalHost())
    with pytest.raises(FlenUserError, match="Give both width and height"):
        qwen_edit.edit(qwen, [face], qwen_edit.EditRequest(instruction="x", width=64), LoraStack(), LocalHost())


def test_pixel_budget_follows_aspect_ratio(qwen):
    from PIL import Image

    wide = Image.new("RGB", (200, 100))
    w, h = qwen_edit.output_size(qwen, qwen_edit.EditRequest(instruction="x", megapixels=1.0), wide)
    m = qwen.size_multiple
    assert w % m == 0 and h % m == 0
    assert abs(w / h - 2.0) < 0.05 and abs(w * h - 1024 * 1024) / (1024 * 1024) < 0.05


def test_bad_image_batches():
    with pytest.raises(FlenUserError, match="alpha channel"):
        qwen_edit.check_image_batch("image1", torch.zeros(1, 8, 8, 4))
    with pytest.raises(FlenUserError, match="empty batch"):
        qwen_edit.check_image_batch("image1", torch.zeros(0, 8, 8, 3))


def test_angle_catalogue_presets_and_custom_lines():
    lines = sweep_lines("model-card head angles", "smile_wide: Make the person grin\nLook up")
    labels = [line.label for line in lines]
    assert labels[: len(PRESETS["model-card head angles"])] == list(PRESETS["model-card head angles"])
    assert labels[-2:] == ["smile_wide", "custom_2"]
    yaw = next(line for line in lines if line.label == "yaw_left_45")
    assert yaw.instruction("zh") == "将镜头向左旋转45度"
    assert yaw.instruction("en") == "Rotate the camera 45 degrees to the left"
    assert yaw.instruction("zh+en") == "将镜头向左旋转45度 Rotate the camera 45 degrees to the left."
    assert parse_custom_lines("# comment\n\n") == []
    with pytest.raises(FlenUserError, match="angle list is empty"):
        sweep_lines("custom lines only", "  \n# nothing\n")
    with pytest.raises(FlenUserError, match="appears twice"):
        sweep_lines("model-card head angles", "yaw_left_45: again")


def test_loras_on_an_fp8_stored_transformer_run_in_bf16(tiny_models, face):
    """fp8 precision stores transformer weights in e4m3; LoRA layers added by peft must not inherit it."""
    handle = _load(tiny_models)
    from engines.fp8_linear import convert_linears_to_fp8

    convert_linears_to_fp8(handle.pipe.transformer, torch.float32)  # what precision "fp8" does
    stack = LoraStack().extended(_entry(tiny_models, "qwen_edit_lora_a.safetensors", 0.8))
    images, _ = _edit(handle, face, stack)
    assert torch.isfinite(images).all()
    lora_dtypes = {p.dtype for n, p in handle.pipe.transformer.named_parameters() if "lora_" in n}
    assert lora_dtypes and not lora_dtypes & {torch.float8_e4m3fn, torch.float8_e5m2}
    base, _ = _edit(handle, face)
    assert not torch.allclose(images, base)  # the LoRA acts on the fp8 model
    params = handle.pipe.transformer.named_parameters()
    base_dtypes = {p.dtype for n, p in params if n.endswith("to_q.base_layer.weight")}
    assert base_dtypes == {torch.float8_e4m3fn}


def test_engine_output_equals_diffusers_own_pipeline_call(qwen, face):
    """The staged edit (own encode, own decode) reproduces one plain QwenImageEditPlusPipeline call."""
    ours, _ = _edit(qwen, face, seed=11)
    with qwen_edit.reference_sizes(64 * 64, 64 * 64), torch.no_grad():
        ref = qwen.pipe(image=[face], prompt="将镜头向左旋转45度", true_cfg_scale=1.0, width=64, height=64,
                        num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(11),
                        output_type="pt").images
    assert torch.allclose(ours, ref.permute(0, 2, 3, 1).float(), atol=1e-5)


class _CountingHost(LocalHost):
    def __init__(self):
        super().__init__()
        self.encoder_loads = 0

    def prepare(self, *modules, working_bytes=0):
        if any(type(m).__name__.startswith("Qwen2_5_VL") for m in modules):
            self.encoder_loads += 1
        return super().prepare(*modules)


def test_edit_many_encodes_once_and_equals_single_edits(qwen, face):
    other = draw_test_face(2, size=64)
    reqs = [qwen_edit.EditRequest(instruction=text, steps=2, seed=s, width=64, height=64, condition_pixels=64 * 64)
            for text, s in (("将镜头向左旋转45度", 1), ("让人物微笑", 2))]
    jobs = [qwen_edit.EditJob([face], reqs[0], {"label": "yaw_left_45"}),
            qwen_edit.EditJob([other], reqs[1], {"label": "smiling"})]
    host = _CountingHost()
    many, metas = qwen_edit.edit_many(qwen, jobs, LoraStack(), host)
    assert host.encoder_loads == 1  # one encoder stage for the whole batch
    assert [m["label"] for m in metas] == ["yaw_left_45", "smiling"]
    for k, job in enumerate(jobs):
        single, _ = qwen_edit.edit(qwen, job.images, job.request, LoraStack(), LocalHost())
        assert torch.equal(many[k:k + 1], single)
    with pytest.raises(FlenUserError, match="empty"):
        qwen_edit.edit_many(qwen, [], LoraStack(), LocalHost())
