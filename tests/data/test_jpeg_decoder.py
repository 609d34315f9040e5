"""``data.jpeg_decoder: simplejpeg``: JPEGs decoded by simplejpeg give exactly the pixels of
the Pillow path (full size, resized, drafted at 1/2-1/8, every crop), the same bad-sample
reasons, and the same batches through the stream; what it cannot decode to Pillow's exact
result (CMYK, a color JPEG to grayscale) goes through Pillow."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg

from pipeline.data import transforms
from pipeline.data.config import IngestConfig, StreamConfig
from pipeline.data.ingest import ingest
from pipeline.data.sources import synthetic_image
from pipeline.data.stream import ShardStream, make_loader
from pipeline.data.transforms import JPEG_DECODER, BadSample, decode_image
from pipeline.errors import ConfigError
from pipeline.typed import build

N = 12


@pytest.fixture
def fast_decodes(monkeypatch):
    """Counts the images simplejpeg decoded (the fast path taken)."""
    calls = []
    real = simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        calls.append(kwargs.get("min_width", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(transforms.simplejpeg, "decode_jpeg", spy)
    return calls


def jpegs(stored: int, mode: str, shape: tuple[int, int] | None = None, **save) -> list[bytes]:
    out = []
    for i in range(N):
        image, _ = synthetic_image(i, stored, "RGB" if mode == "CMYK" else mode, seed=0)
        if shape:
            image = image.resize(shape)
        buf = io.BytesIO()
        image.convert(mode).save(buf, "JPEG", **({"quality": 90} | save))
        out.append(buf.getvalue())
    return out


def both(data: bytes, size: int, channels: int, crop: str = "center", draft: bool = True, **kw):
    """The Pillow path's and simplejpeg's result (an array, or the BadSample reason)."""
    results = []
    for decoder in ("pillow", "simplejpeg"):
        rng = np.random.default_rng(7)  # the same random crop for both
        try:
            results.append(
                decode_image(
                    data,
                    (size, size),
                    channels,
                    kw.get("resize", True),
                    crop,
                    kw.get("max_pixels", 2**26),
                    rng,
                    draft,
                    "jpg",
                    decoder,
                )
            )
        except BadSample as e:
            results.append(e.reason)
    return results


@pytest.mark.parametrize(
    "stored, shape, mode, channels, size, crop, draft, min_width",
    [
        (64, None, "RGB", 3, 64, "center", True, 0),  # stored size: no resize
        (64, None, "L", 1, 64, "center", True, 0),
        (64, None, "L", 3, 64, "center", True, 0),  # gray JPEG to RGB: replicated
        (256, None, "RGB", 3, 64, "center", True, 64),  # drafted at 1/4
        (256, None, "RGB", 3, 32, "random", True, 32),  # 1/8, random crop
        (256, None, "L", 1, 28, "none", True, 32),  # 1/8, squashed
        (256, (300, 200), "RGB", 3, 64, "center", True, 150),  # non-square, 1/2
        (256, (301, 203), "RGB", 3, 40, "random", True, 76),  # odd sizes, 1/4
        (256, None, "RGB", 3, 64, "center", False, 0),  # no draft: full decode, resized
        (100, None, "RGB", 3, 64, "center", True, 0),  # under twice the size: no draft
    ],
)
def test_the_same_pixels_as_pillow(
    fast_decodes, stored, shape, mode, channels, size, crop, draft, min_width
):
    for data in jpegs(stored, mode, shape):
        pillow, fast = both(data, size, channels, crop, draft)
        assert pillow.shape == (channels, size, size) and pillow.dtype == fast.dtype == np.uint8
        assert np.array_equal(pillow, fast)
    assert fast_decodes == [min_width] * N  # every image went through simplejpeg, at that scale


def test_progressive_and_444_jpegs_too(fast_decodes):
    for save in ({"progressive": True}, {"subsampling": 0}, {"subsampling": 1}):
        for data in jpegs(128, "RGB", **save)[:4]:
            pillow, fast = both(data, 48, 3, "center")
            assert np.array_equal(pillow, fast)
    assert len(fast_decodes) == 12


@pytest.mark.parametrize("mode, channels", [("RGB", 1), ("CMYK", 3)])
def test_what_simplejpeg_would_decode_otherwise_goes_through_pillow(fast_decodes, mode, channels):
    # Pillow converts RGB to L by its own weights (not the JPEG's Y), and CMYK by its own
    # inversion: these stay with Pillow, so the pixels cannot change with the setting
    for data in jpegs(64, mode)[:4]:
        pillow, fast = both(data, 32, channels)
        assert np.array_equal(pillow, fast)
    assert fast_decodes == []


def test_bad_jpegs_get_pillows_reasons(fast_decodes):
    good = jpegs(64, "RGB")[0]
    big = jpegs(256, "RGB")[0]
    corrupt = bytearray(good)
    corrupt[len(good) // 2 : len(good) // 2 + 64] = b"\xff" * 64
    cases = {
        "truncated": (good[: len(good) // 2], 64, {}, "decode_error"),
        "empty": (b"", 64, {}, "decode_error"),
        "header only": (good[:200], 64, {}, "decode_error"),
        "not an image": (b"\xff\xd8\xff" + b"plain text" * 20, 64, {}, "decode_error"),
        "too many pixels": (big, 64, {"max_pixels": 128 * 128}, "too_many_pixels"),
        "wrong size": (big, 64, {"resize": False}, "wrong_size"),
        "corrupt": (bytes(corrupt), 64, {}, "decode_error"),  # an unknown marker mid-scan
    }
    for name, (data, size, kw, reason) in cases.items():
        assert both(data, size, 3, **kw) == [reason, reason], name
    # simplejpeg refused the truncated and the corrupt one, and Pillow decided
    assert fast_decodes == [0, 0]


@pytest.mark.parametrize("image_size", [0, 32])
def test_stream_batches_are_identical_with_either_decoder(tmp_path, fast_decodes, image_size):
    out = str(tmp_path)
    ingest(
        IngestConfig(
            output_url=out,
            source="synthetic",
            synthetic_count=48,
            synthetic_size=64,
            synthetic_mode="RGB",
            encoding="jpeg",
            shard_samples=16,
            test_fraction=0.0,
            workers=1,
        ),
        progress=False,
    )
    batches = {}
    for decoder in ("pillow", "simplejpeg"):
        config = StreamConfig(
            train_url=f"{out}/train", image_size=image_size, crop="random", jpeg_decoder=decoder
        )
        stream = ShardStream(config, rank=0, world_size=1, batch_size=16)
        batches[decoder] = list(make_loader(stream, num_workers=0))
    assert len(batches["pillow"]) == len(batches["simplejpeg"]) == 3
    for a, b in zip(batches["pillow"], batches["simplejpeg"]):
        assert a["key"] == b["key"]
        assert torch_equal(a["image"], b["image"]) and a["image"].shape[0] == 16
    assert len(fast_decodes) == 48


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_the_setting_is_checked():
    with pytest.raises(ConfigError, match=r"data\.jpeg_decoder.*turbo"):
        build(StreamConfig, {"train_url": "/tmp/x", "jpeg_decoder": "turbo"}, "data")
    config = build(StreamConfig, {"train_url": "/tmp/x", "jpeg_decoder": "simplejpeg"}, "data")
    assert config.jpeg_decoder == "simplejpeg"
    assert StreamConfig("/tmp/x").jpeg_decoder == JPEG_DECODER == "simplejpeg"  # the defaults
    config = build(StreamConfig, {"train_url": "/tmp/x", "jpeg_decoder": "pillow"}, "data")
    assert config.jpeg_decoder == "pillow"
