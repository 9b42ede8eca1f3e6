"""FLUX.1 character LoRA trainer: a frozen dataset version in, ``char_lora_vN.safetensors`` out.

    python -m training.train_char_lora --config char.yaml [--set steps=500]

The dataset is a version folder written by FLENDatasetWriter (``engines.dataset``); it is frozen
before training so the LoRA always names a version that can no longer change. Captions are the
instance prompts; with ``prior_preservation`` the images of ``class_images`` (captioned with
``class_prompt``) keep the class from drifting. Images go into aspect-ratio buckets of about
``resolution``² pixels. Phased training: ``init_lora`` starts from an earlier LoRA
(head phase ``char_lora_v1`` → body phase ``char_lora_v2``); ``phase`` picks the dataset's head or
body images. ``trigger_placement`` puts the instance token first, last or in a ``[trigger]`` placeholder;
``caption_dropout_rate`` trains that share of examples with the empty caption. The shared machinery
(memory, resume, schedules, samplers, EMA, samples, output) is in ``training.lora_training``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from engines import dataset as ds
from engines.diffusers_folder import read_model_index
from engines.errors import FlenUserError
from engines.safe_images import open_image
from engines.workspace import validate_character
from training.lora_training import (
    ConfigError,
    Example,
    TrainConfig,
    TrainTask,
    bucket_sizes,
    config_dict,
    fit_image,
    image_to_tensor,
    main_for,
    pick_bucket,
    release_memory,
    split_file_dtypes,
    tensor_to_image,
)

PHASES = ("all", "head", "body")
# where the instance token goes in each caption (ai-toolkit's trigger_word / [trigger] behaviour is replace_placeholder)
TRIGGER_PLACEMENTS = ("as_captioned", "prepend", "append", "replace_placeholder")
PLACEHOLDERS = ("[trigger]", "{token}")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_SAMPLE_CELLS = ("neutral / front", "smiling / three-quarter", "angry / profile", "standing / front")
# keys that change how a run is carried out but not what it learns (left out of the run folder's name)
RUN_ONLY_KEYS = ("run_dir", "stop_at_step", "resume", "log_every", "checkpoint_every", "keep_checkpoints",
                 "memory_cap_gb", "device", "sample_every", "sample_prompts", "sample_steps", "sample_size",
                 "sample_seed", "sample_shift", "output_dir", "tensorboard", "identity_model", "identity_root")
# keys added after runs were first named: left out of the name while at their default, so that an earlier
# run's folder (and its checkpoints) keeps its name
LATER_KEYS = ("resolutions", "logit_mean", "logit_std", "sigmoid_scale", "discrete_flow_shift", "weighting_scheme",
              "lr_scheduler", "lr_warmup_steps", "ema", "ema_decay", "caption_dropout_rate", "trigger_placement")


@dataclass
class CharLoraConfig(TrainConfig):
    phase: str = "all"                 # all | head | body: which of the dataset's images
    instance_token: str = ""           # default: the dataset's token (used in the default sample prompts)
    prior_preservation: bool = False
    class_images: str = ""             # folder of class images (prior preservation)
    class_prompt: str = ""             # default: the dataset's class prompt
    prior_loss_weight: float = 1.0
    caption_dropout_rate: float = 0.0  # share of steps' examples trained with an empty caption
    trigger_placement: str = "as_captioned"
    identity_model: str = ""           # face pack (or dlib) scoring each sample step's likeness; "": none
    identity_root: str = ""            # the folder holding models/<pack> (ComfyUI's models/insightface)

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"phase": PHASES, "trigger_placement": TRIGGER_PLACEMENTS}
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {"prior_loss_weight": (0.0, 100.0),
                                                        "caption_dropout_rate": (0.0, 1.0)}


def place_trigger(caption: str, token: str, placement: str) -> str:
    """The caption a training image is trained with. as_captioned: the dataset's caption (the token alone when it
    has none); prepend / append: the token first / last, once; replace_placeholder: [trigger] or {token} become
    the token, and a caption with neither gets the token in front."""
    caption = caption.strip()
    if placement == "as_captioned" or not token:
        return caption or token
    if placement == "replace_placeholder":
        if any(p in caption for p in PLACEHOLDERS):
            for p in PLACEHOLDERS:
                caption = caption.replace(p, token)
            return caption
        placement = "prepend"
    rest = [part.strip() for part in caption.replace(token, "").split(",")]
    rest_text = ", ".join(part for part in rest if part)
    if not rest_text:
        return token
    return f"{token}, {rest_text}" if placement == "prepend" else f"{rest_text}, {token}"


def run_name(prefix: str, version: str, cfg: TrainConfig) -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    defaults["resolutions"] = []
    data = {k: v for k, v in config_dict(cfg).items()
            if k not in RUN_ONLY_KEYS and not (k in LATER_KEYS and v == defaults.get(k))}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{prefix}-{version}-{digest}"


def base_model_key(cfg: TrainConfig) -> str | dict[str, str]:
    """What identifies the base model in the cache key: the diffusers folder, or the split files."""
    if cfg.files:
        return {k: str(Path(v).resolve()) for k, v in sorted(cfg.files.items())}
    return str(Path(cfg.model).resolve())


def flux_files(files: dict[str, str]):
    from engines.flux_pipeline import FluxFiles

    return _split_files(FluxFiles, files, "FLUX.1")


def _split_files(cls, files: dict[str, str], what: str):
    import dataclasses as dc

    names = [f.name for f in dc.fields(cls)]
    required = [f.name for f in dc.fields(cls) if f.default is dc.MISSING]
    unknown = [k for k in files if k not in names]
    missing = [k for k in required if not files.get(k)]
    if unknown or missing:
        raise ConfigError(f"'files' of the {what} base model needs {', '.join(required)} (optional: "
                          f"{', '.join(n for n in names if n not in required)}); "
                          + (f"unknown: {', '.join(unknown)}" if unknown else f"missing: {', '.join(missing)}") + ".")
    for key in required:
        if not Path(files[key]).is_file():
            raise ConfigError(f"'files.{key}' is {files[key]}, which is not a file.")
    return cls(**files)


def freeze_dataset(path: str, by: str, kind: str) -> ds.Dataset:
    p = Path(path)
    if not (p / ds.INFO_NAME).is_file():
        raise ConfigError(f"dataset {p} is not a dataset version folder (no {ds.INFO_NAME}); point it at e.g. "
                          "output/flenwheel/<character>/datasets/v1.")
    info = ds.read_info(p)
    if info.get("kind", "character") != kind:
        raise ConfigError(f"dataset {p} is a '{info.get('kind')}' set; this trainer needs a '{kind}' set.")
    ds.freeze(p, by=by)
    d = ds.load_dataset(p, verify=True)
    if d.problems:
        raise ConfigError(f"dataset {p} is damaged: {'; '.join(d.problems[:3])}.")
    return d


class CharLoraTask(TrainTask):
    """FLUX.1 character LoRA on a FLENwheel dataset version."""

    prefix = "char_lora"
    architecture = "flux"
    cfg: CharLoraConfig  # narrows TrainTask.cfg: set from the constructor argument
    trainer_name = "training.train_char_lora"

    def __init__(self, cfg: CharLoraConfig) -> None:
        super().__init__(cfg)
        if cfg.files:
            self.files = flux_files(cfg.files)
        else:
            read_model_index(cfg.model, ("FluxPipeline",))
        self.dataset = freeze_dataset(cfg.dataset, by="training.train_char_lora", kind="character")
        self.character = validate_character(cfg.character or str(self.dataset.info.get("character") or "character"))
        self.items = [it for it in self.dataset.items if cfg.phase == "all" or it.get("phase") == cfg.phase]
        if not self.items:
            raise ConfigError(f"dataset {self.dataset.version} has no '{cfg.phase}' images "
                              f"(counts: {self.dataset.counts}).")
        self.token = cfg.instance_token or str(self.dataset.info.get("instance_token") or "")
        self.class_prompt = cfg.class_prompt or str(self.dataset.info.get("class_prompt") or "")
        self.prior_loss_weight = cfg.prior_loss_weight
        self.caption_dropout_rate = cfg.caption_dropout_rate
        if cfg.trigger_placement != "as_captioned" and not self.token:
            raise ConfigError(f"trigger_placement '{cfg.trigger_placement}' needs an instance token; the dataset has "
                              "none: set 'instance_token' (e.g. 'ohwx person').")
        self.captions = {it["file"]: place_trigger(str(it.get("caption") or ""), self.token, cfg.trigger_placement)
                         for it in self.items}
        self.class_files: list[Path] = []
        if cfg.prior_preservation:
            folder = Path(cfg.class_images)
            if not cfg.class_images or not folder.is_dir():
                raise ConfigError("prior_preservation needs 'class_images': a folder of images of the class "
                                  f"(e.g. other people), got '{cfg.class_images}'.")
            self.class_files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.class_files:
                raise ConfigError(f"class_images folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}).")
            if not self.class_prompt:
                raise ConfigError("prior_preservation needs 'class_prompt' (e.g. 'a photo of a person'); the "
                                  "dataset has none.")
        if cfg.identity_model and not cfg.sample_every:
            raise ConfigError("identity_model scores the sample images of each sample step; set 'sample_every' "
                              "(e.g. to checkpoint_every) or leave identity_model empty.")
        # A diffusers AutoencoderKL, loaded on the first decode. Any: diffusers' top-level names resolve to dummy
        # classes for the checker, and ModelMixin.to is a wrapped function it cannot call.
        self.vae: Any = None

    def run_dir(self) -> Path:
        if self.cfg.run_dir:
            return Path(self.cfg.run_dir)
        workspace = self.dataset.path.parent.parent
        return workspace / "training" / run_name(self.prefix, self.dataset.version, self.cfg)

    def sample_prompts(self) -> list[str]:
        cfg = self.cfg
        if cfg.sample_prompts:
            return [p.replace("{token}", self.token) for p in cfg.sample_prompts]
        from engines.model_card import DEFAULT_PROMPT_SET, parse_prompt_set

        cells = {c.key: c for c in parse_prompt_set(DEFAULT_PROMPT_SET)}
        return [cells[k].prompt.replace("{token}", self.token or "the person") for k in DEFAULT_SAMPLE_CELLS
                if k in cells]

    def cache_key(self) -> dict[str, Any]:
        cfg = self.cfg
        key = {"trainer": self.trainer_name, "model": base_model_key(cfg), "dataset": self.dataset.hash,
               "items": [it["file"] for it in self.items], "resolution": cfg.resolution,
               "multiple": cfg.bucket_multiple, "precision": cfg.precision, "msl": cfg.max_sequence_length,
               "class": [str(p) for p in self.class_files], "class_prompt": self.class_prompt,
               "samples": self.sample_prompts() if cfg.sample_every else [], "sample_size": cfg.sample_size}
        # added only when used, so that the caches of earlier runs stay valid
        if cfg.resolutions:
            key["resolutions"] = cfg.all_resolutions()
        if cfg.trigger_placement != "as_captioned":
            key["captions"] = self.captions
        if cfg.caption_dropout_rate:
            key["null_caption"] = True
        return key

    # -- encoding (once)
    def encode(self, device: torch.device, dtype: torch.dtype) -> tuple[list[Example], list[Example]]:
        from diffusers import FluxPipeline

        from engines.flux_pipeline import text_length

        cfg = self.cfg
        if cfg.files:
            from engines.flux_pipeline import flux_pipe_from_files

            pipe = flux_pipe_from_files(self.files, split_file_dtypes(cfg, dtype), with_transformer=False)
        else:
            pipe = FluxPipeline.from_pretrained(cfg.model, transformer=None, dtype=dtype)
        for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
            m.eval().requires_grad_(False).to(device)
        resolutions = cfg.all_resolutions()
        # what the model card renders with too: a model whose tokenizer reads fewer tokens gets that many
        msl = text_length(pipe, cfg.max_sequence_length)
        texts: dict[str, dict[str, torch.Tensor]] = {}

        def text(prompt: str) -> dict[str, torch.Tensor]:
            if prompt not in texts:
                with torch.no_grad():
                    pe, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                       num_images_per_prompt=1,
                                                       max_sequence_length=msl)
                texts[prompt] = {"prompt_embeds": pe[0].float().cpu(), "pooled": pooled[0].float().cpu()}
            return texts[prompt]

        def latents(path: Path, res: int) -> tuple[tuple[int, int], torch.Tensor]:
            im, _ = open_image(path)
            with im:
                bucket = pick_bucket(im.width, im.height, bucket_sizes(res, cfg.bucket_multiple))
                x = image_to_tensor(fit_image(im, bucket)).to(device, dtype)
            with torch.no_grad():
                z = pipe.vae.encode(x).latent_dist.mode()
            z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
            return bucket, z[0].float().cpu()

        train = []
        for res in resolutions:  # every image at every resolution, each in its own aspect bucket
            at = f"@{res}" if len(resolutions) > 1 else ""
            for it in self.items:
                bucket, z = latents(Path(it["image_path"]), res)
                train.append(Example(it["file"] + at, bucket, z, text(self.captions[it["file"]])))
            for p in self.class_files:
                bucket, z = latents(p, res)
                train.append(Example(f"class:{p.name}{at}", bucket, z, text(self.class_prompt), prior=True))
        self.null_cond = dict(text("")) if cfg.caption_dropout_rate else None
        samples = []
        if cfg.sample_every:
            size = cfg.sample_size or cfg.resolution
            f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
            shape = (pipe.vae.config.latent_channels, size // f, size // f)
            samples = [Example(f"sample:{i}", (size, size), torch.zeros(shape), text(p))
                       for i, p in enumerate(self.sample_prompts())]
        pipe.text_encoder = pipe.text_encoder_2 = pipe.vae = None  # released: the peak is the transformer's
        release_memory(device)
        return train, samples

    def load_transformer(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import FluxTransformer2DModel

        from training.lora_training import load_transformer

        return load_transformer(FluxTransformer2DModel, self.cfg, device, dtype)

    def predict(self, transformer, noisy, t, cond):
        return flux_predict(transformer, noisy, t, cond, self.cfg.guidance)

    def decode(self, latents: torch.Tensor, device: torch.device, dtype: torch.dtype):
        from diffusers import AutoencoderKL

        if self.vae is None and self.cfg.files:
            from engines.split_files import load_flux_vae

            self.vae = load_flux_vae(self.files.vae, split_file_dtypes(self.cfg, dtype))
        if self.vae is None:
            self.vae = AutoencoderKL.from_pretrained(self.cfg.model, subfolder="vae", dtype=dtype).eval()
        vae = self.vae.to(device)
        z = latents / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            x = vae.decode(z.to(device, vae.dtype), return_dict=False)[0]
        self.vae.to("cpu")
        return tensor_to_image(x[0])

    def identity_scorer(self):
        """The samples' likeness: the cosine of each sample's face to the mean of the dataset images' faces
        (engines.identity, as the model card scores), averaged over the samples; a sample without a face
        counts 0, so a step whose samples lose the face cannot win."""
        if not self.cfg.identity_model:
            return None
        import numpy as np

        from engines import face_backends, identity
        from engines.safe_images import open_rgb

        model = face_backends.load_face_model(self.cfg.identity_root, self.cfg.identity_model)
        try:
            bank = identity.build_bank(model, [np.asarray(open_rgb(Path(it["image_path"]))) for it in self.items],
                                       self.cfg.identity_root)
        except FlenUserError as exc:
            raise ConfigError(f"identity_model '{self.cfg.identity_model}' finds no usable face in the dataset's "
                              f"images, so the samples cannot be scored against them ({exc}). Choose another face "
                              "model or set identity_model to none.") from None

        def score(images: list) -> dict[str, Any]:
            rows = identity.score_images(bank, model, [np.asarray(im.convert("RGB")) for im in images])
            scores = [r.score_mean for r in rows]
            return {"score": round(sum(sc or 0.0 for sc in scores) / max(1, len(scores)), 4), "scores": scores,
                    "faces": sum(sc is not None for sc in scores), "model": self.cfg.identity_model,
                    "references": len(bank.references)}

        return score

    def provenance(self) -> dict[str, Any]:
        d = self.dataset
        return {"dataset": {"path": str(d.path), "version": d.version, "hash": d.hash, "counts": d.counts,
                            "character": self.character, "instance_token": self.token,
                            "items_used": len(self.items), "phase": self.cfg.phase},
                "captions": {"trigger_placement": self.cfg.trigger_placement,
                             "caption_dropout_rate": self.cfg.caption_dropout_rate, "used": self.captions},
                "prior_preservation": {"class_images": len(self.class_files), "class_prompt": self.class_prompt}
                if self.class_files else None}


def pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device, frame: int = 0) -> torch.Tensor:
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 0] = frame
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def flux_predict(transformer, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
    b, c, h, w = noisy.shape
    dtype = noisy.dtype
    pe = cond["prompt_embeds"].to(dtype)
    g = torch.full((b,), guidance, device=noisy.device, dtype=torch.float32) \
        if transformer.config.guidance_embeds else None
    out = transformer(hidden_states=pack(noisy), timestep=t, guidance=g,
                      pooled_projections=cond["pooled"].to(dtype), encoder_hidden_states=pe,
                      txt_ids=torch.zeros(pe.shape[1], 3, device=noisy.device),
                      img_ids=image_ids(h // 2, w // 2, noisy.device), return_dict=False)[0]
    return unpack(out, c, h, w)


def main(argv: list[str] | None = None) -> int:
    return main_for(CharLoraConfig, CharLoraTask, argv)


if __name__ == "__main__":
    raise SystemExit(main())
