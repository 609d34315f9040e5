"""Ingest: Fashion-MNIST into a real S3 server byte for byte; folders, archives, synthetic."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data.config import IngestConfig, StreamConfig
from pipeline.data.errors import DataError
from pipeline.data.ingest import ingest
from pipeline.data.manifest import read_manifest
from pipeline.data.shards import tar_samples
from pipeline.data.sources import FashionMNIST, synthetic_image
from pipeline.data.stream import ShardStream, make_loader

LIMIT = 600
SHARD = 128


def shard_members(url: str, data: bytes) -> list[dict]:
    return list(tar_samples(io.BytesIO(data), url))


def test_fashion_mnist_into_s3_is_exact(s3_env, caplog):
    out = s3_env.make_bucket("ingest-fmnist") + f"/{uuid.uuid4().hex}"
    config = IngestConfig(
        output_url=out, source="fashion_mnist", limit=LIMIT, shard_samples=SHARD, workers=2
    )
    manifests = ingest(config, progress=False)
    fm = FashionMNIST()
    for split in ("train", "test"):
        m = read_manifest(storage.join(out, split))
        assert m.count == LIMIT == manifests[split].count
        assert [s.samples for s in m.shards] == [128, 128, 128, 128, 88]
        assert storage.listdir(storage.join(out, split)) == sorted(
            ["manifest.json"] + [s.name for s in m.shards]
        )  # no temp keys left
        images, labels = fm.arrays(split)
        seen = []
        for info in m.shards:
            data = storage.read_bytes(m.shard_url(m.shards.index(info)))
            assert len(data) == info.bytes
            assert hashlib.sha256(data).hexdigest() == info.sha256
            samples = shard_members(info.name, data)
            assert len(samples) == info.samples
            for sample in samples:
                i = int(sample["__key__"].split("-")[1])
                assert sample["__key__"] == f"{split}-{i:08d}"
                pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
                assert pixels.dtype == np.uint8 and pixels.tobytes() == images[i].tobytes()
                assert int(sample["cls"]) == labels[i]
                seen.append(i)
        assert sorted(seen) == list(range(LIMIT))
        subset = images[:LIMIT].astype(np.float64) / 255
        assert m.stats["width"] == m.stats["height"] == 28 and m.stats["mode"] == "L"
        assert m.stats["mean"] == [pytest.approx(subset.mean(), abs=1e-6)]
        assert m.stats["std"] == [pytest.approx(subset.std(), abs=1e-6)]

    before = storage.read_bytes(storage.join(out, "train", "manifest.json"))
    with caplog.at_level(logging.INFO, logger="pipeline.data.ingest"):
        ingest(config, progress=False)
    assert "skip train" in caplog.text and "already matches this config" in caplog.text
    assert storage.read_bytes(storage.join(out, "train", "manifest.json")) == before

    # the same pixels come out of the S3 stream, split over 2 ranks x 2 workers
    images, _ = fm.arrays("train")
    streamed = 0
    for rank in range(2):
        s = ShardStream(
            StreamConfig(train_url=f"{out}/train"), rank=rank, world_size=2, batch_size=50
        )
        for batch in make_loader(s, num_workers=2):
            for key, x in zip(batch["key"], batch["image"]):
                i = int(key.split("-")[1])
                assert np.array_equal((x[0] * 255).round().byte().numpy(), images[i])
                streamed += 1
    assert streamed == 600  # 600 = 2 ranks x 6 batches x 50, nothing dropped


def _png(path: Path, size: tuple[int, int], color, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def test_folder_with_class_subfolders_cut_by_bytes(tmp_path):
    src = tmp_path / "src"
    for i in range(12):
        cls = ["cat", "dog"][i % 2]
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
        _png(
            src / cls / ("deep" if i % 4 == 0 else "") / f"{i}.{ext}",
            (20 + i, 30),
            (10 * i, 0, 0),
            fmt,
        )
    (src / "cat" / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    config = IngestConfig(
        output_url=str(out),
        source="folder",
        source_path=str(src),
        image_size=16,
        mode="RGB",
        encoding="jpeg",
        jpeg_quality=90,
        shard_bytes=24000,
        test_fraction=0.25,
        workers=1,
    )
    manifests = ingest(config, progress=False)
    train, test = manifests["train"], manifests["test"]
    assert (train.count, test.count) == (9, 3)
    assert train.stats["classes"] == ["cat", "dog"]
    assert (train.stats["width"], train.stats["height"], train.stats["mode"]) == (16, 16, "RGB")
    assert len(train.shards) > 1 and all(s.bytes <= 24000 for s in train.shards)
    labels = {}
    for m in manifests.values():
        for i in range(len(m.shards)):
            for sample in shard_members(m.shards[i].name, Path(m.shard_url(i)).read_bytes()):
                assert Image.open(io.BytesIO(sample["jpg"])).size == (16, 16)
                labels[sample["__key__"]] = int(sample["cls"])
    assert len(labels) == 12 and sorted(set(labels.values())) == [0, 1]


@pytest.mark.parametrize("bad_name", ["../x.png", "/abs/x.png", "ok/../../x.png"])
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_rejects_unsafe_member_names(tmp_path, bad_name, kind):
    good = io.BytesIO()
    Image.new("L", (4, 4)).save(good, format="PNG")
    path = tmp_path / f"a.{kind}"
    if kind == "tar":
        with tarfile.open(path, "w") as t:
            for name in ("data/a/1.png", bad_name):
                info = tarfile.TarInfo(name)
                info.size = len(good.getvalue())
                t.addfile(info, io.BytesIO(good.getvalue()))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("data/a/1.png", good.getvalue())
            z.writestr(bad_name, good.getvalue())
    config = IngestConfig(
        output_url=str(tmp_path / "out"), source="archive", source_path=str(path), workers=1
    )
    with pytest.raises(DataError, match=f"unsafe member name '{bad_name}'"):
        ingest(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_zip_archive_labels_from_folders(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("L", (8, 8), 40 * i).save(buf, format="PNG")
            z.writestr(f"data/{'ab'[i % 2]}/{i}.png", buf.getvalue())
    manifests = ingest(
        IngestConfig(
            output_url=str(tmp_path / "out"),
            source="archive",
            source_path=str(path),
            test_fraction=0.0,
            workers=2,
        ),
        progress=False,
    )
    m = manifests["train"]
    assert m.count == 6 and m.stats["classes"] == ["a", "b"] and list(manifests) == ["train"]
    samples = shard_members("s", Path(m.shard_url(0)).read_bytes())
    by_key = {s["__key__"]: s for s in samples}
    for i in range(6):  # sorted names: data/a/0, 2, 4 then data/b/1, 3, 5
        sample = by_key[f"train-{[0, 2, 4, 1, 3, 5].index(i):08d}"]
        assert int(sample["cls"]) == i % 2
        assert np.asarray(Image.open(io.BytesIO(sample["png"]))).max() == 40 * i


def test_changed_config_rewrites_and_removes_stale_shards(tmp_path):
    out = str(tmp_path / "out")
    base = dict(
        output_url=out,
        source="synthetic",
        synthetic_count=100,
        synthetic_size=8,
        test_fraction=0.0,
        workers=1,
    )
    first = ingest(IngestConfig(**base, shard_samples=20), progress=False)["train"]
    assert len(first.shards) == 5
    second = ingest(IngestConfig(**base, shard_samples=40), progress=False)["train"]
    assert [s.samples for s in second.shards] == [40, 40, 20]
    assert storage.listdir(f"{out}/train") == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert (
        json.loads(Path(out, "train", "manifest.json").read_text())["ingest"]["shard_samples"] == 40
    )


def test_synthetic_images_are_deterministic_and_structured():
    a, label_a = synthetic_image(3, 32, "RGB", seed=0)
    b, label_b = synthetic_image(3, 32, "RGB", seed=0)
    c, _ = synthetic_image(4, 32, "RGB", seed=0)
    assert a.tobytes() == b.tobytes() and label_a == label_b
    assert a.tobytes() != c.tobytes()
    x = np.asarray(a, dtype=np.float64)
    # smooth almost everywhere (gradient + one solid shape): unlike noise, most neighbouring
    # pixels differ by little and a few (the shape's edge) differ a lot
    steps = np.abs(np.diff(x, axis=1)).max(axis=-1)
    assert (steps < 8).mean() > 0.85 and steps.max() > 40
    labels = {synthetic_image(i, 8, "L", seed=1)[1] for i in range(40)}
    assert labels == {0, 1, 2, 3, 4}
