"""A real user's image folder: every format and mode ingests; broken files are skipped and
counted by reason, never fatal alone (but bounded by ``max_bad_files``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.config import IngestConfig
from pipeline.data.errors import DataError
from pipeline.data.ingest import Skipped, ingest, load_checked, prepare
from pipeline.data.manifest import read_manifest
from pipeline.data.shards import tar_samples
from pipeline.data.sources import ImageFolder

BAD = {"empty": 1, "not_an_image": 1, "truncated": 1, "decompression_bomb": 1}


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    """A 20x10 JPEG whose EXIF orientation (6) says: display rotated by 90 degrees."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(Image.new("RGB", (20, 10), (200, 30, 30)), exif=exif.tobytes())


def make_folder(root) -> int:
    """Writes good images of every kind and the broken ones of BAD; returns the good count."""
    rng = np.random.default_rng(0)
    good = {
        "a/rgb_40x30.png": Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)),
        "a/gray_17x23.png": Image.fromarray(rng.integers(0, 255, (23, 17), dtype=np.uint8)),
        "a/rgba.png": Image.new("RGBA", (16, 16), (0, 0, 255, 0)),
        "a/palette.gif": Image.new("P", (12, 12), 3),
        "a/cmyk.jpg": Image.new("CMYK", (16, 16), (0, 255, 255, 0)),
        "b/pic.webp": Image.new("RGB", (24, 24), (10, 200, 10)),
        "b/pic.bmp": Image.new("RGB", (16, 16), (10, 10, 200)),
        "b/pic.tiff": Image.new("RGB", (16, 16), (90, 90, 90)),
    }
    for name, image in good.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    sixteen = Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16))  # 128 * 257
    sixteen.save(root / "b/sixteen.png")
    (root / "b/rotated.jpg").write_bytes(_exif_rotated())
    (root / "b/empty.jpg").write_bytes(b"")
    (root / "b/fake.jpg").write_text("not an image at all")
    (root / "b/truncated.jpg").write_bytes(_jpeg(Image.new("RGB", (64, 64), (1, 2, 3)))[:300])
    Image.new("1", (2000, 2000)).save(root / "b/bomb.png")  # 4M pixels > max_pixels below
    (root / "b/.hidden.png").write_bytes(b"")  # hidden: never looked at
    (root / ".cache").mkdir()
    (root / ".cache/thumb.png").write_bytes(b"")
    (root / "b/notes.txt").write_text("not an image extension: not listed")
    return len(good) + 2


def _config(root, out, **kw) -> IngestConfig:
    return IngestConfig(
        output_url=str(out),
        source="folder",
        source_path=str(root),
        image_size=16,
        mode="RGB",
        test_fraction=0.0,
        workers=1,
        max_pixels=1_000_000,
        **kw,
    )


def test_mixed_folder_ingests_good_files_and_counts_bad_ones(tmp_path, caplog):
    root = tmp_path / "photos"
    root.mkdir()
    n_good = make_folder(root)
    manifests = ingest(_config(root, tmp_path / "out"), progress=False)
    m = read_manifest(str(tmp_path / "out/train"))
    assert m.count == n_good == 10
    assert m.stats["skipped"] == BAD
    assert m.stats["mode"] == "RGB" and (m.stats["width"], m.stats["height"]) == (16, 16)
    assert manifests["train"].count == n_good
    samples = []
    for shard in m.shards:
        path = tmp_path / "out/train" / shard.name
        with open(path, "rb") as f:
            samples += list(tar_samples(f, str(path)))
    assert len(samples) == n_good
    assert all(Image.open(io.BytesIO(s["png"])).size == (16, 16) for s in samples)
    for reason in BAD:
        assert any(reason in r.getMessage() for r in caplog.records), reason
    # the rerun skips the finished split instead of rewriting it
    before = {s.name: s.sha256 for s in m.shards}
    ingest(_config(root, tmp_path / "out"), progress=False)
    assert {s.name: s.sha256 for s in read_manifest(str(tmp_path / "out/train")).shards} == before


def test_bad_file_budget_ends_the_ingest_with_one_line(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    make_folder(root)
    with pytest.raises(DataError, match=r"more than ingest.max_bad_files=2 unreadable files"):
        ingest(_config(root, tmp_path / "out", max_bad_files=2), progress=False)


def test_sixteen_bit_is_scaled_not_clipped_and_alpha_goes_white(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    make_folder(root)
    src = ImageFolder(_config(root, tmp_path / "o"))
    index = {src.names[j]: i for i, j in enumerate(src.index["train"])}
    image, _ = load_checked(src, "train", index["b/sixteen.png"], "k", 10**6)
    assert np.asarray(prepare(image, 0, "")).max() == 128  # 32896 / 257, not 255
    image, _ = load_checked(src, "train", index["a/rgba.png"], "k", 10**6)
    assert np.asarray(prepare(image, 0, "RGB")).min() == 255  # fully transparent -> white
    image, _ = load_checked(src, "train", index["b/rotated.jpg"], "k", 10**6)
    assert image.size == (10, 20)  # EXIF orientation applied
    bad = load_checked(src, "train", index["b/empty.jpg"], "k", 10**6)
    assert isinstance(bad, Skipped) and bad.reason == "empty" and bad.name.endswith("empty.jpg")
