"""Qwen-Image-Edit-2509 editor LoRA trainer on the tiny Qwen edit model: over-fit, resume, diffusers + native
ComfyUI loading, provenance, config errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from train_helpers import native_probe, read_lora, train

from engines import dataset as ds
from engines.edit_pairs import EditPair, write_edit_pairs
from engines.errors import FlenUserError
from tools.tiny_models import draw_test_face
from training.lora_training import ConfigError, config_from_dict
from training.train_editor_lora import EditorLoraConfig, EditorLoraTask

STEPS = 24


def edit_set(output_dir, character: str):
    pairs = []
    for i in range(3):
        face = draw_test_face(i, size=32)
        target = Image.eval(face, lambda v: 255 - v)  # "invert the colours"
        pairs.append(EditPair(target=target, controls=[face], instruction="invert the colours", name=f"p{i}"))
    return write_edit_pairs(output_dir, character, pairs).dataset.path


def settings(tiny_models, dataset, loras, **over):
    base = dict(model=str(tiny_models / "diffusers" / "flen-tiny-qwen-image-edit"), dataset=str(dataset),
                output_dir=str(loras), precision="fp32", rank=4, resolution=32, bucket_multiple=16,
                condition_resolution=64, learning_rate=1e-2, steps=STEPS, checkpoint_every=0, sample_every=STEPS,
                sample_steps=2, sample_pairs=1, seed=5)
    base.update(over)
    return base


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("editor_lora")
    dataset = edit_set(root / "output", "carol")
    path, task, events = train(EditorLoraConfig, EditorLoraTask, **settings(tiny_models, dataset, root / "loras"))
    return {"root": root, "dataset": dataset, "path": path, "task": task, "events": events}


def test_loss_falls_and_samples_are_written(trained):
    done = trained["events"][-1]
    assert done["flen_event"] == "done"
    assert done["eval_loss_end"] < 0.85 * done["eval_loss_start"], done
    (sample,) = [e for e in trained["events"] if e["flen_event"] == "sample"]
    with Image.open(sample["paths"][0]) as im:
        assert im.size == (32, 32)


def test_output_name_keys_and_provenance(trained):
    path = trained["path"]
    assert path == trained["root"] / "loras" / "flenwheel" / "carol" / "qwen_lora_v1.safetensors"
    tensors, meta = read_lora(path)
    assert all(k.startswith("transformer.transformer_blocks.") for k in tensors)
    assert meta["lora_rank"] == meta["lora_alpha"] == "4"
    prov = json.loads(meta["flenwheel"])
    d = ds.load_dataset(trained["dataset"])
    assert d.frozen and prov["dataset"]["hash"] == d.hash and prov["dataset"]["kind"] == "edit_pairs"
    assert prov["dataset"]["n_controls"] == 1 and prov["control_resolution"] == 32
    assert prov["base_model"] == "flen-tiny-qwen-image-edit" and prov["steps_done"] == STEPS
    assert prov["hyperparameters"]["condition_resolution"] == 64 and prov["software"]["diffusers"]


def test_lora_loads_in_diffusers_and_changes_the_output(trained, tiny_models):
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_models / "diffusers" / "flen-tiny-qwen-image-edit")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 16, generator=g)
    text = torch.randn(1, 5, 16, generator=g)

    def forward():
        with torch.no_grad():
            return pipe.transformer(hidden_states=x, timestep=torch.tensor([0.5]), encoder_hidden_states=text,
                                    img_shapes=[[(1, 4, 4), (1, 4, 4)]], return_dict=False)[0]

    base = forward()
    pipe.load_lora_weights(str(trained["path"]), adapter_name="editor")
    assert (forward() - base).abs().max() > 1e-3
    pipe.set_adapters(["editor"], [0.0])
    assert (forward() - base).abs().max() < 1e-6


def test_keys_map_onto_native_comfyui_qwen_image_and_patch_like_diffusers_fuses(trained, tiny_models, tmp_path):
    result = native_probe(tmp_path, tiny_models, trained["path"], "qwen_image")
    assert result["unused_keys"] == [] and result["changed_by_lora"] > 0
    assert result["max_abs_diff"] <= 1e-6 and result["native_keys_missing_in_diffusers"] == []


def test_interrupted_and_resumed_run_ends_with_the_same_lora(trained, tiny_models, tmp_path):
    common = settings(tiny_models, trained["dataset"], tmp_path / "loras", steps=7, checkpoint_every=2,
                      sample_every=0)
    a, _, _ = train(EditorLoraConfig, EditorLoraTask, run_dir=str(tmp_path / "a"), **common)
    assert train(EditorLoraConfig, EditorLoraTask, run_dir=str(tmp_path / "b"), stop_at_step=5, **common)[0] is None
    b, _, events = train(EditorLoraConfig, EditorLoraTask, run_dir=str(tmp_path / "b"), **common)
    assert any(e["flen_event"] == "resume" and e["step"] == 4 for e in events)
    assert (a.name, b.name) == ("qwen_lora_v1.safetensors", "qwen_lora_v2.safetensors")
    ta, tb = read_lora(a)[0], read_lora(b)[0]
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6)


def test_config_errors_are_clear(trained, tiny_models, tmp_path):
    good = settings(tiny_models, trained["dataset"], tmp_path)
    with pytest.raises(ConfigError, match="batch_size must be 1 for the editor trainer"):
        EditorLoraTask(config_from_dict(EditorLoraConfig, {**good, "batch_size": 2}))
    with pytest.raises(ConfigError, match="'condition_resolution' is 8; it must be between 32 and 2048"):
        config_from_dict(EditorLoraConfig, {**good, "condition_resolution": 8})
    with pytest.raises(ConfigError, match=r"unknown key 'control_res' \(did you mean 'control_resolution'\?\)"):
        config_from_dict(EditorLoraConfig, {**good, "control_res": 64})
    char_set = ds.write_dataset(tmp_path / "out", "dave", [draw_test_face(0, size=32)], token="ohwx person")
    with pytest.raises(ConfigError, match="is a 'character' set; this trainer needs a 'edit_pairs' set"):
        EditorLoraTask(config_from_dict(EditorLoraConfig, {**good, "dataset": str(char_set.dataset.path)}))
    with pytest.raises(FlenUserError, match="needs one of: QwenImageEditPlusPipeline"):
        EditorLoraTask(config_from_dict(EditorLoraConfig, {**good, "model": str(tiny_models / "diffusers" /
                                                                                 "flen-tiny-flux")}))


def test_default_options_keep_the_loss_curve_of_before_the_options(trained):
    """As for the character trainer: default options give the curve measured before the new options."""
    from train_helpers import REPO

    reference = json.loads((REPO / "tests" / "data" / "default_loss_curves.json").read_text())
    log = [json.loads(line) for line in (trained["task"].run_dir() / "loss.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == pytest.approx(reference["editor"], rel=1e-5, abs=0)
    done = trained["events"][-1]
    assert [done["eval_loss_start"], done["eval_loss_end"]] == pytest.approx(reference["editor_eval"], rel=1e-5)


def test_several_resolutions_use_every_bucket(trained, tiny_models, tmp_path):
    _, task, _ = train(EditorLoraConfig, EditorLoraTask, **settings(
        tiny_models, trained["dataset"], tmp_path / "loras", steps=6, sample_every=0, resolutions="32,48",
        run_dir=str(tmp_path / "multi")))
    log = [json.loads(line) for line in (task.run_dir() / "loss.jsonl").read_text().splitlines()]
    assert {tuple(r["bucket"]) for r in log} == {(32, 32), (48, 48)}
    files = [it["file"] for it in ds.load_dataset(trained["dataset"]).items]
    assert {r["items"][0] for r in log} == {f"{f}@{res}" for f in files for res in (32, 48)}
