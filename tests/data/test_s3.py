"""Streaming from a real SeaweedFS S3 server through real network faults: connections cut
mid-response by a TCP proxy are retried (the rest of the object asked for again, or the shard
reopened and skipped to the sample), and a shard that stays unreadable is counted and ends the
run within a bounded time, never a hang."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from urllib.parse import urlparse

import pytest

from pipeline.data.config import StreamConfig
from pipeline.data.manifest import read_manifest
from pipeline.data.stream import ShardStream, make_loader
from pipeline.storage import StorageError
from tests.helpers import synthetic_split_on_s3

COUNT, SHARD, BATCH = 120, 40, 8  # 3 shards of ~100 KB


class CuttingProxy:
    """A TCP proxy to the S3 endpoint that cuts the next ``cuts`` responses after
    ``cut_after`` bytes of a connection, then forwards faithfully."""

    def __init__(self, upstream: str, cut_after: int, cuts: int):
        url = urlparse(upstream)
        self.upstream = (url.hostname, url.port)
        self.cut_after, self.cuts_left, self.cuts_done = cut_after, cuts, 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take_cut(self) -> bool:
        with self.lock:
            if self.cuts_left <= 0:
                return False
            self.cuts_left -= 1
            self.cuts_done += 1
            return True

    def _serve(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError), client, socket.create_connection(self.upstream) as up:
            threading.Thread(target=self._pump, args=(client, up), daemon=True).start()
            sent = 0
            while data := up.recv(65536):
                if sent + len(data) > self.cut_after and self._take_cut():
                    client.sendall(data[: max(0, self.cut_after - sent)])
                    client.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(data)
                sent += len(data)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def s3_split(s3):
    return synthetic_split_on_s3(s3, "stream-faults", COUNT, SHARD)


def epoch(url: str, workers: int, **cfg) -> tuple[list[dict], dict]:
    config = StreamConfig(
        train_url=url, **{"shuffle_buffer": 16, "retries": 3, "retry_backoff": 0.01, **cfg}
    )
    stream = ShardStream(config, rank=0, world_size=1, batch_size=BATCH)
    return list(make_loader(stream, num_workers=workers)), stream.stats()


def test_s3_epoch_equals_itself_across_worker_counts(s3_env, s3_split):
    reference, stats = epoch(s3_split, 0)
    assert len(reference) == COUNT // BATCH and stats["bad_samples"] == 0
    with_workers, _ = epoch(s3_split, 2)
    keys = sorted(k for b in with_workers for k in b["key"])
    assert keys == sorted(k for b in reference for k in b["key"]) and len(set(keys)) == COUNT


@pytest.mark.parametrize(
    "cut_after, cuts, prefetch",
    [
        (30_000, 8, 0),  # cut mid-body: the stream asks for the rest (Range), no reopen
        # cut before any byte, 12 times: a stream's 5 GETs (botocore's config tries each
        # twice) outlast 10 cuts, then the reader reopens the shard
        (0, 12, 0),
        (0, 12, 1),  # with a shard prefetched: two streams may share the cuts; data intact
    ],
)
def test_cut_connections_are_retried_and_data_is_intact(
    s3_env, s3_split, monkeypatch, caplog, cut_after, cuts, prefetch
):
    reference, _ = epoch(s3_split, 0)
    sizes = sum(s.bytes for s in read_manifest(s3_split).shards)
    config = StreamConfig(
        train_url=s3_split,
        shuffle_buffer=16,
        retries=3,
        retry_backoff=0.01,
        prefetch_shards=prefetch,
    )
    stream = ShardStream(config, rank=0, world_size=1, batch_size=BATCH)  # reads the manifest
    proxy = CuttingProxy(s3_env.endpoint_url, cut_after=cut_after, cuts=cuts)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the shard reads go through the proxy
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.data.shards"):
            batches, stats = list(make_loader(stream, num_workers=0)), stream.stats()
    finally:
        proxy.close()
    assert proxy.cuts_done == cuts
    if cut_after:  # every byte read once: resumed where each cut fell
        assert "reopening at sample" not in caplog.text
        assert stats["io_by_worker"][0]["remote_bytes"] == sizes
    elif prefetch == 0:
        assert "reopening at sample" in caplog.text
    assert stats["bad_samples"] == 0
    assert [b["key"] for b in batches] == [b["key"] for b in reference]
    for got, want in zip(batches, reference):
        assert got["image"].equal(want["image"])


def test_unreadable_shards_end_the_run_in_bounded_time(s3_env, s3_split, monkeypatch):
    config = StreamConfig(
        train_url=s3_split, shuffle_buffer=16, retries=1, retry_backoff=0.01, max_bad_samples=10**6
    )
    stream = ShardStream(config, rank=0, world_size=1, batch_size=BATCH)  # reads the manifest
    # every response cut before its first byte: no GET makes progress
    proxy = CuttingProxy(s3_env.endpoint_url, cut_after=0, cuts=10**9)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    t0 = time.monotonic()
    try:
        # an outage is not bad data: it ends the run naming the shard and the endpoint
        with pytest.raises(
            StorageError,
            match=r"s3://.*shard-00000\d\.tar: storage unreachable " + re.escape(f"at {proxy.url}"),
        ):
            list(make_loader(stream, num_workers=0))
    finally:
        proxy.close()
    assert time.monotonic() - t0 < 60
