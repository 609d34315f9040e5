"""Resumable ingest: one completion record per published shard, so a killed ingest restarts
where it stopped instead of re-encoding and rewriting finished shards.

Layout: ``{split_url}/_ingest.shard-000007.json`` = ``{"fingerprint", "shard": ShardInfo,
"next": position, "stats": IngestStats state}``, written after the shard itself is published.
``next`` is the position (in the split's deterministic sample order) of the first sample not
in shards ``0..7``, ``stats`` the split's running statistics up to it. Records are only
trusted as a consecutive prefix from shard 0 with this config's fingerprint; the manifest,
written last, makes them obsolete and they are removed.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from pipeline import storage
from pipeline.data.manifest import ShardInfo

__all__ = ["SHARD_NAME", "IngestJournal"]

PREFIX = "_ingest."  # files beside the shards (an S3 "folder" could outlive its objects)
SHARD_NAME = "shard-{:06d}.tar"


class IngestJournal:
    """Completion records of one split's shards (see the module docstring)."""

    def __init__(self, split_url: str, fingerprint: dict, storage_options: dict | None = None):
        self.url = split_url
        self.fingerprint, self.options = fingerprint, storage_options or {}

    def record(self, info: ShardInfo, next_position: int, stats: dict) -> None:
        """Shard ``info`` is published; samples before ``next_position`` are done."""
        doc = {
            "fingerprint": self.fingerprint,
            "shard": asdict(info),
            "next": next_position,
            "stats": stats,
        }
        name = PREFIX + info.name.removesuffix(".tar") + ".json"
        storage.put_atomic(storage.join(self.url, name), json.dumps(doc).encode(), self.options)

    def resume(self) -> tuple[list[ShardInfo], int, dict | None]:
        """``(finished shards, next position, stats state)`` of the longest consecutive prefix
        of records from shard 0 that match this config; ``([], 0, None)`` if there is none."""
        records = {}
        for name in storage.listdir(self.url, self.options):
            if not (name.startswith(PREFIX) and name.endswith(".json")):
                continue
            try:
                doc = json.loads(storage.read_bytes(storage.join(self.url, name), self.options))
            except (ValueError, storage.StorageError):
                continue  # a torn record: the shard is redone
            if doc.get("fingerprint") == self.fingerprint:
                records[doc["shard"]["name"]] = doc
        done: list[ShardInfo] = []
        last = None
        while (name := SHARD_NAME.format(len(done))) in records:
            last = records[name]
            done.append(ShardInfo(**last["shard"]))
        if last is None:
            return [], 0, None
        return done, int(last["next"]), last["stats"]

    def clear(self) -> None:
        for name in storage.listdir(self.url, self.options):
            if name.startswith(PREFIX):
                storage.remove(storage.join(self.url, name), self.options)
