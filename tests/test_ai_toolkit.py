"""training.ai_toolkit: job configs with the keys and layout of ai-toolkit's own examples, and the launch
back-end against a fake ai-toolkit checkout (progress, naming without overwriting, error tail, interrupt)."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_ai_toolkit import alive, configure, make_checkout
from PIL import Image

from engines import dataset as ds
from engines import edit_pairs
from engines.errors import FlenUserError
from training import ai_toolkit as at

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "ai-toolkit"  # developers' machines only

NUMBER = (int, float)
# The structure of ai-toolkit's example job configs, written out here because the examples are not on a
# user's machine: config/examples/train_lora_flux_24gb.yaml and train_lora_qwen_image_edit_2509_32gb.yaml
# (ostris/ai-toolkit 27a03a9). Key paths, "*" for every item of a list; the value is the type each must have.
FLUX_EXPECTED: dict[str, type | tuple] = {
    "job": str, "config": dict, "config.name": str, "config.process": list, "config.process.*": dict,
    "config.process.*.type": str, "config.process.*.training_folder": str, "config.process.*.device": str,
    "config.process.*.network": dict, "config.process.*.network.type": str,
    "config.process.*.network.linear": int, "config.process.*.network.linear_alpha": int,
    "config.process.*.save": dict, "config.process.*.save.dtype": str, "config.process.*.save.save_every": int,
    "config.process.*.save.max_step_saves_to_keep": int, "config.process.*.save.push_to_hub": bool,
    "config.process.*.datasets": list, "config.process.*.datasets.*": dict,
    "config.process.*.datasets.*.folder_path": str, "config.process.*.datasets.*.caption_ext": str,
    "config.process.*.datasets.*.caption_dropout_rate": float, "config.process.*.datasets.*.shuffle_tokens": bool,
    "config.process.*.datasets.*.cache_latents_to_disk": bool, "config.process.*.datasets.*.resolution": list,
    "config.process.*.train": dict, "config.process.*.train.batch_size": int, "config.process.*.train.steps": int,
    "config.process.*.train.gradient_accumulation_steps": int, "config.process.*.train.train_unet": bool,
    "config.process.*.train.train_text_encoder": bool, "config.process.*.train.gradient_checkpointing": bool,
    "config.process.*.train.noise_scheduler": str, "config.process.*.train.optimizer": str,
    "config.process.*.train.lr": float, "config.process.*.train.ema_config": dict,
    "config.process.*.train.ema_config.use_ema": bool, "config.process.*.train.ema_config.ema_decay": float,
    "config.process.*.train.dtype": str,
    "config.process.*.model": dict, "config.process.*.model.name_or_path": str,
    "config.process.*.model.is_flux": bool, "config.process.*.model.quantize": bool,
    "config.process.*.sample": dict, "config.process.*.sample.sampler": str,
    "config.process.*.sample.sample_every": int, "config.process.*.sample.sample_start_step": int,
    "config.process.*.sample.width": int, "config.process.*.sample.height": int,
    "config.process.*.sample.prompts": list, "config.process.*.sample.neg": str, "config.process.*.sample.seed": int,
    "config.process.*.sample.walk_seed": bool, "config.process.*.sample.guidance_scale": NUMBER,
    "config.process.*.sample.sample_steps": int,
    "meta": dict, "meta.name": str, "meta.version": str,
}
QWEN_EDIT_EXPECTED: dict[str, type | tuple] = {
    "job": str, "config": dict, "config.name": str, "config.process": list, "config.process.*": dict,
    "config.process.*.type": str, "config.process.*.training_folder": str, "config.process.*.device": str,
    "config.process.*.network": dict, "config.process.*.network.type": str,
    "config.process.*.network.linear": int, "config.process.*.network.linear_alpha": int,
    "config.process.*.save": dict, "config.process.*.save.dtype": str, "config.process.*.save.save_every": int,
    "config.process.*.save.max_step_saves_to_keep": int,
    "config.process.*.datasets": list, "config.process.*.datasets.*": dict,
    "config.process.*.datasets.*.folder_path": str, "config.process.*.datasets.*.control_path": list,
    "config.process.*.datasets.*.caption_ext": str, "config.process.*.datasets.*.caption_dropout_rate": float,
    "config.process.*.datasets.*.resolution": list,
    "config.process.*.train": dict, "config.process.*.train.batch_size": int,
    "config.process.*.train.cache_text_embeddings": bool, "config.process.*.train.steps": int,
    "config.process.*.train.gradient_accumulation": int, "config.process.*.train.timestep_type": str,
    "config.process.*.train.train_unet": bool, "config.process.*.train.train_text_encoder": bool,
    "config.process.*.train.gradient_checkpointing": bool, "config.process.*.train.noise_scheduler": str,
    "config.process.*.train.optimizer": str, "config.process.*.train.lr": float, "config.process.*.train.dtype": str,
    "config.process.*.model": dict, "config.process.*.model.name_or_path": str, "config.process.*.model.arch": str,
    "config.process.*.model.quantize": bool, "config.process.*.model.qtype": str,
    "config.process.*.model.quantize_te": bool, "config.process.*.model.qtype_te": str,
    "config.process.*.model.low_vram": bool,
    "config.process.*.sample": dict, "config.process.*.sample.sampler": str,
    "config.process.*.sample.sample_every": int, "config.process.*.sample.sample_start_step": int,
    "config.process.*.sample.width": int, "config.process.*.sample.height": int,
    "config.process.*.sample.samples": list, "config.process.*.sample.samples.*": dict,
    "config.process.*.sample.samples.*.prompt": str, "config.process.*.sample.samples.*.ctrl_img_1": str,
    "config.process.*.sample.samples.*.ctrl_img_2": str,
    "config.process.*.sample.neg": str, "config.process.*.sample.seed": int,
    "config.process.*.sample.walk_seed": bool, "config.process.*.sample.guidance_scale": NUMBER,
    "config.process.*.sample.sample_steps": int,
    "meta": dict, "meta.name": str, "meta.version": str,
}
# Keys the examples show commented out (documented options) — allowed, never required.
OPTIONAL = {"config.process.*.performance_log_every", "config.process.*.trigger_word",
            "config.process.*.save.hf_repo_id", "config.process.*.save.hf_private",
            "config.process.*.train.skip_first_sample", "config.process.*.train.disable_sampling",
            "config.process.*.train.linear_timesteps", "config.process.*.train.unload_text_encoder",
            "config.process.*.model.low_vram", "config.process.*.datasets.*.default_caption",
            "config.process.*.datasets.*.trigger_word", "config.process.*.sample.samples.*.ctrl_img_2",
            "config.process.*.sample.samples.*.ctrl_img_3"}
FIXED_VALUES = {"job": "extension", "config.process.*.network.type": "lora", "meta.name": "[name]",
                "config.process.*.train.noise_scheduler": "flowmatch", "config.process.*.sample.sampler": "flowmatch",
                "config.process.*.datasets.*.caption_ext": "txt"}


def flatten(value, prefix: str = "") -> dict[str, list]:
    """key path -> the values found there (lists of dicts expand with '*')."""
    out: dict[str, list] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            out.setdefault(path, []).append(v)
            for p, vs in flatten(v, path).items():
                out.setdefault(p, []).extend(vs)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for v in value:
            out.setdefault(f"{prefix}.*", []).append(v)
            for p, vs in flatten(v, f"{prefix}.*").items():
                out.setdefault(p, []).extend(vs)
    return out


def assert_structure(config: dict, expected: dict, optional: set[str] = OPTIONAL) -> None:
    found = flatten(config)
    for path, typ in expected.items():
        if path in optional:
            continue
        assert path in found, f"missing key {path}"
        for v in found[path]:
            assert isinstance(v, typ) and not (typ in (int, NUMBER) and isinstance(v, bool)), \
                f"{path} = {v!r} is not {typ}"
    for path, v in FIXED_VALUES.items():
        assert all(x == v for x in found.get(path, [])), f"{path} must be {v!r}"
    extra = [p for p in found if p not in expected and p not in optional and not p.startswith("meta.")]
    assert not extra, f"keys ai-toolkit's examples do not have: {extra}"


# ---- fixtures ---------------------------------------------------------------------------------

def _img(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB")


@pytest.fixture
def env(tmp_path):
    """An output folder with a character dataset (head + body) and an edit-pair set (2 controls), a models
    folder with two diffusers folders, and a fake ai-toolkit checkout."""
    out, models = tmp_path / "output", tmp_path / "models"
    character = "anna"
    ds.write_dataset(out, character, [_img(1), _img(2)], [{"angle": "front"}, {"angle": "left"}],
                     token="ohwx_anna woman", phase="head", near_duplicates="keep")
    ds.write_dataset(out, character, [_img(3)], [{"pose": "standing"}], token="ohwx_anna woman", version="v1",
                     phase="body", kind="synthetic", near_duplicates="keep")
    pairs = [edit_pairs.EditPair(_img(10 + k), [_img(20 + k), _img(30 + k)], f"turn the head {d}")
             for k, d in enumerate(("left", "right"))]
    edit_pairs.write_edit_pairs(out, character, pairs)
    for name in ("FLUX.1-dev", "Qwen-Image-Edit-2509"):
        (models / "diffusers" / name).mkdir(parents=True)
        (models / "diffusers" / name / "model_index.json").write_text("{}")
    workspace = out / "flenwheel" / character
    return {"out": out, "models": models, "character": character, "workspace": workspace,
            "dataset": workspace / "datasets" / "v1", "pairs": workspace / "edit_pairs" / "v1",
            "loras": models / "loras", "checkout": make_checkout(tmp_path / "ai-toolkit")}


def settings(env, kind: str = "flux", **kw) -> at.AIToolkitSettings:
    base = env["models"] / "diffusers" / ("FLUX.1-dev" if kind == "flux" else "Qwen-Image-Edit-2509")
    return at.AIToolkitSettings(kind=kind, base_model=str(base), character=env["character"],
                                **{"steps": 5, "rank": 8, "learning_rate": 2e-4, "sample_every": 0,
                                   "save_every": 2, "resolutions": [512, 1024], **kw})


# ---- configs ----------------------------------------------------------------------------------

def test_flux_config_has_the_example_structure_and_points_at_the_dataset(env):
    config, path, name, meta = at.prepare_job(str(env["dataset"]), settings(env, sample_every=100), env["workspace"],
                                              env["loras"])
    assert name == "char_lora_v1" and path.name == "char_lora_v1.yaml"
    text = path.read_text()
    assert text.startswith("---\n")
    written = yaml.safe_load(text)
    assert written == config
    assert_structure(written, FLUX_EXPECTED)
    proc = written["config"]["process"][0]
    assert proc["type"] == "sd_trainer" and written["config"]["name"] == "char_lora_v1"
    assert proc["network"] == {"type": "lora", "linear": 8, "linear_alpha": 8}
    assert sorted(d["folder_path"] for d in proc["datasets"]) == [str(env["dataset"] / "body" / "synthetic"),
                                                                  str(env["dataset"] / "head" / "pristine")]
    for d in proc["datasets"]:
        assert Path(d["folder_path"]).is_dir() and d["resolution"] == [512, 1024]
        assert any(p.suffix == ".png" and p.with_suffix(".txt").is_file() for p in Path(d["folder_path"]).iterdir())
    assert proc["model"]["name_or_path"] == str(env["models"] / "diffusers" / "FLUX.1-dev")
    assert proc["model"]["is_flux"] is True
    assert proc["train"]["steps"] == 5 and proc["train"]["lr"] == pytest.approx(2e-4)
    assert proc["save"]["save_every"] == 2 and proc["sample"]["sample_every"] == 100
    assert all("ohwx_anna woman" in p for p in proc["sample"]["prompts"])
    assert Path(proc["training_folder"]) == path.parent and path.parent.parent == env["workspace"] / "ai_toolkit_runs"
    assert written["meta"]["flenwheel.dataset_version"] == "v1"
    info = ds.read_info(env["dataset"])
    assert info["status"] == "frozen" and written["meta"]["flenwheel.dataset_hash"] == info["hash"]
    prov = json.loads(meta["flenwheel.provenance"])
    assert prov["dataset_hash"] == info["hash"] and prov["hyperparameters"]["rank"] == 8


def test_qwen_edit_config_has_the_example_structure_with_control_folders(env):
    config, path, name, _meta = at.prepare_job({"path": str(env["pairs"])}, settings(env, "qwen_image_edit_2509"),
                                               env["workspace"], env["loras"])
    assert name == "qwen_lora_v1"
    written = yaml.safe_load(path.read_text())
    assert_structure(written, QWEN_EDIT_EXPECTED)
    proc = written["config"]["process"][0]
    assert proc["type"] == "diffusion_trainer" and proc["model"]["arch"] == "qwen_image_edit_plus"
    (entry,) = proc["datasets"]
    assert entry["folder_path"] == str(env["pairs"] / "targets")
    assert entry["control_path"] == [str(env["pairs"] / "control_1"), str(env["pairs"] / "control_2")]
    targets = sorted(p.name for p in (env["pairs"] / "targets").glob("*.png"))
    for folder in entry["control_path"]:
        assert sorted(p.name for p in Path(folder).glob("*.png")) == targets  # same names as the targets
    assert proc["model"]["name_or_path"] == str(env["models"] / "diffusers" / "Qwen-Image-Edit-2509")
    assert len(proc["sample"]["samples"]) == 2
    for s in proc["sample"]["samples"]:
        assert s["prompt"].startswith("turn the head") and Path(s["ctrl_img_1"]).is_file()
        assert Path(s["ctrl_img_2"]).is_file()
    assert proc["train"]["disable_sampling"] is True  # sample_every 0


def _split(tiny_models, key: str, arch: str = "qwen") -> str:
    """A file of the tiny kit's ComfyUI split files."""
    from tools import tiny_split_files as ts

    name = (ts.QWEN_FILES if arch == "qwen" else ts.FLUX_FILES)[key]
    return str(tiny_models / ts.folder_of(key) / ts.SPLIT_DIRNAME / name)


