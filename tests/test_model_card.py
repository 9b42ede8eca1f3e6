"""engines.model_card and engines.prompt_templates on the tiny FLUX and the tiny face pack (no ComfyUI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engines import face_backends as fb
from engines import flux_pipeline
from engines import identity as idn
from engines import model_card as mc
from engines import prompt_templates as pt
from engines.errors import FlenUserError
from engines.image_arrays import batch_to_uint8
from engines.lora_stack import LoraEntry, LoraStack
from engines.model_host import LocalHost
from engines.png_files import png_bytes
from tools import tiny_models as tm

CPU = ["CPUExecutionProvider"]
SETTINGS = mc.CardSettings(width=64, height=64, steps=1, guidance=3.5, instance_token="ohwx_char", cell_px=64)
PLANT = "smiling / front"
ROWS = ["neutral", "smiling", "angry", "sad", "T-pose", "standing", "sitting"]
COLS = ["front", "three-quarter", "profile"]


@pytest.fixture(scope="module")
def flux(tiny_models):
    handle = flux_pipeline.load_flux(tiny_models / "diffusers" / tm.FLUX_DIRNAME, tm.FLUX_DIRNAME, "fp32",
                                     torch.device("cpu"))
    handle.pipe.set_progress_bar_config(disable=True)
    return handle


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    """Two versions of a character LoRA, laid out as the trainer writes them."""
    folder = tmp_path_factory.mktemp("loras") / "flenwheel" / "alice"
    folder.mkdir(parents=True)
    out = {}
    for v, src in ((1, "flux_lora_a.safetensors"), (2, "flux_lora_b.safetensors")):
        path = folder / f"char_lora_v{v}.safetensors"
        shutil.copy(tiny_models / "loras" / tm.LORA_DIRNAME / src, path)
        out[v] = LoraStack().extended(LoraEntry(f"flenwheel/alice/char_lora_v{v}.safetensors", str(path), 1.0))
    return out


@pytest.fixture(scope="module")
def face(tiny_models):
    model = fb.load_face_model(tiny_models / "insightface", tm.INSIGHTFACE_PACK, 640, CPU)
    reference = np.asarray(tm.draw_test_face(1))
    bank = idn.build_bank(model, [reference], tiny_models / "insightface")
    return model, bank, reference


def _card(flux, stack, face, plant: np.ndarray | None = None, cells=None):
    model, bank, _ref = face
    cells = cells or mc.parse_prompt_set(mc.DEFAULT_PROMPT_SET)
    images, metas = mc.render_cells(flux, cells, SETTINGS, stack, LocalHost())
    rgb = batch_to_uint8(images)
    if plant is not None:
        rgb[[c.key for c in cells].index(PLANT)] = plant
    rows = mc.score_cells(bank, model, rgb, SETTINGS.threshold)
    card = mc.assemble_card(cells, rgb, rows, SETTINGS, mc.lora_record(stack),
                            {"model": flux.name, "precision": flux.precision}, bank)
    return card, metas


@pytest.fixture(scope="module")
def planted(flux, loras, face):
    return _card(flux, loras[1], face, plant=face[2])


def _png(img: Image.Image) -> bytes:
    return png_bytes(img)


# ---- the benchmark set ---------------------------------------------------------------------------------------

def test_default_prompt_set_is_the_18_cell_benchmark_with_fixed_distinct_seeds():
    cells = mc.parse_prompt_set(mc.DEFAULT_PROMPT_SET)
    assert len(cells) == 18
    rows, cols = mc.layout_axes(cells)
    assert rows == ROWS and cols == COLS
    portraits = {(c.row, c.column) for c in cells if c.row in mc.EXPRESSIONS}
    assert portraits == {(e, a) for e in mc.EXPRESSIONS for a in mc.ANGLES}
    body = {(c.row, c.column) for c in cells if c.row in mc.BODY_POSES}
    assert body == {(p, a) for p in mc.BODY_POSES for a in mc.BODY_ANGLES}
    assert len({c.seed for c in cells}) == 18
    assert all("{token}" in c.prompt for c in cells)
    assert mc.parse_prompt_set(mc.DEFAULT_PROMPT_SET) == cells


@pytest.mark.parametrize("text, message", [
    ("neutral | front | 1 ", "should read 'row | column | seed | prompt'"),
    ("neutral | front | x1 | a photo", "seed 'x1' is not a whole number"),
    ("a | b | 1 | p\na | b | 2 | q", "the cell 'a / b' appears twice"),
    ("# only a note\n\n", "The prompt set is empty"),
])
def test_bad_prompt_sets_are_explained(text, message):
    with pytest.raises(FlenUserError, match=message.replace("|", r"\|").replace("(", r"\(")):
        mc.parse_prompt_set(text)


# ---- the card ------------------------------------------------------------------------------------------------

def test_same_lora_seeds_and_prompts_give_the_same_card_image_and_report(flux, loras, face, planted):
    again, metas = _card(flux, loras[1], face, plant=face[2])
    card = planted[0]
    assert again.report == card.report
    assert mc.report_json(again.report) == mc.report_json(card.report)
    assert _png(again.grid) == _png(card.grid)
    assert [m["seed"] for m in metas] == [c["seed"] for c in card.report["cells"]]
    assert metas[0]["loras"] == loras[1].describe() and "ohwx_char" in metas[0]["prompt"]
    # another LoRA version renders different images from the same seeds
    first_two = mc.parse_prompt_set(mc.DEFAULT_PROMPT_SET)[:2]
    other, _ = _card(flux, loras[2], face, cells=first_two)
    assert [c["seed"] for c in other.report["cells"]] == [c["seed"] for c in card.report["cells"][:2]]
    assert not np.array_equal(other.images[0], card.images[0])
    assert other.report["lora"]["sha256"] != card.report["lora"]["sha256"]


def test_grid_has_the_18_labelled_cells_and_marks_failures(planted):
    card, _ = planted
    report = card.report
    assert report["layout"]["rows"] == ROWS and report["layout"]["columns"] == COLS
    assert [c["key"] for c in report["cells"]] == [f"{r} / {c}" for r in ROWS for c in COLS
                                                   if not (r in mc.BODY_POSES and c == "profile")]
    assert card.grid.size == tuple(report["layout"]["size"])
    boxes = [tuple(c["box"]) for c in report["cells"]]
    assert len(set(boxes)) == 18
    grid = np.asarray(card.grid)
    for cell, img in zip(report["cells"], card.images, strict=True):
        x0, y0, x1, y1 = cell["box"]
        assert 0 <= x0 < x1 <= card.grid.width and 0 <= y0 < y1 <= card.grid.height
        assert x1 - x0 == SETTINGS.cell_px
        inner = grid[y0 + 3:y1 - 3, x0 + 3:x1 - 12].astype(int)   # the image (the corner cross left out)
        expect = np.asarray(Image.fromarray(img).resize((SETTINGS.cell_px,) * 2, Image.LANCZOS))
        assert np.abs(inner - expect[3:-3, 3:-12].astype(int)).mean() < 2
        border = grid[y0 - 2, x0 + 5]
        if cell["key"] == PLANT:
            assert cell["passed"] and tuple(border) != mc.BAD
        else:   # the tiny FLUX draws no face: every other cell is marked failed with a red frame
            assert not cell["face_found"] and cell["reason"] == "no face"
            assert tuple(border) == mc.BAD
            assert mc.cell_status(cell) == ("NO FACE", mc.BAD)
    # the row labels sit left of the first column, the column labels above the first row (text pixels there)
    first = report["cells"][0]["box"]
    assert (np.asarray(card.grid.crop((0, first[1], first[0] - 8, first[3]))) != mc.BG).any()
    assert (np.asarray(card.grid.crop((first[0], first[1] - 20, first[2], first[1] - 2))) != mc.BG).any()


def test_scores_come_from_the_identity_engine_a_planted_reference_scores_about_one(planted, face):
    card, metas = planted
    cell = next(c for c in card.report["cells"] if c["key"] == PLANT)
    assert cell["face_found"] and cell["faces"] == 1 and cell["passed"]
    assert cell["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert cell["pose"] is not None and abs(cell["pose"]["yaw"]) < 20
    model, bank, ref = face
    direct = idn.score_images(bank, model, [ref])[0]
    assert cell["similarity"] == pytest.approx(direct.score_mean, abs=1e-6)
    # another identity planted scores clearly lower, through the same engine
    other = mc.score_cells(bank, model, [np.asarray(tm.draw_test_face(2))])[0]
    assert other.faces == 1 and other.score_mean < 0.9


def test_report_aggregates_equal_those_recomputed_from_its_cells(planted):
    report = json.loads(mc.report_json(planted[0].report))   # as saved
    cells = report["cells"]
    sims = [c["similarity"] for c in cells if c["similarity"] is not None]
    agg = report["aggregates"]
    assert agg["cells"] == 18 and agg["faces_found"] == 1 and agg["passed"] == 1
    assert agg["mean_similarity"] == pytest.approx(sum(sims) / len(sims), abs=1e-6)
    assert agg["min_similarity"] == pytest.approx(min(sims), abs=1e-6)
    assert agg["face_rate"] == pytest.approx(sum(c["face_found"] for c in cells) / 18, abs=1e-6)
    assert agg["pass_rate"] == pytest.approx(sum(c["passed"] for c in cells) / 18, abs=1e-6)
    for by, key in (("per_row", "row"), ("per_column", "column")):
        groups = report[by]
        assert list(groups) == (ROWS if key == "row" else COLS)
        for name, g in groups.items():
            members = [c for c in cells if c[key] == name]
            s = [c["similarity"] for c in members if c["similarity"] is not None]
            assert g["cells"] == len(members)
            assert g["face_rate"] == pytest.approx(sum(c["face_found"] for c in members) / len(members), abs=1e-6)
            assert g["mean_similarity"] == (pytest.approx(sum(s) / len(s), abs=1e-6) if s else None)
    assert report["per_row"]["smiling"]["faces_found"] == 1 and report["per_column"]["front"]["faces_found"] == 1
    # recorded so cards stay comparable: the LoRA, its provenance, seeds, prompt set and settings
    assert report["lora"]["name"] == "flenwheel/alice/char_lora_v1.safetensors"
    assert report["lora"]["provenance"]["flen_tiny_base"] == "flux"
    assert report["seeds"]["neutral / front"] == 1001
    assert mc.parse_prompt_set(report["prompt_set"]) == mc.parse_prompt_set(mc.DEFAULT_PROMPT_SET)
    assert report["generation"]["steps"] == 1 and report["generation"]["model"] == tm.FLUX_DIRNAME
    assert report["identity"]["pack"] == tm.INSIGHTFACE_PACK
    assert "ohwx_char" in cells[0]["prompt"] and "{token}" in cells[0]["template"]


def test_card_is_saved_beside_the_lora_and_never_overwritten(planted, loras):
    card = planted[0]
    lora_path = loras[1].entries[0].path
    mc.save_card(card, lora_path)
    first_json, first_png = card.json_path, card.png_path
    assert first_json.endswith("flenwheel/alice/char_lora_v1.card.json")
    assert first_png.endswith("flenwheel/alice/char_lora_v1.card.png")
    before = open(first_json, "rb").read(), open(first_png, "rb").read()
    mc.save_card(card, lora_path)
    assert card.json_path.endswith("char_lora_v1.card-2.json") and card.png_path.endswith("char_lora_v1.card-2.png")
    assert (open(first_json, "rb").read(), open(first_png, "rb").read()) == before
    assert open(card.json_path, "rb").read() == before[0] and open(card.png_path, "rb").read() == before[1]
    loaded = mc.load_card(first_json)
    assert loaded.report == card.report
    assert [i.shape for i in loaded.images] == [(64, 64, 3)] * 18
    # the grid read back from the PNG is exactly the rendered one
    assert np.array_equal(np.asarray(loaded.grid), np.asarray(card.grid))
    with Image.open(first_png) as im:
        assert json.loads(im.info[mc.PNG_KEY]) == card.report
    card_dir = Path(first_json).parent
    assert card_dir.name == "alice" and not [p for p in card_dir.iterdir() if p.name.endswith(".tmp")]


def test_card_needs_a_lora_and_a_token_when_the_prompts_ask_for_one(loras):
    with pytest.raises(FlenUserError, match="needs the character LoRA"):
        mc.lora_record(LoraStack())
    off = LoraStack().extended(LoraEntry("x.safetensors", "/nonexistent", 1.0, enabled=False))
    with pytest.raises(FlenUserError, match="needs the character LoRA"):
        mc.lora_record(off)
    with pytest.raises(FlenUserError, match="no instance token is set"):
        pt.substitute_token("a photo of {token}", " ")


# ---- comparing versions ------------------------------------------------------------------------------------

def test_comparing_a_card_with_itself_shows_zero_deltas(planted):
    card = planted[0]
    comparison = mc.compare_cards([card, card])
    r = comparison.report
    assert r["versions"] == ["char_lora_v1", "char_lora_v1 #2"]
    assert len(r["compared_cells"]) == 18 and r["mismatched_cells"] == [] and r["settings_differ"] == []
    for m in mc.METRICS:
        assert all(d == 0 for d in r["deltas"][m].values()), m
    for c in r["cells"]:
        assert all(d in (0, None) for d in c["delta"].values())
        assert c["best"] == ("tie" if c["key"] == PLANT else None)
    assert r["wins"] == {"char_lora_v1": [], "char_lora_v1 #2": []}
    assert "better on 0 cell(s), worse on 0, equal on 18" in r["summary"][0]
    assert comparison.grid.size[0] > card.grid.size[0] and comparison.chart.size[1] > 100


def test_comparison_tells_which_version_is_better_on_which_cell(planted, face, tmp_path):
    v1 = planted[0]
    model, bank, _ref = face
    # version 2: the same cells, a different identity planted into the cell → a lower score there
    images = [img.copy() for img in v1.images]
    k = [c["key"] for c in v1.report["cells"]].index(PLANT)
    images[k] = np.asarray(tm.draw_test_face(2))
    cells = mc.parse_prompt_set(v1.report["prompt_set"])
    rows = mc.score_cells(bank, model, images, SETTINGS.threshold)
    lora2 = {**v1.report["lora"], "name": "flenwheel/alice/char_lora_v2.safetensors"}
    v2 = mc.assemble_card(cells, images, rows, SETTINGS, lora2, {"model": tm.FLUX_DIRNAME, "precision": "fp32"}, bank)
    comparison = mc.compare_cards([v1, v2])
    r = comparison.report
    cell = next(c for c in r["cells"] if c["key"] == PLANT)
    assert cell["best"] == "char_lora_v1" and cell["delta"]["char_lora_v2"] < -0.1
    assert r["wins"]["char_lora_v1"] == [PLANT] and r["wins"]["char_lora_v2"] == []
    assert r["deltas"]["mean_similarity"]["char_lora_v2"] == pytest.approx(
        v2.report["aggregates"]["mean_similarity"] - v1.report["aggregates"]["mean_similarity"], abs=1e-6)
    assert "worse on 1" in r["summary"][0]
    table = comparison.table()
    assert "char_lora_v2" in table and "mean_similarity" in table
    # one line per card row: the planted cell's row shows v2's drop in that row's mean, as the report has it
    row = cell["row"]
    line = next(ln for ln in table.splitlines() if ln.startswith(f"{row:<16}"))
    assert f"({mc.fmt(r['per_row'][row]['delta']['char_lora_v2'], True)})" in line and r["per_row"][row][
        "delta"]["char_lora_v2"] < 0
    assert sum(1 for ln in table.splitlines() if ln.split(" ")[0] in {"neutral", "smiling", "angry", "sad",
                                                                      "T-pose", "standing", "sitting"}) == 7
    mc.save_comparison(comparison, tmp_path, "v1_vs_v2")
    mc.save_comparison(comparison, tmp_path, "v1_vs_v2")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["v1_vs_v2-2.chart.png", "v1_vs_v2-2.compare.json", "v1_vs_v2-2.compare.png",
                     "v1_vs_v2.chart.png", "v1_vs_v2.compare.json", "v1_vs_v2.compare.png"]
    assert json.loads((tmp_path / "v1_vs_v2.compare.json").read_text())["wins"]["char_lora_v1"] == [PLANT]


def test_cards_from_different_prompt_sets_compare_only_matching_cells(planted):
    v1 = planted[0]
    changed = json.loads(json.dumps(v1.report))
    changed["cells"][0]["seed"] = 7
    other = mc.ModelCard(report=changed, grid=v1.grid, images=v1.images)
    r = mc.compare_cards([v1, other]).report
    assert r["mismatched_cells"] == ["neutral / front"] and len(r["compared_cells"]) == 17
    assert any("Not compared" in line for line in r["summary"])
    with pytest.raises(FlenUserError, match="at least two model cards"):
        mc.compare_cards([v1])
    nothing = json.loads(json.dumps(v1.report))
    for c in nothing["cells"]:
        c["seed"] += 1
    with pytest.raises(FlenUserError, match="share no comparable cell"):
        mc.compare_cards([v1, mc.ModelCard(report=nothing, grid=v1.grid, images=v1.images)])


# ---- prompt templates --------------------------------------------------------------------------------------

def test_templates_give_exactly_n_varied_reproducible_prompts():
    prompts = pt.expand_templates([pt.DEFAULT_TEMPLATE], 200, seed=5)
    assert len(prompts) == 200 and len(set(prompts)) == 200
    assert prompts == pt.expand_templates([pt.DEFAULT_TEMPLATE], 200, seed=5)
    assert prompts != pt.expand_templates([pt.DEFAULT_TEMPLATE], 200, seed=6)
    assert all("{token}" in p and "{expression}" not in p for p in prompts)
    for slot, values in pt.SLOTS.items():
        first = prompts[:max(len(v) for v in pt.SLOTS.values())]
        assert {v for v in values if any(f", {v}," in p + "," for p in first)} == set(values), slot
    final = [pt.substitute_token(p, "ohwx_char") for p in prompts]
    assert all(p.startswith("a photo of ohwx_char, ") for p in final)
    two = pt.expand_templates(["{token} {expression}", "{token} at {setting}"], 5, seed=0,
                              values=pt.parse_slot_values("expression: happy, calm\nsetting: home"))
    assert len(two) == 5 and two.count("{token} at home") == 2
    assert set(two[:2]) == {"{token} happy", "{token} calm"} and two[2] in two[:2]


@pytest.mark.parametrize("call, message", [
    (lambda: pt.expand_templates(["{token}, {mood}"], 3), r"uses \{mood\}, which has no values"),
    (lambda: pt.expand_templates([" "], 3), "No prompt template given"),
    (lambda: pt.expand_templates(["x"], 0), "between 1 and"),
    (lambda: pt.parse_slot_values("expression smiling"), "should read 'slot: value"),
    (lambda: pt.parse_slot_values("pose:  , "), "has no values"),
])
def test_bad_templates_are_explained(call, message):
    with pytest.raises(FlenUserError, match=message):
        call()


@pytest.fixture
def drawn_text(monkeypatch):
    """Every string the model card draws (a spy on PIL's ImageDraw.text, which still draws)."""
    from PIL import ImageDraw

    seen: list[str] = []
    real = ImageDraw.ImageDraw.text

    def spy(self, xy, text, *args, **kwargs):
        seen.append(str(text))
        return real(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    return seen


@pytest.mark.parametrize("cell_px", [40, 64])
def test_labels_and_captions_are_wrapped_never_cut_at_small_cell_sizes(planted, drawn_text, cell_px):
    card = planted[0]
    report = json.loads(json.dumps(card.report))
    report["layout"]["cell_px"] = cell_px
    grid = mc.render_grid(report, card.images)
    comparison = mc.compare_cards([card, card], cell_px=cell_px)
    assert not [t for t in drawn_text if "…" in t], [t for t in drawn_text if "…" in t]
    flat = "".join(drawn_text).replace(" ", "")
    for label in ROWS + COLS + ["NOFACE", "notintheset"]:
        assert label.replace(" ", "") in flat, label
    # the wrapped labels sit above the first row and left of the first column, inside the image
    assert grid.size[1] > len(ROWS) * cell_px and comparison.grid.size[0] >= grid.size[0]
    for line in drawn_text:
        assert mc.font(13).getlength(line) <= max(grid.size[0], comparison.grid.size[0])


def test_comparison_chart_has_values_on_its_axes(planted, drawn_text):
    card = planted[0]
    comparison = mc.compare_cards([card, card])
    for tick in ("0.00", "0.25", "0.50", "0.75", "1.00", "+0.050", "-0.050", "0"):
        assert tick in drawn_text, (tick, drawn_text)
    assert comparison.chart.size[0] >= 760


def test_per_row_and_per_column_deltas_have_both_signs_and_equal_the_cells_means(planted, face):
    """Two cards that swap a good and a bad face between two cells: one row and one column get better, another
    row and column worse, and each group's delta is the difference of the cells' own mean similarities."""
    base = planted[0]
    model, bank, reference = face
    other = np.asarray(tm.draw_test_face(2))
    keys = [c["key"] for c in base.report["cells"]]
    better_cell = "angry / three-quarter"
    cells = mc.parse_prompt_set(base.report["prompt_set"])

    def card(at_plant: np.ndarray, at_better: np.ndarray, name: str) -> mc.ModelCard:
        images = [img.copy() for img in base.images]
        images[keys.index(PLANT)], images[keys.index(better_cell)] = at_plant, at_better
        rows = mc.score_cells(bank, model, images, SETTINGS.threshold)
        lora = {**base.report["lora"], "name": f"flenwheel/alice/{name}.safetensors"}
        return mc.assemble_card(cells, images, rows, SETTINGS, lora, {"model": tm.FLUX_DIRNAME, "precision": "fp32"},
                                bank)

    v1 = card(reference, other, "char_lora_v1")
    v2 = card(other, reference, "char_lora_v2")
    r = mc.compare_cards([v1, v2]).report
    per_row, per_col = r["per_row"], r["per_column"]
    assert per_row["smiling"]["delta"]["char_lora_v2"] < -0.05
    assert per_row["angry"]["delta"]["char_lora_v2"] > 0.05
    assert per_col["front"]["delta"]["char_lora_v2"] < -0.05
    assert per_col["three-quarter"]["delta"]["char_lora_v2"] > 0.05
    for by, groups in (("row", per_row), ("column", per_col)):
        for name, group in groups.items():
            for v, card_ in (("char_lora_v1", v1), ("char_lora_v2", v2)):
                sims = [c["similarity"] for c in card_.report["cells"]
                        if c[by] == name and c["similarity"] is not None]
                expected = sum(sims) / len(sims) if sims else None
                got = group["mean_similarity"][v]
                assert (got is None) == (expected is None) and (got is None or got == pytest.approx(expected, abs=1e-4))
            d = group["delta"]["char_lora_v2"]
            m = group["mean_similarity"]
            if m["char_lora_v1"] is not None and m["char_lora_v2"] is not None:
                assert d == pytest.approx(m["char_lora_v2"] - m["char_lora_v1"], abs=1e-4)


def test_the_comparison_grid_shows_each_versions_own_image_of_each_cell_in_its_place(planted):
    """Every (cell, version) gets an image of one colour of its own; each colour must appear as a whole cell
    image, in its row and column, the versions side by side in order."""
    base = planted[0]
    px = base.report["layout"]["cell_px"]
    cells = base.report["cells"]
    colours = {(j, k): (20 + 11 * j, 40 + 100 * k, 200 - 5 * j) for j in range(len(cells)) for k in range(2)}
    cards = []
    for k in range(2):
        report = json.loads(json.dumps(base.report))
        report["lora"]["name"] = f"flenwheel/alice/char_lora_v{k + 1}.safetensors"
        images = [np.full((px, px, 3), colours[(j, k)], np.uint8) for j in range(len(cells))]
        cards.append(mc.ModelCard(report=report, grid=base.grid, images=images))
    grid = np.asarray(mc.compare_cards(cards).grid.convert("RGB")).astype(int)
    centre = {}
    for (j, k), colour in colours.items():
        ys, xs = np.nonzero((grid == colour).all(axis=2))
        assert len(ys) >= px * px * 0.8, (cells[j]["key"], k, len(ys))  # the whole image, not a stray pixel
        assert ys.max() - ys.min() < px and xs.max() - xs.min() < px  # in one place
        centre[(j, k)] = (ys.mean(), xs.mean())
    rows = list(dict.fromkeys(c["row"] for c in cells))
    cols = list(dict.fromkeys(c["column"] for c in cells))
    for j, cell in enumerate(cells):
        (ya, xa), (yb, xb) = centre[(j, 0)], centre[(j, 1)]
        assert abs(ya - yb) < 1 and px <= xb - xa < 2 * px, cell["key"]  # version B right beside version A
        for i, other in enumerate(cells):
            (yo, xo) = centre[(i, 0)]
            if rows.index(other["row"]) > rows.index(cell["row"]):
                assert yo > ya + px / 2, (cell["key"], other["key"])  # later rows lower
            if other["row"] == cell["row"]:
                assert abs(yo - ya) < 1
                if cols.index(other["column"]) > cols.index(cell["column"]):
                    assert xo > xb + px / 2, (cell["key"], other["key"])  # later columns right of both versions
