"""Data integrity: a dataset write killed half-way is never trained on (and the next run finishes it), files keep
the umask, a crashed server's launcher_child.json is cleaned at the next start, and messages that used to be
raw errors or silent (RGBA save, corrupt init_lora, empty identity batch, truncated images) say what is wrong."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
from fake_ai_toolkit import alive
from PIL import Image
from test_training_server import dataset_nodes, train_node

from engines import atomic_files
from engines import dataset as ds
from engines import review_store as rs
from engines.errors import FlenUserError
from engines.png_files import write_png_new
from tools.comfy_queue import ComfyServer, prepare_base_directory
from training import ai_toolkit as at

REPO = Path(__file__).resolve().parents[1]
TOKEN = "ohwx_char person"
N_IMAGES = 600

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {repo!r})
    from engines import dataset as ds
    rng = np.random.default_rng(5)
    images = [rng.random((24, 24, 3)).astype(np.float32) for _ in range({n})]
    result = ds.write_dataset(sys.argv[1], "killed", images, token="ohwx_char person", version=sys.argv[2],
                              near_duplicates="keep", written_by="FLENDatasetWriter test")
    print(result.summary())
""")


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.random((24, 24, 3)).astype(np.float32) for _ in range(N_IMAGES)]


def test_sigkill_mid_write_is_refused_for_training_and_the_next_run_finishes_it(tmp_path, tiny_models):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO), n=N_IMAGES))
    vdir = tmp_path / "flenwheel" / "killed" / "datasets" / "v1"
    manifest = vdir / ds.MANIFEST_NAME
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), "new"])
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if manifest.exists() and manifest.read_bytes().count(b"\n") >= N_IMAGES // 2:
                break
            assert proc.poll() is None, "the writer finished before it could be killed"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    info = ds.read_info(vdir)
    on_disk = len(ds.read_manifest(manifest)[0])
    assert N_IMAGES // 2 <= on_disk < N_IMAGES
    assert info["writing"]["by"] == "FLENDatasetWriter test"
    assert ds.load_dataset(vdir, verify=False).incomplete
    # freeze refuses, saying how to finish or discard it
    with pytest.raises(FlenUserError) as err:
        ds.freeze(vdir, by="test")
    msg = str(err.value)
    assert "is incomplete" in msg and f"{on_disk} images" in msg and "version = 'v1'" in msg and "delete" in msg
    assert ds.read_info(vdir)["status"] == "draft"
    # a trainer refuses too (the real command line the trainer nodes run)
    config = tmp_path / "char.json"
    config.write_text(json.dumps({"model": str(tiny_models / "diffusers" / "flen-tiny-flux"), "dataset": str(vdir),
                                  "output_dir": str(tmp_path / "loras"), "precision": "fp32", "steps": 2}))
    run = subprocess.run([sys.executable, "-m", "training.train_char_lora", "--config", str(config)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "is incomplete" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "loras").exists()
    # and so does the ai-toolkit launcher
    settings = at.AIToolkitSettings(base_model=str(tiny_models / "diffusers" / "flen-tiny-flux"), character="killed",
                                    steps=2, resolutions=[512])
    with pytest.raises(FlenUserError, match="is incomplete"):
        at.prepare_job(str(vdir), settings, tmp_path / "ws", tmp_path / "loras")
    # a new version meanwhile names the incomplete one in its summary
    other = ds.write_dataset(tmp_path, "killed", [np.zeros((8, 8, 3), np.float32) + 0.3], token=TOKEN)
    assert other.dataset.version == "v2" and "Incomplete (a writer was interrupted): v1" in other.summary()
    # the next run into the version repairs and finishes it: every image exactly once, then it freezes
    res = ds.write_dataset(tmp_path, "killed", _images(), token=TOKEN, version="v1", near_duplicates="keep")
    assert res.finished_interrupted and "Finished v1" in res.summary()
    d = ds.load_dataset(vdir, verify=True)
    assert d.consistent and not d.notes and not d.incomplete
    assert len(d.items) == N_IMAGES and len({i["sha256"] for i in d.items}) == N_IMAGES
    assert ds.read_info(vdir)["counts"]["images"] == N_IMAGES
    assert ds.freeze(vdir, by="test")["counts"]["images"] == N_IMAGES


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o027])
def test_files_keep_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        expected = 0o666 & ~umask
        assert atomic_files.new_file_mode() == expected
        res = ds.write_dataset(tmp_path, "modes", [np.random.default_rng(1).random((16, 16, 3))], token=TOKEN)
        files = [p for p in res.dataset.path.rglob("*") if p.is_file()]
        assert files and {oct(_mode(p)) for p in files} == {oct(expected)}, {p.name: oct(_mode(p)) for p in files}
        png, _ = write_png_new(tmp_path / "pngs", lambda n: f"x_{n}.png", 1, Image.new("RGB", (4, 4)), {})
        assert _mode(png) == expected
        store = rs.open_store(tmp_path, "modes")
        (cid,) = store.add_candidates([np.zeros((8, 8, 3), np.float32)], None, run_id="r")
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
        store.correct(cid, fixed_image=buf.getvalue())
        assert _mode(store.file_path(cid, "fixed")) == expected
        src = tmp_path / "produced.safetensors"
        src.write_bytes(b"not a real header")
        _, dest, _ = at.install_lora(src, tmp_path / "loras", "modes", "char_lora")
        assert _mode(dest) == expected
    finally:
        os.umask(old)


