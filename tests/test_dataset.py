"""Versioned datasets and edit-pair sets: trainer layouts, captions, hash, freezing, crashes, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from engines import dataset as ds
from engines import edit_pairs as ep
from engines import review_store as rs
from engines.errors import FlenUserError

try:
    import tomllib  # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
TOKEN = "ohwx_char person"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def noise(seed: int, size=(24, 32)) -> np.ndarray:
    return np.random.default_rng(seed).random((size[0], size[1], 3)).astype(np.float32)


def flat(rgb, size=(16, 16)) -> np.ndarray:
    a = np.zeros((*size, 3), dtype=np.float32)
    a[:] = np.asarray(rgb, dtype=np.float32) / 255.0
    return a


# What the trainers read: images in a folder, captions by stem; controls by name (ai-toolkit) or by
# stem / stem_<k> (musubi-tuner), per their documentation and the example configs in shared/reference.

def ai_toolkit_read(entry: dict) -> list[dict]:
    folder = Path(entry["folder_path"])
    out = []
    for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        caption = img.with_suffix("." + entry.get("caption_ext", "txt"))
        controls = [Path(c) / img.name for c in entry.get("control_path") or []]
        assert all(c.is_file() for c in controls), f"ai-toolkit finds no control named {img.name}"
        out.append({"stem": img.stem, "caption": caption.read_text(encoding="utf-8"), "controls": controls})
    return out


def musubi_read(toml_text: str) -> list[dict]:
    cfg = tomllib.loads(toml_text)
    out = []
    for d in cfg["datasets"]:
        folder, ext = Path(d["image_directory"]), cfg["general"]["caption_extension"]
        for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS):
            controls = []
            if d.get("control_directory"):
                cdir = Path(d["control_directory"])
                single = sorted(cdir.glob(f"{img.stem}.*"))
                numbered = sorted(cdir.glob(f"{img.stem}_[0-9]*.*"))
                controls = single or numbered
                assert controls, f"musubi-tuner finds no control for {img.stem}"
            out.append({"stem": img.stem, "caption": (folder / (img.stem + ext)).read_text(encoding="utf-8"),
                        "controls": controls})
    return out


def folder_view(version_dir: Path) -> dict[str, str]:
    """{relative image path: caption} as a folder-reading trainer sees the version."""
    view = {}
    for img in version_dir.rglob("*.png"):
        cap = img.with_suffix(".txt")
        assert cap.is_file(), f"{img} has no caption"
        view[img.relative_to(version_dir).as_posix()] = cap.read_text(encoding="utf-8")
    return view


# ---- layout and captions ----------------------------------------------------------------------

def test_layout_captions_and_manifest_match_what_trainers_read(tmp_path):
    metas = [
        {"label": "yaw_left_45", "label_kind": "angle", "instruction": "将镜头向左旋转45度", "seed": 3, "model": "qwen",
         "loras": [{"name": "angles.safetensors", "strength": 1.0}], "identity_score": 0.82},
        {"label": "smiling", "label_kind": "expression", "kind": "enriched", "seed": 4},
        {"prompt": "full body photo", "kind": "synthetic", "phase": "body", "seed": 5, "model": "flux"},
        {"source": "photo_01.jpg"},
    ]
    res = ds.write_dataset(tmp_path, "alice", [noise(k) for k in range(4)], metas, token=TOKEN,
                           class_prompt="a photo of a person")
    d = ds.load_dataset(res.dataset.path)
    assert d.path == tmp_path / "flenwheel" / "alice" / "datasets" / "v1" and d.consistent and not d.notes
    assert d.counts == {"images": 4, "head": 3, "body": 1, "pristine": 1, "enriched": 2, "synthetic": 1,
                        "near_duplicates": 0}
    assert {p.relative_to(d.path).as_posix() for p in d.folders} == {"head/enriched", "body/synthetic",
                                                                     "head/pristine"}
    captions = {i["file"]: i["caption"] for i in d.items}
    assert captions["head/enriched/alice_00001.png"] == "ohwx_char person, yaw left 45"
    assert captions["head/enriched/alice_00002.png"] == "ohwx_char person, smiling"
    assert captions["body/synthetic/alice_00003.png"] == "ohwx_char person"
    assert folder_view(d.path) == captions  # the folders hold exactly the manifest, caption by caption
    # every leaf folder is a dataset entry for ai-toolkit and for musubi-tuner, stems shared
    for folder in d.folders:
        at = ai_toolkit_read({"folder_path": str(folder), "caption_ext": "txt"})
        mu = musubi_read(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nimage_directory = "{folder}"\n')
        assert [x["stem"] for x in at] == [x["stem"] for x in mu] and at
        assert all(x["caption"].startswith(TOKEN) for x in at + mu)
    first = d.items[0]
    assert (first["seed"], first["model"], first["identity_score"], first["kind"], first["phase"]) == (
        3, "qwen", 0.82, "enriched", "head")
    assert first["instruction"] == "将镜头向左旋转45度" and first["loras"][0]["name"] == "angles.safetensors"
    assert d.items[3]["source"] == "photo_01.jpg" and len(first["sha256"]) == 64 and first["phash"]
    assert d.info["instance_token"] == TOKEN and d.info["trigger_word"] == "ohwx_char"
    assert d.info["class_prompt"] == "a photo of a person" and d.info["status"] == "draft"
    assert d.as_flen_dataset()["hash"] == d.hash == res.dataset.hash
    assert not list(d.path.rglob(".tmp-*"))


def test_caption_template_fields_and_refusals(tmp_path):
    meta = {"angle": "low_angle", "expression": "sad", "pose": "sitting"}
    cap = ds.render_caption("photo of {token}, {angle}, {expression}, {pose}, {kind}", TOKEN, meta,
                            phase="body", kind="pristine")
    assert cap == "photo of ohwx_char person, low angle, sad, sitting, pristine"
    assert ds.render_caption(ds.DEFAULT_TEMPLATE, TOKEN, {}, phase="head", kind="pristine") == TOKEN
    with pytest.raises(FlenUserError, match=r"no \{token\}"):
        ds.validate_template("a photo, {labels}")
    with pytest.raises(FlenUserError, match=r"\{name\} is unknown"):
        ds.validate_template("{token} {name}")
    with pytest.raises(FlenUserError, match="malformed"):
        ds.validate_template("{token} {")


def test_versions_new_and_adding_to_a_draft(tmp_path):
    a = ds.write_dataset(tmp_path, "bob", [noise(1)], token=TOKEN)
    b = ds.write_dataset(tmp_path, "bob", [noise(2)], token=TOKEN)
    assert (a.dataset.version, b.dataset.version, a.created, b.created) == ("v1", "v2", True, True)
    c = ds.write_dataset(tmp_path, "bob", [noise(3)], token=TOKEN, version="v1")
    assert c.dataset.version == "v1" and not c.created and c.dataset.counts["images"] == 2
    assert [i["file"] for i in c.dataset.items] == ["head/pristine/bob_00001.png", "head/pristine/bob_00002.png"]
    assert ds.list_versions(tmp_path / "flenwheel" / "bob" / "datasets") == ["v1", "v2"]
    with pytest.raises(FlenUserError, match="does not exist"):
        ds.write_dataset(tmp_path, "bob", [noise(4)], token=TOKEN, version="v9")
    with pytest.raises(FlenUserError, match="not a version name"):
        ds.write_dataset(tmp_path, "bob", [noise(4)], token=TOKEN, version="../v1")
    with pytest.raises(FlenUserError, match="one trigger word"):
        ds.write_dataset(tmp_path, "bob", [noise(4)], token="sks man", version="v1")


# ---- content hash -----------------------------------------------------------------------------

def test_content_hash_changes_when_and_only_when_an_image_or_caption_changes(tmp_path):
    imgs = [noise(k) for k in range(3)]
    metas = [{"label": "front", "seed": 1}, {"label": "smiling", "seed": 2}, {"seed": 3}]
    h1 = ds.write_dataset(tmp_path, "h", imgs, metas, token=TOKEN).dataset.hash
    # same images and captions, other provenance, order and kind folder: same hash
    other = [{"label": "smiling", "seed": 99, "model": "x"}, {"label": "front", "identity_score": 0.1}, {}]
    h2 = ds.write_dataset(tmp_path, "h", [imgs[1], imgs[0], imgs[2]], other, token=TOKEN, kind="synthetic",
                          near_duplicates="keep").dataset.hash
    assert h2 == h1
    # one pixel changed: different hash
    changed = [i.copy() for i in imgs]
    changed[2][0, 0, 0] = 1.0 - changed[2][0, 0, 0]
    assert ds.write_dataset(tmp_path, "h", changed, metas, token=TOKEN).dataset.hash != h1
    # one caption changed (another label): different hash
    relabelled = [dict(metas[0], label="back"), metas[1], metas[2]]
    assert ds.write_dataset(tmp_path, "h", imgs, relabelled, token=TOKEN).dataset.hash != h1
    # the loader recomputes the same hash from disk
    v1 = tmp_path / "flenwheel" / "h" / "datasets" / "v1"
    assert ds.load_dataset(v1).hash == h1 == ds.read_info(v1)["hash"]
    # a file changed behind the manifest's back is detected
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(v1 / "head" / "pristine" / "h_00003.png")
    assert ds.load_dataset(v1).problems == ["head/pristine/h_00003.png changed after it was written"]


# ---- frozen versions --------------------------------------------------------------------------

def test_frozen_version_refuses_writes_with_a_clear_message(tmp_path):
    res = ds.write_dataset(tmp_path, "f", [noise(1), noise(2)], token=TOKEN)
    info = ds.freeze(res.dataset.path, by="FLENTrainCharacterLoRA char_lora_v1")
    assert info["status"] == "frozen" and info["hash"] == res.dataset.hash and info["counts"]["images"] == 2
    before = {p: p.stat().st_mtime_ns for p in res.dataset.path.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(FlenUserError) as err:
        ds.write_dataset(tmp_path, "f", [noise(3)], token=TOKEN, version="v1")
    msg = str(err.value)
    assert "v1" in msg and "is frozen" in msg and "char_lora_v1" in msg and "version = 'new'" in msg
    after = {p: p.stat().st_mtime_ns for p in res.dataset.path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    again = ds.freeze(res.dataset.path, by="FLENAIToolkitLauncher")  # idempotent; both users recorded
    assert [u["by"] for u in again["frozen_by"]] == ["FLENTrainCharacterLoRA char_lora_v1", "FLENAIToolkitLauncher"]
    assert again["hash"] == info["hash"] and ds.load_dataset(res.dataset.path).frozen
    assert ds.write_dataset(tmp_path, "f", [noise(3)], token=TOKEN).dataset.version == "v2"


def test_freeze_refuses_a_damaged_or_empty_version(tmp_path):
    res = ds.write_dataset(tmp_path, "g", [noise(1)], token=TOKEN)
    (res.dataset.path / res.dataset.items[0]["file"]).unlink()
    with pytest.raises(FlenUserError, match="cannot be frozen.*missing"):
        ds.freeze(res.dataset.path, by="t")
    assert ds.read_info(res.dataset.path)["status"] == "draft"


# ---- crashes ----------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from engines import dataset as ds
    rng = np.random.default_rng(int(sys.argv[2]))
    images = [rng.random((48, 48, 3)).astype(np.float32) for _ in range(400)]
    metas = [{{"label": f"l{{k}}", "seed": k}} for k in range(400)]
    ds.write_dataset(sys.argv[1], "crash", images, metas, token="ohwx_char person", version=sys.argv[3],
                     near_duplicates="keep")
""")


