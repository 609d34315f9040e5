"""A local shard cache for multi-epoch runs on data larger than RAM: LRU by size, atomic.

Layout: ``{cache_dir}/{sha256}.tar`` per shard, named by the manifest's sha256 (or, where
the manifest records none, by a hash of the URL and size), and ``{cache_dir}/.lock``.

* A file under a final name holds exactly the bytes the manifest describes: a download goes
  to ``.{name}.tmp-{uuid}`` beside it, is checked against the manifest's size and sha256 as
  it is written, and only then renamed (``os.replace``, atomic). A worker killed mid-download
  leaves a temp file only, never read, and removed by the next process that finds it
  unlocked (a download holds an exclusive ``flock`` on its temp file while it lives).
* The files in the folder never sum past ``max_bytes``: a download reserves its shard's
  size under the folder lock first (its temp file is sized to the shard at once), evicting
  the least recently used shards to make room. A shard that does not fit, even after
  eviction (larger than ``max_bytes``, or beside other downloads in progress), or that
  another worker is downloading at that moment, is streamed without caching.
* Loader workers, and ranks on one node, share a folder: the lock is ``flock`` on ``.lock``.
  Readers hold cached shards by file descriptor, so an eviction under them is safe.
* A hit trusts the final name and checks the size only (the sha256 was checked when the file
  was written); a file of the wrong size is removed and fetched again. A manifest without a
  sha256 (none this project writes) is checked by size alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import threading
import uuid
from typing import IO

from pipeline import storage
from pipeline.data.iostats import IOStats

log = logging.getLogger(__name__)

__all__ = ["ShardCache", "CacheRejected"]

COPY_CHUNK = 8 << 20  # bytes per ranged GET while filling
LOCK_NAME = ".lock"


class CacheRejected(Exception):
    """The downloaded bytes do not match the manifest (size or sha256): not cached."""


class ShardCache:
    """One process's handle on a shared cache folder.

    Args:
        root: a local folder (created if missing).
        max_bytes: the bound on the sum of the folder's file sizes.
        stats: counters: ``cache_hits``, ``cache_misses``, ``cache_evicted``,
            ``cache_bypass`` (did not fit), ``cache_rejected`` (bytes not as the manifest
            says), ``opened`` (downloads started), ``remote_bytes`` (bytes downloaded).
    """

    def __init__(self, root: str, max_bytes: int, stats: IOStats | None = None):
        self.root, self.max_bytes = os.path.abspath(root), max_bytes
        self.stats = stats or IOStats()
        self.stop = threading.Event()  # set: downloads in progress give up
        os.makedirs(self.root, exist_ok=True)

    @staticmethod
    def name(url: str, size: int, sha256: str = "") -> str:
        if sha256:
            return f"{sha256}.tar"
        return f"url-{hashlib.sha256(url.encode()).hexdigest()[:32]}-{size}.tar"

    def lookup(self, url: str, size: int, sha256: str = "") -> IO[bytes] | None:
        """The cached shard opened for reading (marked as just used), or None."""
        path = os.path.join(self.root, self.name(url, size, sha256))
        try:
            f = open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            self.stats.add("cache_misses")
            return None
        if os.fstat(f.fileno()).st_size != size:
            f.close()
            log.warning("%s: cached copy has the wrong size; fetching it again", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.stats.add("cache_misses")
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # LRU order is mtime order
        self.stats.add("cache_hits")
        return f

    def fill(
        self, url: str, size: int, sha256: str = "", storage_options: dict | None = None
    ) -> IO[bytes] | None:
        """Download ``url`` into the cache and return it opened, or None when it does not fit.

        Raises:
            CacheRejected: the bytes differ from the manifest's size or sha256.
            Exception: a storage error while downloading (the caller retries); nothing is
                left behind.
        """
        name = self.name(url, size, sha256)
        reserved = self._reserve(name, size)
        if reserved == "published":  # another worker published it since our lookup missed
            try:
                f = open(os.path.join(self.root, name), "rb")  # noqa: SIM115 - caller closes
            except FileNotFoundError:  # and it was evicted again at once
                reserved = None
            else:
                self.stats.add("cache_misses", -1)  # a hit after all
                self.stats.add("cache_hits")
                return f
        if reserved is None:
            self.stats.add("cache_bypass")
            return None
        fd, tmp = reserved
        self.stats.add("opened")  # a remote read started, as a streamed shard counts one
        published = False
        try:
            got, digest = self._download(url, size, fd, storage_options)
            if got != size or (sha256 and digest != sha256):
                self.stats.add("cache_rejected")
                what = f"{got} bytes" if got != size else f"sha256 {digest[:12]}..."
                raise CacheRejected(
                    f"{url}: {what}, manifest says {size} bytes, sha256 {sha256[:12] or '-'}..."
                )
            os.replace(tmp, os.path.join(self.root, name))
            published = True
            os.lseek(fd, 0, os.SEEK_SET)
            return os.fdopen(fd, "rb")  # the same inode, even if evicted at once
        finally:
            if not published:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                os.close(fd)

    def _download(
        self, url: str, size: int, fd: int, storage_options: dict | None
    ) -> tuple[int, str]:
        digest, got = hashlib.sha256(), 0
        # ranged GETs of COPY_CHUNK bytes; the reader retries transient errors (retries=0)
        with storage.open_url(
            url,
            "rb",
            storage_options,
            retries=0,
            block_size=COPY_CHUNK,
            cache_type="none",
            size=size,
        ) as src:
            while got < size:
                if self.stop.is_set():
                    raise InterruptedError(f"{url}: download cancelled")
                try:
                    data = src.read(min(COPY_CHUNK, size - got))
                except OSError as e:  # a range past the object's end: shorter than said
                    if e.errno == errno.EINVAL and got:
                        break
                    raise
                if not data:
                    break
                self.stats.add("remote_bytes", len(data))
                digest.update(data)
                os.pwrite(fd, data, got)
                got += len(data)
        return got, digest.hexdigest()

    # ------------------------------------------------------------------ space

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(os.path.join(self.root, LOCK_NAME), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _reserve(self, name: str, size: int) -> tuple[int, str] | str | None:
        """Under the folder lock: make room for ``size`` bytes, then create the temp file
        (locked, sized) that holds that room. None when it cannot fit, or when another
        worker is downloading the same shard now (a second copy would evict a shard to make
        room for a duplicate); ``"published"`` when the shard is in the folder already."""
        if size > self.max_bytes:
            return None
        with self._locked():
            if os.path.exists(os.path.join(self.root, name)):
                return "published"
            if any(
                e.name.startswith(f".{name}{storage.TMP_MARK}") and not _orphaned(e.path)
                for e in os.scandir(self.root)
            ):
                return None
            finals, used = self._scan()
            for path, nbytes in finals:  # oldest first
                if used + size <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    used -= nbytes
                    self.stats.add("cache_evicted")
            if used + size > self.max_bytes:
                return None
            tmp = os.path.join(self.root, f".{name}{storage.TMP_MARK}{uuid.uuid4().hex[:12]}")
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, size)
            return fd, tmp

    def _scan(self) -> tuple[list[tuple[str, int]], int]:
        """Final files oldest first, and the bytes of everything in the folder. Temp files
        whose writer is gone (their lock is free) are removed on the way."""
        finals, used = [], 0
        for entry in os.scandir(self.root):
            if entry.name == LOCK_NAME or not entry.is_file(follow_symlinks=False):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.name.startswith(".") and storage.TMP_MARK in entry.name:
                if _orphaned(entry.path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    continue
            else:
                finals.append((st.st_mtime_ns, entry.path, st.st_size))
            used += st.st_size
        finals.sort()
        return [(path, nbytes) for _, path, nbytes in finals], used

    def size(self) -> int:
        """Bytes in the folder now (finals and reserved temp files)."""
        with self._locked():
            return self._scan()[1]


def _orphaned(path: str) -> bool:
    """Whether no live process holds the temp file at ``path`` (its flock is free)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    finally:
        os.close(fd)
