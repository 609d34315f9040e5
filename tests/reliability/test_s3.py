"""S3 stopped and restarted mid-epoch: reads retry with backoff and the epoch completes with
exactly its samples; S3 down for good: a bounded wait, then an error naming the endpoint.

A dedicated SeaweedFS (own ports, own data dir) is started for this module, stopped and
restarted on the same ports and data dir, and always stopped at the end.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pipeline.data.config import IngestConfig, StreamConfig
from pipeline.data.errors import DataError
from pipeline.data.ingest import ingest
from pipeline.data.stream import ShardStream, make_loader
from pipeline.storage import StorageError
from tests.helpers import RestartableS3, patched_environ

pytestmark = pytest.mark.services  # a SeaweedFS of its own, stopped and restarted

N = 1500  # samples, 15 shards of 100: the stream fetches 500 plan positions at a time
SMALL = 300  # 3 shards of 100, for the outage tests
B = 10


@pytest.fixture(scope="module")
def own_s3():
    state = Path(tempfile.mkdtemp(prefix="pl-s3r-", dir="/tmp"))
    s3 = RestartableS3(state)
    try:
        s3.up()
        with patched_environ(s3.svc.env):
            s3.url = s3.svc.make_bucket("rel-s3") + "/syn"
            for url, count in ((s3.url, N), (f"{s3.url}-small", SMALL)):
                ingest(
                    IngestConfig(
                        output_url=url,
                        source="synthetic",
                        synthetic_count=count,
                        synthetic_size=8,
                        shard_samples=100,
                        test_fraction=0.0,
                        workers=1,
                    ),
                    progress=False,
                )
            yield s3
    finally:
        s3.down()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def s3_up(own_s3, monkeypatch):
    own_s3.up()  # a previous test may have left it stopped
    for k, v in own_s3.svc.env.items():
        monkeypatch.setenv(k, v)
    return own_s3


def stream(url: str, **cfg) -> ShardStream:
    config = StreamConfig(train_url=f"{url}/train", num_workers=0, shuffle_buffer=20, **cfg)
    s = ShardStream(config, rank=0, world_size=1, batch_size=B)
    s.set_epoch(0)
    return s


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_s3_restart_mid_epoch_completes_the_epoch_exactly(s3_up):
    # retry budget 0.5+1+2+4+8+8+8 = 31.5 s of backoff: longer than the restart takes
    s = stream(s3_up.url, retries=7, retry_backoff=0.5)
    keys, restarted = [], threading.Event()

    def restart_later():
        time.sleep(1)
        s3_up.up()
        restarted.set()

    t0 = time.monotonic()
    for i, batch in enumerate(make_loader(s)):
        keys += [k for k, pad in zip(batch["key"], batch["pad"].tolist()) if not pad]
        if i == 5:  # 60 of 1500 samples in; the next fetch starts at plan position 500
            s3_up.down()
            threading.Thread(target=restart_later, daemon=True).start()
    assert restarted.is_set(), "the epoch ended before S3 came back: the outage was not hit"
    assert len(keys) == len(set(keys)) == N  # every sample once, none lost or padded
    stats = s.stats()
    assert stats["batches"] == N // B and stats["bad_samples"] == 0 and stats["padded"] == 0
    assert time.monotonic() - t0 < 120


@pytest.fixture(scope="module")
def streams_then_down(own_s3):
    """Streams over the small split, built (manifest read) while S3 is up; then S3 stops."""
    own_s3.up()
    with patched_environ(own_s3.svc.env):
        url = f"{own_s3.url}-small"
        streams = {
            "default_budget": stream(url, retries=2, retry_backoff=0.2),
            "large_budget": stream(url, retries=1, retry_backoff=0.1, max_bad_samples=SMALL),
        }
        own_s3.down()
        yield own_s3, streams


@pytest.mark.timeout(120)
def test_s3_down_for_good_fails_naming_the_endpoint(streams_then_down, monkeypatch):
    own_s3, streams = streams_then_down
    for k, v in own_s3.svc.env.items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    with pytest.raises((StorageError, DataError)) as err:
        for _ in make_loader(streams["default_budget"]):
            pass
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert own_s3.svc.endpoint_url.removeprefix("http://") in msg and "\n" not in msg, msg
    assert own_s3.svc.secret_key not in msg
    assert elapsed < 60, f"took {elapsed:.0f}s"


@pytest.mark.timeout(120)
def test_s3_outage_is_not_bad_data(streams_then_down, monkeypatch):
    own_s3, streams = streams_then_down
    for k, v in own_s3.svc.env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StorageError, match=own_s3.svc.endpoint_url.removeprefix("http://")):
        for _ in make_loader(streams["large_budget"]):
            pass
