"""Shared fixtures: tiny models, a real ComfyUI server with the pack, its API client, Chromium."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tools.comfy_queue import ComfyClient, ComfyServer, prepare_base_directory  # noqa: E402
from tools.tiny_models import write_tiny_models  # noqa: E402
from tools.workflow_thumbnails import CHROMIUM, CHROMIUM_ARGS  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A models folder with the tiny Qwen-Edit and FLUX pipelines, the face pack and LoRAs."""
    models = tmp_path_factory.mktemp("models")
    write_tiny_models(models, seed=0)
    return models


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_models) -> ComfyServer:
    base = tmp_path_factory.mktemp("comfy_base")
    prepare_base_directory(base, tiny_models)
    server = ComfyServer(base, python=sys.executable).start()
    yield server
    server.stop()
    assert server.proc.poll() is not None, "ComfyUI server still running after stop()"


@pytest.fixture
def comfy(comfy_server) -> ComfyClient:
    return ComfyClient(comfy_server.url)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def comfy_page(browser, comfy_server):
    """The ComfyUI page, after the pack's JS extension reported itself loaded."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.goto(comfy_server.url, wait_until="domcontentloaded", timeout=60_000)
    try:
        page.wait_for_function("window.FLENwheel && window.FLENwheel.loaded === true", timeout=60_000)
    except Exception as exc:
        raise AssertionError("FLENwheel's JS extension never reported itself loaded. Console:\n"
                             + "\n".join(console[-30:])) from exc
    page.flen_console = console
    yield page
    context.close()
