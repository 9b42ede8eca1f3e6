"""Reads a LoRA file as the training tools wrote it and turns it into one canonical form for a target
transformer: ``{diffusers module name: LoraModule(down, up, scale)}``.

diffusers 0.42.1 converts many layouts itself, but several silently wrong (alphas lost, FLUX in/out layers
dropped, the prefix of a Qwen file with ``.alpha`` tensors doubled, no-prefix ``lora_A`` Qwen files never
converted). So the pack owns the conversion: every key of the file must map onto a linear layer of the
target with matching shape, or the whole file is refused naming the layout it saw and the modules that do
not map. A partial load is an error, never a warning.

Layouts understood (module names in diffusers naming, or for FLUX also in BFL naming with fused q/k/v):

* prefixes ``transformer.``, ``diffusion_model.``, ``model.diffusion_model.``, ``base_model.model.``,
  ``lora_unet_`` / ``lora_transformer_`` / ``lycoris_`` (dots written as underscores), or none;
* pairs ``lora_A/B.weight`` (peft; with an adapter name such as ``lora_A.default.weight`` for DiffSynth),
  ``lora_down/up.weight`` (kohya, ComfyUI), ``lora.down/up.weight`` (old diffusers), XLabs'
  ``processor.qkv_lora1.down/up.weight``;
* the scale of each module: its ``.alpha`` tensor divided by its rank, else peft's ``lora_adapter_metadata``
  (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else 1.

DoRA, LoKr, LoHa and full-weight diffs are refused clearly (FLENApplyLoraStack leaves those to ComfyUI).
Nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FlenUserError

_ARCH_LABEL = {"flux": "FLUX.1", "qwen_image": "Qwen-Image(-Edit)"}


@dataclass(frozen=True)
class LoraModule:
    down: torch.Tensor  # [rank, in_features]
    up: torch.Tensor  # [out_features, rank]
    scale: float  # what up·down is multiplied by at strength 1 (alpha / rank as the layout defines it)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.float() @ self.down.float())


@dataclass(frozen=True)
class ConvertedLora:
    layout: str
    modules: dict[str, LoraModule]


# ---- reading ----------------------------------------------------------------------------------

def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors LoRA (safetensors only: never a pickle)."""
    from safetensors import safe_open

    from .lora_stack import read_safetensors_header

    read_safetensors_header(path)  # names a corrupt or non-safetensors file clearly
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise FlenUserError(f"LoRA file '{Path(path).name}' could not be read as safetensors ({exc}). "
                            "Re-download or re-export it.") from exc
    return tensors, metadata


# ---- key grammar ------------------------------------------------------------------------------

# (regex on the whole key, what the tensor is, a label for the pair family). First match wins.
_SUFFIXES: list[tuple[re.Pattern, str, str]] = [
    (re.compile(r"^(?P<m>.+)\.lora_A(?P<ad>\.[A-Za-z0-9_]+)?\.weight$"), "down", "lora_A/B"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?P<ad>\.[A-Za-z0-9_]+)?\.weight$"), "up", "lora_A/B"),
    (re.compile(r"^(?P<m>.+)\.lora_down\.weight$"), "down", "lora_down/up"),
    (re.compile(r"^(?P<m>.+)\.lora_up\.weight$"), "up", "lora_down/up"),
    (re.compile(r"^(?P<m>.+)\.lora\.down\.weight$"), "down", "lora.down/up"),
    (re.compile(r"^(?P<m>.+)\.lora\.up\.weight$"), "up", "lora.down/up"),
    (re.compile(r"^(?P<m>.+\.processor\.(?:qkv|proj)_lora\d?)\.down\.weight$"), "down", "XLabs"),
    (re.compile(r"^(?P<m>.+\.processor\.(?:qkv|proj)_lora\d?)\.up\.weight$"), "up", "XLabs"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "alpha", ""),
    (re.compile(r"^(?P<m>.+)\.(?:dora_scale|lora_magnitude_vector(?:\.[A-Za-z0-9_]+)?(?:\.weight)?)$"), "dora", ""),
    (re.compile(r"^(?P<m>.+)\.lokr_(?:w1|w2|w1_a|w1_b|w2_a|w2_b|t2)$"), "lokr", ""),
    (re.compile(r"^(?P<m>.+)\.hada_(?:w1_a|w1_b|w2_a|w2_b|t1|t2)$"), "loha", ""),
    (re.compile(r"^(?P<m>.+)\.(?:diff|diff_b|w_norm|b_norm|set_weight|lora_mid\.weight)$"), "other", ""),
]

