"""The pack against a hostile client of a real ComfyUI (anyone who reaches the port can queue prompts and
upload files): nothing a prompt says runs code or writes outside the pack's folders, image bombs are refused
before decoding, card names do not probe the disk, deep JSON is a 400."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from fake_ai_toolkit import configure
from PIL import Image
from review_prompts import review_prompt
from test_ai_toolkit_server import launcher_prompt
from test_training_server import TINY, dataset_nodes, train_node

from engines import dataset as ds

pytestmark = pytest.mark.server

EVIL_RUN_PY = "import pathlib, sys\npathlib.Path({marker!r}).write_text('ran ' + ' '.join(sys.argv))\n"


def upload(comfy, name: str, data: bytes, subfolder: str, kind: str = "input") -> dict:
    r = requests.post(comfy.url + "/upload/image", files={"image": (name, data)},
                      data={"subfolder": subfolder, "type": kind, "overwrite": "true"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def upload_fake_checkout(comfy, subfolder: str, marker: Path) -> None:
    """What a client can build in input/ through ComfyUI's own upload route: run.py, toolkit/, jobs/."""
    upload(comfy, "run.py", EVIL_RUN_PY.format(marker=str(marker)).encode(), subfolder)
    upload(comfy, "__init__.py", b"", f"{subfolder}/toolkit")
    upload(comfy, "__init__.py", b"", f"{subfolder}/jobs")


@pytest.fixture
def base_model(comfy) -> str:
    spec = comfy.get("/object_info/FLENAIToolkitLauncher").json()["FLENAIToolkitLauncher"]
    return next(o for o in spec["input"]["required"]["base_model"][1]["options"] if "flux" in o.lower())


def test_uploaded_run_py_never_runs(comfy, comfy_server, tmp_path, base_model):
    character = "sec_" + uuid.uuid4().hex[:8]
    sub = "evil_" + uuid.uuid4().hex[:6]
    marker = tmp_path / "ran.txt"
    upload_fake_checkout(comfy, sub, marker)
    folder = comfy_server.base / "input" / sub
    assert (folder / "run.py").is_file() and (folder / "toolkit").is_dir()
    configure(comfy_server.base, tmp_path / "nothing-configured")
    base = str(comfy_server.base)
    # the folder typed into the prompt, absolute and relative (to ComfyUI's folder and to the base directory)
    for typed in (str(folder), f"input/{sub}", f"../input/{sub}", f"{base}/input/./{sub}"):
        error = comfy.run_error(launcher_prompt(character, typed, base_model))
        assert error["node_type"] == "FLENAIToolkitLauncher"
        assert not marker.exists(), f"the uploaded run.py ran for ai_toolkit_folder={typed!r}"
        assert base not in error["exception_message"], "the error discloses the server's folders"
    # even an operator who (wrongly) configures the input folder, or a link to it, gets a refusal
    link = tmp_path / "tools" / "ai-toolkit"
    link.parent.mkdir()
    link.symlink_to(folder, target_is_directory=True)
    for source, name in ((comfy_server.base / "input", sub), (tmp_path / "tools", "ai-toolkit")):
        configure(comfy_server.base, source)
        options = comfy.get("/object_info/FLENAIToolkitLauncher").json()["FLENAIToolkitLauncher"]["input"][
            "required"]["ai_toolkit_folder"][1]["options"]
        assert name in options
        error = comfy.run_error(launcher_prompt(character, name, base_model))
        assert "input folder" in error["exception_message"] and "refused" in error["exception_message"]
        assert not marker.exists(), "the uploaded run.py ran from a configured input folder"
    # the same through the output and temp folders (POST /upload/image takes type=output|temp too)
    for kind in ("output", "temp"):
        upload(comfy, "run.py", EVIL_RUN_PY.format(marker=str(marker)).encode(), sub, kind)
        upload(comfy, "__init__.py", b"", f"{sub}/toolkit", kind)
        upload(comfy, "__init__.py", b"", f"{sub}/jobs", kind)
        configure(comfy_server.base, comfy_server.base / kind)
        error = comfy.run_error(launcher_prompt(character, sub, base_model))
        assert f"{kind} folder" in error["exception_message"]
        assert not marker.exists()
    assert not (comfy_server.base / "output" / "flenwheel" / character / "ai_toolkit_runs").exists()


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")} if folder.exists() else set()