def _kill_mid_write(tmp_path: Path, seed: int, version: str, after_lines: int) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO)))
    manifest = tmp_path / "flenwheel" / "crash" / "datasets" / "v1" / ds.MANIFEST_NAME
    start = manifest.read_bytes().count(b"\n") if manifest.exists() else 0
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(seed), version])
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if manifest.exists() and manifest.read_bytes().count(b"\n") >= start + after_lines:
                break
            assert proc.poll() is None, "the child finished or failed before it could be killed"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _assert_consistent(version_dir: Path) -> ds.Dataset:
    d = ds.load_dataset(version_dir, verify=True)
    assert d.consistent, d.problems
    for item in d.items:  # every manifest line names a complete image and its exact caption
        with Image.open(item["image_path"]) as im:
            im.load()
        assert Path(item["caption_path"]).read_text(encoding="utf-8") == item["caption"]
    view = folder_view(version_dir)  # every image a folder-reading trainer finds has its caption
    assert set(view) >= {i["file"] for i in d.items}
    assert len(view) - len(d.items) <= 1  # at most the one image whose line was not appended yet
    return d


def test_sigkill_mid_write_leaves_a_readable_consistent_dataset(tmp_path):
    _kill_mid_write(tmp_path, seed=1, version="new", after_lines=3)
    vdir = tmp_path / "flenwheel" / "crash" / "datasets" / "v1"
    first = _assert_consistent(vdir)
    assert 3 <= len(first.items) < 400
    for k, after in enumerate((5, 11)):  # killed again while adding to the same draft
        _kill_mid_write(tmp_path, seed=10 + k, version="v1", after_lines=after)
        _assert_consistent(vdir)
    # the next writer repairs leftovers first; then the folders equal the manifest exactly
    res = ds.write_dataset(tmp_path, "crash", [noise(7)], token=TOKEN, version="v1")
    d = _assert_consistent(vdir)
    assert not d.notes and folder_view(vdir) == {i["file"]: i["caption"] for i in d.items}
    assert len({i["index"] for i in d.items}) == len(d.items) == res.dataset.counts["images"]
    assert ds.freeze(vdir, by="t")["hash"] == d.hash


