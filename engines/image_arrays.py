"""Conversions between ComfyUI's IMAGE (float 0..1, [B, H, W, C]), uint8 arrays and PIL images.

One home for the rounding rule (clip to 0..1, × 255, round half to even, uint8), so an image written by one
node and read by another comes back with the same pixels wherever it went. Plain Python: no ComfyUI imports;
torch is imported only by the functions that make tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


def as_numpy(image: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like → a numpy array, without copying what is already one."""
    if not hasattr(image, "detach"):
        return np.asarray(image)
    t = image.detach().cpu()
    if t.is_floating_point() and t.element_size() < 4:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def to_uint8(image: Any) -> np.ndarray:
    """Floats in 0..1 (numpy or torch, any shape) → uint8 0..255; uint8 input is returned as it is."""
    arr = as_numpy(image)
    if arr.dtype == np.uint8:
        return arr
    return (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def batch_to_uint8(images: Any) -> list[np.ndarray]:
    """A ComfyUI IMAGE batch (B, H, W, 3 floats in 0..1; torch or numpy; or one H, W, 3 item) → one contiguous
    RGB uint8 array per image."""
    arr = as_numpy(images)
    if arr.ndim == 3:
        arr = arr[None]
    return [np.ascontiguousarray(to_uint8(a[..., :3])) for a in arr]


def to_pil(image: Any) -> Image.Image:
    """HWC float array/tensor in 0..1 (or uint8; one, three or four channels), or a PIL image → RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = to_uint8(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), "RGB")


def pil_to_float(image: Image.Image) -> np.ndarray:
    """PIL → RGB float32 [H, W, 3] in 0..1."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL → a ComfyUI IMAGE batch of one: [1, H, W, 3] float32 in 0..1."""
    import torch

    return torch.from_numpy(pil_to_float(image))[None]
