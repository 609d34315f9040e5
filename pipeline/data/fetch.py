"""How a loader worker gets a shard's bytes: local files, remote streams read ahead in a
thread (each asked only for the byte range its reader needs), remote shards opened up to
``prefetch`` shards ahead of the one being decoded, each once the stream before it has
read its last byte, and the optional local cache (:mod:`pipeline.data.cache`).

Memory is bounded per loader worker: an open remote stream buffers at most
``READ_AHEAD_CHUNKS + 1`` chunks of ``READ_CHUNK`` bytes (17 MiB), plus one fsspec block
(8 MiB) where s3fs reads it, and at most ``1 + prefetch`` remote streams are open; the tar
parser of each shard being read holds up to ``pipeline.data.shards.PARSE_CHUNK`` (1 MiB) plus
one member. So with ``prefetch_shards: 1`` a worker holds at most ~52 MiB of shard bytes
whatever the shard size.
Cached downloads go to disk in ``COPY_CHUNK`` pieces, at most ``prefetch`` of them in the
background.

Every remote shard of a worker goes through one S3 client
(:func:`pipeline.storage.clients_created` counts them): a plain botocore client reading each
shard with one GET (:func:`pipeline.storage.open_object`), or, for options only s3fs knows,
the worker's s3fs filesystem.
"""

from __future__ import annotations

import contextlib
import io
import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from pipeline import storage
from pipeline.data.cache import CacheRejected, ShardCache
from pipeline.data.iostats import IOStats

log = logging.getLogger(__name__)

__all__ = ["ReadAhead", "ShardFiles", "open_shard", "READ_CHUNK", "READ_AHEAD_CHUNKS"]

READ_CHUNK = 1 << 20
READ_AHEAD_CHUNKS = 16  # per open remote shard: 16 MiB queued, one more chunk being put


