"""The shipped workflows on the tiny-model kit: their API twins with the tiny models' names and sizes put in.

Shared by the demo, ``queue_cli --tiny`` and the tests, which run every shipped workflow this way.
"""

from __future__ import annotations

import copy
import json

from engines.pack_info import API_WORKFLOWS_DIR

# The trainers on the tiny models: a few steps at 64×64, no checkpoints or sample previews.
TINY_TRAINING = {"steps": 4, "rank": 4, "learning_rate": 0.01, "resolution": 64, "checkpoint_every": 0,
                 "sample_every": 0}

# The tiny kit's ComfyUI split files (tools/tiny_split_files.py) in place of the real ones the shipped workflows'
# split-file loaders name; "auto" computes in fp32 on the CPU.
TINY_QWEN_FILES: dict[str, object] = {"diffusion_model": "flen-tiny/qwen_image_edit_2509_tiny_bf16.safetensors",
                   "text_encoder": "flen-tiny/qwen_2.5_vl_tiny.safetensors",
                   "vae": "flen-tiny/qwen_image_vae_tiny.safetensors", "precision": "auto"}
TINY_FLUX_FILES: dict[str, object] = {"diffusion_model": "flen-tiny/flux1-dev-tiny.safetensors",
                   "clip_l": "flen-tiny/clip_l_tiny.safetensors", "t5xxl": "flen-tiny/t5xxl_tiny_bf16.safetensors",
                   "vae": "flen-tiny/ae_tiny.safetensors", "precision": "auto"}

# Shipped workflows name real models; on the tiny kit the same graphs run with these values.
TINY_SUBSTITUTIONS: dict[str, dict[str, dict[str, object]]] = {
    "flen_synthetic_flux": {
        "1": TINY_FLUX_FILES,
        "2": {"lora_name": "flen-tiny/flux_lora_a.safetensors"},
        "4": {"width": 64, "height": 64, "steps": 4},
        "5": {"filename_prefix": "flenwheel/demo/synthetic"},
    },
    "flen_angle_sweep": {
        "1": {"image": "flen_demo_face.png"},
        "2": TINY_QWEN_FILES,
        "3": {"lora_name": "flen-tiny/qwen_edit_lora_a.safetensors"},
        "4": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors", "strength": 0.5},
        "5": {"width": 64, "height": 64, "steps": 2},
        "6": {"filename_prefix": "flenwheel/demo/sweep"},
    },
    # the flywheel workflows (sources: input/flen_demo_sources/, see write_demo_inputs)
    "flywheel1_enrich": {
        "1": {"folder": "flen_demo_sources"},
        "2": {"face_model": "flen-tiny"},
        "4": TINY_QWEN_FILES,
        "5": {"lora_name": "flen-tiny/qwen_edit_lora_a.safetensors"},
        "6": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors", "strength": 0.5},
        "7": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors"},
        "8": {"width": 64, "height": 64, "steps": 2},
        "13": {"character": "flen_demo"},  # the workflow's one FLEN Character node
    },
    "flywheel1_synthesize": {
        "1": TINY_FLUX_FILES,
        "2": {"lora_name": "flen-tiny/flux_lora_a.safetensors"},
        "3": {"width": 64, "height": 64, "steps": 2, "variations": 4},
        "4": {"folder": "flen_demo_sources"},
        "5": {"face_model": "flen-tiny"},
        "10": {"character": "flen_demo"},
    },
    "flywheel_interactive": {
        "1": {"folder": "flen_demo_sources"},
        "2": {"face_model": "flen-tiny"},
        "3": TINY_QWEN_FILES,
        "4": {"lora_name": "flen-tiny/qwen_edit_lora_a.safetensors"},
        "5": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors", "strength": 0.5},
        "6": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors"},
        "7": {"width": 64, "height": 64, "steps": 2},
        "9": {"timeout_s": 1, "timeout_policy": "approve_all"},  # nobody at the screen
        "13": {"character": "flen_demo"},
    },
    "compare_versions": {
        "1": TINY_FLUX_FILES,
        "2": {"folder": "flen_demo_sources"},
        "3": {"face_model": "flen-tiny"},
        "4": {"lora_name": "flen-tiny/flux_lora_a.safetensors"},
        "5": {"lora_name": "flen-tiny/flux_lora_b.safetensors"},
        "6": {"width": 64, "height": 64, "steps": 1, "cell_size": 64},
        "7": {"width": 64, "height": 64, "steps": 1, "cell_size": 64},
    },
    # the trainers train on what their connected loader names (the tiny split files)
    "flywheel1_train": {
        "11": {"character": "flen_demo"},
        "3": {"precision": "fp32", **TINY_TRAINING, "advanced": "bucket_multiple: 16\nmax_sequence_length: 16"},
        "5": TINY_FLUX_FILES,
        "6": {"folder": "flen_demo_sources"},
        "7": {"face_model": "flen-tiny"},
        "8": {"width": 64, "height": 64, "steps": 1, "cell_size": 64},
    },
    "flywheel2_editor": {
        "11": {"character": "flen_demo"},
        "2": {"precision": "fp32", **TINY_TRAINING, "advanced": "bucket_multiple: 16\ncondition_resolution: 64"},
        "3": TINY_QWEN_FILES,
        "4": {"lora_name": "flen-tiny/qwen_edit_lora_a.safetensors"},
        "5": {"lora_name": "flen-tiny/qwen_edit_lora_b.safetensors", "strength": 0.5},
        "7": {"folder": "flen_demo_sources"},
        "8": {"width": 64, "height": 64, "steps": 2},
    },
}


def load_api_workflow(name: str, tiny: bool = True) -> dict:
    """The API-format twin of a shipped workflow, with tiny-model substitutions applied."""
    prompt = json.loads((API_WORKFLOWS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    if tiny:
        prompt = copy.deepcopy(prompt)
        for node_id, values in TINY_SUBSTITUTIONS.get(name, {}).items():
            prompt[node_id]["inputs"].update(values)
    return prompt
