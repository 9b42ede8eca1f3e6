"""The shared core of FLENwheel's LoRA trainers (FLUX character LoRA, Qwen-Image-Edit editor LoRA).

What every trainer gets from here:

* **Config** — dataclasses read from YAML or JSON, validated with messages that name the key, what is
  wrong and what to write instead (unknown keys get a "did you mean").
* **Memory** — latents and text embeddings are encoded once and cached (in memory and in the run
  folder), the VAE and text encoders are then released, so the peak is the transformer's; base in bf16,
  fp32 or NF4 (bitsandbytes, CUDA only); peft LoRA on the attention projections (q/k/v/out, plus any
  extra modules); gradient checkpointing; 8-bit AdamW on CUDA, torch AdamW elsewhere.
* **Loss** — rectified-flow matching: ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``.
* **Determinism and resume** — data order, noise and timesteps of step ``s`` are functions of
  ``(seed, s)``; a checkpoint (every N steps, written to a temp folder and renamed) holds the LoRA
  weights, the optimizer state (safetensors for tensors, JSON for the rest: no pickle), the RNG states,
  the step and the epoch's data order. A run resumed from its latest checkpoint ends with the same LoRA
  as a run that never stopped.
* **Reporting** — one JSON object per line on stdout (``{"event": "step", ...}``) for the launcher node,
  a loss log (``loss.jsonl``) and sample images every N steps from fixed prompts and seeds.
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

from engines.errors import FlenUserError

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

PRECISIONS = ("bf16", "fp32", "nf4", "fp8")
OPTIMIZERS = ("auto", "adamw8bit", "adamw")
TIMESTEP_SAMPLING = ("logit_normal", "uniform")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CHECKPOINTS_DIR = "checkpoints"
LOSS_LOG = "loss.jsonl"
DONE_FILE = "done.json"
CACHE_DIR = "cache"
SAMPLES_DIR = "samples"
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
    steps: int = 1000
    batch_size: int = 1
    seed: int = 0
    resolution: int = 512
    bucket_multiple: int = 64
    timestep_sampling: str = "logit_normal"
    guidance: float = 1.0
    gradient_checkpointing: bool = True
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

    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha else float(self.rank)

    def modules(self) -> list[str]:
        return list(dict.fromkeys([*self.target_modules, *self.extra_target_modules]))


_CHOICES = {"precision": PRECISIONS, "optimizer": OPTIMIZERS, "timestep_sampling": TIMESTEP_SAMPLING,
            "device": DEVICES}
_RANGES: dict[str, tuple[float, float]] = {
    "rank": (1, 1024), "alpha": (0, 1e6), "learning_rate": (1e-8, 1.0), "steps": (1, 10_000_000),
    "batch_size": (1, 64), "seed": (0, 2**32 - 1), "resolution": (16, 4096), "bucket_multiple": (2, 256),
    "guidance": (0, 100), "weight_decay": (0, 1), "max_grad_norm": (0, 1e6), "checkpoint_every": (0, 10_000_000),
    "keep_checkpoints": (1, 1000), "sample_every": (0, 10_000_000), "sample_steps": (1, 200),
    "sample_size": (0, 4096), "sample_seed": (0, 2**32 - 1), "sample_shift": (0.1, 100),
    "max_sequence_length": (8, 4096), "memory_cap_gb": (0, 1e4), "stop_at_step": (0, 10_000_000),
    "log_every": (1, 1_000_000),
}
_REQUIRED = ("model", "dataset", "output_dir")


def _type_name(tp: Any) -> str:
    return {int: "a whole number", float: "a number", str: "a text", bool: "true or false"}.get(
        tp, "a list of texts" if get_origin(tp) is list else str(tp))


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    if get_origin(tp) is list:
        inner = get_args(tp)[0]
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
    from engines.dataset import atomic_write

    atomic_write(path, data)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def next_version_path(folder: Path, prefix: str) -> Path:
    existing = []
    for p in folder.glob(f"{prefix}_v*.safetensors"):
        tail = p.name[len(prefix) + 2:-len(".safetensors")]
        if tail.isdigit():
            existing.append(int(tail))
    return folder / f"{prefix}_v{max(existing, default=0) + 1}.safetensors"


def write_new_version(folder: Path, prefix: str, data: bytes) -> Path:
    """Writes ``data`` as the next ``<prefix>_vN.safetensors`` in ``folder``; never overwrites (a hard link
    from a temp file claims the name atomically, so two writers get different versions)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{prefix}-{os.getpid()}-{time.time_ns()}.part"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        for _ in range(1000):
            target = next_version_path(folder, prefix)
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                continue
        raise FlenUserError(f"Could not claim a new {prefix}_vN name in {folder}.")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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