# ---- a real server ------------------------------------------------------------------------------------

def test_stale_launcher_child_is_cleaned_at_the_next_start(tmp_path, tiny_models):
    """A crashed server leaves launcher_child.json (and its trainer, in its own session) behind."""
    base = tmp_path / "base"
    prepare_base_directory(base, tiny_models)
    orphan_config = base / "output" / "flenwheel" / "alice" / "training" / "configs" / "char.json"
    orphan_config.parent.mkdir(parents=True)
    orphan_config.write_text("{}")
    # stands in for the trainer: a process whose command line carries --config <the file>, own session
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "--config", str(orphan_config)],
                              start_new_session=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    crashed_server = subprocess.Popen([sys.executable, "-c", "pass"])
    crashed_server.wait()
    files = {}
    for character, pid, config in (("alice", orphan.pid, orphan_config), ("bob", dead.pid, orphan_config),
                                   ("carol", unrelated.pid, base / "nothing.json")):
        f = base / "output" / "flenwheel" / character / "training" / "launcher_child.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"pid": pid, "cmd": ["python", "-m", "training.train_char_lora", "--config",
                                                     str(config)], "config": str(config),
                                 "server_pid": crashed_server.pid, "started": time.time()}))
        files[character] = f
    server = ComfyServer(base, python=sys.executable)
    try:
        server.start()
        assert not any(f.exists() for f in files.values()), "launcher_child.json left behind after the restart"
        deadline = time.monotonic() + 15
        while alive(orphan.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(orphan.pid), "the orphaned trainer still runs"
        assert alive(unrelated.pid), "a process that only reused a pid was killed"
        assert f"stopped orphaned trainer pid {orphan.pid}" in server.log()
    finally:
        server.stop()
        for p in (orphan, unrelated):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


@pytest.mark.server
def test_rgba_into_save_images_is_saved_with_its_alpha(comfy, comfy_server):
    prompt = {"img": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1,
                                                             "color": 0x336699}},
              "mask": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 16, "height": 16}},
              "rgba": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["img", 0], "alpha": ["mask", 0]}},
              "save": {"class_type": "FLENSaveImages",
                       "inputs": {"images": ["rgba", 0], "filename_prefix": f"sec/rgba_{uuid.uuid4().hex[:6]}"}}}
    saved = comfy.run(prompt)["save"]["images"][0]
    with Image.open(comfy_server.base / "output" / saved["subfolder"] / saved["filename"]) as im:
        assert im.mode == "RGBA" and im.getpixel((0, 0))[3] in (127, 128)


@pytest.mark.server
def test_corrupt_init_lora_is_named(comfy, comfy_server):
    character = "ig_" + uuid.uuid4().hex[:8]
    name = f"corrupt_{uuid.uuid4().hex[:6]}.safetensors"
    bad = comfy_server.base / "models" / "loras" / name
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")  # 'header too large' for safetensors
    try:
        prompt = dataset_nodes(character)
        prompt["train"] = train_node(steps=2, sample_every=0)
        prompt["train"]["inputs"]["init_lora"] = name
        msg = comfy.run_error(prompt)["exception_message"]
    finally:
        bad.unlink()
    assert name in msg and "not a readable .safetensors file" in msg and "SafetensorError" not in msg


