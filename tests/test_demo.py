"""The README's main job: `python -m tools.demo` runs the whole flywheel on the tiny models, end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
EXPECTED = ["dataset v1", "char_lora_v1", "model card v1", "edit pairs v1", "qwen_lora_v1", "dataset v2",
            "char_lora_v2", "model card v2", "comparison"]


def test_demo_runs_the_whole_loop_and_its_outputs_exist(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.demo", "--workdir", str(tmp_path / "demo")], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    assert "/flenwheel/review/page" in out and "rejected side" in out
    # the world's editor: the filter passes some edits and rejects others, and the editor LoRA trained on the
    # reviewed edits passes more of the next sweep (measured: 11 -> 26 of 48)
    before = re.search(r"on the world editor's edits: (\d+) of (\d+) image\(s\) passed", out)
    after = re.search(r"identity filter with qwen_lora_v1: (\d+) of (\d+) image\(s\) passed", out)
    assert before and after, out[-4000:]
    assert 0 < int(before.group(1)) < int(before.group(2)), before.group(0)
    assert int(after.group(1)) > int(before.group(1)), (before.group(0), after.group(0))
    made = {label.strip(): path for label, path in re.findall(r"^  (.{14}) (/\S+)$", out, re.M)}
    for label in EXPECTED:
        assert label in made, (label, out[-3000:])
        assert Path(made[label]).exists(), (label, made[label])
    assert made["comparison"].endswith(".compare.json")
    assert "MISSING" not in out
    # the comparison on the tiny world: base, v1 and v2 with numbers in every card row, v1 above the base
    for row in ("neutral", "smiling", "angry", "sad", "T-pose", "standing", "sitting"):
        line = re.search(rf"^\s+{row}\s+(-?\d\.\d+)\s+(-?\d\.\d+) \([+-]\d\.\d+\)\s+(-?\d\.\d+) \(", out, re.M)
        assert line, (row, out[-3000:])
    mean = re.search(r"^\s+mean_similarity\s+(-?\d\.\d+)\s+(-?\d\.\d+) \(([+-]\d\.\d+)\)", out, re.M)
    assert mean and float(mean.group(3)) >= 0.04, out[-3000:]
