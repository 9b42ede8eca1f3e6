"""The tiny world's FLUX model: a character LoRA trained on drawings of one identity, through the trainer's own
entry, raises the 18-cell model card's identity similarity over the base model, and the identity filter passes
some cells and rejects others. v2 (v1's data plus v1's renders that passed the filter) is measured against v1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engines import dataset as ds
from engines import flux_pipeline
from engines import identity as idn
from engines import model_card as mc
from engines.image_arrays import batch_to_uint8
from engines.lora_stack import LoraEntry, LoraStack
from engines.model_host import LocalHost
from tools import tiny_world as world
from training import train_char_lora

CPU = ["CPUExecutionProvider"]
TOKEN = "ohwx_char"
SETTINGS = mc.CardSettings(width=world.SIZE, height=world.SIZE, steps=8, guidance=1.0, instance_token=TOKEN,
                           cell_px=64)
CHARACTER = "worldchar"


def drawings(n: int, seed: int):
    vs = world.variations(n, seed)
    return [v.draw(world.CHARACTER_IDENTITY) for v in vs], [{"angle": v.angle, "expression": v.expression} for v in vs]


def train(models: Path, dataset: Path, out: Path, **over) -> Path:
    """One run through ``python -m training.train_char_lora --config`` (what FLEN Train Character LoRA runs), here
    in this process."""
    config = {"model": str(models / "diffusers" / world.FLUX_DIRNAME), "dataset": str(dataset),
              "output_dir": str(out / "loras"), "precision": "fp32", "rank": 8, "resolution": world.SIZE,
              "bucket_multiple": 16, "learning_rate": 2e-3, "steps": 100, "batch_size": 4, "checkpoint_every": 0,
              "sample_every": 0, "seed": 1, "tensorboard": False, "guidance": 1.0, **over}
    path = out / f"config-{len(list(out.glob('config-*.json')))}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    assert train_char_lora.main(["--config", str(path)]) == 0
    return max((out / "loras" / "flenwheel" / CHARACTER).glob("char_lora_v*.safetensors"),
               key=lambda p: p.stat().st_mtime_ns)


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    models = world.world_models()
    out = tmp_path_factory.mktemp("world_card")
    handle = flux_pipeline.load_flux(models / "diffusers" / world.FLUX_DIRNAME, world.FLUX_DIRNAME, "fp32",
                                     torch.device("cpu"))
    handle.pipe.set_progress_bar_config(disable=True)
    face = idn.load_insightface_model(models / "insightface", world.FACE_PACK, det_size=160, providers=CPU)
    images, metas = drawings(12, 2101)
    v1_set = ds.write_dataset(out / "output", CHARACTER, images, metas, token=f"{TOKEN} person", phase="head",
                              class_prompt="a photo of a person").dataset.path
    bank = idn.build_bank(face, [np.asarray(im) for im in images], models / "insightface")
    cells = mc.parse_prompt_set(mc.DEFAULT_PROMPT_SET)

    def card(lora: Path | None):
        stack = LoraStack()
        if lora is not None:
            stack = stack.extended(LoraEntry(f"flenwheel/{CHARACTER}/{lora.name}", str(lora), 1.0))
        rendered, _ = mc.render_cells(handle, cells, SETTINGS, stack, LocalHost())
        rgb = batch_to_uint8(rendered)
        rows = mc.score_cells(bank, face, rgb, SETTINGS.threshold)
        record = mc.lora_record(stack) if lora is not None else {"name": "base", "stack": []}
        return mc.assemble_card(cells, rgb, rows, SETTINGS, record, {"model": handle.name}, bank)

    v1 = train(models, v1_set, out)
    cards = {"base": card(None), "v1": card(v1)}
    # v2: v1's data plus what v1 renders of the character (other seeds than the card's) that the filter passes
    stack = LoraStack().extended(LoraEntry(f"flenwheel/{CHARACTER}/{v1.name}", str(v1), 1.0))
    jobs = [flux_pipeline.FluxJob(f"a photo of {TOKEN}, {mc.EXPRESSION_TEXT[e]}, {mc.ANGLE_TEXT[a]}", 7000 + k,
                                  {"expression": e, "angle": a})
            for k, (e, a) in enumerate((e, a) for e in mc.EXPRESSIONS for a in mc.ANGLES)]
    request = flux_pipeline.FluxRequest(prompts=("-",), width=world.SIZE, height=world.SIZE, steps=SETTINGS.steps,
                                        guidance=SETTINGS.guidance)
    synth, synth_meta = flux_pipeline.generate_many(handle, jobs, request, stack, LocalHost())
    synth_rgb = batch_to_uint8(synth)
    rows = idn.score_images(bank, face, list(synth_rgb))
    passed = [k for k, r in enumerate(rows) if r.passed]
    v2_set = ds.write_dataset(out / "output", CHARACTER, images + [synth_rgb[k] for k in passed],
                              metas + [{**jobs[k].extra, "kind": "synthetic"} for k in passed],
                              token=f"{TOKEN} person", phase="head", class_prompt="a photo of a person").dataset.path
    v2 = train(models, v2_set, out)
    cards["v2"] = card(v2)
    summary = {name: c.report["aggregates"] for name, c in cards.items()}
    summary["synthetic_passed"] = {"passed": len(passed), "of": len(jobs)}
    summary["per_row"] = {name: {r: a["mean_similarity"] for r, a in c.report["per_row"].items()}
                          for name, c in cards.items()}
    print(json.dumps(summary, indent=1))
    return {"cards": cards, "summary": summary}


def test_lora_raises_the_cards_identity_over_the_base(world_run):
    base, v1 = (world_run["cards"][k].report["aggregates"] for k in ("base", "v1"))
    assert base["faces_found"] >= 15 and v1["faces_found"] >= 15, world_run["summary"]
    # measured (world key v1-4a5b7848e17b5c1f, 2-core CPU): base 0.049 (1 of 18 cells passed), v1 0.122 (2 of 18),
    # v2 0.115 (2 of 18; 4 of 12 synthetic renders of v1 passed the filter). The margin is small: the world's VAE
    # (150 steps) still loses hair colour, so every face looks alike in the pooled crop.
    assert v1["mean_similarity"] - base["mean_similarity"] >= 0.04, world_run["summary"]


def test_filter_passes_some_cells_and_rejects_others(world_run):
    v1 = world_run["cards"]["v1"].report
    reasons = {c["reason"] for c in v1["cells"] if not c["passed"]}
    assert 0 < v1["aggregates"]["passed"] < v1["aggregates"]["cells"], world_run["summary"]
    assert reasons <= {idn.REASON_BELOW, idn.REASON_NO_FACE}, reasons
    base = world_run["cards"]["base"].report["aggregates"]
    assert base["passed"] < v1["aggregates"]["passed"], world_run["summary"]


def test_v2_is_measured_against_v1(world_run):
    v2 = world_run["cards"]["v2"].report["aggregates"]
    assert v2["mean_similarity"] is not None and world_run["summary"]["synthetic_passed"]["passed"] > 0
