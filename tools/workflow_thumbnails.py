"""Thumbnails of the shipped workflows: each graph rendered by the real ComfyUI frontend in Chromium.

    python -m tools.workflow_thumbnails [NAME ...] [--server URL]

Writes workflows/<name>.jpg beside workflows/<name>.json (the template browser shows it). Without --server a
headless ComfyUI with this pack is started for the run. Needs playwright and a Chromium
(`/usr/bin/chromium`, Debian's package; `--chromium` to use another).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from engines.pack_info import WORKFLOWS_DIR

if TYPE_CHECKING:
    from playwright.sync_api import ViewportSize

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT: ViewportSize = {"width": 1600, "height": 1000}

_FIT = """async (wf) => {
    await window.app.loadGraphData(wf, true, false);
    const canvas = window.app.canvas;
    // frame every node: the frontend's own "fit view" over the whole graph
    const nodes = window.app.graph._nodes;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const el = canvas.canvas, pad = 40;
    const scale = Math.min((el.width - 2 * pad) / (x1 - x0), (el.height - 2 * pad) / (y1 - y0), 1.0);
    canvas.ds.scale = scale;
    canvas.ds.offset = [pad / scale - x0 + ((el.width - 2 * pad) / scale - (x1 - x0)) / 2,
                        pad / scale - y0 + ((el.height - 2 * pad) / scale - (y1 - y0)) / 2];
    canvas.setDirty(true, true);
    canvas.draw(true, true);
    return nodes.length;
}"""


def render(url: str, names: list[str], chromium: str = CHROMIUM) -> list[Path]:
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_function("window.app && window.app.graph && window.FLENwheel && window.FLENwheel.loaded",
                                   timeout=60_000)
            page.evaluate("""async () => {
                const settings = window.app.extensionManager?.setting;
                for (const [key, value] of [["Comfy.Minimap.Visible", false], ["Comfy.Graph.CanvasInfo", false]]) {
                    try { await settings?.set(key, value); } catch (e) { /* older frontends */ }
                }
            }""")
            # hide the chrome around the canvas: the thumbnail shows the graph only
            page.add_style_tag(content=".comfyui-menu, .side-tool-bar-container, .p-toast, .graph-canvas-menu, "
                                       ".comfyui-body-bottom, .actionbar, .comfy-menu-button-wrapper, "
                                       ".splitter-overlay-root > .p-splitter { display: none !important; }")
            for name in names:
                wf = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text(encoding="utf-8"))
                page.evaluate(_FIT, wf)
                page.wait_for_timeout(400)
                out = WORKFLOWS_DIR / f"{name}.jpg"
                page.locator("#graph-canvas").screenshot(path=str(out), type="jpeg", quality=82)
                written.append(out)
        finally:
            browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.workflow_thumbnails", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="Workflow names (default: every workflows/*.json).")
    parser.add_argument("--server", help="A running ComfyUI with this pack; default: start one for the run.")
    parser.add_argument("--chromium", default=CHROMIUM, help=f"Chromium executable (default {CHROMIUM}).")
    args = parser.parse_args(argv)
    names = args.names or sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
    if args.server:
        written = render(args.server, names, args.chromium)
    else:
        from tools.comfy_queue import ComfyServer, prepare_base_directory

        with tempfile.TemporaryDirectory(prefix="flen_thumbnails_") as tmp:
            prepare_base_directory(Path(tmp), None)
            server = ComfyServer(Path(tmp), python=sys.executable).start()
            try:
                written = render(server.url, names, args.chromium)
            finally:
                server.stop()
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
