"""Read samples by index out of tar shards, streaming through :mod:`pipeline.storage`.

Members are grouped into samples as webdataset's ``group_by_keys`` does; the members come from
:func:`ustar_files`, a strict ustar parser ~20x faster than ``tarfile`` on small images, or,
for tars using pax/GNU extensions, from webdataset's ``tar_file_iterator``. A shard stays
open between calls so consecutive blocks of the plan continue where the last stopped (a
shard entered at sample k is opened at the manifest index's last pair at or before k), and,
given the visits to come (each a shard and the first and last sample read there), a remote
shard is asked for only up to the index's first pair past the visit's last sample, and the
next ``prefetch`` visits are fetched while one is decoded (bytes arrive through
:mod:`pipeline.data.fetch`, optionally from a local cache).
A transient storage error (a dropped S3 connection mid-shard) reopens the shard and skips
back to the same sample index, up to ``retries`` times with doubling backoff. A shard that
ends early or is structurally broken, or stays unreadable, turns each sample still wanted
from it into a bad item (``truncated_shard`` / ``unreadable_shard``): never a hang. The
sample being assembled when a tar breaks counts as lost too: it may be missing members.
"""

from __future__ import annotations

import bisect
import logging
import re
import tarfile
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
from webdataset import tariterators

from pipeline import storage
from pipeline.data.cache import ShardCache
from pipeline.data.errors import DataError
from pipeline.data.fetch import ShardFiles
from pipeline.data.iostats import IOStats
from pipeline.data.sources import check_member_name

log = logging.getLogger(__name__)


class UnsupportedTar(Exception):
    """A tar feature the fast reader leaves to webdataset's (pax/GNU headers, huge sizes)."""


_NUL = b"\0"
_ZERO_BLOCK = _NUL * 512
PARSE_CHUNK = 1 << 20  # bytes ustar_files reads at a time
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$").match  # webdataset's base_plus_ext


def header_checksum(header: bytes) -> int:
    """The ustar checksum of a 512-byte header: the sum of its bytes, the checksum field
    counted as 8 spaces.

    Adler-32's low half is 1 + the byte sum mod 65521, and a 256-byte half sums to at most
    65,280, so per half it is the exact sum, ~4x faster than ``sum()`` over the bytes.
    """
    halves = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF)
    return halves - 2 - sum(header[148:156]) + 8 * 32


_MAGIC = np.frombuffer(b"ustar", np.uint8)
_OCTAL_11 = 8 ** np.arange(10, -1, -1, dtype=np.int64)  # an 11-digit size field's weights
_OCTAL_6 = 8 ** np.arange(5, -1, -1, dtype=np.int64)  # a 6-digit checksum's


_BYTE_LANES = np.uint64(0x00FF00FF00FF00FF)
_LANE = np.uint64(0xFFFF)


def _byte_sums(words: np.ndarray) -> np.ndarray:
    """The sum of the bytes of each row of ``words`` (uint64, at most 64 a row), twice as
    fast as ``sum(dtype=int64)`` over the bytes: pairs of bytes are added into 16-bit lanes
    (at most 64 * 510 in a lane: no carry between lanes), then the four lanes."""
    pairs = (words & _BYTE_LANES) + ((words >> np.uint64(8)) & _BYTE_LANES)
    lanes = pairs.sum(1)
    total = lanes & _LANE
    for shift in (16, 32, 48):
        total += (lanes >> np.uint64(shift)) & _LANE
    return total.astype(np.int64)


