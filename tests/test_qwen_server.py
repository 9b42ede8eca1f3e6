"""Qwen edit nodes in a real ComfyUI: the shipped angle-sweep workflow and bad-input messages."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tools.demo import load_api_workflow, output_files, with_diffusers_folders, write_demo_inputs

pytestmark = pytest.mark.server

HEAD_ANGLES = ["yaw_left_45", "yaw_right_45", "yaw_left_90", "yaw_right_90"]


@pytest.fixture
def sweep_prompt(comfy_server):
    write_demo_inputs(comfy_server.base / "input")
    return load_api_workflow("flen_angle_sweep")


def test_angle_sweep_workflow_saves_one_labelled_image_per_angle(comfy, comfy_server, sweep_prompt):
    outputs = comfy.run(sweep_prompt)
    files = output_files(comfy_server.base, outputs)
    assert len(files) == len(HEAD_ANGLES)
    pixels, labels = set(), []
    for f in files:
        with Image.open(f) as im:
            assert im.size == (64, 64)
            saved = json.loads(im.info["prompt"])
            meta = json.loads(im.info["flen_meta"])
            pixels.add(im.convert("RGB").tobytes())
        sweep = next(n for n in saved.values() if n["class_type"] == "FLENAngleSweep")
        assert sweep["inputs"]["preset"] == "model-card head angles"
        assert f.name.endswith(f"_{meta['label']}.png")
        assert meta["instruction"].startswith("将镜头")
        assert [e["name"] for e in meta["loras"]] == ["flen-tiny/qwen_edit_lora_a.safetensors",
                                                     "flen-tiny/qwen_edit_lora_b.safetensors"]
        labels.append(meta["label"])
    assert labels == HEAD_ANGLES
    assert len(pixels) == len(HEAD_ANGLES)  # every angle got its own seed and instruction


def test_angle_sweep_into_stock_save_image(comfy, comfy_server, sweep_prompt):
    sweep_prompt["6"] = {"class_type": "SaveImage",
                         "inputs": {"images": ["5", 0], "filename_prefix": "t/stock_sweep"}}
    files = output_files(comfy_server.base, comfy.run(sweep_prompt))
    assert len(files) == len(HEAD_ANGLES)


def test_save_images_never_overwrites_and_counts_on(comfy, comfy_server, sweep_prompt):
    sweep_prompt["5"]["inputs"].update(preset="custom lines only", custom_lines="smile: 让人物微笑")
    sweep_prompt["6"]["inputs"]["filename_prefix"] = "t/no_overwrite"
    first = output_files(comfy_server.base, comfy.run(sweep_prompt))
    sweep_prompt["5"]["inputs"]["seed"] = 99  # a changed input, so the node runs again
    second = output_files(comfy_server.base, comfy.run(sweep_prompt))
    assert [f.name for f in first] == ["no_overwrite_00001_smile.png"]
    assert [f.name for f in second] == ["no_overwrite_00002_smile.png"]
    assert first[0].exists() and second[0].exists()


def test_single_edit_node_runs(comfy, comfy_server, sweep_prompt):
    prompt = {k: v for k, v in sweep_prompt.items() if k in ("1", "2", "3", "4")}
    prompt["5"] = {"class_type": "FLENQwenEdit", "inputs": {
        "qwen_pipe": ["2", 0], "image1": ["1", 0], "lora_stack": ["4", 0], "instruction": "让人物微笑",
        "negative_prompt": "", "steps": 2, "true_cfg": 2.0, "seed": 3, "megapixels": 0.004, "width": 0,
        "height": 0, "batch": 2}}
    prompt["6"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "t/edit"}}
    files = output_files(comfy_server.base, comfy.run(prompt))
    assert len(files) == 2
    with Image.open(files[0]) as im:
        assert im.size == (64, 64)  # 0.004 MP at 1:1 → 64×64


@pytest.mark.parametrize("change, node_type, message", [
    ({"5": {"preset": "custom lines only", "custom_lines": ""}}, "FLENAngleSweep", "angle list is empty"),
    ({"5": {"width": 70, "height": 64}}, "FLENAngleSweep", "divisible by"),
    ({"3": {"lora_name": "flen-tiny/flux_lora_a.safetensors"}}, "FLENAngleSweep",
     "'flen-tiny/flux_lora_a.safetensors' does not fit this Qwen-Image(-Edit) model"),
    ({"2": {"model": "flen-tiny-flux"}}, "FLENQwenEditLoader", "is a FluxPipeline folder"),  # diffusers loader
    ({"2": {"precision": "nf4"}}, "FLENQwenEditLoader", "needs an NVIDIA GPU"),
    ({"6": {"filename_prefix": "../../outside"}}, "FLENSaveImages", "points outside ComfyUI's output folder"),
])
def test_bad_input_is_reported_clearly(comfy, sweep_prompt, change, node_type, message):
    if node_type == "FLENQwenEditLoader":  # the shipped split-file loader swapped for the diffusers-folder one
        with_diffusers_folders(sweep_prompt)
    for node_id, values in change.items():
        sweep_prompt[node_id]["inputs"].update(values)
    error = comfy.run_error(sweep_prompt)
    assert error["node_type"] == node_type
    assert message in error["exception_message"]


def test_mismatched_image_batches_are_reported(comfy, sweep_prompt):
    prompt = {k: v for k, v in sweep_prompt.items() if k in ("1", "2")}
    prompt["10"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 2}}
    prompt["11"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 3}}
    prompt["5"] = {"class_type": "FLENQwenEdit", "inputs": {
        "qwen_pipe": ["2", 0], "image1": ["10", 0], "image2": ["11", 0], "instruction": "让人物微笑",
        "negative_prompt": "", "steps": 1, "true_cfg": 1.0, "seed": 3, "megapixels": 0.004, "width": 0,
        "height": 0, "batch": 1}}
    prompt["6"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "t/mismatch"}}
    error = comfy.run_error(prompt)
    assert error["node_type"] == "FLENQwenEdit"
    assert "'image2' has 3 images but image1 has 2" in error["exception_message"]


def test_lora_strength_scale_multiplies_the_strengths_the_edit_runs_with(comfy, comfy_server, sweep_prompt):
    """Stack 0.8 / 0.6 at scale 0.5 must give the very image of stack 0.4 / 0.3 at scale 1, and not that of the
    unscaled stack (the halvings are exact in binary floating point)."""
    sweep_prompt["5"]["inputs"].update(preset="custom lines only", custom_lines="smile: 让人物微笑", steps=2)

    def run(strengths: tuple[float, float], scale: float, tag: str) -> tuple[bytes, list[float]]:
        sweep_prompt["3"]["inputs"]["strength"], sweep_prompt["4"]["inputs"]["strength"] = strengths
        sweep_prompt["5"]["inputs"]["lora_strength_scale"] = scale
        sweep_prompt["6"]["inputs"]["filename_prefix"] = f"t/scale_{tag}"
        (f,) = output_files(comfy_server.base, comfy.run(sweep_prompt))
        with Image.open(f) as im:
            meta = json.loads(im.info["flen_meta"])
            return im.convert("RGB").tobytes(), [e["strength"] for e in meta["loras"]]

    scaled, scaled_strengths = run((0.8, 0.6), 0.5, "half")
    direct, direct_strengths = run((0.4, 0.3), 1.0, "direct")
    unscaled, unscaled_strengths = run((0.8, 0.6), 1.0, "full")
    assert scaled == direct, "the sweep did not run with the scaled strengths"
    assert scaled != unscaled, "the LoRA strengths leave no trace in the image: the test cannot tell"
    assert scaled_strengths == direct_strengths == [0.4, 0.3] and unscaled_strengths == [0.8, 0.6]
