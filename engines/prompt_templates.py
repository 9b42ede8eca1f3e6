"""Prompts for synthesis: the instance token, and templates that vary a character over
expressions × angles × poses × settings ("200 varied images of the character").

Plain Python; nothing here imports ComfyUI.

* :func:`substitute_token` puts the LoRA's instance token (e.g. ``ohwx_char``) where a prompt says
  ``{token}``.
* :func:`expand_templates` turns template lines with ``{expression}``, ``{angle}``, ``{pose}`` and
  ``{setting}`` slots into exactly N prompts: every combination of the slots a line uses, in a
  seeded, reproducible order, spread evenly over the lines; when N exceeds the combinations, they
  repeat (the generator gives each image its own seed, so repeats still differ).
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable

from .errors import FlenUserError

TOKEN = "{token}"
SLOTS: dict[str, tuple[str, ...]] = {
    "expression": ("neutral expression", "smiling", "laughing", "angry", "sad", "surprised", "thoughtful",
                   "serious"),
    "angle": ("front view", "three-quarter view from the left", "three-quarter view from the right",
              "profile view from the left", "profile view from the right", "seen from slightly above",
              "seen from slightly below"),
    "pose": ("head and shoulders portrait", "upper body", "full body, standing", "full body, sitting",
             "full body, walking", "arms crossed", "hands on hips"),
    "setting": ("plain studio background", "outdoors in a park", "city street", "cosy living room",
                "beach at sunset", "office", "forest path", "kitchen"),
}
DEFAULT_TEMPLATE = "a photo of {token}, {expression}, {angle}, {pose}, {setting}"
_SLOT = re.compile(r"\{([a-z_]+)\}")
MAX_PROMPTS = 10_000


def substitute_token(prompt: str, token: str) -> str:
    """``{token}`` → the instance token. A prompt that asks for the token when none is given is an error."""
    if TOKEN not in prompt:
        return prompt
    token = token.strip()
    if not token:
        raise FlenUserError(f"The prompt '{prompt}' contains {TOKEN} but no instance token is set: write the "
                            "LoRA's trigger word (e.g. ohwx_char) in instance_token, or remove {token}.")
    return prompt.replace(TOKEN, token)


def parse_slot_values(text: str) -> dict[str, tuple[str, ...]]:
    """Overrides of the slot lists, one per line: ``expression: smiling, laughing``. Empty text: defaults."""
    values = dict(SLOTS)
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        name = name.strip().lower()
        if not sep or not _SLOT.fullmatch("{" + name + "}"):
            raise FlenUserError(f"Template values line {n} ('{line}') should read 'slot: value, value, …' "
                                f"with slot one of {', '.join(SLOTS)} (or a name of your own).")
        items = tuple(v.strip() for v in rest.split(",") if v.strip())
        if not items:
            raise FlenUserError(f"Template values line {n}: slot '{name}' has no values.")
        values[name] = items
    return values


def slots_of(template: str) -> list[str]:
    """The slot names a template uses, in order of first use (``token`` excluded)."""
    seen: list[str] = []
    for name in _SLOT.findall(template):
        if name != "token" and name not in seen:
            seen.append(name)
    return seen


def expand_templates(templates: list[str] | tuple[str, ...], count: int, seed: int = 0,
                     values: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Exactly ``count`` prompts from the template lines (``{token}`` is left for :func:`substitute_token`).

    Line k of L gets ``count // L`` prompts (the first ``count % L`` lines one more). Within a line the
    combinations of its slots are shuffled by ``seed`` and taken in order, cycling when needed, so a
    small count already spans all values of every slot."""
    values = SLOTS if values is None else values
    templates = [t for t in (t.strip() for t in templates) if t]
    if not templates:
        raise FlenUserError("No prompt template given: write at least one line, e.g. " + DEFAULT_TEMPLATE)
    if count < 1 or count > MAX_PROMPTS:
        raise FlenUserError(f"The number of varied prompts must be between 1 and {MAX_PROMPTS}; got {count}.")
    out: list[str] = []
    for k, template in enumerate(templates):
        n = count // len(templates) + (1 if k < count % len(templates) else 0)
        if n == 0:
            continue
        names = slots_of(template)
        unknown = [s for s in names if s not in values]
        if unknown:
            raise FlenUserError(f"Template '{template}' uses {', '.join('{' + s + '}' for s in unknown)}, which "
                                f"has no values; known slots: {', '.join('{' + s + '}' for s in values)}.")
        rng = random.Random(f"{seed}:{k}:{template}")
        order = _spread([values[s] for s in names], n, rng)
        for i in range(n):
            filled = dict(zip(names, order[i % len(order)], strict=True))
            out.append(_SLOT.sub(_filler(filled), template))
    return out


def _filler(filled: dict[str, str]) -> Callable[[re.Match[str]], str]:
    """The re.sub callback for one prompt: known slots get their value, others stay as written."""
    return lambda m: filled.get(m.group(1), m.group(0))


_FULL_PRODUCT_MAX = 50_000


def _spread(lists: list[tuple[str, ...]], n: int, rng: random.Random) -> list[tuple[str, ...]]:
    """Up to ``n`` distinct combinations, one value per slot, in seeded order. The first max(len) of them take
    every slot's values in a shuffled cycle, so even a few prompts span all values of every slot; the rest
    are the remaining combinations in shuffled order (sampled when there are very many)."""
    if not lists:
        return [()]
    perms = [rng.sample(range(len(v)), len(v)) for v in lists]
    order: list[tuple[str, ...]] = []
    seen: set[tuple[str, ...]] = set()
    for i in range(max(len(v) for v in lists)):
        combo = tuple(v[p[i % len(v)]] for v, p in zip(lists, perms, strict=True))
        if combo not in seen:
            seen.add(combo)
            order.append(combo)
    total = math.prod(len(v) for v in lists)
    if total <= _FULL_PRODUCT_MAX:
        rest = [c for c in itertools.product(*lists) if c not in seen]
        rng.shuffle(rest)
        order += rest
    else:
        while len(order) < min(n, total):
            combo = tuple(rng.choice(v) for v in lists)
            if combo not in seen:
                seen.add(combo)
                order.append(combo)
    return order[:max(n, 1)]
