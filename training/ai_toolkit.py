"""ai-toolkit launch back-end: a FLENwheel dataset in, an ai-toolkit job out, the LoRA back under its FLENwheel name.

ai-toolkit (ostris/ai-toolkit) is not part of FLENwheel: the user points at a checkout of it. This module

1. writes an ai-toolkit job config (YAML) with exactly the keys and layout of ai-toolkit's own example
   configs (``config/examples/train_lora_flux_24gb.yaml`` for FLUX LoRAs and
   ``train_lora_qwen_image_edit_2509_32gb.yaml`` for Qwen-Image-Edit-2509 LoRAs with control folders),
   pointing at the dataset's leaf folders (image + same-stem ``.txt`` caption) or at an edit-pair set's
   ``targets/`` and ``control_1..3/`` folders, and at the user's local diffusers folder of the base model (for
   Qwen-Image-Edit-2509 also ComfyUI's single diffusion-model file, with the rest from that folder: see
   ``check_transformer_file``);
2. runs ``<checkout>/run.py <config>`` as a child process (argument list, never a shell; the checkout's
   venv python if it has one), parses its tqdm progress lines (``step/total`` and ``loss:``) into
   callbacks, stops it on interrupt (terminate, then kill, the whole process group) and surfaces the
   last lines of its output when it fails;
3. finds the ``.safetensors`` it produced and copies it atomically, never overwriting, to
   ``models/loras/flenwheel/<character>/char_lora_vN.safetensors`` (``qwen_lora_vN`` for editor LoRAs),
   with FLENwheel's provenance added to the safetensors metadata.

Plain Python: no ComfyUI imports. ``python -m training.ai_toolkit --help`` runs it outside ComfyUI.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import yaml

try:  # inside ComfyUI the pack is a package (custom_nodes/FLENwheel); from the repo root it is not
    from ..engines import child_process, edit_pairs, safe_paths, safetensors_files, workspace
    from ..engines import dataset as ds
    from ..engines import split_files as sf
    from ..engines.atomic_files import write_new_file
    from ..engines.errors import FlenUserError
except ImportError:
    from engines import child_process, edit_pairs, safe_paths, safetensors_files, workspace
    from engines import dataset as ds
    from engines import split_files as sf
    from engines.atomic_files import write_new_file
    from engines.errors import FlenUserError

JOB_KINDS = ("flux", "qwen_image_edit_2509")
LORA_PREFIX = {"flux": "char_lora", "qwen_image_edit_2509": "qwen_lora"}
RUNS_DIR = "ai_toolkit_runs"
DEFAULT_RESOLUTIONS = (512, 768, 1024)
TAIL_LINES = 40
STOP_GRACE_S = 5.0
QWEN_EDIT_QTYPE = "uint3|ostris/accuracy_recovery_adapters/qwen_image_edit_2509_torchao_uint3.safetensors"
DEFAULT_FLUX_PROMPTS = ("a photo of {token}, neutral expression, looking at the camera",
                        "a photo of {token}, smiling, three-quarter view, outdoors",
                        "a full-body photo of {token} walking in a city street")


class AIToolkitError(FlenUserError):
    """ai-toolkit failed or could not be started; the message carries the tail of its output."""


# ---- settings ---------------------------------------------------------------------------------

@dataclass
class AIToolkitSettings:
    """What the user chooses for one ai-toolkit job (everything else is the example config's value)."""

    kind: str = "flux"                     # flux | qwen_image_edit_2509
    base_model: str = ""                   # local diffusers folder of FLUX.1-dev / Qwen-Image-Edit-2509
    transformer_file: str = ""             # Qwen only: ComfyUI's diffusion-model file; base_model gives the rest
    character: str = ""
    steps: int = 2000
    rank: int = 16
    alpha: int | None = None               # None: equal to rank
    learning_rate: float = 1e-4
    resolutions: list[int] = field(default_factory=lambda: list(DEFAULT_RESOLUTIONS))
    sample_every: int = 250
    save_every: int = 250
    batch_size: int = 1
    seed: int = 42
    device: str = "cuda:0"
    quantize: bool = True
    low_vram: bool | None = None           # None: the example's choice (FLUX off, Qwen on)
    qtype: str = ""                        # Qwen only; empty: the example's 3-bit + accuracy recovery adapter
    sample_prompts: list[str] = field(default_factory=list)   # empty: built-in ones ({token} filled in)
    width: int = 1024
    height: int = 1024

    def validate(self) -> AIToolkitSettings:
        if self.kind not in JOB_KINDS:
            raise FlenUserError(f"Unknown ai-toolkit job kind {self.kind!r}; one of {', '.join(JOB_KINDS)}.")
        self.character = workspace.validate_character(self.character)
        if not self.base_model:
            raise FlenUserError("No base model folder: choose the diffusers folder of the base model "
                                "(models/diffusers/…).")
        checks = (("steps", self.steps, 1, 1_000_000), ("rank", self.rank, 1, 1024),
                  ("sample_every", self.sample_every, 0, 1_000_000), ("save_every", self.save_every, 1, 1_000_000),
                  ("batch_size", self.batch_size, 1, 64))
        for name, value, lo, hi in checks:
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise FlenUserError(f"{name} must be a whole number from {lo} to {hi}, not {value!r}.")
        if self.alpha is not None and (not isinstance(self.alpha, int) or self.alpha < 1):
            raise FlenUserError(f"alpha must be a positive whole number (or empty for alpha = rank), "
                                f"not {self.alpha!r}.")
        if not isinstance(self.learning_rate, (int, float)) or not 0 < float(self.learning_rate) < 1:
            raise FlenUserError(f"learning_rate must be between 0 and 1 (e.g. 1e-4), not {self.learning_rate!r}.")
        self.resolutions = parse_resolutions(self.resolutions)
        if self.transformer_file:
            check_transformer_file(self.transformer_file, self.kind)
        return self


# What ai-toolkit (27a03a9) reads from single files. Qwen-Image(-Edit): extensions_built_in/diffusion_models/
# qwen_image/qwen_image.py takes a name_or_path ending in .safetensors as the transformer (diffusers'
# from_single_file, keys as stored, its config from the Hugging Face repo Qwen/Qwen-Image) and the tokenizer,
# text encoder, processor and VAE from extras_name_or_path, a diffusers folder. FLUX.1: toolkit/
# stable_diffusion_model.py reads transformer, T5, CLIP and scheduler with from_pretrained from name_or_path, a
# diffusers folder only.
AI_TOOLKIT_FILE_STORAGES = ("bf16", "fp16", "fp32", "fp8_e4m3fn")
FLUX_NEEDS = ("ai-toolkit's FLUX.1 trainer reads the transformer, both text encoders and the scheduler from a "
              "diffusers folder (toolkit/stable_diffusion_model.py, from_pretrained); it cannot take ComfyUI's "
              "split files (flux1-dev.safetensors, clip_l, t5xxl, ae). Put the FLUX.1-dev diffusers folder "
              "(black-forest-labs/FLUX.1-dev, with model_index.json) in models/diffusers and pick it as base_model, "
              "or train on the split files with FLEN Train Character LoRA.")


def check_transformer_file(path: str | os.PathLike, kind: str) -> Path:
    """The ComfyUI diffusion-model file ai-toolkit can take as the Qwen-Image-Edit-2509 transformer, else a
    FlenUserError naming the file, what it is and what to use."""
    if kind != "qwen_image_edit_2509":
        raise FlenUserError(FLUX_NEEDS)
    p = Path(path)
    if not p.is_file():
        raise FlenUserError(f"Transformer file {p} does not exist.")
    info = sf.expect(p, ("qwen_image_transformer",), "diffusion_models",
                     "the Qwen-Image-Edit-2509 diffusion model (qwen_image_edit_2509_bf16.safetensors or "
                     "qwen_image_edit_2509_fp8_e4m3fn.safetensors)")
    if info.prefix:
        raise FlenUserError(f"'{info.name}' stores its keys under '{info.prefix}'; ai-toolkit loads the Qwen "
                            "transformer with diffusers' from_single_file, which takes the keys as they are stored "
                            "(ComfyUI's own Qwen-Image-Edit-2509 files have no prefix). Use "
                            "qwen_image_edit_2509_bf16.safetensors or qwen_image_edit_2509_fp8_e4m3fn.safetensors.")
    if info.storage not in AI_TOOLKIT_FILE_STORAGES:
        raise FlenUserError(f"'{info.name}' is an {info.storage} file (fp8 weights with scale factors); ai-toolkit "
                            "casts a single file's weights to bf16 without applying such scales. Use "
                            "qwen_image_edit_2509_bf16.safetensors or qwen_image_edit_2509_fp8_e4m3fn.safetensors "
                            "(ai-toolkit quantises it again itself).")
    return p


def parse_resolutions(value: Any) -> list[int]:
    """``"512, 768, 1024"`` or a list → sorted unique ints, each a multiple of 64 from 256 to 2048."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    out: list[int] = []
    for p in parts:
        try:
            r = int(str(p))
        except ValueError:
            raise FlenUserError(f"Resolution {p!r} is not a whole number; write e.g. '512, 768, 1024'.") from None
        if not 256 <= r <= 2048 or r % 64:
            raise FlenUserError(f"Resolution {r} is not a multiple of 64 from 256 to 2048.")
        if r not in out:
            out.append(r)
    if not out:
        raise FlenUserError("No resolution given; write e.g. '512, 768, 1024'.")
    return sorted(out)


# ---- the job config ---------------------------------------------------------------------------

def dataset_entries(dataset_path: str | os.PathLike, kind: str) -> tuple[list[dict[str, Any]], ds.Dataset]:
    """The ``datasets:`` entries for a FLENwheel dataset (one per leaf folder) or an edit-pair set."""
    path = Path(dataset_path)
    if not (path / ds.INFO_NAME).is_file():
        raise FlenUserError(f"{path} is not a FLENwheel dataset (no {ds.INFO_NAME}); connect FLEN Dataset Writer "
                            "or FLEN Edit Pair Writer.")
    d = ds.load_dataset(path, verify=False)
    if d.problems:
        raise FlenUserError(f"Dataset {path} is damaged: " + "; ".join(d.problems[:5]))
    if not d.items:
        raise FlenUserError(f"Dataset {path} is empty: nothing to train on.")
    set_kind = d.info.get("kind", "character")
    if kind == "qwen_image_edit_2509":
        if set_kind != "edit_pairs":
            raise FlenUserError(f"A Qwen-Image-Edit-2509 job trains on an edit-pair set (FLEN Edit Pair Writer); "
                                f"{path} is a character dataset. Use job kind 'flux' for it.")
        n = int(d.info.get("n_controls") or d.counts.get("controls") or 0)
        if not 1 <= n <= edit_pairs.MAX_CONTROLS:
            raise FlenUserError(f"Edit-pair set {path} has {n} control folders; ai-toolkit takes 1 to "
                                f"{edit_pairs.MAX_CONTROLS}.")
        return [{"folder_path": str(path / edit_pairs.TARGETS),
                 "control_path": [str(path / edit_pairs.control_dir(k)) for k in range(1, n + 1)],
                 "caption_ext": "txt", "caption_dropout_rate": 0.05, "resolution": None}], d
    if set_kind == "edit_pairs":
        raise FlenUserError(f"{path} is an edit-pair set; a FLUX character LoRA trains on a character dataset "
                            "(FLEN Dataset Writer). Use job kind 'qwen_image_edit_2509' for edit pairs.")
    return [{"folder_path": str(folder), "caption_ext": "txt", "caption_dropout_rate": 0.05, "shuffle_tokens": False,
             "cache_latents_to_disk": True, "resolution": None} for folder in d.folders], d


def _sample_prompts(settings: AIToolkitSettings, token: str) -> list[str]:
    prompts = [p.strip() for p in settings.sample_prompts if p and p.strip()] or list(DEFAULT_FLUX_PROMPTS)
    return [p.replace("{token}", token) if token else p.replace("{token}", "the person") for p in prompts]


def build_config(dataset_path: str | os.PathLike, settings: AIToolkitSettings, name: str,
                 training_folder: str | os.PathLike, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ai-toolkit job config (a dict in the example configs' key order)."""
    s = settings.validate()
    entries, d = dataset_entries(dataset_path, s.kind)
    for e in entries:
        e["resolution"] = list(s.resolutions)
    alpha = s.alpha if s.alpha is not None else s.rank
    network = {"type": "lora", "linear": s.rank, "linear_alpha": alpha}
    sample_common = {"sampler": "flowmatch", "sample_every": s.sample_every or s.steps + 1, "sample_start_step": 0,
                     "width": s.width, "height": s.height}
    if s.kind == "flux":
        token = str(d.info.get("instance_token") or "")
        process: dict[str, Any] = {
            "type": "sd_trainer", "training_folder": str(training_folder), "device": s.device, "network": network,
            "save": {"dtype": "float16", "save_every": s.save_every, "max_step_saves_to_keep": 4,
                     "push_to_hub": False},
            "datasets": entries,
            "train": {"batch_size": s.batch_size, "steps": s.steps, "gradient_accumulation_steps": 1,
                      "train_unet": True, "train_text_encoder": False, "gradient_checkpointing": True,
                      "noise_scheduler": "flowmatch", "optimizer": "adamw8bit", "lr": float(s.learning_rate),
                      **({"disable_sampling": True} if not s.sample_every else {}),
                      "ema_config": {"use_ema": True, "ema_decay": 0.99}, "dtype": "bf16"},
            "model": {"name_or_path": str(s.base_model), "is_flux": True, "quantize": s.quantize,
                      **({"low_vram": True} if s.low_vram else {})},
            "sample": {**sample_common, "prompts": _sample_prompts(s, token), "neg": "", "seed": s.seed,
                       "walk_seed": True, "guidance_scale": 4, "sample_steps": 20},
        }
    else:
        samples = []
        for item in d.items[:5]:  # the set's own pairs: controls + instruction, as the example's samples
            sample = {"prompt": str(item.get("caption") or item.get("instruction") or "")}
            for k, c in enumerate(item.get("controls") or [], 1):
                sample[f"ctrl_img_{k}"] = str(Path(dataset_path) / c["file"])
            samples.append(sample)
        process = {
            "type": "diffusion_trainer", "training_folder": str(training_folder), "device": s.device,
            "network": network,
            "save": {"dtype": "float16", "save_every": s.save_every, "max_step_saves_to_keep": 4},
            "datasets": entries,
            "train": {"batch_size": s.batch_size, "cache_text_embeddings": True, "steps": s.steps,
                      "gradient_accumulation": 1, "timestep_type": "weighted", "train_unet": True,
                      "train_text_encoder": False, "gradient_checkpointing": True, "noise_scheduler": "flowmatch",
                      "optimizer": "adamw8bit", "lr": float(s.learning_rate),
                      **({"disable_sampling": True} if not s.sample_every else {}), "dtype": "bf16"},
            "model": {"name_or_path": str(s.transformer_file or s.base_model),
                      **({"extras_name_or_path": str(s.base_model)} if s.transformer_file else {}),
                      "arch": "qwen_image_edit_plus", "quantize": s.quantize,
                      "qtype": s.qtype or QWEN_EDIT_QTYPE, "quantize_te": True, "qtype_te": "qfloat8",
                      "low_vram": True if s.low_vram is None else bool(s.low_vram)},
            "sample": {**sample_common, "samples": samples, "neg": "", "seed": s.seed, "walk_seed": True,
                       "guidance_scale": 3, "sample_steps": 25},
        }
    meta: dict[str, str | int | float | bool] = {"name": "[name]", "version": "1.0"}
    meta.update({k: (v if isinstance(v, (str, int, float, bool)) else json.dumps(v, sort_keys=True, default=str))
                 for k, v in (extra_meta or {}).items()})
    return {"job": "extension", "config": {"name": name, "process": [process]}, "meta": meta}


def dump_config(config: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False)


def write_config(config: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    if not write_new_file(path, dump_config(config).encode("utf-8")):
        raise FlenUserError(f"{path} already exists; FLENwheel never overwrites a job config.")
    return path


# ---- names ------------------------------------------------------------------------------------

def lora_folder(loras_root: str | os.PathLike, character: str) -> Path:
    return workspace.loras_dir(loras_root, character)


def next_lora_name(loras_root: str | os.PathLike, character: str, prefix: str) -> str:
    """``<prefix>_vN`` with N one past the highest existing version in models/loras/flenwheel/<character>/."""
    return f"{prefix}_v{workspace.next_version(lora_folder(loras_root, character), prefix)}"


# ---- the child process ------------------------------------------------------------------------

_STEP_RE = re.compile(r"(?<![\d.])(\d+)/(\d+)\s*\[")
_LOSS_RE = re.compile(r"\bloss:\s*([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))", re.IGNORECASE)


@dataclass
class ProgressLine:
    step: int
    total: int
    loss: float | None
    desc: str
    text: str


def parse_progress(line: str) -> ProgressLine | None:
    """A tqdm line (``name:  40%|####  | 4/10 [00:02<00:03, 1.9it/s, lr: 1.0e-04 loss: 4.1e-01]``) → its step,
    total, loss and description; None for other lines."""
    m = _STEP_RE.search(line)
    if not m:
        return None
    step, total = int(m.group(1)), int(m.group(2))
    if total <= 0 or step > total:
        return None
    lm = _LOSS_RE.search(line[m.end():])
    loss = float(lm.group(1)) if lm else None
    head = line[:m.start()]
    desc = head.split(":", 1)[0].strip() if ":" in head else ""
    return ProgressLine(step, total, loss, desc, line.strip())


def venv_python(checkout: str | os.PathLike) -> str:
    """The checkout's own venv python (venv/ or .venv/) if present, else this interpreter."""
    c = Path(checkout)
    for name in ("venv", ".venv"):
        for rel in ("bin/python", "bin/python3", "Scripts/python.exe"):
            p = c / name / rel
            if p.is_file():
                return str(p)
    return sys.executable


CHECKOUT_ENV = "FLENWHEEL_AI_TOOLKIT"
SETTINGS_FILE = "flenwheel.json"  # in ComfyUI's user folder, beside (not inside) the per-user folders
SETTINGS_KEY = "ai_toolkit"
NOT_CONFIGURED = "(none configured)"
# what every ai-toolkit checkout since 2023 has: the entry script, the library and the job classes
CHECKOUT_MARKERS = (("run.py", "file"), ("toolkit", "dir"), ("jobs", "dir"))


def configure_hint() -> str:
    return (f"Set the environment variable {CHECKOUT_ENV} to the folder of your checkout (git clone of "
            "https://github.com/ostris/ai-toolkit), or to a folder holding several, before starting ComfyUI; or "
            f"write {{\"{SETTINGS_KEY}\": [\"/path/to/ai-toolkit\"]}} into {SETTINGS_FILE} in ComfyUI's user "
            "folder. Then refresh the node list (press R).")


def configured_sources(user_dir: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> list[Path]:
    """The folders the server's operator named: ``$FLENWHEEL_AI_TOOLKIT`` (os.pathsep-separated) and the
    ``ai_toolkit`` entry (a text or a list) of ``<user dir>/flenwheel.json``. Never anything from a prompt."""
    env = os.environ if environ is None else environ
    out = [Path(os.path.expanduser(p)) for p in env.get(CHECKOUT_ENV, "").split(os.pathsep) if p.strip()]
    if user_dir:
        settings = Path(user_dir) / SETTINGS_FILE
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(settings.read_text(encoding="utf-8"))
            value = data.get(SETTINGS_KEY) if isinstance(data, dict) else None
            for p in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
                if isinstance(p, str) and p.strip():
                    out.append(Path(os.path.expanduser(p.strip())))
    return out


def looks_like_checkout(path: str | os.PathLike) -> bool:
    p = Path(path)
    return all((p / name).is_file() if kind == "file" else (p / name).is_dir() for name, kind in CHECKOUT_MARKERS)


def find_checkouts(sources: list[Path]) -> dict[str, Path]:
    """Checkout name → folder: each source that is a checkout, else its sub-folders that are."""
    found: list[Path] = []
    for src in sources:
        if looks_like_checkout(src):
            found.append(src)
        elif src.is_dir():
            with contextlib.suppress(OSError):
                found.extend(sorted(d for d in src.iterdir() if d.is_dir() and looks_like_checkout(d)))
    names: dict[str, Path] = {}
    for path in found:
        real = Path(os.path.realpath(path))
        if real in names.values():
            continue
        name = path.name
        if name in names:
            name = f"{path.parent.name}/{path.name}"
        k = 2
        while name in names:
            name, k = f"{path.name} ({k})", k + 1
        names[name] = real
    return names


def validate_checkout(checkout: str | os.PathLike, refused: list[Any] | tuple = ()) -> Path:
    """A checkout the operator configured: it must look like ai-toolkit, and neither it, its run.py nor its
    venv python may lie in a folder clients can write to (``refused``: engines.safe_paths.Root)."""
    text = str(checkout or "").strip()
    if not text:
        raise FlenUserError("No ai-toolkit checkout given. " + configure_hint())
    path = Path(os.path.realpath(os.path.expanduser(text)))
    if not path.is_dir():
        raise FlenUserError(f"The configured ai-toolkit checkout '{Path(text).name}' does not exist any more. "
                            + configure_hint())
    if not looks_like_checkout(path):
        need = ", ".join(f"{n}{'/' if k == 'dir' else ''}" for n, k in CHECKOUT_MARKERS)
        raise FlenUserError(f"The configured folder '{path.name}' is not an ai-toolkit checkout (it needs {need}, "
                            "as https://github.com/ostris/ai-toolkit has). " + configure_hint())
    for what, p in (("The ai-toolkit checkout", path), ("Its run.py", path / "run.py"),
                    ("Its python", Path(venv_python(path)))):
        safe_paths.refuse_inside(p, list(refused), what)
    return path


@dataclass
class RunResult:
    returncode: int
    tail: list[str]
    last: ProgressLine | None
    losses: list[tuple[int, float]]
    pid: int


def stop_process(proc: subprocess.Popen, grace: float | None = None) -> None:
    """Terminate (SIGTERM to the process group), then kill what is left after ``grace`` seconds."""
    child_process.stop(proc, STOP_GRACE_S if grace is None else grace)


def run_ai_toolkit(checkout: str | os.PathLike, config_path: str | os.PathLike, *,
                   on_progress: Callable[[ProgressLine], None] | None = None,
                   check_interrupt: Callable[[], None] | None = None,
                   on_start: Callable[[int], None] | None = None,
                   job_name: str = "", log_path: str | os.PathLike | None = None,
                   python: str | None = None, poll_s: float = 0.1) -> RunResult:
    """Runs ``<python> <checkout>/run.py <config>`` in the checkout and waits for it.

    ``check_interrupt`` is called every ``poll_s``; when it raises, the child's process group is
    terminated, then killed, and the exception propagates. A non-zero exit raises AIToolkitError with
    the last lines of the child's output. ``on_progress`` gets the training bar's lines (the bar named
    ``job_name``, or any tqdm line that carries a loss)."""
    checkout = validate_checkout(checkout)
    cmd = [python or venv_python(checkout), str(checkout / "run.py"), str(Path(config_path).resolve())]
    try:
        proc = child_process.start(cmd, checkout, merge_stderr=True)
    except OSError as exc:
        raise AIToolkitError(f"Could not start ai-toolkit ({cmd[0]} {cmd[1]}): {exc}") from exc
    if on_start is not None:
        on_start(proc.pid)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    events: collections.deque[ProgressLine] = collections.deque()
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed in finally

    def _line(raw: str) -> None:
        line = raw.rstrip()
        if not line.strip():
            return
        p = parse_progress(line)
        if p is not None and (p.desc == job_name or p.loss is not None):
            events.append(p)
            prev = parse_progress(tail[-1]) if tail else None
            if prev is not None and prev.desc == p.desc:
                tail[-1] = line  # a redrawn bar replaces its previous state in the tail
                return
        tail.append(line)

    assert proc.stdout is not None  # a PIPE
    thread = child_process.read_lines(proc.stdout, _line, sink=log, name="ai-toolkit-output")
    last: ProgressLine | None = None
    losses: list[tuple[int, float]] = []

    def drain() -> None:
        nonlocal last
        while events:
            p = events.popleft()
            last = p
            if p.loss is not None and (not losses or losses[-1][0] != p.step):
                losses.append((p.step, p.loss))
            if on_progress is not None:
                on_progress(p)

    try:
        while proc.poll() is None:
            if check_interrupt is not None:
                check_interrupt()
            drain()
            time.sleep(poll_s)
        thread.join(timeout=10)
        drain()
    finally:
        if proc.poll() is None:  # interrupted or failed here: leave no process behind
            stop_process(proc)
        thread.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        if log is not None:
            log.close()
    result = RunResult(proc.returncode, list(tail), last, losses, proc.pid)
    if proc.returncode != 0:
        shown = "\n".join(result.tail[-20:]) or "(no output)"
        raise AIToolkitError(f"ai-toolkit failed (exit code {proc.returncode}). Its last output:\n{shown}")
    return result


# ---- the produced LoRA ------------------------------------------------------------------------

def find_output(save_root: str | os.PathLike, job_name: str) -> Path | None:
    """ai-toolkit saves ``<training_folder>/<name>/<name>.safetensors`` at the end and
    ``<name>_<step:09d>.safetensors`` every save_every steps: the final file, else the latest step."""
    root = Path(save_root)
    final = root / f"{job_name}.safetensors"
    if final.is_file():
        return final
    steps = []
    for p in root.glob(f"{glob_escape(job_name)}_*.safetensors"):
        m = re.fullmatch(rf"{re.escape(job_name)}_(\d+)\.safetensors", p.name)
        if m:
            steps.append((int(m.group(1)), p))
    if steps:
        return max(steps)[1]
    others = sorted(root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return others[-1] if others else None


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and the offset where the tensor data starts."""
    try:
        return safetensors_files.read_header(path)
    except (OSError, safetensors_files.NotSafetensors) as exc:
        raise AIToolkitError(f"{path} is not a safetensors file ({exc}).") from None


def _with_metadata(src: Path, fout: BinaryIO, metadata: dict[str, str]) -> bool:
    """Copies ``src`` into ``fout`` with ``metadata`` merged into its ``__metadata__``; False (and a plain
    byte copy) when the file's header cannot be read."""
    try:
        header, offset = read_header(src)
    except AIToolkitError:
        header = None
    with open(src, "rb") as fin:
        if header is not None:
            old_meta = header.get("__metadata__")
            meta = {str(k): str(v) for k, v in (old_meta.items() if isinstance(old_meta, dict) else ())}
            meta.update(metadata)
            header["__metadata__"] = meta
            data = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            data += b" " * (-len(data) % 8)  # the data section stays 8-byte aligned
            fout.write(struct.pack("<Q", len(data)) + data)
            fin.seek(offset)
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
    return header is not None


def install_lora(src: str | os.PathLike, loras_root: str | os.PathLike, character: str, prefix: str,
                 metadata: dict[str, str] | None = None) -> tuple[str, Path, bool]:
    """Copies the produced LoRA to ``models/loras/flenwheel/<character>/<prefix>_vN.safetensors`` with the
    next free N, atomically and never overwriting (``workspace.write_new_version``). Returns the name relative
    to models/loras, the path and whether the metadata could be added."""
    meta_ok = False

    def fill(out: BinaryIO) -> None:
        nonlocal meta_ok
        meta_ok = _with_metadata(Path(src), out, dict(metadata or {}))

    dest = workspace.write_new_version(lora_folder(loras_root, character), prefix, fill)
    return workspace.lora_name(character, dest.name), dest, meta_ok


# ---- the whole launch -------------------------------------------------------------------------

@dataclass
class LaunchResult:
    lora_name: str           # relative to models/loras, e.g. flenwheel/anna/char_lora_v2.safetensors
    lora_path: str
    config_path: str
    run_dir: str
    produced: str            # the file ai-toolkit wrote
    steps_done: int | None
    final_loss: float | None
    metadata_added: bool
    losses: list[tuple[int, float]] = field(default_factory=list)

    def summary(self) -> str:
        loss = f", final loss {self.final_loss:.4g}" if self.final_loss is not None else ""
        steps = f" after {self.steps_done} steps" if self.steps_done is not None else ""
        return (f"ai-toolkit trained {self.lora_name}{steps}{loss}. Config: {self.config_path}. "
                f"Run folder: {self.run_dir}.")


def prepare_job(dataset: dict[str, Any] | str | os.PathLike, settings: AIToolkitSettings,
                workspace: str | os.PathLike, loras_root: str | os.PathLike, *,
                freeze_by: str = "ai-toolkit launcher") -> tuple[dict[str, Any], Path, str, dict[str, str]]:
    """Freezes the dataset, picks the LoRA name, writes the config into a new run folder
    ``<workspace>/ai_toolkit_runs/<stamp>/``. Returns (config, config path, job name, provenance metadata)."""
    s = settings.validate()
    dpath = Path(dataset["path"] if isinstance(dataset, dict) else dataset)
    if not dpath.is_dir():
        raise FlenUserError(f"Dataset folder {dpath} does not exist.")
    dataset_entries(dpath, s.kind)  # validates kind / content before anything is written
    info = ds.freeze(dpath, by=freeze_by)
    if not Path(s.base_model).is_dir():
        raise FlenUserError(f"Base model folder {s.base_model} does not exist: put the diffusers folder under "
                            "models/diffusers.")
    name = next_lora_name(loras_root, s.character, LORA_PREFIX[s.kind])
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    run_dir = Path(workspace) / RUNS_DIR / stamp
    run_dir.mkdir(parents=True, exist_ok=False)
    hyper = {k: v for k, v in asdict(s).items() if k not in ("character", "base_model", "transformer_file")}
    base = s.transformer_file or s.base_model  # what the LoRA was trained on
    provenance = {"trainer": "ai-toolkit", "job_kind": s.kind, "base_model": str(base),
                  "base_model_name": Path(base).name, "character": s.character,
                  **({"extras_folder": str(s.base_model)} if s.transformer_file else {}),
                  "dataset_path": str(dpath), "dataset_version": info.get("version", dpath.name),
                  "dataset_hash": info.get("hash"), "dataset_kind": info.get("kind", "character"),
                  "instance_token": info.get("instance_token"), "hyperparameters": hyper, "run_dir": str(run_dir)}
    config = build_config(dpath, s, name, run_dir, extra_meta={
        "flenwheel.dataset_version": str(provenance["dataset_version"]),
        "flenwheel.dataset_hash": str(provenance["dataset_hash"])})
    config_path = write_config(config, run_dir / f"{name}.yaml")
    metadata = {"flenwheel.provenance": json.dumps(provenance, sort_keys=True, default=str),
                "flenwheel.trainer": "ai-toolkit", "flenwheel.base_model": str(base),
                "flenwheel.dataset_version": str(provenance["dataset_version"]),
                "flenwheel.dataset_hash": str(provenance["dataset_hash"]),
                "flenwheel.hyperparameters": json.dumps(hyper, sort_keys=True)}
    return config, config_path, name, metadata


def launch(dataset: dict[str, Any] | str | os.PathLike, settings: AIToolkitSettings, *, checkout: str | os.PathLike,
           workspace: str | os.PathLike, loras_root: str | os.PathLike,
           on_progress: Callable[[ProgressLine], None] | None = None,
           check_interrupt: Callable[[], None] | None = None, on_start: Callable[[int], None] | None = None,
           on_config: Callable[[Path], None] | None = None, freeze_by: str = "ai-toolkit launcher",
           python: str | None = None, refused: list[Any] | tuple = ()) -> LaunchResult:
    """Config → ai-toolkit run → LoRA installed under its FLENwheel name (see the module docstring).
    ``refused``: folders (engines.safe_paths.Root) the checkout must not lie in."""
    checkout = validate_checkout(checkout, refused)
    config, config_path, name, metadata = prepare_job(dataset, settings, workspace, loras_root, freeze_by=freeze_by)
    if on_config is not None:
        on_config(config_path)
    run_dir = config_path.parent
    result = run_ai_toolkit(checkout, config_path, on_progress=on_progress, check_interrupt=check_interrupt,
                            on_start=on_start, job_name=name, log_path=run_dir / "ai_toolkit.log", python=python)
    produced = find_output(run_dir / name, name)
    if produced is None:
        shown = "\n".join(result.tail[-20:]) or "(no output)"
        raise AIToolkitError(f"ai-toolkit finished but wrote no .safetensors into {run_dir / name}. Its last "
                             f"output:\n{shown}")
    steps_done = result.last.step if result.last else None
    metadata["flenwheel.steps_done"] = str(steps_done if steps_done is not None else "")
    metadata["flenwheel.software"] = json.dumps({"python": sys.version.split()[0], "ai_toolkit": str(checkout),
                                                 "ai_toolkit_commit": _git_head(checkout)})
    metadata["flenwheel.ai_toolkit_file"] = produced.name
    rel, dest, meta_ok = install_lora(produced, loras_root, settings.character, LORA_PREFIX[settings.kind], metadata)
    final_loss = result.losses[-1][1] if result.losses else None
    return LaunchResult(rel, str(dest), str(config_path), str(run_dir), str(produced), steps_done, final_loss,
                        meta_ok, result.losses)


def _git_head(checkout: Path) -> str:
    """The checkout's commit, read from .git without running git ('' when unknown)."""
    try:
        head = (checkout / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = checkout / ".git" / head[5:]
            return ref.read_text().strip() if ref.is_file() else head[5:]
        return head
    except OSError:
        return ""


# ---- command line -----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.ai_toolkit",
                                description="Write an ai-toolkit job for a FLENwheel dataset and run it.")
    p.add_argument("--dataset", required=True, help="datasets/vN or edit_pairs/vN folder")
    p.add_argument("--kind", choices=JOB_KINDS, default="flux")
    p.add_argument("--checkout", required=True, help="ai-toolkit checkout (with run.py)")
    p.add_argument("--base-model", required=True, help="diffusers folder of the base model")
    p.add_argument("--transformer-file", default="",
                   help="Qwen only: ComfyUI's diffusion-model file as the transformer (the rest from --base-model)")
    p.add_argument("--character", required=True)
    p.add_argument("--workspace", required=True, help="output/flenwheel/<character> (run folders go here)")
    p.add_argument("--loras", required=True, help="models/loras")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--resolutions", default="512,768,1024")
    p.add_argument("--sample-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--config-only", action="store_true", help="write the config, do not run")
    a = p.parse_args(argv)
    s = AIToolkitSettings(kind=a.kind, base_model=a.base_model, transformer_file=a.transformer_file,
                          character=a.character, steps=a.steps, rank=a.rank,
                          learning_rate=a.lr, resolutions=parse_resolutions(a.resolutions),
                          sample_every=a.sample_every, save_every=a.save_every)
    try:
        if a.config_only:
            _c, path, _n, _m = prepare_job(a.dataset, s, a.workspace, a.loras, freeze_by="training.ai_toolkit CLI")
            print(path)
            return 0

        def show(pl: ProgressLine) -> None:
            loss = f" loss {pl.loss:.4g}" if pl.loss is not None else ""
            print(f"step {pl.step}/{pl.total}{loss}", flush=True)

        r = launch(a.dataset, s, checkout=a.checkout, workspace=a.workspace, loras_root=a.loras, on_progress=show,
                   freeze_by="training.ai_toolkit CLI")
        print(r.summary())
        return 0
    except FlenUserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