def test_torn_manifest_line_is_ignored_then_cut(tmp_path):
    res = ds.write_dataset(tmp_path, "torn", [noise(1), noise(2)], token=TOKEN)
    manifest = res.dataset.path / ds.MANIFEST_NAME
    with open(manifest, "ab") as f:
        f.write(b'{"file": "head/pristine/torn_00003.png", "capt')
    d = ds.load_dataset(res.dataset.path)
    assert d.consistent and len(d.items) == 2 and any("torn last manifest line" in n for n in d.notes)
    ds.write_dataset(tmp_path, "torn", [noise(3)], token=TOKEN, version="v1")
    d = ds.load_dataset(res.dataset.path)
    assert d.consistent and not d.notes and len(d.items) == 3
    assert all(json.loads(line) for line in manifest.read_text().splitlines())


# ---- bad inputs -------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors_and_write_nothing(tmp_path):
    root = tmp_path / "flenwheel" / "bad" / "datasets"
    with pytest.raises(FlenUserError, match="batch is empty"):
        ds.write_dataset(tmp_path, "bad", [], token=TOKEN)
    for token, shown in (("ohwx/char", "'/'"), ("ohwx\nchar", "'\\\\n'"), ("ohwx, person", "','"),
                         ("{token}", "'{'"), ('say "hi"', "'\"'")):
        with pytest.raises(FlenUserError, match="captions and trainer configs cannot hold") as err:
            ds.write_dataset(tmp_path, "bad", [noise(1)], token=token)
        assert shown.strip("'").replace("\\\\", "\\") in str(err.value)
    with pytest.raises(FlenUserError, match="instance token is empty"):
        ds.write_dataset(tmp_path, "bad", [noise(1)], token="  ")
    with pytest.raises(FlenUserError, match="not allowed"):
        ds.write_dataset(tmp_path, "../evil", [noise(1)], token=TOKEN)
    with pytest.raises(FlenUserError, match="2 records for 1 images"):
        ds.write_dataset(tmp_path, "bad", [noise(1)], [{}, {}], token=TOKEN)
    with pytest.raises(FlenUserError, match=r"Image #1: .*shape \(8, 8, 5\)"):
        ds.write_dataset(tmp_path, "bad", [noise(1), np.zeros((8, 8, 5), np.float32)], token=TOKEN)
    nan = noise(2)
    nan[0, 0, 0] = np.nan
    with pytest.raises(FlenUserError, match="NaN"):
        ds.write_dataset(tmp_path, "bad", [nan], token=TOKEN)
    with pytest.raises(FlenUserError, match="near_duplicates"):
        ds.write_dataset(tmp_path, "bad", [noise(1)], token=TOKEN, near_duplicates="maybe")
    with pytest.raises(FlenUserError, match="Unknown phase"):
        ds.write_dataset(tmp_path, "bad", [noise(1)], token=TOKEN, phase="legs")
    assert ds.list_versions(root) == []  # validation happens before any version is made


