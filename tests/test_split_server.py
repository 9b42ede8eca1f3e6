"""The split-file loaders in a real ComfyUI: the shipped workflows load ComfyUI's split files, so on the tiny kit they
run from its split files; their images equal the diffusers folders' (same seeds), fp8 variants load and run, the
trainers train on the files, wrong files get clear errors."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from PIL import Image

from tools.demo import (
    enrich_for_review,
    load_api_workflow,
    output_files,
    scripted_review,
    with_character,
    with_diffusers_folders,
    with_split_files,
    write_demo_inputs,
)

pytestmark = pytest.mark.server

# bf16 split files hold the same weights as the tiny diffusers folders; after 8-bit PNG rounding the images
# may differ by one level where float32 summation order tips a rounding.
SAME_TOL = 1
FP8_TOL = 24  # fp8 rounds every block weight to 3 mantissa bits


@pytest.fixture(scope="module")
def inputs(comfy_server):
    write_demo_inputs(comfy_server.base / "input")


def _pixels(comfy, comfy_server, prompt: dict) -> list[np.ndarray]:
    files = output_files(comfy_server.base, comfy.run(prompt, timeout=600))
    assert files
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB")).astype(int))
    return out


def _prefixed(prompt: dict, prefix: str) -> dict:
    for node in prompt.values():
        if "filename_prefix" in node["inputs"]:
            node["inputs"]["filename_prefix"] = f"t/{prefix}_{uuid.uuid4().hex[:6]}"
    return prompt


def _loaders(prompt: dict) -> set[str]:
    return {n["class_type"] for n in prompt.values() if n["class_type"].endswith("Loader")}


@pytest.mark.parametrize("name", ["flen_angle_sweep", "flen_synthetic_flux"])
def test_workflow_images_from_split_files_equal_the_diffusers_folders(comfy, comfy_server, inputs, name):
    split = _prefixed(load_api_workflow(name), "split")
    assert _loaders(split) <= {"FLENQwenEditFileLoader", "FLENFluxFileLoader"} and _loaders(split)
    reference = with_diffusers_folders(_prefixed(load_api_workflow(name), "ref"))
    assert _loaders(reference) <= {"FLENQwenEditLoader", "FLENFluxLoader"} and _loaders(reference)
    want = _pixels(comfy, comfy_server, reference)
    got = _pixels(comfy, comfy_server, split)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert np.abs(a - b).max() <= SAME_TOL


@pytest.mark.parametrize("name, variant", [
    ("flen_angle_sweep", {"diffusion_model": "flen-tiny/qwen_image_edit_2509_tiny_fp8_e4m3fn.safetensors"}),
    ("flen_angle_sweep", {"diffusion_model": "flen-tiny/qwen_image_edit_2509_tiny_fp8_scaled.safetensors",
                          "text_encoder": "flen-tiny/qwen_2.5_vl_tiny_fp8_scaled.safetensors"}),
    ("flen_synthetic_flux", {"diffusion_model": "flen-tiny/flux1-dev-tiny_fp8_scaled.safetensors",
                             "t5xxl": "flen-tiny/t5xxl_tiny_fp8_e4m3fn_scaled.safetensors"}),
    ("flen_synthetic_flux", {"diffusion_model": "flen-tiny/flux1-dev-tiny.safetensors", "precision": "fp8"}),
])
def test_fp8_variants_load_and_run_close_to_bf16(comfy, comfy_server, inputs, name, variant):
    reference = _pixels(comfy, comfy_server, _prefixed(load_api_workflow(name), "bf16"))
    got = _pixels(comfy, comfy_server, with_split_files(_prefixed(load_api_workflow(name), "fp8"), **variant))
    assert len(got) == len(reference)
    diffs = [np.abs(a - b).max() for a, b in zip(got, reference, strict=True)]
    assert max(diffs) <= FP8_TOL and max(diffs) > 0  # really fp8, still the same model


@pytest.mark.parametrize("name", ["flywheel1_enrich", "flywheel1_synthesize"])
def test_flywheel_workflows_run_from_split_files(comfy, inputs, name):
    prompt = with_character(load_api_workflow(name), "split_" + uuid.uuid4().hex[:8])
    assert _loaders(prompt) <= {"FLENQwenEditFileLoader", "FLENFluxFileLoader"} and _loaders(prompt)
    entry = comfy.wait(comfy.queue(prompt), timeout=600)
    assert entry["status"]["status_str"] == "success"


@pytest.mark.parametrize("name, trainer, pipe_slot, loader, change", [
    ("flywheel1_train", "3", "flux_pipe", "5", {}),
    ("flywheel1_train", "3", "flux_pipe", "5", {"precision": "fp8"}),  # as shipped: the bf16 file quantised
    ("flywheel2_editor", "2", "qwen_pipe", "3", {}),
])
def test_trainer_workflows_train_on_split_files(comfy, comfy_server, inputs, name, trainer, pipe_slot, loader,
                                                change):
    """The built-in trainers on the split files: the shipped workflows connect the loader's pipe to the trainer
    (model set to the 'connected pipe' choice); the LoRA's provenance names the split diffusion-model file."""
    import json

    from safetensors import safe_open

    character = "split_" + uuid.uuid4().hex[:8]
    comfy.run(enrich_for_review(character), timeout=600)
    scripted_review(comfy, character)
    prompt = with_character(load_api_workflow(name), character)
    assert prompt[trainer]["inputs"][pipe_slot] == [loader, 0]
    assert prompt[trainer]["inputs"]["model"] == "(the connected base pipe)"
    assert prompt[loader]["class_type"].endswith("FileLoader")
    prompt[trainer]["inputs"].update(change)
    entry = comfy.wait(comfy.queue(prompt), timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    prefix = "char_lora" if name == "flywheel1_train" else "qwen_lora"
    lora = comfy_server.base / "models" / "loras" / "flenwheel" / character / f"{prefix}_v1.safetensors"
    with safe_open(str(lora), "pt") as f:
        prov = json.loads(f.metadata()["flenwheel"])
    assert prov["base_model"] == prompt[loader]["inputs"]["diffusion_model"].split("/")[-1]
    assert set(prov["hyperparameters"]["files"]) >= {"diffusion_model", "vae"}
    assert prov["hyperparameters"]["precision"] == change.get("precision", "fp32")


def test_trainer_workflow_still_trains_on_a_diffusers_folder(comfy, comfy_server, inputs):
    """The diffusers-folder loader connected to the same trainer: it trains on the folder."""
    import json

    from safetensors import safe_open

    character = "folder_" + uuid.uuid4().hex[:8]
    comfy.run(enrich_for_review(character), timeout=600)
    scripted_review(comfy, character)
    prompt = with_diffusers_folders(with_character(load_api_workflow("flywheel2_editor"), character))
    assert prompt["3"]["class_type"] == "FLENQwenEditLoader"
    entry = comfy.wait(comfy.queue(prompt), timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    lora = comfy_server.base / "models" / "loras" / "flenwheel" / character / "qwen_lora_v1.safetensors"
    with safe_open(str(lora), "pt") as f:
        prov = json.loads(f.metadata()["flenwheel"])
    assert prov["base_model"] == "flen-tiny-qwen-image-edit"


@pytest.fixture(scope="module")
def misplaced(comfy_server):
    """A user's mistake: the text encoder copied into diffusion_models."""
    import shutil

    models = comfy_server.base / "models"
    target = models / "diffusion_models" / "flen-misplaced"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(models / "text_encoders" / "flen-tiny" / "qwen_2.5_vl_tiny.safetensors", target)


@pytest.mark.parametrize("override, node_type, message", [
    ({"diffusion_model": "flen-misplaced/qwen_2.5_vl_tiny.safetensors"}, "FLENQwenEditFileLoader",
     "'qwen_2.5_vl_tiny.safetensors' in the diffusion_models slot looks like a Qwen2.5-VL text encoder"),
    ({"diffusion_model": "flen-tiny/flux1-dev-tiny.safetensors"}, "FLENQwenEditFileLoader",
     "looks like a FLUX.1 diffusion model (BFL key names), but this slot needs a Qwen-Image-Edit-2509"),
    ({"vae": "flen-tiny/ae_tiny.safetensors"}, "FLENQwenEditFileLoader",
     "'ae_tiny.safetensors' in the vae slot looks like a FLUX / Stable Diffusion style VAE"),
    ({"text_encoder": "flen-tiny/t5xxl_tiny_bf16.safetensors"}, "FLENQwenEditFileLoader",
     "looks like a T5 text encoder (e.g. t5xxl), but this slot needs Qwen2.5-VL-7B"),
])
def test_wrong_files_are_reported_clearly(comfy, inputs, misplaced, override, node_type, message):
    prompt = with_split_files(_prefixed(load_api_workflow("flen_angle_sweep"), "bad"), **override)
    error = comfy.run_error(prompt)
    assert error["node_type"] == node_type
    assert message in error["exception_message"]


def test_file_loaders_list_comfyuis_own_folders(comfy):
    info = comfy.get("/object_info/FLENFluxFileLoader").json()["FLENFluxFileLoader"]["input"]["required"]

    def options(spec):
        return spec[1]["options"] if spec[0] == "COMBO" else spec[0]

    assert "flen-tiny/flux1-dev-tiny_fp8_e4m3fn.safetensors" in options(info["diffusion_model"])
    assert "flen-tiny/clip_l_tiny.safetensors" in options(info["clip_l"])
    assert "flen-tiny/ae_tiny.safetensors" in options(info["vae"])
    assert info["precision"][1]["default"] == "auto"