@pytest.mark.parametrize("key", ["diffusion_model", "diffusion_model_fp8"])
def test_qwen_edit_config_takes_comfyuis_diffusion_model_file_with_the_rest_from_the_folder(env, tiny_models, key):
    """ai-toolkit's Qwen loader: name_or_path ending in .safetensors is the transformer (from_single_file), the
    tokenizer, text encoder, processor and VAE come from extras_name_or_path (a diffusers folder)."""
    file = _split(tiny_models, key)
    _config, path, _name, meta = at.prepare_job(
        {"path": str(env["pairs"])}, settings(env, "qwen_image_edit_2509", transformer_file=file), env["workspace"],
        env["loras"])
    written = yaml.safe_load(path.read_text())
    assert_structure(written, QWEN_EDIT_EXPECTED, OPTIONAL | {"config.process.*.model.extras_name_or_path"})
    model = written["config"]["process"][0]["model"]
    assert model["name_or_path"] == file and model["arch"] == "qwen_image_edit_plus"
    assert model["extras_name_or_path"] == str(env["models"] / "diffusers" / "Qwen-Image-Edit-2509")
    prov = json.loads(meta["flenwheel.provenance"])
    assert prov["base_model"] == file and prov["extras_folder"] == model["extras_name_or_path"]
    assert meta["flenwheel.base_model"] == file


