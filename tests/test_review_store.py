"""The review store engine: candidates, decisions, undo, history, corrections, migrations, durability."""

from __future__ import annotations

import io
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from engines import review_store as rs
from engines.errors import FlenUserError

REPO = rs.Path(__file__).resolve().parents[1]


def _img(color, size=(24, 16)):
    a = np.zeros((size[1], size[0], 3), dtype=np.float32)
    a[:] = np.asarray(color, dtype=np.float32) / 255.0
    return a


@pytest.fixture
def store(tmp_path):
    s = rs.ReviewStore(tmp_path, "alice")
    yield s
    s.close()


def test_candidates_are_stored_with_files_meta_and_sources(store, tmp_path):
    metas = [{"prompt": "turn left", "seed": 7, "model": "qwen", "loras": [{"name": "a", "weight": 0.8}],
              "identity_score": 0.91, "angle": "left_45", "pose": {"yaw": 45}},
             {"instruction": "smile", "score": "0.4", "label": "smile"}]
    ids = store.add_candidates([_img((255, 0, 0)), _img((0, 255, 0))], metas, run_id="r1", version="v1",
                               sources=[_img((9, 9, 9), (8, 8))])
    assert len(ids) == 2
    a = store.get(ids[0])
    assert (a["prompt"], a["seed"], a["model"], a["score"], a["label"], a["status"]) == (
        "turn left", 7, "qwen", 0.91, "left_45", "pending")
    assert a["pose"] == {"yaw": 45} and a["loras"] == [{"name": "a", "weight": 0.8}]
    assert a["run_id"] == "r1" and a["version"] == "v1" and a["character"] == "alice"
    b = store.get(ids[1])
    assert (b["prompt"], b["score"], b["label"]) == ("smile", 0.4, "smile")
    assert a["sources"] == b["sources"] and len(a["sources"]) == 1  # one source shared by both
    ws = tmp_path / "flenwheel" / "alice"
    assert store.file_path(ids[0], "image").parent == (ws / "candidates").resolve()
    with Image.open(store.file_path(ids[0], "thumb")) as th:
        assert th.format == "JPEG"
    assert np.array_equal(store.load_image(ids[0]), _img((255, 0, 0)))
    assert not list(ws.rglob(".tmp-*"))  # atomic writes leave no temp files


def test_decisions_undo_and_history(store):
    (cid,) = store.add_candidates([_img((1, 2, 3))], run_id="r")
    assert store.approve(cid, who="ann")["status"] == "approved"
    assert store.reject(cid, ["identity_drift", "artefacts"], note="eyes", who="bob")["status"] == "rejected"
    assert store.undo(cid, who="bob")["status"] == "approved"
    assert store.undo(cid)["status"] == "pending"
    assert store.undo(cid)["undone"] is None  # nothing left to undo: no-op, no history row
    hist = store.history(cid)
    assert [(h["action"], h["prev_status"], h["new_status"]) for h in hist] == [
        ("approve", "pending", "approved"), ("reject", "approved", "rejected"),
        ("undo", "rejected", "approved"), ("undo", "approved", "pending")]
    assert hist[1]["reasons"] == ["identity_drift", "artefacts"] and hist[1]["note"] == "eyes"
    assert hist[1]["who"] == "bob" and hist[0]["who"] == "ann" and hist[0]["at"] > 0
    assert hist[2]["undoes"] == hist[1]["id"] and hist[1]["undone_by"] == hist[2]["id"]
    assert hist[3]["undoes"] == hist[0]["id"]


def test_bad_decisions_are_refused_and_change_nothing(store):
    (cid,) = store.add_candidates([_img((1, 2, 3))], run_id="r")
    with pytest.raises(FlenUserError, match="Unknown reason"):
        store.reject(cid, ["blurry"])
    with pytest.raises(FlenUserError, match="Unknown action"):
        store.decide(cid, "delete")
    with pytest.raises(FlenUserError, match="needs a corrected instruction"):
        store.correct(cid)
    with pytest.raises(FlenUserError, match="not another candidate"):
        store.correct(cid, better_id=999)
    with pytest.raises(KeyError):
        store.approve(12345)
    assert store.get(cid)["status"] == "pending" and store.history(cid) == []
    assert store.reject(cid)["status"] == "rejected" and store.history(cid)[0]["reasons"] == ["other"]


