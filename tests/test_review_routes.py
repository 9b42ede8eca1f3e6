"""Review nodes and routes in a real ComfyUI: queue, judge over HTTP, load approved; security."""

from __future__ import annotations

import http.client
import io
import json
import uuid
from urllib.parse import urlsplit

import pytest
from PIL import Image
from review_prompts import COLORS, review_prompt

pytestmark = pytest.mark.server

def load_prompt(character: str, run_id: str = "", tag: str = "") -> dict:
    return {"load": {"class_type": "FLENLoadApproved", "inputs": {"character": character, "run_id": run_id,
                                                                 "version": ""}},
            "save": {"class_type": "SaveImage", "inputs": {"images": ["load", 0],
                                                           "filename_prefix": f"approved_{tag or character}"}}}


def saved_colors(comfy_server, outputs: dict) -> list[tuple[int, int, int]]:
    out = []
    for node in outputs.values():
        for img in node.get("images", []):
            path = comfy_server.base / "output" / img["subfolder"] / img["filename"]
            with Image.open(path) as im:
                out.append(im.convert("RGB").getpixel((0, 0)))
    return out


def rgb(c: int) -> tuple[int, int, int]:
    return (c >> 16 & 255, c >> 8 & 255, c & 255)


@pytest.fixture
def queued(comfy):
    character = "t_" + uuid.uuid4().hex[:10]
    comfy.run(review_prompt(character, run_id="night1"))
    items = comfy.get(f"/flenwheel/review/{character}/items").json()["items"]
    return character, items


def test_queue_stores_candidates_and_routes_list_them(comfy, comfy_server, queued):
    character, items = queued
    assert len(items) == 4 and {i["status"] for i in items} == {"pending"}
    assert {i["run_id"] for i in items} == {"night1"} and all(i["n_sources"] == 1 for i in items)
    assert "image" not in items[0] and "thumb" not in items[0]  # no file names leave the server
    chars = {c["name"]: c["counts"] for c in comfy.get("/flenwheel/review/characters").json()["characters"]}
    assert chars[character]["pending"] == 4
    assert (comfy_server.base / "output" / "flenwheel" / character / "review.sqlite").is_file()
    thumb = comfy.get(f"/flenwheel/review/{character}/thumb/{items[0]['id']}")
    assert thumb.status_code == 200 and thumb.headers["Content-Type"] == "image/jpeg"
    full = comfy.get(f"/flenwheel/review/{character}/image/{items[1]['id']}")
    assert Image.open(io.BytesIO(full.content)).convert("RGB").getpixel((3, 3)) == rgb(COLORS[1])
    src = comfy.get(f"/flenwheel/review/{character}/source/{items[1]['id']}/0")
    assert Image.open(io.BytesIO(src.content)).convert("RGB").getpixel((0, 0)) == rgb(COLORS[0])
    facets = comfy.get(f"/flenwheel/review/{character}/facets").json()
    assert [r["run_id"] for r in facets["runs"]] == ["night1"] and facets["reasons"][0] == "identity_drift"
    assert facets["reason_labels"][0] == "identity drift" and len(facets["reason_labels"]) == len(facets["reasons"])


def test_decide_over_http_then_load_approved_returns_exactly_those(comfy, comfy_server, queued):
    character, items = queued
    ids = [i["id"] for i in items]
    before = {"load": {"class_type": "FLENLoadApproved", "inputs": {"character": character}},
              "show": {"class_type": "PreviewAny", "inputs": {"source": ["load", 3]}}}
    assert "Nothing approved yet" in json.dumps(comfy.run(before))  # an empty batch, not an error
    r = comfy.post(f"/flenwheel/review/{character}/decide", {"ids": [ids[0], ids[2]], "action": "approve"})
    assert r.status_code == 200 and r.json()["saved"] and r.json()["counts"]["approved"] == 2
    r = comfy.post(f"/flenwheel/review/{character}/decide",
                   {"ids": [ids[1]], "action": "reject", "reasons": ["identity_drift"], "note": "nose"})
    assert r.json()["items"][0]["status"] == "rejected"
    comfy.post(f"/flenwheel/review/{character}/decide", {"ids": [ids[3]], "action": "approve"})
    comfy.post(f"/flenwheel/review/{character}/decide", {"ids": [ids[3]], "action": "undo"})
    comfy.post(f"/flenwheel/review/{character}/decide", {"ids": [ids[1]], "action": "correct",
                                                         "instruction": "keep the nose"})
    detail = comfy.get(f"/flenwheel/review/{character}/items/{ids[3]}").json()
    assert [h["action"] for h in detail["history"]] == ["approve", "undo"] and detail["item"]["status"] == "pending"
    outputs = comfy.run(load_prompt(character, tag="after"))
    assert saved_colors(comfy_server, outputs) == [rgb(COLORS[0]), rgb(COLORS[2])]
    assert comfy.get(f"/flenwheel/review/{character}/counts").json() == {
        "pending": 1, "approved": 2, "rejected": 0, "corrected": 1, "total": 4}


