"""The global per-epoch plan: which sample every (rank, DataLoader worker, batch slot) gets.

Pure arithmetic, no I/O. Terms:

* **plan**: one epoch's order of all ``N`` samples, a function of ``(seed, epoch)`` only. Shard
  order is a seeded permutation; the concatenated shard streams are then shuffled within
  consecutive blocks of ``block`` samples (a deterministic "shuffle buffer": reading a block
  needs a block of memory, and any position can be replayed without reading earlier blocks).
* **segments**: plan ranges ``[a, b)`` still to be served this epoch, ``[[0, N]]`` at its start.
  Their concatenation is the work sequence ``V`` of length ``R``.
* **split**: ``V`` cut for ``world_size`` ranks of ``batches`` batches each (``R // (W*B)``;
  the tail of ``V`` is dropped, or with padding ``ceil`` and ``V`` wraps around), then each
  rank's batches cut into contiguous runs, one per DataLoader worker.

A DataLoader over an ``IterableDataset`` hands out worker batches round-robin, skipping
exhausted workers, so after ``k`` batches on a rank each worker's consumed count and whose
turn is next are known (:func:`round_robin`); this is what makes resume exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _seed(*parts: int) -> list[int]:
    return [p % 2**63 for p in parts]


class EpochPlan:
    """Plan positions -> (manifest shard index, sample index inside the shard)."""

    def __init__(self, shard_sizes: list[int], seed: int, epoch: int, block: int, shuffle: bool):
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.block = max(1, block) if shuffle else 1
        n = len(shard_sizes)
        rng = np.random.default_rng(_seed(seed, epoch))
        self.shard_order = rng.permutation(n) if shuffle else np.arange(n)
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(shard_sizes)[self.shard_order])])
        self.total = int(self.starts[-1])
        self._perm_cache: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def block_perm(self, j: int) -> np.ndarray:
        """Within-block order of block ``j``: stream offset of each plan offset."""
        if self._perm_cache[0] != j:
            length = min(self.block, self.total - j * self.block)
            perm = (
                np.random.default_rng(_seed(self.seed, self.epoch, j)).permutation(length)
                if self.block > 1
                else np.arange(length)
            )
            self._perm_cache = (j, perm)
        return self._perm_cache[1]

    def stream_positions(self, a: int, b: int) -> np.ndarray:
        """Stream positions (index into the shuffled shard concatenation) of plan ``[a, b)``."""
        out = []
        for j in range(a // self.block, (b - 1) // self.block + 1):
            lo, hi = max(a, j * self.block), min(b, (j + 1) * self.block)
            out.append(
                j * self.block + self.block_perm(j)[lo - j * self.block : hi - j * self.block]
            )
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def locate(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stream positions -> (manifest shard index, index inside that shard)."""
        k = np.searchsorted(self.starts, q, side="right") - 1
        return self.shard_order[k], q - self.starts[k]


def round_robin(sizes: list[int], k: int) -> tuple[list[int], int]:
    """Hand out ``k`` batches round-robin over workers with ``sizes`` batches, skipping
    exhausted ones, as a DataLoader does. Returns each worker's count taken and the worker
    whose turn is next (a resumed DataLoader starts at worker 0, so roles rotate by it).
    """
    taken, nxt, t = [0] * len(sizes), 0, 0
    while k > 0:
        active = [w for w, s in enumerate(sizes) if s > t]
        if not active:
            break
        for w in active[:k]:
            taken[w] += 1
            nxt = (w + 1) % len(sizes)
        k -= min(k, len(active))
        t += 1
    return taken, nxt


def normalize_segments(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop empty ranges and merge adjacent ones (keeps order)."""
    out: list[tuple[int, int]] = []
    for a, b in segments:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@dataclass(frozen=True)
class Split:
    """``segments`` cut for ``world_size`` ranks x ``num_workers`` workers of ``batch_size``."""

    segments: tuple[tuple[int, int], ...]
    world_size: int
    num_workers: int  # >= 1; num_workers=0 (in-process) splits like 1
    batch_size: int
    pad: bool = False

    @property
    def available(self) -> int:
        """``R``: samples in the work sequence."""
        return sum(b - a for a, b in self.segments)

    @property
    def batches(self) -> int:
        """Batches every rank yields."""
        per_step = self.world_size * self.batch_size
        return -(-self.available // per_step) if self.pad else self.available // per_step

    @property
    def dropped(self) -> int:
        return max(0, self.available - self.batches * self.world_size * self.batch_size)

    @property
    def padded(self) -> int:
        return max(0, self.batches * self.world_size * self.batch_size - self.available)

    def worker_batches(self) -> list[int]:
        """Batch count of each worker (the same on every rank)."""
        n, q = self.num_workers, self.batches
        return [(w + 1) * q // n - w * q // n for w in range(n)]

    def _plan_ranges(self, x: int, y: int) -> list[tuple[int, int, bool]]:
        """``V[x:y]`` as plan ranges ``(a, b, is_pad)``; positions past ``R`` wrap (padding)."""
        out, r = [], self.available
        while x < y and r:
            vx, pad = x % r, x >= r
            take = min(y - x, r - vx)
            start = 0
            for a, b in self.segments:
                lo, hi = max(vx, start), min(vx + take, start + b - a)
                if lo < hi:
                    out.append((a + lo - start, a + hi - start, pad))
                start += b - a
            x += take
        return out

    def work(self, rank: int, worker: int, skip: int = 0) -> list[tuple[int, int, bool]]:
        """Plan ranges of one worker on one rank, after its first ``skip`` batches."""
        sizes = self.worker_batches()
        first = rank * self.batches + sum(sizes[:worker]) + skip
        last = rank * self.batches + sum(sizes[: worker + 1])
        return self._plan_ranges(first * self.batch_size, last * self.batch_size)

    def remaining(self, consumed: int) -> list[tuple[int, int]]:
        """Segments left after every rank took ``consumed`` batches (padding not carried)."""
        taken, _ = round_robin(self.worker_batches(), consumed)
        left = []
        for rank in range(self.world_size):
            for w, t in enumerate(taken):
                left += [(a, b) for a, b, pad in self.work(rank, w, skip=t) if not pad]
        return normalize_segments(left)