def test_what_ai_toolkit_cannot_take_from_split_files_is_a_clear_error(env, tiny_models):
    pairs = {"path": str(env["pairs"])}
    with pytest.raises(FlenUserError, match="FLUX.1 trainer reads the transformer, both text encoders and the "
                                            "scheduler from a diffusers folder"):
        at.prepare_job(str(env["dataset"]), settings(env, transformer_file=_split(tiny_models, "diffusion_model",
                                                                                  "flux")),
                       env["workspace"], env["loras"])
    scaled = _split(tiny_models, "diffusion_model_fp8_scaled")
    with pytest.raises(FlenUserError, match="'qwen_image_edit_2509_tiny_fp8_scaled.safetensors' is an fp8_scaled "
                                            "file .* Use qwen_image_edit_2509_bf16"):
        at.prepare_job(pairs, settings(env, "qwen_image_edit_2509", transformer_file=scaled), env["workspace"],
                       env["loras"])
    flux_file = _split(tiny_models, "diffusion_model", "flux")
    with pytest.raises(FlenUserError, match="'flux1-dev-tiny.safetensors' in the diffusion_models slot looks like "
                                            "a FLUX.1 diffusion model"):
        at.prepare_job(pairs, settings(env, "qwen_image_edit_2509", transformer_file=flux_file), env["workspace"],
                       env["loras"])
    assert not (env["workspace"] / "ai_toolkit_runs").exists()  # nothing was written for a refused job


