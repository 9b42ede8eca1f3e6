"""HTTP routes of the review gallery, under /flenwheel/review/.

JSON over ids only: a client names a character (validated as a safe folder name) and candidate
ids; files are looked up in the store's own records and served only from its folders. Bodies
are size-limited; malformed input is answered with a 4xx and a message, never a server error.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any

from aiohttp import web

from ..engines import review_store, workspace
from ..engines.errors import FlenUserError
from . import comfy_bridge as bridge
from . import review_gate

log = logging.getLogger("FLENwheel")

JSON_BODY_LIMIT = 64 * 1024  # a decision on a few thousand ids fits easily
IMAGE_BODY_LIMIT = 16 * 1024 * 1024  # an uploaded fixed image
MAX_IDS = 5000
PREFIX = "/flenwheel/review"

PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>FLENwheel review</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<link rel="stylesheet" href="/extensions/FLENwheel/css/review_gallery.css">
</head><body class="flen-review-page">
<div id="flen-review-root"></div>
<script type="module">
import { mountGallery } from "/extensions/FLENwheel/js/review_gallery.js";
const q = new URLSearchParams(location.search);  // ?character=&run=&status= (run empty: all runs)
mountGallery(document.getElementById("flen-review-root"), { fullPage: true, character: q.get("character") || undefined,
  run: q.has("run") ? q.get("run") : undefined, status: q.get("status") ?? undefined });
</script>
</body></html>
"""


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _guarded(handler):
    """Maps user errors to 4xx JSON answers; anything unexpected is logged and answered 500."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as exc:
            return _error(exc.status, exc.message)
        except FlenUserError as exc:
            return _error(400, str(exc))
        except KeyError:
            return _error(404, "No such item in this character's review store.")
        except web.HTTPException:
            raise
        except Exception:
            log.exception("FLENwheel review route %s failed", request.path)
            return _error(500, "Internal error in the FLENwheel review store; see the ComfyUI log.")

    return wrapper


def _store(request: web.Request) -> review_store.ReviewStore:
    character = request.match_info.get("character", "")
    try:
        workspace.validate_character(character)
    except FlenUserError as exc:
        raise HttpError(400, str(exc)) from None
    store = review_store.existing_store(bridge.output_directory(), character)
    if store is None:
        raise HttpError(404, f"No review store for character '{character}'.")
    return store


def _int(value: Any, what: str, lo: int = 0, hi: int = 2**62) -> int:
    if isinstance(value, bool):
        raise HttpError(400, f"{what} must be an integer.")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise HttpError(400, f"{what} must be an integer.") from None
    if not lo <= n <= hi:
        raise HttpError(400, f"{what} must be between {lo} and {hi}.")
    return n


def _float(value: str | None, what: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        x = float(value)
    except ValueError:
        raise HttpError(400, f"{what} must be a number.") from None
    if x != x:
        raise HttpError(400, f"{what} must be a number.")
    return x


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise HttpError(413, f"Request body too large (limit {limit} bytes).")
    data = await request.content.read(limit + 1)
    if len(data) > limit:
        raise HttpError(413, f"Request body too large (limit {limit} bytes).")
    return data


async def _read_json(request: web.Request) -> dict[str, Any]:
    data = await _read_body(request, JSON_BODY_LIMIT)
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HttpError(400, "The request body must be a JSON object.") from None
    except RecursionError:  # json.loads recurses once per nesting level: 10,000 '[' fit in 64 KB
        raise HttpError(400, "The request body is nested too deeply; send a flat JSON object.") from None
    if not isinstance(body, dict):
        raise HttpError(400, "The request body must be a JSON object.")
    return body


def _who(request: web.Request, body: dict[str, Any] | None = None) -> str:
    who = (body or {}).get("who") or request.headers.get("comfy-user") or "reviewer"
    return str(who)[:120]


def public_item(item: dict[str, Any]) -> dict[str, Any]:
    """What the browser sees of a candidate: ids and data, not the store's file names."""
    out = {k: v for k, v in item.items() if k not in ("image", "thumb", "sources", "refs")}
    out["n_sources"] = len(item.get("sources") or [])
    out["n_refs"] = len(item.get("refs") or [])
    return out


