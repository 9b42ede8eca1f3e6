"""FLUX character LoRA trainer on the tiny FLUX: over-fit, resume, diffusers + native ComfyUI loading,
provenance, phased training with prior preservation, config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from train_helpers import REPO, char_dataset, native_probe, read_lora, train

from engines import dataset as ds
from tools.tiny_models import draw_test_face
from training.lora_training import ConfigError, compute_dtype, config_from_dict, load_config_file, sha256_file
from training.train_char_lora import CharLoraConfig, CharLoraTask, main

STEPS = 24


def settings(tiny_models, dataset, loras, **over):
    base = dict(model=str(tiny_models / "diffusers" / "flen-tiny-flux"), dataset=str(dataset), output_dir=str(loras),
                precision="fp32", rank=4, resolution=32, bucket_multiple=16, max_sequence_length=16,
                learning_rate=1e-2, steps=STEPS, checkpoint_every=0, sample_every=12, sample_steps=2,
                sample_prompts=["a photo of {token}"], seed=3)
    base.update(over)
    return base


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("char_lora")
    dataset = char_dataset(root / "output", "alice")
    path, task, events = train(CharLoraConfig, CharLoraTask, **settings(tiny_models, dataset, root / "loras"))
    return {"root": root, "dataset": dataset, "path": path, "task": task, "events": events}


def test_loss_falls_on_a_small_overfit_set(trained):
    done = [e for e in trained["events"] if e["flen_event"] == "done"][-1]
    assert done["eval_loss_end"] < 0.85 * done["eval_loss_start"], done
    steps = [e for e in trained["events"] if e["flen_event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    log = (trained["task"].run_dir() / "loss.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, STEPS + 1))
    samples = [e for e in trained["events"] if e["flen_event"] == "sample"]
    assert [e["step"] for e in samples] == [12, 24]
    for e in samples:
        for p in e["paths"]:
            assert p.endswith(".png") and __import__("pathlib").Path(p).is_file()


def test_output_name_keys_and_provenance(trained):
    path = trained["path"]
    assert path == trained["root"] / "loras" / "flenwheel" / "alice" / "char_lora_v1.safetensors"
    tensors, meta = read_lora(path)
    assert tensors and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                           for k in tensors)
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    assert any(m.endswith("attn.to_q") for m in modules) and any(m.endswith("attn.to_out.0") for m in modules)
    assert meta["lora_rank"] == meta["lora_alpha"] == "4"
    prov = json.loads(meta["flenwheel"])
    d = ds.load_dataset(trained["dataset"])
    assert d.frozen  # the trainer froze the version it trained on
    assert prov["base_model"] == "flen-tiny-flux" and prov["architecture"] == "flux"
    assert prov["dataset"]["version"] == "v1" == meta["dataset_version"]
    assert prov["dataset"]["hash"] == d.hash == meta["dataset_hash"]
    assert prov["steps_done"] == STEPS and meta["steps"] == str(STEPS)
    hp = prov["hyperparameters"]
    assert hp["learning_rate"] == 1e-2 and hp["rank"] == 4 and hp["seed"] == 3 and hp["steps"] == STEPS
    assert hp["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    for lib in ("torch", "diffusers", "peft", "transformers", "python"):
        assert prov["software"][lib]
    assert prov["optimizer_used"] == "adamw" and prov["parent_lora"] is None


def _generate(pipe):
    out = pipe(prompt="a photo of ohwx_char person", width=32, height=32, num_inference_steps=2,
               generator=torch.Generator("cpu").manual_seed(0), output_type="np", max_sequence_length=16)
    return np.asarray(out.images)


def test_lora_loads_in_diffusers_and_changes_the_output(trained, tiny_models):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_models / "diffusers" / "flen-tiny-flux")
    base = _generate(pipe)
    pipe.load_lora_weights(str(trained["path"]), adapter_name="char")
    with_lora = _generate(pipe)
    assert np.abs(with_lora - base).max() > 1e-3
    pipe.set_adapters(["char"], [0.0])
    assert np.abs(_generate(pipe) - base).max() < 1e-6


def test_keys_map_onto_native_comfyui_flux_and_patch_like_diffusers_fuses(trained, tiny_models, tmp_path):
    result = native_probe(tmp_path, tiny_models, trained["path"], "flux")
    assert result["unused_keys"] == []  # every key maps through ComfyUI's own LoRA key mapping
    assert result["changed_by_lora"] > 0
    assert result["max_abs_diff"] <= 1e-6 and result["native_keys_missing_in_diffusers"] == []


def test_interrupted_and_resumed_run_ends_with_the_same_lora(tiny_models, tmp_path):
    dataset = char_dataset(tmp_path / "output", "bob")
    common = settings(tiny_models, dataset, tmp_path / "loras", steps=8, checkpoint_every=3, sample_every=0)
    a, _, _ = train(CharLoraConfig, CharLoraTask, run_dir=str(tmp_path / "run_a"), **common)
    stopped, _, events = train(CharLoraConfig, CharLoraTask, run_dir=str(tmp_path / "run_b"), stop_at_step=7,
                               **common)
    assert stopped is None and events[-1] == {"flen_event": "stopped", "step": 7}
    assert sorted(p.name for p in (tmp_path / "run_b" / "checkpoints").iterdir()) == ["step_00000003",
                                                                                       "step_00000006"]
    # resume in a fresh process, through the command line
    config = tmp_path / "resume.json"
    config.write_text(json.dumps({**common, "run_dir": str(tmp_path / "run_b")}))
    proc = subprocess.run([sys.executable, "-m", "training.train_char_lora", "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert {"flen_event": "resume", "step": 6} .items() <= next(e for e in lines
                                                               if e["flen_event"] == "resume").items()
    assert [e["step"] for e in lines if e["flen_event"] == "step"] == [7, 8]
    b = tmp_path / "loras" / "flenwheel" / "bob" / "char_lora_v2.safetensors"  # v1 is run a's: never overwritten
    assert a.name == "char_lora_v1.safetensors" and b.is_file()
    ta, _ = read_lora(a)
    tb, _ = read_lora(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run_b" / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the lost step 7 was logged once, after the resume


def test_phased_training_from_an_earlier_lora_with_prior_preservation(trained, tiny_models, tmp_path):
    classes = tmp_path / "class_images"
    classes.mkdir()
    for i in (7, 8):
        draw_test_face(i, size=32).save(classes / f"person_{i}.png")
    events: list = []
    path, task, _ = train(CharLoraConfig, CharLoraTask, events, **settings(
        tiny_models, trained["dataset"], trained["root"] / "loras", steps=2, sample_every=0,
        init_lora=str(trained["path"]), prior_preservation=True, class_images=str(classes)))
    assert path.name == "char_lora_v2.safetensors" and trained["path"].is_file()
    first = trained["events"][-1]
    start = next(e for e in events if e["flen_event"] == "eval")
    # starts where v1 ended: same items, same fixed noise
    assert abs(start["eval_loss"] - first["eval_loss_end"]) < 1e-5
    prov = json.loads(read_lora(path)[1]["flenwheel"])
    assert prov["parent_lora"]["file"] == "char_lora_v1.safetensors"
    assert prov["parent_lora"]["sha256"] == sha256_file(trained["path"])
    assert prov["prior_preservation"] == {"class_images": 2, "class_prompt": "a photo of a person"}


def test_init_lora_of_another_rank_is_a_clear_error(trained, tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="does not match this run's LoRA .*rank 8"):
        train(CharLoraConfig, CharLoraTask, **settings(tiny_models, trained["dataset"], tmp_path, rank=8, steps=1,
                                                       sample_every=0, init_lora=str(trained["path"])))


def test_config_errors_are_clear(tmp_path, tiny_models, capsys):
    good = settings(tiny_models, tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=r"unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        config_from_dict(CharLoraConfig, {**good, "lerning_rate": 1e-4})
    with pytest.raises(ConfigError, match="'rank' is 0; it must be between 1 and 1024"):
        config_from_dict(CharLoraConfig, {**good, "rank": 0})
    with pytest.raises(ConfigError, match="'precision' is 'fp16'; choose one of bf16, fp32, nf4"):
        config_from_dict(CharLoraConfig, {**good, "precision": "fp16"})
    with pytest.raises(ConfigError, match="'steps' must be a whole number, got 'many'"):
        config_from_dict(CharLoraConfig, {**good, "steps": "many"})
    with pytest.raises(ConfigError, match="'phase' is 'legs'; choose one of all, head, body"):
        config_from_dict(CharLoraConfig, {**good, "phase": "legs"})
    with pytest.raises(ConfigError, match="'model' is required"):
        config_from_dict(CharLoraConfig, {k: v for k, v in good.items() if k != "model"})
    cfg = config_from_dict(CharLoraConfig, {**good, "precision": "nf4"})
    with pytest.raises(ConfigError, match="'nf4' .* needs an NVIDIA GPU with CUDA"):
        compute_dtype(cfg, torch.device("cpu"))
    yaml_file = tmp_path / "char.yaml"
    yaml_file.write_text("model: x\ndataset: y\noutput_dir: z\nrank: 8\nsteps: 10\n")
    assert load_config_file(CharLoraConfig, yaml_file).rank == 8
    yaml_file.write_text("model: x\ndataset: y\noutput_dir: z\nrnak: 8\n")
    with pytest.raises(ConfigError, match=r"config char.yaml: unknown key 'rnak' \(did you mean 'rank'\?\)"):
        load_config_file(CharLoraConfig, yaml_file)
    assert main(["--config", str(yaml_file)]) == 2
    err = capsys.readouterr()
    assert "unknown key 'rnak'" in err.err and '"flen_event": "error"' in err.out
    (tmp_path / "notds").mkdir()
    with pytest.raises(ConfigError, match="is not a dataset version folder"):
        CharLoraTask(config_from_dict(CharLoraConfig, {**good, "dataset": str(tmp_path / "notds")}))


def test_default_options_keep_the_loss_curve_of_before_the_options(trained):
    """The loss per step with default options equals the curve measured before the schedule, sampler, EMA,
    dropout and resolution options existed (tests/data/default_loss_curves.json, commit named there)."""
    reference = json.loads((REPO / "tests" / "data" / "default_loss_curves.json").read_text())
    log = [json.loads(line) for line in (trained["task"].run_dir() / "loss.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in log], reference["char"], rtol=1e-5, atol=0)
    done = trained["events"][-1]
    np.testing.assert_allclose([done["eval_loss_start"], done["eval_loss_end"]], reference["char_eval"], rtol=1e-5)
    assert {r["lr"] for r in log} == {1e-2}  # constant


def test_ema_weights_equal_a_hand_computed_ema_of_two_steps(trained, tiny_models, tmp_path):
    """From a known start (init_lora W0), one step gives W1 and two give W2; the EMA file of the two-step run
    must be d²·W0 + d(1-d)·W1 + (1-d)·W2 and differ from the plain LoRA beside it."""
    common = settings(tiny_models, trained["dataset"], tmp_path / "loras", sample_every=0,
                      init_lora=str(trained["path"]))
    one, _, _ = train(CharLoraConfig, CharLoraTask, run_dir=str(tmp_path / "one"), **{**common, "steps": 1})
    d = 0.5
    two, _, events = train(CharLoraConfig, CharLoraTask, run_dir=str(tmp_path / "two"),
                           **{**common, "steps": 2, "ema": True, "ema_decay": d})
    ema_path = two.with_name(two.name.replace(".safetensors", ".ema.safetensors"))
    assert events[-1]["ema_lora"] == str(ema_path) and ema_path.is_file()
    w0, w1 = read_lora(trained["path"])[0], read_lora(one)[0]
    w2, meta2 = read_lora(two)
    ema, meta_e = read_lora(ema_path)
    assert sorted(ema) == sorted(w2)
    for k in w2:
        expected = d * d * w0[k] + d * (1 - d) * w1[k] + (1 - d) * w2[k]
        torch.testing.assert_close(ema[k], expected, rtol=0, atol=1e-6)
    assert max(float((ema[k] - w2[k]).abs().max()) for k in w2) > 1e-4
    prov_e, prov_2 = json.loads(meta_e["flenwheel"]), json.loads(meta2["flenwheel"])
    assert prov_e["ema"] == {"decay": d, "of": two.name, "of_sha256": sha256_file(two)}
    assert prov_2["ema"]["decay"] == d and prov_2["hyperparameters"]["ema"] is True
    # the EMA file takes no version number: the next run is still v<N+1>
    three, _, _ = train(CharLoraConfig, CharLoraTask, run_dir=str(tmp_path / "three"), **{**common, "steps": 1})
    assert int(three.stem.rsplit("_v", 1)[1]) == int(two.stem.rsplit("_v", 1)[1]) + 1


def _phase_dataset(output_dir):
    images = [draw_test_face(i, size=32) for i in range(4)]
    metas = [{"phase": "head"}, {"phase": "head"}, {"phase": "body"}, {"phase": "body"}]
    result = ds.write_dataset(output_dir, "erin", images, metas, token="ohwx_char person", phase="auto",
                              class_prompt="a photo of a person")
    return result.dataset.path


def test_each_phase_trains_only_on_its_own_images(tiny_models, tmp_path):
    dataset = _phase_dataset(tmp_path / "output")
    files = {it["file"]: it["phase"] for it in ds.load_dataset(dataset).items}
    assert sorted(files.values()) == ["body", "body", "head", "head"]
    seen = {}
    for phase in ("head", "body", "all"):
        _, task, _ = train(CharLoraConfig, CharLoraTask, **settings(
            tiny_models, dataset, tmp_path / "loras", phase=phase, steps=6, sample_every=0,
            run_dir=str(tmp_path / f"run_{phase}")))
        log = [json.loads(line) for line in (task.run_dir() / "loss.jsonl").read_text().splitlines()]
        seen[phase] = {k for r in log for k in r["items"]}
    assert seen["head"] == {f for f, p in files.items() if p == "head"}
    assert seen["body"] == {f for f, p in files.items() if p == "body"}
    assert seen["all"] == set(files)


def test_prior_preservation_adds_the_weighted_prior_loss(trained, tiny_models, tmp_path):
    classes = tmp_path / "class_images"
    classes.mkdir()
    for i in (7, 8):
        draw_test_face(i, size=32).save(classes / f"person_{i}.png")
    common = settings(tiny_models, trained["dataset"], tmp_path / "loras", steps=4, sample_every=0)
    runs = {}
    for name, extra in (("off", {}), ("zero", {"prior_preservation": True, "class_images": str(classes),
                                              "prior_loss_weight": 0.0}),
                        ("on", {"prior_preservation": True, "class_images": str(classes), "prior_loss_weight": 0.7})):
        path, task, _ = train(CharLoraConfig, CharLoraTask, run_dir=str(tmp_path / name), **{**common, **extra})
        log = [json.loads(line) for line in (task.run_dir() / "loss.jsonl").read_text().splitlines()]
        runs[name] = (read_lora(path)[0], log)
    off, zero, on = (runs[k][0] for k in ("off", "zero", "on"))
    for k in off:  # weight 0: the prior term adds nothing, so the instance part is the same as without prior
        torch.testing.assert_close(zero[k], off[k], rtol=0, atol=1e-7)
    assert max(float((on[k] - off[k]).abs().max()) for k in off) > 1e-4  # the prior loss trains the LoRA
    on_log = runs["on"][1]
    for r in on_log:
        assert r["prior_loss"] > 0
        assert abs(r["loss"] - (r["instance_loss"] + 0.7 * r["prior_loss"])) < 1e-5
        assert not any(k.startswith("class:") for k in r["items"])  # class images only in the prior term
    assert on_log[0]["instance_loss"] == runs["off"][1][0]["loss"]