def test_corrections_instruction_better_target_and_fixed_image(store):
    a, b, c = store.add_candidates([_img((10, 0, 0)), _img((0, 10, 0)), _img((0, 0, 10))], run_id="r",
                                   metas=[{"prompt": "turn"}] * 3)
    store.correct(a, instruction="turn the head 45 degrees left, keep the face")
    store.correct(b, better_id=c)
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 200, 3)).save(buf, "PNG")
    store.correct(c, fixed_image=buf.getvalue(), note="fixed the ear")
    got = {x["candidate_id"]: x for x in store.corrections()}
    assert got[a]["corrected_instruction"].startswith("turn the head")
    assert got[b]["better_id"] == c and got[b]["better_image"] == store.get(c)["image"]
    assert got[c]["fixed_image"].startswith("corrections/") and got[c]["note"] == "fixed the ear"
    with Image.open(store.file_path(c, "fixed")) as im:
        assert im.getpixel((0, 0)) == (1, 200, 3)
    store.undo(a)
    assert a not in {x["candidate_id"] for x in store.corrections()}
    with pytest.raises(FlenUserError, match="not a readable image"):
        store.correct(a, fixed_image=b"not an image")


def test_listing_filters_paging_and_counts(store):
    for run in ("r1", "r2"):
        store.add_candidates([_img((k, k, k)) for k in range(5)], run_id=run,
                             metas=[{"score": k / 10, "label": "left" if k % 2 else "right"} for k in range(5)])
    assert store.counts() == {"pending": 10, "approved": 0, "rejected": 0, "corrected": 0, "total": 10}
    page = store.list(offset=0, limit=4)
    assert page.total == 10 and len(page.items) == 4
    assert [i["id"] for i in store.list(offset=8, limit=4).items] == [9, 10]
    store.approve(1)
    store.reject(2, ["wrong_angle"])
    assert store.counts(run_id="r1") == {"pending": 3, "approved": 1, "rejected": 1, "corrected": 0, "total": 5}
    assert store.list(status="approved").total == 1
    assert store.list(run_id="r2", label="left").total == 2
    assert [i["score"] for i in store.list(score_min=0.2, score_max=0.3, run_id="r1").items] == [0.2, 0.3]
    assert [r["run_id"] for r in store.runs()] == ["r1", "r2"] and store.labels() == ["left", "right"]
    with pytest.raises(FlenUserError):
        store.list(status="nope")


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a b", "é", "x" * 65, ".", "..", "/abs", "a\\b", None])
def test_character_names_are_safe_folder_names(tmp_path, name):
    with pytest.raises(FlenUserError, match="not allowed"):
        rs.ReviewStore(tmp_path, name)


def test_migrates_a_version_1_database_keeping_its_data(tmp_path):
    ws = tmp_path / "flenwheel" / "old"
    ws.mkdir(parents=True)
    conn = sqlite3.connect(ws / rs.DB_NAME, isolation_level=None)
    assert rs.migrate(conn, target=1) == 1
    conn.execute("INSERT INTO candidates (character, run_id, image, thumb, width, height, created_at, status) "
                 "VALUES ('old', 'r0', 'candidates/x.png', 'candidates/x.thumb.jpg', 8, 8, 1.0, 'approved')")
    conn.execute("INSERT INTO decisions (candidate_id, action, prev_status, new_status, at) "
                 "VALUES (1, 'approve', 'pending', 'approved', 1.0)")
    conn.close()
    store = rs.ReviewStore(tmp_path, "old")
    version = store._conn.execute("PRAGMA user_version").fetchone()[0]
    assert version == rs.SCHEMA_VERSION == 4
    item = store.get(1)
    assert item["status"] == "approved" and item["pose"] is None
    assert store.undo(1)["status"] == "pending"  # v2 columns (undoes) work on migrated rows
    assert store.history(1)[-1]["undoes"] == 1
    assert item["refs"] == []  # v3 column, empty on old rows
    store.close()


def test_refuses_a_database_from_a_newer_schema(tmp_path):
    ws = tmp_path / "flenwheel" / "new"
    ws.mkdir(parents=True)
    conn = sqlite3.connect(ws / rs.DB_NAME)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(FlenUserError, match="newer FLENwheel"):
        rs.ReviewStore(tmp_path, "new")


def test_decision_survives_sigkill_right_after_the_call_returns(tmp_path):
    store = rs.ReviewStore(tmp_path, "bob")
    ids = store.add_candidates([_img((5, 5, 5)), _img((6, 6, 6))], run_id="r")
    store.close()
    child = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from engines.review_store import ReviewStore
        s = ReviewStore({str(tmp_path)!r}, "bob")
        s.reject({ids[0]}, ["pixel_shift"], note="zoomed")
        s.approve({ids[1]})
        sys.stdout.write("saved\\n"); sys.stdout.flush()
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    reopened = rs.ReviewStore(tmp_path, "bob")
    assert reopened.get(ids[0])["status"] == "rejected" and reopened.get(ids[1])["status"] == "approved"
    assert reopened.history(ids[0])[0]["reasons"] == ["pixel_shift"]
    reopened.close()


