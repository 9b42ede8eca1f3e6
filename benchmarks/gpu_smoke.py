"""GPU smoke run (not part of CI: CI has no GPU). Run it on a CUDA machine in every session that touches
inference, training or the ComfyUI bridge.

    python benchmarks/gpu_smoke.py [--parts tiny flux qwen native] [--precisions fp8 nf4] [--cap 24]
                                   [--results DIR] [--workdir DIR] [--no-frontend] [--cpu]

tiny: starts a real ComfyUI (CUDA, not --cpu) with the pack in custom_nodes and runs every shipped API
      workflow end to end through POST /prompt on the tiny-model kit's split files, once per precision (the loaders
      at that precision, the trainers at fp8 / nf4 for those runs and bf16 otherwise; the nf4 run on the diffusers
      folders, the only ones nf4 takes), with the LoRA stacks the workflows
      carry on both pipelines; the flywheel workflows run in the demo's order, reviewed by its scripted
      reviewer through the review routes.
flux: full-size random-weight FLUX.1-dev (fp8) with 2 LoRAs: one image and the 18-cell model card under the
      memory cap (benchmarks/bench_flux_generate.py).
qwen: full-size random-weight Qwen-Image-Edit-2509 (fp8), 2 LoRAs: edits and a 5-angle sweep under the cap
      (benchmarks/bench_qwen_edit.py).
native: full-size random-weight ComfyUI split files (benchmarks/native_files.py: FLUX.1-dev fp8 + clip_l + t5xxl fp8
      + ae; Qwen-Image-Edit-2509 fp8 + Qwen2.5-VL fp8 scaled + VAE), one model at a time, loaded by ComfyUI's own
      UNETLoader / DualCLIPLoader / CLIPLoader / VAELoader into FLEN FLUX / Qwen Edit from ComfyUI models, one
      image each under a random LoRA (FLEN LoRA Stack), through POST /prompt. With --cpu the files are cut to one
      block per stack and the prompts are only queued (ComfyUI validates them), not run.

Prints one line per workflow or part (ok / error with the message) and appends raw JSON lines to
DIR/gpu_smoke_<date>.jsonl. --no-frontend starts ComfyUI with an empty --front-end-root, for machines without
the comfyui-frontend-package wheel (the API does not need it). --cpu --precisions fp32 --parts tiny checks the
script itself on a machine without a GPU. Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools import demo  # noqa: E402
from tools.comfy_queue import ComfyClient, ComfyServer, prepare_base_directory  # noqa: E402
from tools.tiny_models import write_tiny_models  # noqa: E402

TRAINERS = ("FLENTrainCharacterLoRA", "FLENTrainEditorLoRA")
# The demo's order: each flywheel step reads what the one before it wrote.
ORDER = ("flen_synthetic_flux", "flen_angle_sweep", "flywheel1_enrich", "flywheel1_train", "flywheel1_synthesize",
         "flywheel2_editor", "flywheel_interactive", "compare_versions")


class PrecisionClient(ComfyClient):
    """Queues every prompt at the precision under test: the split-file loaders' "auto" and the kit's fp32 become
    it (trainers: fp8 / bf16); for nf4, which only the diffusers folders have, the split-file loaders are swapped
    for the diffusers-folder loaders first."""

    def __init__(self, url: str, precision: str) -> None:
        super().__init__(url)
        self.precision = precision

    def queue(self, prompt: dict) -> str:
        if self.precision == "nf4":
            demo.with_diffusers_folders(prompt)
        for node in prompt.values():
            inputs = node["inputs"]
            if inputs.get("precision") not in ("fp32", "auto") or self.precision == "fp32":
                continue
            if node["class_type"] in TRAINERS:
                inputs["precision"] = self.precision if self.precision in ("nf4", "fp8") else "bf16"
            else:
                inputs["precision"] = self.precision
        return super().queue(prompt)


def _workflow_steps(client: ComfyClient) -> dict[str, Callable[[], str]]:
    c = demo.CHARACTER

    def images(prompt: dict) -> str:
        outputs = client.run(prompt, timeout=600)
        return f"{sum(len(o.get('images', [])) for o in outputs.values())} images"

    def plain(name: str) -> Callable[[], str]:
        return lambda: images(demo.load_api_workflow(name))

    def enrich() -> str:
        client.run(demo.enrich_for_review(c, "v1"), timeout=600)
        return f"reviewed {demo.scripted_review(client, c)}"

    def train() -> str:
        outputs = client.run(demo.with_character(demo.load_api_workflow("flywheel1_train"), c), timeout=600)
        return " | ".join(demo._text(outputs, k).splitlines()[0] for k in outputs if demo._text(outputs, k))[:300]

    def synthesize() -> str:
        synth = demo.with_character(demo.load_api_workflow("flywheel1_synthesize"), c)
        synth[demo._node(synth, "FLENLoraStack")]["inputs"]["lora_name"] = f"flenwheel/{c}/char_lora_v1.safetensors"
        flt, queue = demo._node(synth, "FLENIdentityFilter"), demo._node(synth, "FLENReviewQueue")
        synth[queue]["inputs"].update(images=[flt, 2], meta=[flt, 3], version="v2")
        client.run(synth, timeout=600)
        return f"reviewed {demo.scripted_review(client, c, correct=0, reject=1)}"

    def editor() -> str:
        prompt = demo.with_character(demo.load_api_workflow("flywheel2_editor"), c)
        outputs = client.run(prompt, timeout=600)
        return demo._text(outputs, demo._node(prompt, "FLENTrainEditorLoRA"))

    def interactive() -> str:
        client.run(demo.with_character(demo.load_api_workflow("flywheel_interactive"), c), timeout=600)
        return "gate passed on its timeout policy"

    def split(name: str, **files: str) -> Callable[[], str]:
        """The workflow on other files of the kit's ComfyUI split files."""
        return lambda: images(demo.with_split_files(demo.load_api_workflow(name), **files))

    def folders(name: str) -> Callable[[], str]:
        """The workflow with its split-file loaders swapped for the diffusers-folder loaders."""
        return lambda: images(demo.with_diffusers_folders(demo.load_api_workflow(name)))

    steps = {"flywheel1_enrich": enrich, "flywheel1_train": train, "flywheel1_synthesize": synthesize,
             "flywheel2_editor": editor, "flywheel_interactive": interactive}
    shipped = sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json"))
    ordered = [n for n in ORDER if n in shipped] + [n for n in shipped if n not in ORDER]
    out = {name: steps.get(name, plain(name)) for name in ordered}
    # The shipped workflows load the kit's bf16 split files; also the diffusers-folder loaders, and fp8 scaled
    # files (e4m3 weights with ComfyUI's scale_weight) under the workflows' LoRA stacks.
    out["diffusers folders: flen_synthetic_flux"] = folders("flen_synthetic_flux")
    out["diffusers folders: flen_angle_sweep"] = folders("flen_angle_sweep")
    out["split fp8 scaled: flen_synthetic_flux"] = split(
        "flen_synthetic_flux", diffusion_model="flen-tiny/flux1-dev-tiny_fp8_scaled.safetensors",
        t5xxl="flen-tiny/t5xxl_tiny_fp8_e4m3fn_scaled.safetensors")
    out["split fp8 scaled: flen_angle_sweep"] = split(
        "flen_angle_sweep", diffusion_model="flen-tiny/qwen_image_edit_2509_tiny_fp8_scaled.safetensors",
        text_encoder="flen-tiny/qwen_2.5_vl_tiny_fp8_scaled.safetensors")
    return out


