"""The one place where FLENwheel talks to ComfyUI internals.

VRAM: the pack builds its own torch modules (diffusers models). Each is wrapped once in a
ComfyUI ``ModelPatcher`` and handed to ``load_models_gpu`` before every use, so ComfyUI's
manager can evict them for other models (and evict others for them). The manager keeps only
weak references, so the bridge holds the patchers. Also here: folder_paths look-ups, progress
bars with previews, interrupts, and the PromptServer for routes.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from pathlib import Path

import comfy.lora
import comfy.lora_convert
import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..engines.errors import FlenUserError
from ..engines.resident_weights import ResidentWeights

log = logging.getLogger("FLENwheel")

_patchers_lock = threading.Lock()
# id(module) -> (weakref to module, patcher, label). The patcher holds the module strongly, so
# an entry lives as long as the pipeline that owns the module is cached by a loader node.
_patchers: dict[int, tuple[weakref.ref, comfy.model_patcher.ModelPatcher, str]] = {}


def compute_device() -> torch.device:
    return mm.get_torch_device()


class _Hosted(torch.nn.Module):
    """Container the ModelPatcher manages. ModelPatcher writes bookkeeping attributes (``device``,
    ``model_loaded_weight_memory``…) onto its model; diffusers models expose ``device`` as a
    read-only property, so the patcher gets this plain wrapper instead."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.device = next((p.device for p in inner.parameters()), torch.device("cpu"))


def resident_weights_enabled() -> bool:
    """FLENWHEEL_RESIDENT_WEIGHTS=0 gives the pack's models ComfyUI's plain ModelPatcher (host RAM freed while a
    model is on the GPU, slow offloads) — for machines whose RAM cannot hold every cached model at once."""
    return os.environ.get("FLENWHEEL_RESIDENT_WEIGHTS", "1").strip() != "0"


class ResidentPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher whose offload keeps the host copy of the weights (engines/resident_weights.py): unloading
    drops the GPU copy instead of copying 20 GB back at ~1.5 GB/s, and loading reads from pinned memory.

    It takes the fast path only where nothing of ComfyUI's own patching is involved — a full load of a pack
    module with no ComfyUI weight patches (the pack applies its LoRAs itself) and plain tensors — and falls back to
    ModelPatcher's own code otherwise (partial loads, bitsandbytes parameters)."""

    def __init__(self, model: torch.nn.Module, load_device: torch.device, offload_device: torch.device) -> None:
        super().__init__(model, load_device=load_device, offload_device=offload_device)
        self.resident = ResidentWeights(model) if ResidentWeights.supports(model) else None

    def _fast(self, device_to) -> bool:
        return (self.resident is not None and device_to is not None and not self.patches
                and not getattr(self.model, "model_lowvram", False))

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        if not (full_load and self._fast(device_to)):
            return super().load(device_to, lowvram_model_memory=lowvram_model_memory,
                                force_patch_weights=force_patch_weights, full_load=full_load)
        assert self.resident is not None
        with self.use_ejected():
            self.unpatch_hooks()
            self.resident.to_device(device_to)
            self.model.model_lowvram = False
            self.model.lowvram_patch_counter = 0
            self.model.device = device_to
            self.model.model_loaded_weight_memory = self.model_size()
            self.model.current_weight_patches_uuid = self.patches_uuid
            for callback in self.get_all_callbacks(comfy.model_patcher.CallbacksMP.ON_LOAD):
                callback(self, device_to, lowvram_model_memory, force_patch_weights, full_load)
            self.apply_hooks(self.forced_hooks, force_apply=True)

    def partially_unload(self, device_to, memory_to_free=0):
        # A pack module cannot run with some layers left on the host (plain nn.Linear has no cast-on-the-fly), and
        # a whole unload costs nothing on this path: free none here, so ComfyUI unloads the model whole.
        if self._fast(device_to):
            return 0
        return super().partially_unload(device_to, memory_to_free)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if not (unpatch_weights and self._fast(device_to) and not self.backup):
            return super().unpatch_model(device_to, unpatch_weights=unpatch_weights)
        assert self.resident is not None
        self.eject_model()
        self.unpatch_hooks()
        self.resident.to_host(device_to)
        self.model.current_weight_patches_uuid = None
        self.model.device = device_to
        self.model.model_loaded_weight_memory = 0
        for key, value in self.object_patches_backup.items():
            comfy.utils.set_attr(self.model, key, value)
        self.object_patches_backup.clear()