def test_wrong_set_for_the_job_kind_is_a_clear_error(env):
    with pytest.raises(FlenUserError, match="edit-pair set"):
        at.prepare_job(str(env["dataset"]), settings(env, "qwen_image_edit_2509"), env["workspace"], env["loras"])
    with pytest.raises(FlenUserError, match="is an edit-pair set"):
        at.prepare_job(str(env["pairs"]), settings(env), env["workspace"], env["loras"])
    with pytest.raises(FlenUserError, match="multiple of 64"):
        at.parse_resolutions("512, 700")


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="ai-toolkit reference configs are only on developers' machines")
@pytest.mark.parametrize(("filename", "expected"), [("train_lora_flux_24gb.yaml", FLUX_EXPECTED),
                                                    ("train_lora_qwen_image_edit_2509_32gb.yaml", QWEN_EDIT_EXPECTED)])
def test_the_stated_structure_is_that_of_the_reference_examples(filename, expected):
    reference = yaml.safe_load((REFERENCE / filename).read_text())
    found = flatten(reference)
    assert set(found) == set(expected)
    for path, values in found.items():
        for v in values:
            if path.endswith(".lr"):
                v = float(v)  # YAML 1.1 reads the example's 1e-4 as a string
            assert isinstance(v, expected[path]), (path, v)


