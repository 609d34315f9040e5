"""Image grids with numpy and Pillow (torchvision does not import beside the CPU wheel)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] (tensor or array) -> (N, H, W, C) uint8, rounded."""
    a = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images)
    a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    return a.transpose(0, 2, 3, 1)


def grid(images, ncol: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile N images into rows of ``ncol``: (N, C, H, W) in [0, 1] -> (rows*(H+pad)+pad, ...) uint8.

    Grayscale stays (H', W'); RGB is (H', W', 3). The exact pixel size is
    ``(rows * (H + pad) + pad, ncol * (W + pad) + pad)`` with ``rows = ceil(N / ncol)``.
    """
    a = to_uint8(images)
    n, h, w, c = a.shape
    rows = -(-n // ncol)
    out = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[y : y + h, x : x + w] = a[i]
    return out[..., 0] if c == 1 else out


def png_bytes(array: np.ndarray) -> bytes:
    """Deterministic PNG encoding (no timestamps) of a uint8 (H, W) or (H, W, 3) array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
