"""FLENAIToolkitLauncher in a real ComfyUI through POST /prompt, with a fake ai-toolkit checkout configured
in the server's user/flenwheel.json (as an operator would): a dataset written in the same prompt, the config
run, the LoRA installed under its FLENwheel name; POST /interrupt ends the child; an unconfigured or broken
checkout is a clear error."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import yaml
from fake_ai_toolkit import alive, configure, make_checkout
from flux_prompts import add_lora_driven_generation

from engines import dataset as ds

pytestmark = pytest.mark.server


def launcher_prompt(character: str, checkout: str, base_model: str, steps: int = 4) -> dict:
    return {
        "img": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 0x3366CC}},
        "write": {"class_type": "FLENDatasetWriter",
                  "inputs": {"images": ["img", 0], "character": character, "instance_token": "ohwx_char person",
                             "caption_template": "{token}, {labels}", "version": "new", "phase": "head",
                             "kind": "pristine", "near_duplicates": "keep", "phash_threshold": 6,
                             "class_prompt": ""}},
        "train": {"class_type": "FLENAIToolkitLauncher",
                  "inputs": {"dataset": ["write", 0], "job_kind": "flux", "ai_toolkit_folder": checkout,
                             "base_model": base_model, "steps": steps, "rank": 4, "learning_rate": 0.0002,
                             "resolutions": "512", "sample_every": 0, "save_every": 2, "character": ""}},
    }


@pytest.fixture
def base_model(comfy) -> str:
    spec = comfy.get("/object_info/FLENAIToolkitLauncher").json()["FLENAIToolkitLauncher"]
    options = spec["input"]["required"]["base_model"][1]["options"]
    assert options, "no diffusers folder offered"
    return next((o for o in options if "flux" in o.lower()), options[0])


def test_launcher_trains_through_the_queue_and_installs_the_lora(comfy, comfy_server, tmp_path, base_model):
    character = "at_" + uuid.uuid4().hex[:10]
    configure(comfy_server.base, make_checkout(tmp_path / "ai-toolkit"))
    outputs = comfy.run(launcher_prompt(character, "ai-toolkit", base_model))
    text = outputs["train"]["text"][0]
    assert f"flenwheel/{character}/char_lora_v1.safetensors" in text and "after 4 steps" in text
    lora = comfy_server.base / "models" / "loras" / "flenwheel" / character / "char_lora_v1.safetensors"
    assert lora.is_file()
    from safetensors import safe_open

    with safe_open(str(lora), "np") as f:
        prov = json.loads(f.metadata()["flenwheel.provenance"])
    assert prov["dataset_version"] == "v1" and prov["trainer"] == "ai-toolkit"
    assert prov["base_model"].endswith(base_model)
    vdir = comfy_server.base / "output" / "flenwheel" / character / "datasets" / "v1"
    assert ds.read_info(vdir)["status"] == "frozen"
    (config_path,) = (comfy_server.base / "output" / "flenwheel" / character / "ai_toolkit_runs").glob("*/*.yaml")
    config = yaml.safe_load(config_path.read_text())
    assert config["config"]["process"][0]["datasets"][0]["folder_path"] == str(vdir / "head" / "pristine")
    assert config["config"]["process"][0]["model"]["name_or_path"].endswith(base_model)
    # a second run (another dataset version) never overwrites: v2
    prompt = launcher_prompt(character, "ai-toolkit", base_model, steps=3)
    outputs = comfy.run(prompt)
    assert f"flenwheel/{character}/char_lora_v2.safetensors" in outputs["train"]["text"][0]


def test_launcher_lora_name_drives_a_lora_stack_in_the_same_prompt(comfy, comfy_server, tmp_path, base_model):
    """The lora_name output links to FLEN LoRA Stack's combo input; the installed file then loads into the tiny
    FLUX pipeline (the fake checkout hands back a real tiny FLUX LoRA's tensors) and an image is saved."""
    character = "at_" + uuid.uuid4().hex[:10]
    real_lora = comfy_server.base / "models" / "loras" / "flen-tiny" / "flux_lora_a.safetensors"
    configure(comfy_server.base, make_checkout(tmp_path / "ai-toolkit", final_from=str(real_lora)))
    prompt = launcher_prompt(character, "ai-toolkit", base_model, steps=2)
    add_lora_driven_generation(prompt, ["train", 0], character)
    outputs = comfy.run(prompt)
    assert f"flenwheel/{character}/char_lora_v1.safetensors" in outputs["train"]["text"][0]
    saved = outputs["save"]["images"][0]
    assert saved["filename"].startswith(character)
    assert (comfy_server.base / "output" / saved["subfolder"] / saved["filename"]).is_file()


def test_unconfigured_checkout_or_a_typed_path_is_refused(comfy, comfy_server, tmp_path, base_model):
    character = "at_" + uuid.uuid4().hex[:10]
    configure(comfy_server.base, tmp_path / "no-checkouts-here")
    spec = comfy.get("/object_info/FLENAIToolkitLauncher").json()["FLENAIToolkitLauncher"]
    assert spec["input"]["required"]["ai_toolkit_folder"][1]["options"] == ["(none configured)"]
    error = comfy.run_error(launcher_prompt(character, "(none configured)", base_model))
    assert error["node_type"] == "FLENAIToolkitLauncher"
    assert "No ai-toolkit checkout is configured" in error["exception_message"]
    assert "FLENWHEEL_AI_TOOLKIT" in error["exception_message"]
    # a folder path typed into the prompt is not one of the configured names (ComfyUI 0.3.64 does not check
    # V3 combo values; the node does): refused, nothing runs
    checkout = make_checkout(tmp_path / "ai-toolkit")
    error = comfy.run_error(launcher_prompt(character, str(checkout), base_model))
    assert "No ai-toolkit checkout is configured" in error["exception_message"]
    configure(comfy_server.base, make_checkout(tmp_path / "configured" / "ai-toolkit"))
    error = comfy.run_error(launcher_prompt(character, str(checkout), base_model))
    assert "is not configured here; choose one of ai-toolkit" in error["exception_message"]
    assert not (checkout / "last_argv.json").exists()
    assert not (tmp_path / "configured" / "ai-toolkit" / "last_argv.json").exists()


def test_interrupt_ends_the_child(comfy, comfy_server, tmp_path, base_model):
    character = "at_" + uuid.uuid4().hex[:10]
    pid_file = tmp_path / "pids.json"
    configure(comfy_server.base, make_checkout(tmp_path / "ai-toolkit", step_sleep=0.2, spawn_worker=True,
                                               pid_file=str(pid_file)))
    prompt_id = comfy.queue(launcher_prompt(character, "ai-toolkit", base_model, steps=5000))
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_file.exists(), "ai-toolkit child never started"
    pids = json.loads(pid_file.read_text())
    time.sleep(1.0)
    assert alive(pids["child"])
    t0 = time.monotonic()
    assert comfy.post("/interrupt", {}).status_code == 200
    while (alive(pids["child"]) or alive(pids["worker"])) and time.monotonic() - t0 < 15:
        time.sleep(0.05)
    assert not alive(pids["child"]) and not alive(pids["worker"]), "a process of the run was left behind"
    assert time.monotonic() - t0 < 10
    while time.monotonic() - t0 < 30:
        entry = comfy.get(f"/history/{prompt_id}").json().get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.1)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds


