"""The training launchers in a real ComfyUI: dataset → FLENTrainCharacterLoRA → FLENLoraStack → FLENFluxGenerate
→ SaveImage in one POST /prompt; POST /interrupt ends the trainer process."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from flux_prompts import add_lora_driven_generation
from safetensors import safe_open

pytestmark = pytest.mark.server

COLORS = [0xC08040, 0x4080C0, 0x40C080]
TINY = ("bucket_multiple: 16\nmax_sequence_length: 16\nsample_steps: 2\n"
        "sample_prompts: ['a photo of {token}']\n")


def dataset_nodes(character: str) -> dict:
    prompt: dict = {}
    for k, color in enumerate(COLORS):
        prompt[f"img{k}"] = {"class_type": "EmptyImage",
                             "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": color}}
    prompt["b1"] = {"class_type": "ImageBatch", "inputs": {"image1": ["img0", 0], "image2": ["img1", 0]}}
    prompt["b2"] = {"class_type": "ImageBatch", "inputs": {"image1": ["b1", 0], "image2": ["img2", 0]}}
    prompt["write"] = {"class_type": "FLENDatasetWriter",
                       "inputs": {"images": ["b2", 0], "character": character, "instance_token": "ohwx_char person",
                                  "caption_template": "{token}, {labels}", "version": "new", "phase": "head",
                                  "kind": "auto", "near_duplicates": "keep", "phash_threshold": 6,
                                  "class_prompt": ""}}
    return prompt


def train_node(steps: int, sample_every: int, seed: int = 0) -> dict:
    return {"class_type": "FLENTrainCharacterLoRA",
            "inputs": {"dataset": ["write", 0], "model": "flen-tiny-flux", "precision": "fp32", "steps": steps,
                       "rank": 4, "alpha": 0.0, "learning_rate": 0.01, "resolution": 32, "seed": seed,
                       "checkpoint_every": 0, "sample_every": sample_every, "init_lora": "", "resume": True,
                       "advanced": TINY, "phase": "all", "prior_preservation": False, "class_images": "",
                       "class_prompt": ""}}


def test_trained_lora_name_drives_a_lora_stack_in_the_same_prompt(comfy, comfy_server):
    character = "tr_" + uuid.uuid4().hex[:8]
    prompt = dataset_nodes(character)
    prompt["train"] = train_node(steps=4, sample_every=2)
    add_lora_driven_generation(prompt, ["train", 0], character)
    outputs = comfy.run(prompt)
    name = f"flenwheel/{character}/char_lora_v1.safetensors"
    assert name in outputs["train"]["text"][0], outputs
    assert outputs["save"]["images"][0]["filename"].startswith(character), outputs
    path = comfy_server.base / "models" / "loras" / name
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    prov = json.loads(meta["flenwheel"])
    assert prov["dataset"]["character"] == character and prov["steps_done"] == 4
    training = comfy_server.base / "output" / "flenwheel" / character / "training"
    (run,) = [p for p in training.iterdir() if p.name.startswith("char_lora-v1-")]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000002_00.png", "step_00000002_grid.png",
                                                                   "step_00000004_00.png", "step_00000004_grid.png"]
    assert not (training / "launcher_child.json").exists()  # the child is gone


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped) is gone for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_interrupt_ends_the_trainer_process(comfy, comfy_server):
    character = "ti_" + uuid.uuid4().hex[:8]
    prompt = dataset_nodes(character)
    prompt["train"] = train_node(steps=100_000, sample_every=0)
    prompt_id = comfy.queue(prompt)
    training = comfy_server.base / "output" / "flenwheel" / character / "training"
    deadline = time.time() + 120
    pid = None
    while time.time() < deadline:
        child = training / "launcher_child.json"
        logs = list(training.glob("*/loss.jsonl")) if training.is_dir() else []
        if child.is_file() and logs and logs[0].stat().st_size > 0:
            pid = json.loads(child.read_text())["pid"]
            break
        time.sleep(0.2)
    assert pid is not None, "the trainer never started training"
    assert _pid_alive(pid)
    comfy.post("/interrupt", {})
    t0 = time.time()
    while _pid_alive(pid) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert not _pid_alive(pid), "trainer still running 10 s after POST /interrupt"
    assert time.time() - t0 < 6
    deadline = time.time() + 30
    def entry():
        return comfy.get(f"/history/{prompt_id}").json().get(prompt_id)

    while entry() is None and time.time() < deadline:
        time.sleep(0.2)
    messages = [m[0] for m in entry()["status"]["messages"]]
    assert "execution_interrupted" in messages
    assert not (comfy_server.base / "models" / "loras" / "flenwheel" / character).exists()  # no LoRA written


def test_trainer_options_through_the_node(comfy, comfy_server):
    """The node's option inputs reach the trainer: warmup schedule in the loss log, both resolutions' buckets,
    EMA file beside the LoRA, shift sampling, seeded caption dropout, token placement, TensorBoard files and
    the loss-curve IMAGE output (saved by a SaveImage)."""
    character = "to_" + uuid.uuid4().hex[:8]
    prompt = dataset_nodes(character)
    prompt["train"] = train_node(steps=6, sample_every=0, seed=2)
    prompt["train"]["inputs"].update(
        lr_scheduler="constant_with_warmup", lr_warmup_steps=3, resolutions="32, 48", timestep_sampling="shift",
        weighting_scheme="cosmap", ema=True, ema_decay=0.9, tensorboard=True, caption_dropout_rate=0.5,
        trigger_placement="append")
    prompt["curve"] = {"class_type": "SaveImage", "inputs": {"images": ["train", 2], "filename_prefix": character}}
    outputs = comfy.run(prompt)
    name = f"flenwheel/{character}/char_lora_v1.safetensors"
    text = outputs["train"]["text"][0]
    assert name in text and f"flenwheel/{character}/char_lora_v1.ema.safetensors" in text, text
    loras = comfy_server.base / "models" / "loras" / "flenwheel" / character
    assert sorted(p.name for p in loras.iterdir()) == ["char_lora_v1.ema.safetensors", "char_lora_v1.safetensors"]
    with safe_open(str(loras / "char_lora_v1.safetensors"), "pt") as fh:
        prov = json.loads(fh.metadata()["flenwheel"])
    hp = prov["hyperparameters"]
    assert (hp["lr_scheduler"], hp["lr_warmup_steps"], hp["resolutions"], hp["timestep_sampling"],
            hp["weighting_scheme"], hp["ema"], hp["ema_decay"], hp["caption_dropout_rate"],
            hp["trigger_placement"]) == ("constant_with_warmup", 3, [32, 48], "shift", "cosmap", True, 0.9, 0.5,
                                         "append")
    assert all(c.endswith("ohwx_char person") for c in prov["captions"]["used"].values())
    training = comfy_server.base / "output" / "flenwheel" / character / "training"
    (run,) = [p for p in training.iterdir() if p.name.startswith("char_lora-v1-")]
    log = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01, 0.01, 0.01, 0.01])
    assert {tuple(r["bucket"]) for r in log} == {(32, 32), (48, 48)}
    assert all("captions_dropped" in r for r in log)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    (image,) = outputs["curve"]["images"]
    saved = comfy_server.base / "output" / image.get("subfolder", "") / image["filename"]
    from PIL import Image

    with Image.open(saved) as im:
        assert im.size == (768, 384)
