"""The shared core of FLENwheel's LoRA trainers (FLUX character LoRA, Qwen-Image-Edit editor LoRA).

What every trainer gets from here:

* **Config** — dataclasses read from YAML or JSON, validated with messages that name the key, what is
  wrong and what to write instead (unknown keys get a "did you mean").
* **Memory** — latents and text embeddings are encoded once and cached (in memory and in the run
  folder), the VAE and text encoders are then released, so the peak is the transformer's; base in bf16,
  fp32 or NF4 (bitsandbytes, CUDA only); peft LoRA on the attention projections (q/k/v/out, plus any
  extra modules); gradient checkpointing; 8-bit AdamW on CUDA, torch AdamW elsewhere.
* **Loss** — rectified-flow matching: ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``; ``t`` from one of
  the samplers of ``sample_t`` (logit-normal by default), optionally weighted by ``loss_weights``; the learning
  rate per step from ``lr_at`` (constant by default, warmup, cosine, linear); optional EMA of the LoRA weights,
  saved beside it as ``<name>.ema.safetensors``; several resolutions, each with its aspect buckets.
* **Determinism and resume** — data order, noise and timesteps of step ``s`` are functions of
  ``(seed, s)``; a checkpoint (every N steps, written to a temp folder and renamed) holds the LoRA
  weights, the optimizer state (safetensors for tensors, JSON for the rest: no pickle), the RNG states,
  the step and the epoch's data order. A run resumed from its latest checkpoint ends with the same LoRA
  as a run that never stopped.
* **Reporting** — one JSON object per line on stdout (``{"event": "step", ...}``) for the launcher node,
  a loss log (``loss.jsonl``: loss, learning rate, times, bucket and items of every step), TensorBoard event
  files, a loss-curve image at the end and sample images every N steps from fixed prompts and seeds.
* **Output** — ``<loras>/flenwheel/<character>/<prefix>_vN.safetensors``, never overwriting, diffusers
  key format (``transformer.<module>.lora_A/B.weight``) with ``lora_alpha == rank`` (an ``alpha`` other
  than the rank is folded into ``lora_B``), provenance in the safetensors metadata.

Plain Python: nothing here imports ComfyUI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, get_args, get_origin, get_type_hints

import numpy as np
import torch
import torch.utils.checkpoint

from engines.atomic_files import atomic_write, sha256_file, write_new_file
from engines.diffusers_folder import PRECISIONS, nf4_config
from engines.errors import FlenUserError
from engines.fused_ops import fuse_rms_norms, use_flux_rope_processor
from engines.png_files import png_bytes
from engines.workspace import loras_dir, write_new_version

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

OPTIMIZERS = ("auto", "adamw8bit", "adamw")
# Names as kohya sd-scripts / musubi-tuner spell them (--timestep_sampling, --weighting_scheme, --lr_scheduler).
TIMESTEP_SAMPLING = ("logit_normal", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CHECKPOINTS_DIR = "checkpoints"
LOSS_LOG = "loss.jsonl"
DONE_FILE = "done.json"
CACHE_DIR = "cache"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"
LOSS_CURVE = "loss_curve.png"
EMA_SUFFIX = ".ema.safetensors"  # char_lora_v3.safetensors → char_lora_v3.ema.safetensors, beside it
BEST_SUFFIX = ".best.safetensors"  # the weights of the sample step with the best identity score, beside it
EVENT_KEY = "flen_event"  # every progress line on stdout is a JSON object with this key (nodes/training_nodes.py
                          # parses them)


class ConfigError(FlenUserError):
    """A training config that cannot run: the message names the key and what to change."""


# ---- configuration ----------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Settings shared by both trainers. Every field may appear in the YAML/JSON config file."""

    model: str = ""                    # diffusers pipeline folder of the base model
    files: dict[str, str] = field(default_factory=dict)  # or ComfyUI's split files of it (engines.split_files)
    dataset: str = ""                  # dataset / edit-pair version folder (engines.dataset layout)
    output_dir: str = ""               # ComfyUI's models/loras (the LoRA goes to flenwheel/<character>/)
    character: str = ""                # default: the dataset's character
    run_dir: str = ""                  # checkpoints, cache, samples, loss log; default: <workspace>/training/<name>
    precision: str = "bf16"
    device: str = "auto"
    rank: int = 16
    alpha: float = 0.0                 # 0: equal to rank
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    extra_target_modules: list[str] = field(default_factory=list)
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    steps: int = 1000
    batch_size: int = 1
    seed: int = 0
    resolution: int = 512
    resolutions: list[int] = field(default_factory=list)  # several in one run, e.g. [512, 768, 1024]; empty: resolution
    bucket_multiple: int = 64
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0            # logit_normal: t = sigmoid(N(logit_mean, logit_std))
    logit_std: float = 1.0
    sigmoid_scale: float = 1.0         # sigmoid, shift, flux_shift: t = sigmoid(sigmoid_scale * N(0, 1)), shifted
    discrete_flow_shift: float = 3.0   # shift: t' = s t / (1 + (s - 1) t)
    weighting_scheme: str = "none"     # loss weight per sample by its time: none, sigma_sqrt, cosmap
    guidance: float = 1.0
    gradient_checkpointing: bool = True
    # how many transformer blocks recompute their activations in backward: -1 every block; fewer is faster and
    # holds more memory (FLUX at 1024 uses 8.3 of 24 GiB with every block recomputed)
    checkpoint_blocks: int = -1
    # torch.compile each transformer block (regional compilation: FLUX's 57 blocks share two compiled graphs)
    # so that the elementwise work around the matmuls (norms, modulation, LoRA scaling, casts) is fused; the
    # first steps pay the compilation (tens of seconds on a GPU)
    compile_blocks: bool = False
    optimizer: str = "auto"
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    resume: bool = True
    sample_every: int = 250            # 0: no samples
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 20
    sample_size: int = 0               # 0: resolution
    sample_seed: int = 42
    sample_shift: float = 3.0
    init_lora: str = ""                # phased training: start from this LoRA (same rank and modules)
    max_sequence_length: int = 512
    memory_cap_gb: float = 0.0         # CUDA only: cap this process' VRAM (0: no cap)
    stop_at_step: int = 0              # stop after this step as if interrupted (tests, time-boxed runs)
    log_every: int = 1
    ema: bool = False                  # also save an exponential moving average of the LoRA weights
    ema_decay: float = 0.99
    tensorboard: bool = True           # event files in <run_dir>/tensorboard (needs the tensorboard package)

    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha else float(self.rank)

    def modules(self) -> list[str]:
        return list(dict.fromkeys([*self.target_modules, *self.extra_target_modules]))

    def all_resolutions(self) -> list[int]:
        return list(dict.fromkeys(self.resolutions)) if self.resolutions else [self.resolution]


_CHOICES = {"precision": PRECISIONS, "optimizer": OPTIMIZERS, "timestep_sampling": TIMESTEP_SAMPLING,
            "device": DEVICES, "weighting_scheme": WEIGHTING_SCHEMES, "lr_scheduler": LR_SCHEDULERS}