def test_score_from_the_identity_filter_record_and_sort_by_score(store):
    # the record FLENIdentityFilter writes: the score under scores.identity and identity.score, none on top
    metas = [{"scores": {"identity": 0.31}, "identity": {"score": 0.31, "passed": False}},
             {"identity": {"score": 0.77}}, {"reason": "no face", "identity": {"score": None}}]
    ids = store.add_candidates([_img((k, 0, 0)) for k in range(3)], metas, run_id="r")
    assert [store.get(i)["score"] for i in ids] == [0.31, 0.77, None]
    assert [i["id"] for i in store.list(sort="score_desc").items] == [ids[1], ids[0], ids[2]]
    assert [i["id"] for i in store.list(sort="score_asc").items] == [ids[0], ids[1], ids[2]]
    assert [i["id"] for i in store.list(score_min=0.5).items] == [ids[1]]
    with pytest.raises(FlenUserError, match="Unknown sort"):
        store.list(sort="score; DROP TABLE candidates")


def test_each_candidate_keeps_its_own_source_and_all_sources_as_references(store):
    sources = [_img((k * 40, 0, 0), (8, 8)) for k in range(1, 4)]
    edits = [{"source_index": s, "label": f"a{j}"} for s in range(3) for j in range(2)]
    ids = store.add_candidates([_img((0, k, 0)) for k in range(6)], edits, run_id="r", sources=sources)
    names = [store.get(i)["sources"] for i in ids]
    assert all(len(n) == 1 for n in names) and names[0] == names[1] != names[2] == names[3] != names[4]
    for i, meta in zip(ids, edits, strict=True):
        with Image.open(store.file_path(i, "source", 0)) as im:
            assert im.getpixel((0, 0)) == ((meta["source_index"] + 1) * 40, 0, 0)
        assert len(store.get(i)["refs"]) == 3
    # a synthetic (text-to-image) candidate has no source of its own; several sources without an index are
    # references only, never the controls of an edit pair
    (synth,) = store.add_candidates([_img((1, 1, 1))], [{"kind": "synthetic", "prompt": "p"}], run_id="s",
                                    sources=sources)
    two = store.add_candidates([_img((2, 2, 2)), _img((3, 3, 3))], [{}, {}], run_id="s", sources=sources)
    assert store.get(synth)["sources"] == [] and len(store.get(synth)["refs"]) == 3
    assert [store.get(i)["sources"] for i in two] == [[], []]
    with Image.open(store.file_path(synth, "ref", 2)) as im:
        assert im.getpixel((0, 0)) == (120, 0, 0)


def test_a_correction_built_in_steps_keeps_instruction_reasons_and_fixed_image(store):
    a, b = store.add_candidates([_img((1, 1, 1)), _img((2, 2, 2))], [{"instruction": "turn left"}] * 2, run_id="r")
    store.correct(a, instruction="turn left 90 degrees")
    store.decide(a, "correct", reasons=["wrong_angle"], instruction="turn left 90 degrees")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (7, 8, 9)).save(buf, "PNG")
    item = store.correct(a, fixed_image=buf.getvalue(), who="ann")  # the panel's second step: the fixed image
    corr = item["correction"]
    assert (corr["instruction"], corr["reasons"], corr["has_fixed_image"]) == (
        "turn left 90 degrees", ["wrong_angle"], True)
    (listed,) = [i for i in store.list().items if i["id"] == a]
    assert listed["correction"] == corr and store.get(b)["correction"] is None
    (c,) = store.corrections()
    assert c["corrected_instruction"] == "turn left 90 degrees" and c["fixed_image"].startswith("corrections/")
    store.undo(a)  # one step back: the fixed image goes, the instruction stays
    assert store.get(a)["correction"]["has_fixed_image"] is False


def test_the_store_writes_through_wal_with_a_full_sync(tmp_path, monkeypatch):
    """A decision is acknowledged only after SQLite has synced it: WAL journal with synchronous=FULL (a missing
    fsync is invisible to a SIGKILL test, which does not lose the OS's page cache). Python's SQLite already
    defaults to FULL, and some builds default WAL to NORMAL (no fsync per commit): every connection here starts
    at OFF, so only the store's own pragmas can make the check pass."""
    real_connect = sqlite3.connect
    opened = []

    def connect_unsynced(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA foreign_keys=OFF")
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect_unsynced)
    store = rs.ReviewStore(tmp_path, "durable")
    assert opened, "the store opened its database without sqlite3.connect"
    (cid,) = store.add_candidates([_img((1, 2, 3))], run_id="r")
    store.approve(cid)
    for conn in opened:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the WAL is synced at every commit
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    store.close()