# Longest first: ``model.diffusion_model.`` before ``diffusion_model.``.
_PREFIXES = [
    ("model.diffusion_model.", "diffusion_model."),
    ("diffusion_model.", "diffusion_model."),
    ("base_model.model.", "base_model.model."),
    ("transformer.", "transformer."),
    ("unet.", "unet."),
    ("lora_unet_", "lora_unet_"),
    ("lora_transformer_", "lora_transformer_"),
    ("lycoris_", "lycoris_"),
]
_UNDERSCORED = {"lora_unet_", "lora_transformer_", "lycoris_"}
_TEXT_ENCODER = ("lora_te", "text_encoder", "te1.", "te2.", "t5.", "clip_l.")


def _strip_prefix(module: str) -> tuple[str, str]:
    for prefix, label in _PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix):], label
    return module, ""


@dataclass
class _Parsed:
    by_module: dict[str, dict[str, torch.Tensor]]  # file module path -> {"down"|"up"|"alpha": tensor}
    kinds: Counter  # tensor kinds seen (down, up, alpha, dora, lokr, loha, other, unknown)
    families: Counter  # pair families seen (lora_A/B, lora_down/up, …)
    prefixes: Counter
    adapter_suffixes: Counter  # e.g. ".default" in lora_A.default.weight
    unknown: list[str]  # keys no rule explains
    special: dict[str, list[str]]  # kind -> file modules (dora, lokr, loha, other)


def _parse(tensors: dict[str, torch.Tensor]) -> _Parsed:
    p = _Parsed({}, Counter(), Counter(), Counter(), Counter(), [], {})
    for key, tensor in tensors.items():
        for rx, kind, family in _SUFFIXES:
            m = rx.match(key)
            if m is None:
                continue
            module = m.group("m")
            p.kinds[kind] += 1
            if family:
                p.families[family] += 1
            if m.groupdict().get("ad"):
                p.adapter_suffixes[m.group("ad")] += 1
            if kind in ("down", "up", "alpha"):
                slot = p.by_module.setdefault(module, {})
                if kind in slot:  # e.g. lora_A.default and lora_A.other: two adapters in one file
                    p.special.setdefault("duplicate", []).append(module)
                slot[kind] = tensor
            else:
                p.special.setdefault(kind, []).append(module)
            p.prefixes[_strip_prefix(module)[1]] += 1
            break
        else:
            p.kinds["unknown"] += 1
            p.unknown.append(key)
    return p


def guess_architecture(keys: list[str]) -> str:
    """A human label for what a LoRA was trained on, from its key names (for error messages)."""
    joined = " ".join(keys[:4000])
    # BFL FLUX names also contain img_mlp / img_mod: test them before Qwen's.
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks", joined):
        return "FLUX.1"
    if re.search(r"img_mlp|txt_mlp|img_mod|txt_mod", joined):
        return "Qwen-Image(-Edit)"
    if re.search(r"down_blocks|up_blocks|input_blocks|output_blocks|mid_block|middle_block", joined):
        return "Stable Diffusion (UNet)"
    if re.search(r"joint_blocks|context_block|x_block", joined):
        return "Stable Diffusion 3"
    if re.search(r"transformer_blocks\.\d+\.(?:attn1|attn2)|blocks\.\d+\.(?:self_attn|cross_attn)", joined):
        return "another DiT (Wan, HunyuanVideo, PixArt…)"
    return "an unknown architecture"


