"""Camera-angle and expression instructions for the angle sweep.

The camera lines follow the Chinese phrasing the Qwen-Edit-2509 Multiple-angles LoRA
(dx8152) was trained on, each with its English meaning; Qwen-Image-Edit reads both, and the
LoRA reacts most reliably to the Chinese form, so "zh+en" (both) is the default language.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import FlenUserError


@dataclass(frozen=True)
class SweepLine:
    label: str  # short, file-name safe: front, yaw_left_45, smiling…
    kind: str  # "angle" | "expression" | "custom"
    zh: str
    en: str

    def instruction(self, language: str) -> str:
        if language == "zh":
            return self.zh or self.en
        if language == "en":
            return self.en or self.zh
        if self.zh and self.en:
            return f"{self.zh} ({self.en})"
        return self.zh or self.en


ANGLES: tuple[SweepLine, ...] = (
    SweepLine("front", "angle", "保持镜头不变,正面视角", "Keep the camera as it is, front view"),
    SweepLine("yaw_left_45", "angle", "将镜头向左旋转45度", "Rotate the camera 45 degrees to the left"),
    SweepLine("yaw_right_45", "angle", "将镜头向右旋转45度", "Rotate the camera 45 degrees to the right"),
    SweepLine("yaw_left_90", "angle", "将镜头向左旋转90度", "Rotate the camera 90 degrees to the left"),
    SweepLine("yaw_right_90", "angle", "将镜头向右旋转90度", "Rotate the camera 90 degrees to the right"),
    SweepLine("back", "angle", "将镜头转为背面视角", "Turn the camera to a back view"),
    SweepLine("top_down", "angle", "将镜头转为俯视", "Turn the camera to a top-down view"),
    SweepLine("low_angle", "angle", "将镜头转为仰视", "Turn the camera to a low-angle view"),
    SweepLine("close_up", "angle", "将镜头转为特写镜头", "Turn the camera to a close-up"),
    SweepLine("face_close_up", "angle", "将镜头转为面部特写", "Turn the camera to a close-up of the face"),
    SweepLine("wide", "angle", "将镜头转为广角镜头", "Turn the camera to a wide-angle lens"),
    SweepLine("move_forward", "angle", "将镜头向前移动", "Move the camera forward"),
    SweepLine("move_left", "angle", "将镜头向左移动", "Move the camera to the left"),
    SweepLine("move_right", "angle", "将镜头向右移动", "Move the camera to the right"),
    SweepLine("move_down", "angle", "将镜头向下移动", "Move the camera down"),
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

PRESETS: dict[str, tuple[str, ...]] = {
    "model-card head angles": ("front", "yaw_left_45", "yaw_right_45", "yaw_left_90", "yaw_right_90"),
    "model-card expressions": ("neutral", "smiling", "angry", "sad"),
    "full coverage": tuple(line.label for line in ANGLES) + tuple(line.label for line in EXPRESSIONS),
    "camera angles only": tuple(line.label for line in ANGLES),
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
