"""Qwen-Image-Edit-2509 editor LoRA trainer: an edit-pair set in, ``qwen_lora_vN.safetensors`` out.

    python -m training.train_editor_lora --config editor.yaml [--set steps=500]

Each pair of a set written by FLENEditPairWriter (``engines.edit_pairs``) is 1–3 control images, an
instruction and a target. As in the pipeline, the instruction is encoded by Qwen2.5-VL together with the
control images (at ``condition_resolution``² pixels), the controls are VAE-encoded (at
``control_resolution``² pixels, keeping their aspect ratio) and their tokens are appended to the noisy
target's; the loss is on the target's tokens only. All of it is encoded once and cached, then the text
encoder and VAE are released. Shared machinery (memory, resume, samples, output): ``training.lora_training``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from engines.diffusers_folder import read_model_index
from engines.safe_images import open_rgb
from engines.workspace import validate_character
from training.lora_training import (
    ConfigError,
    Example,
    TrainConfig,
    TrainTask,
    bucket_sizes,
    fit_image,
    image_to_tensor,
    load_transformer,
    main_for,
    pick_bucket,
    release_memory,
    split_file_dtypes,
    tensor_to_image,
)
from training.train_char_lora import _split_files, base_model_key, freeze_dataset, pack, run_name, unpack


@dataclass
class EditorLoraConfig(TrainConfig):
    control_resolution: int = 0        # side of the square-equivalent area of the control latents; 0: resolution
    condition_resolution: int = 384    # side of the area of the control images the VL encoder sees
    sample_pairs: int = 2              # samples: edits of the first N pairs of the set

    RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "control_resolution": (0, 4096), "condition_resolution": (32, 2048), "sample_pairs": (1, 16)}


def _dims(side: int, ratio: float) -> tuple[int, int]:
    """diffusers' calculate_dimensions: (width, height) of about side² pixels, multiples of 32."""
    w = math.sqrt(side * side * ratio)
    return max(32, round(w / 32) * 32), max(32, round(w / ratio / 32) * 32)


