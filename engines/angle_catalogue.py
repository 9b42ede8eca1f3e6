"""Camera-angle and expression instructions for the angle sweep.

The camera lines marked ``source="lora"`` are the phrases the Qwen-Edit-2509 Multiple-angles LoRA
(dx8152) was trained on, in its published Chinese wording, with the English its reference Spaces write
after it ("中文 English."). The LoRA reacts most reliably to those exact phrases, so the presets use only
them; lines marked ``source="pack"`` (a front view, a back view, a face close-up) are the pack's own
wording, which the LoRA never saw: opt in with the preset that names them. Expressions are the pack's own
too (the base editor follows them; the angles LoRA is not about expressions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import FlenUserError

LORA, PACK = "lora", "pack"


@dataclass(frozen=True)
class SweepLine:
    label: str  # short, file-name safe: yaw_left_45, smiling…
    kind: str  # "angle" | "expression" | "custom"
    zh: str
    en: str
    source: str = PACK  # LORA: a Multiple-angles training phrase; PACK: the pack's own wording

    def instruction(self, language: str) -> str:
        if language == "zh":
            return self.zh or self.en
        if language == "en":
            return self.en or self.zh
        if self.zh and self.en:
            return f"{self.zh} {self.en}."
        return self.zh or self.en


ANGLES: tuple[SweepLine, ...] = (
    SweepLine("move_forward", "angle", "将镜头向前移动", "Move the camera forward", LORA),
    SweepLine("move_left", "angle", "将镜头向左移动", "Move the camera left", LORA),
    SweepLine("move_right", "angle", "将镜头向右移动", "Move the camera right", LORA),
    SweepLine("move_down", "angle", "将镜头向下移动", "Move the camera down", LORA),
    SweepLine("yaw_left_45", "angle", "将镜头向左旋转45度", "Rotate the camera 45 degrees to the left", LORA),
    SweepLine("yaw_right_45", "angle", "将镜头向右旋转45度", "Rotate the camera 45 degrees to the right", LORA),
    SweepLine("yaw_left_90", "angle", "将镜头向左旋转90度", "Rotate the camera 90 degrees to the left", LORA),
    SweepLine("yaw_right_90", "angle", "将镜头向右旋转90度", "Rotate the camera 90 degrees to the right", LORA),
    SweepLine("top_down", "angle", "将镜头转为俯视", "Turn the camera to a top-down view", LORA),
    SweepLine("wide", "angle", "将镜头转为广角镜头", "Turn the camera to a wide-angle lens", LORA),
    SweepLine("close_up", "angle", "将镜头转为特写镜头", "Turn the camera to a close-up", LORA),
    SweepLine("birds_eye", "angle", "将相机转向鸟瞰视角", "Turn the camera to a bird's-eye view", LORA),
    SweepLine("low_angle", "angle", "将相机切换到仰视视角", "Turn the camera to a worm's-eye view", LORA),
    SweepLine("front", "angle", "保持镜头不变,正面视角", "Keep the camera as it is, front view", PACK),
    SweepLine("back", "angle", "将镜头转为背面视角", "Turn the camera to a back view", PACK),
    SweepLine("face_close_up", "angle", "将镜头转为面部特写", "Turn the camera to a close-up of the face", PACK),
)

EXPRESSIONS: tuple[SweepLine, ...] = (
    SweepLine("neutral", "expression", "让人物表情平静自然", "Give the person a calm, neutral expression"),
    SweepLine("smiling", "expression", "让人物微笑", "Make the person smile"),
    SweepLine("laughing", "expression", "让人物开怀大笑", "Make the person laugh"),
    SweepLine("angry", "expression", "让人物表情愤怒", "Make the person look angry"),
    SweepLine("sad", "expression", "让人物表情悲伤", "Make the person look sad"),
    SweepLine("surprised", "expression", "让人物表情惊讶", "Make the person look surprised"),
)

_BY_LABEL = {line.label: line for line in ANGLES + EXPRESSIONS}

_LORA_ANGLES = tuple(line.label for line in ANGLES if line.source == LORA)

PRESETS: dict[str, tuple[str, ...]] = {
    "model-card head angles": ("yaw_left_45", "yaw_right_45", "yaw_left_90", "yaw_right_90"),
    "model-card expressions": ("neutral", "smiling", "angry", "sad"),
    "full coverage": _LORA_ANGLES + tuple(line.label for line in EXPRESSIONS),
    "camera angles only": _LORA_ANGLES,
    "camera angles incl. the pack's own (front, back, face close-up)": tuple(line.label for line in ANGLES),
    "custom lines only": (),
}
LANGUAGES = ("zh+en", "zh", "en")

_LABEL_OK = re.compile(r"^[A-Za-z0-9_\-]{1,48}$")


def parse_custom_lines(text: str) -> list[SweepLine]:
    """One line per instruction: ``label: instruction`` or just the instruction."""
    lines = []
    for n, raw in enumerate(text.splitlines(), start=1):
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        label, sep, rest = raw.partition(":")
        if sep and _LABEL_OK.match(label.strip()) and rest.strip():
            label, instruction = label.strip(), rest.strip()
        else:
            label, instruction = f"custom_{n}", raw
        lines.append(SweepLine(label, "custom", "", instruction))
    return lines


def sweep_lines(preset: str, custom: str = "") -> list[SweepLine]:
    if preset not in PRESETS:
        raise FlenUserError(f"Unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}.")
    lines = [_BY_LABEL[label] for label in PRESETS[preset]] + parse_custom_lines(custom)
    if not lines:
        raise FlenUserError("The angle list is empty: pick a preset other than 'custom lines only' or write "
                            "custom lines (one instruction per line, optionally 'label: instruction').")
    seen: set[str] = set()
    for line in lines:
        if line.label in seen:
            raise FlenUserError(f"Label '{line.label}' appears twice in the sweep; labels name the outputs, "
                                "so make them unique.")
        seen.add(line.label)
    return lines