def test_grayscale_and_rgba_images_are_converted_and_reported(tmp_path):
    gray2d = np.full((12, 12), 0.5, np.float32)
    gray1 = np.full((12, 12, 1), 0.25, np.float32)
    rgba = np.concatenate([flat((255, 0, 0), (12, 12)), np.full((12, 12, 1), 0.5, np.float32)], axis=2)
    opaque = np.concatenate([flat((0, 0, 255), (12, 12)), np.ones((12, 12, 1), np.float32)], axis=2)
    pil_la = Image.new("LA", (12, 12), (10, 0))
    uint8 = (noise(5) * 255).astype(np.uint8)
    res = ds.write_dataset(tmp_path, "conv", [gray2d, gray1, rgba, opaque, pil_la, uint8], token=TOKEN,
                           near_duplicates="keep")
    notes = [i["notes"] for i in res.items]
    assert notes[:5] == [["grayscale converted to RGB"], ["grayscale converted to RGB"],
                         ["transparency flattened onto white"], ["opaque alpha channel dropped"],
                         ["grayscale converted to RGB", "transparency flattened onto white"]]
    assert notes[5] == [] and "Converted: #0: grayscale converted to RGB" in res.summary()
    d = ds.load_dataset(res.dataset.path)
    for item in d.items:
        with Image.open(item["image_path"]) as im:
            assert im.mode == "RGB"
    with Image.open(d.items[2]["image_path"]) as im:
        assert im.getpixel((0, 0)) == (255, 128, 128)  # red at 50 % over white
    assert d.items[0]["conversions"] == ["grayscale converted to RGB"]