_RANGES: dict[str, tuple[float, float]] = {
    "rank": (1, 1024), "alpha": (0, 1e6), "learning_rate": (1e-8, 1.0), "steps": (1, 10_000_000),
    "batch_size": (1, 64), "seed": (0, 2**32 - 1), "resolution": (16, 4096), "bucket_multiple": (2, 256),
    "guidance": (0, 100), "weight_decay": (0, 1), "max_grad_norm": (0, 1e6), "checkpoint_every": (0, 10_000_000),
    "keep_checkpoints": (1, 1000), "sample_every": (0, 10_000_000), "sample_steps": (1, 200),
    "sample_size": (0, 4096), "sample_seed": (0, 2**32 - 1), "sample_shift": (0.1, 100),
    "max_sequence_length": (8, 4096), "memory_cap_gb": (0, 1e4), "stop_at_step": (0, 10_000_000),
    "log_every": (1, 1_000_000), "lr_warmup_steps": (0, 10_000_000), "ema_decay": (0.0, 0.99999),
    "checkpoint_blocks": (-1, 10_000),
    "logit_mean": (-10, 10), "logit_std": (0.01, 10), "sigmoid_scale": (0.01, 10), "discrete_flow_shift": (0.01, 100),
}
_REQUIRED = ("model", "dataset", "output_dir")


def _type_name(tp: Any) -> str:
    return {int: "a whole number", float: "a number", str: "a text", bool: "true or false"}.get(
        tp, "a list of texts" if get_origin(tp) is list else str(tp))


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    if get_origin(tp) is list:
        inner = get_args(tp)[0]
        if inner is int:
            return _int_list(key, value, where)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, inner) for v in value):
            raise ConfigError(f"{where}: '{key}' must be a list of texts, got {value!r}.")
        return list(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: '{key}' must be a whole number, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}.")
        return float(value)
    if get_origin(tp) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(f"{where}: '{key}' must be a mapping of texts (component: file path), got {value!r}.")
        return dict(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a text, got {value!r}.")
        return value
    return value


def _int_list(key: str, value: Any, where: str) -> list[int]:
    """A list of whole numbers, also written as one number or as text: "512, 768, 1024"."""
    if isinstance(value, str):
        parts = [v.strip() for v in value.replace(";", ",").split(",") if v.strip()]
        if not all(p.isdigit() for p in parts):
            raise ConfigError(f"{where}: '{key}' must be whole numbers separated by commas (e.g. 512,768,1024), "
                              f"got {value!r}.")
        return [int(p) for p in parts]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ConfigError(f"{where}: '{key}' must be a list of whole numbers (e.g. [512, 768, 1024]), got {value!r}.")


def config_from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Builds and validates a config dataclass from a mapping; raises ConfigError with a clear message."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the config must be a mapping of keys to values (got {type(data).__name__}).")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), names, n=1)
            parts.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}. "
                          f"Known keys: {', '.join(names)}.")
    values = {k: _coerce(k, v, hints[k], where) for k, v in data.items()}
    cfg = cls(**values)
    validate_config(cfg, where)
    return cfg


def validate_config(cfg: Any, where: str = "config") -> None:
    for key in _REQUIRED:
        if key == "model" and cfg.files:
            continue
        if not getattr(cfg, key):
            raise ConfigError(f"{where}: '{key}' is required ({_describe_required(key)}).")
    for key, choices in {**_CHOICES, **getattr(cfg, "CHOICES", {})}.items():
        value = getattr(cfg, key)
        if value not in choices:
            raise ConfigError(f"{where}: '{key}' is '{value}'; choose one of {', '.join(choices)}.")
    for key, (lo, hi) in {**_RANGES, **getattr(cfg, "RANGES", {})}.items():
        value = getattr(cfg, key)
        if not lo <= value <= hi:
            raise ConfigError(f"{where}: '{key}' is {value}; it must be between {lo:g} and {hi:g}.")
    if not cfg.modules():
        raise ConfigError(f"{where}: 'target_modules' is empty; LoRA needs at least one module, e.g. to_q.")
    if cfg.resolution % cfg.bucket_multiple:
        raise ConfigError(f"{where}: 'resolution' {cfg.resolution} is not a multiple of 'bucket_multiple' "
                          f"{cfg.bucket_multiple}.")
    for res in cfg.resolutions:
        if not 16 <= res <= 4096 or res % cfg.bucket_multiple:
            raise ConfigError(f"{where}: 'resolutions' has {res}; each must be between 16 and 4096 and a multiple "
                              f"of 'bucket_multiple' {cfg.bucket_multiple}.")
    if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps:
        raise ConfigError(f"{where}: 'lr_warmup_steps' is {cfg.lr_warmup_steps} but 'lr_scheduler' is 'constant', "
                          "which has no warmup; choose 'constant_with_warmup' (or cosine / linear), or set "
                          "lr_warmup_steps to 0.")
    if cfg.lr_warmup_steps >= cfg.steps and cfg.lr_scheduler != "constant":
        raise ConfigError(f"{where}: 'lr_warmup_steps' ({cfg.lr_warmup_steps}) must be fewer than 'steps' "
                          f"({cfg.steps}).")
    if cfg.sample_size and cfg.sample_size % cfg.bucket_multiple:
        raise ConfigError(f"{where}: 'sample_size' {cfg.sample_size} is not a multiple of 'bucket_multiple' "
                          f"{cfg.bucket_multiple}.")


def _describe_required(key: str) -> str:
    return {"model": "the diffusers folder of the base model, or 'files': its ComfyUI split files",
            "dataset": "a dataset version folder, e.g. "
            "output/flenwheel/<character>/datasets/v1", "output_dir": "ComfyUI's models/loras folder"}[key]


def load_config_file(cls: type, path: str | os.PathLike) -> Any:
    """Reads a YAML (.yaml/.yml) or JSON config file into ``cls``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {p} does not exist.")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise their own types
        raise ConfigError(f"Config file {p} is not valid {p.suffix.lstrip('.').upper() or 'JSON'}: {exc}") from None
    return config_from_dict(cls, data if data is not None else {}, where=f"config {p.name}")


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---- progress lines ----------------------------------------------------------------------------------

def emit(event: str, **data: Any) -> None:
    """One progress line on stdout: a JSON object the launcher node parses."""
    print(json.dumps({EVENT_KEY: event, **data}, default=str), flush=True)


# ---- files -------------------------------------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, data)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- devices, precision, memory ----------------------------------------------------------------------

def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for, but no CUDA GPU is visible to this process.")
        return torch.device("cuda")
    return torch.device("cpu")


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.precision == "nf4" and device.type != "cuda":
        raise ConfigError("precision 'nf4' (4-bit bitsandbytes base, QLoRA) needs an NVIDIA GPU with CUDA; this "
                          f"run is on '{device.type}'. Use precision 'bf16' or 'fp32' here.")
    return torch.float32 if cfg.precision == "fp32" else torch.bfloat16


def check_compile_support(device: torch.device, backend: str | None = None) -> None:
    """compile_blocks with inductor needs Triton on a GPU and a C++ compiler on the CPU; without them torch.compile
    fails only at the first step, after the caching, with an error that names neither. Said before any work."""
    import importlib.util
    import shutil

    if (backend or COMPILE_BACKEND) != "inductor":
        return
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ConfigError("compile_blocks: true needs Triton, which this Python does not have (on Windows: pip "
                          "install triton-windows; on Linux it comes with torch's CUDA builds). Install it or set "
                          "compile_blocks: false.")
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "cl")
                                        if c):
        raise ConfigError("compile_blocks: true on the CPU needs a C++ compiler (g++, clang++ or MSVC's cl) on the "
                          "PATH; install one or set compile_blocks: false.")


def setup_device(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.compile_blocks:
        check_compile_support(device)
    if device.type == "cuda":
        # cuDNN SDPA backward failed on FLUX shapes (torch 2.11, field notes); flash/mem-efficient are fine.
        torch.backends.cuda.enable_cudnn_sdp(False)
        if cfg.memory_cap_gb:
            index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" has none
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.memory_cap_gb * 1024**3 / total), index)


def release_memory(device: torch.device | None = None) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quantization_config(cfg: TrainConfig, dtype: torch.dtype):
    if cfg.precision != "nf4":
        return None
    try:
        return nf4_config(dtype)
    except ImportError as exc:  # pragma: no cover
        raise ConfigError(f"precision 'nf4' needs bitsandbytes ({exc}); pip install bitsandbytes.") from exc


def split_file_dtypes(cfg: TrainConfig, dtype: torch.dtype):
    """How the trainers read ComfyUI's split files: fp8 weights stay fp8 (the frozen base), the rest ``dtype``."""
    from engines.split_files import FileDtypes

    if cfg.precision == "nf4":
        raise ConfigError("precision 'nf4' quantises a diffusers folder with bitsandbytes; ComfyUI's split files "
                          "train in 'bf16' (an fp8_e4m3fn or fp8 scaled file then trains on its fp8 weights), 'fp8' "
                          "(a 16-bit file's frozen base quantised to e4m3 while loading) or 'fp32'. Choose bf16 or "
                          "fp8, or pick the diffusers folder for nf4.")
    return FileDtypes(dtype, quantise=cfg.precision == "fp8", keep_fp8=cfg.precision != "fp32")


