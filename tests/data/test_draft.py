"""JPEG draft decode (``data.jpeg_draft``): a JPEG stored at least twice the training size is
decoded at a reduced DCT scale, then resized; the result has the exact size and stays within
a stated tolerance of the full decode: mean absolute difference under 2 levels of 255 and
PSNR above 30 dB (measured on these structured images: 0.2-1.5 levels; the largest single
pixel differences, up to ~60, sit on sharp shape edges)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import JpegImagePlugin

from pipeline.data.config import IngestConfig, StreamConfig
from pipeline.data.ingest import ingest
from pipeline.data.sources import synthetic_image
from pipeline.data.stream import ShardStream, make_loader
from pipeline.data.transforms import decode_image

N = 24


def encoded(size: int, mode: str, fmt: str = "JPEG", shape: tuple[int, int] | None = None):
    out = []
    for i in range(N):
        image, _ = synthetic_image(i, size, mode, seed=0)
        if shape:
            image = image.resize(shape)
        buf = io.BytesIO()
        image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255**2 / mse) if mse else float("inf")


@pytest.fixture
def drafts(monkeypatch):
    """Counts the decodes that used a reduced DCT scale."""
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real(self, mode, size)
        calls.append(self.decoderconfig[0])  # the scale: 2, 4 or 8
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


@pytest.mark.parametrize(
    "stored, shape, mode, size, crop, scale",
    [
        (256, None, "RGB", 64, "center", 4),
        (256, None, "RGB", 32, "random", 8),
        (256, None, "L", 28, "none", 8),
        (64, None, "RGB", 16, "center", 4),
        (256, (300, 200), "RGB", 64, "center", 2),  # non-square: scaled to 96x64, cropped
        (256, None, "RGB", 128, "center", 2),
    ],
)
def test_draft_decode_has_the_size_and_stays_close(drafts, stored, shape, mode, size, crop, scale):
    channels = 1 if mode == "L" else 3
    diffs, worst = [], float("inf")
    for i, data in enumerate(encoded(stored, mode, shape=shape)):
        args = ((size, size), channels, True, crop, 2**26)
        # Pillow's draft (simplejpeg's gives the same pixels: tests/data/test_jpeg_decoder.py)
        full = decode_image(data, *args, np.random.default_rng(i), draft=False, decoder="pillow")
        fast = decode_image(data, *args, np.random.default_rng(i), draft=True, decoder="pillow")
        assert fast.shape == full.shape == (channels, size, size) and fast.dtype == np.uint8
        diffs.append(np.abs(fast.astype(int) - full.astype(int)).mean())
        worst = min(worst, psnr(fast, full))
    assert drafts == [scale] * N  # every image took the reduced scale, once
    assert 0 < float(np.mean(diffs)) < 2.0 and worst > 30.0


@pytest.mark.parametrize("fmt, stored", [("PNG", 256), ("JPEG", 100)])
def test_no_draft_where_it_does_not_apply(drafts, fmt, stored):
    # a PNG has no DCT scale; a JPEG under twice the size (100 -> 64) gains nothing from it
    for data in encoded(stored, "RGB", fmt):
        args = ((64, 64), 3, True, "center", 2**26)
        fast = decode_image(data, *args, draft=True, decoder="pillow")
        assert np.array_equal(fast, decode_image(data, *args, decoder="pillow"))
    assert drafts == []


def test_stream_with_draft_matches_full_decode_within_tolerance(tmp_path):
    out = str(tmp_path)
    ingest(
        IngestConfig(
            output_url=out,
            source="synthetic",
            synthetic_count=64,
            synthetic_size=64,
            synthetic_mode="RGB",
            encoding="jpeg",
            jpeg_quality=90,
            shard_samples=16,
            test_fraction=0.0,
            workers=1,
        ),
        progress=False,
    )
    batches = {}
    for draft in (False, True):
        config = StreamConfig(train_url=f"{out}/train", image_size=16, jpeg_draft=draft)
        stream = ShardStream(config, rank=0, world_size=1, batch_size=16)
        batches[draft] = list(make_loader(stream, num_workers=0))
    assert [b["key"] for b in batches[True]] == [b["key"] for b in batches[False]]
    fast = np.concatenate([b["image"].numpy() for b in batches[True]]) * 255
    full = np.concatenate([b["image"].numpy() for b in batches[False]]) * 255
    assert fast.shape == full.shape == (64, 3, 16, 16)
    assert 0 < np.abs(fast - full).mean() < 2.0 and psnr(fast, full) > 30.0