def test_load_approved_of_an_unknown_character_names_the_known_ones(comfy, queued):
    character, _items = queued
    typo = "never_" + uuid.uuid4().hex[:8]
    prompt = {"load": {"class_type": "FLENLoadApproved", "inputs": {"character": typo}},
              "show": {"class_type": "PreviewAny", "inputs": {"source": ["load", 3]}}}
    error = comfy.run_error(prompt)
    assert error["node_type"] == "FLENLoadApproved"
    assert f"No character '{typo}'" in error["exception_message"] and character in error["exception_message"]


def test_upload_fixed_image_is_a_correction(comfy, queued):
    character, items = queued
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (7, 8, 9)).save(buf, "PNG")
    url = f"/flenwheel/review/{character}/items/{items[0]['id']}/fixed"
    r = comfy.post(url, None, data=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["items"][0]["status"] == "corrected"
    fixed = comfy.get(f"/flenwheel/review/{character}/fixed/{items[0]['id']}")
    assert Image.open(io.BytesIO(fixed.content)).getpixel((0, 0)) == (7, 8, 9)
    bad = comfy.post(url, None, data=b"no image", headers={"Content-Type": "image/png"})
    assert bad.status_code == 400 and "not a readable image" in bad.json()["error"]


def test_a_caption_goes_with_the_decision_and_comes_back_after_commit(comfy, comfy_server, queued):
    character, items = queued
    cid = items[0]["id"]
    assert items[0]["caption"] == "" and items[0]["caption_edited"] is False
    r = comfy.post(f"/flenwheel/review/{character}/decide",
                   {"ids": [cid], "action": "approve", "caption": " ohwx_char person, in a red room\n "})
    assert r.status_code == 200
    assert (r.json()["items"][0]["caption"], r.json()["items"][0]["caption_edited"]) == (
        "ohwx_char person, in a red room", True)
    detail = comfy.get(f"/flenwheel/review/{character}/items/{cid}").json()
    assert detail["item"]["caption"] == "ohwx_char person, in a red room"
    assert (detail["history"][-1]["caption"], detail["history"][-1]["caption_before"]) == (
        "ohwx_char person, in a red room", "")
    # a caption that looks like a path is only text: stored as typed, no file is read or written
    r = comfy.post(f"/flenwheel/review/{character}/decide",
                   {"ids": [cid], "action": "approve", "caption": "../../../secret.txt"})
    assert r.json()["items"][0]["caption"] == "../../../secret.txt"
    assert not (comfy_server.base / "output" / "flenwheel" / character / "secret.txt").exists()
    r = comfy.post(f"/flenwheel/review/{character}/decide", {"ids": [cid], "action": "undo"})
    assert r.json()["items"][0]["caption"] == "ohwx_char person, in a red room"
    # the approval with it is what FLEN Load Approved gives downstream
    outputs = comfy.run({"load": {"class_type": "FLENLoadApproved", "inputs": {"character": character}},
                         "show": {"class_type": "PreviewAny", "inputs": {"source": ["load", 1]}}})
    (record,) = json.loads(outputs["show"]["text"][0])
    assert record["reviewer_caption"] == record["caption"] == "ohwx_char person, in a red room"
    assert record["caption_edited"] is True


BAD_CAPTIONS = [
    ({"caption": 5}, 400, "caption must be text"),
    ({"caption": {"path": "/etc/passwd"}}, 400, "never a file name"),
    ({"caption": ["a"]}, 400, "caption must be text"),
    ({"caption": "x" * 1501}, 400, "keep it under 1500"),
    ({"caption": "ring\u0007"}, 400, "control character"),
    ({"caption": "two", "ids": "both"}, 400, "belongs to one candidate"),
    ({"caption": "back", "action": "undo"}, 400, "undo takes no caption"),
]


@pytest.mark.parametrize("extra,expected,message", BAD_CAPTIONS)
def test_bad_captions_get_400_with_a_message_and_change_nothing(comfy, comfy_server, queued, extra, expected,
                                                                message):
    character, items = queued
    body = {"ids": [items[0]["id"]], "action": "approve", **extra}
    if body["ids"] == "both":
        body["ids"] = [items[0]["id"], items[1]["id"]]
    status, answer = raw_request(comfy_server.url, "POST", f"/flenwheel/review/{character}/decide",
                                 json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert status == expected, answer
    assert message in json.loads(answer)["error"]
    after = comfy.get(f"/flenwheel/review/{character}/items/{items[0]['id']}").json()
    assert after["item"]["status"] == "pending" and after["item"]["caption"] == "" and after["history"] == []


# ---- security ----------------------------------------------------------------------------------

def raw_request(base_url: str, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes]:
    """Sends the path byte for byte (no client-side normalisation of ../ or %2e)."""
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body is not None:
            conn.send(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


SECRET = b"FLEN-SECRET-OUTSIDE-STORE"


@pytest.fixture
def secret(comfy_server):
    for where in (comfy_server.base / "secret.txt", comfy_server.base / "output" / "flenwheel" / "secret.txt"):
        where.write_bytes(SECRET)
    return SECRET


TRAVERSALS = [
    "/flenwheel/review/{c}/image/../../../secret.txt",
    "/flenwheel/review/{c}/image/..%2f..%2f..%2fsecret.txt",
    "/flenwheel/review/{c}/image/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/flenwheel/review/%2e%2e/image/1",
    "/flenwheel/review/..%2f..%2f/image/1",
    "/flenwheel/review/%2e%2e%2f%2e%2e%2f/thumb/1",
    "/flenwheel/review/{c}/image//etc/passwd",
    "/flenwheel/review/{c}/image/%2fetc%2fpasswd",
    "/flenwheel/review/{c}/source/1/..%2f..%2fsecret.txt",
    "/flenwheel/review/{c}/image/1%2f..%2f..%2fsecret.txt",
    "/flenwheel/review/{c}/image/99999999",
    "/flenwheel/review/{c}/source/1/7",
    "/flenwheel/review/{c}/fixed/2",
    "/flenwheel/review/nobody_here/image/1",
    "/flenwheel/review/{c}/items?offset=-1",
    "/flenwheel/review/{c}/items?limit=abc",
    "/flenwheel/review/{c}/items?status=..%2f",
    "/flenwheel/review/{c}/items?score_min=nan",
    "/flenwheel/review/secret.txt/items",
    "/flenwheel/review/" + "a" * 65 + "/items",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_unknown_ids_and_bad_queries_get_4xx_and_nothing_outside(comfy_server, queued, secret, path):
    character, _items = queued
    status, body = raw_request(comfy_server.url, "GET", path.format(c=character))
    assert 400 <= status < 500, (path, status, body[:200])
    assert secret not in body and b"root:" not in body


BAD_BODIES = [
    (b"not json", 400), (b"[1, 2]", 400), (b'{"action": "approve"}', 400),
    (b'{"action": "approve", "ids": []}', 400), (b'{"action": "approve", "ids": ["../x"]}', 400),
    (b'{"action": "approve", "ids": [99999999]}', 404), (b'{"action": "delete", "ids": [1]}', 400),
    (b'{"action": "reject", "ids": [1], "reasons": ["nope"]}', 400),
    (b'{"action": "reject", "ids": [1], "reasons": "identity_drift"}', 400),
    (b'{"action": "approve", "ids": [true]}', 400), (b'{"action": "correct", "ids": [1]}', 400),
    (b'{"action": "approve", "ids": [1], "path": "/etc/passwd", "note": 5}', 400),
    (b"\xff\xfe", 400),
]


@pytest.mark.parametrize("body,expected", BAD_BODIES)
def test_malformed_decisions_get_4xx_with_a_message(comfy_server, queued, body, expected):
    character, items = queued
    body = body.replace(b"[1]", f"[{items[0]['id']}]".encode())
    status, answer = raw_request(comfy_server.url, "POST", f"/flenwheel/review/{character}/decide", body,
                                 {"Content-Type": "application/json"})
    assert status == expected, answer
    assert json.loads(answer)["error"]


def test_oversized_bodies_are_refused_with_413(comfy_server, queued):
    character, items = queued
    big = json.dumps({"action": "approve", "ids": [items[0]["id"]], "note": "x" * 200_000}).encode()
    status, answer = raw_request(comfy_server.url, "POST", f"/flenwheel/review/{character}/decide", big,
                                 {"Content-Type": "application/json"})
    assert status == 413 and b"too large" in answer
    huge = b"\x89PNG" + b"0" * (17 * 1024 * 1024)
    status, answer = raw_request(comfy_server.url, "POST",
                                 f"/flenwheel/review/{character}/items/{items[0]['id']}/fixed", huge,
                                 {"Content-Type": "image/png"})
    assert status == 413
    after = json.loads(raw_request(comfy_server.url, "GET", f"/flenwheel/review/{character}/counts")[1])
    assert after["pending"] == 4  # nothing was decided by the refused requests
