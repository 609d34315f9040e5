"""Remote shards are fetched ahead of the one being decoded, with bounded memory, through one
S3 client per loader worker, against the real SeaweedFS; the epoch is the same sample for
sample as without prefetch."""

from __future__ import annotations

import io
import os
import threading

import pytest

from pipeline import storage
from pipeline.data.config import StreamConfig
from pipeline.data.fetch import READ_AHEAD_CHUNKS, READ_CHUNK, ReadAhead, ShardFiles
from pipeline.data.iostats import IOStats
from pipeline.data.manifest import read_manifest
from pipeline.data.stream import ShardStream, make_loader
from tests.helpers import synthetic_split_on_s3, wait_for

COUNT, SHARD, BATCH = 120, 20, 8  # 6 shards of ~60 KB; 15 batches


@pytest.fixture(scope="module")
def split_url(s3):
    return synthetic_split_on_s3(s3, "prefetch", COUNT, SHARD)


def run(
    url: str, workers: int, epoch: int = 0, shuffle: bool = True, **cfg
) -> tuple[list[dict], dict]:
    config = StreamConfig(train_url=url, **{"shuffle_buffer": 16, **cfg})
    stream = ShardStream(config, rank=0, world_size=1, batch_size=BATCH, shuffle=shuffle)
    stream.set_epoch(epoch)
    return list(make_loader(stream, num_workers=workers)), stream.stats()


def test_prefetch_in_order_opens_each_shard_once_ahead_of_use(s3_env, split_url):
    # unshuffled, 2 workers: 15 batches split 7 + 8, so worker 0 takes samples 0-55
    # (shards 0-2), worker 1 56-119 (shards 2-5)
    sizes = [s.bytes for s in read_manifest(split_url).shards]
    visits = {0: [0, 1, 2], 1: [2, 3, 4, 5]}
    for prefetch in (1, 2):
        batches, stats = run(split_url, 2, shuffle=False, prefetch_shards=prefetch)
        assert len(batches) == COUNT // BATCH
        io_ = stats["io_by_worker"]
        assert sorted(io_) == [0, 1]
        for w, shards in visits.items():
            assert io_[w]["s3_clients"] == 1  # one S3 client in the worker, for 3 or 4 shards
            # built on the S3 models the forkserver parsed once (pipeline.data.preload)
            assert io_[w]["s3_clients_preloaded"] == 1
            assert io_[w]["opened"] == len(shards)  # each shard opened once
            # how many were opened ahead of use depends on when each stream read its last
            # byte (test_a_prefetched_stream_waits_for_the_one_before_it pins the order)
            assert io_[w].get("prefetched", 0) <= len(shards) - 1
            assert io_[w]["max_open"] <= min(1 + prefetch, len(shards))
            assert io_[w]["remote_bytes"] == sum(sizes[i] for i in shards)


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetch_changes_nothing_in_the_epoch(s3_env, split_url, workers):
    plain, plain_stats = run(split_url, workers, epoch=1, prefetch_shards=0)
    ahead, ahead_stats = run(split_url, workers, epoch=1, prefetch_shards=2)
    assert [b["key"] for b in ahead] == [b["key"] for b in plain]
    assert all(a["image"].equal(p["image"]) for a, p in zip(ahead, plain))
    assert ahead_stats["bad_samples"] == plain_stats["bad_samples"] == 0
    for w, counters in ahead_stats["io_by_worker"].items():
        without = plain_stats["io_by_worker"][w]
        assert "prefetched" not in without
        # shuffled: the same shard visits, each opened once, all but the first ahead
        assert counters["opened"] == without["opened"]
        assert counters.get("prefetched", 0) <= counters["opened"] - 1
        assert without["max_open"] == 1 and counters["max_open"] <= min(3, counters["opened"])


