"""FLENReviewGate: pauses the graph until the human has judged this batch in the review gallery.

Any number of gates may wait at once: each is keyed by its prompt id and node id. Routes run on
the server's event loop, the gate (an async node, so several gates of one prompt wait side by
side) on the executor's loop in ComfyUI's worker thread; a decision or a release sets the
gate's threading.Event, and the gate polls ComfyUI's interrupt flag while it waits, so
``POST /interrupt`` ends it within a fraction of a second.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from comfy_api.v0_0_2 import io

from ..engines import review_store
from ..engines.errors import FlenUserError
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, MetaType
from .review_nodes import approved_outputs, queue_candidates, review_inputs

POLL_S = 0.2
POLICIES = ("leave_pending", "approve_all", "approve_none", "approve_above_score")


@dataclass
class Gate:
    key: str
    character: str
    run_id: str
    ids: list[int]
    store: review_store.ReviewStore
    event: threading.Event = field(default_factory=threading.Event)
    released: bool = False
    created_at: float = field(default_factory=time.time)

    def pending(self) -> int:
        return sum(1 for i in self.ids if self.store.get(i)["status"] == "pending")


_lock = threading.Lock()
_gates: dict[str, Gate] = {}


def waiting() -> list[dict]:
    with _lock:
        gates = list(_gates.values())
    return [{"key": g.key, "character": g.character, "run_id": g.run_id, "count": len(g.ids),
             "pending": g.pending(), "since": g.created_at} for g in gates]


def notify(character: str) -> None:
    """A decision was taken for this character: wake its gates (they re-check their batch)."""
    with _lock:
        gates = [g for g in _gates.values() if g.character == character]
    for g in gates:
        g.event.set()


def release(key: str) -> bool:
    """The reviewer pressed "continue": the gate passes on what is approved now."""
    with _lock:
        gate = _gates.get(key)
    if gate is None:
        return False
    gate.released = True
    gate.event.set()
    return True


def _apply_timeout_policy(gate: Gate, policy: str, threshold: float) -> str:
    pending = [gate.store.get(i) for i in gate.ids]
    pending = [p for p in pending if p["status"] == "pending"]
    who = "FLENReviewGate timeout"
    if policy == "approve_all":
        for p in pending:
            gate.store.approve(p["id"], who=who)
    elif policy == "approve_none":
        for p in pending:
            gate.store.reject(p["id"], ["other"], note="not judged before the gate's timeout", who=who)
    elif policy == "approve_above_score":
        for p in pending:
            if p["score"] is not None and p["score"] >= threshold:
                gate.store.approve(p["id"], who=who)
    return f"timed out with {len(pending)} pending; policy {policy}"


class FLENReviewGate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENReviewGate",
            display_name="FLEN Review Gate",
            category=f"{CATEGORY}/review",
            description="Stores the batch for review and pauses the graph until every image is judged in the "
                        "FLENwheel review gallery (or the reviewer presses continue there), then passes on only "
                        "the approved images. Cancel (or POST /interrupt) stops it at once.",
            inputs=[
                io.Image.Input("images", tooltip="The candidates to judge."),
                *review_inputs(),
                io.Int.Input("timeout_s", default=0, min=0, max=7 * 24 * 3600, optional=True,
                             tooltip="0 waits forever. Otherwise seconds without any decision on this batch "
                                     "before the timeout policy applies (judging restarts the clock)."),
                io.Combo.Input("timeout_policy", options=list(POLICIES), default="leave_pending", optional=True,
                               tooltip="On timeout: leave_pending (pass on what is approved, keep the rest for "
                                       "later), approve_all, approve_none (reject the rest), approve_above_score."),
                io.Float.Input("score_threshold", default=0.5, min=-1.0, max=1.0, step=0.01, optional=True,
                               tooltip="For approve_above_score: pending images with an identity score at or "
                                       "above this are approved on timeout."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The approved images of this batch."),
                     MetaType.Output(display_name="meta", tooltip="One record per approved image."),
                     io.String.Output(display_name="summary", tooltip="How the gate ended, in words.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **_kwargs) -> str:
        return uuid.uuid4().hex  # a human decides each time: never served from cache

    @classmethod
    async def execute(cls, images: torch.Tensor, character: str, run_id: str = "", version: str = "",
                meta: list | None = None, source_images: torch.Tensor | None = None, timeout_s: int = 0,
                timeout_policy: str = "leave_pending", score_threshold: float = 0.5) -> io.NodeOutput:
        if timeout_policy not in POLICIES:
            raise FlenUserError(f"Unknown timeout policy {timeout_policy!r}; one of {', '.join(POLICIES)}.")
        store, run_id, ids = queue_candidates(images, meta, character, run_id, version, source_images)
        key = f"{bridge.current_prompt_id() or uuid.uuid4().hex}:{cls.hidden.unique_id}"
        gate = Gate(key=key, character=store.character, run_id=run_id, ids=ids, store=store)
        with _lock:
            _gates[key] = gate
        how = "all judged"
        # The bar shows how much of the batch is judged, and the node's text says it waits for a person: a gate
        # at 0 % with no word looked stuck.
        progress = bridge.Progress(len(ids))
        judged = -1
        try:
            last_activity = time.monotonic()
            token = store.state_token()
            while True:
                pending = gate.pending()
                if len(ids) - pending != judged:
                    judged = len(ids) - pending
                    progress.update(judged, len(ids), text=f"waiting for your review: {pending} items (judged "
                                                         f"{judged} of {len(ids)}); open the FLEN review gallery")
                if pending == 0:
                    break
                bridge.check_interrupt()
                if gate.released:
                    how = "released from the gallery"
                    break
                # async: several gates of one prompt wait side by side on the executor's loop
                await asyncio.sleep(POLL_S)
                if gate.event.is_set():
                    gate.event.clear()
                    last_activity = time.monotonic()
                now_token = store.state_token()
                if now_token != token:  # decisions from another process or path
                    token, last_activity = now_token, time.monotonic()
                if timeout_s and time.monotonic() - last_activity > timeout_s:
                    how = _apply_timeout_policy(gate, timeout_policy, score_threshold)
                    break
        finally:
            with _lock:
                _gates.pop(key, None)
        items = [store.get(i) for i in ids]
        approved = [i for i in items if i["status"] == "approved"]
        batch, metas, _ = approved_outputs(store, approved)
        summary = f"Review gate ({how}): {len(approved)} of {len(ids)} approved, run {run_id}."
        return io.NodeOutput(batch, metas, summary, ui={"text": [summary]})


NODES = [FLENReviewGate]
