"""The tiny world's face pack: its recogniser separates the drawn identities on held-out drawings, and the identity
filter passes and rejects for the right reasons."""

from __future__ import annotations

import numpy as np
import pytest

from engines import identity
from tools import tiny_world as world


@pytest.fixture(scope="module")
def face_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "insightface"
    world.write_face_pack(root / "models" / world.FACE_PACK)
    return root


def test_recogniser_separates_identities_on_held_out_drawings(face_root):
    m = world.measure_recognizer(face_root)
    # measured when written: same 0.96 (min 0.79), different -0.04 (max 0.41), accuracy 0.9997, 5 of 144 no face
    assert m["no_face"] <= 0.05 * m["held_out"], m
    assert m["same_mean"] > 0.85 and m["different_mean"] < 0.05, m
    assert m["same_pass_rate"] >= 0.98 and m["different_pass_rate"] <= 0.005, m
    assert m["filter_accuracy"] >= 0.99, m


def test_filter_passes_the_character_and_rejects_others_and_no_faces(face_root):
    model = identity.load_insightface_model(face_root, world.FACE_PACK, det_size=160,
                                            providers=["CPUExecutionProvider"])
    me = world.CHARACTER_IDENTITY
    refs = [world.draw_world_face(me, offset=o) for o in ((0, 0), (-3, 2), (3, -2))]
    bank = identity.build_bank(model, [np.asarray(r) for r in refs], face_root)
    held_out = [v for v in world.variations(12, 4242)]
    mine = [np.asarray(v.draw(me)) for v in held_out[:6]]
    others = [np.asarray(v.draw((me + 1 + k) % world.IDENTITIES)) for k, v in enumerate(held_out[6:])]
    grey = [np.full((64, 64, 3), 128, np.uint8)]
    rows = identity.score_images(bank, model, mine + others + grey)
    found_mine = [r for r in rows[:6] if r.faces]
    assert len(found_mine) >= 5 and all(r.passed for r in found_mine), [r.as_dict() for r in rows[:6]]
    assert all(not r.passed and r.reason in (identity.REASON_BELOW, identity.REASON_NO_FACE) for r in rows[6:12])
    assert sum(r.reason == identity.REASON_BELOW for r in rows[6:12]) >= 5
    assert rows[12].reason == identity.REASON_NO_FACE
