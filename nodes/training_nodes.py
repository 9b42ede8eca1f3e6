"""FLENTrainCharacterLoRA and FLENTrainEditorLoRA: train a LoRA in a child process from inside ComfyUI.

The node frees ComfyUI's VRAM, writes the trainer's config (JSON) next to the character's training
runs, and runs ``python -m training.train_char_lora|train_editor_lora --config FILE`` as a child
process (an argument list, never a shell; its own process group). The child prints one JSON object per
line; the node turns them into ComfyUI's progress bar, a text line with the loss and sample previews.
Cancel / ``POST /interrupt`` terminates the child's process group (then kills it), so no training
process is left holding the GPU. A failed child's error text becomes the node's error. The output is
the new LoRA's name relative to models/loras, which plugs into FLEN LoRA Stack's ``lora_name``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import time
from pathlib import Path

import torch
from comfy_api.v0_0_2 import io
from PIL import Image

from ..engines import child_process, edit_pairs, face_backends
from ..engines import dataset as ds
from ..engines import identity as face_id
from ..engines.errors import FlenUserError
from ..engines.image_arrays import pil_to_tensor
from ..engines.lora_stack import read_safetensors_header
from ..engines.safe_paths import Root, resolve_inside
from ..engines.workspace import workspace_label, workspace_root
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, FROM_PIPE, DatasetType, FluxPipeType, LoraNameType, QwenEditPipeType

PACK_DIR = Path(__file__).resolve().parents[1]
EVENT_KEY = "flen_event"  # training.lora_training.EVENT_KEY (the node imports nothing from training/)
CHILD_FILE = "launcher_child.json"  # in <workspace>/training/: pid and command of the running trainer
STOP_GRACE_S = 3.0
STDERR_LINES = 60


# ---- the child process ----------------------------------------------------------------------------------

def _parse(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and EVENT_KEY in obj else None


def run_trainer(module: str, config: dict, workspace: Path, label: str) -> tuple[str, dict]:
    """Runs ``python -m <module> --config`` on ``config``; returns (path of the new LoRA, the done event)."""
    train_dir = workspace / "training"
    configs = train_dir / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    config_path = configs / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.time_ns() % 10**6}.json"
    config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    bridge.free_vram()  # the trainer needs the GPU: ComfyUI's models go first
    cmd = [sys.executable, "-m", module, "--config", str(config_path)]
    proc = child_process.start(cmd, PACK_DIR)
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None and stderr is not None  # both are PIPEs
    child_file = train_dir / CHILD_FILE
    ds.atomic_write(child_file, json.dumps({"pid": proc.pid, "cmd": cmd, "config": str(config_path),
                                            "server_pid": os.getpid(), "prompt_id": bridge.current_prompt_id(),
                                            "started": time.time()}).encode("utf-8"))
    events: queue.Queue = queue.Queue()
    stderr_tail = child_process.tail(STDERR_LINES)

    def on_stdout(line: str) -> None:
        ev = _parse(line)
        if ev is not None:
            events.put(ev)

    def on_stderr(line: str) -> None:
        if line.strip() and "it/s]" not in line:  # tqdm bars are noise
            stderr_tail.append(line.rstrip())

    readers = [child_process.read_lines(stdout, on_stdout, on_end=lambda: events.put(None),
                                        name=f"{label}-stdout"),
               child_process.read_lines(stderr, on_stderr, name=f"{label}-stderr")]
    total = int(config.get("steps", 1))
    progress = bridge.Progress(total)
    progress.update(0, total, f"{label}: starting (pid {proc.pid})")
    done: dict | None = None
    error: str | None = None
    step = 0
    try:
        finished = False
        while not finished:
            bridge.check_interrupt()
            try:
                ev = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if ev is None:
                finished = True
                continue
            kind = ev[EVENT_KEY]
            if kind == "step":
                step = int(ev["step"])
                lr = f", lr {float(ev['lr']):.2e}" if ev.get("lr") is not None else ""
                progress.update(step, total, f"{label} (pid {proc.pid}): step {step}/{total}, "
                                             f"loss {float(ev['loss']):.4f}{lr}, {ev.get('s_per_step', 0):.2f} s/step")
            elif kind == "warning":
                bridge.progress_text(f"{label}: {ev.get('message', '')}")
            elif kind == "sample" and ev.get("paths"):
                image = None
                with contextlib.suppress(OSError):
                    with Image.open(ev.get("grid") or ev["paths"][0]) as im:
                        image = im.convert("RGB")
                progress.update(int(ev["step"]), total, f"{label}: samples at step {ev['step']}", image)
            elif kind == "resume":
                progress.update(int(ev["step"]), total, f"{label} (pid {proc.pid}): resumed from step {ev['step']}")
            elif kind == "start":
                progress.update(step, total, f"{label} (pid {proc.pid}): encoding the dataset once, then training "
                                             f"on {ev.get('device')}")
            elif kind == "done":
                done = ev
            elif kind == "error":
                error = str(ev.get("message", ""))
        proc.wait()
    except BaseException:
        child_process.stop(proc, STOP_GRACE_S)  # interrupted (or anything else): no training process is left behind
        raise
    finally:
        if proc.poll() is None:
            child_process.stop(proc, STOP_GRACE_S)
        for t in readers:
            t.join(timeout=2)
        with contextlib.suppress(OSError):
            child_file.unlink()
    if proc.returncode != 0 or done is None:
        tail = "\n".join(list(stderr_tail)[-15:])
        message = error or f"the trainer exited with code {proc.returncode}"
        raise FlenUserError(f"{label} failed: {message}" + (f"\n--- trainer output (last lines) ---\n{tail}"
                                                             if tail and not error else ""))
    return str(done["lora"]), done


def _is_our_trainer(pid: int, record: dict) -> bool:
    """The pid still runs the trainer the file names (pids get reused): its command line holds the config."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    config = str(record.get("config") or "")
    return bool(config) and config.encode() in cmdline and b"--config" in cmdline