def _layout_label(p: _Parsed) -> str:
    prefix = p.prefixes.most_common(1)[0][0] if p.prefixes else ""
    family = p.families.most_common(1)[0][0] if p.families else "no LoRA pairs"
    alpha = " + alpha" if p.kinds.get("alpha") else ""
    who = {
        ("transformer.", "lora_A/B"): "diffusers / peft",
        ("transformer.", "lora.down/up"): "old diffusers",
        ("diffusion_model.", "lora_A/B"): "ComfyUI / ai-toolkit",
        ("diffusion_model.", "lora_down/up"): "ComfyUI",
        ("lora_unet_", "lora_down/up"): "kohya / musubi-tuner",
        ("lora_transformer_", "lora_down/up"): "OneTrainer",
        ("lycoris_", "lora_down/up"): "SimpleTuner LyCORIS",
        ("", "lora_down/up"): "no prefix as in the Lightning LoRAs",
        ("", "lora_A/B"): "no prefix as musubi-tuner writes without --diffusers_prefix",
        ("", "XLabs"): "XLabs",
        ("diffusion_model.", "XLabs"): "XLabs",
    }.get((prefix, family), "")
    if family == "lora_A/B" and p.adapter_suffixes:
        suffix = p.adapter_suffixes.most_common(1)[0][0]
        family = f"lora_A{suffix}"
        who = who if prefix else "DiffSynth / Multiple-angles"
    if not p.families:
        lyco = [k for k in ("lokr", "loha") if p.kinds.get(k)]
        family = {"lokr": "lokr_w1/w2", "loha": "hada_w1/w2"}[lyco[0]] if lyco else family
        who = {"lokr": "LyCORIS LoKr", "loha": "LyCORIS LoHa"}[lyco[0]] if lyco else who
    dora = " + DoRA" if p.kinds.get("dora") else ""
    shown = f"{prefix or '<no prefix>'}…{family}{alpha}{dora}"
    return f"layout '{shown}', {who}" if who else f"layout '{shown}'"


