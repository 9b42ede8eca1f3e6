"""FLENModelCard and FLENCompareVersions: the fixed benchmark of a character LoRA version and the comparison
of versions (engines.model_card does the work)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from comfy_api.v0_0_2 import io

from ..engines import face_backends, identity, workspace
from ..engines import model_card as engine
from ..engines.errors import FlenUserError
from ..engines.image_arrays import batch_to_uint8, pil_to_tensor
from ..engines.lora_stack import LoraStack
from . import comfy_bridge as bridge
from .flen_types import CATEGORY, FluxPipeType, IdentityType, LoraStackType, MetaType, ModelCardType


class FLENModelCard(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENModelCard",
            display_name="FLEN Model Card",
            category=f"{CATEGORY}/synthesis",
            is_output_node=True,
            description="Renders the fixed benchmark set for a character LoRA version (portraits neutral / smiling / "
                        "angry / sad × front / three-quarter / profile; full body T-pose / standing / sitting × front "
                        "/ three-quarter), scores every image against the identity bank, and writes a labelled grid "
                        "(<lora>.card.png) and a JSON report (<lora>.card.json) beside the LoRA, never overwriting.",
            inputs=[
                FluxPipeType.Input("flux_pipe",
                                   tooltip="From FLEN FLUX Loader or FLEN FLUX from ComfyUI models (the base model "
                                           "the LoRA was trained on)."),
                LoraStackType.Input("lora_stack",
                                    tooltip="The first enabled LoRA of this stack is the version the card is for "
                                            "(e.g. flenwheel/<character>/char_lora_v2.safetensors); the card is "
                                            "saved beside it. Further LoRAs are applied too and recorded. With "
                                            "every LoRA switched off the card is the base model's baseline "
                                            "(not saved; compare it as card_a)."),
                IdentityType.Input("identity", tooltip="The identity bank from FLEN Identity Reference (the pristine "
                                                       "photos of the character)."),
                io.String.Input("instance_token", default="ohwx_char",
                                tooltip="The LoRA's trigger word; replaces {token} in the prompt set."),
                io.String.Input("prompt_set", multiline=True, default=engine.DEFAULT_PROMPT_SET,
                                tooltip="One cell per line: 'row | column | seed | prompt'. Rows are expressions "
                                        "or body poses, columns are angles. Keep it the same across versions so "
                                        "their cards stay comparable; it is recorded in the report."),
                io.Int.Input("width", default=1024, min=64, max=4096, step=16, tooltip="Image width (multiple of 16)."),
                io.Int.Input("height", default=1024, min=64, max=4096, step=16,
                             tooltip="Image height (multiple of 16)."),
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="Denoising steps per image."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=30.0, step=0.1,
                               tooltip="FLUX distilled guidance (3–4 for FLUX.1-dev)."),
                io.Float.Input("threshold", default=identity.DEFAULT_THRESHOLD, min=-1.0, max=1.0, step=0.01,
                               tooltip="Identity similarity a cell needs to count as passed (cosine to the bank "
                                       "mean; 0.40 suits insightface's ArcFace packs)."),
                io.Int.Input("cell_size", default=256, min=64, max=1024, step=16,
                             tooltip="Size in pixels of each cell in the grid image."),
                io.Boolean.Input("save_beside_lora", default=True,
                                 tooltip="Write <lora>.card.json and <lora>.card.png beside the LoRA file (a new "
                                         "name such as .card-2 when a card already exists; nothing is overwritten)."),
            ],
            outputs=[
                ModelCardType.Output(display_name="card", tooltip="The model card, for FLEN Compare Versions."),
                io.Image.Output(display_name="grid", tooltip="The labelled grid: rows and columns named, the "
                                                             "similarity on each cell, failed cells marked red."),
                io.Image.Output(display_name="images", tooltip="The benchmark images, one per cell."),
                MetaType.Output(display_name="meta", tooltip="One record per image: prompt, seed, cell, LoRAs, "
                                                             "identity scores."),
                io.String.Output(display_name="report", tooltip="The JSON report (also saved beside the LoRA)."),
            ],
        )

    @classmethod
    def execute(cls, flux_pipe, lora_stack: LoraStack, identity: identity.IdentityBank, instance_token: str,
                prompt_set: str, width: int, height: int, steps: int, guidance: float, threshold: float,
                cell_size: int, save_beside_lora: bool) -> io.NodeOutput:
        bank = identity
        if not hasattr(bank, "references"):
            raise FlenUserError("FLEN Model Card: the identity input must come from FLEN Identity Reference.")
        threshold = face_backends.effective_threshold(bank, threshold)   # 0.40 on a dlib bank: dlib's default
        cells = engine.parse_prompt_set(prompt_set)
        settings = engine.CardSettings(width=width, height=height, steps=steps, guidance=guidance,
                                       instance_token=instance_token.strip(), threshold=threshold, cell_px=cell_size)
        base = not lora_stack.active()
        lora = engine.base_record(lora_stack) if base else engine.lora_record(lora_stack)
        for cell in cells:  # fail before rendering anything
            engine.substitute_token(cell.prompt, settings.instance_token)
        progress = bridge.Progress(len(cells) * steps + len(cells), latent_format="flux")
        images, metas = engine.render_cells(flux_pipe, cells, settings, lora_stack, bridge.ComfyModelHost(),
                                            on_step=progress)
        done = len(cells) * steps
        model = face_backends.bank_model(bank)
        rgb = batch_to_uint8(images)
        rows = engine.score_cells(bank, model, rgb, threshold,
                                  on_image=lambda i, n: progress(done + i, done + n))
        card = engine.assemble_card(cells, rgb, rows, settings, lora,
                                    {"model": flux_pipe.name, "precision": flux_pipe.precision}, bank)
        for meta, cell in zip(metas, card.report["cells"], strict=True):
            meta["scores"] = {**dict(meta.get("scores") or {}), "identity": cell["similarity"]}
            meta["identity"] = {k: cell[k] for k in ("similarity", "faces", "passed", "reason", "pose")}
        if save_beside_lora and not base:
            entry = lora_stack.active()[0]
            engine.save_card(card, entry.path)
        report = engine.report_json(card.report)
        agg = card.report["aggregates"]
        text = (f"{lora['name']}: mean similarity {engine.fmt(agg['mean_similarity'])}, min "
                f"{engine.fmt(agg['min_similarity'])}, faces {agg['faces_found']}/{agg['cells']}, passed "
                f"{agg['passed']}/{agg['cells']}"
                + (f"\nsaved {card.json_path}\nsaved {card.png_path}" if card.json_path else "")
                + ("\nthe base model alone (no LoRA of the stack is on): a baseline card, not saved; connect it to "
                   "FLEN Compare Versions as card_a" if base else ""))
        return io.NodeOutput(card, pil_to_tensor(card.grid), images, metas, report, ui={"text": [text]})


_STEM_OK = re.compile(r"[^A-Za-z0-9_.\-]+")


CARD_SUFFIXES = (".card.json", ".card.png")


def _resolve_card(line: str) -> str:
    """A saved card by its name under models/loras; anything else is refused with the same words whether or
    not such a file exists (a prompt must not learn what is on the server's disk)."""
    name = line.strip().replace("\\", "/")
    if (Path(name).is_absolute() or name.startswith("~") or ".." in Path(name).parts
            or not name.endswith(CARD_SUFFIXES)):
        raise FlenUserError(f"card_files: {name[:80]!r} is not a model card name. Name a card saved beside its LoRA, "
                            "relative to models/loras, e.g. flenwheel/<character>/char_lora_v1.card.json; paths "
                            "outside models/loras are refused.")
    try:
        return bridge.lora_path(name)
    except FlenUserError:
        raise FlenUserError(f"Model card '{name}' not found under models/loras. Cards are saved beside their LoRA, "
                            "e.g. flenwheel/<character>/char_lora_v1.card.json.") from None


def _comparison_folder(cards: list[engine.ModelCard]) -> Path:
    character = workspace.character_of_lora(str(cards[0].report.get("lora", {}).get("name", "")))
    if character is not None:
        return workspace.workspace_dir(bridge.output_directory(), character) / "model_cards"
    return workspace.workspace_root(bridge.output_directory()) / "model_cards"


class FLENCompareVersions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FLENCompareVersions",
            display_name="FLEN Compare Versions",
            category=f"{CATEGORY}/synthesis",
            is_output_node=True,
            description="Two or more model cards → one side-by-side grid (each cell, every version; the better "
                        "version framed green), a table and a bar chart of metric deltas against the first card, "
                        "and which version is better on which cells. Saved under output/flenwheel/<character>/"
                        "model_cards.",
            inputs=[
                ModelCardType.Input("card_a", optional=True, tooltip="A card from FLEN Model Card (the baseline "
                                                                     "when it is the first card given)."),
                ModelCardType.Input("card_b", optional=True, tooltip="Another card from FLEN Model Card."),
                ModelCardType.Input("card_c", optional=True, tooltip="A third card (optional)."),
                io.String.Input("card_files", multiline=True, default="", optional=True,
                                tooltip="Saved cards, one per line: a name relative to models/loras (e.g. "
                                        "flenwheel/alice/char_lora_v1.card.json); other paths are refused. They "
                                        "come after the connected cards; the first card of all is the baseline."),
                io.Boolean.Input("save", default=True, optional=True,
                                 tooltip="Write the comparison (.compare.json, .compare.png, .chart.png) under "
                                         "output/flenwheel/<character>/model_cards, never overwriting."),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="Every cell with each version side by side."),
                io.Image.Output(display_name="chart", tooltip="Bars: metrics per version; per-cell similarity deltas."),
                io.String.Output(display_name="table", tooltip="The metric table with deltas and the verdict."),
                io.String.Output(display_name="report",
                                 tooltip="The comparison as JSON (per-cell winners and deltas)."),
            ],
        )

    @classmethod
    def execute(cls, card_a=None, card_b=None, card_c=None, card_files: str = "", save: bool = True) -> io.NodeOutput:
        cards = [c for c in (card_a, card_b, card_c) if c is not None]
        for line in (card_files or "").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                cards.append(engine.load_card(_resolve_card(line)))
        if len(cards) < 2:
            raise FlenUserError(f"FLEN Compare Versions needs at least two model cards (connected or listed in "
                                f"card_files); got {len(cards)}.")
        comparison = engine.compare_cards(cards)
        if save:
            stem = _STEM_OK.sub("_", "_vs_".join(c.label for c in cards))[:120]
            engine.save_comparison(comparison, _comparison_folder(cards), stem)
        table = comparison.table()
        text = table + ("\n" + "\n".join(f"saved {p}" for p in comparison.paths.values()) if comparison.paths else "")
        return io.NodeOutput(pil_to_tensor(comparison.grid), pil_to_tensor(comparison.chart), table,
                             json.dumps(comparison.report, ensure_ascii=False), ui={"text": [text]})


NODES = [FLENModelCard, FLENCompareVersions]
