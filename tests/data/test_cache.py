"""The local shard cache against the real SeaweedFS: a second epoch reads nothing from S3
(the S3 endpoint is gone by then), the folder never holds more than its bound, the samples
are byte-identical to uncached ones, and a download killed midway is never trusted."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading

import pytest

from pipeline.data.cache import LOCK_NAME, CacheRejected, ShardCache
from pipeline.data.config import StreamConfig
from pipeline.data.manifest import read_manifest
from pipeline.data.stream import ShardStream, make_loader
from pipeline.errors import ConfigError
from tests.data.s3proxy import CountingProxy
from tests.helpers import ROOT, synthetic_split_on_s3, wait_for

COUNT, SHARD, BATCH = 120, 20, 8  # 6 shards of 51,200 bytes; 15 batches


@pytest.fixture(scope="module")
def split_url(s3):
    return synthetic_split_on_s3(s3, "cache", COUNT, SHARD)


@pytest.fixture
def via_proxy(s3_env, monkeypatch):
    proxy = CountingProxy(s3_env.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.stop()


def stream_of(url: str, shuffle: bool = True, **cfg) -> ShardStream:
    config = StreamConfig(train_url=url, **{"shuffle_buffer": 16, **cfg})
    return ShardStream(config, rank=0, world_size=1, batch_size=BATCH, shuffle=shuffle)


def files_in(folder) -> dict[str, int]:
    out = {}
    for entry in os.scandir(folder):
        try:
            out[entry.name] = entry.stat().st_size
        except FileNotFoundError:  # evicted or published while listed
            continue
    out.pop(LOCK_NAME, None)
    return out


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return [x["key"] for x in a] == [x["key"] for x in b] and all(
        x["image"].equal(y["image"]) and x["label"].equal(y["label"]) for x, y in zip(a, b)
    )


def total(stats: dict, key: str) -> int:
    return sum(c.get(key, 0) for c in stats["io_by_worker"].values())


@pytest.mark.parametrize("workers", [0, 2])
def test_second_epoch_reads_nothing_from_s3(split_url, via_proxy, tmp_path, workers):
    shards = read_manifest(split_url).shards
    size = shards[0].bytes
    assert {s.bytes for s in shards} == {size}  # 6 equal shards (tar records of 10,240 B)
    reference = stream_of(split_url)  # uncached, through the proxy too
    expected, visits = [], []
    for _ in range(2):
        expected.append(list(make_loader(reference, num_workers=workers)))
        visits.append(total(reference.stats(), "opened"))  # shard visits over the workers

    stream = stream_of(split_url, cache_dir=str(tmp_path / "c"), cache_max_bytes=6 * size)
    loader = make_loader(stream, num_workers=workers)
    before = via_proxy.snapshot()
    first = list(loader)
    after_first = via_proxy.snapshot()
    # epoch 0 fetched every shard whole and published it under its sha256; with 2 workers a
    # shard both visit may be fetched by both (each visit is a hit or a fetch)
    stats0 = stream.stats()
    fetched = total(stats0, "cache_misses")
    assert files_in(tmp_path / "c") == {f"{s.sha256}.tar": s.bytes for s in shards}
    assert fetched + total(stats0, "cache_hits") == visits[0]
    assert len(shards) <= fetched and (workers or fetched == len(shards))
    assert total(stats0, "opened") == fetched == after_first[2] - before[2]  # one GET each
    assert total(stats0, "remote_bytes") == fetched * size <= after_first[0] - before[0]
    for path in (tmp_path / "c").iterdir():
        if path.name != LOCK_NAME:
            assert hashlib.sha256(path.read_bytes()).hexdigest() + ".tar" == path.name

    via_proxy.stop()  # S3 is gone for this process and its loader workers
    second = list(loader)
    assert stream.epoch == 1
    assert via_proxy.snapshot() == after_first  # not one byte, not one request more
    stats1 = stream.stats()
    assert total(stats1, "remote_bytes") == total(stats1, "opened") == 0
    assert total(stats1, "cache_hits") == visits[1] and total(stats1, "cache_misses") == 0
    assert same_batches(first, expected[0]) and same_batches(second, expected[1])


def test_cache_never_exceeds_its_bound(split_url, s3_env, tmp_path):
    shards = read_manifest(split_url).shards
    bound = 2 * max(s.bytes for s in shards) + min(s.bytes for s in shards) // 2  # 2.5 shards
    folder = tmp_path / "c"
    folder.mkdir()
    peak, done = [0], threading.Event()

    def watch():  # sample the folder as the reader fills it
        while not done.is_set():
            peak[0] = max(peak[0], sum(files_in(folder).values()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cached = stream_of(split_url, shuffle=False, cache_dir=str(folder), cache_max_bytes=bound)
    plain = stream_of(split_url, shuffle=False)
    try:
        for epoch in range(2):
            got = list(make_loader(cached, num_workers=0))
            assert same_batches(got, list(make_loader(plain, num_workers=0)))
            io = cached.stats()["io_by_worker"][0]
            # in order over 6 shards with room for 2: least recently used is always next
            assert io["cache_misses"] == 6 and io.get("cache_hits", 0) == 0
            assert io["cache_evicted"] == (4 if epoch == 0 else 6)
            assert io.get("cache_bypass", 0) == 0 and io["remote_bytes"] == 6 * shards[0].bytes
            assert files_in(folder) == {f"{s.sha256}.tar": s.bytes for s in shards[4:]}
    finally:
        done.set()
        watcher.join()
    assert 0 < peak[0] <= bound


def test_a_shard_larger_than_the_cache_is_streamed(split_url, s3_env, tmp_path):
    stream = stream_of(split_url, cache_dir=str(tmp_path / "c"), cache_max_bytes=1000)
    got = list(make_loader(stream, num_workers=0))
    assert same_batches(got, list(make_loader(stream_of(split_url), num_workers=0)))
    io = stream.stats()["io_by_worker"][0]
    assert io["cache_bypass"] == io["opened"] and files_in(tmp_path / "c") == {}


def test_bytes_unlike_the_manifest_are_never_published(split_url, s3_env, tmp_path):
    shard = read_manifest(split_url).shards[0]
    url = f"{split_url}/{shard.name}"
    cache = ShardCache(str(tmp_path), 10 * shard.bytes)
    with pytest.raises(CacheRejected, match="sha256"):
        cache.fill(url, shard.bytes, "0" * 64)
    longer = shard.bytes + 100
    with pytest.raises(CacheRejected, match=f"{shard.bytes} bytes, manifest says {longer} bytes"):
        cache.fill(url, longer, shard.sha256)
    assert files_in(tmp_path) == {}
    assert cache.stats.snapshot()["cache_rejected"] == 2
    # a final name holding the wrong bytes count is a miss, removed, and fetched again
    (tmp_path / f"{shard.sha256}.tar").write_bytes(b"x" * 10)
    assert cache.lookup(url, shard.bytes, shard.sha256) is None
    assert files_in(tmp_path) == {}
    with cache.fill(url, shard.bytes, shard.sha256) as f:
        assert hashlib.sha256(f.read()).hexdigest() == shard.sha256


KILLED_FILL = """
import sys
from pipeline.data.cache import ShardCache
url, size, sha, root = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ShardCache(root, 10 * size).fill(url, size, sha)
"""


def test_a_download_killed_midway_is_never_trusted(split_url, s3_env, tmp_path, monkeypatch):
    shard = read_manifest(split_url).shards[1]
    url, folder = f"{split_url}/{shard.name}", tmp_path / "c"
    proxy = CountingProxy(s3_env.endpoint_url, hold_after=20_000)  # the response stalls
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_FILL, url, str(shard.bytes), shard.sha256, str(folder)],
        env=env,
    )
    try:
        # its reservation exists, sized to the shard, and the download is under way
        wait_for(lambda: len(files_in(folder)) == 1 if folder.exists() else False, 60, "a temp")
        wait_for(lambda: proxy.snapshot()[2] == 1, 60, "the GET")
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        child.kill()
        proxy.stop()
    ((name, size),) = files_in(folder).items()
    assert name.startswith(f".{shard.sha256}.tar.tmp-") and size == shard.bytes
    cache = ShardCache(str(folder), 10 * shard.bytes)
    assert cache.lookup(url, shard.bytes, shard.sha256) is None  # the temp is not a hit
    # the next process finds the temp unlocked (its writer is dead) and removes it
    with cache.fill(url, shard.bytes, shard.sha256) as f:
        assert hashlib.sha256(f.read()).hexdigest() == shard.sha256
    assert files_in(folder) == {f"{shard.sha256}.tar": shard.bytes}


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"cache_dir": "/tmp/x"}, "cache_max_bytes: required (> 0) with cache_dir"),
        ({"cache_max_bytes": 10}, "cache_max_bytes: set cache_dir too, or leave it 0"),
        ({"cache_dir": "s3://b/c", "cache_max_bytes": 10}, "cache_dir: must be a local folder"),
        ({"prefetch_shards": 9}, "prefetch_shards: must be in 0..8, got 9"),
        ({"cache_dir": "/tmp/x", "cache_max_bytes": -1}, "cache_max_bytes: must be >= 0, got -1"),
    ],
)
def test_bad_cache_settings_are_one_line_config_errors(cfg, message):
    with pytest.raises(ConfigError) as e:
        StreamConfig(train_url="s3://b/train", **cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_shard_another_worker_is_fetching_or_has_published_evicts_nothing(tmp_path):
    """Two loader workers missing the same shard at once: the second neither downloads a
    duplicate into the cache (which would evict another shard to make room) nor evicts
    anything; a shard published since its lookup missed is a hit."""
    import fcntl

    from pipeline import storage

    cache = ShardCache(str(tmp_path), max_bytes=3 * 100)
    for name in ("a", "b", "c"):  # full: three 100-byte shards
        (tmp_path / f"{name}.tar").write_bytes(b"x" * 100)
    in_flight = tmp_path / f".d.tar{storage.TMP_MARK}0123"
    fd = os.open(in_flight, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live download of shard "d" (another worker's)
    try:
        assert cache.fill("s3://never/fetched", 100, "d") is None  # streamed, not cached
    finally:
        os.close(fd)
    assert sorted(files_in(tmp_path)) == [in_flight.name, "a.tar", "b.tar", "c.tar"]
    assert cache.stats.snapshot().get("cache_evicted", 0) == 0
    assert cache.stats.snapshot()["cache_bypass"] == 1

    cache.stats.add("cache_misses")  # what lookup counted before another worker published
    with cache.fill("s3://never/fetched", 100, "b") as f:  # published meanwhile: a hit
        assert f.read() == b"x" * 100
    counts = cache.stats.snapshot()
    assert (counts["cache_misses"], counts["cache_hits"], counts.get("opened", 0)) == (0, 1, 0)
    assert sorted(files_in(tmp_path))[1:] == ["a.tar", "b.tar", "c.tar"]