def test_near_duplicates_flagged_dropped_or_kept(tmp_path):
    base = noise(1, (64, 64))
    near = np.clip(base * 0.97 + 0.01, 0, 1)
    other = noise(2, (64, 64))
    flagged = ds.write_dataset(tmp_path, "nd", [base, other, near], token=TOKEN)
    assert [i["status"] for i in flagged.items] == ["written", "written", "flagged"]
    d = ds.load_dataset(flagged.dataset.path)
    assert d.items[2]["near_duplicate_of"] == d.items[0]["file"] and d.counts["near_duplicates"] == 1
    dropped = ds.write_dataset(tmp_path, "nd", [near, noise(3, (64, 64))], token=TOKEN, version="v1",
                               near_duplicates="drop")
    assert [i["status"] for i in dropped.items] == ["dropped", "written"] and dropped.dataset.counts["images"] == 4
    kept = ds.write_dataset(tmp_path, "nd", [base, near], token=TOKEN, near_duplicates="keep")
    assert [i["status"] for i in kept.items] == ["written", "written"]
    colours = ds.write_dataset(tmp_path, "nd", [flat((255, 0, 0)), flat((0, 0, 255)), flat((0, 0, 250))],
                               token=TOKEN)
    assert [i["status"] for i in colours.items] == ["written", "written", "flagged"]


# ---- edit pairs -------------------------------------------------------------------------------

