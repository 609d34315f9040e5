"""A killed ingest resumes: finished shards are kept (not re-encoded, not rewritten) and the
result is byte-identical to an ingest that was never interrupted."""

from __future__ import annotations

import pytest

from pipeline import storage
from pipeline.data import ingest as ingest_mod
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.manifest import read_manifest


def _config(out, **kw) -> IngestConfig:
    return IngestConfig(
        output_url=str(out),
        source="synthetic",
        synthetic_count=600,
        synthetic_size=16,
        test_fraction=0.0,
        shard_samples=50,
        workers=1,
        **kw,
    )


class Killed(Exception):
    pass


def test_killed_ingest_resumes_without_rewriting_finished_shards(tmp_path, monkeypatch):
    fresh = ingest(_config(tmp_path / "fresh"), progress=False)["train"]
    assert len(fresh.shards) == 12

    published: list[str] = []
    put = storage.put_atomic

    def dying_put(url, data, *a, **kw):
        if url.endswith(".tar"):
            if len(published) == 5:  # the 6th shard never lands: the process "dies" here
                raise Killed(url)
            published.append(url.rsplit("/", 1)[1])
        return put(url, data, *a, **kw)

    monkeypatch.setattr(storage, "put_atomic", dying_put)
    with pytest.raises(Killed):
        ingest(_config(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out/train/manifest.json").exists()
    first = list(published)
    assert first == [f"shard-{i:06d}.tar" for i in range(5)]

    encoded: list[int] = []
    encode_one = ingest_mod._encode_one

    def counting(job):
        encoded.append(job[1])
        return encode_one(job)

    monkeypatch.setattr(ingest_mod, "_encode_one", counting)
    published.clear()

    def recording_put(url, data, *a, **kw):
        if url.endswith(".tar"):
            published.append(url.rsplit("/", 1)[1])
        return put(url, data, *a, **kw)

    monkeypatch.setattr(storage, "put_atomic", recording_put)
    resumed = ingest(_config(tmp_path / "out"), progress=False)["train"]
    assert published == [f"shard-{i:06d}.tar" for i in range(5, 12)]  # finished ones kept
    assert len(encoded) == 600 - 5 * 50  # only the samples after the last finished shard
    assert [(s.name, s.samples, s.sha256) for s in resumed.shards] == [
        (s.name, s.samples, s.sha256) for s in fresh.shards
    ]
    assert resumed.stats == fresh.stats
    assert read_manifest(str(tmp_path / "out/train")).count == 600
    assert sorted(p.name for p in (tmp_path / "out/train").iterdir()) == sorted(
        ["manifest.json", *(s.name for s in fresh.shards)]
    )  # the journal is gone


def test_records_of_another_config_are_ignored(tmp_path, monkeypatch):
    put = storage.put_atomic
    calls = []

    def dying_put(url, data, *a, **kw):
        if url.endswith(".tar"):
            if len(calls) == 3:
                raise Killed(url)
            calls.append(url)
        return put(url, data, *a, **kw)

    monkeypatch.setattr(storage, "put_atomic", dying_put)
    with pytest.raises(Killed):
        ingest(_config(tmp_path / "out"), progress=False)
    monkeypatch.setattr(storage, "put_atomic", put)
    other = ingest(_config(tmp_path / "out", seed=1), progress=False)["train"]  # other order
    fresh = ingest(_config(tmp_path / "fresh", seed=1), progress=False)["train"]
    assert [s.sha256 for s in other.shards] == [s.sha256 for s in fresh.shards]
