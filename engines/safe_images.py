"""Decoding an image from a client or a folder without letting a small file take the server's memory.

A 20 KB PNG can declare 13000 × 13000 pixels and decode to 500 MB; the size is in the header, so it is
checked before a single pixel is decoded (:data:`MAX_PIXELS`). A truncated file is either refused
(:func:`open_image`, the default) or decoded with its missing part flagged (``allow_truncated``), never
silently half grey.

Plain Python: no ComfyUI imports.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import FlenUserError
from .image_arrays import to_uint8

MAX_PIXELS = 50_000_000  # 50 megapixels (e.g. 8660 × 5773): above any camera photo a LoRA needs
MAX_SIDE = 20_000
_truncated_lock = threading.Lock()  # LOAD_TRUNCATED_IMAGES is process-wide in PIL


def _name(source: object) -> str:
    return Path(source).name if isinstance(source, (str, os.PathLike)) else "the uploaded image"


def check_size(width: int, height: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise FlenUserError(f"{what} has no pixels ({width} × {height}).")
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
        raise FlenUserError(f"{what} is {width} × {height} pixels ({width * height / 1e6:.0f} megapixels); the limit "
                            f"is {MAX_PIXELS / 1e6:.0f} megapixels and {MAX_SIDE} pixels a side. Scale it down first.")


def open_image(source: bytes | str | os.PathLike, what: str = "", *, allow_truncated: bool = False,
               ) -> tuple[Image.Image, bool]:
    """Decodes ``source`` (bytes or a file path) after checking its declared size; returns (loaded image,
    truncated). A truncated file raises FlenUserError unless ``allow_truncated``, which decodes what is
    there and reports ``truncated=True``."""
    what = what or _name(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            im = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except Image.DecompressionBombError:
        raise FlenUserError(f"{what} declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels; "
                            f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels. Scale it down first.") from None
    except UnidentifiedImageError as exc:
        raise FlenUserError(f"{what} is not a readable image ({exc}).") from None
    except OSError as exc:
        raise FlenUserError(f"{what} cannot be read ({exc.strerror or exc}).") from None
    check_size(im.width, im.height, what)
    try:
        im.load()
        return im, False
    except OSError as exc:
        if not allow_truncated or "truncated" not in str(exc):
            im.close()
            raise FlenUserError(f"{what} is damaged or cut short ({exc}): save or copy it again.") from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        im.close()
        raise FlenUserError(f"{what} is not a readable image ({exc}).") from None
    im.close()
    with _truncated_lock:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            im = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            im.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return im, True


def open_rgb(source: bytes | str | os.PathLike, what: str = "") -> Image.Image:
    """:func:`open_image` converted to RGB (refusing truncated files)."""
    im, _ = open_image(source, what)
    with im:
        return im.convert("RGB")


def truncated_rows(arr: np.ndarray) -> int:
    """How many bottom rows look like what a decoder fills in for a cut-off file: every pixel exactly black
    (PNG) or exactly mid-grey 128 (JPEG), while rows above differ. 0 when the image looks whole. This is a
    guess from the pixels alone (ComfyUI's image loaders decode truncated files silently)."""
    a = np.asarray(arr)
    if a.ndim != 3 or a.shape[0] < 8:
        return 0
    u8 = to_uint8(a)
    rgb = u8[:, :, :3]
    for fill in (0, 128):
        flat = (rgb == fill).all(axis=(1, 2))
        n = 0
        for v in flat[::-1]:
            if not v:
                break
            n += 1
        if n == a.shape[0]:
            return 0  # a flat image (a test pattern), not a cut-off one
        if n >= max(4, a.shape[0] // 50):
            return n
    return 0


def truncation_note(arr: np.ndarray) -> str:
    n = truncated_rows(arr)
    if not n:
        return ""
    return (f"possibly truncated: the bottom {n} of {np.asarray(arr).shape[0]} rows are flat black or grey, as a "
            "cut-off PNG/JPEG decodes; check the source file")
