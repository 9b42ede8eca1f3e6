"""HTTP routes of the pack, under /flenwheel/. Routes take ids, never paths."""

from __future__ import annotations

import json

from aiohttp import web

from ..engines.pack_info import PACK_VERSION, WORKFLOWS_DIR
from . import comfy_bridge as bridge
from . import review_routes


def template_cards() -> dict[str, dict[str, str]]:
    """Title and description of each shipped workflow (its ``extra.title`` / ``extra.description``): ComfyUI's
    template browser shows only a custom pack's file names, so web/js/flenwheel.js puts these on the cards."""
    out = {}
    for path in sorted(WORKFLOWS_DIR.glob("*.json")):
        try:
            extra = json.loads(path.read_text(encoding="utf-8")).get("extra") or {}
        except (OSError, ValueError):
            continue
        out[path.stem] = {"title": str(extra.get("title") or path.stem),
                          "description": str(extra.get("description") or extra.get("info") or "")}
    return out
_registered = False


def register_routes() -> None:
    global _registered
    routes = bridge.prompt_server_routes()
    if routes is None or _registered:
        return
    _registered = True

    @routes.get("/flenwheel/status")
    async def status(_request: web.Request) -> web.Response:
        return web.json_response({"pack": "FLENwheel", "version": PACK_VERSION})

    @routes.get("/flenwheel/models")
    async def models(_request: web.Request) -> web.Response:
        """The pack's own torch modules and whether ComfyUI's VRAM manager has them loaded."""
        return web.json_response({"models": bridge.managed_models()})

    @routes.get("/flenwheel/templates")
    async def templates(_request: web.Request) -> web.Response:
        return web.json_response({"templates": template_cards()})

    review_routes.register(routes)  # /flenwheel/review/… (review gallery)
