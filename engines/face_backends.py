"""Which face back-end a face-model name means, and what follows from it: the loader, the choices a node
offers, the default threshold.

Two back-ends score identity: insightface packs (:mod:`engines.identity`, any folder of
``<root>/models/<name>``) and dlib's recogniser (:mod:`engines.identity_dlib`, the one name
:data:`identity_dlib.DLIB_MODEL`). This module is the only one that knows both; ``identity`` knows nothing of
dlib, and ``identity_dlib`` uses ``identity`` only for the shared geometry and records. Plain Python: no
ComfyUI imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import identity, identity_dlib
from .identity import FaceBackend, IdentityBank


def is_dlib(name: str) -> bool:
    return name == identity_dlib.DLIB_MODEL


def load_face_model(root: str | Path, name: str, det_size: int = 640,
                    providers: Sequence[str] | None = None) -> FaceBackend:
    """The back-end ``name`` names, loaded once: the insightface pack ``<root>/models/<name>`` (per folder,
    providers, det_size), or dlib's back-end for ``identity_dlib.DLIB_MODEL`` (``root`` and ``providers``
    unused)."""
    if is_dlib(name):
        return identity_dlib.load_dlib_model(det_size)
    return identity.load_insightface_model(root, name, det_size, providers)


def model_choices(packs: Sequence[str]) -> list[str]:
    """The face-model choices: the insightface packs found, then dlib's back-end when it is installed."""
    return list(packs) + ([identity_dlib.DLIB_MODEL] if identity_dlib.available() else [])


def default_threshold(model_name: str) -> float:
    return identity_dlib.DEFAULT_THRESHOLD if is_dlib(model_name) else identity.DEFAULT_THRESHOLD


def effective_threshold(bank: IdentityBank, threshold: float) -> float:
    """The threshold to use: the one given, except that the untouched ArcFace default (0.40) on a bank of
    another back-end (dlib, where every face scores above 0.8) means that back-end's default."""
    if abs(threshold - identity.DEFAULT_THRESHOLD) < 1e-9:
        return default_threshold(bank.pack)
    return threshold


def bank_model(bank: IdentityBank) -> FaceBackend:
    """The back-end a bank was built with, to score candidates on the same scale."""
    return load_face_model(bank.pack_root, bank.pack, bank.det_size, bank.providers)