@pytest.mark.server
def test_identity_reference_with_an_empty_batch_says_so(comfy, comfy_server):
    from engines import review_store

    spec = comfy.get("/object_info/FLENIdentityReference").json()["FLENIdentityReference"]["input"]["required"]
    # A character whose workspace exists but holds nothing approved: FLEN Load Approved gives an empty batch
    # (an unknown character fails earlier, naming the known ones).
    character = "nobody_" + uuid.uuid4().hex[:6]
    review_store.open_store(comfy_server.base / "output", character).close()
    prompt = {"load": {"class_type": "FLENLoadApproved",
                       "inputs": {"character": character, "run_id": "", "version": ""}},
              "ref": {"class_type": "FLENIdentityReference",
                      "inputs": {"images": ["load", 0], "face_model": spec["face_model"][1]["options"][0],
                                 "det_size": 640}},
              "show": {"class_type": "PreviewImage", "inputs": {"images": ["ref", 2]}}}
    msg = comfy.run_error(prompt)["exception_message"]
    assert "empty image batch" in msg and "no photos arrived" in msg


@pytest.mark.server
def test_truncated_images_are_flagged_in_meta_and_report(comfy, comfy_server):
    character = "tr_" + uuid.uuid4().hex[:8]
    rng = np.random.default_rng(3)
    names = []
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, format=fmt)
        data = buf.getvalue()
        name = f"cut_{uuid.uuid4().hex[:6]}.{fmt.lower()}"
        r = requests.post(comfy.url + "/upload/image", files={"image": (name, data[: len(data) * 6 // 10])},
                          data={"type": "input", "overwrite": "true"}, timeout=30)
        assert r.status_code == 200
        names.append(name)
    prompt = {}
    for k, name in enumerate(names):
        prompt[f"load{k}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    prompt["batch"] = {"class_type": "ImageBatch", "inputs": {"image1": ["load0", 0], "image2": ["load1", 0]}}
    prompt["write"] = {"class_type": "FLENDatasetWriter",
                       "inputs": {"images": ["batch", 0], "character": character, "instance_token": TOKEN,
                                  "caption_template": "{token}", "version": "new", "phase": "head", "kind": "auto",
                                  "near_duplicates": "keep", "phash_threshold": 6, "class_prompt": ""}}
    prompt["queue"] = {"class_type": "FLENReviewQueue",
                       "inputs": {"images": ["batch", 0], "character": character, "run_id": "", "version": "v1"}}
    outputs = comfy.run(prompt)
    summary = outputs["write"]["text"][0]
    assert "Warnings: #0: possibly truncated" in summary and "#1: possibly truncated" in summary, summary
    vdir = comfy_server.base / "output" / "flenwheel" / character / "datasets" / "v1"
    records, _ = ds.read_manifest(vdir / ds.MANIFEST_NAME)
    assert all(r["warnings"] and "possibly truncated" in r["warnings"][0] for r in records)
    items = comfy.get(f"/flenwheel/review/{character}/items").json()["items"]
    assert len(items) == 2 and all("possibly truncated" in i["meta"]["warnings"][0] for i in items)
    # a candidate file cut short on disk: FLEN Load Approved decodes what is there and flags it in the meta
    store = rs.existing_store(comfy_server.base / "output", character)
    ids = [i["id"] for i in items]
    path = store.file_path(ids[0], "image")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    r = comfy.post(f"/flenwheel/review/{character}/decide", {"action": "approve", "ids": ids})
    assert r.status_code == 200, r.text
    comfy.run({"load": {"class_type": "FLENLoadApproved", "inputs": {"character": character, "run_id": "",
                                                                      "version": ""}},
               "write": {"class_type": "FLENDatasetWriter",
                         "inputs": {"images": ["load", 0], "meta": ["load", 1], "character": character,
                                    "instance_token": TOKEN, "caption_template": "{token}", "version": "new",
                                    "phase": "head", "kind": "auto", "near_duplicates": "keep",
                                    "phash_threshold": 6, "class_prompt": ""}}})
    records, _ = ds.read_manifest(vdir.parent / "v2" / ds.MANIFEST_NAME)
    flagged = [r for r in records if "truncated file in the review store" in " ".join(r["meta"].get("warnings", []))]
    assert [r["review"]["candidate_id"] for r in flagged] == [ids[0]]
    # a whole image is not flagged
    whole = ds.write_dataset(comfy_server.base / "output", character, [rng.random((64, 64, 3))], token=TOKEN)
    assert "Warnings" not in whole.summary()