def _patcher_for(module: torch.nn.Module, label: str | None = None) -> comfy.model_patcher.ModelPatcher:
    with _patchers_lock:
        entry = _patchers.get(id(module))
        if entry is not None and entry[0]() is module:
            return entry[1]
        patcher_type = ResidentPatcher if resident_weights_enabled() else comfy.model_patcher.ModelPatcher
        patcher = patcher_type(
            _Hosted(module), load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
        _patchers[id(module)] = (weakref.ref(module), patcher, label or type(module).__name__)
        return patcher


def register(module: torch.nn.Module, label: str) -> None:
    """Makes a pack module known to ComfyUI's model management (idempotent)."""
    _patcher_for(module, label)


def release(module: torch.nn.Module) -> None:
    """Forgets a module (its pipeline is being replaced); ComfyUI may then free it."""
    with _patchers_lock:
        entry = _patchers.pop(id(module), None)
    if entry is not None:
        mm.current_loaded_models[:] = [lm for lm in mm.current_loaded_models if lm.model is not entry[1]]


class ComfyModelHost:
    """engines.model_host.ModelHost backed by ComfyUI's VRAM manager."""

    def prepare(self, *modules: torch.nn.Module, working_bytes: int = 0) -> torch.device:
        patchers = [_patcher_for(m) for m in modules]
        # Plain nn.Linear layers cannot be partially loaded: ask for the whole module; and say what the step
        # needs beside the weights, so ComfyUI frees that much (as its own samplers and VAE nodes do).
        mm.load_models_gpu(patchers, memory_required=working_bytes, force_full_load=True)
        return mm.get_torch_device()

    def check_interrupt(self) -> None:
        mm.throw_exception_if_processing_interrupted()


def managed_models() -> list[dict[str, object]]:
    """The pack's modules and whether ComfyUI currently has each loaded (for /flenwheel/models)."""
    loaded = {id(lm.model) for lm in mm.current_loaded_models if lm.model is not None}
    with _patchers_lock:
        items = list(_patchers.values())
    out = []
    for ref, patcher, label in items:
        module = ref()
        if module is None:
            continue
        out.append({"label": label, "loaded": id(patcher) in loaded,
                    "device": str(next(module.parameters()).device) if any(True for _ in module.parameters()) else "-",
                    "bytes": int(patcher.model_size())})
    return out


# ---- folder_paths -----------------------------------------------------------------------------

def diffusers_folders() -> list[str]:
    """Names of sub-folders of models/diffusers that hold a model_index.json."""
    names: set[str] = set()
    for root in folder_paths.get_folder_paths("diffusers"):
        base = Path(root)
        if not base.is_dir():
            continue
        for index in base.glob("*/model_index.json"):
            names.add(index.parent.name)
        for index in base.glob("*/*/model_index.json"):
            names.add(index.parent.relative_to(base).as_posix())
    return sorted(names)


def diffusers_folder_path(name: str) -> str:
    # ComfyUI 0.3.64 does not check V3 combo values against their options, so a prompt could send
    # '../../input/x': only a listed folder is accepted.
    if name not in diffusers_folders():
        roots = ", ".join(folder_paths.get_folder_paths("diffusers"))
        raise FlenUserError(f"Model folder {str(name)[:120]!r} is not one of the diffusers folders under "
                            f"models/diffusers ({roots}). Put the diffusers folder there and refresh the node "
                            "list (press R).")
    for root in folder_paths.get_folder_paths("diffusers"):
        candidate = Path(root) / name
        if candidate.is_dir():
            return str(candidate)
    roots = ", ".join(folder_paths.get_folder_paths("diffusers"))
    raise FlenUserError(f"Model folder '{name}' not found under models/diffusers ({roots}). "
                        "Put the diffusers folder there and refresh the node list (press R).")


# ComfyUI's split model files: the folder names its own loaders use (each also covers the legacy name:
# diffusion_models ← unet, text_encoders ← clip).
MODEL_FILE_FOLDERS = ("diffusion_models", "text_encoders", "vae")


def model_files(folder: str) -> list[str]:
    """The files ComfyUI lists in one of its model folders (all of them: a .ckpt or a GGUF that ComfyUI-GGUF lists
    gets a clear message from the loader rather than vanishing from the list)."""
    return list(folder_paths.get_filename_list(folder))


def model_file_path(folder: str, name: str) -> str:
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        roots = ", ".join(folder_paths.get_folder_paths(folder))
        raise FlenUserError(f"'{name}' not found in models/{folder} ({roots}). Put the file there and refresh the "
                            "node list (press R).")
    return path


def comfy_tokenizer_folder(name: str) -> str:
    """A tokenizer folder ComfyUI ships (``qwen25_tokenizer``, ``t5_tokenizer``, ``sd1_tokenizer``)."""
    import comfy.sd1_clip  # ``comfy`` itself is a namespace package without a __file__

    root = Path(comfy.sd1_clip.__file__).resolve().parent
    return str(root / name if name == "sd1_tokenizer" else root / "text_encoders" / name)


def loras_root() -> str:
    """The first models/loras folder: where the pack writes new LoRAs."""
    return folder_paths.get_folder_paths("loras")[0]


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def find_lora_path(name: str) -> str | None:
    """The LoRA's file under models/loras, or None when there is none."""
    return folder_paths.get_full_path("loras", name)


def lora_path(name: str) -> str:
    path = find_lora_path(name)
    if path is None:
        roots = ", ".join(folder_paths.get_folder_paths("loras"))
        raise FlenUserError(f"LoRA '{name}' not found in models/loras ({roots}). "
                            "Copy it there and refresh the node list (press R).")
    return path


def output_directory() -> str:
    return folder_paths.get_output_directory()


def user_directory() -> str:
    return folder_paths.get_user_directory()


def client_writable_roots() -> list:
    """Folders anyone who reaches ComfyUI's port can write to (POST /upload/image with type input, output or
    temp; /userdata under user/): nothing is ever run from them."""
    from ..engines.safe_paths import Root

    return [Root(Path(folder_paths.get_input_directory()), "input"),
            Root(Path(folder_paths.get_output_directory()), "output"),
            Root(Path(folder_paths.get_temp_directory()), "temp"),
            Root(Path(folder_paths.get_user_directory()), "user")]


def pack_write_roots() -> list:
    """Where a path from a prompt may point for the pack's own writes: the workspaces in output/flenwheel."""
    from ..engines.safe_paths import Root
    from ..engines.workspace import PACK_DIR, workspace_root

    return [Root(workspace_root(folder_paths.get_output_directory()), f"output/{PACK_DIR}")]


def image_read_roots() -> list:
    """Where a folder of images named in a prompt may be (class images): ComfyUI's input and output folders."""
    from ..engines.safe_paths import Root

    return [Root(Path(folder_paths.get_input_directory()), "input"),
            Root(Path(folder_paths.get_output_directory()), "output")]


# ---- progress ---------------------------------------------------------------------------------

class Progress:
    """ComfyUI progress bar; previews are JPEGs made from latents (cheap, no VAE)."""

    def __init__(self, total: int, latent_format: str | None = None) -> None:
        self.bar = comfy.utils.ProgressBar(total)
        self.rgb = _latent_rgb_factors(latent_format) if latent_format else None

    def __call__(self, value: int, total: int, latents: torch.Tensor | None = None) -> None:
        preview = None
        if latents is not None and self.rgb is not None:
            preview = ("JPEG", _latent_preview(latents, *self.rgb), 512)
        self.bar.update_absolute(value, total, preview)

    def update(self, value: int, total: int, text: str | None = None, image=None) -> None:
        """Progress with a text line (e.g. the loss) and an optional preview PIL image (e.g. a sample)."""
        self.bar.update_absolute(value, total, ("JPEG", image, 512) if image is not None else None)
        if text:
            progress_text(text)


def _latent_rgb_factors(name: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    import comfy.latent_formats as lf

    fmt = {"flux": lf.Flux, "qwen_image": lf.Wan21}.get(name)
    if fmt is None:
        return None
    f = fmt()
    factors = torch.tensor(f.latent_rgb_factors, dtype=torch.float32)
    bias = torch.tensor(f.latent_rgb_factors_bias, dtype=torch.float32) if f.latent_rgb_factors_bias else None
    return factors, bias


def _latent_preview(latents: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor | None):
    from PIL import Image

    x = latents[0].float().cpu()
    if x.ndim == 4:  # video-style latents [C, T, H, W]: first frame
        x = x[:, 0]
    n = min(x.shape[0], factors.shape[0])  # tiny test VAEs have fewer latent channels
    rgb = torch.einsum("chw,cr->hwr", x[:n], factors[:n])
    if bias is not None:
        rgb = rgb + bias
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).byte().numpy()
    return Image.fromarray(pixels)


# ---- server -----------------------------------------------------------------------------------

def prompt_server_routes():
    """aiohttp RouteTableDef of ComfyUI's running server (None outside a server)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    instance = getattr(PromptServer, "instance", None)
    return None if instance is None else instance.routes


# ---- insightface packs ------------------------------------------------------------------------

def insightface_root() -> str:
    """models/insightface: the ``root`` of FaceAnalysis, packs in ``models/<name>`` below it (the folder
    IPAdapter, InstantID and ReActor use)."""
    return str(Path(folder_paths.models_dir) / "insightface")


def insightface_packs() -> list[str]:
    """Pack folders under models/insightface/models that hold .onnx files."""
    from ..engines.identity import list_packs

    return list_packs(insightface_root())


def current_prompt_id() -> str | None:
    """Id of the prompt whose node is executing in this thread (None outside execution)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    return None if ctx is None else ctx.prompt_id


def free_vram() -> None:
    """Unloads every model ComfyUI holds and empties the CUDA cache (before a child process trains)."""
    mm.unload_all_models()
    mm.soft_empty_cache(True)


def progress_text(text: str) -> None:
    """Shows a line of text on the executing node (ComfyUI's progress-text channel); no-op outside a server."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return
    ctx, server = get_executing_context(), getattr(PromptServer, "instance", None)
    if ctx is not None and server is not None:
        server.send_progress_text(text, ctx.node_id, getattr(server, "client_id", None))


def check_interrupt() -> None:
    """Raises ComfyUI's interrupt exception if the user pressed Cancel or POSTed /interrupt."""
    mm.throw_exception_if_processing_interrupted()


# ---- native ComfyUI models --------------------------------------------------------------------

class _ThreadLog(logging.Handler):
    """Collects the log records this thread emits (ComfyUI reports unmatched LoRA keys and failed weight
    calculations only as log lines; other threads' lines are not ours)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.thread = threading.get_ident()
        self.messages: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append((record.levelno, record.getMessage()))


def _patch_shape_problem(patch, shape: tuple[int, ...], key: str) -> str | None:
    """Why a ComfyUI weight patch cannot apply to a weight of ``shape`` (None when it can)."""
    from comfy.weight_adapter.lora import LoRAAdapter

    if isinstance(patch, LoRAAdapter) and patch.weights[3] is None and patch.weights[5] is None:
        up, down = patch.weights[0], patch.weights[1]
        got = (up.shape[0], int(down[0].numel()) if down.ndim > 1 else 0)
        want = (shape[0], int(torch.Size(shape[1:]).numel()))
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0] or got != want:
            return f"{key}: LoRA gives {tuple(up.shape)}·{tuple(down.shape)}, the weight is {tuple(shape)}"
        return None
    if isinstance(patch, tuple) and patch and patch[0] in ("diff", "set"):
        got = tuple(patch[1][0].shape)
        return None if got == tuple(shape) else f"{key}: {patch[0]} is {got}, the weight is {tuple(shape)}"
    # LoHa, LoKr, GLoRA, OFT, LoCon mid weights: let ComfyUI compute it once on a zero weight and watch for the
    # error it would otherwise only log at patch time
    catch = _ThreadLog()
    root = logging.getLogger()
    root.addHandler(catch)
    try:
        comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], torch.zeros(shape), key)
    except Exception as exc:  # ComfyUI's adapters raise many types for misfits
        return f"{key}: {exc}"
    finally:
        root.removeHandler(catch)
    errors = [m for lvl, m in catch.messages if lvl >= logging.ERROR]
    return f"{key}: {errors[0]}" if errors else None


def apply_lora_to_native_model(model, lora_path: str, lora_name: str, strength: float):
    """Patches a ComfyUI MODEL exactly as ComfyUI's LoraLoaderModelOnly does, after checking that every
    tensor of the file maps onto a weight of the model with a matching shape. ComfyUI itself would only log
    'lora key not loaded' (part of the LoRA silently missing) or 'shape … is invalid' at patch time (a LoRA
    for another architecture silently doing nothing); both are refused here."""
    from ..engines.lora_formats import read_lora_file

    if strength == 0:
        return model  # LoraLoaderModelOnly's own shortcut
    tensors, metadata = read_lora_file(lora_path)
    return _apply_native_tensors(model, tensors, metadata, lora_name, strength)


def _apply_native_tensors(model, tensors: dict, metadata: dict, lora_name: str, strength: float):
    from ..engines.lora_formats import describe_keys, metadata_alphas

    layout, arch_guess = describe_keys(tensors)
    # ComfyUI reads alphas from tensors only; peft's metadata alpha would be lost (a ×alpha/rank error)
    extra_alphas = metadata_alphas(tensors, metadata)
    arch = type(model.model.model_config).__name__ if hasattr(model.model, "model_config") else "this model"
    who = f"LoRA '{lora_name}'"
    seen = f" FLENwheel read it as {layout}, apparently for {arch_guess}."
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    lora = comfy.lora_convert.convert_lora({**tensors, **extra_alphas})
    catch = _ThreadLog()
    root = logging.getLogger()
    root.addHandler(catch)
    try:
        patches = comfy.lora.load_lora(lora, key_map)
    finally:
        root.removeHandler(catch)
    prefix = "lora key not loaded: "
    unused = sorted({m[len(prefix):] for _, m in catch.messages if m.startswith(prefix)})
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    wrong = []
    for target, patch in patches.items():
        key, piece = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
        shape = shapes.get(key)
        if shape is None:
            wrong.append(f"{key}: no such weight")
            continue
        if piece is not None:  # (dim, offset, size): a slice of a fused weight
            shape = tuple(piece[2] if d == piece[0] else n for d, n in enumerate(shape))
        problem = _patch_shape_problem(patch, shape, key)
        if problem:
            wrong.append(problem)

    def some(items: list[str], n: int = 3) -> str:
        return ", ".join(f"'{x}'" for x in items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")

    if not patches or len(wrong) == len(patches):
        detail = f"; shapes differ ({some(list(dict.fromkeys(wrong)), 2)})" if wrong else ""
        if wrong and unused:
            detail += f", and {len(unused)} tensors map onto nothing ({some(unused, 2)})"
        raise FlenUserError(f"{who} does not fit {arch}: none of its {len(tensors)} tensors applies to the model's "
                            f"weights{detail}. Either it was made for another architecture, or ComfyUI does not know "
                            "this layout for this model (FLENwheel's own FLUX and Qwen edit nodes convert more "
                            "layouts). Remove it from the stack or pick a LoRA for this model." + seen)
    if unused or wrong:
        parts = []
        if unused:
            parts.append(f"{len(unused)} of its {len(tensors)} tensors map onto no weight of the model "
                         f"({some(unused)})")
        if wrong:
            parts.append(f"{len(wrong)} patches do not fit the weight they map onto "
                         f"({some(list(dict.fromkeys(wrong)), 2)})")
        raise FlenUserError(f"{who} cannot be applied completely to {arch}: " + "; ".join(parts) + ". ComfyUI would "
                            "apply the rest and skip these silently; FLENwheel refuses a partial LoRA. Use a "
                            "LoRA made for this model (text-encoder parts need ComfyUI's LoraLoader with a CLIP)."
                            + seen)
    patched = model.clone()
    applied = set(patched.add_patches(patches, strength))
    left = [str(k) for k in patches if k not in applied]
    if left:
        raise FlenUserError(f"{who} cannot be applied completely to {arch}: ComfyUI did not take the patches for "
                            f"{some(left)}. Remove it from the stack." + seen)
    return patched


def skip_downstream():
    """An output value that makes ComfyUI skip the nodes fed by it, silently (no error)."""
    from comfy_execution.graph_utils import ExecutionBlocker

    return ExecutionBlocker(None)


def save_image_path(filename_prefix: str, width: int, height: int) -> tuple[str, str, int, str]:
    """(folder, file stem, next counter, subfolder) in the output folder, as SaveImage computes them;
    a prefix that leaves the output folder is refused."""
    try:
        folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width, height)
    except Exception as exc:  # ComfyUI raises a bare Exception for paths outside the output folder
        raise FlenUserError(f"filename_prefix '{filename_prefix}' points outside ComfyUI's output folder; "
                            "use a relative prefix such as 'flenwheel/images'.") from exc
    return folder, stem, counter, subfolder


# ---- ComfyUI's own MODEL / CLIP / VAE as the pack's pipes -------------------------------------------------------
#
# FLENFluxFromComfy and FLENQwenEditFromComfy wrap what ComfyUI's native loaders give (UNETLoader, DualCLIPLoader,
# CLIPLoader, VAELoader, a checkpoint loader, ComfyUI-GGUF's loaders: anything that yields a MODEL) into the pipes
# the pack's edit, sweep, generate and model-card nodes take. Sampling is ComfyUI's own (euler over the diffusers
# pipelines' flow-matching sigmas, engines/flow_schedule.py), the LoRA stack goes through ComfyUI's LoRA patching
# (apply_lora_to_native_model, as FLENApplyLoraStack), and ComfyUI's manager moves the weights.

NATIVE_TRAINING_MESSAGE = (
    "{node}: the connected {slot} wraps ComfyUI's own MODEL / CLIP / VAE (FLEN {what} from ComfyUI models), which "
    "the built-in trainers cannot train on: they load the weights themselves in a child process. Connect "
    "{loader} (ComfyUI's split files from models/diffusion_models, text_encoders and vae) or pick a diffusers "
    "folder in 'model'.")

_QWEN_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


def _image_model(model) -> str:
    try:
        return str(model.model.model_config.unet_config.get("image_model", ""))
    except AttributeError:
        return ""


def _native_dtype(model) -> str:
    try:
        return str(model.model.get_dtype()).removeprefix("torch.")
    except AttributeError:
        return "?"


def _check_native_parts(model, clip, vae, arch: str, what: str, token_keys: set[str], clip_hint: str) -> None:
    got = _image_model(model)
    if not hasattr(model, "clone") or not hasattr(model, "model"):
        raise FlenUserError(f"{what}: 'model' is not a ComfyUI MODEL. Connect Load Diffusion Model (UNETLoader), a "
                            "checkpoint loader or ComfyUI-GGUF's Unet Loader (GGUF).")
    if got != arch:
        raise FlenUserError(f"{what}: the MODEL is {got or 'an unknown architecture'} "
                            f"({type(getattr(model.model, 'model_config', model.model)).__name__}), not {arch}. "
                            f"Load the {'FLUX.1' if arch == 'flux' else 'Qwen-Image-Edit-2509'} diffusion model.")
    if not hasattr(clip, "tokenize") or not hasattr(clip, "encode_from_tokens_scheduled"):
        raise FlenUserError(f"{what}: 'clip' is not a ComfyUI CLIP. {clip_hint}")
    keys = set(clip.tokenize("a").keys())
    if not token_keys <= keys:
        raise FlenUserError(f"{what}: the CLIP is the wrong text encoder (it tokenizes for {sorted(keys)}, this "
                            f"model needs {sorted(token_keys)}). {clip_hint}")
    if not hasattr(vae, "decode") or not hasattr(vae, "latent_channels"):
        raise FlenUserError(f"{what}: 'vae' is not a ComfyUI VAE. Connect Load VAE.")
    want = model.get_model_object("latent_format").latent_channels
    if vae.latent_channels != want:
        own = "ae.safetensors" if arch == "flux" else "qwen_image_vae.safetensors"
        raise FlenUserError(f"{what}: the VAE makes {vae.latent_channels}-channel latents but the MODEL takes "
                            f"{want}. Load the model's own VAE ({own}).")


def _native_linears(model) -> dict[str, tuple[int, int]]:
    """The MODEL's patchable linear layers under diffusers names -> (in, out), from ComfyUI's own LoRA key map
    (for FLUX it maps diffusers names onto slices of BFL's fused weights)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    out: dict[str, tuple[int, int]] = {}
    for lora_key, target in key_map.items():
        if not lora_key.startswith("transformer."):
            continue
        key, piece = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
        shape = shapes.get(key)
        if shape is None or len(shape) != 2:
            continue
        out[lora_key[len("transformer."):]] = (int(shape[1]), int(piece[2]) if piece is not None else int(shape[0]))
    return out


def _with_shift(model, schedule: dict, image_seq_len: int):
    """A clone whose ModelSampling has the schedule's shift at this resolution (what ModelSamplingFlux /
    ModelSamplingAuraFlow would set); the sigmas themselves are passed explicitly."""
    import comfy.model_sampling as ms_mod

    from ..engines.flow_schedule import flow_shift

    current = model.get_model_object("model_sampling")
    sampling = type(current)(model.model.model_config)
    if isinstance(sampling, ms_mod.ModelSamplingFlux):
        # ComfyUI's FLUX sampling takes the exponent mu as its "shift"
        sampling.set_parameters(shift=math.log(flow_shift(schedule, image_seq_len)))
    elif isinstance(sampling, ms_mod.ModelSamplingDiscreteFlow):
        sampling.set_parameters(shift=flow_shift(schedule, image_seq_len), multiplier=current.multiplier)
    else:
        return model
    patched = model.clone()
    patched.add_object_patch("model_sampling", sampling)
    return patched


def _empty_latent(vae, width: int, height: int) -> torch.Tensor:
    f = int(vae.spacial_compression_encode())
    shape = [1, int(vae.latent_channels), height // f, width // f]
    if getattr(vae, "latent_dim", 2) == 3:
        shape.insert(2, 1)
    return torch.zeros(shape)


def _pil_to_image(img) -> torch.Tensor:
    from ..engines.image_arrays import pil_to_tensor

    return pil_to_tensor(img)


def _decode(vae, samples: torch.Tensor) -> torch.Tensor:
    images = vae.decode(samples)
    return images.reshape(-1, *images.shape[-3:])[:, :, :, :3].float().clamp(0, 1).cpu()


class _NativePipe:
    """What both native pipes share: the parts, the LoRA-patched model (cached per stack) and the sampler."""

    architecture = ""
    native = True  # the trainers check this (NATIVE_TRAINING_MESSAGE)

    def __init__(self, model, clip, vae, name: str, schedule: dict) -> None:
        self.model, self.clip, self.vae = model, clip, vae
        self.name = name
        self.precision = f"comfyui {_native_dtype(model)}"
        self.files = None
        self.folder = ""
        self.schedule = dict(schedule)
        self._lora_key: tuple | None = None
        self._lora_model = model

    @property
    def size_multiple(self) -> int:
        return int(self.vae.spacial_compression_encode()) * 2

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        return {}  # ComfyUI's own patchers manage these weights

    def _apply_lora(self, model, entry):
        """ComfyUI's own mapping first (as FLEN Apply LoRA Stack); a layout ComfyUI cannot map completely goes
        through the pack's converter (engines/lora_formats.py) onto the model's layers under diffusers names,
        which ComfyUI maps, so the native path takes the same LoRA files as the pack's other paths."""
        from ..engines.lora_formats import convert, read_lora_file

        try:
            return apply_lora_to_native_model(model, entry.path, entry.name, entry.strength)
        except FlenUserError as native_error:
            tensors, metadata = read_lora_file(entry.path)
            try:
                converted = convert(entry.name, tensors, metadata, _native_linears(model), self.architecture)
            except FlenUserError:
                raise native_error from None
        pairs = {}
        for name, m in converted.modules.items():
            pairs[f"transformer.{name}.lora_A.weight"] = m.down.float()
            pairs[f"transformer.{name}.lora_B.weight"] = m.up.float() * m.scale
        return _apply_native_tensors(model, pairs, {}, entry.name, entry.strength)

    def patched_model(self, stack):
        import os

        active = stack.active()
        names = [e.path for e in active]
        if len(set(names)) != len(names):
            raise FlenUserError("The same LoRA is in the stack twice; keep one entry and set its strength.")
        stamps = []
        for e in active:
            try:
                st = os.stat(e.path)
            except OSError as exc:
                raise FlenUserError(f"LoRA '{e.name}' is missing from models/loras ({exc}).") from exc
            stamps.append((e.path, e.strength, st.st_size, st.st_mtime_ns))
        key = tuple(stamps)
        if key != self._lora_key:
            model = self.model
            for e in active:
                model = model if e.strength == 0 else self._apply_lora(model, e)
            self._lora_model, self._lora_key = model, key
        return self._lora_model

    def sample(self, model, latent: torch.Tensor, seed: int, steps: int, cfg: float, positive, negative,
               host, on_step, done: int, total: int) -> torch.Tensor:
        import comfy.sample
        import comfy.samplers

        from ..engines.flow_schedule import flow_sigmas

        h, w = latent.shape[-2:]
        seq_len = (h // 2) * (w // 2)
        model = _with_shift(model, self.schedule, seq_len)
        sigmas = flow_sigmas(self.schedule, steps, seq_len)
        noise = comfy.sample.prepare_noise(latent, seed)

        def callback(step, x0, _x, _total):
            host.check_interrupt()
            if on_step is not None:
                on_step(done + step + 1, total, x0)

        return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas,
                                          positive, negative, latent, callback=callback, disable_pbar=True, seed=seed)


class NativeFluxPipe(_NativePipe):
    """FLEN_FLUX_PIPE over ComfyUI's MODEL / CLIP (clip_l + t5xxl) / VAE (engines.flux_pipeline.ExternalFluxPipe)."""

    architecture = "flux"

    def render(self, jobs, request, stack, host, on_step) -> list[torch.Tensor]:
        import node_helpers

        model = self.patched_model(stack)
        conds: dict[str, list] = {}
        for job in jobs:  # all prompts first: the text encoders leave the GPU once
            if job.prompt not in conds:
                cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(job.prompt))
                conds[job.prompt] = node_helpers.conditioning_set_values(cond, {"guidance": request.guidance})
        total = len(jobs) * request.steps
        latents = []
        for k, job in enumerate(jobs):
            latent = _empty_latent(self.vae, request.width, request.height)
            # guidance is distilled into FLUX.1-dev: cfg 1, so ComfyUI never runs the negative
            latents.append(self.sample(model, latent, job.seed, request.steps, 1.0, conds[job.prompt],
                                       conds[job.prompt], host, on_step, k * request.steps, total))
        return [_decode(self.vae, s) for s in latents]


class NativeQwenEditPipe(_NativePipe):
    """FLEN_QWEN_EDIT_PIPE over ComfyUI's MODEL / CLIP (Qwen2.5-VL) / VAE (engines.qwen_edit.ExternalEditPipe).
    Conditioning as ComfyUI's TextEncodeQwenImageEditPlus builds it, except that the reference latents have the
    output's area (as the pack's diffusers path sets them) rather than a fixed 1024²."""

    architecture = "qwen_image"

    def _encode(self, job, width: int, height: int, prompt: str):
        import comfy.utils
        import node_helpers

        from ..engines.qwen_edit import _dims

        vl_images, refs, image_prompt = [], [], ""
        for i, img in enumerate(job.images):
            samples = _pil_to_image(img).movedim(-1, 1)
            ratio = img.width / img.height
            cw, ch = _dims(job.request.condition_pixels, ratio)
            vl_images.append(comfy.utils.common_upscale(samples, cw, ch, "area", "disabled").movedim(1, -1))
            rw, rh = _dims(width * height, ratio)
            refs.append(self.vae.encode(comfy.utils.common_upscale(samples, rw, rh, "area", "disabled").movedim(1, -1)))
            image_prompt += f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>"
        tokens = self.clip.tokenize(image_prompt + prompt, images=vl_images, llama_template=_QWEN_EDIT_TEMPLATE)
        cond = self.clip.encode_from_tokens_scheduled(tokens)
        return node_helpers.conditioning_set_values(cond, {"reference_latents": refs}, append=True)

    def render(self, jobs, sizes, stack, host, on_step) -> list[torch.Tensor]:
        model = self.patched_model(stack)
        encoded = []
        for job, (w, h) in zip(jobs, sizes, strict=True):  # every instruction first, then every denoise
            positive = self._encode(job, w, h, job.request.instruction)
            negative = (self._encode(job, w, h, job.request.negative_prompt or " ")
                        if job.request.true_cfg > 1.0 else positive)
            encoded.append((positive, negative))
        total = sum(job.request.batch * job.request.steps for job in jobs)
        done, latents = 0, []
        for job, (w, h), (positive, negative) in zip(jobs, sizes, encoded, strict=True):
            r = job.request
            for b in range(r.batch):
                latents.append(self.sample(model, _empty_latent(self.vae, w, h), r.seed + b, r.steps,
                                           max(1.0, r.true_cfg), positive, negative, host, on_step, done, total))
                done += r.steps
        return [_decode(self.vae, s) for s in latents]


def native_flux_pipe(model, clip, vae, name: str, schedule: dict | None = None) -> NativeFluxPipe:
    """FLENFluxFromComfy's pipe; ``schedule`` is a diffusers scheduler config (default: FLUX.1-dev's, shipped)."""
    from ..engines import split_files as sf

    what = "FLEN FLUX from ComfyUI models"
    _check_native_parts(model, clip, vae, "flux", what, {"l", "t5xxl"},
                        "Connect DualCLIPLoader with clip_l and t5xxl, type flux.")
    return NativeFluxPipe(model, clip, vae, name or "comfyui-flux",
                          schedule or sf.shipped_config(sf.FLUX_CONFIGS, "scheduler"))


def native_qwen_edit_pipe(model, clip, vae, name: str, schedule: dict | None = None) -> NativeQwenEditPipe:
    """FLENQwenEditFromComfy's pipe; ``schedule``: a diffusers scheduler config (default: Qwen-Image-Edit-2509's)."""
    from ..engines import split_files as sf

    what = "FLEN Qwen Edit from ComfyUI models"
    _check_native_parts(model, clip, vae, "qwen_image", what, {"qwen25_7b"},
                        "Connect Load CLIP with qwen_2.5_vl_7b (fp8_scaled or bf16), type qwen_image.")
    return NativeQwenEditPipe(model, clip, vae, name or "comfyui-qwen-image-edit",
                              schedule or sf.shipped_config(sf.QWEN_EDIT_CONFIGS, "scheduler"))
