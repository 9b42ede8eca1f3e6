"""The trainers' options on the tiny FLUX: learning-rate schedules, timestep samplers and loss weighting,
several resolutions, caption dropout and trigger placement, TensorBoard files and the loss-curve image."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_char_lora import settings
from train_helpers import char_dataset, read_lora, train

from training.lora_training import (
    ConfigError,
    TrainConfig,
    bucket_sizes,
    config_from_dict,
    flux_mu,
    loss_curve_image,
    pick_bucket,
    sample_t,
    step_generator,
)
from training.train_char_lora import CharLoraConfig, CharLoraTask, place_trigger

TOKEN = "ohwx_char person"


def _log(task) -> list[dict]:
    return [json.loads(line) for line in (task.run_dir() / "loss.jsonl").read_text().splitlines()]


# ---- timestep samplers: the distributions they claim ----------------------------------------------------

def _phi(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _ks(samples: np.ndarray, cdf) -> float:
    """Kolmogorov-Smirnov distance between the samples and an analytic CDF."""
    xs = np.sort(samples.astype(np.float64))
    n = len(xs)
    f = cdf(xs)
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))


def _draw(n: int = 40_000, seq_len: int = 256, **options) -> np.ndarray:
    cfg = TrainConfig(model="m", dataset="d", output_dir="o", **options)
    return sample_t(cfg, n, step_generator(11, 1), seq_len=seq_len).numpy()


def _logit(t: np.ndarray) -> np.ndarray:
    t = t.astype(np.float64)
    return np.log(t) - np.log1p(-t)


# 40 000 draws: the 99.9% KS bound is 1.95/sqrt(n) ≈ 0.0098; a sampler that ignores its option misses by > 0.1
KS_BOUND = 0.0098


def test_uniform_sampler_is_uniform():
    t = _draw(timestep_sampling="uniform")
    assert _ks(t, lambda x: x) < KS_BOUND
    assert _ks(t, lambda x: _phi(_logit(x))) > 0.05  # and not the logit-normal default


def test_logit_normal_sampler_has_the_asked_mean_and_spread():
    t = _draw(timestep_sampling="logit_normal", logit_mean=0.7, logit_std=0.6)
    assert _ks(t, lambda x: _phi((_logit(x) - 0.7) / 0.6)) < KS_BOUND
    default = _draw()
    assert _ks(default, lambda x: _phi(_logit(x))) < KS_BOUND  # mean 0, std 1
    assert _ks(t, lambda x: _phi(_logit(x))) > 0.1


def test_sigmoid_sampler_scales_the_normal():
    t = _draw(timestep_sampling="sigmoid", sigmoid_scale=2.0)
    assert _ks(t, lambda x: _phi(_logit(x) / 2.0)) < KS_BOUND
    assert _ks(t, lambda x: _phi(_logit(x))) > 0.05


def test_shift_sampler_moves_times_towards_noise():
    # t' = s·t / (1 + (s-1)·t) adds ln(s) to logit(t): logit(t') ~ N(ln s, sigmoid_scale)
    t = _draw(timestep_sampling="shift", discrete_flow_shift=3.0)
    assert _ks(t, lambda x: _phi(_logit(x) - math.log(3.0))) < KS_BOUND
    assert np.median(t) == pytest.approx(0.75, abs=0.01)  # the median 0.5 of sigmoid(N) shifts to 3/4


def test_flux_shift_sampler_depends_on_the_image_size():
    small, large = _draw(timestep_sampling="flux_shift", seq_len=256), _draw(timestep_sampling="flux_shift",
                                                                             seq_len=4096)
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    assert _ks(small, lambda x: _phi(_logit(x) - 0.5)) < KS_BOUND
    assert _ks(large, lambda x: _phi(_logit(x) - 1.15)) < KS_BOUND
    assert np.median(large) > np.median(small) + 0.1


# ---- learning-rate schedules and loss weighting, in the loss log ----------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return char_dataset(tmp_path_factory.mktemp("opts") / "output", "olga")


def _expected_lr(kind: str, step: int, base: float, warm: int, total: int) -> float:
    if kind == "constant":
        return base
    if step <= warm:
        return base * step / warm
    if kind == "constant_with_warmup":
        return base
    p = (step - warm - 1) / (total - warm)
    return base * (0.5 * (1 + math.cos(math.pi * p)) if kind == "cosine" else 1 - p)


@pytest.mark.parametrize("kind", ["constant_with_warmup", "cosine", "linear"])
def test_lr_per_step_follows_the_schedule(kind, tiny_models, dataset, tmp_path):
    events: list = []
    path, task, _ = train(CharLoraConfig, CharLoraTask, events, **settings(
        tiny_models, dataset, tmp_path / "loras", steps=10, sample_every=0, lr_scheduler=kind, lr_warmup_steps=3,
        learning_rate=1e-2, tensorboard=False))
    lrs = [r["lr"] for r in _log(task)]
    expected = [_expected_lr(kind, s, 1e-2, 3, 10) for s in range(1, 11)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lrs[0] == pytest.approx(1e-2 / 3) and lrs[2] == pytest.approx(1e-2)
    if kind != "constant_with_warmup":
        assert lrs[-1] < 0.3e-2 and all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert [e["lr"] for e in events if e["flen_event"] == "step"] == lrs
    prov = json.loads(read_lora(path)[1]["flenwheel"])
    assert prov["schedule"]["lr_scheduler"] == kind and prov["schedule"]["lr_warmup_steps"] == 3
    assert prov["schedule"]["final_lr"] == pytest.approx(expected[-1])


@pytest.mark.parametrize("scheme", ["cosmap", "sigma_sqrt"])
def test_loss_weighting_scales_each_step_by_its_time(scheme, tiny_models, dataset, tmp_path):
    """One step of the same batch, noise and time: weighted loss / plain loss = w(t), by the formulas."""
    common = settings(tiny_models, dataset, tmp_path / "loras", steps=1, sample_every=0, tensorboard=False,
                      timestep_sampling="uniform")
    _, plain, _ = train(CharLoraConfig, CharLoraTask, run_dir=str(tmp_path / "plain"), **common)
    _, weighted, _ = train(CharLoraConfig, CharLoraTask, run_dir=str(tmp_path / scheme), weighting_scheme=scheme,
                           **common)
    (p,), (w,) = _log(plain), _log(weighted)
    assert p["t"] == w["t"] and len(p["t"]) == 1
    t = p["t"][0]
    weight = 2 / (math.pi * (1 - 2 * t + 2 * t * t)) if scheme == "cosmap" else t ** -2
    assert w["loss"] / p["loss"] == pytest.approx(weight, rel=1e-4)


def test_shift_sampling_reaches_the_trainer(tiny_models, dataset, tmp_path):
    _, task, _ = train(CharLoraConfig, CharLoraTask, **settings(
        tiny_models, dataset, tmp_path / "loras", steps=16, sample_every=0, tensorboard=False,
        timestep_sampling="shift", discrete_flow_shift=20.0))
    ts = [t for r in _log(task) for t in r["t"]]
    assert len(ts) == 16 and np.mean(ts) > 0.85  # logit(t) ~ N(ln 20 ≈ 3, 1); the default's mean is 0.5


# ---- several resolutions, caption dropout, trigger placement, TensorBoard, loss curve -------------------

@pytest.fixture(scope="module")
def multi(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    dataset = char_dataset(root / "output", "pia", template="{token}, a drawn face, plain background")
    events: list = []
    common = settings(tiny_models, dataset, root / "loras", steps=12, sample_every=0, resolutions="32,48",
                      trigger_placement="append", seed=4)
    path, task, _ = train(CharLoraConfig, CharLoraTask, events, run_dir=str(root / "drop"),
                          caption_dropout_rate=0.5, **common)
    _, plain_task, _ = train(CharLoraConfig, CharLoraTask, run_dir=str(root / "keep"), **common)
    return {"path": path, "task": task, "events": events, "log": _log(task), "plain_log": _log(plain_task)}


def test_every_bucket_of_every_resolution_is_used(multi):
    from engines import dataset as ds

    task = multi["task"]
    items = ds.load_dataset(task.cfg.dataset).items
    expected = set()
    for res in (32, 48):
        for it in items:
            with Image.open(it["image_path"]) as im:
                expected.add(pick_bucket(im.width, im.height, bucket_sizes(res, 16)))
    assert {(32, 32), (48, 48)} < expected  # squares of both sizes and the landscape image's buckets
    log = multi["log"]
    assert {tuple(r["bucket"]) for r in log} == expected
    assert {r["items"][0] for r in log} == {f"{it['file']}@{res}" for it in items for res in (32, 48)}
    prov = json.loads(read_lora(multi["path"])[1]["flenwheel"])
    assert prov["resolutions"] == [32, 48] and prov["hyperparameters"]["resolutions"] == [32, 48]


def test_caption_dropout_drops_seeded_captions_and_changes_the_conditioning(multi):
    log, plain = multi["log"], multi["plain_log"]
    dropped = [r["captions_dropped"] for r in log]
    assert 2 <= sum(dropped) <= 10 and set(dropped) <= {0, 1}  # rate 0.5 over 12 single-image steps
    first = dropped.index(1)
    # same data, noise and times: the runs agree until the first dropped caption, and differ there
    for a, b in zip(log[:first], plain[:first], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert abs(log[first]["loss"] - plain[first]["loss"]) > 1e-4
    assert "captions_dropped" not in plain[0]
    prov = json.loads(read_lora(multi["path"])[1]["flenwheel"])
    assert prov["captions"]["caption_dropout_rate"] == 0.5 and prov["hyperparameters"]["caption_dropout_rate"] == 0.5


def test_caption_dropout_is_the_same_on_a_second_run(multi, tiny_models, tmp_path):
    _, task, _ = train(CharLoraConfig, CharLoraTask, **settings(
        tiny_models, multi["task"].cfg.dataset, tmp_path / "loras", steps=12, sample_every=0, resolutions="32,48",
        trigger_placement="append", seed=4, caption_dropout_rate=0.5, run_dir=str(tmp_path / "again")))
    assert [r["captions_dropped"] for r in _log(task)] == [r["captions_dropped"] for r in multi["log"]]


def test_trigger_placement_puts_the_token_where_asked(multi):
    assert place_trigger(f"{TOKEN}, smiling, front", TOKEN, "as_captioned") == f"{TOKEN}, smiling, front"
    assert place_trigger("", TOKEN, "as_captioned") == TOKEN
    assert place_trigger(f"{TOKEN}, smiling, front", TOKEN, "append") == f"smiling, front, {TOKEN}"
    assert place_trigger(f"smiling, {TOKEN}, front", TOKEN, "prepend") == f"{TOKEN}, smiling, front"
    assert place_trigger("photo of [trigger] at the beach", TOKEN, "replace_placeholder") == \
        f"photo of {TOKEN} at the beach"
    assert place_trigger("{token} in a red coat", TOKEN, "replace_placeholder") == f"{TOKEN} in a red coat"
    assert place_trigger("a red coat", TOKEN, "replace_placeholder") == f"{TOKEN}, a red coat"
    used = json.loads(read_lora(multi["path"])[1]["flenwheel"])["captions"]
    assert used["trigger_placement"] == "append" and len(used["used"]) == 3
    for caption in used["used"].values():  # the captions the trainer encoded
        assert caption == f"a drawn face, plain background, {TOKEN}"


def test_loss_curve_image_is_written(multi):
    done = multi["events"][-1]
    with Image.open(done["loss_curve"]) as im:
        assert im.size == (768, 384)
        arr = np.asarray(im.convert("RGB"))
    assert (arr < 128).any() and (arr == 255).all(axis=2).mean() > 0.5  # drawn lines on white
    assert loss_curve_image([]).size == (768, 384)


def test_tensorboard_event_file_has_the_loss_scalars(multi):
    done = multi["events"][-1]
    if importlib.util.find_spec("tensorboard") is None:
        warnings = [e for e in multi["events"] if e["flen_event"] == "warning"]
        assert done["tensorboard"] is None and "pip install tensorboard" in warnings[0]["message"]
        pytest.skip("the tensorboard package is not installed (it is in requirements.txt): the run warned and "
                    "wrote no event files")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(done["tensorboard"])
    acc.Reload()
    loss = acc.Scalars("loss/train")
    assert [e.step for e in loss] == list(range(1, 13))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in multi["log"]], rel=1e-6)
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([r["lr"] for r in multi["log"]])
    assert [e.step for e in acc.Scalars("loss/eval")] == [0, 12]


# ---- config errors -----------------------------------------------------------------------------------

def test_option_errors_are_clear(tmp_path):
    good = {"model": "m", "dataset": "d", "output_dir": "o", "steps": 10, "bucket_multiple": 16}
    assert config_from_dict(CharLoraConfig, {**good, "resolutions": "512, 768,1024"}).resolutions == [512, 768, 1024]
    assert config_from_dict(CharLoraConfig, {**good, "resolutions": [32, 48]}).all_resolutions() == [32, 48]
    assert config_from_dict(CharLoraConfig, good).all_resolutions() == [512]
    with pytest.raises(ConfigError, match="'resolutions' must be whole numbers separated by commas"):
        config_from_dict(CharLoraConfig, {**good, "resolutions": "512,big"})
    with pytest.raises(ConfigError, match="'resolutions' has 40; each must be .* a multiple of 'bucket_multiple' 16"):
        config_from_dict(CharLoraConfig, {**good, "resolutions": [32, 40]})
    with pytest.raises(ConfigError, match="'constant', which has no warmup; choose 'constant_with_warmup'"):
        config_from_dict(CharLoraConfig, {**good, "lr_warmup_steps": 5})
    with pytest.raises(ConfigError, match="'lr_warmup_steps' \\(10\\) must be fewer than 'steps' \\(10\\)"):
        config_from_dict(CharLoraConfig, {**good, "lr_scheduler": "cosine", "lr_warmup_steps": 10})
    with pytest.raises(ConfigError, match="'lr_scheduler' is 'cosine_restarts'; choose one of constant"):
        config_from_dict(CharLoraConfig, {**good, "lr_scheduler": "cosine_restarts"})
    with pytest.raises(ConfigError, match="'weighting_scheme' is 'mode'; choose one of none, sigma_sqrt, cosmap"):
        config_from_dict(CharLoraConfig, {**good, "weighting_scheme": "mode"})
    with pytest.raises(ConfigError, match="'timestep_sampling' is 'sigma'; choose one of"):
        config_from_dict(CharLoraConfig, {**good, "timestep_sampling": "sigma"})
    with pytest.raises(ConfigError, match="'caption_dropout_rate' is 1.5; it must be between 0 and 1"):
        config_from_dict(CharLoraConfig, {**good, "caption_dropout_rate": 1.5})
    with pytest.raises(ConfigError, match="'trigger_placement' is 'middle'; choose one of as_captioned, prepend"):
        config_from_dict(CharLoraConfig, {**good, "trigger_placement": "middle"})
    with pytest.raises(ConfigError, match="'ema_decay' is 1.0; it must be between 0 and"):
        config_from_dict(CharLoraConfig, {**good, "ema_decay": 1.0})
    assert torch.is_tensor(sample_t(config_from_dict(CharLoraConfig, good), 2, step_generator(0, 1)))


# ---- samples: one grid per sample step, the best step by identity score -----------------------------------

def test_identity_scorer_scores_the_datasets_faces_with_the_face_model(tiny_models, tmp_path):
    """The real scorer (tiny face pack): the dataset's own faces score high, another face lower, a blank 0."""
    from tools.tiny_models import INSIGHTFACE_PACK, draw_test_face

    dataset = char_dataset(tmp_path / "output", "quinn", size=256)
    cfg = config_from_dict(CharLoraConfig, settings(tiny_models, dataset, tmp_path / "loras", sample_every=2,
                                                    identity_model=INSIGHTFACE_PACK,
                                                    identity_root=str(tiny_models / "insightface")))
    score = CharLoraTask(cfg).identity_scorer()
    own = score([draw_test_face(0, size=256), draw_test_face(1, size=256)])
    other = score([draw_test_face(9, size=256), draw_test_face(9, size=256)])
    blank = score([Image.new("RGB", (256, 256), (128, 128, 128))])
    assert own["faces"] == 2 and own["references"] == 3
    assert own["score"] > other["score"] and own["score"] > 0.5
    assert blank == {**blank, "score": 0.0, "faces": 0, "scores": [None]}
    with pytest.raises(ConfigError, match="identity_model scores the sample images .* set 'sample_every'"):
        CharLoraTask(config_from_dict(CharLoraConfig, {**cfg.__dict__, "sample_every": 0}))
    blank_set = tmp_path / "blank"
    from engines import dataset as ds

    blank_path = ds.write_dataset(blank_set, "rae", [Image.new("RGB", (64, 64), (90, 90, 90))],
                                  token=TOKEN).dataset.path
    with pytest.raises(ConfigError, match="finds no usable face in the dataset's images"):
        CharLoraTask(config_from_dict(CharLoraConfig, {**cfg.__dict__, "dataset": str(blank_path)})).identity_scorer()


