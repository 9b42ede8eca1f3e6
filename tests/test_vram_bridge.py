"""The VRAM bridge: pack models live in ComfyUI's model management, unload and reload with it."""

from __future__ import annotations

import time

import pytest

from tools.demo import load_api_workflow
from tools.tiny_workflows import TINY_FLUX_FILES

pytestmark = pytest.mark.server
# the split-file loader registers its models under the diffusion-model file's name
NAME = str(TINY_FLUX_FILES["diffusion_model"]).rsplit("/", 1)[-1].removesuffix(".safetensors")


def _models(comfy) -> dict[str, bool]:
    return {m["label"]: m["loaded"] for m in comfy.get("/flenwheel/models").json()["models"]}


def _wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def test_pack_model_is_loaded_unloaded_and_reloaded_by_comfyui(comfy):
    prompt = load_api_workflow("flen_synthetic_flux")
    prompt["4"]["inputs"]["seed"] = 1001
    comfy.run(prompt)
    models = _models(comfy)
    expected = {f"{NAME}/{c}" for c in ("text_encoder", "text_encoder_2", "transformer", "vae")}
    assert expected <= set(models)
    assert models[f"{NAME}/transformer"] is True

    # ComfyUI's worker reads the /free flags when it wakes; a flag set just before it starts waiting
    # sleeps until its next wake-up, so ask again (as a user pressing the button twice would).
    for _attempt in range(6):
        comfy.free(unload_models=True)
        try:
            _wait_for(lambda: not any(_models(comfy).values()), timeout=5)
            break
        except AssertionError:
            continue
    else:
        raise AssertionError(f"still loaded after /free: {_models(comfy)}")

    prompt["4"]["inputs"]["seed"] = 1002  # a changed input, so ComfyUI does not serve the cache
    comfy.run(prompt)
    models = _models(comfy)
    assert models[f"{NAME}/transformer"] is True
    assert models[f"{NAME}/vae"] is True
