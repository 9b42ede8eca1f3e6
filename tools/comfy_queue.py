"""Runs ComfyUI headless with the pack and drives it through its API queue (POST /prompt).

Used by the demo and by the tests; plain HTTP, so it imports nothing from ComfyUI. The server
is ComfyUI's own main.py started with --base-directory: custom_nodes/, models/, input/,
output/ and user/ all live in one folder that the caller owns.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "FLENwheel"


def comfyui_path() -> Path:
    path = Path(os.environ.get("COMFYUI_PATH", Path.home() / "comfy" / "ComfyUI"))
    if not (path / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI checkout at {path}: set COMFYUI_PATH, or run `bash .ci/demo` "
                           "or `bash .ci/test`, which fetch ComfyUI v0.3.64.")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_directory(base: Path, models_dir: Path | None) -> None:
    """Lays out ComfyUI's --base-directory: the pack symlinked into custom_nodes, models linked in."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    if models_dir is not None and not (base / "models").exists():
        (base / "models").symlink_to(models_dir, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    if not settings.exists():
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))


@dataclass
class ComfyServer:
    base: Path
    port: int = field(default_factory=free_port)
    python: str = sys.executable
    proc: subprocess.Popen | None = None
    cpu: bool = True  # False: ComfyUI picks the GPU (benchmarks/gpu_smoke.py)
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "comfyui.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 120.0, ready_node: str = "FLENLoraStack") -> ComfyServer:
        cmd = [self.python, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", "--disable-api-nodes", *self.extra_args]
        log = self.log_path.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                r = requests.get(f"{self.url}/object_info/{ready_node}", timeout=2)
                if r.status_code == 200 and r.json():
                    break
            except requests.RequestException:
                pass
            failed = self.import_failures()
            if failed:
                self.stop()
                raise RuntimeError("ComfyUI reported IMPORT FAILED:\n" + "\n".join(failed) + "\n" + self.log()[-4000:])
            time.sleep(0.25)
        else:
            self.stop()
            raise RuntimeError(f"ComfyUI not ready within {timeout:.0f} s:\n{self.log()[-4000:]}")
        failed = self.import_failures()
        if failed:
            self.stop()
            raise RuntimeError("ComfyUI reported IMPORT FAILED:\n" + "\n".join(failed) + "\n" + self.log()[-4000:])
        return self

    def import_failures(self) -> list[str]:
        """IMPORT FAILED lines that concern this pack (ComfyUI's optional built-ins may fail without kornia)."""
        return [line for line in self.log().splitlines()
                if "IMPORT FAILED" in line and PACK_DIR_NAME in line]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=15)


class PromptFailed(RuntimeError):
    pass


@dataclass
class ComfyClient:
    url: str
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, payload: Any, **kw) -> requests.Response:  # payload: any JSON value
        return requests.post(self.url + path, json=payload, timeout=kw.pop("timeout", 30), **kw)

    def queue(self, prompt: dict) -> str:
        r = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if r.status_code != 200:
            raise PromptFailed(f"POST /prompt refused the prompt ({r.status_code}):\n{_readable_refusal(r)}")
        body = r.json()
        if body.get("node_errors"):
            # ComfyUI queues what is valid and drops every output whose inputs fail validation: the prompt would
            # "succeed" without running those outputs. Take it off the queue and say which inputs are wrong.
            self._withdraw(body["prompt_id"])
            raise PromptFailed("ComfyUI would skip part of the prompt (its other outputs would run):\n"
                               + _readable_refusal(r))
        return body["prompt_id"]

    def _withdraw(self, prompt_id: str, timeout: float = 60.0) -> None:
        """Takes a prompt off the queue; one the worker has already picked up runs only its valid remainder,
        so wait for that to end rather than report while it still runs."""
        self.post("/queue", {"delete": [prompt_id]})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queue = self.get("/queue").json()
            items = queue.get("queue_running", []) + queue.get("queue_pending", [])
            if not any(len(item) > 1 and item[1] == prompt_id for item in items):
                return
            time.sleep(0.2)

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Waits for a queued prompt; returns its history entry or raises with ComfyUI's error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{prompt_id}").json()
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    raise PromptFailed(_readable_error(status))
                if status.get("completed"):
                    return entry
            time.sleep(0.2)
        raise PromptFailed(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queues, waits, returns {node_id: outputs}."""
        return self.wait(self.queue(prompt), timeout)["outputs"]

    def run_error(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queues a prompt expected to fail at run time; returns ComfyUI's execution_error payload."""
        pid = self.queue(prompt)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{pid}").json().get(pid)
            if entry and entry.get("status", {}).get("completed") is not None:
                for kind, data in entry["status"].get("messages", []):
                    if kind == "execution_error":
                        return data
                raise PromptFailed(f"prompt {pid} was expected to fail but finished: {entry['status']}")
            time.sleep(0.2)
        raise PromptFailed(f"prompt {pid} did not finish within {timeout:.0f} s")

    # --- batch runs (tools.queue_cli) ---------------------------------------------------------------
    def history_entry(self, prompt_id: str) -> dict | None:
        """The /history entry of a prompt, or None while it is queued, running, or unknown to this server."""
        return self.get(f"/history/{prompt_id}").json().get(prompt_id)

    def prompt_state(self, prompt_id: str) -> str:
        """'success', 'error', 'queued' (pending or running here) or 'unknown' (e.g. the server restarted)."""
        entry = self.history_entry(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            status = entry["status"]
            return "success" if status.get("completed") and status.get("status_str") != "error" else "error"
        queue = self.get("/queue").json()
        for item in queue.get("queue_running", []) + queue.get("queue_pending", []):
            if len(item) > 1 and item[1] == prompt_id:
                return "queued"
        return "unknown"

    def output_exists(self, item: dict) -> bool:
        """Whether a saved file ({filename, subfolder, type}) is still on the server (GET /view)."""
        params = {k: item.get(k, "") for k in ("filename", "subfolder", "type")}
        try:
            with requests.get(self.url + "/view", params=params, timeout=30, stream=True) as r:
                return r.status_code == 200
        except requests.RequestException:
            return False

    @property
    def ws_url(self) -> str:
        base = self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        return f"{base}/ws?clientId={self.client_id}"

    def free(self, unload_models: bool = False, free_memory: bool = False) -> None:
        r = self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})
        assert r.status_code == 200, r.text


def _readable_error(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) raised "
                    f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                    + "".join(data.get("traceback", [])[-6:]))
    return f"prompt failed: {json.dumps(status)[:2000]}"


def _readable_refusal(r: requests.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:2000]
    lines = [str(body.get("error", {}).get("message", ""))]
    for node_id, info in (body.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            lines.append(f"node {node_id} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "\n".join(lines)