def test_one_s3_client_per_process_reused_for_every_shard(s3_env, split_url):
    storage.get_fs(split_url)  # this process's S3 filesystem for these options
    storage.open_object(split_url + "/manifest.json")  # and its client for shard reads
    before = storage.clients_created()
    batches, stats = run(split_url, 0, prefetch_shards=1)
    assert len(batches) == COUNT // BATCH
    assert stats["io_by_worker"][0]["opened"] >= 6
    assert storage.clients_created() == before  # 6+ shards, threads: no new client


def test_resume_with_prefetch_is_exact(s3_env, split_url):
    full, _ = run(split_url, 2, prefetch_shards=1)
    config = StreamConfig(train_url=split_url, shuffle_buffer=16, prefetch_shards=1)
    stream = ShardStream(config, rank=0, world_size=1, batch_size=BATCH)
    loader = make_loader(stream, num_workers=2)
    head = [b["key"] for _, b in zip(range(5), loader)]
    restored = ShardStream(config, rank=0, world_size=1, batch_size=BATCH)
    restored.load_state_dict(loader.state_dict())
    rest = [b["key"] for b in make_loader(restored, num_workers=2)]
    assert head + rest == [b["key"] for b in full]


def test_a_prefetched_stream_waits_for_the_one_before_it(s3_env):
    # shard 0 is larger than one stream reads ahead (17 MiB): until its reader takes the
    # bytes, shard 1's GET is not sent; once shard 0's last byte is read, it is
    bucket = s3_env.make_bucket("prefetch-order")
    big, small = os.urandom(READ_CHUNK * (READ_AHEAD_CHUNKS + 4)), os.urandom(5000)
    urls = [f"{bucket}/big.tar", f"{bucket}/small.tar"]
    for url, data in zip(urls, (big, small)):
        with storage.open_url(url, "wb") as f:
            f.write(data)
    files = ShardFiles(urls, [len(big), len(small)], None, None, prefetch=1)
    try:
        first = files.open(0)
        files.prefetch(1, 100, 4000)
        wait_for(lambda: first.q.full(), 10, "shard 0's read-ahead to fill")
        files.poll()
        assert files.stats.snapshot()["opened"] == 1 and list(files.deferred) == [1]
        assert not first.fetched.is_set()
        assert first.read() == big
        files.poll()
        counts = files.stats.snapshot()
        assert (counts["opened"], counts["prefetched"], files.deferred) == (2, 1, {})
        second = files.open(1, 100, 4000)  # the stream opened ahead, bytes 100-3999 only
        assert second.read() == small[100:4000]
        assert files.stats.snapshot()["opened"] == 2
        assert files.stats.snapshot()["remote_bytes"] == len(big) + 3900
        second.close()
        # asked for another span than was fetched ahead: that one is dropped, this one read
        files.prefetch(1, 0, 10)
        files.poll()
        third = files.open(1, 0, 20)
        assert third.read() == small[:20] and files.stats.snapshot()["opened"] == 4
        third.close()
        first.close()
    finally:
        files.close()


class SlowFile(io.RawIOBase):
    """An endless file counting its reads."""

    def __init__(self):
        self.reads = 0
        self.lock = threading.Lock()

    def read(self, n: int = -1) -> bytes:
        with self.lock:
            self.reads += 1
        return b"x" * n


def test_read_ahead_holds_at_most_depth_plus_one_chunks():
    f, stats = SlowFile(), IOStats()
    ahead = ReadAhead(f, chunk=1000, depth=4, stats=stats)
    try:
        wait_for(lambda: ahead.q.full() and f.reads == 5, 10, "the queue to fill")
        # the thread holds chunk 5 in a blocked put: nothing more is read until one is taken
        assert ahead.thread.is_alive() and f.reads == 5
        assert stats.snapshot()["remote_bytes"] == 5000
        assert len(ahead.read(1000)) == 1000
        wait_for(lambda: f.reads == 6 and ahead.q.full(), 10, "one more chunk")
        assert f.reads == 6
    finally:
        ahead.close()