def test_edit_pair_layouts_match_ai_toolkit_and_musubi(tmp_path):
    pairs = [ep.EditPair(noise(10 + k), [noise(20 + k), noise(30 + k)], f"turn the camera {k * 45} degrees",
                         {"candidate_id": k}, f"p{k}") for k in range(3)]
    res = ep.write_edit_pairs(tmp_path, "ed", pairs)
    d = ds.load_dataset(res.dataset.path)
    assert d.path == tmp_path / "flenwheel" / "ed" / "edit_pairs" / "v1" and d.consistent and not d.notes
    assert res.written == 3 and d.counts["pairs"] == 3 and d.counts["controls"] == 2 and d.info["n_controls"] == 2
    config = yaml.safe_load((d.path / "ai_toolkit_dataset.yaml").read_text())
    entry = config["datasets"][0]
    assert entry["control_path"] == [str(d.path / "control_1"), str(d.path / "control_2")]
    at = ai_toolkit_read(entry)
    mu = musubi_read((d.path / "musubi_dataset.toml").read_text())
    assert [x["stem"] for x in at] == [x["stem"] for x in mu] == ["ed_e00001", "ed_e00002", "ed_e00003"]
    assert [x["caption"] for x in at] == [x["caption"] for x in mu] == [p.instruction for p in pairs]
    for k, (a, m) in enumerate(zip(at, mu, strict=True)):
        assert [c.name for c in m["controls"]] == [f"{a['stem']}_0.png", f"{a['stem']}_1.png"]
        for j in range(2):  # the control files are the pair's own controls, in order, in both layouts
            want = ds.png_bytes(ds.prepare_image(pairs[k].controls[j])[0])
            assert a["controls"][j].read_bytes() == m["controls"][j].read_bytes() == want
        assert d.items[k]["candidate_id"] == k and d.items[k]["instruction"] == pairs[k].instruction


def test_single_control_keeps_the_target_name_for_musubi(tmp_path):
    res = ep.write_edit_pairs(tmp_path, "one", [ep.EditPair(noise(1), [noise(2)], "smile")])
    assert sorted(p.name for p in (res.dataset.path / "musubi_control").iterdir()) == ["one_e00001.png"]
    assert [x["controls"][0].name for x in musubi_read((res.dataset.path / "musubi_dataset.toml").read_text())] == [
        "one_e00001.png"]


def test_incomplete_pairs_are_reported_never_written(tmp_path):
    missing = tmp_path / "gone.png"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    pairs = [ep.EditPair(noise(1), [noise(2)], "ok one", name="good"),
             ep.EditPair(None, [noise(3)], "no target", name="control-only"),
             ep.EditPair(noise(4), [], "no control", name="target-only"),
             ep.EditPair(noise(5), [missing], "x", name="missing-control"),
             ep.EditPair(noise(6), [broken], "x", name="broken-control"),
             ep.EditPair(noise(7), [noise(8), noise(9)], "x", name="two-controls"),
             ep.EditPair(noise(7), [noise(8)] * 4, "x", name="four-controls"),
             ep.EditPair(noise(10), [noise(11)], " \n ", name="no-instruction"),
             ep.EditPair(noise(12), [noise(13)], "ok two", name="good2")]
    res = ep.write_edit_pairs(tmp_path, "inc", pairs)
    reasons = {r["name"]: r["reason"] for r in res.reports}
    assert res.written == 2 and reasons["good"] == reasons["good2"] == ""
    assert "control without a target" in reasons["control-only"]
    assert "no control image" in reasons["target-only"]
    assert "control 1 file gone.png is missing" in reasons["missing-control"]
    assert "not a readable image" in reasons["broken-control"]
    assert "mismatched controls: 2" in reasons["two-controls"] and "at most 3" in reasons["four-controls"]
    assert "instruction is empty" in reasons["no-instruction"]
    d = ds.load_dataset(res.dataset.path)
    assert len(list((d.path / "targets").glob("*.png"))) == len(list((d.path / "control_1").glob("*.png"))) == 2
    assert "Skipped 7" in res.summary()
    with pytest.raises(FlenUserError, match="No complete edit pair.*control without a target"):
        ep.write_edit_pairs(tmp_path, "inc", [pairs[1]])
    assert ds.list_versions(tmp_path / "flenwheel" / "inc" / "edit_pairs") == ["v1"]
    assert not list((tmp_path / "flenwheel" / "inc" / "edit_pairs").glob(".tmp-*"))