class EditorLoraTask(TrainTask):
    """Qwen-Image-Edit-2509 editor LoRA on a FLENwheel edit-pair set."""

    prefix = "qwen_lora"
    architecture = "qwen_image_edit_plus"
    cfg: EditorLoraConfig  # narrows TrainTask.cfg: set from the constructor argument
    trainer_name = "training.train_editor_lora"

    def __init__(self, cfg: EditorLoraConfig) -> None:
        super().__init__(cfg)
        if cfg.batch_size != 1:
            raise ConfigError("batch_size must be 1 for the editor trainer (pairs differ in control and "
                              "instruction lengths); raise 'steps' instead.")
        if cfg.files:
            from engines.qwen_edit import QwenEditFiles

            self.files = _split_files(QwenEditFiles, cfg.files, "Qwen-Image-Edit-2509")
        else:
            read_model_index(cfg.model, ("QwenImageEditPlusPipeline",))
        self.dataset = freeze_dataset(cfg.dataset, by="training.train_editor_lora", kind="edit_pairs")
        self.character = validate_character(cfg.character or str(self.dataset.info.get("character") or "character"))
        self.items = list(self.dataset.items)
        self.control_side = cfg.control_resolution or cfg.resolution
        # A diffusers AutoencoderKLQwenImage, loaded on the first decode. Any: diffusers' top-level names resolve
        # to dummy classes for the checker, and ModelMixin.to is a wrapped function it cannot call.
        self.vae: Any = None

    def run_dir(self) -> Path:
        if self.cfg.run_dir:
            return Path(self.cfg.run_dir)
        return self.dataset.path.parent.parent / "training" / run_name(self.prefix, self.dataset.version, self.cfg)

    def cache_key(self) -> dict[str, Any]:
        cfg = self.cfg
        key: dict[str, Any] = {"trainer": self.trainer_name, "model": base_model_key(cfg), "dataset": self.dataset.hash,
                               "resolution": cfg.resolution, "multiple": cfg.bucket_multiple,
                               "control": self.control_side, "condition": cfg.condition_resolution,
                               "precision": cfg.precision, "msl": cfg.max_sequence_length,
                               "samples": cfg.sample_pairs if cfg.sample_every else 0}
        if cfg.resolutions:  # only when used, so that the caches of earlier runs stay valid
            key["resolutions"] = cfg.all_resolutions()
        return key

    def encode(self, device: torch.device, dtype: torch.dtype) -> tuple[list[Example], list[Example]]:
        from diffusers import QwenImageEditPlusPipeline

        cfg = self.cfg
        if cfg.files:
            from engines.qwen_edit import qwen_edit_pipe_from_files

            pipe = qwen_edit_pipe_from_files(self.files, split_file_dtypes(cfg, dtype), with_transformer=False)
        else:
            pipe = QwenImageEditPlusPipeline.from_pretrained(cfg.model, transformer=None, dtype=dtype)
        for m in (pipe.text_encoder, pipe.vae):
            m.eval().requires_grad_(False).to(device)
        resolutions = cfg.all_resolutions()
        root = self.dataset.path

        def vae_latents(image: Image.Image) -> torch.Tensor:
            x = image_to_tensor(image).unsqueeze(2).to(device, dtype)  # [1, 3, 1, H, W]
            with torch.no_grad():
                return pipe._encode_vae_image(x, generator=None)[:, :, 0].float().cpu()  # [1, C, h, w]

        train, samples = [], []
        for n, it in enumerate(self.items):
            target = open_rgb(root / it["file"])
            # the target at every resolution, each in its own aspect bucket; controls and instruction once
            targets = []
            for res in resolutions:
                bucket = pick_bucket(target.width, target.height, bucket_sizes(res, cfg.bucket_multiple))
                targets.append((res, bucket, vae_latents(fit_image(target, bucket))[0]))
            controls, shapes, conditions = [], [], []
            for c in it.get("controls") or []:
                control = open_rgb(root / c["file"])
                ratio = control.width / control.height
                cw, ch = _dims(self.control_side, ratio)
                cz = vae_latents(control.resize((cw, ch), Image.Resampling.LANCZOS))
                controls.append(pack(cz)[0])
                shapes.append([1, cz.shape[2] // 2, cz.shape[3] // 2])
                qw, qh = _dims(cfg.condition_resolution, ratio)
                conditions.append(pipe.image_processor.resize(control, qh, qw))
            if not controls:
                raise ConfigError(f"edit pair {it['file']} has no control image.")
            with torch.no_grad():
                pe, mask = pipe._get_qwen_prompt_embeds([str(it.get("instruction") or it.get("caption") or "")],
                                                        conditions, device)
            cond = {"prompt_embeds": pe[0].float().cpu(),
                    "prompt_mask": (mask[0] if mask is not None else torch.ones(pe.shape[1])).long().cpu(),
                    "control": torch.cat(controls).float(), "control_shapes": torch.tensor(shapes)}
            for res, bucket, z in targets:
                train.append(Example(it["file"] + (f"@{res}" if len(resolutions) > 1 else ""), bucket, z, cond))
            if cfg.sample_every and n < cfg.sample_pairs:
                _, bucket, z = targets[0]
                samples.append(Example(f"sample:{it['file']}", bucket, torch.zeros_like(z), cond))
        pipe.text_encoder = pipe.vae = None  # released: the peak is the transformer's
        release_memory(device)
        return train, samples

    def load_transformer(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import QwenImageTransformer2DModel

        return load_transformer(QwenImageTransformer2DModel, self.cfg, device, dtype)

    def predict(self, transformer, noisy, t, cond):
        return qwen_edit_predict(transformer, noisy, t, cond)

    def decode(self, latents: torch.Tensor, device: torch.device, dtype: torch.dtype):
        from diffusers import AutoencoderKLQwenImage

        if self.vae is None and self.cfg.files:
            from engines.split_files import load_qwen_vae

            self.vae = load_qwen_vae(self.files.vae, split_file_dtypes(self.cfg, dtype))
        if self.vae is None:
            self.vae = AutoencoderKLQwenImage.from_pretrained(self.cfg.model, subfolder="vae", dtype=dtype).eval()
        vae = self.vae.to(device)
        z = latents.unsqueeze(2).to(device, vae.dtype)
        c = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(z)
        std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(z)
        with torch.no_grad():
            x = vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]
        self.vae.to("cpu")
        return tensor_to_image(x[0])

    def provenance(self) -> dict[str, Any]:
        d = self.dataset
        return {"dataset": {"path": str(d.path), "version": d.version, "hash": d.hash, "counts": d.counts,
                            "character": self.character, "kind": "edit_pairs",
                            "n_controls": d.info.get("n_controls")},
                "control_resolution": self.control_side, "condition_resolution": self.cfg.condition_resolution}


def qwen_edit_predict(transformer, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]):
    """The transformer call of QwenImageEditPlusPipeline: noisy target tokens + control tokens, loss on the
    target's part of the output."""
    b, c, h, w = noisy.shape
    dtype = noisy.dtype
    packed = pack(noisy)
    hidden = torch.cat([packed, cond["control"].to(dtype)], dim=1)
    shapes = [[(1, h // 2, w // 2), *[tuple(int(v) for v in s) for s in cond["control_shapes"][i]]] for i in range(b)]
    mask = cond["prompt_mask"]
    out = transformer(hidden_states=hidden, timestep=t, guidance=None,
                      encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                      encoder_hidden_states=cond["prompt_embeds"].to(dtype), img_shapes=shapes,
                      return_dict=False)[0]
    return unpack(out[:, :packed.shape[1]], c, h, w)


def main(argv: list[str] | None = None) -> int:
    return main_for(EditorLoraConfig, EditorLoraTask, argv)


if __name__ == "__main__":
    raise SystemExit(main())
