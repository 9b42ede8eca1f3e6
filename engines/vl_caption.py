"""Captions from Qwen2.5-VL, the text encoder Qwen-Image-Edit-2509 already ships: no extra download.

Two sources, as the Qwen edit loaders find them: a diffusers Qwen-Image-Edit folder (``text_encoder/`` +
``processor/``) or ComfyUI's split text-encoder file (``models/text_encoders/qwen_2.5_vl_7b*.safetensors``) with
ComfyUI's bundled Qwen2.5 tokenizer. Generation is greedy with a fixed token budget, so the same image, weights
and settings give the same caption; the settings go into every caption's provenance.

The prompt asks for pose, expression, clothing, setting and lighting and never the identity: a character LoRA
should bind the identity to the instance token, not to words describing the face.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import FlenUserError

CAPTION_PROMPT = (
    "Describe this photo in one short sentence for a training caption: the person's pose, facial expression, "
    "clothing, the setting and the lighting. Do not name the person. Do not describe the face, skin colour, "
    "ethnicity, age or any other trait that identifies who it is.")
DEFAULT_MAX_NEW_TOKENS = 60
MAX_NEW_TOKENS_LIMIT = 300
DEFAULT_MAX_PIXELS = 448 * 448
MAX_DESCRIPTION_CHARS = 600
HEAD_MISSING = (
    "'{name}' has no language-model head (lm_head.weight) and its config does not tie the head to the "
    "embeddings: ComfyUI's text-encoder files ship without it because the edit only needs hidden states, but "
    "writing captions needs it. Caption with the diffusers folder of Qwen-Image-Edit-2509 (models/diffusers/, "
    "its text_encoder/ holds the head), or use a Qwen2.5-VL-7B-Instruct safetensors file that includes "
    "lm_head.weight.")


@dataclass(frozen=True)
class CaptionSettings:
    """What decides a caption besides the image and the weights (recorded in provenance)."""

    prompt: str = CAPTION_PROMPT
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_pixels: int = DEFAULT_MAX_PIXELS

    def checked(self) -> CaptionSettings:
        if not 1 <= int(self.max_new_tokens) <= MAX_NEW_TOKENS_LIMIT:
            raise FlenUserError(f"max_new_tokens is {self.max_new_tokens}; choose 1–{MAX_NEW_TOKENS_LIMIT}.")
        if int(self.max_pixels) < 28 * 28:
            raise FlenUserError(f"max_pixels is {self.max_pixels}; it must be at least {28 * 28} (one 28×28 patch).")
        if not self.prompt.strip():
            raise FlenUserError("The caption prompt is empty; leave the default or say what to describe.")
        return self


@dataclass
class Captioner:
    """A loaded Qwen2.5-VL (with its head) and processor."""

    model: Any
    processor: Any
    source: str  # folder or file name, for provenance
    source_kind: str  # "diffusers" or "file"
    dtype: str
    info: dict[str, Any] = field(default_factory=dict)


def _processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor())


def load_from_folder(folder: str | Path, dtype: torch.dtype = torch.float32) -> Captioner:
    """The text encoder and processor of a diffusers Qwen-Image-Edit folder."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from .diffusers_folder import read_model_index
    from .qwen_edit import QWEN_EDIT_CLASSES

    folder = Path(folder)
    read_model_index(folder, QWEN_EDIT_CLASSES)
    te = folder / "text_encoder"
    if not (te / "config.json").is_file():
        raise FlenUserError(f"'{folder.name}' has no text_encoder/config.json; download the model folder again.")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(te), dtype=dtype, local_files_only=True)
    if (folder / "processor").is_dir():
        processor = AutoProcessor.from_pretrained(str(folder / "processor"), local_files_only=True)
    else:
        from transformers import Qwen2Tokenizer

        processor = _processor(Qwen2Tokenizer.from_pretrained(str(folder / "tokenizer")))
    model.eval().requires_grad_(False)
    return Captioner(model, processor, folder.name, "diffusers", str(dtype).removeprefix("torch."))