def test_trainer_paths_stay_inside_the_pack(comfy, comfy_server, tmp_path):
    character = "sec_" + uuid.uuid4().hex[:8]
    outside = tmp_path / "outside"
    outside.mkdir()
    attempts = {
        "output_dir": f"output_dir: {outside / 'loras'}\n",
        "run_dir": f"run_dir: {outside / 'run'}\n",
        "run_dir_up": "run_dir: ../../../../../../" + str(outside / "run_up").lstrip("/") + "\n",
        "model": f"model: {outside}\n",
        "dataset": f"dataset: {outside}\n",
        "character": "character: ../../../../escape\n",
        "init_lora": f"init_lora: {outside / 'x.safetensors'}\n",
    }
    for key, text in attempts.items():
        prompt = dataset_nodes(character)
        prompt["train"] = train_node(steps=2, sample_every=0)
        prompt["train"]["inputs"]["advanced"] = TINY + text
        error = comfy.run_error(prompt)
        assert error["node_type"] == "FLENTrainCharacterLoRA", (key, error)
        assert _files_under(outside) == set(), f"advanced {key} wrote outside: {_files_under(outside)}"
    # class_images outside input/ and output/ is refused without saying whether the folder exists
    messages = []
    for folder in ("/etc", "/no/such/folder", "../../../etc"):
        prompt = dataset_nodes(character)
        prompt["train"] = train_node(steps=2, sample_every=0)
        prompt["train"]["inputs"].update(prior_preservation=True, class_images=folder, class_prompt="a person")
        messages.append(comfy.run_error(prompt)["exception_message"].replace(folder, "<x>"))
    assert len(set(messages)) == 1 and "refused" in messages[0], messages
    # a FLEN_DATASET typed into the prompt as a literal, naming a real dataset outside the pack's folders
    forged = ds.write_dataset(outside / "out", character, [Image.new("RGB", (32, 32), "red")], token="ohwx person",
                              phase="head", kind="pristine").dataset
    before = _files_under(outside)
    prompt = {"train": train_node(steps=2, sample_every=0)}
    prompt["train"]["inputs"]["dataset"] = forged.as_flen_dataset()
    error = comfy.run_error(prompt)
    assert "does not name a dataset version of the pack" in error["exception_message"]
    assert _files_under(outside) == before
    assert ds.read_info(forged.path)["status"] == "draft"  # not even frozen
    # inside the pack, a run_dir is a folder name in the character's training folder, and it works
    prompt = dataset_nodes(character)
    prompt["train"] = train_node(steps=2, sample_every=0)
    prompt["train"]["inputs"]["advanced"] = TINY + "run_dir: my_run\n"
    comfy.run(prompt)
    run = comfy_server.base / "output" / "flenwheel" / character / "training" / "my_run"
    assert (run / "done.json").is_file() and (run / "loss.jsonl").is_file()
    assert _files_under(outside) == before


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_decompression_bomb_is_refused_fast(comfy, comfy_server):
    character = "sec_" + uuid.uuid4().hex[:8]
    comfy.run(review_prompt(character, colors=[0x336699]))
    item = comfy.get(f"/flenwheel/review/{character}/items").json()["items"][0]
    buf = io.BytesIO()
    Image.new("1", (13000, 13000)).save(buf, format="PNG")
    bomb = buf.getvalue()
    assert len(bomb) < 64 * 1024  # about 20 KB on the wire, 169 megapixels decoded
    pid = comfy_server.proc.pid
    baseline = _rss(pid)
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss(pid))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    answers: list[tuple[int, str, float]] = []

    def send() -> None:
        t0 = time.monotonic()
        r = requests.post(f"{comfy.url}/flenwheel/review/{character}/items/{item['id']}/fixed", data=bomb, timeout=60)
        answers.append((r.status_code, r.text, time.monotonic() - t0))

    t0 = time.monotonic()
    senders = [threading.Thread(target=send) for _ in range(4)]
    for t in senders:
        t.start()
    # other routes keep answering meanwhile
    status = requests.get(f"{comfy.url}/flenwheel/status", timeout=10)
    for t in senders:
        t.join()
    total = time.monotonic() - t0
    stop.set()
    sampler.join()
    assert status.status_code == 200
    assert [a[0] for a in answers] == [400] * 4, answers
    message = json.loads(answers[0][1])["error"]
    assert "13000 × 13000" in message and "megapixels" in message
    assert total < 2.0 and max(a[2] for a in answers) < 2.0, answers
    growth = peak[0] - baseline
    print(f"bomb x4: {total:.3f} s in all, slowest {max(a[2] for a in answers):.3f} s, server RSS growth "
          f"{growth / 2**20:.1f} MB")
    assert growth < 100 * 2**20, f"server memory grew by {growth / 2**20:.0f} MB"
    assert comfy.get(f"/flenwheel/review/{character}/items/{item['id']}").json()["correction"] is None


def test_card_files_outside_are_refused_without_probing(comfy, comfy_server, tmp_path):
    real = tmp_path / "real.card.png"
    Image.new("RGB", (8, 8)).save(real)
    messages = []
    for line in (str(real), str(tmp_path / "missing.card.png"), "/etc/passwd.png", "/etc/passwd",
                 "../../../../etc/passwd"):
        error = comfy.run_error({"cmp": {"class_type": "FLENCompareVersions",
                                         "inputs": {"card_files": f"{line}\n{line}", "save": False}}})
        assert error["node_type"] == "FLENCompareVersions"
        messages.append(error["exception_message"].replace(line, "<x>"))
        assert "not found" not in error["exception_message"]
    assert len(set(messages)) == 1, messages
    assert str(comfy_server.base) not in messages[0]


def test_deep_json_is_a_400(comfy):
    character = "sec_" + uuid.uuid4().hex[:8]
    comfy.run(review_prompt(character, colors=[0x112233]))
    deep = "[" * 10_000 + "]" * 10_000
    deep_obj = '{"a":' * 10_000 + "1" + "}" * 10_000
    for path in (f"/flenwheel/review/{character}/decide", "/flenwheel/review/release"):
        for body in (deep, deep_obj):
            r = requests.post(comfy.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=30)
            assert r.status_code == 400, (path, r.status_code, r.text[:200])
            assert "error" in json.loads(r.text)
    assert comfy.get("/flenwheel/status").status_code == 200
