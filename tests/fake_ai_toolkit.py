"""A fake ai-toolkit checkout for the launcher tests: ``run.py <config>`` reads the job config, prints
tqdm-style progress lines with loss (on stderr, ``\\r``-separated, as ai-toolkit's bar does), writes a tiny
.safetensors where ai-toolkit would (``<training_folder>/<name>/<name>.safetensors``), and does what its
``behaviour.json`` asks: fail, sleep per step, ignore SIGTERM, spawn a worker process, or give a real LoRA's
tensors (``final_from``) as its result."""

from __future__ import annotations

import json
import os
from pathlib import Path

RUN_PY = r'''
import json, os, signal, struct, subprocess, sys, time
from pathlib import Path
import yaml

here = Path(__file__).resolve().parent
beh = json.loads((here / "behaviour.json").read_text()) if (here / "behaviour.json").exists() else {}
config_path = sys.argv[1]
cfg = yaml.safe_load(open(config_path))
(here / "last_argv.json").write_text(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "python": sys.executable}))
pids = {"child": os.getpid()}
if beh.get("ignore_term"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if beh.get("spawn_worker"):
    w = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "time.sleep(600)"])
    pids["worker"] = w.pid
if beh.get("pid_file"):
    tmp = beh["pid_file"] + ".tmp"
    Path(tmp).write_text(json.dumps(pids))
    os.replace(tmp, beh["pid_file"])
print("Running 1 job", flush=True)
name = cfg["config"]["name"]
proc = cfg["config"]["process"][0]
print(f"#### {proc['type']} {name}: datasets " + ", ".join(d["folder_path"] for d in proc["datasets"]), flush=True)
if beh.get("fail"):
    print("Loading transformer", flush=True)
    sys.stderr.write("Traceback (most recent call last):\n  File \"run.py\", line 1, in <module>\n")
    sys.stderr.write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    sys.stderr.flush()
    print("Error running job: CUDA out of memory", flush=True)
    sys.exit(1)
steps = int(proc["train"]["steps"])
save_root = Path(proc["training_folder"]) / name
save_root.mkdir(parents=True, exist_ok=True)
sys.stderr.write(f"Caching latents to disk:  50%|#####     | 1/2 [00:00<00:00, 10.00it/s]\r")
for i in range(1, steps + 1):
    time.sleep(float(beh.get("step_sleep", 0.0)))
    loss = 1.0 / i
    pct = int(100 * i / steps)
    sys.stderr.write(f"\r{name}: {pct:3d}%|####      | {i}/{steps} [00:0{i % 10}<00:01,  3.21it/s, lr: 1.0e-04 "
                     f"loss: {loss:.3e}]")
    sys.stderr.flush()
sys.stderr.write("\n")


def tiny(path, meta):
    data = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    header = {"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "__metadata__": meta}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


if steps > 1:
    tiny(save_root / f"{name}_{1:09d}.safetensors", {"name": name, "step": "1"})
if beh.get("final_from"):  # a real LoRA's tensors, so that the result can drive a pipeline
    from safetensors.numpy import load_file, save_file
    save_file(load_file(beh["final_from"]), str(save_root / f"{name}.safetensors"),
              {"name": name, "software": json.dumps({"name": "ai-toolkit"})})
elif not beh.get("no_final"):
    tiny(save_root / f"{name}.safetensors", {"name": name, "software": json.dumps({"name": "ai-toolkit"})})
print("Result:\n - 1 completed job", flush=True)
if beh.get("hang_after"):
    time.sleep(600)
'''


def make_checkout(folder: str | os.PathLike, **behaviour) -> Path:
    """Writes (or rewrites the behaviour of) a fake checkout; returns its folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for marker in ("toolkit", "jobs"):  # what makes a folder look like an ai-toolkit checkout
        (folder / marker).mkdir(exist_ok=True)
    (folder / "run.py").write_text(RUN_PY)
    (folder / "behaviour.json").write_text(json.dumps(behaviour))
    return folder


def configure(base: str | os.PathLike, *folders: str | os.PathLike) -> Path:
    """Names ``folders`` (checkouts, or folders holding checkouts) in the server's ``user/flenwheel.json``, as
    an operator would; returns the settings file."""
    settings = Path(base) / "user" / "flenwheel.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"ai_toolkit": [str(f) for f in folders]}))
    return settings


def alive(pid: int) -> bool:
    """True while ``pid`` is a running (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
