"""HTTP routes of the pack, under /flenwheel/. Routes take ids, never paths."""

from __future__ import annotations

from aiohttp import web

from . import comfy_bridge as bridge
from . import review_routes

PACK_VERSION = "0.1.0"
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

    review_routes.register(routes)  # /flenwheel/review/… (review gallery, issue 5)