def run_tiny(precision: str, workdir: Path, models: Path, no_frontend: bool, cpu: bool,
             record: Callable[..., None]) -> None:
    base = workdir / f"comfy_{precision}"
    # Each precision starts its own flywheel (char_lora_v1, not v2 after the previous precision's v1).
    shutil.rmtree(models / "loras" / "flenwheel", ignore_errors=True)
    prepare_base_directory(base, models)
    demo.write_demo_inputs(base / "input")
    server = ComfyServer(base, python=sys.executable, cpu=cpu, extra_args=_frontend_args(workdir, no_frontend))
    t = time.perf_counter()
    try:
        server.start(timeout=300)
    except Exception as exc:  # noqa: BLE001 (a smoke run reports and goes on)
        record(part="tiny", precision=precision, workflow="<server start>", ok=False, error=str(exc)[-2000:])
        return
    device_line = next((ln.strip() for ln in server.log().splitlines() if "Device:" in ln), "")
    record(part="tiny", precision=precision, workflow="<server start>", ok=True,
           seconds=round(time.perf_counter() - t, 1), detail=device_line)
    try:
        client = PrecisionClient(server.url, precision)
        for name, step in _workflow_steps(client).items():
            t = time.perf_counter()
            try:
                detail = step()
                record(part="tiny", precision=precision, workflow=name, ok=True,
                       seconds=round(time.perf_counter() - t, 1), detail=detail)
            except Exception as exc:  # noqa: BLE001
                record(part="tiny", precision=precision, workflow=name, ok=False,
                       seconds=round(time.perf_counter() - t, 1), error=str(exc)[-1500:])
    finally:
        server.stop()
        (workdir / f"comfyui_{precision}.log").write_text(server.log())


