"""Stream one rank's batches out of a split's shards: exact, shuffled, resumable.

Epoch semantics (see :mod:`pipeline.data.plan`):

* The epoch's order is a global plan seeded by ``(seed, epoch)``: shard order, then a
  block-wise sample shuffle of ``shuffle_buffer`` samples. It does not depend on rank, world
  size or worker count.
* Every rank yields exactly ``len(stream) == N // (world_size * batch_size)`` batches (rank r
  takes the r-th contiguous run of the plan); the last ``N mod (world_size * batch_size)``
  samples of the plan are dropped, or with ``remainder: pad`` the plan wraps around to fill
  the last batches, those slots marked ``pad``. ``stats()`` reports both counts.
* Each rank's run is cut into contiguous runs of whole batches, one per DataLoader worker;
  the DataLoader interleaves them round-robin. Any shard count, world size and worker count
  works: a worker with no batches simply ends, so nothing ever waits on a missing batch.
* A bad sample keeps its slot: it is replaced by a repeat of a good sample of its batch
  (``pad=True``) and counted in ``stats()``; past ``max_bad_samples`` per rank per epoch the
  pass raises :class:`BadDataError` naming the shard.
* The position is the number of batches handed to the caller, counted in the main process
  (not in workers, which run ahead). ``state_dict()`` is identical on every rank; restored
  with the same world size, batch size and worker count a reader yields exactly the rest of
  the epoch in the same order. With another layout, the rest of the epoch is re-split over
  the new ranks (a new remainder is dropped or padded and counted).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import storage
from pipeline.data import WORKER_PRELOAD
from pipeline.data.cache import ShardCache
from pipeline.data.config import StreamConfig
from pipeline.data.errors import BadDataError, DataError
from pipeline.data.iostats import IOStats
from pipeline.data.manifest import Manifest, read_manifest
from pipeline.data.plan import EpochPlan, Split, round_robin
from pipeline.data.shards import ShardReader, Visit
from pipeline.data.transforms import (
    batched,
    collate,
    decode,
    fill_bad,
    normalize,
    pipeline,
    stage,
)
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)
STATE_VERSION = 1
_CHUNK = 512  # plan positions fetched per step when shuffle blocks are smaller
# A loader worker's uint8 batch of at most this many bytes crosses to the main process in the
# pickled batch (one pipe write), larger ones in shared memory (a segment and an fd handshake
# per batch). Measured at 2 workers on 2 cores: 28x28 batches of 256 (200 KB) 38k -> 41k
# img/s and 64x64 RGB batches of 64 (786 KB) 12.2k -> 13.7k inline; 64x64 batches of 256
# (3 MB) 13.6k -> 13.0k and 256x256 batches of 64 (12.6 MB) 1.96k -> 1.05k: shared memory.
INLINE_BATCH_BYTES = 1 << 20


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(
            name, f"environment variable must be an integer, got {os.environ[name]!r}"
        ) from None


class ShardStream(IterableDataset):
    """One rank's batches of one split, as an ``IterableDataset`` of ready batches.

    Each batch is a dict: ``image`` uint8 ``(B, C, H, W)`` (:func:`make_loader` hands it on as
    float32 scaled per ``config.normalize``, ``unit``: [0, 1]), ``label`` int64 ``(B,)`` (-1: none), ``key`` list of B sample keys,
    ``pad`` bool ``(B,)`` (True: a repeat filling a bad sample or the padded remainder) and
    ``skipped`` (what this batch lost). Iterate it through :func:`make_loader`.

    Args:
        config: the stream config; ``train_url``/``test_url`` hold a manifest each.
        rank: this rank, default env ``RANK`` or 0.
        world_size: ranks in the job, default env ``WORLD_SIZE`` or 1.
        batch_size: samples per batch on this rank.
        split: ``train`` (reads ``train_url``) or ``test`` (reads ``test_url``).
        shuffle: default True for train, False for test.
        num_workers: DataLoader workers, default ``config.num_workers``.
    """

    def __init__(
        self,
        config: StreamConfig,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int = 64,
        split: str = "train",
        shuffle: bool | None = None,
        num_workers: int | None = None,
    ):
        super().__init__()
        self.config = config
        self.rank = _env_int("RANK", 0) if rank is None else rank
        self.world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ConfigError("rank", f"must be in [0, {self.world_size}), got {self.rank}")
        if batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
        if split not in ("train", "test"):
            raise ConfigError("split", f"expected 'train' or 'test', got {split!r}")
        url = config.train_url if split == "train" else config.test_url
        if not url:
            raise ConfigError(f"{split}_url", f"required to stream the {split} split")
        self.batch_size, self.split = batch_size, split
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.num_workers = config.num_workers if num_workers is None else num_workers
        self.inline_batch_bytes = INLINE_BATCH_BYTES  # travels to the workers with the stream
        self.manifest: Manifest = read_manifest(
            url, config.storage_options, config.retries, config.retry_backoff
        )
        self._setup_decoding()
        self._start_epoch(0)

    def _setup_decoding(self) -> None:
        stats, config = self.manifest.stats, self.config
        size = config.image_size
        self.image_hw = (size, size) if size else (stats.get("height", 0), stats.get("width", 0))
        if not all(self.image_hw):
            raise ConfigError(
                "image_size", f"{self.manifest.url} holds images of mixed sizes; set image_size"
            )
        self.channels = config.channels or stats.get("channels") or 3
        mean, std = stats.get("mean") or [0.5], stats.get("std") or [0.5]
        if len(mean) != self.channels:  # e.g. RGB stats for a grayscale stream
            mean = [float(np.mean(mean))] * self.channels
            std = [float(np.mean(std))] * self.channels
        self.mean, self.std = mean, std

    # ------------------------------------------------------------------ position

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._segments: list[tuple[int, int]] | None = None  # None: the whole plan
        self._layout: tuple[int, int, int] | None = None  # (world_size, workers, batch_size)
        self._batches = self._pass_start = 0
        self._started = self._restored = False
        self._bad: Counter = Counter()
        self._last_bad: dict = {}
        self._io: dict[int, dict[str, int]] = {}  # loader worker -> its I/O counters

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``.

        Right after :meth:`load_state_dict`, ``set_epoch`` of the restored epoch keeps the
        restored position, so ``load_state_dict(s); for e in ...: set_epoch(e)`` resumes.
        """
        if not (self._restored and epoch == self.epoch):
            self._start_epoch(epoch)

    def _current_layout(self, num_workers: int) -> tuple[int, int, int]:
        return (self.world_size, max(1, num_workers), self.batch_size)

    def _split(self, layout: tuple[int, int, int] | None = None) -> Split:
        segments = self._segments if self._segments is not None else [(0, self.manifest.count)]
        world_size, workers, batch_size = (
            layout or self._layout or self._current_layout(self.num_workers)
        )
        return Split(
            tuple(map(tuple, segments)),
            world_size,
            workers,
            batch_size,
            pad=self.config.remainder == "pad",
        )

    def _begin(self, num_workers: int) -> None:
        """Fix this pass's layout in the main process, before workers copy the stream."""
        if self._started and self._batches >= self._split().batches:
            self._start_epoch(self.epoch + 1)  # a pass at the end of an epoch starts the next
        layout = self._current_layout(num_workers)
        if self._layout is not None and self._layout != layout:
            self._segments = self._split().remaining(self._batches)
            self._batches = 0
            log.info(
                "rank %d: re-split the rest of epoch %d (%d samples) from layout %s to %s",
                self.rank,
                self.epoch,
                sum(b - a for a, b in self._segments),
                self._layout,
                layout,
            )
        self._layout, self._pass_start = layout, self._batches
        self._started, self._restored = True, False
        self._io = {}

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (including any already consumed)."""
        return self._split().batches

    def state_dict(self, bad_by_rank: list[dict[str, int]] | None = None) -> dict:
        """The epoch position; the same on every rank (save rank 0's).

        Args:
            bad_by_rank: every rank's :meth:`bad_counts` (gathered by the caller), so a resumed
                epoch keeps counting each rank's bad samples against ``max_bad_samples``
                instead of starting from zero. None: this rank's only.
        """
        world_size, workers, batch_size = self._layout or (0, 0, 0)
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches": self._batches,
            "seed": self.config.seed,
            "num_samples": self.manifest.count,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.config.shuffle_buffer,
            "world_size": world_size,
            "num_workers": workers,
            "batch_size": batch_size,
            "segments": None if self._segments is None else [list(s) for s in self._segments],
            "bad_by_rank": [dict(c) for c in bad_by_rank]
            if bad_by_rank is not None
            else [dict(self._bad)],
        }

    def bad_counts(self) -> dict[str, int]:
        """This rank's bad samples per reason in the current epoch (the budget's count)."""
        return dict(self._bad)

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict` (any rank's, any world size).

        Raises:
            DataError: the state belongs to another dataset, seed or shuffle setting.
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(f"stream state version {state.get('version')!r} != {STATE_VERSION}")
        mine = {
            "seed": self.config.seed,
            "num_samples": self.manifest.count,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.config.shuffle_buffer,
        }
        for key, value in mine.items():
            if state.get(key) != value:
                raise DataError(
                    f"stream state does not match {self.manifest.url}: {key} "
                    f"{state.get(key)!r} != {value!r}"
                )
        self._start_epoch(int(state["epoch"]))
        self._restored = True
        if state["world_size"]:
            self._layout = (
                int(state["world_size"]),
                int(state["num_workers"]),
                int(state["batch_size"]),
            )
            self._batches, self._started = int(state["batches"]), True
        if state.get("segments") is not None:
            self._segments = [(int(a), int(b)) for a, b in state["segments"]]
        # the epoch's bad samples so far: old rank i's count goes to rank i % world_size, so
        # the total carries over to any world size (and each rank's own to the same one)
        for i, counts in enumerate(state.get("bad_by_rank") or []):
            if i % self.world_size == self.rank:
                self._bad.update({str(k): int(v) for k, v in counts.items()})

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch images -> float32 per ``config.normalize``, on their device."""
        return normalize(images, self.config.normalize, self.mean, self.std)

    def stats(self) -> dict:
        """This rank's counters for the current epoch (remainder counts are global)."""
        split = self._split()
        return {
            "epoch": self.epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "batches": self._batches,
            "batches_per_epoch": split.batches,
            "samples": self._batches * self.batch_size,
            "dataset_samples": self.manifest.count,
            "dropped": split.dropped,
            "padded": split.padded,
            "bad_samples": sum(self._bad.values()),
            "bad_reasons": dict(self._bad),
            "io_by_worker": {w: dict(c) for w, c in sorted(self._io.items())},
        }

    def _record(self, batch: dict) -> None:
        """Count one batch handed to the caller; enforce the bad-sample budget."""
        self._batches += 1
        worker, io = batch.pop("io", (0, {}))
        self._io[worker] = io
        for bad in batch["skipped"]:
            self._bad[bad["bad"]] += 1
            self._last_bad = bad
            total = sum(self._bad.values())
            if total <= 10 or total % 100 == 0:
                log.warning(
                    "rank %d: skipped bad sample %s (%s; %d so far this epoch)",
                    self.rank,
                    bad["key"] or "?",
                    bad["detail"],
                    total,
                )
        total = sum(self._bad.values())
        if total > self.config.max_bad_samples:
            last = self._last_bad
            raise BadDataError(
                f"rank {self.rank}: {total} bad samples in epoch {self.epoch} exceed "
                f"max_bad_samples={self.config.max_bad_samples}; last: {last['bad']} in "
                f"{last['url']} ({last['detail']})"
            )

    # ------------------------------------------------------------------ reading

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:  # in-process: this is also where batches are counted
            self._begin(0)
            for batch in self._produce(0):
                self._record(batch)
                yield batch
            return
        if self._layout is None or self._layout[1] != info.num_workers:
            raise DataError(
                "iterate a ShardStream through make_loader(), which fixes the "
                "worker layout and counts batches in the main process"
            )
        for batch in self._produce(info.id):
            # label/pad, and images up to INLINE_BATCH_BYTES, cross to the main process
            # inside the pickled batch: every tensor costs a shared-memory segment plus an
            # fd handshake the main process waits on
            batch["label"], batch["pad"] = batch["label"].numpy(), batch["pad"].numpy()
            if batch["image"].numel() <= self.inline_batch_bytes:
                batch["image"] = batch["image"].numpy()
            yield batch

    def _produce(self, worker: int) -> Iterator[dict]:
        split = self._split()
        taken, turn = round_robin(split.worker_batches(), self._pass_start)
        role = (worker + turn) % split.num_workers  # a resumed pass starts at the next turn
        work = split.work(self.rank, role, taken[role])
        counts = [s.samples for s in self.manifest.shards]
        c = self.config

        def plan() -> EpochPlan:
            return EpochPlan(counts, c.seed, self.epoch, c.shuffle_buffer, self.shuffle)

        stats = IOStats()
        cache = ShardCache(c.cache_dir, c.cache_max_bytes, stats) if c.cache_dir else None
        reader = ShardReader(
            [self.manifest.shard_url(i) for i in range(len(counts))],
            counts,
            c.storage_options,
            c.retries,
            c.retry_backoff,
            sizes=[s.bytes for s in self.manifest.shards],
            sha256=[s.sha256 for s in self.manifest.shards],
            prefetch=c.prefetch_shards,
            cache=cache,
            # the same arithmetic on its own plan object: the shards this worker will visit
            schedule=_visits(self._fetches(plan(), work)),
            stats=stats,
            index=[s.index for s in self.manifest.shards],
        )
        stages = [
            stage(
                decode,
                size=self.image_hw,
                channels=self.channels,
                resize=bool(c.image_size),
                crop=c.crop,
                max_pixels=c.max_pixels,
                seed=c.seed,
                epoch=self.epoch,
                draft=c.jpeg_draft,
                decoder=c.jpeg_decoder,
            ),
            stage(batched, batch_size=self.batch_size),
            stage(fill_bad, shape=(self.channels, *self.image_hw)),
            stage(collate),
        ]
        try:
            for batch in pipeline(self._raw(plan(), work, reader), stages):
                # this worker's I/O so far; the main process keeps the latest per worker
                io = {
                    **stats.snapshot(),
                    "s3_clients": storage.clients_created(),
                    "s3_clients_preloaded": storage.clients_created(preloaded=True),
                    "s3_clients_forked": storage.clients_created(forked=True),
                }
                batch["io"] = (worker, io)
                yield batch
        finally:
            reader.close()

    @staticmethod
    def _fetches(
        plan: EpochPlan, work: list[tuple[int, int, bool]]
    ) -> Iterator[tuple[int, int, bool, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per step of whole shuffle blocks: ``(lo, hi, pad, q, sorted_q, shards, indices)``,
        plan ``[lo, hi)`` as stream positions ``q`` and their sorted (shard, index)."""
        step = plan.block * max(1, _CHUNK // plan.block)  # whole shuffle blocks per fetch
        for a, b, pad in work:
            lo = a
            while lo < b:
                hi = min(b, (lo // step + 1) * step)
                q = plan.stream_positions(lo, hi)
                sorted_q = np.sort(q)
                shards, indices = plan.locate(sorted_q)
                yield lo, hi, pad, q, sorted_q, shards, indices
                lo = hi

    @classmethod
    def _raw(
        cls, plan: EpochPlan, work: list[tuple[int, int, bool]], reader: ShardReader
    ) -> Iterator[dict]:
        """Raw samples of plan ranges, in plan order, one per position (bad ones marked)."""
        for lo, hi, pad, q, sorted_q, shards, indices in cls._fetches(plan, work):
            fetched: list[dict] = []  # in sorted_q's order
            for start, end in _runs(shards):
                fetched += reader.read(int(shards[start]), indices[start:end].tolist())
            # each position's sample: the first of its equals in sorted_q (a padded remainder
            # can repeat a position; every copy is the same sample)
            for pos, at in zip(range(lo, hi), np.searchsorted(sorted_q, q).tolist()):
                sample = fetched[at]
                if "bad" in sample:
                    yield {**sample, "pad": pad}
                else:
                    # set in place, not copied: the decode stage turns each raw sample into
                    # a new item before this resumes, so a repeated position (a padded
                    # remainder) is read with its own values (~0.3 us a sample at 28x28)
                    sample["__pos__"], sample["__pad__"] = pos, pad
                    yield sample


def _runs(shards: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of equal values in ``shards``."""
    cuts = [0, *(np.flatnonzero(np.diff(shards)) + 1).tolist(), len(shards)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _visits(fetches) -> Iterator[Visit]:
    """The shard visits :meth:`ShardStream._raw` makes, in order (repeats in a row merged),
    each with the first and the last sample index it reads."""
    visit: Visit | None = None
    for *_, shards, indices in fetches:
        for start, end in _runs(shards):
            shard, first, last = int(shards[start]), int(indices[start]), int(indices[end - 1])
            if visit is not None and visit.shard == shard:
                visit = visit._replace(last=max(visit.last, last))
                continue
            if visit is not None:
                yield visit
            visit = Visit(shard, first, last)
    if visit is not None:
        yield visit


class StreamLoader:
    """A DataLoader over a :class:`ShardStream` that counts batches for ``state_dict``.

    Batches cross from the loader workers as uint8; each is moved to ``device`` (if given)
    and scaled there per ``config.normalize``, so ``image`` arrives as float32.
    """

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int,
        device: torch.device | str | None = None,
        **loader_kwargs,
    ):
        self.stream, self.num_workers, self.device = stream, num_workers, device
        stream.num_workers = num_workers
        self.loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=False,
            **loader_kwargs,
        )

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:  # the stream counts in-process itself
            for batch in self.loader:
                yield self._scaled(batch)
            return
        self.stream._begin(self.num_workers)
        for batch in self.loader:
            batch["image"] = torch.as_tensor(batch["image"])  # numpy when small
            batch["label"] = torch.as_tensor(batch["label"])  # numpy from the workers
            batch["pad"] = torch.as_tensor(batch["pad"])
            self.stream._record(batch)
            yield self._scaled(batch)

    def _scaled(self, batch: dict) -> dict:
        images = batch["image"]
        if self.device is not None:
            images = images.to(self.device, non_blocking=True)
        batch["image"] = self.stream.normalize(images)
        return batch

    def __len__(self) -> int:
        return len(self.stream)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def stats(self) -> dict:
        return self.stream.stats()


def __getattr__(name: str):
    # held-out readers live in heldout.py, which imports this module
    if name in ("iter_images", "read_images"):
        from pipeline.data import heldout

        return getattr(heldout, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def worker_init(environ: dict, worker_id: int) -> None:
    storage.inherit_environ(environ)
    # a loader worker is this package's own process: Pillow's warning for an image past
    # Image.MAX_IMAGE_PIXELS is noise here (max_pixels decides; the stream counts the skip)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def as_is(batch: dict) -> dict:
    """Batches arrive ready: no ``default_convert`` (it would turn numpy back into tensors)."""
    return batch


def make_loader(
    stream: ShardStream,
    num_workers: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = 2,
    device: torch.device | str | None = None,
) -> StreamLoader:
    """The DataLoader for ``stream`` (``num_workers`` default: the stream's); batches arrive
    as float32 on ``device`` (default: where they were made, the CPU).

    Iterate it for batches; ``set_epoch``, ``state_dict``, ``load_state_dict`` and ``stats``
    pass through to the stream. Workers start from a forkserver (see
    :func:`pipeline.storage.process_context`: forking next to a live S3 client stalls it), with
    this process's environment; a script that iterates it needs a ``__main__`` guard.
    """
    workers = stream.num_workers if num_workers is None else num_workers
    kwargs: dict = {"collate_fn": as_is}  # in-process too: default_convert walks every key
    if workers > 0:
        kwargs |= {
            "prefetch_factor": prefetch_factor,
            "multiprocessing_context": storage.process_context(WORKER_PRELOAD),
            "worker_init_fn": partial(worker_init, dict(os.environ)),
        }
    return StreamLoader(stream, workers, device=device, pin_memory=pin_memory, **kwargs)