def load_transformer(model_cls, cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The base transformer of ``cfg.model``: NF4 (bitsandbytes places it on the GPU itself) or ``dtype`` on
    ``device``; or from ``cfg.files['diffusion_model']`` (ComfyUI's split file)."""
    if cfg.files:
        from engines import split_files as sf

        load = sf.load_flux_transformer if model_cls.__name__.startswith("Flux") else sf.load_qwen_transformer
        model = load(cfg.files["diffusion_model"], split_file_dtypes(cfg, dtype)).to(device)
        fuse_for_training(model)
        return model
    if cfg.precision == "fp8":
        # the e4m3 base is read from ComfyUI's split files; a diffusers folder quantises through bitsandbytes
        raise ConfigError("precision 'fp8' quantises ComfyUI's split files (connect a split-file loader, or give "
                          "'files'); for the diffusers folder choose 'nf4' (4-bit, fits 24 GB) or 'bf16'.")
    q = quantization_config(cfg, dtype)
    kwargs = {"quantization_config": q} if q is not None else {}
    model = model_cls.from_pretrained(cfg.model, subfolder="transformer", dtype=dtype, **kwargs)
    if q is None:
        model.to(device)
    fuse_for_training(model)
    return model


def fuse_for_training(model: torch.nn.Module) -> None:
    """ComfyUI's fused kernels where diffusers runs several (engines/fused_ops.py), forward and backward."""
    fuse_rms_norms(model)
    use_flux_rope_processor(model)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks diffusers' checkpointing wraps, in call order (FLUX: 19 double then 38 single; Qwen: 60)."""
    blocks: list[torch.nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        group = getattr(model, name, None)
        if isinstance(group, torch.nn.ModuleList):
            blocks.extend(group)
    return blocks


def _checkpointed_call(module: torch.nn.Module, *args: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def _plain_call(module: torch.nn.Module, *args: Any) -> Any:
    return module(*args)


COMPILE_BACKEND = "inductor"    # the tests compare compiled and eager curves with "aot_eager" (no C compiler)


def block_checkpointing(model: torch.nn.Module, n: int, compiled: bool = False) -> Callable[..., Any]:
    """A gradient_checkpointing_func for diffusers that recomputes only the first ``n`` blocks (-1: all) and runs
    the others plainly, keeping their activations: recomputing a block costs one more forward of it, so
    checkpointing only as many blocks as the memory needs saves that time on the rest.

    ``compiled``: each block call goes through torch.compile with the checkpoint inside the compiled region
    (a block compiled on its own and then checkpointed recompiles in the recomputation and saves other
    tensors than its forward did). Blocks of one class share a graph: torch passes module parameters as
    inputs."""
    blocks = transformer_blocks(model)
    chosen = {id(b) for b in (blocks if n < 0 else blocks[:n])}
    ckpt_call, plain_call = _checkpointed_call, _plain_call
    if compiled:
        ckpt_call = torch.compile(_checkpointed_call, backend=COMPILE_BACKEND, dynamic=False)
        plain_call = torch.compile(_plain_call, backend=COMPILE_BACKEND, dynamic=False)

    def run(module: torch.nn.Module, *args: Any) -> Any:
        return (ckpt_call if id(module) in chosen else plain_call)(module, *args)

    return run


def compile_blocks(model: torch.nn.Module) -> int:
    """Compiles every transformer block in place, for runs without gradient checkpointing (with it,
    block_checkpointing(compiled=True) compiles the checkpointed calls); returns how many."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(backend=COMPILE_BACKEND, dynamic=False)
    return len(blocks)


def software_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "peft", "transformers", "safetensors", "bitsandbytes"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # not installed
            out[name] = "not installed"
    try:
        import subprocess

        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            out["flenwheel_git"] = rev.stdout.strip()
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return out


# ---- buckets -----------------------------------------------------------------------------------------

ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)


def bucket_sizes(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution² pixels, sides multiples of ``multiple``."""
    out = []
    for ar in ASPECTS:
        w = max(multiple, round(math.sqrt(resolution * resolution * ar) / multiple) * multiple)
        h = max(multiple, round(math.sqrt(resolution * resolution / ar) / multiple) * multiple)
        if (w, h) not in out:
            out.append((w, h))
    return out


def pick_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ar = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def fit_image(image, size: tuple[int, int]):
    """Resizes (cover) and centre-crops a PIL image to ``size`` (width, height)."""
    from PIL import Image

    w, h = size
    scale = max(w / image.width, h / image.height)
    nw, nh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
    image = image.convert("RGB").resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - w) // 2, (nh - h) // 2
    return image.crop((left, top, left + w, top + h))


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB → [1, 3, H, W] in -1..1."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1).unsqueeze(0)


def tensor_to_image(x: torch.Tensor):
    """[3, H, W] in -1..1 → PIL RGB."""
    from PIL import Image

    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


# ---- the task interface ------------------------------------------------------------------------------

@dataclass
class Example:
    """One cached training example: target latents (unpacked [C, h, w]) + conditioning tensors."""

    key: str
    bucket: tuple[int, int]
    latents: torch.Tensor
    cond: dict[str, torch.Tensor]
    prior: bool = False  # a class image (prior preservation)


class TrainTask:
    """What a trainer provides: caching, the transformer, one prediction, sampling and decoding."""

    prefix = "lora"          # output file prefix: char_lora / qwen_lora
    architecture = ""        # for metadata
    trainer_name = ""        # python -m name
    prior_loss_weight = 1.0
    caption_dropout_rate = 0.0  # a task that drops captions sets null_cond (the empty caption's cond) in encode()
    character = ""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.null_cond: dict[str, torch.Tensor] | None = None

    def run_dir(self) -> Path:
        raise NotImplementedError

    # identity of what is cached (cache files are reused only when this matches)
    def cache_key(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, device: torch.device, dtype: torch.dtype) -> tuple[list[Example], list[Example]]:
        """(training examples, sample examples) — loads the VAE and encoders, encodes, releases them."""
        raise NotImplementedError

    def load_transformer(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        raise NotImplementedError

    def predict(self, transformer: torch.nn.Module, noisy: torch.Tensor, t: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity prediction for unpacked noisy latents [B, C, h, w] at times t [B] → [B, C, h, w]."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, device: torch.device, dtype: torch.dtype):
        """Unpacked latents [1, C, h, w] → PIL image (loads the VAE on first use, keeps it on the CPU)."""
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        return {}

    def identity_scorer(self) -> Callable[[list[Any]], dict[str, Any]] | None:
        """None, or a function of the sample images (PIL) of one sample step → {"score": higher is better,
        ...details}: the trainer keeps the weights of the best-scoring step."""
        return None


# ---- optimizer state without pickle ------------------------------------------------------------------

def _flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key_json(k), _flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    return obj


def _key_json(k: Any) -> Any:
    return {"int": k} if isinstance(k, int) else k


def _unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {(k["int"] if isinstance(k, dict) else k): _unflatten_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, dict) and "__list__" in obj:
        items = [_unflatten_state(v, tensors) for v in obj["__list__"]]
        return tuple(items) if obj.get("tuple") else items
    return obj


def state_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten_state(state, "s", tensors)
    return tensors, structure


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()  # legacy=True (the default): the tuple form
    assert isinstance(np_state, tuple)
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py = random.getstate()
    return tensors, {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                     "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    n = info["numpy"]
    np.random.set_state((n[0], tensors["numpy_keys"].numpy().astype(np.uint32), n[1], n[2], n[3]))
    p = info["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ---- the trainer -------------------------------------------------------------------------------------

def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))


def epoch_order(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches (lists of example indices) of one epoch: same-bucket batches, shuffled by (seed, epoch)."""
    g = step_generator(seed, epoch, salt=1)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i in torch.randperm(len(examples), generator=g).tolist():
        by_bucket.setdefault(examples[i].bucket, []).append(i)
    batches = [idx[k:k + batch_size] for _, idx in sorted(by_bucket.items()) for k in range(0, len(idx), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def flux_mu(seq_len: int) -> float:
    """FLUX's resolution-dependent shift (the pipeline's calculate_shift): 0.5 at 256 image tokens, 1.15 at 4096,
    linear in between and beyond."""
    return 0.5 + (1.15 - 0.5) * (seq_len - 256) / (4096 - 256)


def sample_t(cfg: TrainConfig, n: int, g: torch.Generator, seq_len: int = 256) -> torch.Tensor:
    """Times (sigmas) of one batch, in (0, 1): 1 is pure noise. ``seq_len``: image tokens (for flux_shift).

    uniform       t ~ U(0, 1)
    logit_normal  t = sigmoid(N(logit_mean, logit_std))        (SD3's default; the default here)
    sigmoid       t = sigmoid(sigmoid_scale · N(0, 1))
    shift         sigmoid, then t' = s·t / (1 + (s - 1)·t), s = discrete_flow_shift: more time at high noise
    flux_shift    sigmoid, then FLUX's time shift with mu from the image size: bigger images, noisier times
    """
    kind = cfg.timestep_sampling
    if kind == "uniform":
        return torch.rand(n, generator=g)
    z = torch.randn(n, generator=g)
    if kind == "logit_normal":
        return torch.sigmoid(z * cfg.logit_std + cfg.logit_mean)
    t = torch.sigmoid(z * cfg.sigmoid_scale)
    if kind == "shift":
        s = cfg.discrete_flow_shift
        return s * t / (1 + (s - 1) * t)
    if kind == "flux_shift":
        mu = math.exp(flux_mu(seq_len))
        return mu / (mu + (1 / t - 1))
    return t


def loss_weights(scheme: str, t: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights by time, as diffusers' compute_loss_weighting_for_sd3 names them; None: plain mean.

    sigma_sqrt  1 / t²: stresses the low-noise end (detail); large near t = 0, so keep the sampler away from it
    cosmap      2 / (π (1 - 2t + 2t²)): the cosine-map weighting of SD3's paper, mildly favouring mid times
    """
    if scheme == "sigma_sqrt":
        return t.float().clamp_min(1e-3) ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * t.float() + 2 * t.float() ** 2))
    return None


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of (1-based) ``step``: a pure function of the step, so a resumed run follows the same
    schedule. Warmup rises linearly to the full rate at step ``lr_warmup_steps``; cosine and linear then decay
    towards 0 at the last step."""
    base, warm, total = cfg.learning_rate, cfg.lr_warmup_steps, cfg.steps
    if cfg.lr_scheduler == "constant":
        return base
    if step <= warm:
        return base * step / warm
    if cfg.lr_scheduler == "constant_with_warmup":
        return base
    progress = (step - warm - 1) / max(1, total - warm)
    if cfg.lr_scheduler == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base * (1 - progress)


def caption_dropout_mask(seed: int, step: int, n: int, rate: float) -> list[bool]:
    """Which of the ``n`` examples of ``step`` train with an empty caption: seeded by (seed, step)."""
    if rate <= 0:
        return [False] * n
    g = step_generator(seed, step, salt=3)
    return (torch.rand(n, generator=g) < rate).tolist()


class Trainer:
    """Runs one training run of a TrainTask. ``run()`` returns the path of the new LoRA (or None when the
    run stopped early at ``stop_at_step``)."""

    def __init__(self, task: TrainTask, run_dir: Path, emit_fn: Callable[..., None] = emit) -> None:
        self.task = task
        self.cfg = task.cfg
        self.run_dir = Path(run_dir)
        self.emit = emit_fn
        self.device = pick_device(self.cfg)
        self.dtype = compute_dtype(self.cfg, self.device)
        self.transformer: torch.nn.Module | None = None
        self.params: list[tuple[str, torch.nn.Parameter]] = []
        self.ema: list[torch.Tensor] | None = None  # aligned with self.params
        self.identity: list[dict[str, Any]] = []     # one record per scored sample step
        self.best: dict[str, Any] | None = None      # {"step", "score"} of the best of them
        self.best_sd: dict[str, torch.Tensor] | None = None
        self.eval_start = self.eval_end = float("nan")

    # -- cache
    def _cached_examples(self) -> tuple[list[Example], list[Example]]:
        key = self.task.cache_key()
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        folder = self.run_dir / CACHE_DIR
        tensors_path, index_path = folder / f"{digest}.safetensors", folder / f"{digest}.json"
        if tensors_path.is_file() and index_path.is_file():
            try:
                cached = load_tensors(tensors_path)
                index = json.loads(index_path.read_text())
                null = index.get("null")
                self.task.null_cond = {k: cached[f"null.cond.{k}"] for k in null} if null else None
                self.emit("cache", reused=True, examples=len(index["train"]))
                return ([_example_from(e, cached) for e in index["train"]],
                        [_example_from(e, cached) for e in index["samples"]])
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache is rebuilt
        t0 = time.time()
        train, samples = self.task.encode(self.device, self.dtype)
        release_memory(self.device)
        tensors: dict[str, torch.Tensor] = {}
        index = {"key": key, "train": [_example_to(e, "t", i, tensors) for i, e in enumerate(train)],
                 "samples": [_example_to(e, "s", i, tensors) for i, e in enumerate(samples)]}
        if self.task.null_cond:
            index["null"] = sorted(self.task.null_cond)
            tensors.update({f"null.cond.{k}": v for k, v in self.task.null_cond.items()})
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(tensors_path, tensors)
        atomic_write_bytes(index_path, json.dumps(index, default=str).encode())
        self.emit("cache", reused=False, examples=len(train), seconds=round(time.time() - t0, 2))
        return train, samples

    # -- LoRA
    def _add_lora(self) -> None:
        from peft import LoraConfig

        cfg = self.cfg
        # load_transformer gives a diffusers model: a ModelMixin, with peft's add_adapter.
        transformer = cast("ModelMixin", self._model())
        transformer.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        # peft annotates lora_alpha as int, but only divides it by r: a fractional alpha is valid.
        transformer.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.effective_alpha(),  # type: ignore[arg-type]
                                           init_lora_weights=True, target_modules=cfg.modules()))
        self.params = sorted(((n, p) for n, p in transformer.named_parameters() if p.requires_grad),
                             key=lambda x: x[0])
        if not self.params:
            raise ConfigError(f"None of target_modules {cfg.modules()} exist in this transformer.")
        for _, p in self.params:
            p.data = p.data.float()  # LoRA weights train in fp32 whatever the base precision
        if cfg.compile_blocks:  # traced NF4 layers made compiled blocks hold 10 GiB more: one opaque op each
            from training.opaque_nf4 import make_nf4_opaque

            make_nf4_opaque(transformer)
        if cfg.gradient_checkpointing and cfg.checkpoint_blocks != 0:
            transformer.enable_gradient_checkpointing(gradient_checkpointing_func=block_checkpointing(
                transformer, cfg.checkpoint_blocks, compiled=cfg.compile_blocks))
        elif cfg.compile_blocks:
            compile_blocks(transformer)
        transformer.train()

    def _model(self) -> torch.nn.Module:
        """The transformer being trained; run() loads it before anything else uses it."""
        if self.transformer is None:
            raise RuntimeError("Trainer.run() loads the transformer first")
        return self.transformer

    def lora_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def _set_lora_state(self, sd: dict[str, torch.Tensor], what: str) -> None:
        from peft.utils import set_peft_model_state_dict

        own = self.lora_state()
        missing = sorted(set(own) - set(sd))
        extra = sorted(set(sd) - set(own))
        wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or extra or wrong:
            detail = (f"its shape differs for {wrong[0]}: {tuple(sd[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)} "
                      "(another rank?)" if wrong else
                      f"{len(missing)} of this run's LoRA weights are not in it (e.g. {(missing or extra)[0]})")
            raise ConfigError(f"{what} does not match this run's LoRA (rank {self.cfg.rank}, modules "
                              f"{self.cfg.modules()}): {detail}.")
        with torch.no_grad():
            set_peft_model_state_dict(self.transformer, {k: v.float() for k, v in sd.items()})
        for _, p in self.params:
            p.data = p.data.float()

    def _load_init_lora(self) -> dict[str, Any]:
        path = Path(self.cfg.init_lora)
        if not path.is_file():
            raise ConfigError(f"init_lora {path} does not exist (phased training starts from an earlier LoRA, "
                              "e.g. models/loras/flenwheel/<character>/char_lora_v1.safetensors).")
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                sd = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError for a short file)
            raise ConfigError(f"init_lora {path.name} is not a readable .safetensors file ({exc}): it is damaged or "
                              "cut short. Choose another LoRA or leave init_lora empty.") from None
        sd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
        # our files fold alpha into lora_B with lora_alpha == rank: undo this run's own scale
        scale = self.cfg.effective_alpha() / self.cfg.rank
        sd = {k: (v / scale if ".lora_B." in k else v) for k, v in sd.items()}
        self._set_lora_state(sd, f"init_lora {path.name}")
        return {"file": path.name, "sha256": sha256_file(path), "version": meta.get("flen_version", ""),
                "dataset_version": meta.get("dataset_version", "")}

    # -- optimizer
    def _optimizer(self) -> tuple[torch.optim.Optimizer, str]:
        cfg = self.cfg
        params = [p for _, p in self.params]
        name = cfg.optimizer
        if name == "auto":
            name = "adamw8bit" if self.device.type == "cuda" else "adamw"
        if name == "adamw8bit":
            if self.device.type != "cuda":
                raise ConfigError("optimizer 'adamw8bit' (bitsandbytes) needs CUDA; use 'adamw' or 'auto' on CPU.")
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay), name
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay), name

    # -- checkpoints
    def checkpoints(self) -> list[Path]:
        folder = self.run_dir / CHECKPOINTS_DIR
        if not folder.is_dir():
            return []
        return sorted((p for p in folder.glob("step_*") if p.is_dir() and (p / "state.json").is_file()),
                      key=lambda p: int(p.name[5:]))

    def _save_checkpoint(self, step: int, opt: torch.optim.Optimizer, order: list[list[int]], epoch: int) -> Path:
        folder = self.run_dir / CHECKPOINTS_DIR
        final = folder / f"step_{step:08d}"
        tmp = folder / f".tmp-step_{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_tensors(tmp / "lora.safetensors", self.lora_state())
        opt_tensors, opt_structure = state_to_files(opt.state_dict())
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        rng_tensors, rng_info = rng_state()
        save_tensors(tmp / "rng.safetensors", rng_tensors)
        if self.ema is not None:
            save_tensors(tmp / "ema.safetensors", {n: e for (n, _), e in zip(self.params, self.ema, strict=True)})
        if self.best_sd is not None:
            save_tensors(tmp / "best.safetensors", self.best_sd)
        state = {"step": step, "epoch": epoch, "order": order, "optimizer": opt_structure, "rng": rng_info,
                 "param_names": [n for n, _ in self.params], "eval_start": self.eval_start,
                 "identity": self.identity, "best": self.best,
                 "config": config_dict(self.cfg), "saved_at": time.time()}
        atomic_write_bytes(tmp / "state.json", json.dumps(state, default=str).encode())  # written last: complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoints()[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_checkpoint(self, ckpt: Path, opt: torch.optim.Optimizer) -> dict[str, Any]:
        state = json.loads((ckpt / "state.json").read_text())
        if state["param_names"] != [n for n, _ in self.params]:
            raise ConfigError(f"Checkpoint {ckpt} was made with other LoRA modules or rank; delete the run folder "
                              f"{self.run_dir} or set resume: false.")
        self._set_lora_state(load_tensors(ckpt / "lora.safetensors"), f"checkpoint {ckpt.name}")
        opt_state = _unflatten_state(state["optimizer"], load_tensors(ckpt / "optimizer.safetensors"))
        opt.load_state_dict(opt_state)
        set_rng_state(load_tensors(ckpt / "rng.safetensors"), state["rng"])
        if self.ema is not None:
            if not (ckpt / "ema.safetensors").is_file():
                raise ConfigError(f"Checkpoint {ckpt} has no EMA weights (it was saved with ema off); set resume: "
                                  "false to start over with ema, or turn ema off to go on.")
            saved = load_tensors(ckpt / "ema.safetensors")
            self.ema = [saved[n].to(p.device, torch.float32) for n, p in self.params]
        self.identity, self.best = list(state.get("identity") or []), state.get("best")
        if self.best is not None and (ckpt / "best.safetensors").is_file():
            self.best_sd = load_tensors(ckpt / "best.safetensors")
        return state

    # -- one step
    def _loss(self, batch: list[Example], step: int,
              drop: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(flow-matching loss of ``batch`` at ``step``, its times). ``drop``: examples whose caption is
        replaced by the empty caption (caption dropout)."""
        cfg = self.cfg
        g = step_generator(cfg.seed, step)
        x0 = torch.stack([e.latents for e in batch]).to(self.device, torch.float32)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        t = sample_t(cfg, x0.shape[0], g, seq_len=(x0.shape[-2] // 2) * (x0.shape[-1] // 2)).to(self.device)
        tt = t.view(-1, *([1] * (x0.dim() - 1)))
        noisy = ((1 - tt) * x0 + tt * noise).to(self.dtype)
        conds = [{**e.cond, **self.task.null_cond} if drop and drop[i] and self.task.null_cond else e.cond
                 for i, e in enumerate(batch)]
        cond = {k: torch.stack([c[k] for c in conds]).to(self.device) for k in batch[0].cond}
        pred = self.task.predict(self._model(), noisy, t.to(self.dtype), cond)
        target = noise - x0
        weights = loss_weights(cfg.weighting_scheme, t)
        if weights is None:
            return torch.nn.functional.mse_loss(pred.float(), target.float()), t
        per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
        return (per_sample * weights.to(per_sample)).mean(), t

    def _prior_batch(self, prior: list[Example], step: int) -> list[Example]:
        g = step_generator(self.cfg.seed, step, salt=2)
        idx = torch.randint(len(prior), (self.cfg.batch_size,), generator=g).tolist()
        bucket = prior[idx[0]].bucket
        return [prior[i] for i in idx if prior[i].bucket == bucket]

    # -- EMA
    def _ema_update(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.ema_decay
        with torch.no_grad():
            for e, (_, p) in zip(self.ema, self.params, strict=True):
                e.mul_(d).add_(p.detach().float(), alpha=1 - d)

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The EMA weights in lora_state()'s keys (swapped into the model for the moment it takes to read them)."""
        assert self.ema is not None
        plain = [p.data for _, p in self.params]
        try:
            for e, (_, p) in zip(self.ema, self.params, strict=True):
                p.data = e
            return self.lora_state()
        finally:
            for d, (_, p) in zip(plain, self.params, strict=True):
                p.data = d

    @torch.no_grad()
    def eval_loss(self, examples: list[Example]) -> float:
        """Flow-matching loss on ``examples`` at fixed noise and times (0.25, 0.5, 0.75): comparable across
        steps, unlike the per-step loss, whose time is random."""
        self._model().eval()
        losses = []
        for i, e in enumerate(examples):
            g = torch.Generator("cpu").manual_seed(10_007 + i)
            x0 = e.latents.unsqueeze(0).to(self.device, torch.float32)
            noise = torch.randn(x0.shape, generator=g).to(self.device)
            cond = {k: v.unsqueeze(0).to(self.device) for k, v in e.cond.items()}
            for t in (0.25, 0.5, 0.75):
                noisy = ((1 - t) * x0 + t * noise).to(self.dtype)
                pred = self.task.predict(self._model(), noisy, torch.full((1,), t, device=self.device,
                                                                              dtype=self.dtype), cond)
                losses.append(float(torch.nn.functional.mse_loss(pred.float(), noise - x0)))
        self._model().train()
        return sum(losses) / len(losses)

    # -- samples
    @torch.no_grad()
    def sample(self, samples: list[Example], step: int) -> list[str]:
        cfg = self.cfg
        self._model().eval()
        paths = []
        folder = self.run_dir / SAMPLES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for i, ex in enumerate(samples):
            g = torch.Generator("cpu").manual_seed(cfg.sample_seed + i)
            x = torch.randn((1, *ex.latents.shape), generator=g).to(self.device, torch.float32)
            cond = {k: v.unsqueeze(0).to(self.device) for k, v in ex.cond.items()}
            ts = torch.linspace(1.0, 0.0, cfg.sample_steps + 1)
            ts = cfg.sample_shift * ts / (1 + (cfg.sample_shift - 1) * ts)
            for a, b in zip(ts[:-1], ts[1:], strict=True):
                v = self.task.predict(self._model(), x.to(self.dtype),
                                      torch.full((1,), float(a), device=self.device, dtype=self.dtype), cond)
                x = x + (float(b) - float(a)) * v.float()
            image = self.task.decode(x, self.device, self.dtype)
            path = folder / f"step_{step:08d}_{i:02d}.png"
            buf = png_bytes(image)
            atomic_write_bytes(path, buf)
            paths.append(str(path))
        self._model().train()
        release_memory(self.device)
        return paths

    # -- the run
    def run(self) -> Path | None:
        cfg = self.cfg
        setup_device(cfg, self.device)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.emit("start", pid=os.getpid(), run_dir=str(self.run_dir), device=str(self.device),
                  precision=cfg.precision, steps=cfg.steps)
        train_all, samples = self._cached_examples()
        train = [e for e in train_all if not e.prior]
        prior = [e for e in train_all if e.prior]
        if not train:
            raise FlenUserError("The dataset has no images to train on.")
        self.transformer = self.task.load_transformer(self.device, self.dtype)
        self._add_lora()
        parent = self._load_init_lora() if cfg.init_lora else None
        if cfg.ema:  # starts at the first step's weights (init_lora's, when phased); a resume loads its own
            self.ema = [p.detach().float().clone() for _, p in self.params]
        opt, opt_name = self._optimizer()
        start, epoch, order = 0, 0, None
        ckpts = self.checkpoints() if cfg.resume else []
        if not cfg.resume and (self.run_dir / CHECKPOINTS_DIR).exists():
            shutil.rmtree(self.run_dir / CHECKPOINTS_DIR)
        if ckpts:
            state = self._load_checkpoint(ckpts[-1], opt)
            start, epoch, order = state["step"], state["epoch"], state["order"]
            self.emit("resume", step=start, checkpoint=str(ckpts[-1]))
        eval_start = state.get("eval_start") if ckpts else None
        if eval_start is None:
            eval_start = self.eval_loss(train)
        self.eval_start = eval_start
        self.emit("eval", step=start, eval_loss=eval_start)
        self._trim_loss_log(start)
        board = self._tensorboard(start)
        if board is not None and start == 0:
            board.add_scalar("loss/eval", eval_start, 0)
        n_batches = len(epoch_order(train, cfg.batch_size, cfg.seed, 0))
        params = [p for _, p in self.params]
        dropout = self.task.caption_dropout_rate if self.task.null_cond else 0.0
        scorer = self.task.identity_scorer() if cfg.sample_every and samples else None
        t_start = time.time()
        last_loss = float("nan")
        try:
            for step in range(start + 1, cfg.steps + 1):
                e, k = divmod(step - 1, n_batches)
                if order is None or e != epoch:
                    epoch, order = e, epoch_order(train, cfg.batch_size, cfg.seed, e)
                batch = [train[i] for i in order[k]]
                lr = lr_at(cfg, step)
                for group in opt.param_groups:
                    group["lr"] = lr
                drop = caption_dropout_mask(cfg.seed, step, len(batch), dropout)
                loss, t = self._loss(batch, step, drop)
                record: dict[str, Any] = {"step": step, "loss": 0.0, "epoch": e, "lr": lr,
                                          "t": [round(float(v), 6) for v in t], "bucket": list(batch[0].bucket),
                                          "items": [x.key for x in batch]}
                if dropout:
                    record["captions_dropped"] = sum(drop)
                if prior:
                    prior_loss, _ = self._loss(self._prior_batch(prior, step), step + 10**9)
                    record["instance_loss"], record["prior_loss"] = float(loss.detach()), float(prior_loss.detach())
                    loss = loss + self.task.prior_loss_weight * prior_loss
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                self._ema_update()
                last_loss = float(loss.detach())
                if not math.isfinite(last_loss):
                    raise FlenUserError(f"The loss became {last_loss} at step {step}; lower the learning rate "
                                        f"({cfg.learning_rate:g}) or use precision fp32/bf16.")
                record.update(loss=last_loss, time=time.time())
                with open(self.run_dir / LOSS_LOG, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
                if board is not None:
                    board.add_scalar("loss/train", last_loss, step)
                    board.add_scalar("lr", lr, step)
                    board.add_scalar("timestep", float(t.float().mean()), step)
                    if prior:
                        board.add_scalar("loss/prior", record["prior_loss"], step)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self.emit("step", step=step, total=cfg.steps, loss=round(last_loss, 6), epoch=e, lr=lr,
                              s_per_step=round((time.time() - t_start) / (step - start), 4))
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != cfg.steps:
                    path = self._save_checkpoint(step, opt, order, epoch)
                    self.emit("checkpoint", step=step, path=str(path))
                if cfg.sample_every and samples and step % cfg.sample_every == 0:
                    self._sample_step(samples, step, scorer)
                if cfg.stop_at_step and step >= cfg.stop_at_step and step < cfg.steps:
                    # as if killed here: no extra checkpoint, a resume starts from the latest one
                    self.emit("stopped", step=step)
                    return None
            final_sd = self.lora_state()
            self.eval_end = self.eval_loss(train)
            if board is not None:
                board.add_scalar("loss/eval", self.eval_end, cfg.steps)
        finally:
            if board is not None:
                board.close()
        curve = self.run_dir / LOSS_CURVE
        atomic_write_bytes(curve, png_bytes(loss_curve_image(read_loss_log(self.run_dir / LOSS_LOG))))
        path = self._write_lora(final_sd, parent, opt_name, cfg.steps, last_loss)
        ema_path = self._write_beside(path, EMA_SUFFIX, self.ema_state(), parent, opt_name, last_loss, {
            "ema": {"decay": cfg.ema_decay}}) if self.ema is not None else None
        best_path = None
        if self.best is not None and self.best_sd is not None and self.best["step"] != cfg.steps:
            best_path = self._write_beside(path, BEST_SUFFIX, self.best_sd, parent, opt_name, last_loss, {
                "best_checkpoint": {**self.best, "scores": self.identity}})
        done = {"lora": str(path), "steps": cfg.steps, "loss": last_loss, "eval_loss_start": self.eval_start,
                "eval_loss_end": self.eval_end, "at": time.time(), "loss_curve": str(curve),
                "ema_lora": str(ema_path) if ema_path else None, "best_lora": str(best_path) if best_path else None,
                "best": self.best, "identity": self.identity,
                "tensorboard": str(self.run_dir / TENSORBOARD_DIR) if board is not None else None}
        atomic_write_bytes(self.run_dir / DONE_FILE, json.dumps(done).encode())
        self.emit("done", lora=str(path), steps=cfg.steps, loss=last_loss, eval_loss_start=self.eval_start,
                  eval_loss_end=self.eval_end, loss_curve=str(curve), ema_lora=done["ema_lora"],
                  best_lora=done["best_lora"], best=self.best, tensorboard=done["tensorboard"])
        return path

    def _sample_step(self, samples: list[Example], step: int, scorer) -> None:
        """Samples from the fixed prompts and seeds, one grid of them, and (with a scorer) the identity score:
        the weights of the best-scoring step are kept."""
        from PIL import Image

        paths = self.sample(samples, step)
        images = []
        for path in paths:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        record = None
        if scorer is not None:
            record = {"step": step, **scorer(images)}
            self.identity.append(record)
            # a step whose samples show no face at all is not a candidate, whatever its score
            if record.get("faces", 1) and (self.best is None or record["score"] > self.best["score"]):
                self.best = {"step": step, "score": record["score"]}
                self.best_sd = {k: v.cpu() for k, v in self.lora_state().items()}
            self.emit("identity", step=step, score=record["score"], faces=record.get("faces"),
                      best_step=(self.best or {}).get("step"), best_score=(self.best or {}).get("score"))
        labels = [f"{i + 1}" for i in range(len(images))]
        if record is not None and isinstance(record.get("scores"), list):
            labels = [f"{i + 1}: " + ("no face" if sc is None else f"{sc:.3f}")
                      for i, sc in enumerate(record["scores"])]
        title = f"step {step}" + (f" · identity {record['score']:.3f}" if record is not None else "")
        grid = self.run_dir / SAMPLES_DIR / f"step_{step:08d}_grid.png"
        atomic_write_bytes(grid, png_bytes(sample_grid(images, labels, title)))
        self.emit("sample", step=step, total=self.cfg.steps, paths=paths, grid=str(grid))

    def _tensorboard(self, start: int):
        """A SummaryWriter on <run_dir>/tensorboard, or None (tensorboard off, or the package missing: said once).
        A resumed run purges the events after its checkpoint's step, which the lost steps had written."""
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            self.emit("warning", message=f"TensorBoard event files are not written: {exc}. Install it with "
                                         "'pip install tensorboard' (it is in FLENwheel's requirements.txt), or set "
                                         "tensorboard: false.")
            return None
        return SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=start + 1 if start else None)

    def _trim_loss_log(self, step: int) -> None:
        log = self.run_dir / LOSS_LOG
        if not log.is_file():
            return
        keep = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        atomic_write_bytes(log, ("\n".join(keep) + ("\n" if keep else "")).encode())

    def _lora_file(self, sd: dict[str, torch.Tensor], parent: dict[str, Any] | None, opt_name: str, steps: int,
                   loss: float, extra: dict[str, Any]) -> bytes:
        """The bytes of a LoRA file: diffusers keys, alpha folded into lora_B, provenance in the metadata."""
        from safetensors.torch import save

        cfg = self.cfg
        scale = cfg.effective_alpha() / cfg.rank  # folded into lora_B so that lora_alpha == rank
        out = {f"transformer.{k}": (v * scale if ".lora_B." in k else v).float().contiguous().cpu()
               for k, v in sorted(sd.items())}
        provenance = {
            "base_model": Path(cfg.files.get("diffusion_model") or cfg.model).name,
            "base_model_path": str(cfg.files.get("diffusion_model") or cfg.model),
            "architecture": self.task.architecture, "trainer": self.task.trainer_name,
            "hyperparameters": config_dict(cfg), "optimizer_used": opt_name, "device": str(self.device),
            "steps_done": steps, "final_loss": loss,
            "eval_loss_start": self.eval_start, "eval_loss_end": self.eval_end, "parent_lora": parent,
            "schedule": {"lr_scheduler": cfg.lr_scheduler, "lr_warmup_steps": cfg.lr_warmup_steps,
                         "learning_rate": cfg.learning_rate, "final_lr": lr_at(cfg, steps)},
            "timesteps": {"sampling": cfg.timestep_sampling, "weighting_scheme": cfg.weighting_scheme},
            "resolutions": cfg.all_resolutions(),
            "software": software_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.task.provenance(), **extra,
        }
        metadata = {
            "format": "pt", "flenwheel": json.dumps(provenance, sort_keys=True, default=str),
            "lora_rank": str(cfg.rank), "lora_alpha": str(cfg.rank), "alpha_trained": f"{cfg.effective_alpha():g}",
            "base_model": provenance["base_model"], "architecture": self.task.architecture,
            "steps": str(steps), "target_modules": ",".join(cfg.modules()),
            "dataset_version": str(self.task.provenance().get("dataset", {}).get("version", "")),
            "dataset_hash": str(self.task.provenance().get("dataset", {}).get("hash", "")),
        }
        return save(out, metadata=metadata)

    def _write_lora(self, sd: dict[str, torch.Tensor], parent: dict[str, Any] | None, opt_name: str,
                    steps: int, loss: float) -> Path:
        folder = loras_dir(self.cfg.output_dir, self.task.character)
        extra: dict[str, Any] = {}
        if self.ema is not None:
            extra["ema"] = {"decay": self.cfg.ema_decay, "file_suffix": EMA_SUFFIX}
        if self.best is not None:
            # the final weights are the best ones when the last sample step scored best: no second file then
            extra["best_checkpoint"] = {**self.best, "scores": self.identity,
                                        "file_suffix": None if self.best["step"] == steps else BEST_SUFFIX}
        # the version number is known only once the name is claimed; it is in the file name
        return write_new_version(folder, self.task.prefix, self._lora_file(sd, parent, opt_name, steps, loss, extra))

    def _write_beside(self, plain: Path, suffix: str, sd: dict[str, torch.Tensor], parent: dict[str, Any] | None,
                      opt_name: str, loss: float, extra: dict[str, Any]) -> Path:
        """<plain name><suffix> beside the plain LoRA (EMA, best checkpoint); claimed with a hard link, never
        overwriting. Its provenance names the plain file and its sha256."""
        target = plain.with_name(plain.name[:-len(".safetensors")] + suffix)
        key = next(iter(extra))
        extra = {key: {**extra[key], "of": plain.name, "of_sha256": sha256_file(plain)}}
        data = self._lora_file(sd, parent, opt_name, self.cfg.steps, loss, extra)
        if not write_new_file(target, data):
            raise FlenUserError(f"{target} already exists (left by another run?); it was not written. The plain "
                                f"LoRA {plain.name} is complete.")
        return target


def sample_grid(images: list[Any], labels: list[str], title: str):
    """One row of sample images (scaled up to at least 128 px) with a label under each and a title above."""
    from PIL import Image, ImageDraw

    side = max([128, *(max(im.size) for im in images)]) if images else 128
    cells = []
    for im in images:
        scale = side / max(im.size)
        cells.append(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                               Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS))
    pad, label_h, title_h = 4, 16, 18
    width = pad + sum(c.width + pad for c in cells) if cells else 2 * pad + side
    grid = Image.new("RGB", (width, title_h + side + label_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 3), title, fill=(0, 0, 0))
    x = pad
    for cell, label in zip(cells, labels, strict=False):
        grid.paste(cell, (x, title_h))
        draw.text((x, title_h + side + 2), label, fill=(0, 0, 0))
        x += cell.width + pad
    return grid


def read_loss_log(path: Path) -> list[dict[str, Any]]:
    """The records of a loss log (loss.jsonl); unreadable lines are skipped."""
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and "step" in rec and "loss" in rec:
                    out.append(rec)
    return out


def loss_curve_image(records: list[dict[str, Any]], width: int = 768, height: int = 384):
    """A PIL chart of a loss log: the loss per step (light), its moving average (dark) and the learning
    rate (orange, own scale, right-hand labels)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 56, 24, height - 28
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    if not records:
        draw.text((left + 8, top + 8), "no steps logged", fill=(0, 0, 0))
        return image
    steps = [int(r["step"]) for r in records]
    losses = [float(r["loss"]) for r in records]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-6
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step: float, value: float, vlo: float, vhi: float) -> tuple[float, float]:
        return (left + (right - left) * (step - s0) / (s1 - s0),
                bottom - (bottom - top) * (value - vlo) / (vhi - vlo))

    lrs = [float(r.get("lr", 0.0)) for r in records]
    if max(lrs) > 0:
        lr_hi = max(lrs)
        draw.line([xy(s, v, 0.0, lr_hi) for s, v in zip(steps, lrs, strict=True)], fill=(230, 140, 30), width=1)
        draw.text((right + 4, top - 4), f"{lr_hi:.1e}", fill=(230, 140, 30))
        draw.text((right + 4, bottom - 8), "lr 0", fill=(230, 140, 30))
    if len(steps) > 1:
        draw.line([xy(s, v, lo, hi) for s, v in zip(steps, losses, strict=True)], fill=(150, 180, 230), width=1)
        draw.line([xy(s, v, lo, hi) for s, v in zip(steps, smooth, strict=True)], fill=(20, 60, 160), width=2)
    else:
        x, y = xy(steps[0], losses[0], lo, hi)
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(20, 60, 160))
    draw.text((4, top - 4), f"{hi:.4g}", fill=(0, 0, 0))
    draw.text((4, bottom - 8), f"{lo:.4g}", fill=(0, 0, 0))
    draw.text((left, bottom + 6), f"step {s0}", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 6), f"step {steps[-1]}", fill=(0, 0, 0))
    draw.text((left + 8, 4), f"loss (mean of {window}) and learning rate", fill=(0, 0, 0))
    return image


def _example_to(e: Example, tag: str, i: int, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    base = f"{tag}{i}"
    tensors[f"{base}.latents"] = e.latents
    for k, v in e.cond.items():
        tensors[f"{base}.cond.{k}"] = v
    return {"key": e.key, "bucket": list(e.bucket), "base": base, "cond": sorted(e.cond), "prior": e.prior}


def _example_from(d: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Example:
    base = d["base"]
    return Example(d["key"], tuple(d["bucket"]), tensors[f"{base}.latents"],
                   {k: tensors[f"{base}.cond.{k}"] for k in d["cond"]}, d.get("prior", False))


# ---- the command line --------------------------------------------------------------------------------

def main_for(config_cls: type, task_cls: type, argv: list[str] | None = None) -> int:
    """``python -m training.<trainer> --config FILE [--set key=value …]``."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {task_cls.__module__}", description=task_cls.__doc__)
    parser.add_argument("--config", required=True, help="YAML or JSON config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (value parsed as YAML), e.g. --set steps=500")
    args = parser.parse_args(argv)
    try:
        cfg = load_config_file(config_cls, args.config)
        if args.set:
            import yaml

            data = config_dict(cfg)
            for item in args.set:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ConfigError(f"--set {item!r}: write KEY=VALUE.")
                data[key.strip()] = yaml.safe_load(value)
            cfg = config_from_dict(config_cls, data, where="config (with --set)")
        task = task_cls(cfg)
        Trainer(task, task.run_dir()).run()
        return 0
    except FlenUserError as exc:
        emit("error", message=str(exc))
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