NATIVE_STEPS = 4


def native_prompt(arch: str, files: dict) -> dict:
    """An API prompt: ComfyUI's own loaders → the pack's native pipe node → one image under a LoRA → SaveImage."""
    lora = {"class_type": "FLENLoraStack", "inputs": {"lora_name": files["lora"]["name"], "strength": 0.8,
                                                       "enabled": True}}
    save = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"native_{arch}"}}
    vae = {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]["name"]}}
    unet = {"class_type": "UNETLoader", "inputs": {"unet_name": files["diffusion_model"]["name"],
                                                   "weight_dtype": "default"}}
    if arch == "flux":
        return {
            "1": unet, "3": vae, "5": lora, "7": save,
            "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": files["clip_l"]["name"],
                                                             "clip_name2": files["t5xxl"]["name"], "type": "flux"}},
            "4": {"class_type": "FLENFluxFromComfy", "inputs": {"model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0],
                                                                "model_name": "flux1-dev-random"}},
            "6": {"class_type": "FLENFluxGenerate", "inputs": {
                "flux_pipe": ["4", 0], "prompts": "a photo of a person", "width": 1024, "height": 1024,
                "steps": NATIVE_STEPS, "guidance": 3.5, "seed": 1, "batch": 1, "lora_stack": ["5", 0]}},
        }
    return {
        "1": unet, "3": vae, "5": lora, "7": save,
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": files["text_encoder"]["name"], "type": "qwen_image"}},
        "4": {"class_type": "FLENQwenEditFromComfy", "inputs": {"model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0],
                                                                "model_name": "qwen-image-edit-2509-random"}},
        "8": {"class_type": "EmptyImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1,
                                                     "color": 0x808080}},
        "6": {"class_type": "FLENQwenEdit", "inputs": {
            "qwen_pipe": ["4", 0], "image1": ["8", 0], "instruction": "turn the camera 45 degrees to the left",
            "negative_prompt": "", "steps": NATIVE_STEPS, "true_cfg": 1.0, "seed": 1, "megapixels": 1.0,
            "width": 1024, "height": 1024, "batch": 1, "lora_stack": ["5", 0]}},
    }


def run_native(workdir: Path, no_frontend: bool, cpu: bool, record: Callable[..., None]) -> None:
    for arch in ("flux", "qwen"):
        models = workdir / f"native_models_{arch}"
        t = time.perf_counter()
        cmd = [sys.executable, "benchmarks/native_files.py", str(models), arch,
               *(["--depth", "1"] if cpu else ["--device", "cuda"])]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            record(part="native", workflow=f"{arch} files", ok=False, error=(proc.stderr or proc.stdout)[-2000:])
            continue
        files = json.loads(lines[-1])
        record(part="native", workflow=f"{arch} files", ok=True, seconds=round(time.perf_counter() - t, 1),
               detail=", ".join(f"{v['name'].split('/')[-1]} {v['mib']} MiB" for v in files.values()
                                if isinstance(v, dict)))
        base = workdir / f"comfy_native_{arch}"
        prepare_base_directory(base, models)
        server = ComfyServer(base, python=sys.executable, cpu=cpu, extra_args=_frontend_args(workdir, no_frontend))
        try:
            server.start(timeout=300)
            client = ComfyClient(server.url)
            t = time.perf_counter()
            prompt = native_prompt(arch, files)
            if cpu:  # ComfyUI would build the full-size text encoders: check the prompt against /object_info only
                detail = _check_against_object_info(client, prompt)
            else:
                outputs = client.run(prompt, timeout=1200)
                images = sum(len(o.get("images", [])) for o in outputs.values())
                if images != 1:
                    raise RuntimeError(f"expected 1 image, got {images}: {outputs}")
                loads = [ln.strip() for ln in server.log().splitlines() if "loaded completely" in ln
                         or "loaded partially" in ln]
                detail = f"1 image, {NATIVE_STEPS} steps; " + " | ".join(loads)[-400:]
            record(part="native", workflow=f"{arch} ComfyUI loaders → FLEN", ok=True,
                   seconds=round(time.perf_counter() - t, 1), detail=detail)
        except Exception as exc:  # noqa: BLE001 (a smoke run reports and goes on)
            record(part="native", workflow=f"{arch} ComfyUI loaders → FLEN", ok=False, error=str(exc)[-2000:])
        finally:
            server.stop()
            (workdir / f"comfyui_native_{arch}.log").write_text(server.log())
            shutil.rmtree(models, ignore_errors=True)  # the next model's files need the disk


