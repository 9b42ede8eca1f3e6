"""The angle catalogue against the phrases the Multiple-angles LoRA was trained on (its published list)."""

from __future__ import annotations

import re

import pytest

from engines import angle_catalogue as ac

# dx8152/Qwen-Edit-2509-Multiple-angles: the camera phrases of its model card, verbatim, with the English the
# reference Spaces (and, for the moves left/right/down they do not use, the LoRA's bilingual prompt builders) write
# after them ("中文 English."). Written out here, not derived from the catalogue, so a
# swapped, mistyped or mirrored line fails.
EXPECTED = {
    "move_forward": ("angle", "将镜头向前移动", "Move the camera forward", ac.LORA),
    "move_left": ("angle", "将镜头向左移动", "Move the camera left", ac.LORA),
    "move_right": ("angle", "将镜头向右移动", "Move the camera right", ac.LORA),
    "move_down": ("angle", "将镜头向下移动", "Move the camera down", ac.LORA),
    "yaw_left_45": ("angle", "将镜头向左旋转45度", "Rotate the camera 45 degrees to the left", ac.LORA),
    "yaw_right_45": ("angle", "将镜头向右旋转45度", "Rotate the camera 45 degrees to the right", ac.LORA),
    "yaw_left_90": ("angle", "将镜头向左旋转90度", "Rotate the camera 90 degrees to the left", ac.LORA),
    "yaw_right_90": ("angle", "将镜头向右旋转90度", "Rotate the camera 90 degrees to the right", ac.LORA),
    "top_down": ("angle", "将镜头转为俯视", "Turn the camera to a top-down view", ac.LORA),
    "wide": ("angle", "将镜头转为广角镜头", "Turn the camera to a wide-angle lens", ac.LORA),
    "close_up": ("angle", "将镜头转为特写镜头", "Turn the camera to a close-up", ac.LORA),
    "birds_eye": ("angle", "将相机转向鸟瞰视角", "Turn the camera to a bird's-eye view", ac.LORA),
    "low_angle": ("angle", "将相机切换到仰视视角", "Turn the camera to a worm's-eye view", ac.LORA),
    "front": ("angle", "保持镜头不变,正面视角", "Keep the camera as it is, front view", ac.PACK),
    "back": ("angle", "将镜头转为背面视角", "Turn the camera to a back view", ac.PACK),
    "face_close_up": ("angle", "将镜头转为面部特写", "Turn the camera to a close-up of the face", ac.PACK),
    "neutral": ("expression", "让人物表情平静自然", "Give the person a calm, neutral expression", ac.PACK),
    "smiling": ("expression", "让人物微笑", "Make the person smile", ac.PACK),
    "laughing": ("expression", "让人物开怀大笑", "Make the person laugh", ac.PACK),
    "angry": ("expression", "让人物表情愤怒", "Make the person look angry", ac.PACK),
    "sad": ("expression", "让人物表情悲伤", "Make the person look sad", ac.PACK),
    "surprised": ("expression", "让人物表情惊讶", "Make the person look surprised", ac.PACK),
}
PUBLISHED = {zh for _kind, zh, _en, source in EXPECTED.values() if source == ac.LORA}


def test_every_catalogue_line_is_exactly_the_expected_label_instruction_and_source():
    got = {line.label: (line.kind, line.zh, line.en, line.source) for line in ac.ANGLES + ac.EXPRESSIONS}
    assert got == EXPECTED
    by_label = {line.label: line for line in ac.ANGLES + ac.EXPRESSIONS}
    for label, (_kind, zh, en, _source) in EXPECTED.items():
        line = by_label[label]
        assert line.instruction("zh") == zh
        assert line.instruction("en") == en
        assert line.instruction("zh+en") == f"{zh} {en}."  # the reference Spaces' "中文 English."


@pytest.mark.parametrize("left", [label for label in EXPECTED if "left" in label.split("_")])
def test_each_left_line_has_a_right_mirror_that_differs_only_in_the_side(left):
    right = left.replace("left", "right")
    kind, zh, en, source = EXPECTED[left]
    assert EXPECTED[right] == (kind, zh.replace("左", "右"), en.replace("left", "right"), source)
    by_label = {line.label: line for line in ac.ANGLES}
    a, b = by_label[left], by_label[right]
    assert (b.zh, b.en) == (a.zh.replace("左", "右"), a.en.replace("left", "right"))
    assert "右" not in a.zh and "左" not in b.zh and "right" not in a.en and "left" not in b.en


def test_lora_lines_are_exactly_the_published_phrases_and_the_rest_is_marked_as_the_packs_own():
    lora = [line for line in ac.ANGLES if line.source == ac.LORA]
    assert sorted(line.zh for line in lora) == sorted(PUBLISHED)
    own = {line.label for line in ac.ANGLES if line.source == ac.PACK}
    assert own == {"front", "back", "face_close_up"}
    assert all(line.zh not in PUBLISHED for line in ac.ANGLES if line.source == ac.PACK)
    labels = [line.label for line in ac.ANGLES + ac.EXPRESSIONS]
    assert len(labels) == len(set(labels))


@pytest.mark.parametrize("line", ac.ANGLES, ids=lambda line: line.label)
def test_each_camera_line_says_in_both_languages_what_its_label_says(line):
    """Left stays left, right stays right, 45 stays 45, in the label, the Chinese and the English."""
    words = set(line.label.split("_"))
    for side, zh in (("left", "左"), ("right", "右")):
        in_label = side in words
        assert in_label == (zh in line.zh), line
        assert in_label == (side in line.en.lower()), line
    for degrees in ("45", "90"):
        assert (degrees in words) == (degrees in line.zh) == (degrees in line.en), line
    if line.label.startswith("yaw_"):
        assert "旋转" in line.zh and line.en.startswith("Rotate the camera")
    if line.label.startswith("move_"):
        assert "移动" in line.zh and line.en.startswith("Move the camera")
    if line.label.startswith("move_"):
        for word, zh in {"forward": "前", "down": "下", "left": "左", "right": "右"}.items():
            assert (word in words) == (f"向{zh}" in line.zh), line
    assert re.fullmatch(r"[A-Za-z0-9_]+", line.label)


def test_instruction_languages_and_the_reference_format():
    line = next(line for line in ac.ANGLES if line.label == "yaw_left_45")
    assert line.instruction("zh") == "将镜头向左旋转45度"
    assert line.instruction("en") == "Rotate the camera 45 degrees to the left"
    assert line.instruction("zh+en") == "将镜头向左旋转45度 Rotate the camera 45 degrees to the left."
    custom = ac.parse_custom_lines("look up")[0]
    assert custom.instruction("zh+en") == custom.instruction("zh") == "look up"


def test_presets_keep_to_the_loras_phrases_unless_named_otherwise():
    by_label = {line.label: line for line in ac.ANGLES + ac.EXPRESSIONS}
    opt_in = [name for name in ac.PRESETS if "pack's own" in name]
    assert len(opt_in) == 1
    for name, labels in ac.PRESETS.items():
        angles = [by_label[label] for label in labels if by_label[label].kind == "angle"]
        if name in opt_in:
            assert {line.source for line in angles} == {ac.LORA, ac.PACK}
        else:
            assert all(line.source == ac.LORA for line in angles), name
    assert ac.PRESETS["model-card head angles"] == ("yaw_left_45", "yaw_right_45", "yaw_left_90", "yaw_right_90")
    assert set(ac.PRESETS["camera angles only"]) == {line.label for line in ac.ANGLES if line.source == ac.LORA}