# ---- captions edited with the decision (schema v4) -------------------------------------------------

VLM_META = {"description": "standing by a window, soft light", "caption": "ohwx_char person, standing by a window, "
            "soft light", "caption_provenance": {"captioner": "Qwen2.5-VL"}}


def test_a_caption_edited_with_the_decision_is_durable_and_undone_with_it(tmp_path):
    store = rs.ReviewStore(tmp_path, "cap")
    a, b = store.add_candidates([_img((1, 1, 1)), _img((2, 2, 2))], [VLM_META, {}], run_id="r")
    assert store.get(a)["caption"] == VLM_META["caption"] and store.get(a)["caption_edited"] is False
    assert store.get(b)["caption"] == ""
    item = store.approve(a, who="ann", caption="  ohwx_char person, sitting, smiling\nwarm light  ")
    assert item["caption"] == "ohwx_char person, sitting, smiling\nwarm light" and item["caption_edited"] is True
    assert item["status"] == "approved"
    store.decide(b, "reject", reasons=["artefacts"])  # a decision without a caption leaves it alone
    store.close()
    reopened = rs.ReviewStore(tmp_path, "cap")
    got = reopened.get(a)
    assert got["caption"] == "ohwx_char person, sitting, smiling\nwarm light" and got["caption_edited"] is True
    (hist,) = reopened.history(a)
    assert (hist["caption"], hist["caption_before"]) == (got["caption"], VLM_META["caption"])
    assert reopened.history(b)[0]["caption"] is None and reopened.get(b)["caption_edited"] is False
    # a second edit, then undo step by step: each restores the caption before it
    reopened.decide(a, "correct", instruction="turn left", caption="second")
    assert reopened.get(a)["caption"] == "second"
    assert reopened.undo(a)["caption"] == "ohwx_char person, sitting, smiling\nwarm light"
    back = reopened.undo(a)
    assert (back["caption"], back["caption_edited"], back["status"]) == (VLM_META["caption"], False, "pending")
    assert reopened.approved() == []
    # confirming the caption unchanged is no edit
    assert reopened.approve(a, caption=VLM_META["caption"])["caption_edited"] is False
    reopened.close()


@pytest.mark.parametrize("caption,message", [
    (5, "caption must be text"), ({"path": "/etc/passwd"}, "caption must be text"),
    ("x" * (rs.MAX_CAPTION + 1), "keep it under"), ("bell\x07", "control character"),
    ("nul\x00", "control character"), ("esc\x1b[2J", "control character")])
def test_bad_captions_are_refused_and_change_nothing(store, caption, message):
    (cid,) = store.add_candidates([_img((1, 2, 3))], [VLM_META], run_id="r")
    with pytest.raises(ValueError, match=message):
        store.approve(cid, caption=caption)
    item = store.get(cid)
    assert (item["status"], item["caption"], store.history(cid)) == ("pending", VLM_META["caption"], [])
    with pytest.raises(FlenUserError, match="undo takes no caption"):
        store.decide(cid, "undo", caption="x")


def test_migrates_a_version_3_database_and_its_rows_take_captions(tmp_path):
    ws = tmp_path / "flenwheel" / "v3"
    ws.mkdir(parents=True)
    conn = sqlite3.connect(ws / rs.DB_NAME, isolation_level=None)
    assert rs.migrate(conn, target=3) == 3
    meta = '{"description": "a walk in the park", "caption": "tok, a walk in the park"}'
    for cid, m in ((1, meta), (2, "{}")):
        conn.execute("INSERT INTO candidates (character, run_id, image, thumb, width, height, created_at, status, "
                     "meta, refs) VALUES ('v3', 'r0', 'candidates/x.png', 'candidates/x.thumb.jpg', 8, 8, 1.0, "
                     "'approved', ?, '[]')", (m,))
        conn.execute("INSERT INTO decisions (candidate_id, action, prev_status, new_status, at) "
                     "VALUES (?, 'approve', 'pending', 'approved', 1.0)", (cid,))
    conn.close()
    store = rs.ReviewStore(tmp_path, "v3")
    assert store._conn.execute("PRAGMA user_version").fetchone()[0] == 4
    assert store.get(1)["caption"] == "tok, a walk in the park"  # backfilled from the captioner's meta
    assert store.get(2)["caption"] == "" and store.get(2)["caption_edited"] is False
    assert store.history(1)[0]["caption"] is None  # an old decision touched no caption
    assert store.undo(1)["caption"] == "tok, a walk in the park"  # undoing it leaves the caption be
    assert store.approve(2, caption="tok, new")["caption_edited"] is True
    assert store.undo(2)["caption"] == ""
    store.close()