class ReadAhead(io.RawIOBase):
    """Reads a file object in a background thread, so remote I/O overlaps decoding.

    At most ``depth`` chunks wait in the queue and one more in the thread's hand: the bytes
    in flight never exceed ``(depth + 1) * chunk``. ``read1`` hands out the chunks as read,
    without a copy (``read(n)`` joins them to ``n`` bytes). ``limit`` (optional) ends the
    stream after that many bytes. ``fetched`` is set once the thread has read to the end (or
    failed): from then on the stream's bytes are all in memory. ``stats`` counts
    ``remote_bytes`` and ``remote_reads`` (chunks read).
    """

    def __init__(
        self,
        f,
        chunk: int = READ_CHUNK,
        depth: int = READ_AHEAD_CHUNKS,
        stats: IOStats | None = None,
        limit: int | None = None,
    ):
        self.f, self.chunk, self.stats = f, chunk, stats or IOStats()
        self.left = limit  # bytes still to read, None: to the end of ``f``
        self.fetched = threading.Event()
        self.q: queue.Queue = queue.Queue(depth)
        self.buf, self.at, self.ended = b"", 0, False  # the chunk being handed out
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._fill, daemon=True, name="shard-readahead")
        self.thread.start()

    def _fill(self) -> None:
        try:
            while not self.stop.is_set():
                n = self.chunk if self.left is None else min(self.chunk, self.left)
                data = self.f.read(n) if n else b""
                if data:
                    self.stats.add("remote_reads")
                    self.stats.add("remote_bytes", len(data))
                    if self.left is not None:
                        self.left -= len(data)
                else:
                    self.fetched.set()
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # handed to the reader, raised there
            self.fetched.set()
            self._put(e)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def _more(self) -> bool:
        """The next chunk into ``buf``; False at the end. Raises what the thread raised."""
        if self.ended:
            return False
        item = self.q.get()
        if isinstance(item, BaseException):
            self._put(item)  # stay failed for later reads
            raise item
        self.buf, self.at, self.ended = item, 0, not item
        return bool(item)

    def read1(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``n < 0``: the rest of a chunk) from at most one chunk."""
        if self.at >= len(self.buf) and not self._more():
            return b""
        if self.at == 0 and (n < 0 or n >= len(self.buf)):
            out, self.buf = self.buf, b""  # the whole chunk, as read
            return out
        end = len(self.buf) if n < 0 else self.at + n
        out, self.at = self.buf[self.at : end], min(end, len(self.buf))
        return out

    def read(self, n: int = -1) -> bytes:
        parts, got = [], 0
        while n < 0 or got < n:
            part = self.read1(-1 if n < 0 else n - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, b) -> int:
        data = self.read1(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stop.set()
        while True:  # unblock a pending put so the thread sees ``stop`` at once
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=5)
        self.f.close()
        super().close()


def open_shard(
    url: str,
    storage_options: dict | None = None,
    size: int | None = None,
    stats: IOStats | None = None,
    start: int = 0,
    end: int | None = None,
):
    """A readable stream of the shard at ``url`` from byte ``start`` (remote reads are
    prefetched); a remote one ends at byte ``end`` where given (a local file is read to its
    end: nothing is read ahead of its reader).

    ``size`` (from the manifest) saves a HEAD request per remote shard.
    """
    if not storage.is_local(url):
        obj = storage.open_object(url, storage_options, start, end)
        if obj is not None:  # one GET, read in READ_CHUNK pieces by the read-ahead thread
            return ReadAhead(obj, stats=stats)
        # s3fs: "readahead", one ranged GET per ~9 MiB rather than one per read() call
        extra = {"size": size} if size else {}
        f = storage.open_url(
            url,
            "rb",
            storage_options,
            retries=0,
            block_size=8 << 20,
            cache_type="readahead",
            **extra,
        )
        if start:
            f.seek(start)
        return ReadAhead(f, stats=stats, limit=None if end is None else end - start)
    f = storage.open_url(url, "rb", storage_options, retries=0)
    if start:
        f.seek(start)
    return f


class ShardFiles:
    """Opens a manifest's shards by index; remote ones can be fetched ahead of use.

    ``open(i, start, end)`` returns a readable stream of shard ``i`` from byte ``start`` (to
    byte ``end`` where given, remote shards only), taking what ``prefetch`` started;
    ``prefetch(i, start, end)`` asks for shard ``i`` ahead of use; ``keep(ids)`` drops what
    was asked for shards outside ``ids``. Local shards are opened directly.

    Without a cache, a prefetched stream is opened (its read-ahead thread sends the GET) only
    once the stream opened before it has read its last byte (:meth:`poll`): at the start of an
    epoch the first shard's GET goes alone, and a stream opened ahead waits on its open
    connection only while its reader takes the last read-ahead of the stream before it, not
    through the whole of a long shard. With a cache, the download into it starts at once, in
    the background.

    Counters in ``stats``: ``opened`` (remote streams and downloads started), ``prefetched``
    (those started ahead of use), ``max_open`` (remote streams open at once), plus those of
    :class:`ReadAhead` and :class:`~pipeline.data.cache.ShardCache`.
    """

    def __init__(
        self,
        urls: list[str],
        sizes: list[int] | None,
        sha256: list[str] | None,
        storage_options: dict | None,
        prefetch: int = 0,
        cache: ShardCache | None = None,
        stats: IOStats | None = None,
    ):
        self.urls, self.storage_options = urls, storage_options
        self.sizes = sizes or [0] * len(urls)
        self.sha256 = sha256 or [""] * len(urls)
        self.prefetch_depth, self.cache = prefetch, cache
        self.stats = stats or IOStats()
        self._parked: dict[int, tuple[ReadAhead, int, int | None]] = {}  # opened ahead of use
        self.deferred: dict[int, tuple[int, int | None]] = {}  # asked for, not opened yet
        self._last: ReadAhead | None = None  # the remote stream opened last
        self._pending: dict[int, Future] = {}  # cache downloads in flight
        self._pool: ThreadPoolExecutor | None = None
        self._streams: set = set()  # every remote stream open now (for max_open)

    def _cached(self, i: int) -> bool:
        return self.cache is not None and 0 < self.sizes[i] and not storage.is_local(self.urls[i])

    def _stream(self, i: int, start: int = 0, end: int | None = None):
        size = self.sizes[i] or None
        f = open_shard(self.urls[i], self.storage_options, size, self.stats, start, end)
        if not storage.is_local(self.urls[i]):
            self.stats.add("opened")
            self._last = f
            self._streams.add(f)
            self._streams = {s for s in self._streams if not s.closed}
            self.stats.peak("max_open", len(self._streams))
        return f

    def prefetch(self, i: int, start: int = 0, end: int | None = None) -> None:
        if storage.is_local(self.urls[i]) or i in self._parked or i in self._pending:
            return
        if self._cached(i):
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max(1, self.prefetch_depth), thread_name_prefix="shard-prefetch"
                )
            self._pending[i] = self._pool.submit(self._from_cache, i)
            self.stats.add("prefetched")
        else:  # opened by poll(), after the stream opened before it has read its last byte
            self.deferred.setdefault(i, (start, end))

    def poll(self) -> None:
        """Open the streams asked for ahead, in order, each once the one opened before it
        has read to its end."""
        while self.deferred and (
            self._last is None or self._last.closed or self._last.fetched.is_set()
        ):
            i = next(iter(self.deferred))
            start, end = self.deferred.pop(i)
            self._parked[i] = (self._stream(i, start, end), start, end)
            self.stats.add("prefetched")

    def open(self, i: int, start: int = 0, end: int | None = None):
        """Shard ``i`` as a readable binary stream from byte ``start`` (to ``end``, remote
        only); the caller closes it."""
        self.deferred.pop(i, None)
        if i in self._parked:
            f, at, to = self._parked.pop(i)
            if (at, to) == (start, end):
                return f
            f.close()  # fetched for another span of the shard: ask for this one
        if i in self._pending:
            f = self._pending.pop(i).result()  # raises what the download raised
        elif self._cached(i):
            f = self._from_cache(i)
        else:
            return self._stream(i, start, end)
        if f is None:  # did not fit in the cache, or did not match the manifest
            return self._stream(i, start, end)
        if start:
            f.seek(start)
        return f

    def _from_cache(self, i: int):
        """The cached copy of shard ``i``, downloading it on a miss; None: stream it."""
        assert self.cache is not None
        url, size, sha = self.urls[i], self.sizes[i], self.sha256[i]
        f = self.cache.lookup(url, size, sha)
        if f is not None:
            return f
        try:
            return self.cache.fill(url, size, sha, self.storage_options)
        except CacheRejected as e:
            log.warning("%s; reading it uncached", e)
            return None

    def keep(self, ids: set[int]) -> None:
        """Close or forget what was asked ahead for shards not in ``ids``."""
        for i in [i for i in self._parked if i not in ids]:
            self._parked.pop(i)[0].close()
        for i in [i for i in self.deferred if i not in ids]:
            del self.deferred[i]
        for i in [i for i in self._pending if i not in ids]:
            self._pending.pop(i).add_done_callback(_close_result)

    def close(self) -> None:
        self.keep(set())
        self._last = None
        if self.cache is not None:
            self.cache.stop.set()  # downloads in progress give up at their next chunk
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self.cache is not None:
            self.cache.stop.clear()


def _close_result(future: Future) -> None:
    with contextlib.suppress(BaseException):
        f = future.result()
        if f is not None:
            f.close()
