"""``manifest.json``: the index of one split's shards, written last by ingest.

Format (``version`` 1)::

    {
      "version": 1,
      "split": "train",
      "count": 600,                       # samples over all shards
      "shards": [{"name": "shard-000000.tar", "samples": 128, "bytes": 181760,
                  "sha256": "9f2c...", "index": [[1800, 4194816], ...]}, ...],
      "stats": {"count": 600, "width": 28, "height": 28, "mode": "L", "channels": 1,
                "mean": [0.286], "std": [0.353], "encoding": "png",
                "classes": ["T-shirt/top", ...]},
      "ingest": {...}                     # the config fingerprint that made it
    }

``width``/``height`` are 0 when the images' sizes differ. A shard is a plain tar holding
``{key}.png`` (or ``.jpg``) plus ``{key}.cls`` (the label as ASCII digits) per sample, in
order; keys are unique over splits, e.g. ``train-00001234``.

``index`` (optional; absent in manifests written before it) lists ``[sample, offset]`` pairs:
the byte offset in the shard of the tar header that starts that sample, one pair per
``pipeline.data.ingest.INDEX_BYTES`` (4 MiB) of shard, sample 0 at offset 0 left out. A
reader whose work starts inside a shard opens it at the last pair at or before its first
sample (a ranged GET, or a seek) instead of reading the shard from its first byte.
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
    index: tuple[tuple[int, int], ...] = ()  # (sample, byte offset of its first header)

    def __post_init__(self):  # from JSON (the manifest, the ingest journal): lists
        object.__setattr__(self, "index", tuple((int(s), int(o)) for s, o in self.index))


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
            "shards": [_shard_doc(s) for s in self.shards],
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
                ShardInfo(
                    str(s["name"]),
                    int(s["samples"]),
                    int(s["bytes"]),
                    str(s["sha256"]),
                    _index(s.get("index", ()), s["name"], int(s["samples"]), int(s["bytes"])),
                )
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


def _shard_doc(s: ShardInfo) -> dict:
    doc = asdict(s)
    if s.index:
        doc["index"] = [list(pair) for pair in s.index]
    else:  # manifests without an index stay as they were
        del doc["index"]
    return doc


def _index(pairs, name: str, samples: int, size: int) -> tuple[tuple[int, int], ...]:
    """A shard's index pairs, checked: samples and offsets strictly increasing, inside the
    shard, on 512-byte tar blocks."""
    index = tuple((int(s), int(o)) for s, o in pairs)
    last = (0, 0)
    for s, o in index:
        if not (last[0] < s < samples and last[1] < o < size and o % 512 == 0):
            raise ValueError(f"{name}: index pair {[s, o]} out of order or outside the shard")
        last = (s, o)
    return index


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