# ---- progress ---------------------------------------------------------------------------------

def test_parse_progress_reads_tqdm_lines():
    p = at.parse_progress("char_lora_v1:  40%|####      | 400/1000 [05:00<07:30,  1.33it/s, lr: 1.0e-04 "
                          "loss: 3.456e-01]")
    assert (p.step, p.total, p.desc) == (400, 1000, "char_lora_v1") and p.loss == pytest.approx(0.3456)
    p = at.parse_progress("qwen_lora_v2:   0%|          | 0/3000 [00:00<?, ?it/s]")
    assert (p.step, p.total, p.loss) == (0, 3000, None)
    p = at.parse_progress("Caching latents to disk: 100%|##########| 20/20 [00:03<00:00,  6.1it/s]")
    assert p.desc == "Caching latents to disk" and p.loss is None
    assert at.parse_progress("Loading transformer") is None
    assert at.parse_progress("version 1/2") is None
    assert at.parse_progress("x: 5%| | 12/10 [") is None


# ---- running ----------------------------------------------------------------------------------

def _launch(env, **kw):
    events = []
    r = at.launch(str(env["dataset"]), settings(env), checkout=env["checkout"], workspace=env["workspace"],
                  loras_root=env["loras"], on_progress=events.append, **kw)
    return r, events


