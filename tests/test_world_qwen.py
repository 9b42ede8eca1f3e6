"""The tiny world's Qwen-Image-Edit model (diffusers/flen-world-qwen-edit): its VAE through the pipeline's own path,
its edits of held-out drawings run through engines.qwen_edit (as FLEN Qwen Edit and FLEN Angle Sweep run them), scored
by the world's face pack; and qwen_lora_v1 trained by the editor trainer's own entry on corrections of one identity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engines import identity as idn
from engines import qwen_edit
from engines.edit_pairs import EditPair, write_edit_pairs
from engines.lora_stack import LoraEntry, LoraStack
from engines.model_host import LocalHost
from tools import tiny_world as world
from training import train_editor_lora

CPU = ["CPUExecutionProvider"]
CHARACTER = "worldqwen"
ME = world.CHARACTER_IDENTITY


@pytest.fixture(scope="module")
def models() -> Path:
    return world.world_models()


@pytest.fixture(scope="module")
def measured(models):
    m = world.measure_qwen_world(models)
    print(json.dumps(m))
    return m


def test_vae_round_trip_through_the_pipeline_path(models):
    """The pipeline normalises latents by the config's latents_mean / latents_std: set from the trained VAE's
    latents, they must not be the kit's zeros and ones, and the pipeline's encode + engines' decode must give what the
    VAE itself gives (no frame or normalisation mismatch)."""
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(str(models / "diffusers" / world.QWEN_DIRNAME))
    cfg = pipe.vae.config
    assert cfg.z_dim == world.QWEN_Z and pipe.latent_channels == world.QWEN_Z
    assert len(set(cfg.latents_mean)) > 1 and len(set(cfg.latents_std)) > 1, (cfg.latents_mean, cfg.latents_std)
    ims = [v.draw(3) for v in world.variations(3, 99)]
    trips = world.qwen_round_trips(pipe, ims)
    x = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1) for im in ims])
    with torch.no_grad():
        direct = pipe.vae.decode(pipe.vae.encode(x.unsqueeze(2)).latent_dist.mode()).sample[:, :, 0]
    direct_u8 = ((direct.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert max(float(np.abs(np.asarray(t, np.float32) - d).max()) for t, d in zip(trips, direct_u8, strict=True)) <= 1
    # and it is a reconstruction, not the mean image: closer to its own drawing than to another identity's
    own = np.mean([np.abs(np.asarray(t, np.float32) - np.asarray(im, np.float32)).mean()
                   for t, im in zip(trips, ims, strict=True)])
    other = np.mean([np.abs(np.asarray(t, np.float32) - np.asarray(world.draw_world_face(7), np.float32)).mean()
                     for t in trips])
    assert own < 0.8 * other, (own, other)   # measured 25.6 vs 39.7


def test_vae_round_trips_keep_faces_and_some_identity(measured):
    raw, trip = measured["raw"], measured["round_trip"]
    # measured (2-core CPU): raw drawings 48/48 faces, same 0.94 vs other -0.04; round trips 48/48 faces, same 0.09 vs
    # other 0.016, 7 of 48 passed. The identity the VAE keeps is far below the drawing's (see the module docstring of
    # tools/tiny_world.py): 150 steps of this VAE layout reconstruct colours and layout, not the features.
    assert raw["faces"] == raw["n"] and raw["same_mean"] > 0.9, raw
    assert trip["faces"] >= 0.9 * trip["n"], trip
    assert trip["same_mean"] - trip["other_mean"] >= 0.03, trip
    assert 0 < trip["passed"] < trip["n"], trip


def test_edits_of_held_out_sources_show_faces_and_the_filter_passes_some(measured):
    edits, px = measured["edits"], measured["pixels"]
    # measured (2-core CPU): 47 of 48 edits show a face; same 0.080 vs other 0.013; 3 passed, 43 below threshold, 1 no
    # face, 1 several faces; 27.5 mean abs px from the target (a copy of the source would be 1.2: the features move
    # little), 48.6 before the editor's 250 steps at lr 5e-3 (120 at 1e-3: 0 passed, 35 "several faces")
    assert edits["faces"] >= 0.9 * edits["n"], edits
    assert edits["same_mean"] - edits["other_mean"] >= 0.03, edits
    assert 0 < edits["passed"] < edits["n"], edits
    assert set(edits["rejected"]) <= {idn.REASON_BELOW, idn.REASON_NO_FACE, idn.REASON_SEVERAL}, edits
    assert edits["rejected"].get(idn.REASON_BELOW, 0) >= 0.75 * (edits["n"] - edits["passed"]), edits
    # the edit is nearer its own target than the same target drawn as another identity
    assert px["edit_vs_target"] < 0.8 * px["edit_vs_other_identity"], px
    assert px["edit_vs_target"] < 35, px


def _sweep_pairs(n: int, seed: int, rng: np.random.Generator):
    lines = world.edit_lines()
    out = []
    for v in world.variations(n, seed):
        line = lines[int(rng.integers(len(lines)))]
        out.append((v, line, world.edit_target(v, line)))
    return out


@pytest.fixture(scope="module")
def editor_loop(models, tmp_path_factory):
    """The editor flywheel on the world: 24 corrections of one identity (its drawing -> the drawing the sweep line
    asked for) written by FLEN Edit Pair Writer's engine, qwen_lora_v1 trained by ``python -m
    training.train_editor_lora --config`` (here in this process), and 16 held-out sources of that identity edited
    through engines.qwen_edit without and with it."""
    out = tmp_path_factory.mktemp("world_qwen_loop")
    rng = np.random.default_rng(5)
    corrections = _sweep_pairs(24, 6001, rng)
    held_out = _sweep_pairs(16, 7007, rng)
    pairs = [EditPair(target=t.draw(ME), controls=[v.draw(ME)], instruction=line.instruction(world.EDIT_LANGUAGE),
                      name=f"c{k}") for k, (v, line, t) in enumerate(corrections)]
    dataset = write_edit_pairs(out / "output", CHARACTER, pairs).dataset.path
    config = {"model": str(models / "diffusers" / world.QWEN_DIRNAME), "dataset": str(dataset),
              "output_dir": str(out / "loras"), "precision": "fp32", "rank": 16, "resolution": world.SIZE,
              "bucket_multiple": 16, "condition_resolution": world.CONDITION_SIDE, "learning_rate": 5e-3,
              "steps": 300, "checkpoint_every": 0, "sample_every": 0, "seed": 1, "tensorboard": False}
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert train_editor_lora.main(["--config", str(out / "config.json")]) == 0
    lora = out / "loras" / "flenwheel" / CHARACTER / "qwen_lora_v1.safetensors"
    face = idn.load_insightface_model(models / "insightface", world.FACE_PACK, det_size=160, providers=CPU)
    banks = world._banks(face, models / "insightface")
    handle = qwen_edit.load_qwen_edit(models / "diffusers" / world.QWEN_DIRNAME, world.QWEN_DIRNAME, "fp32",
                                      torch.device("cpu"))
    handle.pipe.set_progress_bar_config(disable=True)
    jobs = [qwen_edit.EditJob([v.draw(ME)], qwen_edit.EditRequest(line.instruction(world.EDIT_LANGUAGE), steps=8,
                                                                  seed=k, width=world.SIZE, height=world.SIZE))
            for k, (v, line, _) in enumerate(held_out)]
    targets = np.stack([np.asarray(t.draw(ME), np.float32) for _, _, t in held_out])
    result = {}
    for name, stack in (("base", LoraStack()),
                        ("v1", LoraStack().extended(LoraEntry(f"flenwheel/{CHARACTER}/{lora.name}", str(lora), 1.0)))):
        edited, metas = qwen_edit.edit_many(handle, jobs, stack, LocalHost())
        rgb = (edited.numpy() * 255).round().astype(np.uint8)
        scores = world._identity_scores(face, banks, [Image.fromarray(a) for a in rgb], [ME] * len(rgb), 0.4)
        result[name] = {**scores, "px_from_target": round(float(np.abs(rgb - targets).mean()), 2),
                        "loras": metas[0]["loras"]}
    print(json.dumps(result))
    return result


def test_qwen_lora_v1_raises_the_identity_of_held_out_edits(editor_loop):
    base, v1 = editor_loop["base"], editor_loop["v1"]
    assert v1["loras"] and not base["loras"], editor_loop
    assert base["faces"] == v1["faces"] == base["n"], editor_loop
    # measured (2-core CPU): base same 0.236 (6 of 16 passed), v1 0.289 (7 of 16); 24.9 -> 24.4 px from the targets.
    # On 32 other held-out sources (seed 8123): 0.250 -> 0.283, 11 -> 13 passed. A real but small gain: the world's
    # VAE bounds what any edit keeps.
    assert v1["same_mean"] - base["same_mean"] >= 0.025, editor_loop
    assert v1["passed"] >= base["passed"] and v1["px_from_target"] < base["px_from_target"], editor_loop
    assert v1["other_mean"] < 0.05, editor_loop
