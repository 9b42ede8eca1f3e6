"""FLENReviewGate in a real ComfyUI: waits, released by decisions, two at once, interrupt, timeout."""

from __future__ import annotations

import time
import uuid

import pytest
from test_review_routes import COLORS, review_prompt, rgb, saved_colors

pytestmark = pytest.mark.server


def gate_prompt(character: str, colors=COLORS, tag: str = "g", **gate_inputs) -> dict:
    prompt = review_prompt(character, colors=colors, run_id=f"run_{tag}")
    prompt[f"gate_{tag}"] = prompt.pop("queue")
    prompt[f"gate_{tag}"]["class_type"] = "FLENReviewGate"
    prompt[f"gate_{tag}"]["inputs"].update(gate_inputs)
    prompt[f"save_{tag}"] = {"class_type": "SaveImage", "inputs": {"images": [f"gate_{tag}", 0],
                                                                 "filename_prefix": f"gate_{character}"}}
    return prompt


def wait_gates(comfy, n: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = comfy.get("/flenwheel/review/waiting").json()["waiting"]
        if len(waiting) >= n:
            return waiting
        time.sleep(0.1)
    raise AssertionError(f"{n} gates never waited")


def decide(comfy, character, ids, action, **extra):
    r = comfy.post(f"/flenwheel/review/{character}/decide", {"ids": ids, "action": action, **extra})
    assert r.status_code == 200, r.text


def item_ids(comfy, character):
    return [i["id"] for i in comfy.get(f"/flenwheel/review/{character}/items").json()["items"]]


def test_gate_waits_until_judged_and_passes_only_approved(comfy, comfy_server):
    character = "gate_" + uuid.uuid4().hex[:8]
    pid = comfy.queue(gate_prompt(character))
    (gate,) = wait_gates(comfy, 1)
    assert gate["character"] == character and gate["pending"] == 4 and gate["key"].startswith(pid)
    ids = item_ids(comfy, character)
    decide(comfy, character, ids[:2], "reject", reasons=["artefacts"])
    decide(comfy, character, [ids[2]], "approve")
    time.sleep(1.0)
    assert comfy.get("/flenwheel/review/waiting").json()["waiting"]  # one still pending: keeps waiting
    decide(comfy, character, [ids[3]], "approve")
    outputs = comfy.wait(pid, timeout=30)["outputs"]
    assert saved_colors(comfy_server, outputs) == [rgb(COLORS[2]), rgb(COLORS[3])]
    assert comfy.get("/flenwheel/review/waiting").json()["waiting"] == []


def test_two_gates_wait_at_once_and_are_released_separately(comfy, comfy_server):
    a, b = "ga_" + uuid.uuid4().hex[:8], "gb_" + uuid.uuid4().hex[:8]
    # build the two halves with distinct node ids
    pa = gate_prompt(a, colors=COLORS[:2], tag="a")
    pb = gate_prompt(b, colors=COLORS[2:], tag="b")
    prompt = {}
    for prefix, half in (("a", pa), ("b", pb)):
        ren = {k: f"{prefix}{k}" if not k.startswith(("gate_", "save_")) else k for k in half}
        for k, node in half.items():
            inputs = {n: ([ren[v[0]], v[1]] if isinstance(v, list) else v) for n, v in node["inputs"].items()}
            prompt[ren[k]] = {"class_type": node["class_type"], "inputs": inputs}
    pid = comfy.queue(prompt)
    waiting = wait_gates(comfy, 2)
    assert {w["character"] for w in waiting} == {a, b}
    ida, idb = item_ids(comfy, a), item_ids(comfy, b)
    decide(comfy, b, [idb[1]], "approve")
    decide(comfy, b, [idb[0]], "reject", reasons=["wrong_angle"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(comfy.get("/flenwheel/review/waiting").json()["waiting"]) != 1:
        time.sleep(0.1)
    (left,) = comfy.get("/flenwheel/review/waiting").json()["waiting"]
    assert left["character"] == a  # b's gate went on, a's still waits
    decide(comfy, a, ida, "approve")
    outputs = comfy.wait(pid, timeout=30)["outputs"]
    assert saved_colors(comfy_server, {"save_a": outputs["save_a"]}) == [rgb(COLORS[0]), rgb(COLORS[1])]
    assert saved_colors(comfy_server, {"save_b": outputs["save_b"]}) == [rgb(COLORS[3])]


def test_interrupt_ends_a_waiting_gate_within_a_second(comfy):
    character = "gi_" + uuid.uuid4().hex[:8]
    pid = comfy.queue(gate_prompt(character))
    wait_gates(comfy, 1)
    t0 = time.monotonic()
    assert comfy.post("/interrupt", {}).status_code == 200
    while comfy.get("/flenwheel/review/waiting").json()["waiting"]:
        assert time.monotonic() - t0 < 1.0, "gate still waiting 1 s after POST /interrupt"
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entry = comfy.get(f"/history/{pid}").json().get(pid)
        if entry and entry["status"].get("completed") is not None:
            break
        time.sleep(0.05)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and elapsed < 1.0
    # the candidates stay in the store, pending, for later
    assert comfy.get(f"/flenwheel/review/{character}/counts").json()["pending"] == 4


def test_timeout_policy_and_release_from_gallery_route(comfy, comfy_server):
    character = "gt_" + uuid.uuid4().hex[:8]
    outputs = comfy.run(gate_prompt(character, colors=COLORS[:2], timeout_s=1, timeout_policy="approve_all"),
                        timeout=60)
    assert saved_colors(comfy_server, outputs) == [rgb(COLORS[0]), rgb(COLORS[1])]
    hist = comfy.get(f"/flenwheel/review/{character}/items/{item_ids(comfy, character)[0]}").json()["history"]
    assert hist[0]["who"] == "FLENReviewGate timeout"

    character = "gr_" + uuid.uuid4().hex[:8]
    pid = comfy.queue(gate_prompt(character, colors=COLORS[:3]))
    (gate,) = wait_gates(comfy, 1)
    ids = item_ids(comfy, character)
    decide(comfy, character, [ids[1]], "approve")
    assert comfy.post("/flenwheel/review/release", {"key": "nope"}).status_code == 404
    assert comfy.post("/flenwheel/review/release", {"key": 5}).status_code == 400
    assert comfy.post("/flenwheel/review/release", {"key": gate["key"]}).status_code == 200
    outputs = comfy.wait(pid, timeout=30)["outputs"]
    assert saved_colors(comfy_server, outputs) == [rgb(COLORS[1])]
    assert comfy.get(f"/flenwheel/review/{character}/counts").json()["pending"] == 2  # kept for later


@pytest.mark.parametrize("policy, counts", [
    ("leave_pending", {"pending": 3, "approved": 0, "rejected": 0}),
    ("approve_none", {"pending": 0, "approved": 0, "rejected": 3}),
    ("approve_all", {"pending": 0, "approved": 3, "rejected": 0}),
])
def test_each_timeout_policy_decides_what_it_names(comfy, policy, counts):
    """approve_above_score is checked with real identity scores in test_review_flow_server.py."""
    character = "gp_" + uuid.uuid4().hex[:8]
    prompt = gate_prompt(character, colors=COLORS[:3], timeout_s=1, timeout_policy=policy)
    prompt["save_g"] = {"class_type": "PreviewAny", "inputs": {"source": ["gate_g", 2]}}
    summary = " ".join(comfy.run(prompt, timeout=60)["save_g"]["text"])
    assert f"policy {policy}" in summary and f"{counts['approved']} of 3 approved" in summary, summary
    got = comfy.get(f"/flenwheel/review/{character}/counts").json()
    assert {k: got[k] for k in counts} == counts
    for item_id in item_ids(comfy, character):
        history = comfy.get(f"/flenwheel/review/{character}/items/{item_id}").json()["history"]
        if policy == "leave_pending":
            assert history == []
        else:
            assert [h["who"] for h in history] == ["FLENReviewGate timeout"]
            assert history[0]["reasons"] == (["other"] if policy == "approve_none" else [])
