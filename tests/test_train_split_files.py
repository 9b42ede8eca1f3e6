"""Both built-in trainers on ComfyUI's split files: the same LoRA as from the diffusers folder (bf16 files hold the
same weights), an fp8 file trains over its fp8 weights, and what the split files cannot do is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import char_dataset, read_lora, train

from engines.fp8_linear import Fp8Linear
from tools import tiny_split_files as ts
from training.lora_training import ConfigError, config_from_dict
from training.train_char_lora import CharLoraConfig, CharLoraTask
from training.train_editor_lora import EditorLoraConfig, EditorLoraTask

STEPS = 8
# fp32 training on the same (bf16-valued) weights: only float32 summation order differs between the two loads
SAME_TOL = 1e-4


def _file(tiny_models, files: dict, key: str) -> str:
    return str(tiny_models / ts.folder_of(key) / ts.SPLIT_DIRNAME / files[key])


def flux_files(tiny_models, dm: str = "diffusion_model") -> dict:
    return {"diffusion_model": _file(tiny_models, ts.FLUX_FILES, dm),
            "clip_l": _file(tiny_models, ts.FLUX_FILES, "clip_l"), "t5xxl": _file(tiny_models, ts.FLUX_FILES, "t5xxl"),
            "vae": _file(tiny_models, ts.FLUX_FILES, "vae")}


def qwen_files(tiny_models, dm: str = "diffusion_model") -> dict:
    return {"diffusion_model": _file(tiny_models, ts.QWEN_FILES, dm),
            "text_encoder": _file(tiny_models, ts.QWEN_FILES, "text_encoder"),
            "vae": _file(tiny_models, ts.QWEN_FILES, "vae")}


def char_settings(tiny_models, dataset, loras, **over):
    base = dict(model=str(tiny_models / "diffusers" / "flen-tiny-flux"), dataset=str(dataset), output_dir=str(loras),
                precision="fp32", rank=4, resolution=32, bucket_multiple=16, max_sequence_length=16,
                learning_rate=1e-2, steps=STEPS, checkpoint_every=0, sample_every=STEPS, sample_steps=2,
                sample_prompts=["a photo of {token}"], seed=3)
    base.update(over)
    return base


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_character_trainer_on_split_files_gives_the_diffusers_folders_lora(tiny_models, tmp_path):
    dataset = char_dataset(tmp_path / "output", "bob")
    ref, _, _ = train(CharLoraConfig, CharLoraTask, **char_settings(tiny_models, dataset, tmp_path / "a",
                                                                    run_dir=str(tmp_path / "run_a")))
    path, task, events = train(CharLoraConfig, CharLoraTask, **char_settings(
        tiny_models, dataset, tmp_path / "b", model="", files=flux_files(tiny_models), run_dir=str(tmp_path / "run_b")))
    assert [e for e in events if e["flen_event"] == "sample"]  # samples decode through the split VAE file
    (a, _), (b, meta) = read_lora(ref), read_lora(path)
    assert _max_diff(a, b) < SAME_TOL
    prov = json.loads(meta["flenwheel"])
    assert prov["base_model"] == "flux1-dev-tiny.safetensors"
    assert prov["hyperparameters"]["files"]["clip_l"].endswith("clip_l_tiny.safetensors")


def test_character_trainer_trains_over_an_fp8_file(tiny_models, tmp_path):
    dataset = char_dataset(tmp_path / "output", "dora")
    files = flux_files(tiny_models, "diffusion_model_fp8_scaled")
    cfg = config_from_dict(CharLoraConfig, char_settings(tiny_models, dataset, tmp_path, model="", files=files,
                                                         precision="bf16"))
    base = CharLoraTask(cfg).load_transformer(torch.device("cpu"), torch.float32)
    assert isinstance(base.transformer_blocks[0].attn.to_q, Fp8Linear)  # the frozen base stays fp8
    path, _, events = train(CharLoraConfig, CharLoraTask, **char_settings(
        tiny_models, dataset, tmp_path / "loras", model="", files=files, sample_every=0))
    done = [e for e in events if e["flen_event"] == "done"][-1]
    assert done["eval_loss_end"] < done["eval_loss_start"]
    assert path.is_file()


def test_character_trainer_quantises_a_16_bit_file_to_fp8(tiny_models, tmp_path):
    """precision fp8: the bf16 file's frozen base becomes e4m3 while loading (FLUX.1-dev on 24 GB) and trains."""
    dataset = char_dataset(tmp_path / "output", "fay")
    settings = char_settings(tiny_models, dataset, tmp_path / "loras", model="", files=flux_files(tiny_models),
                             precision="fp8", sample_every=0)
    base = CharLoraTask(config_from_dict(CharLoraConfig, settings)).load_transformer(torch.device("cpu"),
                                                                                     torch.bfloat16)
    assert isinstance(base.transformer_blocks[0].attn.to_q, Fp8Linear)
    path, _, events = train(CharLoraConfig, CharLoraTask, **settings)
    done = [e for e in events if e["flen_event"] == "done"][-1]
    assert done["eval_loss_end"] < done["eval_loss_start"]
    assert path.is_file()


def test_editor_trainer_on_split_files_gives_the_diffusers_folders_lora(tiny_models, tmp_path):
    from test_train_editor_lora import edit_set
    from test_train_editor_lora import settings as editor_settings

    dataset = edit_set(tmp_path / "output", "erin")
    ref, _, _ = train(EditorLoraConfig, EditorLoraTask, **editor_settings(
        tiny_models, dataset, tmp_path / "a", steps=STEPS, sample_every=STEPS, run_dir=str(tmp_path / "run_a")))
    path, _, _ = train(EditorLoraConfig, EditorLoraTask, **editor_settings(
        tiny_models, dataset, tmp_path / "b", steps=STEPS, sample_every=STEPS, model="",
        files=qwen_files(tiny_models), run_dir=str(tmp_path / "run_b")))
    assert _max_diff(read_lora(ref)[0], read_lora(path)[0]) < SAME_TOL


def test_split_file_config_errors_are_clear(tiny_models, tmp_path):
    dataset = char_dataset(tmp_path / "output", "finn")
    files = flux_files(tiny_models)
    with pytest.raises(ConfigError, match="'nf4' quantises a diffusers folder.*Choose bf16"):
        cfg = config_from_dict(CharLoraConfig, char_settings(tiny_models, dataset, tmp_path, model="", files=files,
                                                             precision="nf4"))
        CharLoraTask(cfg).load_transformer(torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="'fp8' quantises ComfyUI's split files.*choose 'nf4'"):
        cfg = config_from_dict(CharLoraConfig, char_settings(tiny_models, dataset, tmp_path, precision="fp8"))
        CharLoraTask(cfg).load_transformer(torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="needs diffusion_model, clip_l, t5xxl, vae.*missing: t5xxl"):
        CharLoraTask(config_from_dict(CharLoraConfig, char_settings(
            tiny_models, dataset, tmp_path, model="", files={k: v for k, v in files.items() if k != "t5xxl"})))
    with pytest.raises(ConfigError, match="'model' is required"):
        config_from_dict(CharLoraConfig, char_settings(tiny_models, dataset, tmp_path, model=""))