def clean_stale_children(output_dir: str) -> list[str]:
    """At server start: a ``launcher_child.json`` whose server is gone was left by a crash. A trainer it
    names that still runs is an orphan holding the GPU: it is stopped (re-queueing resumes from its last
    checkpoint). The file goes either way. Returns what was done, for the log."""
    done: list[str] = []
    root = workspace_root(output_dir)
    for child_file in sorted(root.glob(f"*/training/{CHILD_FILE}")) if root.is_dir() else []:
        try:
            record = json.loads(child_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        record = record if isinstance(record, dict) else {}
        server = record.get("server_pid")
        if isinstance(server, int) and server != os.getpid() and child_process.pid_alive(server) and _is_comfy(server):
            continue  # another ComfyUI on the same output folder runs this trainer
        pid = record.get("pid")
        if isinstance(pid, int) and child_process.pid_alive(pid) and _is_our_trainer(pid, record):
            child_process.stop_pid(pid, STOP_GRACE_S)
            done.append(f"stopped orphaned trainer pid {pid} ({child_file.parent.parent.name})")
        with contextlib.suppress(OSError):
            child_file.unlink()
            done.append(f"removed stale {child_file}")
    return done


def _is_comfy(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"main.py" in cmdline or b"comfy" in cmdline.lower()


def lora_name(path: str) -> str:
    """The LoRA's name as models/loras lists it (relative, forward slashes)."""
    root = Path(bridge.loras_root()).resolve()
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


# ---- settings --------------------------------------------------------------------------------------------

# Keys of the trainer config that name files: the node sets them from its own inputs (combos, the dataset
# socket), so a prompt's 'advanced' text can never point the trainer at a folder of its choosing.
PATH_KEYS = ("model", "files", "dataset", "output_dir", "init_lora", "class_images", "character", "identity_root")


def _advanced(text: str, workspace: Path) -> dict:
    if not text or not text.strip():
        return {}
    import yaml

    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise FlenUserError(f"advanced settings are not valid YAML: {str(exc)[:300]}") from None
    if not isinstance(data, dict):
        raise FlenUserError("advanced settings must be 'key: value' lines (trainer config keys), e.g. "
                            "'max_grad_norm: 1.0'.")
    fixed = [k for k in data if k in PATH_KEYS]
    if fixed:
        raise FlenUserError(f"advanced cannot set {', '.join(repr(k) for k in fixed)}: files come from the node's "
                            "own inputs (model, dataset, init_lora, class_images), and the LoRA always goes to "
                            "models/loras/flenwheel/<character>/.")
    if "run_dir" in data:
        if not isinstance(data["run_dir"], str):
            raise FlenUserError("advanced: 'run_dir' must be a folder name.")
        root = Root(workspace / "training", workspace_label(workspace.name, "training"))
        data["run_dir"] = str(resolve_inside(data["run_dir"], [root], "advanced: 'run_dir'"))
    return data


def _dataset(dataset: dict, kind: str, node: str) -> tuple[Path, str]:
    if not isinstance(dataset, dict) or not dataset.get("path"):
        raise FlenUserError(f"{node} needs a FLEN_DATASET (from FLEN Dataset Writer or FLEN Edit Pair Writer).")
    if dataset.get("kind", "character") != kind:
        other = "FLEN Train Editor LoRA" if kind == "character" else "FLEN Train Character LoRA"
        raise FlenUserError(f"{node} trains on a '{kind}' set; this is a '{dataset.get('kind')}' set "
                            f"(use {other} for it).")
    folder = ds.DATASETS_DIR if kind == "character" else edit_pairs.EDIT_PAIRS_DIR
    return ds.version_dir_of(dataset, bridge.output_directory(), (folder,))


def _init_lora(name: str) -> str:
    name = (name or "").strip()
    if not name or name.lower() == "none":
        return ""
    path = bridge.lora_path(name)
    try:
        read_safetensors_header(path)
    except FlenUserError:
        raise FlenUserError(f"init_lora '{name}' is not a readable .safetensors file (damaged or cut short): "
                            "choose another LoRA, or leave init_lora empty to train from scratch.") from None
    return path


def _class_images(text: str, prior_preservation: bool) -> str:
    text = (text or "").strip()
    if not text and not prior_preservation:
        return ""
    if not text:
        raise FlenUserError("prior_preservation needs class_images: a folder of class images inside ComfyUI's "
                            "input folder, e.g. 'class_person'.")
    return str(resolve_inside(text, bridge.image_read_roots(), "class_images", must_exist="dir"))


def _common_inputs(default_res: int) -> list:
    return [
        io.Combo.Input("precision", options=["bf16", "nf4", "fp32", "fp8"], default="bf16",
                       tooltip="Frozen base weights: bf16 (an fp8 split file keeps its fp8 weights); nf4: 4-bit "
                               "bitsandbytes QLoRA of a diffusers folder (NVIDIA GPU only, fits 24 GB); fp8: a 16-bit "
                               "split file's base quantised to e4m3 while loading (what fits FLUX.1-dev on 24 GB); "
                               "fp32 for CPU tests. LoRA weights always train in fp32."),
        io.Int.Input("steps", default=1000, min=1, max=1_000_000, tooltip="Optimizer steps."),
        io.Int.Input("rank", default=16, min=1, max=256, tooltip="LoRA rank (saved with alpha equal to rank)."),
        io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=1.0,
                       tooltip="LoRA alpha while training; 0 means equal to rank. Folded into the saved weights."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5, round=False,
                       tooltip="AdamW learning rate (8-bit AdamW on CUDA)."),
        io.Int.Input("resolution", default=default_res, min=16, max=2048, step=16,
                     tooltip="Training area: images go into aspect-ratio buckets of about resolution² pixels."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF,
                     tooltip="Seed of LoRA initialisation, data order, noise and timesteps."),
        io.Int.Input("checkpoint_every", default=250, min=0, max=1_000_000,
                     tooltip="Save a checkpoint every N steps (0: never). A re-queued run with the same settings "
                             "resumes from the latest one."),
        io.Int.Input("sample_every", default=250, min=0, max=1_000_000,
                     tooltip="Render sample images every N steps (shown as previews; 0: never)."),
        io.String.Input("init_lora", default="", optional=True,
                        tooltip="Phased training: start from this earlier LoRA (name in models/loras, e.g. "
                                "flenwheel/<character>/char_lora_v1.safetensors; same rank). Empty: from scratch."),
        io.Boolean.Input("resume", default=True, optional=True,
                         tooltip="Resume from the latest checkpoint of an earlier run with the same settings."),
        io.String.Input("advanced", default="", multiline=True, optional=True,
                        tooltip="More trainer settings as 'key: value' lines (YAML), e.g. 'batch_size: 2', "
                                "'extra_target_modules: [proj_out]', 'sample_prompts: [...]'; for speed on a GPU "
                                "'compile_blocks: true' (torch.compile of each block, needs Triton) and "
                                "'checkpoint_blocks: N' (recompute only N blocks). Unknown keys are "
                                "refused with the list of known ones; so are file keys (model, dataset, "
                                "output_dir, init_lora, class_images, identity_root): they come from the "
                                "inputs. run_dir is a folder name inside the character's training folder."),
    ]


# Appended after the older inputs, so that saved workflows' widget values keep their places; every one has a
# default that trains as before.
def _option_inputs() -> list:
    return [
        io.Combo.Input("lr_scheduler", options=["constant", "constant_with_warmup", "cosine", "linear"],
                       default="constant", optional=True,
                       tooltip="Learning-rate schedule. constant: the same rate throughout. constant_with_warmup: "
                               "rises linearly over lr_warmup_steps, then constant. cosine / linear: warmup, then "
                               "decays towards 0 at the last step (smoother end; good for long runs)."),
        io.Int.Input("lr_warmup_steps", default=0, min=0, max=1_000_000, optional=True,
                     tooltip="Steps over which the rate rises from 0 to learning_rate (not with 'constant'). "
                             "5-10% of steps is usual; helps high learning rates start stably."),
        io.String.Input("resolutions", default="", optional=True,
                        tooltip="Several training resolutions in one run, comma separated, e.g. '512,768,1024' "
                                "(each a multiple of 64): every image is trained at each, in aspect buckets per "
                                "resolution. Empty: only 'resolution'."),
        io.Combo.Input("timestep_sampling", options=["logit_normal", "uniform", "sigmoid", "shift", "flux_shift"],
                       default="logit_normal", optional=True,
                       tooltip="How training noise levels are drawn. logit_normal: most steps at mid noise "
                               "(default, SD3/FLUX practice). uniform: all levels alike. sigmoid: like "
                               "logit_normal with a scale (sigmoid_scale under advanced). shift: towards high noise "
                               "(discrete_flow_shift, default 3): composition and likeness. flux_shift: shifted "
                               "by image size, as FLUX samples."),
        io.Combo.Input("weighting_scheme", options=["none", "sigma_sqrt", "cosmap"], default="none", optional=True,
                       tooltip="Loss weight by noise level. none: plain mean (default). cosmap: mild emphasis on "
                               "mid noise (SD3). sigma_sqrt: strong emphasis on low noise (fine detail); can be "
                               "unstable with uniform sampling."),
        io.Boolean.Input("ema", default=False, optional=True,
                         tooltip="Also save an exponential moving average of the LoRA weights as "
                                 "<name>.ema.safetensors beside the LoRA: often smoother, less over-fit results. "
                                 "The plain LoRA is written as always."),
        io.Float.Input("ema_decay", default=0.99, min=0.0, max=0.9999, step=0.001, optional=True,
                       tooltip="EMA decay per step: 0.99 averages over about the last 100 steps; use 0.999 for "
                               "runs of several thousand steps."),
        io.Boolean.Input("tensorboard", default=True, optional=True,
                         tooltip="Write TensorBoard event files (loss, learning rate, timestep) to the run folder's "
                                 "tensorboard/: tensorboard --logdir output/flenwheel/<character>/training."),
    ]


def _char_option_inputs() -> list:
    return [
        io.Float.Input("caption_dropout_rate", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="Share of training examples whose caption is replaced by the empty caption (seeded). "
                               "0.05-0.1 makes the likeness come through without the trigger too; 0: never."),
        io.Combo.Input("trigger_placement", options=["as_captioned", "prepend", "append", "replace_placeholder"],
                       default="as_captioned", optional=True,
                       tooltip="Where the instance token goes in each caption. as_captioned: the dataset's "
                               "captions as written (they already hold it). prepend / append: the token first / "
                               "last, once. replace_placeholder: [trigger] or {token} in a caption becomes the "
                               "token; captions without one get it in front."),
        io.Combo.Input("identity_model", options=["none", *face_backends.model_choices(bridge.insightface_packs())],
                       default="none", optional=True,
                       tooltip="Score every sample step's samples (model-card prompts, fixed seeds) against the "
                               "dataset's faces with this face model, and also save the weights of the "
                               "best-scoring step as <name>.best.safetensors (when it is not the last step). "
                               "The scores are recorded in the LoRA. none: no scoring."),
    ]


def _identity_config(name: str) -> dict:
    name = (name or "").strip()
    if not name or name == "none":
        return {}
    if not face_backends.is_dlib(name):
        face_id.pack_folder(bridge.insightface_root(), name)  # a missing pack is refused before the trainer starts
    return {"identity_model": name, "identity_root": bridge.insightface_root()}


def _option_config(lr_scheduler: str, lr_warmup_steps: int, resolutions: str, timestep_sampling: str,
                   weighting_scheme: str, ema: bool, ema_decay: float, tensorboard: bool) -> dict:
    text = (resolutions or "").strip()
    return {"lr_scheduler": lr_scheduler, "lr_warmup_steps": int(lr_warmup_steps),
            "resolutions": text if text else [], "timestep_sampling": timestep_sampling,
            "weighting_scheme": weighting_scheme, "ema": bool(ema), "ema_decay": float(ema_decay),
            "tensorboard": bool(tensorboard)}



def _base_model(model: str, pipe, slot: str, node: str) -> dict:
    """The trainer's base model: the connected loader's diffusers folder or ComfyUI split files, else ``model``.
    Only paths go to the child process; it loads the weights itself."""
    import dataclasses

    if pipe is not None:
        if getattr(pipe, "native", False):
            flux = slot == "flux_pipe"
            raise FlenUserError(bridge.NATIVE_TRAINING_MESSAGE.format(
                node=node, slot=slot, what="FLUX" if flux else "Qwen Edit",
                loader="FLEN FLUX Loader (ComfyUI files)" if flux else "FLEN Qwen Edit Loader (ComfyUI files)"))
        if getattr(pipe, "files", None) is not None:
            return {"model": "", "files": {k: v for k, v in dataclasses.asdict(pipe.files).items() if v}}
        return {"model": pipe.folder}
    if model == FROM_PIPE:
        raise FlenUserError(f"{node}: 'model' is '{FROM_PIPE}' but nothing is connected to '{slot}'. Connect a "
                            "loader (diffusers folder or ComfyUI split files) there, or pick a diffusers folder.")
    return {"model": bridge.diffusers_folder_path(model)}


def _common_config(model: dict, dataset_path: Path, precision: str, steps: int, rank: int, alpha: float,
                   learning_rate: float, resolution: int, seed: int, checkpoint_every: int, sample_every: int,
                   init_lora: str, resume: bool) -> dict:
    return {**model, "dataset": str(dataset_path),
            "output_dir": bridge.loras_root(), "precision": precision, "steps": steps, "rank": rank,
            "alpha": alpha, "learning_rate": learning_rate, "resolution": resolution, "seed": seed,
            "checkpoint_every": checkpoint_every, "sample_every": sample_every, "init_lora": _init_lora(init_lora),
            "resume": bool(resume)}


def _summary(label: str, name: str, done: dict) -> str:
    start, end = (float(done.get(k, float("nan"))) for k in ("eval_loss_start", "eval_loss_end"))
    text = (f"{label}: wrote {name} after {done.get('steps')} steps; loss on the training set "
            f"{start:.4f} → {end:.4f}.")
    if done.get("ema_lora"):
        text += f" EMA weights: {lora_name(str(done['ema_lora']))}."
    best = done.get("best")
    if best:
        text += (f" Best identity score {best['score']:.3f} at step {best['step']}"
                 + (f": {lora_name(str(done['best_lora']))}." if done.get("best_lora") else " (the final weights)."))
    if done.get("tensorboard"):
        text += f" TensorBoard: {done['tensorboard']}."
    return text


def _loss_curve(done: dict) -> torch.Tensor:
    """The trainer's loss-curve PNG as an IMAGE (a blank one if it is missing)."""
    path = done.get("loss_curve")
    try:
        with Image.open(str(path)) as im:
            rgb = im.convert("RGB")
    except (OSError, TypeError, ValueError):
        rgb = Image.new("RGB", (64, 64), (255, 255, 255))
    return pil_to_tensor(rgb)


_OUTPUTS = [LoraNameType.Output(display_name="lora_name",
                                tooltip="The new LoRA's name in models/loras (e.g. flenwheel/<character>/"
                                        "char_lora_v1.safetensors): connect it to FLEN LoRA Stack's lora_name."),
            io.String.Output(display_name="summary", tooltip="What was trained, and the loss before → after."),
            io.Image.Output(display_name="loss_curve",
                            tooltip="The loss per step (light), its moving average (dark) and the learning rate "
                                    "(orange) of the run.")]


class FLENTrainCharacterLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENTrainCharacterLoRA",
            display_name="FLEN Train Character LoRA",
            category=f"{CATEGORY}/training",
            description="Trains a FLUX.1 character LoRA on a dataset version (frozen first) in a child process: "
                        "frees ComfyUI's VRAM, caches latents and text embeddings, NF4/bf16 base, gradient "
                        "checkpointing, 8-bit AdamW, checkpoints + resume, sample previews. Writes "
                        "models/loras/flenwheel/<character>/char_lora_vN.safetensors (never overwriting) with "
                        "its provenance, and outputs its name. Cancel stops the trainer.",
            inputs=[
                DatasetType.Input("dataset", tooltip="A character dataset version (from FLEN Dataset Writer)."),
                io.Combo.Input("model", options=[*bridge.diffusers_folders(), FROM_PIPE],
                               tooltip="The diffusers FLUX.1 folder in models/diffusers (e.g. FLUX.1-dev); ignored "
                                       "when flux_pipe is connected."),
                *_common_inputs(512),
                io.Combo.Input("phase", options=["all", "head", "body"], default="all", optional=True,
                               tooltip="Train on all of the dataset's images, or only its head or body phase."),
                io.Boolean.Input("prior_preservation", default=False, optional=True,
                                 tooltip="Also train on class images (captioned with class_prompt) so the class "
                                         "does not drift."),
                io.String.Input("class_images", default="", optional=True,
                                tooltip="Folder of class images for prior preservation, inside ComfyUI's input "
                                        "folder (e.g. 'class_person'; output/ also works). Paths elsewhere are "
                                        "refused."),
                io.String.Input("class_prompt", default="", optional=True,
                                tooltip="Caption of the class images; empty: the dataset's class prompt."),
                FluxPipeType.Input("flux_pipe", optional=True,
                                   tooltip="Train on what this FLUX loader names instead of 'model': its diffusers "
                                           "folder or ComfyUI split files (fp8 files train over their fp8 "
                                           "weights; nf4 needs the diffusers folder). The trainer loads the files "
                                           "itself in its own process."),
                *_option_inputs(),
                *_char_option_inputs(),
            ],
            outputs=_OUTPUTS,
            is_output_node=True,
        )

    @classmethod
    def execute(cls, dataset: dict, model: str, precision: str, steps: int, rank: int, alpha: float,
                learning_rate: float, resolution: int, seed: int, checkpoint_every: int, sample_every: int,
                init_lora: str = "", resume: bool = True, advanced: str = "", phase: str = "all",
                prior_preservation: bool = False, class_images: str = "", class_prompt: str = "",
                flux_pipe=None, lr_scheduler: str = "constant", lr_warmup_steps: int = 0, resolutions: str = "",
                timestep_sampling: str = "logit_normal", weighting_scheme: str = "none", ema: bool = False,
                ema_decay: float = 0.99, tensorboard: bool = True, caption_dropout_rate: float = 0.0,
                trigger_placement: str = "as_captioned", identity_model: str = "none") -> io.NodeOutput:
        path, character = _dataset(dataset, "character", "FLEN Train Character LoRA")
        base = _base_model(model, flux_pipe, "flux_pipe", "FLEN Train Character LoRA")
        config = _common_config(base, path, precision, steps, rank, alpha, learning_rate, resolution, seed,
                                checkpoint_every, sample_every, init_lora, resume)
        config.update(phase=phase, prior_preservation=bool(prior_preservation),
                      class_images=_class_images(class_images, bool(prior_preservation)),
                      class_prompt=class_prompt.strip(), character=character)
        config.update(_option_config(lr_scheduler, lr_warmup_steps, resolutions, timestep_sampling, weighting_scheme,
                                     ema, ema_decay, tensorboard),
                      caption_dropout_rate=float(caption_dropout_rate), trigger_placement=trigger_placement,
                      **_identity_config(identity_model))
        config.update(_advanced(advanced, path.parent.parent))
        lora, done = run_trainer("training.train_char_lora", config, path.parent.parent, "char LoRA")
        name = lora_name(lora)
        summary = _summary("FLEN Train Character LoRA", name, done)
        return io.NodeOutput(name, summary, _loss_curve(done), ui={"text": [summary]})


class FLENTrainEditorLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENTrainEditorLoRA",
            display_name="FLEN Train Editor LoRA",
            category=f"{CATEGORY}/training",
            description="Trains a Qwen-Image-Edit-2509 LoRA on an edit-pair set (control images + instruction → "
                        "target) in a child process, with the same memory features, resume, previews and "
                        "interrupt as FLEN Train Character LoRA. Writes models/loras/flenwheel/<character>/"
                        "qwen_lora_vN.safetensors and outputs its name.",
            inputs=[
                DatasetType.Input("edit_pairs", tooltip="An edit-pair set (from FLEN Edit Pair Writer)."),
                io.Combo.Input("model", options=[*bridge.diffusers_folders(), FROM_PIPE],
                               tooltip="The diffusers Qwen-Image-Edit-2509 folder in models/diffusers; ignored when "
                                       "qwen_pipe is connected."),
                *_common_inputs(512),
                io.Int.Input("control_resolution", default=0, min=0, max=2048, step=16, optional=True,
                             tooltip="Side of the (square-equivalent) area the control images are encoded at; "
                                     "0: the training resolution."),
                QwenEditPipeType.Input("qwen_pipe", optional=True,
                                       tooltip="Train on what this Qwen edit loader names instead of 'model': its "
                                               "diffusers folder or ComfyUI split files (fp8 files train over their "
                                               "fp8 weights; nf4 needs the diffusers folder)."),
                *_option_inputs(),
            ],
            outputs=_OUTPUTS,
            is_output_node=True,
        )

    @classmethod
    def execute(cls, edit_pairs: dict, model: str, precision: str, steps: int, rank: int, alpha: float,
                learning_rate: float, resolution: int, seed: int, checkpoint_every: int, sample_every: int,
                init_lora: str = "", resume: bool = True, advanced: str = "",
                control_resolution: int = 0, qwen_pipe=None, lr_scheduler: str = "constant",
                lr_warmup_steps: int = 0, resolutions: str = "", timestep_sampling: str = "logit_normal",
                weighting_scheme: str = "none", ema: bool = False, ema_decay: float = 0.99,
                tensorboard: bool = True) -> io.NodeOutput:
        path, character = _dataset(edit_pairs, "edit_pairs", "FLEN Train Editor LoRA")
        base = _base_model(model, qwen_pipe, "qwen_pipe", "FLEN Train Editor LoRA")
        config = _common_config(base, path, precision, steps, rank, alpha, learning_rate, resolution, seed,
                                checkpoint_every, sample_every, init_lora, resume)
        config.update(control_resolution=int(control_resolution), character=character)
        config.update(_option_config(lr_scheduler, lr_warmup_steps, resolutions, timestep_sampling, weighting_scheme,
                                     ema, ema_decay, tensorboard))
        config.update(_advanced(advanced, path.parent.parent))
        lora, done = run_trainer("training.train_editor_lora", config, path.parent.parent, "editor LoRA")
        name = lora_name(lora)
        summary = _summary("FLEN Train Editor LoRA", name, done)
        return io.NodeOutput(name, summary, _loss_curve(done), ui={"text": [summary]})


NODES = [FLENTrainCharacterLoRA, FLENTrainEditorLoRA]
