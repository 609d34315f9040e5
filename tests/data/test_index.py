"""The shard index: ingest records where samples start inside each shard, and a loader
worker whose work starts inside a shard opens it there (a ranged GET on S3, a seek locally)
instead of reading the shard from its first byte; the epoch is the same byte for byte."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import uuid

import pytest

from pipeline import storage
from pipeline.data import ingest as ingest_module
from pipeline.data.config import StreamConfig
from pipeline.data.errors import DataError
from pipeline.data.manifest import Manifest, read_manifest
from pipeline.data.shards import ShardReader, Visit, tar_samples
from pipeline.data.stream import ShardStream, make_loader
from tests.helpers import synthetic_split

COUNT, BATCH = 96, 8  # one shard; unshuffled at 2 loader workers: samples 0-47 and 48-95
INDEX_BYTES = 16 << 10  # ~5 samples of 32x32 RGB PNG between index pairs


def ingest_one_shard(url: str, monkeypatch) -> str:
    monkeypatch.setattr(ingest_module, "INDEX_BYTES", INDEX_BYTES)
    return synthetic_split(url, COUNT, COUNT)


def expected_index(data: bytes) -> list[tuple[int, int]]:
    """What the index must be, from tarfile's own member offsets: a pair at each sample whose
    header is INDEX_BYTES or more past the last pair's."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        starts = [m.offset for m in tar.getmembers() if m.name.endswith(".png")]
    index, last = [], 0
    for sample, offset in enumerate(starts):
        if offset - last >= INDEX_BYTES:
            index.append((sample, offset))
            last = offset
    return index


def test_ingest_indexes_each_shard_at_sample_headers(tmp_path, monkeypatch):
    split = ingest_one_shard(str(tmp_path / "ds"), monkeypatch)
    manifest = read_manifest(split)
    (info,) = manifest.shards
    data = (tmp_path / "ds" / "train" / info.name).read_bytes()
    assert list(info.index) == expected_index(data)
    assert 12 <= len(info.index) <= 24  # ~20 pairs for ~300 KB (the test means something)
    keys = [s["__key__"] for s in tar_samples(io.BytesIO(data), info.name)]
    for sample, offset in info.index:  # the tar read from each offset starts at its sample
        rest = [s["__key__"] for s in tar_samples(io.BytesIO(data[offset:]), info.name)]
        assert rest == keys[sample:]


def read_epoch(split: str, workers: int, without_index: bool, **cfg) -> tuple[list, dict]:
    config = StreamConfig(train_url=split, **cfg)
    stream = ShardStream(config, rank=0, world_size=1, batch_size=BATCH, shuffle=False)
    if without_index:  # as a manifest written before the index
        shards = [dataclasses.replace(s, index=()) for s in stream.manifest.shards]
        stream.manifest.shards = shards
    stream.set_epoch(0)
    return list(make_loader(stream, num_workers=workers)), stream.stats()