class _BrightnessScored(CharLoraTask):
    """The tiny FLUX draws no faces, so this stands in for the face model: the samples' mean brightness."""

    def identity_scorer(self):
        def score(images):
            values = [float(np.asarray(im, dtype=np.float64).mean()) / 255 for im in images]
            return {"score": round(sum(values) / len(values), 6), "scores": values, "faces": len(values)}

        return score


def test_best_sample_step_is_kept_recorded_and_survives_a_resume(tiny_models, dataset, tmp_path):
    common = settings(tiny_models, dataset, tmp_path / "loras", steps=8, sample_every=2, tensorboard=False)
    events: list = []
    path, task, _ = train(CharLoraConfig, _BrightnessScored, events, run_dir=str(tmp_path / "a"), **common)
    scored = [e for e in events if e["flen_event"] == "identity"]
    assert [e["step"] for e in scored] == [2, 4, 6, 8]
    best = max(scored, key=lambda e: e["score"])  # the first of equal scores: max keeps the first
    done = events[-1]
    assert done["best"] == {"step": best["step"], "score": best["score"]}
    prov = json.loads(read_lora(path)[1]["flenwheel"])
    assert prov["best_checkpoint"]["step"] == best["step"]
    assert [r["step"] for r in prov["best_checkpoint"]["scores"]] == [2, 4, 6, 8]
    # one grid per sample step
    grids = sorted(p.name for p in (task.run_dir() / "samples").glob("*_grid.png"))
    assert grids == [f"step_{s:08d}_grid.png" for s in (2, 4, 6, 8)]
    with Image.open(task.run_dir() / "samples" / grids[0]) as im:
        assert im.height > 128 and im.width >= 128
    assert best["step"] != 8, "pick another score sign: the test needs a best step before the last"
    best_file = path.with_name(path.name.replace(".safetensors", ".best.safetensors"))
    assert done["best_lora"] == str(best_file)
    # the kept weights are those of that step: a run of exactly that many steps ends with them
    short, _, _ = train(CharLoraConfig, CharLoraTask, run_dir=str(tmp_path / "short"),
                        **{**common, "steps": best["step"], "sample_every": 0})
    kept, short_w = read_lora(best_file)[0], read_lora(short)[0]
    for k in short_w:
        torch.testing.assert_close(kept[k], short_w[k], rtol=0, atol=1e-6)
    assert json.loads(read_lora(best_file)[1]["flenwheel"])["best_checkpoint"]["of"] == path.name
    # stopped after the best step and resumed from a checkpoint: the same best weights
    resumed = {**common, "checkpoint_every": best["step"] + 1}  # the latest checkpoint comes after the best step
    assert train(CharLoraConfig, _BrightnessScored, run_dir=str(tmp_path / "b"), stop_at_step=7, **resumed)[0] is None
    path_b, _, events_b = train(CharLoraConfig, _BrightnessScored, run_dir=str(tmp_path / "b"), **resumed)
    assert any(e["flen_event"] == "resume" for e in events_b)
    assert [e["step"] for e in events_b if e["flen_event"] == "identity"] == [8]  # the others came with the checkpoint
    assert events_b[-1]["best"] == done["best"]
    kept_b = read_lora(path_b.with_name(path_b.name.replace(".safetensors", ".best.safetensors")))[0]
    for k in kept:
        torch.testing.assert_close(kept_b[k], kept[k], rtol=0, atol=1e-6)


