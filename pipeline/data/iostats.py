"""Counters of one loader worker's shard I/O, safe to bump from its prefetch threads."""

from __future__ import annotations

import threading
from collections import Counter

__all__ = ["IOStats"]


class IOStats:
    """``add`` counts, ``peak`` keeps a maximum; ``snapshot`` is a plain dict of both."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def peak(self, key: str, value: int) -> None:
        with self._lock:
            self._counts[key] = max(self._counts[key], value)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