@pytest.mark.parametrize("where", ["s3", "local", "s3-cached"])
def test_a_worker_starting_inside_a_shard_opens_it_at_the_index(
    where, s3_env, tmp_path, monkeypatch
):
    if where == "local":
        base = str(tmp_path / "ds")
    else:
        base = s3_env.make_bucket("index") + f"/{uuid.uuid4().hex}"
    split = ingest_one_shard(base, monkeypatch)
    (info,) = read_manifest(split).shards
    cached = {"cache_dir": str(tmp_path / "cache"), "cache_max_bytes": 10 << 20}
    cfg = cached if where == "s3-cached" else {}
    plain, plain_stats = read_epoch(split, 2, without_index=True, **cfg)
    indexed, stats = read_epoch(split, 2, without_index=False, **cfg)
    assert len(indexed) == COUNT // BATCH
    assert [b["key"] for b in indexed] == [b["key"] for b in plain]
    assert all(a["image"].equal(b["image"]) for a, b in zip(indexed, plain))
    first, offset = max(p for p in info.index if p[0] <= COUNT // 2)
    assert 40 < first <= 48 and offset > 0
    io_ = stats["io_by_worker"]
    assert "opened_inside" not in io_[0] and "opened_inside" not in plain_stats["io_by_worker"][1]
    assert io_[1]["opened_inside"] == 1 and io_[1]["bytes_skipped"] == offset
    if where == "s3":  # worker 1 asked for the bytes from the offset on, not the whole shard
        assert plain_stats["io_by_worker"][1]["remote_bytes"] == info.bytes
        assert io_[1]["remote_bytes"] == info.bytes - offset
        # and worker 0 for the bytes up to the first pair past its last sample (47) only
        assert plain_stats["io_by_worker"][0]["remote_bytes"] == info.bytes
        end = min(o for s, o in info.index if s > COUNT // 2 - 1)
        assert 0 < end < info.bytes and io_[0]["remote_bytes"] == end


def test_resume_inside_a_shard_opens_it_at_the_index(s3_env, monkeypatch):
    split = ingest_one_shard(s3_env.make_bucket("index") + f"/{uuid.uuid4().hex}", monkeypatch)
    (info,) = read_manifest(split).shards
    full, _ = read_epoch(split, 0, without_index=False)
    config = StreamConfig(train_url=split)
    stream = ShardStream(config, rank=0, world_size=1, batch_size=BATCH, shuffle=False)
    loader = make_loader(stream, num_workers=0)
    head = [b["key"] for _, b in zip(range(7), loader)]  # samples 0-55
    restored = ShardStream(config, rank=0, world_size=1, batch_size=BATCH, shuffle=False)
    restored.load_state_dict(loader.state_dict())
    rest = [b["key"] for b in make_loader(restored, num_workers=0)]
    assert head + rest == [b["key"] for b in full]
    io_ = restored.stats()["io_by_worker"][0]
    first, offset = max(p for p in info.index if p[0] <= 7 * BATCH)
    assert io_["opened_inside"] == 1 and io_["bytes_skipped"] == offset
    assert io_["remote_bytes"] == info.bytes - offset


def test_manifest_index_round_trips_and_bad_pairs_are_named(tmp_path, monkeypatch):
    split = ingest_one_shard(str(tmp_path / "ds"), monkeypatch)
    text = (tmp_path / "ds" / "train" / "manifest.json").read_text()
    assert Manifest.from_json(text, split).to_json() == text
    doc = json.loads(text)
    old = json.loads(text)
    del old["shards"][0]["index"]  # a manifest written before the index reads as it was
    old_text = json.dumps(old, indent=1) + "\n"
    assert Manifest.from_json(old_text).shards[0].index == ()
    assert Manifest.from_json(old_text).to_json() == old_text
    name = doc["shards"][0]["name"]
    for bad in ([[5, 1000]], [[10, 8192], [8, 16384]], [[0, 0]], [[5, 10**9]]):
        doc["shards"][0]["index"] = bad
        with pytest.raises(DataError, match=f"{name}: index pair"):
            Manifest.from_json(json.dumps(doc), split)


def test_a_read_past_the_visits_last_sample_goes_on_past_the_bounded_get(s3_env, monkeypatch):
    # the schedule says the visit reads samples 3-10: the GET ends at the first index pair
    # past 10; a read of samples 60-62 after it (not the schedule's way) is not a truncated
    # shard but reads on from the index, to the shard's end
    split = ingest_one_shard(s3_env.make_bucket("index") + f"/{uuid.uuid4().hex}", monkeypatch)
    manifest = read_manifest(split)
    (info,) = manifest.shards
    url = manifest.shard_url(0)
    reader = ShardReader(
        [url], [COUNT], sizes=[info.bytes], index=[info.index], schedule=[Visit(0, 3, 10)]
    )
    try:
        head = list(reader.read(0, list(range(3, 11))))
        end = min(o for s, o in info.index if s > 10)
        assert reader.stats.snapshot()["remote_bytes"] == end  # the bounded GET, read whole
        tail = list(reader.read(0, [60, 61, 62]))
    finally:
        reader.close()
    keys = [s["__key__"] for s in tar_samples(storage.open_url(url, "rb"), url)]
    assert [s["__key__"] for s in head + tail] == keys[3:11] + keys[60:63]
    counts = reader.stats.snapshot()
    assert counts["opened"] == 2 and counts["opened_inside"] == 1
    resumed_at = max(o for s, o in info.index if s <= 60)
    assert counts["remote_bytes"] == end + info.bytes - resumed_at