def test_pairs_from_the_review_store(tmp_path):
    store = rs.ReviewStore(tmp_path, "rv")
    try:
        src = flat((9, 9, 9), (16, 16))
        ids = store.add_candidates([noise(k, (16, 16)) for k in range(4)],
                                   [{"instruction": "turn left", "seed": k, "model": "qwen"} for k in range(4)],
                                   run_id="r1", version="v1", sources=[src])
        (synthetic,) = store.add_candidates([noise(9, (16, 16))], [{"prompt": "a person", "kind": "synthetic"}],
                                            run_id="r2")
        buf = __import__("io").BytesIO()
        Image.fromarray((noise(50, (16, 16)) * 255).astype(np.uint8)).save(buf, "PNG")
        store.correct(ids[0], instruction="turn left 90 degrees", fixed_image=buf.getvalue(), who="ann")
        store.correct(ids[1], instruction="turn right")  # re-label what the editor made
        store.correct(ids[2], better_id=ids[3])
        store.approve(ids[3])
        store.approve(synthetic)
        pairs, skipped = ep.pairs_from_review(store)
        assert [p.provenance["origin"] for p in pairs] == ["fixed_image", "relabelled", "better_target",
                                                           "approved_edit"]
        assert [p.instruction for p in pairs] == ["turn left 90 degrees", "turn right", "turn left", "turn left"]
        assert pairs[1].target == store.file_path(ids[1], "image") and pairs[2].target == store.file_path(
            ids[3], "image")
        assert skipped[0]["name"] == f"candidate {synthetic}" and "not an edit" in skipped[0]["reason"]
        res = ep.write_edit_pairs(tmp_path, "rv", pairs, skipped=skipped)
        d = ds.load_dataset(res.dataset.path)
        assert res.written == 4 and d.consistent
        first = d.items[0]
        assert first["candidate_id"] == ids[0] and first["review"]["who"] == "ann" and first["seed"] == 0
        assert first["original_instruction"] == "turn left" and first["corrected_instruction"] == "turn left 90 degrees"
        with Image.open(d.path / first["controls"][0]["file"]) as im:
            assert im.getpixel((0, 0)) == (9, 9, 9)
        only = ep.pairs_from_review(store, include="corrections only")[0]
        assert len(only) == 3
    finally:
        store.close()


def test_caption_sources_pick_the_template_and_need_descriptions():
    metas = [{"description": "standing by a window, soft daylight"}]
    assert ds.template_for_source("{token}, {labels}", "template", None) == "{token}, {labels}"
    assert ds.template_for_source("{token}, {labels}", "vlm", metas) == "{token}, {description}"
    assert ds.template_for_source("{token}, {labels}", "template+vlm", metas) == "{token}, {labels}, {description}"
    assert ds.template_for_source("{description}; {token}", "template+vlm", metas) == "{description}; {token}"
    with pytest.raises(ds.FlenUserError, match="FLEN Caption Images"):
        ds.template_for_source("{token}", "vlm", [{}])
    with pytest.raises(ds.FlenUserError, match="caption_source"):
        ds.template_for_source("{token}", "florence", metas)
    caption = ds.render_caption("{token}, {labels}, {description}", "ohwx_char person",
                                {"angle": "yaw_left_45", **metas[0]}, phase="head", kind="pristine")
    assert caption.startswith("ohwx_char person, ") and caption.endswith("standing by a window, soft daylight")


def test_a_reviewers_caption_keeps_the_instance_token_and_one_line():
    token = "ohwx_char person"
    assert ds.reviewer_caption("sitting on a bench,\nevening light", token) == (
        "ohwx_char person, sitting on a bench, evening light")
    assert ds.reviewer_caption("a photo of ohwx_char person laughing", token) == "a photo of ohwx_char person laughing"
    # a longer word that merely contains the token is not the token
    assert ds.reviewer_caption("xohwx_char personal space", token).startswith("ohwx_char person, ")
    assert ds.reviewer_caption("  ", token) == token
    with pytest.raises(ds.FlenUserError, match="reviewer's caption"):
        ds.reviewer_caption("x " * 1200, token)