def test_launch_reports_progress_and_installs_the_lora_under_its_flenwheel_name(env):
    r, events = _launch(env)
    assert [e.step for e in events] == [1, 2, 3, 4, 5] and {e.total for e in events} == {5}
    assert [e.loss for e in events] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2], rel=1e-3)
    assert r.steps_done == 5 and r.final_loss == pytest.approx(0.2, rel=1e-3)
    assert r.lora_name == "flenwheel/anna/char_lora_v1.safetensors"
    dest = env["loras"] / r.lora_name
    assert Path(r.lora_path) == dest and dest.is_file() and r.metadata_added
    # the child ran run.py from the checkout with the config as its argument, with this python (no venv there)
    argv = json.loads((env["checkout"] / "last_argv.json").read_text())
    assert argv["argv"] == [str(env["checkout"] / "run.py"), r.config_path]
    assert Path(argv["cwd"]) == env["checkout"].resolve()
    # metadata: ai-toolkit's own plus FLENwheel's provenance; tensor data intact
    header, offset = at.read_header(dest)
    meta = header["__metadata__"]
    assert meta["name"] == "char_lora_v1" and json.loads(meta["software"]) == {"name": "ai-toolkit"}
    prov = json.loads(meta["flenwheel.provenance"])
    assert prov["dataset_version"] == "v1" and prov["dataset_hash"] == ds.read_info(env["dataset"])["hash"]
    assert prov["hyperparameters"]["learning_rate"] == pytest.approx(2e-4) and meta["flenwheel.steps_done"] == "5"
    assert offset % 8 == 0
    assert struct.unpack("<4f", dest.read_bytes()[offset:offset + 16]) == (1.0, 2.0, 3.0, 4.0)
    from safetensors import safe_open

    with safe_open(str(dest), "np") as f:
        assert f.metadata()["flenwheel.trainer"] == "ai-toolkit"
        assert f.get_tensor("lora_unet_x.lora_down.weight").tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert (Path(r.run_dir) / "ai_toolkit.log").read_bytes().count(b"loss:") == 5
    assert not list(dest.parent.glob(".tmp-*"))

    # never overwriting: the next run is v2; a v3 put there meanwhile makes the one after v4
    v1 = dest.read_bytes()
    r2, _ = _launch(env)
    assert r2.lora_name == "flenwheel/anna/char_lora_v2.safetensors" and dest.read_bytes() == v1
    (dest.parent / "char_lora_v3.safetensors").write_bytes(b"someone else's")
    r3, _ = _launch(env)
    assert r3.lora_name.endswith("char_lora_v4.safetensors")
    assert (dest.parent / "char_lora_v3.safetensors").read_bytes() == b"someone else's"
    assert len({r.run_dir, r2.run_dir, r3.run_dir}) == 3


def test_install_never_overwrites_a_name_taken_after_it_was_chosen(env, tmp_path):
    src = tmp_path / "x.safetensors"
    src.write_bytes(b"not a safetensors file")  # copied byte for byte, metadata not added
    folder = at.lora_folder(env["loras"], "anna")
    folder.mkdir(parents=True)
    rel, dest, meta_ok = at.install_lora(src, env["loras"], "anna", "qwen_lora", {"k": "v"})
    assert rel == "flenwheel/anna/qwen_lora_v1.safetensors" and not meta_ok and dest.read_bytes() == src.read_bytes()
    assert at.next_lora_name(env["loras"], "anna", "qwen_lora") == "qwen_lora_v2"
    assert at.next_lora_name(env["loras"], "anna", "char_lora") == "char_lora_v1"


def test_failed_run_surfaces_the_error_tail(env):
    make_checkout(env["checkout"], fail=True)
    with pytest.raises(at.AIToolkitError) as info:
        _launch(env)
    msg = str(info.value)
    assert "exit code 1" in msg and "CUDA out of memory" in msg and "Error running job" in msg
    folder = env["loras"] / "flenwheel" / "anna"
    assert not folder.exists() or not list(folder.iterdir())


def test_latest_intermediate_save_is_taken_without_a_final_file_and_none_is_an_error(env):
    make_checkout(env["checkout"], no_final=True)
    r, _ = _launch(env)
    assert Path(r.produced).name == "char_lora_v1_000000001.safetensors"
    with pytest.raises(at.AIToolkitError, match="wrote no .safetensors"):
        at.launch(str(env["dataset"]), settings(env, steps=1), checkout=env["checkout"], workspace=env["workspace"],
                  loras_root=env["loras"])