def setup_device(cfg: TrainConfig, device: torch.device) -> None:
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
        from diffusers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover
        raise ConfigError(f"precision 'nf4' needs bitsandbytes ({exc}); pip install bitsandbytes.") from exc
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


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
        return load(cfg.files["diffusion_model"], split_file_dtypes(cfg, dtype)).to(device)
    if cfg.precision == "fp8":
        # the e4m3 base is read from ComfyUI's split files; a diffusers folder quantises through bitsandbytes
        raise ConfigError("precision 'fp8' quantises ComfyUI's split files (connect a split-file loader, or give "
                          "'files'); for the diffusers folder choose 'nf4' (4-bit, fits 24 GB) or 'bf16'.")
    q = quantization_config(cfg, dtype)
    kwargs = {"quantization_config": q} if q is not None else {}
    model = model_cls.from_pretrained(cfg.model, subfolder="transformer", dtype=dtype, **kwargs)
    if q is None:
        model.to(device)
    return model


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
    character = ""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

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


def sample_t(cfg: TrainConfig, n: int, g: torch.Generator) -> torch.Tensor:
    if cfg.timestep_sampling == "uniform":
        return torch.rand(n, generator=g)
    return torch.sigmoid(torch.randn(n, generator=g))


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
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
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
        state = {"step": step, "epoch": epoch, "order": order, "optimizer": opt_structure, "rng": rng_info,
                 "param_names": [n for n, _ in self.params], "eval_start": self.eval_start,
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
        return state

    # -- one step
    def _loss(self, batch: list[Example], step: int) -> torch.Tensor:
        cfg = self.cfg
        g = step_generator(cfg.seed, step)
        x0 = torch.stack([e.latents for e in batch]).to(self.device, torch.float32)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        t = sample_t(cfg, x0.shape[0], g).to(self.device)
        tt = t.view(-1, *([1] * (x0.dim() - 1)))
        noisy = ((1 - tt) * x0 + tt * noise).to(self.dtype)
        cond = {k: torch.stack([e.cond[k] for e in batch]).to(self.device) for k in batch[0].cond}
        pred = self.task.predict(self._model(), noisy, t.to(self.dtype), cond)
        target = noise - x0
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    def _prior_batch(self, prior: list[Example], step: int) -> list[Example]:
        g = step_generator(self.cfg.seed, step, salt=2)
        idx = torch.randint(len(prior), (self.cfg.batch_size,), generator=g).tolist()
        bucket = prior[idx[0]].bucket
        return [prior[i] for i in idx if prior[i].bucket == bucket]

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
            buf = _png_bytes(image)
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
        n_batches = len(epoch_order(train, cfg.batch_size, cfg.seed, 0))
        params = [p for _, p in self.params]
        t_start = time.time()
        last_loss = float("nan")
        for step in range(start + 1, cfg.steps + 1):
            e, k = divmod(step - 1, n_batches)
            if order is None or e != epoch:
                epoch, order = e, epoch_order(train, cfg.batch_size, cfg.seed, e)
            batch = [train[i] for i in order[k]]
            loss = self._loss(batch, step)
            if prior:
                loss = loss + self.task.prior_loss_weight * self._loss(self._prior_batch(prior, step), step + 10**9)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            last_loss = float(loss.detach())
            if not math.isfinite(last_loss):
                raise FlenUserError(f"The loss became {last_loss} at step {step}; lower the learning rate "
                                    f"({cfg.learning_rate:g}) or use precision fp32/bf16.")
            with open(self.run_dir / LOSS_LOG, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "loss": last_loss, "epoch": e, "time": time.time()}) + "\n")
            if step % cfg.log_every == 0 or step == cfg.steps:
                self.emit("step", step=step, total=cfg.steps, loss=round(last_loss, 6), epoch=e,
                          s_per_step=round((time.time() - t_start) / (step - start), 4))
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != cfg.steps:
                path = self._save_checkpoint(step, opt, order, epoch)
                self.emit("checkpoint", step=step, path=str(path))
            if cfg.sample_every and samples and step % cfg.sample_every == 0:
                self.emit("sample", step=step, total=cfg.steps, paths=self.sample(samples, step))
            if cfg.stop_at_step and step >= cfg.stop_at_step and step < cfg.steps:
                # as if killed here: no extra checkpoint, a resume starts from the latest one
                self.emit("stopped", step=step)
                return None
        final_sd = self.lora_state()
        self.eval_end = self.eval_loss(train)
        path = self._write_lora(final_sd, parent, opt_name, cfg.steps, last_loss)
        done = {"lora": str(path), "steps": cfg.steps, "loss": last_loss, "eval_loss_start": self.eval_start,
                "eval_loss_end": self.eval_end, "at": time.time()}
        atomic_write_bytes(self.run_dir / DONE_FILE, json.dumps(done).encode())
        self.emit("done", lora=str(path), steps=cfg.steps, loss=last_loss, eval_loss_start=self.eval_start,
                  eval_loss_end=self.eval_end)
        return path

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

    def _write_lora(self, sd: dict[str, torch.Tensor], parent: dict[str, Any] | None, opt_name: str,
                    steps: int, loss: float) -> Path:
        from safetensors.torch import save

        cfg = self.cfg
        scale = cfg.effective_alpha() / cfg.rank  # folded into lora_B so that lora_alpha == rank
        out = {f"transformer.{k}": (v * scale if ".lora_B." in k else v).float().contiguous().cpu()
               for k, v in sorted(sd.items())}
        folder = Path(cfg.output_dir) / "flenwheel" / self.task.character
        provenance = {
            "base_model": Path(cfg.files.get("diffusion_model") or cfg.model).name,
            "base_model_path": str(cfg.files.get("diffusion_model") or cfg.model),
            "architecture": self.task.architecture, "trainer": self.task.trainer_name,
            "hyperparameters": config_dict(cfg), "optimizer_used": opt_name, "device": str(self.device),
            "steps_done": steps, "final_loss": loss,
            "eval_loss_start": self.eval_start, "eval_loss_end": self.eval_end, "parent_lora": parent,
            "software": software_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.task.provenance(),
        }
        metadata = {
            "format": "pt", "flenwheel": json.dumps(provenance, sort_keys=True, default=str),
            "lora_rank": str(cfg.rank), "lora_alpha": str(cfg.rank), "alpha_trained": f"{cfg.effective_alpha():g}",
            "base_model": provenance["base_model"], "architecture": self.task.architecture,
            "steps": str(steps), "target_modules": ",".join(cfg.modules()),
            "dataset_version": str(self.task.provenance().get("dataset", {}).get("version", "")),
            "dataset_hash": str(self.task.provenance().get("dataset", {}).get("hash", "")),
        }
        # the version number is known only once the name is claimed; it is in the file name
        return write_new_version(folder, self.task.prefix, save(out, metadata=metadata))


def _png_bytes(image) -> bytes:
    import io as _io

    buf = _io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


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