def _filters(query) -> dict[str, Any]:
    status = query.get("status") or None
    if status and status not in review_store.STATUSES:
        raise HttpError(400, f"Unknown status {status!r}; one of {', '.join(review_store.STATUSES)}.")
    return {"run_id": query.get("run") or None, "status": status,
            "score_min": _float(query.get("score_min"), "score_min"),
            "score_max": _float(query.get("score_max"), "score_max"),
            "label": query.get("label") or None}


def _file(path) -> web.FileResponse:
    resp = web.FileResponse(path)
    resp.headers["Cache-Control"] = "private, max-age=31536000, immutable"  # file names are never reused
    return resp


def register(routes: web.RouteTableDef) -> None:
    """Adds the review routes to ComfyUI's route table (called once by routes.register_routes)."""

    @routes.get(f"{PREFIX}/page")
    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=PAGE_HTML, content_type="text/html")

    @routes.get(f"{PREFIX}/waiting")
    @_guarded
    async def waiting(_request: web.Request) -> web.Response:
        """Review gates now pausing a graph (any number, keyed by prompt id and node id)."""
        return web.json_response({"waiting": await asyncio.to_thread(review_gate.waiting)})

    @routes.post(f"{PREFIX}/release")
    @_guarded
    async def release(request: web.Request) -> web.Response:
        body = await _read_json(request)
        key = body.get("key")
        if not isinstance(key, str) or not key or len(key) > 200:
            raise HttpError(400, "key must be the id of a waiting gate (from /flenwheel/review/waiting).")
        if not review_gate.release(key):
            raise HttpError(404, "No gate with this key is waiting.")
        return web.json_response({"released": key})

    @routes.get(f"{PREFIX}/characters")
    @_guarded
    async def characters(_request: web.Request) -> web.Response:
        def work():
            out = []
            for name in review_store.list_characters(bridge.output_directory()):
                store = review_store.existing_store(bridge.output_directory(), name)
                out.append({"name": name, "counts": store.counts()})
            return out

        return web.json_response({"characters": await asyncio.to_thread(work)})

    @routes.get(PREFIX + "/{character}/items")
    @_guarded
    async def items(request: web.Request) -> web.Response:
        store = _store(request)
        q = request.query
        offset = _int(q.get("offset", 0), "offset")
        limit = _int(q.get("limit", 60), "limit", 1, 500)
        filters = _filters(q)
        sort = q.get("sort") or "id"
        if sort not in review_store.SORTS:
            raise HttpError(400, f"Unknown sort {sort!r}; one of {', '.join(review_store.SORTS)}.")
        page = await asyncio.to_thread(store.list, offset, limit, sort, **filters)
        return web.json_response({"items": [public_item(i) for i in page.items], "total": page.total,
                                  "offset": page.offset, "limit": page.limit})

    @routes.get(PREFIX + r"/{character}/items/{id:\d+}")
    @_guarded
    async def item(request: web.Request) -> web.Response:
        store = _store(request)
        cid = _int(request.match_info["id"], "id")

        def work():
            return {"item": public_item(store.get(cid)), "history": store.history(cid),
                    "correction": store.correction(cid)}

        return web.json_response(await asyncio.to_thread(work))

    @routes.get(PREFIX + "/{character}/counts")
    @_guarded
    async def counts(request: web.Request) -> web.Response:
        store = _store(request)
        filters = _filters(request.query)
        return web.json_response(await asyncio.to_thread(store.counts, **filters))

    @routes.get(PREFIX + "/{character}/facets")
    @_guarded
    async def facets(request: web.Request) -> web.Response:
        store = _store(request)

        def work():
            return {"runs": store.runs(), "labels": store.labels(), "reasons": list(review_store.REASONS),
                    "reason_labels": [review_store.REASON_LABELS[r] for r in review_store.REASONS],
                    "statuses": list(review_store.STATUSES)}

        return web.json_response(await asyncio.to_thread(work))

    @routes.post(PREFIX + "/{character}/decide")
    @_guarded
    async def decide(request: web.Request) -> web.Response:
        store = _store(request)
        body = await _read_json(request)
        action = body.get("action")
        if action not in review_store.ACTIONS:
            raise HttpError(400, f"action must be one of {', '.join(review_store.ACTIONS)}.")
        ids = body.get("ids")
        if ids is None and "id" in body:
            ids = [body["id"]]
        if not isinstance(ids, list) or not ids or len(ids) > MAX_IDS:
            raise HttpError(400, f"ids must be a list of 1–{MAX_IDS} candidate ids.")
        ids = [_int(i, "id") for i in ids]
        reasons = body.get("reasons") or []
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            raise HttpError(400, "reasons must be a list of reason tags.")
        better = body.get("better_id")
        better = None if better is None else _int(better, "better_id")
        kwargs = {"reasons": reasons, "note": body.get("note") or "", "instruction": body.get("instruction") or "",
                  "better_id": better, "who": _who(request, body)}
        for key in ("note", "instruction"):
            if not isinstance(kwargs[key], str):
                raise HttpError(400, f"{key} must be text.")
        caption = body.get("caption")
        if caption is not None:
            if not isinstance(caption, str):
                raise HttpError(400, "caption must be text (the caption itself, never a file name).")
            if len(ids) != 1:
                raise HttpError(400, "A caption belongs to one candidate: send it with a decision on one id.")
            kwargs["caption"] = review_store.clean_caption(caption)  # a bad one is refused before anything runs

        def work():
            missing = [i for i in ids if not store.exists(i)]
            if missing:
                raise HttpError(404, f"Unknown candidate id {missing[0]}.")
            return [store.decide(i, action, **kwargs) for i in ids]

        done = await asyncio.to_thread(work)
        review_gate.notify(store.character)
        # Every decision above (and its caption) is committed (WAL, synchronous=FULL) before this answer is sent.
        return web.json_response({"saved": True, "items": [public_item(i) for i in done],
                                  "counts": await asyncio.to_thread(store.counts)})

    @routes.post(PREFIX + r"/{character}/items/{id:\d+}/fixed")
    @_guarded
    async def upload_fixed(request: web.Request) -> web.Response:
        store = _store(request)
        cid = _int(request.match_info["id"], "id")
        data = await _read_body(request, IMAGE_BODY_LIMIT)
        if not data:
            raise HttpError(400, "Send the fixed image (PNG or JPEG bytes) as the request body.")
        note = request.query.get("note", "")
        item = await asyncio.to_thread(store.correct, cid, fixed_image=data, note=note, who=_who(request))
        review_gate.notify(store.character)
        return web.json_response({"saved": True, "items": [public_item(item)]})

    def _file_route(kind: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            store = _store(request)
            cid = _int(request.match_info["id"], "id")
            index = _int(request.match_info.get("n", 0), "n", 0, 64)
            path = await asyncio.to_thread(store.file_path, cid, kind, index)
            if not path.is_file():
                raise HttpError(404, "The file of this item is missing from the store.")
            return _file(path)

        return _guarded(handler)

    routes.get(PREFIX + r"/{character}/thumb/{id:\d+}")(_file_route("thumb"))
    routes.get(PREFIX + r"/{character}/image/{id:\d+}")(_file_route("image"))
    routes.get(PREFIX + r"/{character}/fixed/{id:\d+}")(_file_route("fixed"))
    routes.get(PREFIX + r"/{character}/source/{id:\d+}/{n:\d+}")(_file_route("source"))
    routes.get(PREFIX + r"/{character}/ref/{id:\d+}/{n:\d+}")(_file_route("ref"))
