"""The review gallery in real Chromium against a real ComfyUI: judge with the keyboard, load approved."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from test_review_routes import COLORS, load_prompt, review_prompt, rgb, saved_colors

from engines import review_store

pytestmark = pytest.mark.browser


@pytest.fixture
def gallery(browser, comfy_server):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda err: console.append(f"pageerror: {err}"))

    def open_(character: str):
        page.goto(f"{comfy_server.url}/flenwheel/review/page?character={character}", wait_until="domcontentloaded")
        page.wait_for_selector("#flen-review-root[data-ready='1']", timeout=30_000)
        return page

    page.flen_open = open_
    page.flen_console = console
    yield page
    context.close()


def card_status(page, idx: int) -> str:
    return page.get_attribute(f".flen-rv-card[data-idx='{idx}']", "data-status")


def wait_status(page, idx: int, status: str) -> None:
    page.wait_for_selector(f".flen-rv-card[data-idx='{idx}'][data-status='{status}']", timeout=10_000)


def test_judge_with_the_keyboard_then_load_approved(comfy, comfy_server, gallery):
    character = "kb_" + uuid.uuid4().hex[:8]
    comfy.run(review_prompt(character, run_id="batch1"))
    page = gallery.flen_open(character)
    assert page.locator(".flen-rv-card").count() == 4
    assert "A approve" in page.inner_text(".flen-rv-keys")  # shortcuts are visible
    assert page.inner_text(".flen-rv-count-pending b") == "4"
    # the focused view shows the source beside the candidate
    assert page.locator(".flen-rv-focus img.flen-rv-source").count() == 1
    assert page.locator(".flen-rv-focus img.flen-rv-candidate").count() == 1

    page.keyboard.press("a")                      # approve #0, focus moves to #1
    wait_status(page, 0, "approved")
    page.keyboard.press("r")                      # reject #1 …
    page.wait_for_selector(".flen-rv-reasons:not([hidden])")
    page.keyboard.press("1")                      # … for identity drift
    wait_status(page, 1, "rejected")
    page.keyboard.press("a")                      # approve #2 …
    wait_status(page, 2, "approved")
    page.keyboard.press("u")                      # … and undo it
    wait_status(page, 2, "pending")
    page.keyboard.press("j")                      # next: #3
    page.keyboard.press("a")
    wait_status(page, 3, "approved")
    page.keyboard.press("k")
    page.keyboard.press("k")                      # back to #1
    assert page.get_attribute(".flen-rv-card.focused", "data-idx") == "1"
    page.wait_for_function("document.querySelector('.flen-rv-count-approved b').textContent === '2'")
    assert [card_status(page, i) for i in range(4)] == ["approved", "rejected", "pending", "approved"]

    ids = [int(page.get_attribute(f".flen-rv-card[data-idx='{i}']", "data-id")) for i in range(4)]
    hist = comfy.get(f"/flenwheel/review/{character}/items/{ids[1]}").json()["history"]
    assert hist[-1]["action"] == "reject" and hist[-1]["reasons"] == ["identity_drift"]
    hist2 = comfy.get(f"/flenwheel/review/{character}/items/{ids[2]}").json()["history"]
    assert [h["action"] for h in hist2] == ["approve", "undo"]

    outputs = comfy.run(load_prompt(character))
    assert saved_colors(comfy_server, outputs) == [rgb(COLORS[0]), rgb(COLORS[3])]
    assert not [line for line in gallery.flen_console if line.startswith("pageerror")]
    assert not [line for line in gallery.flen_console if "404" in line]


def test_bulk_select_and_filters(comfy, gallery):
    character = "bulk_" + uuid.uuid4().hex[:8]
    comfy.run(review_prompt(character, run_id="b1"))
    page = gallery.flen_open(character)
    page.keyboard.press("x")
    page.keyboard.press("j")
    page.keyboard.press("x")
    assert "2 selected" in page.inner_text(".flen-rv-pageinfo")
    page.click(".flen-rv-bulk-reject")
    wait_status(page, 0, "rejected")
    wait_status(page, 1, "rejected")
    only = ("(s) => { const c = [...document.querySelectorAll('.flen-rv-card')];"
            " return c.length === 2 && c.every((x) => x.dataset.status === s); }")
    page.select_option(".flen-rv-status", "rejected")
    page.wait_for_function(only, arg="rejected")
    page.select_option(".flen-rv-status", "pending")
    page.wait_for_function(only, arg="pending")
    page.keyboard.press("Shift+A")                # approve the whole (filtered) page
    wait_status(page, 0, "approved")
    wait_status(page, 1, "approved")
    counts = comfy.get(f"/flenwheel/review/{character}/counts").json()
    assert (counts["approved"], counts["rejected"], counts["pending"]) == (2, 2, 0)


def test_sidebar_tab_shows_the_gallery(comfy, comfy_page):
    character = "side_" + uuid.uuid4().hex[:8]
    comfy.run(review_prompt(character, colors=COLORS[:2]))
    page = comfy_page
    page.wait_for_function("document.documentElement.dataset.flenReviewTab === 'registered'")
    page.evaluate("(c) => localStorage.setItem('flen.review.character', c)", character)
    page.click(".flenwheel-review-tab-button")
    page.wait_for_selector(".flen-review-sidebar[data-ready='1']", timeout=30_000)
    page.wait_for_function("document.querySelectorAll('.flen-review-sidebar .flen-rv-card').length === 2")
    page.click(".flen-review-sidebar .flen-rv-card[data-idx='0']")
    page.keyboard.press("a")
    page.wait_for_selector(".flen-review-sidebar .flen-rv-card[data-idx='0'][data-status='approved']")


def test_gallery_with_5000_candidates_first_paint_and_decision_round_trip(comfy_server, gallery):
    character = "bench_" + uuid.uuid4().hex[:6]
    store = review_store.ReviewStore(comfy_server.base / "output", character)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for chunk in range(10):
        images = [rng.random((64, 64, 3), dtype=np.float32) for _ in range(500)]
        store.add_candidates(images, [{"score": float(k % 100) / 100, "label": f"angle_{k % 8}"} for k in range(500)],
                             run_id=f"bench{chunk}")
    seed_s = time.perf_counter() - t0
    store.close()
    t0 = time.perf_counter()
    page = gallery.flen_open(character)
    page.wait_for_function("""() => { const img = document.querySelector('.flen-rv-card img');
                                      return img && img.complete && img.naturalWidth > 0; }""", timeout=30_000)
    first_paint_ms = (time.perf_counter() - t0) * 1000
    assert "1–60 of 5000" in page.inner_text(".flen-rv-pageinfo")
    trips = []
    for i in range(20):
        t1 = time.perf_counter()
        page.keyboard.press("a")
        wait_status(page, i, "approved")
        trips.append((time.perf_counter() - t1) * 1000)
    server_side = float(page.get_attribute("#flen-review-root", "data-round-trip-ms"))
    report = (f"review gallery, 5000 candidates: first paint {first_paint_ms:.0f} ms (navigation to first thumbnail), "
              f"decision round-trip median {sorted(trips)[len(trips) // 2]:.1f} ms / max {max(trips):.1f} ms "
              f"(key press to card updated, committed), fetch-only {server_side:.1f} ms; seeding {seed_s:.1f} s")
    print("\n" + report)
    assert first_paint_ms < 10_000 and max(trips) < 2_000


def test_gate_is_released_by_the_gallery_and_passes_only_approved(comfy, comfy_server, gallery):
    from test_review_gate import gate_prompt, wait_gates

    character = "bg_" + uuid.uuid4().hex[:8]
    pid = comfy.queue(gate_prompt(character, colors=COLORS[:3]))
    wait_gates(comfy, 1)
    page = gallery.flen_open(character)
    page.wait_for_selector(".flen-rv-waiting:not([hidden]) .flen-rv-gate", timeout=10_000)
    assert character in page.inner_text(".flen-rv-waiting")  # the gallery shows which runs wait
    page.keyboard.press("4")                      # reject #0: wrong expression
    wait_status(page, 0, "rejected")
    page.keyboard.press("a")                      # approve #1; #2 stays pending
    wait_status(page, 1, "approved")
    page.click(".flen-rv-gate .flen-rv-release")  # "continue"
    outputs = comfy.wait(pid, timeout=30)["outputs"]
    assert saved_colors(comfy_server, outputs) == [rgb(COLORS[1])]
    page.wait_for_selector(".flen-rv-waiting[hidden]", state="attached", timeout=10_000)
