"""Image grids with numpy and Pillow (torchvision does not import beside the CPU wheel)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] (tensor or array) -> (N, H, W, C) uint8, rounded."""
    a = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images)
    a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    return a.transpose(0, 2, 3, 1)


def upscale(size: int, min_px: int = 96) -> int:
    """The integer factor that shows a ``size``-px tile at least ``min_px`` px wide (28 -> 4)."""
    return max(1, -(-min_px // size))


def grid(images, ncol: int, pad: int = 2, fill: int = 255, scale: int = 1) -> np.ndarray:
    """Tile N images into rows of ``ncol``: (N, C, H, W) in [0, 1] -> (rows*(H+pad)+pad, ...) uint8.

    Grayscale stays (H', W'); RGB is (H', W', 3). The exact pixel size is
    ``scale * (rows * (H + pad) + pad, ncol * (W + pad) + pad)`` with ``rows = ceil(N / ncol)``:
    ``scale`` repeats every pixel (nearest neighbour), so small images stay sharp on screen.
    """
    a = to_uint8(images)
    n, h, w, c = a.shape
    rows = -(-n // ncol)
    out = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[y : y + h, x : x + w] = a[i]
    out = out.repeat(scale, 0).repeat(scale, 1)
    return out[..., 0] if c == 1 else out


TITLE_PX, GUTTER_PX = 24, 64  # the caption band above a grid; the row labels' column


def _font():
    try:
        return ImageFont.load_default(size=14)
    except Exception:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def annotate(
    array: np.ndarray, title: str = "", row_labels: list[str] = (), row_px: int = 0, top: int = 0
) -> np.ndarray:
    """``array`` (a :func:`grid`) with ``title`` in a ``TITLE_PX`` band above it and, if any,
    ``row_labels[i]`` in a ``GUTTER_PX`` column left of row i (rows ``row_px`` apart, the
    first ``top`` px down). Black text on white; the grid's pixels are unchanged."""
    img = Image.fromarray(array)
    x0, y0 = GUTTER_PX if row_labels else 0, TITLE_PX if title else 0
    white, ink = (255, 0) if img.mode == "L" else ((255,) * 3, (0,) * 3)
    canvas = Image.new(img.mode, (img.width + x0, img.height + y0), white)
    canvas.paste(img, (x0, y0))
    draw, font = ImageDraw.Draw(canvas), _font()
    if title:
        draw.text((4, 4), title, fill=ink, font=font)
    for i, label in enumerate(row_labels):
        draw.text((4, y0 + top + i * row_px + row_px // 2 - 8), label, fill=ink, font=font)
    return np.asarray(canvas)


def png_bytes(array: np.ndarray) -> bytes:
    """Deterministic PNG encoding (no timestamps) of a uint8 (H, W) or (H, W, 3) array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