def _check_against_object_info(client: ComfyClient, prompt: dict) -> str:
    """Every node of the prompt is registered, and every file it names is in the list ComfyUI's loader offers."""
    for node in prompt.values():
        info = client.get(f"/object_info/{node['class_type']}").json().get(node["class_type"])
        if info is None:
            raise RuntimeError(f"{node['class_type']} is not registered")
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, value in node["inputs"].items():
            spec = specs.get(name)
            if spec is None:
                raise RuntimeError(f"{node['class_type']} has no input {name!r}")
            options = spec[0] if isinstance(spec[0], list) else (spec[1] or {}).get("options") if len(spec) > 1 \
                else None
            if isinstance(options, list) and not isinstance(value, list) and value not in options:
                raise RuntimeError(f"{node['class_type']}.{name}: {value!r} is not among ComfyUI's {options[:6]}")
    return f"{len(prompt)} nodes registered, every file listed by ComfyUI's loaders; not run on the CPU"


def _frontend_args(workdir: Path, no_frontend: bool) -> tuple[str, ...]:
    if not no_frontend:
        return ()
    web_root = workdir / "empty_web_root"
    web_root.mkdir(exist_ok=True)
    (web_root / "index.html").write_text("<!doctype html><title>no frontend</title>")
    return ("--front-end-root", str(web_root))


def run_bench(part: str, cmd: list[str], record: Callable[..., None]) -> None:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
            record(part=part, raw=rows[-1])
    ok = proc.returncode == 0 and bool(rows)
    record(part=part, workflow=" ".join(cmd[1:]), ok=ok, seconds=round(time.perf_counter() - t, 1),
           **({} if ok else {"error": (proc.stderr or proc.stdout)[-2000:]}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["tiny", "flux", "qwen", "native"],
                   choices=["tiny", "flux", "qwen", "native"])
    p.add_argument("--precisions", nargs="+", default=["fp8", "nf4"], choices=["fp8", "nf4", "bf16", "fp32"])
    p.add_argument("--cap", type=float, default=24.0, help="GiB per process for the full-size parts")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--no-frontend", action="store_true")
    p.add_argument("--cpu", action="store_true", help="check this script on a machine without a GPU (fp32, tiny)")
    a = p.parse_args()

    import torch

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    a.results.mkdir(parents=True, exist_ok=True)
    raw = a.results / f"gpu_smoke_{stamp}.jsonl"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    failures = 0

    def record(**row) -> None:
        nonlocal failures
        row = {"date": stamp, "gpu": gpu, **row}
        with raw.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if "ok" in row:
            failures += not row["ok"]
            what = f"{row['part']}{'/' + row['precision'] if 'precision' in row else ''} {row.get('workflow', '')}"
            tail = row.get("detail", "") if row["ok"] else row.get("error", "").strip().splitlines()[-1:]
            print(f"{'ok   ' if row['ok'] else 'ERROR'} {what} ({row.get('seconds', '-')} s) {tail}", flush=True)
            if not row["ok"]:
                print("      " + row.get("error", "")[-1500:].replace("\n", "\n      "), flush=True)

    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="flen_gpu_smoke_"))
    models = workdir / "models"
    write_tiny_models(models, seed=0)
    print(f"GPU smoke run on {gpu}, {stamp}; work in {workdir}; raw lines in {raw}", flush=True)
    try:
        if "tiny" in a.parts:
            for precision in a.precisions:
                run_tiny(precision, workdir, models, a.no_frontend, a.cpu, record)
        py = sys.executable
        if "flux" in a.parts:
            run_bench("flux", [py, "benchmarks/bench_flux_generate.py", "--kit",
                               str(models / "diffusers" / "flen-tiny-flux"), "--cap", str(a.cap), "--loras", "2"],
                      record)
        if "qwen" in a.parts:
            run_bench("qwen", [py, "benchmarks/bench_qwen_edit.py", "--kit",
                               str(models / "diffusers" / "flen-tiny-qwen-image-edit"), "--cap", str(a.cap),
                               "--loras", "2"], record)
        if "native" in a.parts:
            run_native(workdir, a.no_frontend, a.cpu, record)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        failures += 1
    print(f"{'all ok' if not failures else f'{failures} failed'}; raw lines: {raw}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
