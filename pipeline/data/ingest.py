"""Ingest: an image source -> WebDataset tar shards + ``manifest.json`` per split.

Layout: ``{output_url}/{split}/shard-000000.tar`` ... and ``{output_url}/{split}/manifest.json``.
Samples are encoded in parallel worker processes (``config.workers``); the main process
packs them in order into shards, cut by ``shard_samples`` or by ``shard_bytes``, and
publishes each shard atomically (temp key, then move). The manifest is written last, so a
split is visible to readers only once complete. Re-running with a matching manifest skips
the split; a manifest from a different config is replaced (and stale shards removed).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import sys
import tarfile
import warnings
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from pipeline import storage
from pipeline.data import WORKER_PRELOAD
from pipeline.data.config import IngestConfig
from pipeline.data.errors import DataError
from pipeline.data.journal import SHARD_NAME, IngestJournal
from pipeline.data.manifest import MANIFEST, Manifest, ShardInfo, try_read_manifest, write_manifest
from pipeline.data.sources import EmptyFile, open_source
from pipeline.errors import first_line

log = logging.getLogger(__name__)

WINDOW = 4096  # samples in flight per pool.imap: bounds the results waiting in memory
MAX_PENDING_UPLOADS = 4  # shards built but not yet published: bounds their bytes in memory
_TAR_END = 1024  # two zero blocks close a tar
_RECORD = tarfile.RECORDSIZE  # a tar file is padded to whole 10 KiB records
INDEX_BYTES = 4 << 20  # a shard's index has a (sample, offset) pair per this many bytes


@dataclass
class Encoded:
    key: str
    label: int
    data: bytes
    width: int
    height: int
    mode: str
    pixel_sum: list[float]  # per channel, pixels scaled to [0, 1]
    pixel_sumsq: list[float]


@dataclass
class Skipped:
    """A source file that could not become a sample, and why (counted, never fatal alone)."""

    key: str
    reason: str  # empty | not_an_image | truncated | decompression_bomb | unreadable
    detail: str
    name: str  # the source file (or archive member)


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale -> 8-bit L, scaled (x / 257), not clipped at 255 as ``convert`` does."""
    a = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """RGBA/LA/palette-with-transparency over a white background (transparent is not black)."""
    rgba = image.convert("RGBA")
    out = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    out.alpha_composite(rgba)
    return out.convert("RGB")