def metadata_alphas(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """``<module>.alpha`` tensors that carry peft's metadata alpha (``lora_adapter_metadata``) for loaders that
    read alphas only from tensors (ComfyUI): alpha / rank of each tensor equals the scale peft would use."""
    scale_of = _peft_alpha(metadata)
    if scale_of is None:
        return {}
    out = {}
    for module, parts in _parse(tensors).by_module.items():
        if "down" in parts and "up" in parts and "alpha" not in parts:
            rank = int(parts["down"].shape[0])
            out[f"{module}.alpha"] = torch.tensor(scale_of(_strip_prefix(module)[0], rank) * rank)
    return out


# ---- target tables ----------------------------------------------------------------------------

def linear_modules(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer a LoRA can patch: name -> (in_features, out_features). Layers already wrapped by
    peft count under their own name."""
    out: dict[str, tuple[int, int]] = {}
    for name, mod in transformer.named_modules():
        if ".base_layer" in name or ".lora_" in name or name.endswith("base_layer"):
            continue
        base = getattr(mod, "base_layer", mod)
        if isinstance(base, torch.nn.Linear):
            out[name] = (int(base.in_features), int(base.out_features))
    return out


# target module, then the row ranges of the file module's ``up`` it takes, concatenated in that order
_Pieces = list[tuple[str, list[tuple[int, int]]]]


def _flux_bfl_table(linears: dict[str, tuple[int, int]]) -> dict[str, _Pieces]:
    """BFL (ComfyUI / original FLUX) module names -> diffusers modules with the row slices of the fused
    layers: double blocks' qkv, single blocks' linear1 = q, k, v, mlp; the final adaLN's (shift, scale)
    is diffusers' (scale, shift)."""
    table: dict[str, _Pieces] = {}

    def whole(name: str) -> _Pieces:
        return [(name, [(0, linears[name][1])])]

    def fused(names: list[str]) -> _Pieces:
        pieces, start = [], 0
        for n in names:
            rows = linears[n][1]
            pieces.append((n, [(start, start + rows)]))
            start += rows
        return pieces

    simple = {
        "img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }
    for bfl, name in simple.items():
        if name in linears:
            table[bfl] = whole(name)
    if "norm_out.linear" in linears:
        half = linears["norm_out.linear"][1] // 2
        table["final_layer.adaLN_modulation.1"] = [("norm_out.linear", [(half, 2 * half), (0, half)])]
    i = 0
    while f"transformer_blocks.{i}.attn.to_q" in linears:
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        table[f"{b}.img_attn.qkv"] = fused([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"])
        table[f"{b}.txt_attn.qkv"] = fused([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"])
        for bfl, name in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                          ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                          ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                          ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear")):
            if f"{d}.{name}" in linears:
                table[f"{b}.{bfl}"] = whole(f"{d}.{name}")
        # XLabs names the same layers after its attention processor (lora1: image stream, lora2: text)
        table[f"{b}.processor.qkv_lora1"] = table[f"{b}.img_attn.qkv"]
        table[f"{b}.processor.qkv_lora2"] = table[f"{b}.txt_attn.qkv"]
        table[f"{b}.processor.proj_lora1"] = whole(f"{d}.attn.to_out.0")
        table[f"{b}.processor.proj_lora2"] = whole(f"{d}.attn.to_add_out")
        i += 1
    i = 0
    while f"single_transformer_blocks.{i}.attn.to_q" in linears:
        s, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        qkv = [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"]
        table[f"{b}.linear1"] = fused(qkv + [f"{s}.proj_mlp"])
        table[f"{b}.linear2"] = whole(f"{s}.proj_out")
        table[f"{b}.modulation.lin"] = whole(f"{s}.norm.linear")
        table[f"{b}.processor.qkv_lora"] = fused(qkv)
        table[f"{b}.processor.proj_lora"] = whole(f"{s}.proj_out")
        i += 1
    return table


def _resolver(linears: dict[str, tuple[int, int]], architecture: str):
    """name in the file (prefix stripped) -> pieces, trying diffusers names, BFL names, then both with the
    dots written as underscores (kohya's naming)."""
    named: dict[str, _Pieces] = {n: [(n, [(0, shape[1])])] for n, shape in linears.items()}
    if architecture == "flux":
        named.update(_flux_bfl_table(linears))
    underscored: dict[str, _Pieces | None] = {}
    for n, pieces in named.items():
        u = n.replace(".", "_")
        underscored[u] = None if u in underscored and underscored[u] != pieces else pieces  # None: ambiguous

    def resolve(name: str, prefix: str) -> _Pieces | None:
        if prefix not in _UNDERSCORED and name in named:
            return named[name]
        return underscored.get(name.replace(".", "_"))

    return resolve


# ---- metadata ---------------------------------------------------------------------------------

def _peft_alpha(metadata: dict[str, str]):
    """(module name, rank) -> scale from diffusers' ``lora_adapter_metadata`` (a peft LoraConfig), or None
    when the file has none."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(cfg, dict):
        return None
    if any(k.startswith("transformer.") for k in cfg):  # a pipeline's save: keys per component
        cfg = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
    if "lora_alpha" not in cfg:
        return None
    default = float(cfg["lora_alpha"])
    patterns = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora"))

    def scale(module: str, rank: int) -> float:
        alpha = default
        for pattern, value in patterns.items():  # peft's own matching (peft.utils.other.get_pattern_key)
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        return alpha / (rank ** 0.5 if rslora else rank)

    return scale


# ---- conversion -------------------------------------------------------------------------------

def _examples(items: list[str], n: int = 3) -> str:
    shown = ", ".join(f"'{x}'" for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def convert(entry_name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
            linears: dict[str, tuple[int, int]], architecture: str) -> ConvertedLora:
    """The file as canonical per-module LoRA pairs for a transformer whose linear layers are ``linears``;
    raises FlenUserError naming the layout and the modules when any part of the file cannot be applied."""
    label = _ARCH_LABEL.get(architecture, architecture)
    p = _parse(tensors)
    layout = _layout_label(p)
    arch_guess = guess_architecture(list(tensors))
    who = f"LoRA '{entry_name}'"
    seen = f" FLENwheel read it as {layout}, apparently for {arch_guess}."

    for kind, what in (("dora", "DoRA (dora_scale / magnitude tensors)"), ("lokr", "LoKr (LyCORIS)"),
                       ("loha", "LoHa (LyCORIS)")):
        if p.special.get(kind):
            raise FlenUserError(
                f"{who} is a {what} file (e.g. {_examples(p.special[kind], 2)}): FLENwheel's Qwen edit and "
                "FLUX nodes apply plain LoRAs only, and loading it as one would change its effect. Export it "
                "as a plain LoRA, or apply it with "
                "FLENApplyLoraStack on a ComfyUI model, where ComfyUI applies it itself." + seen)
    if p.special.get("other"):
        raise FlenUserError(f"{who} holds full-weight differences or conv LoRA parts "
                            f"({_examples(p.special['other'], 2)}), which the Qwen edit and FLUX nodes do not "
                            "apply. Use FLENApplyLoraStack on a ComfyUI model for it, or a plain LoRA." + seen)
    if p.special.get("duplicate"):
        raise FlenUserError(f"{who} holds more than one adapter for the same module "
                            f"({_examples(p.special['duplicate'], 2)}); save one adapter per file." + seen)
    if not p.by_module:
        raise FlenUserError(f"{who} holds no LoRA weights: none of its {len(tensors)} tensors is a LoRA weight "
                            f"FLENwheel knows (e.g. {_examples(p.unknown, 3)}). Pick a {label} LoRA in safetensors.")

    resolve = _resolver(linears, architecture)
    peft_scale = _peft_alpha(metadata)
    modules: dict[str, LoraModule] = {}
    unmapped: list[str] = list(p.unknown)
    incomplete: list[str] = []
    wrong_shape: list[str] = []
    text_encoder: list[str] = []
    for file_module, parts in p.by_module.items():
        if "down" not in parts or "up" not in parts:
            incomplete.append(file_module)
            continue
        if file_module.startswith(_TEXT_ENCODER):
            text_encoder.append(file_module)
            continue
        name, prefix = _strip_prefix(file_module)
        pieces = resolve(name, prefix)
        if pieces is None:
            unmapped.append(file_module)
            continue
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            wrong_shape.append(f"{file_module}: down {tuple(down.shape)}, up {tuple(up.shape)} are not a LoRA pair")
            continue
        rank = int(down.shape[0])
        if "alpha" in parts:
            scale = float(parts["alpha"].float().reshape(-1)[0]) / rank
        elif peft_scale is not None:
            scale = peft_scale(name, rank)
        else:
            scale = 1.0
        total_rows = sum(e - s for _, rows in pieces for s, e in rows)
        if total_rows != up.shape[0]:
            target = ", ".join(f"{t} {linears[t][0]}→{linears[t][1]}" for t, _ in pieces)
            wrong_shape.append(f"{file_module} is {down.shape[1]}→{up.shape[0]}, the model's {target}")
            continue
        for target, rows in pieces:
            fan_in, fan_out = linears[target]
            if down.shape[1] != fan_in:
                wrong_shape.append(f"{file_module} is {down.shape[1]}→{up.shape[0]}, the model's {target} is "
                                   f"{fan_in}→{fan_out}")
                break
            piece_up = torch.cat([up[s:e] for s, e in rows], dim=0)
            if target in modules:
                unmapped.append(f"{file_module} (a second LoRA for {target})")
                break
            modules[target] = LoraModule(down=down, up=piece_up, scale=scale)

    problems = []
    if text_encoder:
        problems.append(f"{len(text_encoder)} are text-encoder modules, which these nodes do not apply "
                        f"({_examples(text_encoder)})")
    if unmapped:
        problems.append(f"{len(unmapped)} do not exist in this {label} model ({_examples(unmapped)})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} have other shapes than the model's layers ({_examples(wrong_shape, 2)})")
    if incomplete:
        problems.append(f"{len(incomplete)} have only half of a down/up pair ({_examples(incomplete)})")
    if problems:
        whole_file = not modules
        raise FlenUserError(
            f"{who} {'does not fit' if whole_file else 'cannot be applied completely to'} this {label} model: "
            f"of its {len(p.by_module)} modules, " + "; ".join(problems) + ". "
            + (f"Pick a {label} LoRA, or remove it from the stack." if whole_file else
               "FLENwheel never applies part of a LoRA: re-export it for this model or remove it from the stack.")
            + seen)
    return ConvertedLora(layout=layout, modules=modules)


def load_lora_file(entry_name: str, path: str | Path, transformer: torch.nn.Module,
                   architecture: str) -> ConvertedLora:
    tensors, metadata = read_lora_file(path)
    return convert(entry_name, tensors, metadata, linear_modules(transformer), architecture)


def describe_keys(tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(layout label, architecture guess) of a LoRA's keys, for messages of other loaders."""
    return _layout_label(_parse(tensors)), guess_architecture(list(tensors))
