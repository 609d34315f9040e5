"""``manifest.json``: the index of one split's shards, written last by ingest.

Format (``version`` 1)::

    {
      "version": 1,
      "split": "train",
      "count": 600,                       # samples over all shards
      "shards": [{"name": "shard-000000.tar", "samples": 128, "bytes": 181760,
                  "sha256": "9f2c..."}, ...],
      "stats": {"count": 600, "width": 28, "height": 28, "mode": "L", "channels": 1,
                "mean": [0.286], "std": [0.353], "encoding": "png",
                "classes": ["T-shirt/top", ...]},
      "ingest": {...}                     # the config fingerprint that made it
    }

``width``/``height`` are 0 when the images' sizes differ. A shard is a plain tar holding
``{key}.png`` (or ``.jpg``) plus ``{key}.cls`` (the label as ASCII digits) per sample, in
order; keys are unique over splits, e.g. ``train-00001234``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from pipeline import storage
from pipeline.data.errors import DataError

MANIFEST = "manifest.json"
VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """One split's shards and dataset stats; ``url`` is the split folder (not serialized)."""

    split: str
    shards: list[ShardInfo]
    stats: dict
    ingest: dict = field(default_factory=dict)
    url: str = ""
    version: int = VERSION

    @property
    def count(self) -> int:
        return sum(s.samples for s in self.shards)

    def shard_url(self, i: int) -> str:
        return storage.join(self.url, self.shards[i].name)

    def to_json(self) -> str:
        doc = {
            "version": self.version,
            "split": self.split,
            "count": self.count,
            "shards": [asdict(s) for s in self.shards],
            "stats": self.stats,
            "ingest": self.ingest,
        }
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, url: str = "") -> Manifest:
        where = storage.join(url, MANIFEST) if url else MANIFEST
        try:
            doc = json.loads(text)
            if doc.get("version") != VERSION:
                raise DataError(f"{where}: unsupported manifest version {doc.get('version')!r}")
            shards = [
                ShardInfo(str(s["name"]), int(s["samples"]), int(s["bytes"]), str(s["sha256"]))
                for s in doc["shards"]
            ]
            manifest = cls(
                split=str(doc["split"]),
                shards=shards,
                stats=dict(doc["stats"]),
                ingest=dict(doc.get("ingest", {})),
                url=url,
            )
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        if doc.get("count", manifest.count) != manifest.count:
            raise DataError(
                f"{where}: count {doc['count']} != sum of shard samples {manifest.count}"
            )
        return manifest


def read_manifest(
    url: str,
    storage_options: dict | None = None,
    retries: int = storage.DEFAULT_RETRIES,
    backoff: float = storage.DEFAULT_BACKOFF,
) -> Manifest:
    """Read ``{url}/manifest.json``; ``url`` is a split folder.

    Raises:
        DataError: no manifest there, or a malformed one.
    """
    where = storage.join(url, MANIFEST)
    try:
        text = storage.read_bytes(where, storage_options, retries, backoff)
    except storage.StorageError as e:
        if isinstance(e.__cause__, FileNotFoundError) and "bucket" not in str(e).lower():
            raise DataError(f"{where}: no manifest (ingest the dataset there first)") from None
        raise
    return Manifest.from_json(text, url.rstrip("/"))


def try_read_manifest(url: str, storage_options: dict | None = None) -> Manifest | None:
    """The manifest under ``url``, or ``None`` when there is none yet."""
    if not storage.exists(storage.join(url, MANIFEST), storage_options):
        return None
    return read_manifest(url, storage_options)


def write_manifest(manifest: Manifest, url: str, storage_options: dict | None = None) -> None:
    """Publish ``{url}/manifest.json`` atomically."""
    storage.put_atomic(storage.join(url, MANIFEST), manifest.to_json().encode(), storage_options)