def prepare(image: Image.Image, size: int, mode: str) -> Image.Image:
    """Convert mode (``""`` keeps L/RGB) and, if ``size``, resize the short side + center crop.

    16-bit grayscale is scaled to 8 bits; transparency is flattened onto white; CMYK, palette
    and other modes convert to RGB (or L when the source is grayscale).
    """
    if image.mode in _SIXTEEN_BIT:
        image = _to_8bit(image)
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = _flatten_alpha(image)
    target = mode or ("L" if image.mode in ("L", "1", "F") else "RGB")
    if image.mode != target:
        image = image.convert(target)
    if size and image.size != (size, size):
        w, h = image.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def encode(image: Image.Image, encoding: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if encoding == "png":
        image.save(buf, format="PNG", compress_level=6)
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


_WORKER: tuple = ()  # (source, config), set in each worker process by _init


def _init(source, config: IngestConfig, environ: dict | None = None) -> None:
    global _WORKER
    if environ is not None:
        storage.inherit_environ(environ)
    _WORKER = (source, config)


def load_checked(source, split: str, i: int, key: str, max_pixels: int):
    """``source.load`` decoded in full and upright (EXIF orientation), or :class:`Skipped`."""
    name = source.name_of(split, i) if hasattr(source, "name_of") else key
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image, label = source.load(split, i)
            w, h = image.size
            if w * h > max_pixels:  # from the header, before decompressing
                return Skipped(
                    key, "decompression_bomb", f"{w}x{h} > max_pixels={max_pixels}", name
                )
            image.load()
            return ImageOps.exif_transpose(image), label
    except EmptyFile:
        return Skipped(key, "empty", "0 bytes", name)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Skipped(key, "decompression_bomb", first_line(e), name)
    except UnidentifiedImageError as e:
        return Skipped(key, "not_an_image", first_line(e), name)
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        reason = "truncated" if "truncat" in str(e).lower() else "unreadable"
        return Skipped(key, reason, f"{type(e).__name__}: {first_line(e)}", name)


def _encode_one(job: tuple[str, int, str]) -> Encoded | Skipped:
    split, i, key = job
    source, config = _WORKER
    loaded = load_checked(source, split, i, key, config.max_pixels)
    if isinstance(loaded, Skipped):
        return loaded
    image, label = loaded
    image = prepare(image, config.image_size, config.mode)
    pixels = np.asarray(image, dtype=np.float64).reshape(image.size[1], image.size[0], -1) / 255
    return Encoded(
        key,
        label,
        encode(image, config.encoding, config.jpeg_quality),
        image.size[0],
        image.size[1],
        image.mode,
        pixels.sum(axis=(0, 1)).tolist(),
        np.square(pixels).sum(axis=(0, 1)).tolist(),
    )


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: identical input -> identical shard bytes
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def _member_bytes(n: int) -> int:
    return 512 + (n + 511) // 512 * 512  # header + data padded to 512-byte blocks


class ShardWriter:
    """Packs encoded samples into in-memory tars and publishes them in a background thread."""

    def __init__(
        self,
        split_url: str,
        config: IngestConfig,
        done: list[ShardInfo] | None = None,
        journal: IngestJournal | None = None,
    ):
        self.url, self.config, self.journal = split_url, config, journal
        self.ext = "png" if config.encoding == "png" else "jpg"
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.done = list(done or [])  # shards kept from an interrupted run
        self.futures: list[Future] = []
        self._open()

    def _open(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.USTAR_FORMAT)
        self.count, self.bytes = 0, _TAR_END
        self.index: list[tuple[int, int]] = []  # (sample, offset of its first header)

    def add(self, e: Encoded, position: int = 0, stats: IngestStats | None = None) -> None:
        """Append ``e``, the sample at ``position`` in the split's order; ``stats`` counts the
        samples before it (what a shard cut here records in the journal)."""
        size = _member_bytes(len(e.data)) + (_member_bytes(4) if e.label >= 0 else 0)
        by_count = self.config.shard_samples > 0
        padded = -(-(self.bytes + size) // _RECORD) * _RECORD
        full = (
            self.count >= self.config.shard_samples
            if by_count
            else padded > self.config.shard_bytes
        )
        if self.count and full:
            self.flush(position, stats)
        if self.tar.offset - (self.index[-1][1] if self.index else 0) >= INDEX_BYTES:
            self.index.append((self.count, self.tar.offset))
        _member(self.tar, f"{e.key}.{self.ext}", e.data)
        if e.label >= 0:
            _member(self.tar, f"{e.key}.cls", str(e.label).encode())
        self.count, self.bytes = self.count + 1, self.bytes + size

    def flush(self, position: int = 0, stats: IngestStats | None = None) -> None:
        if not self.count:
            return
        self.tar.close()
        data, count, index = self.buf.getvalue(), self.count, tuple(self.index)
        name = SHARD_NAME.format(len(self.done) + len(self.futures))
        pending = [f for f in self.futures if not f.done()]
        if len(pending) >= MAX_PENDING_UPLOADS:  # the store is slower than encoding: wait
            pending[0].result()
        state = stats.state() if stats is not None else None
        self.futures.append(
            self.pool.submit(self._publish, name, data, count, index, position, state)
        )
        self._open()

    def _publish(
        self,
        name: str,
        data: bytes,
        count: int,
        index: tuple[tuple[int, int], ...],
        position: int,
        state: dict | None,
    ) -> ShardInfo:
        url = storage.join(self.url, name)
        storage.put_atomic(url, data, self.config.storage_options)
        info = ShardInfo(name, count, len(data), hashlib.sha256(data).hexdigest(), index)
        if self.journal is not None and state is not None:
            self.journal.record(info, position, state)
        return info

    def close(self, position: int = 0, stats: IngestStats | None = None) -> list[ShardInfo]:
        self.flush(position, stats)
        try:
            return self.done + [f.result() for f in self.futures]
        finally:
            self.pool.shutdown()


def fingerprint(config: IngestConfig, split: str) -> dict:
    """The config values that determine a split's shards (not where or how fast)."""
    skip = {"output_url", "workers", "storage_options", "max_bad_files"}
    return {"split": split, **{k: v for k, v in asdict(config).items() if k not in skip}}


def order(n: int, config: IngestConfig, split: str) -> list[int]:
    """Source indices of a split in shard order: the first ``limit``, shuffled by seed."""
    idx = np.arange(min(n, config.limit) if config.limit else n)
    if config.shuffle:
        idx = np.random.default_rng([config.seed, 1 if split == "train" else 2]).permutation(idx)
    return idx.tolist()


class IngestStats:
    """Running count, sizes, modes and per-channel pixel sums of a split."""

    def __init__(self):
        self.count, self.pixels, self.sizes, self.modes = 0, 0, set(), set()
        self.skipped: Counter = Counter()  # reason -> files
        self.sum: np.ndarray | float = 0.0
        self.sumsq: np.ndarray | float = 0.0

    def state(self) -> dict:
        """A JSON-able snapshot (:meth:`from_state` restores it)."""
        return {
            "count": self.count,
            "pixels": self.pixels,
            "sizes": sorted(self.sizes),
            "modes": sorted(self.modes),
            "sum": np.atleast_1d(self.sum).tolist(),
            "sumsq": np.atleast_1d(self.sumsq).tolist(),
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_state(cls, state: dict) -> IngestStats:
        s = cls()
        s.count, s.pixels = state["count"], state["pixels"]
        s.sizes, s.modes = {tuple(x) for x in state["sizes"]}, set(state["modes"])
        s.sum, s.sumsq = np.asarray(state["sum"]), np.asarray(state["sumsq"])
        s.skipped = Counter(state["skipped"])
        return s

    def add(self, e: Encoded) -> None:
        self.count += 1
        self.pixels += e.width * e.height
        self.sizes.add((e.width, e.height))
        self.modes.add(e.mode)
        if len(self.modes) == 1:  # channel sums only mean something for a single mode
            self.sum = self.sum + np.asarray(e.pixel_sum)
            self.sumsq = self.sumsq + np.asarray(e.pixel_sumsq)

    def to_dict(self, encoding: str, classes: list[str]) -> dict:
        mean = np.atleast_1d(self.sum / max(self.pixels, 1))
        std = np.sqrt(np.maximum(np.atleast_1d(self.sumsq / max(self.pixels, 1)) - mean**2, 0))
        if len(self.modes) != 1:
            mean = std = np.zeros(0)
        width, height = next(iter(self.sizes)) if len(self.sizes) == 1 else (0, 0)
        mode = next(iter(self.modes)) if len(self.modes) == 1 else "mixed"
        return {
            "count": self.count,
            "width": width,
            "height": height,
            "mode": mode,
            "channels": {"L": 1, "RGB": 3}.get(mode, 0),
            "mean": [round(float(m), 6) for m in mean],
            "std": [round(float(s), 6) for s in std],
            "encoding": encoding,
            "classes": classes,
            "skipped": dict(sorted(self.skipped.items())),
        }

    def skipped_text(self) -> str:
        """``"; skipped 3 files (empty 1, truncated 2)"``, or ``""``."""
        if not self.skipped:
            return ""
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        return f"; skipped {sum(self.skipped.values())} files ({parts})"


def _stale(split_url: str, keep: set[str], storage_options: dict) -> list[str]:
    return [
        n
        for n in storage.listdir(split_url, storage_options)
        if n.startswith("shard-") and n.endswith(".tar") and n not in keep
    ]


def _say(progress: bool, message: str) -> None:
    log.info(message)
    if progress:  # the CLI configures no logging; the progress bar's stream is the user's
        tqdm.write(message, file=sys.stderr)


def _encoded(jobs: list, start: int, pool):
    """Encoded samples of ``jobs[start:]`` in order, at most :data:`WINDOW` in flight."""
    for a in range(start, len(jobs), WINDOW):
        window = jobs[a : a + WINDOW]
        yield from (
            pool.imap(_encode_one, window, chunksize=64) if pool else map(_encode_one, window)
        )


def ingest_split(source, split: str, config: IngestConfig, pool, progress: bool) -> Manifest:
    """Write one split's shards then its manifest (or skip it if already done)."""
    split_url = storage.join(config.output_url, split)
    want = fingerprint(config, split)
    old = try_read_manifest(split_url, config.storage_options)
    if old is not None and old.ingest == want:
        _say(
            progress,
            f"skip {split}: {storage.join(split_url, MANIFEST)} already matches this "
            f"config ({old.count} samples, {len(old.shards)} shards)",
        )
        return old
    if old is not None:
        log.warning("%s: manifest from a different config; rewriting the split", split_url)
        storage.remove(storage.join(split_url, MANIFEST), config.storage_options)
    indices = order(source.splits[split], config, split)
    jobs = [(split, i, f"{split}-{i:08d}") for i in indices]
    journal = IngestJournal(split_url, want, config.storage_options)
    done, start, state = journal.resume()
    if done:
        _say(progress, f"resume {split}: {len(done)} finished shards kept, from sample {start}")
    writer = ShardWriter(split_url, config, done, journal)
    stats = IngestStats.from_state(state) if state else IngestStats()
    bar = tqdm(
        total=len(jobs), initial=start, desc=f"ingest {split}", unit="img", disable=not progress
    )
    for position, e in enumerate(_encoded(jobs, start, pool), start):
        bar.update()
        if isinstance(e, Skipped):
            stats.skipped[e.reason] += 1
            log.warning("skipped %s (%s): %s", e.name, e.reason, e.detail)
            if sum(stats.skipped.values()) > config.max_bad_files:
                raise DataError(
                    f"{config.source_path or config.source}: more than "
                    f"ingest.max_bad_files={config.max_bad_files} unreadable files in {split}"
                    f"{stats.skipped_text()}; last: {e.name}: {e.detail}"
                )
            continue
        writer.add(e, position, stats)
        stats.add(e)
    bar.close()
    shards = writer.close(len(jobs), stats)
    manifest = Manifest(
        split=split,
        shards=shards,
        url=split_url,
        ingest=want,
        stats=stats.to_dict(config.encoding, list(source.classes)),
    )
    write_manifest(manifest, split_url, config.storage_options)
    for name in _stale(split_url, {s.name for s in shards}, config.storage_options):
        storage.remove(storage.join(split_url, name), config.storage_options)
    journal.clear()
    _say(
        progress,
        f"wrote {split_url}: {manifest.count} samples in {len(shards)} shards"
        f"{stats.skipped_text()}",
    )
    return manifest


def ingest(config: IngestConfig, progress: bool = True) -> dict[str, Manifest]:
    """Ingest every non-empty split of ``config.source``; returns the manifests by split.

    Idempotent: a split whose manifest matches the config is skipped (and logged as such).
    """
    source = open_source(config)
    splits = [s for s, n in source.splits.items() if n]
    pool = None
    if config.workers > 1:
        context = storage.process_context(WORKER_PRELOAD)
        pool = context.Pool(config.workers, _init, (source, config, dict(os.environ)))
    else:
        _init(source, config)
    try:
        return {s: ingest_split(source, s, config, pool, progress) for s in splits}
    finally:
        if pool is not None:
            pool.terminate()