# ---- checkpointing only some blocks ---------------------------------------------------------------------

def _tiny_flux_with_lora(base: Callable[[torch.nn.Module], None] | None = None):
    """The tiny FLUX with a LoRA on q/k/v; ``base`` first changes the frozen model (e.g. quantises it)."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
                                   in_channels=16)
    if base is not None:
        base(model)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v"]))
    model.train()
    return model


def _step_grads(n_blocks: int, compiled: bool = False) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Forward + backward of the tiny FLUX with block_checkpointing(n_blocks): calls per block, LoRA grads."""
    from training.lora_training import block_checkpointing, compile_blocks, transformer_blocks

    model = _tiny_flux_with_lora()
    blocks = transformer_blocks(model)
    calls = [0] * len(blocks)
    if not compiled:  # hooks would be traced into the graphs
        for i, b in enumerate(blocks):
            b.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    if compiled and n_blocks == 0:
        compile_blocks(model)
    else:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=block_checkpointing(model, n_blocks,
                                                                                            compiled=compiled))
    return calls, _lora_grads(model)


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One seeded forward + backward of the tiny FLUX: its LoRA gradients."""
    g = torch.Generator().manual_seed(1)
    out = model(hidden_states=torch.randn(1, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)[0]
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpoint_blocks_recomputes_only_that_many_blocks_with_the_same_gradients():
    all_calls, all_grads = _step_grads(-1)
    part_calls, part_grads = _step_grads(2)
    none_calls, none_grads = _step_grads(0)
    assert len(all_calls) == 4  # 2 double + 2 single blocks, in call order
    assert all_calls == [2, 2, 2, 2]  # each block's forward runs again in backward
    assert part_calls == [2, 2, 1, 1]
    assert none_calls == [1, 1, 1, 1]
    assert all_grads.keys() == part_grads.keys() == none_grads.keys() and all_grads
    for k in all_grads:
        assert torch.equal(all_grads[k], part_grads[k]) and torch.equal(all_grads[k], none_grads[k]), k
    assert any(g.abs().sum() > 0 for g in all_grads.values())


def test_checkpoint_blocks_keeps_the_loss_curve(tiny_models, dataset, tmp_path):
    common = settings(tiny_models, dataset, tmp_path / "loras", steps=4, sample_every=0, tensorboard=False)
    curves = {}
    for n in (-1, 1, 0):
        _, task, _ = train(CharLoraConfig, CharLoraTask, run_dir=str(tmp_path / f"ckpt{n}"), checkpoint_blocks=n,
                           **common)
        curves[n] = [r["loss"] for r in _log(task)]
    assert len(curves[-1]) == 4 and curves[-1] == curves[1] == curves[0]
    with pytest.raises(ConfigError, match="checkpoint_blocks"):
        config_from_dict(CharLoraConfig, {**common, "checkpoint_blocks": -2})


# ---- compiled blocks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_blocks", [-1, 2, 0])
def test_compiled_blocks_give_the_eager_gradients_and_run_as_graphs(monkeypatch, n_blocks):
    """aot_eager traces each block into the graph inductor would compile (no C compiler here); the GPU's
    inductor speed is measured by benchmarks/bench_training.py --compile. n_blocks 0: no checkpointing, the
    blocks compiled in place."""
    import torch._dynamo

    from training import lora_training as lt

    monkeypatch.setattr(lt, "COMPILE_BACKEND", "aot_eager")
    _, eager = _step_grads(n_blocks)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    calls, compiled = _step_grads(n_blocks, compiled=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2, dict(torch._dynamo.utils.counters["stats"])  # a double and a single block at least
    assert compiled.keys() == eager.keys() and compiled
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_compile_blocks_keeps_the_loss_curve(tiny_models, dataset, tmp_path, monkeypatch):
    import torch._dynamo

    from training import lora_training as lt

    monkeypatch.setattr(lt, "COMPILE_BACKEND", "aot_eager")
    common = settings(tiny_models, dataset, tmp_path / "loras", steps=3, sample_every=0, tensorboard=False)
    curves = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        _, task, _ = train(CharLoraConfig, CharLoraTask, run_dir=str(tmp_path / f"c{compiled}"),
                           compile_blocks=compiled, **common)
        curves[compiled] = [r["loss"] for r in _log(task)]
    torch._dynamo.reset()
    assert len(curves[True]) == 3
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-4)


def _nf4_tiny_flux_grads(opaque: bool) -> dict[str, torch.Tensor]:
    """The tiny FLUX with every block Linear an NF4 bitsandbytes layer (as the trainer's nf4 base), one step's
    LoRA gradients; ``opaque``: through training.opaque_nf4 with compiled, checkpointed blocks (aot_eager)."""
    import bitsandbytes as bnb

    from training import opaque_nf4
    from training.lora_training import block_checkpointing

    def quantise(mod: torch.nn.Module) -> None:
        for name, child in list(mod.named_children()):
            if type(child) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(mod, name, q.to("cpu"))
            else:
                quantise(child)

    model = _tiny_flux_with_lora(lambda m: (quantise(m.transformer_blocks), quantise(m.single_transformer_blocks)))
    if opaque:
        # every NF4 layer of the 4 blocks: 14 in a double block, 6 in a single one
        assert opaque_nf4.make_nf4_opaque(model) == 2 * 14 + 2 * 6
    model.enable_gradient_checkpointing(gradient_checkpointing_func=block_checkpointing(model, -1, compiled=opaque))
    return _lora_grads(model)


def test_compiled_nf4_blocks_run_the_opaque_op_with_the_eager_gradients(monkeypatch):
    """The NF4 base through one opaque op (training.opaque_nf4) in compiled, checkpointed blocks gives
    bitsandbytes' eager gradients, and its weight is dequantised inside the op in the forward, again in the
    recomputation and again in the backward (on an H200, compiled blocks over the traced bitsandbytes layers held
    10.6 GiB more than eager ones for FLUX at 1024², benchmarks/RESULTS.md; a CPU cannot show that memory)."""
    import torch._dynamo

    from training import lora_training as lt
    from training import opaque_nf4

    monkeypatch.setattr(lt, "COMPILE_BACKEND", "aot_eager")
    eager = _nf4_tiny_flux_grads(False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dequantised = [0]
    real_weight = opaque_nf4._weight

    def counting_weight(*args):
        dequantised[0] += 1
        return real_weight(*args)

    monkeypatch.setattr(opaque_nf4, "_weight", counting_weight)
    compiled = _nf4_tiny_flux_grads(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    # 40 layers: forward and recomputation each dequantise every weight, the backward those whose input needs grad
    assert dequantised[0] > 2 * 40, dequantised
    assert compiled.keys() == eager.keys() and compiled
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in compiled.values())
    torch._dynamo.reset()


def test_compile_blocks_without_a_compiler_is_refused_before_any_work(monkeypatch, tiny_models, dataset, tmp_path):
    """compile_blocks with inductor and no C++ compiler (the CPU's; Triton on a GPU): a clear error at the start,
    before the dataset is cached, not torch.compile's at the first step."""
    import importlib.util
    import shutil as _shutil

    from training import lora_training as lt

    real_find_spec = importlib.util.find_spec
    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
        with pytest.raises(ConfigError, match="needs Triton"):
            lt.check_compile_support(torch.device("cuda"), "inductor")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(_shutil, "which", lambda name: None)
    common = settings(tiny_models, dataset, tmp_path / "loras", steps=2, sample_every=0, tensorboard=False)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        train(CharLoraConfig, CharLoraTask, run_dir=str(tmp_path / "nocc"), compile_blocks=True, **common)
    assert not (tmp_path / "nocc" / lt.CACHE_DIR).exists()
    lt.check_compile_support(torch.device("cpu"), "aot_eager")  # needs no compiler: no error
