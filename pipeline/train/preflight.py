"""Check a train job's data against its model before anything starts.

Runs on the driver before the MLflow run, the Ray cluster or a checkpoint folder exist, so a
bad input fails in seconds with one line naming the URL and the key, leaving nothing behind
(instead of failing inside every Ray worker, ``max_failures + 1`` times).
"""

from __future__ import annotations

from pipeline import storage
from pipeline.data.errors import DataError
from pipeline.data.manifest import MANIFEST, Manifest
from pipeline.errors import ConfigError
from pipeline.train.config import TrainJob


def preflight(job: TrainJob) -> None:
    """Raise a :class:`~pipeline.errors.PipelineError` if the job cannot train on its data.

    Checks, per split: the manifest is readable (URL, bucket, credentials), holds samples,
    agrees with the shard objects next to it (see :func:`check_shards`), and its images fit
    the model (size, channels); the train split fills at least one batch on every worker.
    """
    from pipeline.data.stream import ShardStream

    d, m = job.data, job.model
    world, batch = job.scaling.num_workers, job.optim.batch_size
    for split, url in (("train", d.train_url), ("test", d.test_url)):
        if not url:
            continue
        try:
            stream = ShardStream(
                d,
                rank=0,
                world_size=world if split == "train" else 1,
                batch_size=batch,
                split=split,
                num_workers=0,
            )
        except ConfigError as e:  # e.g. storage_options, image_size: keys of the data section
            raise e.within("data") from None
        manifest, where = stream.manifest, storage.join(url, MANIFEST)
        if manifest.count == 0:
            raise DataError(f"{where}: empty dataset (0 samples in {len(manifest.shards)} shards)")
        check_shards(manifest, d.storage_options, d.retries, d.retry_backoff)
        h, w = stream.image_hw
        if (h, w) != (m.image_size, m.image_size):
            raise DataError(
                f"{where}: images are {w}x{h} but model.image_size is {m.image_size} "
                f"(set data.image_size: {m.image_size} to resize them)"
            )
        if stream.channels != m.in_channels:
            raise DataError(
                f"{where}: images have {stream.channels} channel(s) but model.in_channels is "
                f"{m.in_channels} (set data.channels: {m.in_channels} to convert them)"
            )
        if split == "train" and len(stream) == 0:
            raise DataError(
                f"{where}: {manifest.count} samples do not fill one batch per worker "
                f"(scaling.num_workers={world} x optim.batch_size={batch})"
            )


def check_shards(
    manifest: Manifest,
    storage_options: dict | None = None,
    retries: int = storage.DEFAULT_RETRIES,
    backoff: float = storage.DEFAULT_BACKOFF,
) -> None:
    """Every shard the manifest lists exists next to it, and none is larger than recorded.

    A shard smaller than recorded is a truncated shard: bad data that the reader skips and
    counts against ``max_bad_samples``, so it only warns here.

    Raises:
        DataError: naming the first missing shard, or one larger than the manifest says (the
            manifest belongs to other shards).
    """
    fs, path = storage.get_fs(manifest.url, storage_options)
    entries = storage.retry_call(
        lambda: fs.ls(path, detail=True), manifest.url, "list", retries, backoff
    )
    sizes = {
        storage.basename(e["name"]): int(e.get("size") or 0)
        for e in entries
        if e.get("type") != "directory"
    }
    for shard in manifest.shards:
        url = storage.join(manifest.url, shard.name)
        if shard.name not in sizes:
            raise DataError(f"{url}: listed in {MANIFEST} but missing")
        if sizes[shard.name] > shard.bytes:
            raise DataError(
                f"{url}: {sizes[shard.name]} bytes, {MANIFEST} says {shard.bytes} "
                f"(manifest and shards disagree: re-run the ingest)"
            )
        if sizes[shard.name] < shard.bytes:
            print(
                f"warning: {url}: {sizes[shard.name]} of {shard.bytes} bytes (truncated); "
                f"its missing samples will be skipped and counted as bad data",
                flush=True,
            )
