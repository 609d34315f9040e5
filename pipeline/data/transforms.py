"""Small generator stages, composed in a list: raw tar samples -> decoded -> batches -> tensors.

Each stage is ``stage(items, **options) -> iterator`` and works on a plain list, e.g.
``list(batched([1, 2, 3, 4], 2)) == [[1, 2], [3, 4]]``. A bad sample is never dropped in
flight: it travels as ``{"bad": reason, ...}`` so every rank keeps its exact batch count, and
:func:`fill_bad` replaces it in its batch by a repeat of a good sample, marked ``pad``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")
# the format a member's suffix names, tried first: probing every format costs 2-3 us a sample
FORMAT_OF = {"png": ("PNG",), "jpg": ("JPEG",), "jpeg": ("JPEG",), "webp": ("WEBP",)}
# decode_image's default, the same as data.jpeg_decoder's (StreamConfig): a benchmark's
# baseline decoding through decode_image decodes as the loader does
JPEG_DECODER = "simplejpeg"
CONVERTIBLE_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is its stats bucket."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def pipeline(source: Iterable, stages: list[Callable[[Iterable], Iterable]]) -> Iterator:
    """``stages[-1](...stages[0](source))``."""
    for stage in stages:
        source = stage(source)
    return iter(source)


def stage(fn: Callable, **options: Any) -> Callable[[Iterable], Iterator]:
    """``fn`` with its options bound, ready for :func:`pipeline`."""
    return partial(fn, **options)


def decode_image(
    data: bytes,
    size: tuple[int, int],
    channels: int,
    resize: bool,
    crop: str,
    max_pixels: int,
    rng: np.random.Generator | None = None,
    draft: bool = False,
    suffix: str = "",
    decoder: str = JPEG_DECODER,
) -> np.ndarray:
    """Image bytes -> uint8 array ``(C, H, W)`` with ``(H, W) == size``.

    ``suffix``: the member's suffix (``png``, ``jpg``, ...); its format is tried first, then
    every format Pillow knows (a JPEG stored as ``.png`` still decodes).

    ``draft``: a JPEG at least twice the resized size is decoded at a reduced DCT scale
    (1/2, 1/4 or 1/8; Pillow's ``Image.draft``) and resized from there: faster, pixels
    within a few levels of the full decode (``tests/data/test_draft.py``).

    ``decoder="simplejpeg"``: a JPEG is decoded by simplejpeg where that gives the Pillow
    path's exact pixels (:func:`_simplejpeg_pixels`); everything else, bad data included, goes
    through Pillow, so the result and the bad-sample reasons are the same with either.

    Raises:
        BadSample: ``decode_error``, ``too_many_pixels`` (checked from the header, before
            decompression), ``wrong_mode`` or ``wrong_size`` (when not resizing).
    """
    height, width = size
    if decoder == "simplejpeg" and data[:3] == b"\xff\xd8\xff":
        pixels = _simplejpeg_pixels(data, size, channels, resize, crop, max_pixels, rng, draft)
        if pixels is not None:
            return pixels
    box = None
    try:
        # max_pixels is the bound, checked from the header before decompression. Pillow's
        # own (DecompressionBombError past 2 * Image.MAX_IMAGE_PIXELS) still applies; its
        # warning below that is not turned into an error here: a catch_warnings() per
        # sample costs ~1.4 us, 3% of a 28x28 PNG's decode.
        formats = FORMAT_OF.get(suffix)
        try:
            image = Image.open(io.BytesIO(data), formats=formats)
        except Image.UnidentifiedImageError:
            if formats is None:
                raise
            image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w * h > max_pixels:
            raise BadSample("too_many_pixels", f"{w}x{h} > max_pixels={max_pixels}")
        if image.mode not in CONVERTIBLE_MODES:
            raise BadSample("wrong_mode", image.mode)
        if draft and resize and image.format == "JPEG":
            nw, nh = _scaled_size(w, h, width, height, crop)
            if w // nw >= 2 and h // nh >= 2:
                # (0, 0, w / s, h / s): the source frame in the 1/s-scale pixels
                box = image.draft(None, (nw, nh))[1]
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("too_many_pixels", str(e)) from None
    except BadSample:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise BadSample("decode_error", f"{type(e).__name__}: {e}") from None
    if (w, h) != (width, height):
        if not resize:
            raise BadSample("wrong_size", f"{w}x{h}, expected {width}x{height}")
        image = _resize(image, (w, h), width, height, crop, rng, box)
    target = "L" if channels == 1 else "RGB"
    if image.mode != target:
        image = image.convert(target)
    # tobytes() is what np.asarray(image) calls, minus ~1 us of array-interface overhead
    pixels = np.frombuffer(image.tobytes(), np.uint8)
    if channels == 1:
        return pixels.reshape(1, height, width)
    return pixels.reshape(height, width, 3).transpose(2, 0, 1)


def _simplejpeg_pixels(
    data: bytes,
    size: tuple[int, int],
    channels: int,
    resize: bool,
    crop: str,
    max_pixels: int,
    rng: np.random.Generator | None,
    draft: bool,
) -> np.ndarray | None:
    """:func:`decode_image`'s Pillow result for a JPEG, decoded by simplejpeg (the same
    libjpeg-turbo, the same DCT and upsampling, without Pillow's per-image Python work), or
    None where it would not be that exact result or Pillow must decide: a CMYK or YCCK JPEG,
    a color JPEG to grayscale (Pillow converts RGB to L itself), a size the sample would be
    refused for, a drafted scale simplejpeg does not pick, or data it refuses.
    """
    height, width = size
    try:
        h, w, space, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if space not in ("Gray", "YCbCr") or (channels == 1 and space != "Gray"):
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if (
        w * h > max_pixels
        or (limit and w * h > limit)
        or ((w, h) != (width, height) and not resize)
    ):
        return None  # refused by Pillow's path, with its reason
    colorspace, mode = ("GRAY", "L") if channels == 1 else ("RGB", "RGB")
    scale, box = 1, None
    if (w, h) != (width, height) and draft:
        nw, nh = _scaled_size(w, h, width, height, crop)
        if w // nw >= 2 and h // nh >= 2:  # Pillow's draft: the largest of 8, 4, 2 that fits
            scale = next(s for s in (8, 4, 2) if min(w // nw, h // nh) >= s)
            box = (0, 0, w / scale, h / scale)
    sw, sh = (w + scale - 1) // scale, (h + scale - 1) // scale
    try:
        if scale == 1:
            pixels = simplejpeg.decode_jpeg(data, colorspace=colorspace)
        else:
            pixels = simplejpeg.decode_jpeg(
                data, colorspace=colorspace, min_height=sh, min_width=sw, min_factor=scale
            )
    except ValueError:  # strict: also libjpeg's warnings, which Pillow may let pass
        return None
    if pixels.shape[:2] != (sh, sw):
        return None
    if (w, h) != (width, height):
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
        image = _resize(image, (w, h), width, height, crop, rng, box)
        pixels = np.frombuffer(image.tobytes(), np.uint8).reshape(height, width, channels)
    return pixels.transpose(2, 0, 1)


def _scaled_size(w: int, h: int, width: int, height: int, crop: str) -> tuple[int, int]:
    """The size a ``w x h`` image is resized to before a crop to ``width x height``."""
    if crop == "none":
        return width, height
    scale = max(width / w, height / h)
    return max(width, round(w * scale)), max(height, round(h * scale))


def _resize(
    image: Image.Image,
    source: tuple[int, int],
    width: int,
    height: int,
    crop: str,
    rng: np.random.Generator | None,
    box: tuple[float, float, float, float] | None = None,
) -> Image.Image:
    """Resize (from ``box`` of a drafted image) and crop; geometry from the ``source`` size."""
    nw, nh = _scaled_size(*source, width, height, crop)
    if crop == "none":
        return image.resize((width, height), Image.Resampling.BILINEAR, box=box)
    image = image.resize((nw, nh), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    if crop == "random" and rng is not None:
        left, top = int(rng.integers(nw - width + 1)), int(rng.integers(nh - height + 1))
    else:
        left, top = (nw - width) // 2, (nh - height) // 2
    return image.crop((left, top, left + width, top + height))


def decode(
    items: Iterable[dict],
    *,
    size: tuple[int, int],
    channels: int,
    resize: bool,
    crop: str,
    max_pixels: int,
    seed: int = 0,
    epoch: int = 0,
    draft: bool = False,
    decoder: str = JPEG_DECODER,
) -> Iterator[dict]:
    """Raw samples ``{__key__, __url__, png|jpg, cls, __pos__, __pad__}`` -> decoded items.

    Yields ``{"image": uint8 (C, H, W), "label", "key", "pad"}`` or, for a bad sample,
    ``{"bad": reason, "detail", "key", "url", "pad"}``. Items already ``bad`` pass through.
    """
    for item in items:
        if "bad" in item:
            yield item
            continue
        key, pad = item.get("__key__", ""), item.get("__pad__", False)
        try:
            for suffix in IMAGE_SUFFIXES:
                if suffix in item:
                    break
            else:
                members = sorted(k for k in item if not k.startswith("__"))
                raise BadSample("no_image", f"members {members}")
            rng = None
            if crop == "random":  # by (seed, epoch, plan position): replayable on resume
                rng = np.random.default_rng([seed % 2**63, epoch, item.get("__pos__", 0)])
            image = decode_image(
                item[suffix], size, channels, resize, crop, max_pixels, rng, draft, suffix, decoder
            )
            label = -1
            cls = item.get("cls")
            if cls is not None:
                try:
                    label = int(cls)  # int() takes ASCII digit bytes, spaces around them too
                except ValueError:
                    raise BadSample("bad_label", repr(cls[:20])) from None
        except BadSample as e:
            url = item.get("__url__", "")
            yield {"bad": e.reason, "detail": str(e), "key": key, "url": url, "pad": pad}
            continue
        yield {"image": image, "label": label, "key": key, "pad": pad}


def batched(items: Iterable, batch_size: int) -> Iterator[list]:
    """Lists of exactly ``batch_size`` items; a short tail is an error (plans are exact)."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        raise AssertionError(f"{len(batch)} items left over; the plan must fill whole batches")


def fill_bad(batches: Iterable[list[dict]], *, shape: tuple[int, int, int]) -> Iterator[dict]:
    """Replace each bad item by a repeat of a good one (same batch, else the last good seen).

    Yields ``{"items": [...], "skipped": [{bad, detail, key, url}, ...]}``; replacements have
    ``pad=True``. With no good sample seen yet, a zero image of ``shape`` stands in.
    """
    last_good = {"image": np.zeros(shape, np.uint8), "label": -1, "key": ""}
    for batch in batches:
        for x in batch:  # the common case, in one pass (a loop: any() costs a frame an item)
            if "bad" in x:
                break
        else:
            last_good = batch[-1]
            yield {"items": batch, "skipped": []}
            continue
        good = [x for x in batch if "bad" not in x]
        skipped = [{k: x[k] for k in ("bad", "detail", "key", "url")} for x in batch if "bad" in x]
        if good:
            last_good = good[-1]
        out, j = [], 0
        for x in batch:
            if "bad" in x:
                donor = good[j % len(good)] if good else last_good
                x, j = {**donor, "pad": True}, j + 1
            out.append(x)
        yield {"items": out, "skipped": skipped}


def collate(batches: Iterable[dict]) -> Iterator[dict]:
    """:func:`fill_bad` batches -> ``{"image": uint8 (B, C, H, W), "label": int64 (B,),
    "key": list[str], "pad": bool (B,), "skipped": list[dict]}``.

    Images stay uint8 so a batch crosses from a loader worker at a quarter of float32's bytes;
    the consumer scales them with :func:`normalize` (on its device).
    """
    for filled in batches:
        batch = filled["items"]
        images = [x["image"] for x in batch]
        if images[0].flags.c_contiguous:  # grayscale: one copy, not a view per image
            stacked = np.concatenate(images).reshape(len(images), *images[0].shape)
        else:  # (C, H, W) views of (H, W, C) pixels: stack copies each transposed
            stacked = np.stack(images)
        yield {
            "image": torch.from_numpy(stacked),
            "label": torch.from_numpy(np.array([x["label"] for x in batch], np.int64)),
            "key": [x["key"] for x in batch],
            "pad": torch.from_numpy(np.array([x["pad"] for x in batch], bool)),
            "skipped": filled["skipped"],
        }


def normalize(
    images: torch.Tensor,
    scale: str = "unit",
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float32 on the same device.

    ``scale``: ``unit`` -> [0, 1]; ``symmetric`` -> [-1, 1]; ``standard`` -> (x - mean) / std.
    """
    x = images.float().div_(255)
    if scale == "symmetric":
        return x.mul_(2).sub_(1)
    if scale == "standard":
        m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=x.device).clamp_min(1e-6)
        return x.sub_(m).div_(s.view(1, -1, 1, 1))
    return x