def load_from_file(path: str | Path, tokenizer_folder: str | None, dtype: torch.dtype = torch.float32) -> Captioner:
    """ComfyUI's split Qwen2.5-VL file; it must hold the language-model head (or tie it to the embeddings)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from . import split_files as sf

    info = sf.expect(path, ("qwen25_vl",), "text_encoders",
                     "Qwen2.5-VL-7B (qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled.safetensors)")
    cfg_dict = sf.config_for(info, sf.QWEN_EDIT_CONFIGS, "text_encoder")
    cfg = Qwen2_5_VLConfig(**cfg_dict)
    tied = bool(cfg_dict.get("tie_word_embeddings") or (cfg_dict.get("text_config") or {}).get("tie_word_embeddings"))
    has_head = "lm_head.weight" in info.keys
    if not has_head and not tied:
        raise FlenUserError(HEAD_MISSING.format(name=info.name))
    model = sf.build_empty(lambda: Qwen2_5_VLForConditionalGeneration(cfg))
    sf.load_into(model, path, info, sf.identity_plan(info, sf.qwen_vl_rename), dtype, keep_fp8=True,
                 what="the Qwen2.5-VL captioner", optional=() if has_head else ("lm_head.weight",))
    if not has_head:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    sf.finish(model)
    tokenizer = sf.qwen_tokenizer(sf.tokenizer_folder(info, tokenizer_folder, "Qwen2.5"))
    return Captioner(model, _processor(tokenizer), info.name, "file", str(dtype).removeprefix("torch."),
                     {"storage": info.storage})


def _chat_text(prompt: str) -> str:
    # Qwen2.5-VL's chat format written out: ComfyUI's bundled tokenizer and trained ones carry no chat template.
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")


def clean_description(text: str) -> str:
    """One line, no characters that break captions or templates, bounded length."""
    # U+FFFD: a byte-level token cut in the middle of a character
    text = " ".join(text.replace("{", " ").replace("}", " ").replace("\ufffd", "").split())
    if len(text) > MAX_DESCRIPTION_CHARS:
        text = text[:MAX_DESCRIPTION_CHARS].rsplit(" ", 1)[0]
    return text.strip(" ,")


@torch.no_grad()
def describe(captioner: Captioner, image: Image.Image, settings: CaptionSettings = CaptionSettings(),
             device: torch.device | None = None) -> str:
    """One description of ``image``: greedy decoding, ``settings.max_new_tokens`` at most."""
    settings = settings.checked()
    model = captioner.model
    device = device or next(model.parameters()).device
    size = {"shortest_edge": 56 * 56, "longest_edge": int(settings.max_pixels)}
    inputs = captioner.processor(text=[_chat_text(settings.prompt)], images=[image.convert("RGB")],
                                 images_kwargs={"size": size}, return_tensors="pt")
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    tok = captioner.processor.tokenizer
    out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=int(settings.max_new_tokens),
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    new = out[0, inputs["input_ids"].shape[1]:]
    return clean_description(tok.decode(new, skip_special_tokens=True))


def caption_with_token(description: str, token: str, template: str = "{token}, {description}") -> str:
    """The final caption: ``template`` filled in; the instance token is always present (prepended if the
    template left it out)."""
    text = template.format_map({"token": token, "description": description})
    text = ", ".join(p for p in (" ".join(s.split()) for s in text.split(",")) if p)
    return text if token in text else f"{token}, {text}" if text else token


def provenance(captioner: Captioner, settings: CaptionSettings) -> dict[str, Any]:
    return {"captioner": "Qwen2.5-VL", "source": captioner.source, "source_kind": captioner.source_kind,
            "dtype": captioner.dtype, "decoding": "greedy", "do_sample": False, "num_beams": 1,
            **asdict(settings), **captioner.info}