def scan_members(buf: bytes, pos: int) -> tuple[list[str], list[int], list[int], int] | None:
    """The run of plain members from ``buf[pos]`` (a header) whose data is all in ``buf``,
    found at once with numpy: ``(names, data offsets, sizes, position after the run)``, or
    None when the member at ``pos`` is not plain (then :func:`ustar_files` parses it alone).

    Plain: a ustar header of a regular file, no name prefix, the size as 11 octal digits and
    a NUL, the checksum as 6 octal digits, NUL, space (how ``tarfile`` and GNU tar write
    them). Each 512-byte block with the ``ustar`` magic is a candidate header; the run takes
    them while each has a correct checksum and the previous member ends exactly there. A
    block of member data that happens to look like a header is never reached that way: the
    run stops before the member holding it, which the one-header path then reads.
    """
    n = (len(buf) - pos) >> 9
    if n < 2:
        return None
    blocks = np.frombuffer(buf, np.uint8, n << 9, pos).reshape(n, 512)
    at = np.flatnonzero(blocks[:, 257] == _MAGIC[0])
    at = at[(blocks[at, 258:262] == _MAGIC[1:]).all(1)]
    if not len(at) or at[0]:
        return None
    words = np.frombuffer(buf, np.uint64, n << 6, pos).reshape(n, 64)[at]  # the headers
    h = words.view(np.uint8)
    size_digits, checksum_digits = h[:, 124:135], h[:, 148:154]
    ok = (
        ((size_digits & 0xF8) == 0x30).all(1)  # '0'..'7'
        & ((checksum_digits & 0xF8) == 0x30).all(1)
        & (h[:, 135] == 0)
        & (h[:, 154] == 0)
        & (h[:, 155] == 32)
        & ((h[:, 156] == 48) | (h[:, 156] == 0))  # a regular file
        & (h[:, 345] == 0)  # no prefix
    )
    sizes = (size_digits - 48) @ _OCTAL_11
    # the checksum: the header's byte sum with its own 8 bytes counted as spaces
    total = _byte_sums(words) - h[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
    ok &= total == (checksum_digits - 48) @ _OCTAL_6
    following = at + 1 + ((sizes + 511) >> 9)  # the block after each member's padding
    ok[:-1] &= following[:-1] == at[1:]
    ok &= following <= n
    m = len(ok) if ok.all() else int(ok.argmin())
    if not m:
        return None
    names = h[:m, :100].copy().view("S100").ravel().tolist()  # trailing NULs dropped
    joined = _NUL.join(names)
    if joined.count(_NUL) != m - 1:  # a NUL inside a name field: the name ends there
        joined = _NUL.join(x.partition(_NUL)[0] for x in names)
    text = joined.decode("utf-8", "surrogateescape")
    offsets = ((at[:m] << 9) + (pos + 512)).tolist()
    return text.split("\0"), offsets, sizes[:m].tolist(), pos + (int(following[m - 1]) << 9)


def ustar_files(stream, chunk: int = PARSE_CHUNK) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` per regular member of a plain ustar stream, ~20x faster than
    ``tarfile`` (what ``webdataset.tariterators.tar_file_iterator`` uses) on small members.
    See :func:`member_runs`."""
    for run in member_runs(stream, chunk):
        yield from run


def member_runs(stream, chunk: int = PARSE_CHUNK) -> Iterator[list[tuple[str, bytes]]]:
    """The regular members of a plain ustar stream, as lists of ``(name, data)`` in order:
    a consumer loops over a list rather than resuming a generator per member.

    The stream is read up to ``chunk`` bytes at a time (more for a larger member); runs of
    plain members are found in that buffer at once (:func:`scan_members`), any other member
    by parsing its header alone, and members are sliced out of the buffer. At most ``chunk``
    + one member is buffered. A read error raises where the bytes run out, after the
    members before it.

    Raises:
        tarfile.ReadError: truncated data or a header with a bad checksum.
        UnsupportedTar: pax or GNU extension headers, base-256 sizes.
    """
    # read1: at most one raw read per call. A BufferedReader's read(n) keeps reading to fill
    # n, and when a later raw read fails (an S3 object shorter than its manifest size) it
    # raises and drops the bytes it had: every sample before the cut would be lost too.
    read = getattr(stream, "read1", None) or stream.read
    buf, pos = b"", 0
    rest: tuple[bytes, int] | None = None  # a chunk read, and where in it buf continues

    def have(n: int) -> int:
        """Bytes buffered from ``pos`` after reading until ``n`` (or the stream's end).

        A member that straddles two reads is copied into a small bridge (the old chunk's
        tail + what it needs of the new one), and parsing then goes on inside the new chunk
        where the bridge ended: a 1 MiB chunk is never copied to prepend a few bytes.
        """
        nonlocal buf, pos, rest
        if rest is not None and pos >= len(buf):
            (buf, pos), rest = rest, None
        got = len(buf) - pos
        if got >= n:
            return got
        parts = [buf[pos:]]
        if rest is not None:  # a bridge not used up (not how the parser reads): merge
            parts.append(rest[0][rest[1] :])
            got, rest = got + len(parts[-1]), None
        while got < n:
            more = read(max(chunk, n - got))
            if not more:
                break
            parts.append(more)
            got += len(more)
        need = n - len(parts[0])
        if len(parts) == 2 and parts[0] and len(parts[1]) > need > 0:
            buf, rest = parts[0] + parts[1][:need], (parts[1], need)
        else:
            buf = parts[-1] if len(parts) == 2 and not parts[0] else b"".join(parts)
        pos = 0
        return got

    unscannable: tuple[bytes, int] = (b"", -1)  # where scan_members last found no run
    while True:
        if len(buf) - pos < 512 and have(512) < 512:
            if not buf:
                return  # end of archive (a tar cut at a member boundary ends here too)
            raise tarfile.ReadError("unexpected end of data")
        if unscannable[1] != pos or unscannable[0] is not buf:
            run = scan_members(buf, pos)
            if run is not None:
                names, offsets, sizes, pos = run
                yield [
                    (fname, buf[at : at + size])
                    for fname, at, size in zip(names, offsets, sizes)
                    if not (fname.startswith("__") and _SKIP_META.match(fname))
                ]
                continue
            unscannable = (buf, pos)
        header = buf[pos : pos + 512]
        if header == _ZERO_BLOCK:
            return
        checksum = header[148:156].split(_NUL, 1)[0].strip()
        if not checksum or int(checksum, 8) != header_checksum(header):
            raise tarfile.ReadError("bad checksum in a tar header")
        kind = header[156:157]
        if kind in (b"x", b"g", b"L", b"K") or header[124] & 0x80:
            raise UnsupportedTar(kind.decode(errors="replace"))
        size = int(header[124:136].split(_NUL, 1)[0].strip() or b"0", 8)
        name = header[:100].split(_NUL, 1)[0]
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(_NUL, 1)[0] + b"/" + name
        pos += 512
        padded = (size + 511) & ~511
        if len(buf) - pos < padded and have(padded) < size:
            raise tarfile.ReadError("unexpected end of data")
        data = buf[pos : pos + size]
        pos = min(pos + padded, len(buf))  # a tar cut inside the last padding ends there
        fname = name.decode("utf-8", "surrogateescape")
        if kind in (b"0", _NUL) and not (fname.startswith("__") and _SKIP_META.match(fname)):
            yield [(fname, data)]


def group_members(runs: Iterable[list[tuple[str, bytes]]], url: str) -> Iterator[dict]:
    """webdataset's ``group_by_keys`` (``base_plus_ext`` keys, lower-cased suffixes) over
    lists of ``(name, data)`` pairs (:func:`member_runs`), without its per-member dicts.

    The key is the name up to the first dot of its last path part, found with ``find``;
    the regex is asked only where that could differ (no dot there, a newline in the name).

    Raises:
        ValueError: a suffix twice in one sample, as ``group_by_keys`` does.
    """
    sample: dict | None = None
    key = None
    for run in runs:
        for fname, data in run:
            slash = fname.rfind("/")
            dot = fname.find(".", slash + 1)
            if dot > slash + 1 and "\n" not in fname:
                prefix, suffix = fname[:dot], fname[dot + 1 :]
            else:
                match = _BASE_PLUS_EXT(fname)
                if match is None:
                    continue
                prefix, suffix = match.groups()
            suffix = suffix.lower()
            if prefix != key:
                if sample is not None:
                    yield sample
                sample, key = {"__key__": prefix, "__url__": url}, prefix
            if suffix in sample:
                raise ValueError(
                    f"{fname}: duplicate file name in tar file {suffix} {sample.keys()}"
                )
            sample[suffix] = data
    if sample is not None:
        yield sample


def tar_samples(stream, url: str, fast: bool = True) -> Iterator[dict]:
    """Samples of one tar stream: ``{"__key__", "__url__", <suffix>: bytes, ...}``.

    ``fast``: :func:`member_runs` grouped by :func:`group_members`; ``fast=False``:
    webdataset's ``tar_file_iterator`` and ``group_by_keys``, for tars :func:`ustar_files`
    does not support. Both give the same samples (``tests/data/test_bad.py``).
    """
    if fast:
        return group_members(member_runs(stream), url)
    members = tariterators.tar_file_iterator(stream)
    return tariterators.group_by_keys({**f, "__url__": url} for f in members)


def _why(e: BaseException) -> str:
    if isinstance(e, storage.StorageError):
        return str(e)
    text = str(e.args[0]) if e.args else ""
    return f"{type(e).__name__}: {text.split(' @ ')[0]}"  # webdataset appends " @ <stream>"


class _Open:
    """One open shard: its stream, its sample iterator, the next sample's index and, for a
    stream that ends before the shard does, the index of the first sample past its end."""

    def __init__(self, stream, samples: Iterator[dict], limit: int | None = None):
        self.stream, self.samples, self.next, self.limit = stream, samples, 0, limit

    def close(self) -> None:
        try:
            self.stream.close()
        except Exception:  # closing a broken stream must not mask the real error
            pass


class ShardReader:
    """Samples by (shard, index) from a manifest's shards, with retries and bad-item markers.

    ``schedule`` (optional) is the order in which :meth:`read` will visit shards, as
    :class:`Visit` s (repeats of the same shard in a row merged). With it, a remote shard is
    read only up to the index's first pair past the visit's last sample (the rest of the
    shard is not fetched), and the next ``prefetch`` visits are fetched while the current one
    is decoded; only the current shard and those stay open.
    """

    def __init__(
        self,
        urls: list[str],
        counts: list[int],
        storage_options: dict | None = None,
        retries: int = storage.DEFAULT_RETRIES,
        backoff: float = storage.DEFAULT_BACKOFF,
        sizes: list[int] | None = None,
        sha256: list[str] | None = None,
        prefetch: int = 0,
        cache: ShardCache | None = None,
        schedule: Iterable[Visit] | None = None,
        stats: IOStats | None = None,
        index: list[tuple[tuple[int, int], ...]] | None = None,
    ):
        self.urls, self.counts = urls, counts
        self.index = index or [()] * len(urls)
        self.retries, self.backoff = retries, backoff
        self.stats = stats or (cache.stats if cache is not None else IOStats())
        if cache is not None:
            cache.stats = self.stats
        self.files = ShardFiles(
            urls, sizes, sha256, storage_options, prefetch, cache, stats=self.stats
        )
        self.prefetch = prefetch if schedule is not None else 0
        self._scheduled = schedule is not None
        self._schedule = iter(schedule or ())
        self._ahead: deque[Visit] = deque()
        self._visiting, self.last_count = -1, 0
        self._last: int | None = None  # the last sample the current visit reads
        self._open: dict[int, _Open] = {}
        self._webdataset_only: set[int] = set()  # shards with tar features ustar_files lacks

    def close(self) -> None:
        for i in list(self._open):
            self._close(i)
        self.files.close()
        self._visiting = -1

    def _close(self, shard: int) -> None:
        handle = self._open.pop(shard, None)
        if handle is not None:
            handle.close()

    def _visit(self, shard: int) -> None:
        """Start a visit of ``shard``: take it off the schedule, fetch the next ``prefetch``
        visits, and close what the window no longer holds."""
        self._visiting, self._last = shard, None
        if self._scheduled:
            if not self._ahead:
                self._ahead.extend(_take(self._schedule, 1))
            if self._ahead and self._ahead[0].shard == shard:
                self._last = self._ahead.popleft().last
            else:  # read() strayed from the schedule: stop bounding and prefetching
                log.warning(
                    "shard %d read out of the schedule; reading on without bounds or prefetch",
                    shard,
                )
                self._scheduled, self.prefetch, self._ahead = False, 0, deque()
        if not self.prefetch:
            for i in [i for i in self._open if i != shard]:
                self._close(i)
            return
        self._ahead.extend(_take(self._schedule, self.prefetch - len(self._ahead)))
        window = {shard, *(v.shard for v in self._ahead)}
        for i in [i for i in self._open if i not in window]:
            self._close(i)
        self.files.keep(window)
        for v in self._ahead:
            if v.shard != shard and v.shard not in self._open:
                _, offset, end, _ = self._span(v.shard, v.first, v.last)
                self.files.prefetch(v.shard, offset, end)

    def _span(self, shard: int, target: int, last: int | None):
        """Where to read ``shard`` from sample ``target`` on: ``(first sample, its byte
        offset, end byte, first sample past the end)``, the index's last pair at or before
        ``target`` and, for a remote shard read up to ``last``, its first pair past ``last``
        (end None: to the shard's end)."""
        pairs = self.index[shard]
        at = bisect.bisect_right(pairs, (target, float("inf")))
        first, offset = pairs[at - 1] if at else (0, 0)
        if last is None or last < target or storage.is_local(self.urls[shard]):
            return first, offset, None, None
        past = bisect.bisect_right(pairs, (last, float("inf")))
        if past == len(pairs):
            return first, offset, None, None
        limit, end = pairs[past]
        return first, offset, end, limit

    def _reopen(self, shard: int, target: int) -> _Open:
        """Open ``shard`` at its index's last pair at or before sample ``target`` (up to the
        first pair past the visit's last sample)."""
        self._close(shard)
        fast = shard not in self._webdataset_only
        first, offset, end, limit = self._span(shard, target, self._last)
        if offset:
            self.stats.add("opened_inside")
            self.stats.add("bytes_skipped", offset)
        stream = self.files.open(shard, offset, end)
        samples = tar_samples(stream, self.urls[shard], fast)
        handle = self._open[shard] = _Open(stream, samples, limit)
        handle.next = first
        return handle

    def _next_sample(self, shard: int, target: int) -> dict | None:
        """The sample at ``target``, reading forward; ``None`` if the shard ends first."""
        handle = self._open.get(shard)
        if handle is None or handle.next > target:
            handle = self._reopen(shard, target)
        while True:
            if self.files.deferred:
                self.files.poll()
            sample = next(handle.samples, None)
            if sample is None and handle.limit is not None and handle.next >= handle.limit:
                # the stream ended where it was asked to, before the shard's end: read on
                # from ``target`` (past the visit's last sample, not the schedule's way:
                # to the shard's end)
                handle = self._reopen(shard, target)
                continue
            if sample is None:
                self.last_count = handle.next
                return None
            index, handle.next = handle.next, handle.next + 1
            if index == target:
                return sample

    def read(self, shard: int, indices: list[int]) -> Iterator[dict]:
        """Samples at sorted ``indices`` of ``shard``, in order; bad ones as ``{"bad": ...}``."""
        url, i, attempt = self.urls[shard], 0, 0
        if shard != self._visiting:
            self._visit(shard)
        while i < len(indices):
            failure = None
            try:
                sample = self._next_sample(shard, indices[i])
            except Exception as e:
                self._close(shard)
                if isinstance(e, UnsupportedTar):  # reopen with webdataset's parser
                    self._webdataset_only.add(shard)
                    continue
                if storage.is_transient(e) and attempt < self.retries:
                    delay = min(self.backoff * 2**attempt, storage.MAX_BACKOFF)
                    log.warning(
                        "%s: transient read error (%s), reopening at sample %d (retry %d/%d)",
                        url,
                        type(e).__name__,
                        indices[i],
                        attempt + 1,
                        self.retries,
                    )
                    time.sleep(delay)
                    attempt += 1
                    continue
                cause = e.__cause__ if isinstance(e, storage.StorageError) else e
                if cause is not None and storage.is_transient(cause):
                    # An outage that outlived the retries is not bad data: padding over it
                    # would train on repeats. Stop, naming the shard and the endpoint.
                    raise storage.StorageError(
                        f"{url}: storage unreachable at {storage.endpoint_of(url)} after "
                        f"{attempt + 1} attempt(s) ({_why(e)})"
                    ) from e
                transient = isinstance(e, storage.StorageError)
                reason = "unreadable_shard" if transient else "truncated_shard"
                failure = (reason, _why(e))
            else:
                if sample is None:
                    failure = (
                        "truncated_shard",
                        f"ended after {self.last_count} samples, "
                        f"manifest says {self.counts[shard]}",
                    )
            if failure is not None:
                log.warning("%s: %s; %d wanted samples skipped", url, failure[1], len(indices) - i)
                self._close(shard)
                for _ in indices[i:]:
                    yield {"bad": failure[0], "detail": failure[1], "key": "", "url": url}
                return
            attempt = 0
            i += 1
            try:  # a key like "../x" or "/x" is hostile even though nothing is written to disk
                check_member_name(url, sample.get("__key__", ""))
            except DataError as e:
                yield {"bad": "unsafe_name", "detail": str(e), "key": "", "url": url}
                continue
            yield sample


class Visit(NamedTuple):
    """One stretch of reads in one shard: the first and last sample index read there."""

    shard: int
    first: int
    last: int


def _take(it: Iterator, n: int) -> list:
    out = []
    for _ in range(max(0, n)):
        nxt = next(it, None)
        if nxt is None:
            break
        out.append(nxt)
    return out