def test_interrupt_ends_the_child_and_its_workers(env, tmp_path, monkeypatch):
    monkeypatch.setattr(at, "STOP_GRACE_S", 1.0)
    pid_file = tmp_path / "pids.json"
    make_checkout(env["checkout"], step_sleep=0.3, ignore_term=True, spawn_worker=True, pid_file=str(pid_file))

    class Interrupted(Exception):
        pass

    seen = []

    def check():
        if len(seen) >= 2:
            raise Interrupted

    s = settings(env, steps=1000)
    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        at.launch(str(env["dataset"]), s, checkout=env["checkout"], workspace=env["workspace"],
                  loras_root=env["loras"], on_progress=seen.append, check_interrupt=check)
    pids = json.loads(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (alive(pids["child"]) or alive(pids["worker"])):
        time.sleep(0.05)
    assert not alive(pids["child"]) and not alive(pids["worker"]), "a process of the run was left behind"
    assert time.monotonic() - t0 < 10
    assert not (env["loras"] / "flenwheel" / "anna").exists()


def test_checkout_is_validated(tmp_path):
    with pytest.raises(FlenUserError, match="does not exist"):
        at.validate_checkout(tmp_path / "nope")
    (tmp_path / "run.py").write_text("print('not ai-toolkit')")
    with pytest.raises(FlenUserError, match="is not an ai-toolkit checkout"):
        at.validate_checkout(tmp_path)  # a run.py alone is not a checkout
    with pytest.raises(FlenUserError, match="No ai-toolkit checkout"):
        at.validate_checkout("  ")
    (tmp_path / "run.py").unlink()
    assert at.venv_python(tmp_path) == sys.executable
    py = tmp_path / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("")
    os.chmod(py, 0o755)
    assert at.venv_python(tmp_path) == str(py)


def test_command_line_writes_a_config(env, capsys):
    rc = at.main(["--dataset", str(env["pairs"]), "--kind", "qwen_image_edit_2509", "--checkout", str(env["checkout"]),
                  "--base-model", str(env["models"] / "diffusers" / "Qwen-Image-Edit-2509"), "--character", "anna",
                  "--workspace", str(env["workspace"]), "--loras", str(env["loras"]), "--config-only"])
    assert rc == 0
    path = Path(capsys.readouterr().out.strip())
    assert_structure(yaml.safe_load(path.read_text()), QWEN_EDIT_EXPECTED)


def test_checkouts_come_from_the_server_configuration(tmp_path):
    """$FLENWHEEL_AI_TOOLKIT and user/flenwheel.json name checkouts (or folders of them); nothing else does."""
    a = make_checkout(tmp_path / "tools" / "ai-toolkit")
    b = make_checkout(tmp_path / "tools" / "ai-toolkit-dev")
    (tmp_path / "tools" / "not-a-checkout").mkdir()
    other = make_checkout(tmp_path / "elsewhere" / "ai-toolkit")
    user = tmp_path / "user"
    configure(tmp_path, other)
    sources = at.configured_sources(user, environ={at.CHECKOUT_ENV: str(tmp_path / "tools")})
    found = at.find_checkouts(sources)
    assert found == {"ai-toolkit": a.resolve(), "ai-toolkit-dev": b.resolve(), "elsewhere/ai-toolkit": other.resolve()}
    assert at.find_checkouts(at.configured_sources(None, environ={})) == {}
    (user / "flenwheel.json").write_text("{not json")
    assert at.configured_sources(user, environ={}) == []


def test_checkout_in_a_client_writable_folder_is_refused(tmp_path):
    from engines.safe_paths import Root

    inputs = tmp_path / "input"
    checkout = make_checkout(inputs / "sub" / "ai-toolkit")
    with pytest.raises(FlenUserError, match="input folder") as exc:
        at.validate_checkout(checkout, [Root(inputs, "input")])
    assert str(tmp_path) not in str(exc.value)
    # a symlink from a safe place into input/ is followed
    link = tmp_path / "safe-looking"
    link.symlink_to(checkout)
    with pytest.raises(FlenUserError, match="input folder"):
        at.validate_checkout(link, [Root(inputs, "input")])
    # run.py linked in from input/ is refused too
    safe = make_checkout(tmp_path / "opt" / "ai-toolkit")
    (safe / "run.py").unlink()
    (safe / "run.py").symlink_to(checkout / "run.py")
    with pytest.raises(FlenUserError, match="run.py lies in"):
        at.validate_checkout(safe, [Root(inputs, "input")])