def test_qwen_job_takes_the_split_loaders_diffusion_model_file(comfy, comfy_server, tmp_path):
    """A FLEN Qwen Edit Loader (ComfyUI files) connected to qwen_pipe: the config the fake ai-toolkit ran names the
    split diffusion-model file as the transformer and the diffusers folder for the rest."""
    from tools.demo import enrich_for_review, load_api_workflow, scripted_review, with_character, write_demo_inputs

    write_demo_inputs(comfy_server.base / "input")
    character = "atq_" + uuid.uuid4().hex[:8]
    comfy.run(enrich_for_review(character), timeout=600)
    scripted_review(comfy, character)
    editor = with_character(load_api_workflow("flywheel2_editor"), character)
    (writer,) = [k for k, v in editor.items() if v["class_type"] == "FLENEditPairWriter"]
    (loader,) = [k for k, v in editor.items() if v["class_type"] == "FLENQwenEditFileLoader"]
    prompt = {k: editor[k] for k in (writer, loader, *editor[writer]["inputs"]["character"][:1])}
    configure(comfy_server.base, make_checkout(tmp_path / "ai-toolkit"))
    prompt["train"] = {"class_type": "FLENAIToolkitLauncher", "inputs": {
        "dataset": [writer, 0], "job_kind": "qwen_image_edit_2509", "ai_toolkit_folder": "ai-toolkit",
        "base_model": "flen-tiny-qwen-image-edit", "steps": 2, "rank": 4, "learning_rate": 0.0002,
        "resolutions": "512", "sample_every": 0, "save_every": 2, "qwen_pipe": [loader, 0]}}
    outputs = comfy.run(prompt)
    assert f"flenwheel/{character}/qwen_lora_v1.safetensors" in outputs["train"]["text"][0]
    (config_path,) = (comfy_server.base / "output" / "flenwheel" / character / "ai_toolkit_runs").glob("*/*.yaml")
    model = yaml.safe_load(config_path.read_text())["config"]["process"][0]["model"]
    models = comfy_server.base / "models"
    assert model["name_or_path"] == str(models / "diffusion_models" / prompt[loader]["inputs"]["diffusion_model"])
    assert model["extras_name_or_path"] == str(models / "diffusers" / "flen-tiny-qwen-image-edit")


@pytest.mark.parametrize("job_kind, loader, base, message", [
    ("flux", "FLENFluxFileLoader", "flen-tiny-flux",
     "ai-toolkit's FLUX.1 trainer reads the transformer, both text encoders and the scheduler from a diffusers "
     "folder"),
    ("qwen_image_edit_2509", "FLENQwenEditFileLoader", "(the connected base pipe)",
     "ai-toolkit reads Qwen-Image-Edit-2509's text encoder, tokenizer, processor and VAE from a diffusers folder"),
])
def test_what_ai_toolkit_cannot_take_is_a_clear_node_error(comfy, comfy_server, tmp_path, job_kind, loader, base,
                                                          message):
    from tools.tiny_workflows import TINY_FLUX_FILES, TINY_QWEN_FILES

    character = "at_" + uuid.uuid4().hex[:10]
    configure(comfy_server.base, make_checkout(tmp_path / "ai-toolkit"))
    prompt = launcher_prompt(character, "ai-toolkit", base)
    slot = "flux_pipe" if job_kind == "flux" else "qwen_pipe"
    prompt["load"] = {"class_type": loader,
                      "inputs": dict(TINY_FLUX_FILES if job_kind == "flux" else TINY_QWEN_FILES)}
    prompt["train"]["inputs"].update(job_kind=job_kind, **{slot: ["load", 0]})
    error = comfy.run_error(prompt)
    assert error["node_type"] == "FLENAIToolkitLauncher"
    assert message in error["exception_message"]
    assert not (tmp_path / "ai-toolkit" / "last_argv.json").exists()
