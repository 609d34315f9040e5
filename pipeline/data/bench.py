"""Data benchmark (not a test): images/s of the read path, printed as JSON.

    python -m pipeline.data.bench [--count 4096] [--size 64] [--s3-url s3://bucket/prefix]

Measures, for DataLoader workers 0, 1, 2, the median over ``--repeats`` epochs of the steady
rate (images after the first batch over the time after it) and of the time to the first
batch (worker start-up, first connections; a long epoch amortizes it):

* ``memory``: decoding the encoded images from bytes already in memory, in this process:
  the per-core limit of the decode path (same decode, batching and collate stages).
* ``local``: :class:`ShardStream` over shards in a local folder.
* ``s3``: the same shards on S3 (with ``--s3-url`` and ``AWS_*`` in the environment).
* ``folder``: a plain torch ``Dataset`` reading one PNG file per sample.

Ratios: ``local_vs_memory`` (workers 0, one core each), ``s3_vs_local`` and
``folder_vs_local`` per worker count.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.config import IngestConfig, StreamConfig
from pipeline.data.ingest import ingest
from pipeline.data.shards import tar_samples
from pipeline.data.stream import ShardStream, make_loader
from pipeline.data.transforms import (
    batched,
    collate,
    decode,
    decode_image,
    fill_bad,
    normalize,
    pipeline,
)


def timed_epoch(batches) -> tuple[float, float]:
    """One epoch: steady images/s (after the first batch) and seconds to the first batch.

    ``batches()`` returns an iterable of batch sizes. Worker start-up and first S3
    connections land in the first-batch time, which a long epoch amortizes.
    """
    t0 = time.perf_counter()
    first_at, first_n, n = 0.0, 0, 0
    for size in batches():
        n += size
        if not first_at:
            first_at, first_n = time.perf_counter(), n
    end = time.perf_counter()
    return (n - first_n) / max(end - first_at, 1e-9), first_at - t0


def memory_run(samples: list[dict], size: int, channels: int, batch_size: int):
    shape = (channels, size, size)

    def run():
        stages = [
            lambda s: decode(
                s, size=(size, size), channels=channels, resize=False, crop="none", max_pixels=2**26
            ),
            lambda s: batched(s, batch_size),
            lambda s: fill_bad(s, shape=shape),
            lambda s: collate(s),
            lambda s: ({**b, "image": normalize(b["image"])} for b in s),  # as the loader does
        ]
        usable = samples[: len(samples) // batch_size * batch_size]
        return (len(b["key"]) for b in pipeline(iter(usable), stages))

    return run


def stream_run(url: str, batch_size: int, workers: int):
    def run():
        stream = ShardStream(
            StreamConfig(train_url=url),
            rank=0,
            world_size=1,
            batch_size=batch_size,
            num_workers=workers,
        )
        return (len(b["key"]) for b in make_loader(stream))

    return run


class FileDataset(Dataset):
    """The baseline: one image file per sample, decoded like the stream does."""

    def __init__(self, files: list[Path], size: int, channels: int):
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        pixels = decode_image(
            self.files[i].read_bytes(), (self.size, self.size), self.channels, False, "none", 2**26
        )
        return torch.from_numpy(pixels.copy()).float().div_(255)


def folder_run(files: list[Path], size: int, channels: int, batch_size: int, workers: int):
    def run():
        loader = DataLoader(
            FileDataset(files, size, channels),
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
        )
        return (len(x) for x in loader)

    return run


def run_bench(
    count: int,
    size: int,
    mode: str,
    batch_size: int,
    workers: list[int],
    repeats: int,
    s3_url: str = "",
    work_dir: str = "",
) -> dict:
    """Ingest synthetic images once per target, then measure every read path."""
    channels = 3 if mode == "RGB" else 1
    tmp = tempfile.TemporaryDirectory() if not work_dir else None
    root = Path(work_dir or tmp.name)
    base = dict(
        source="synthetic",
        synthetic_count=count,
        synthetic_size=size,
        synthetic_mode=mode,
        test_fraction=0.0,
        shard_samples=1024,
        workers=2,
    )
    local = ingest(IngestConfig(output_url=str(root / "shards"), **base), progress=False)
    manifest = local["train"]
    samples = []
    for i in range(len(manifest.shards)):
        samples += tar_samples(io.BytesIO(Path(manifest.shard_url(i)).read_bytes()), "mem")
    folder = root / "files"
    folder.mkdir(exist_ok=True)
    files = []
    for s in samples:
        files.append(folder / f"{s['__key__']}.png")
        if not files[-1].exists():
            files[-1].write_bytes(s["png"])
    results: dict = {
        "config": {
            "count": count,
            "size": size,
            "mode": mode,
            "batch_size": batch_size,
            "repeats": repeats,
            "shard_bytes": manifest.shards[0].bytes,
            "torch_threads": torch.get_num_threads(),
        },
        "images_per_second": {},
        "first_batch_seconds": {},
    }
    rates, firsts = results["images_per_second"], results["first_batch_seconds"]
    runs = {"memory": memory_run(samples, size, channels, batch_size)}
    if s3_url:
        ingest(IngestConfig(output_url=s3_url, **base), progress=False)
    for n in workers:
        runs[f"local_w{n}"] = stream_run(manifest.url, batch_size, n)
        if s3_url:
            runs[f"s3_w{n}"] = stream_run(f"{s3_url.rstrip('/')}/train", batch_size, n)
        runs[f"folder_w{n}"] = folder_run(files, size, channels, batch_size, n)
    for run in runs.values():  # warm-up: page cache, forkserver, connection pools
        timed_epoch(run)
    epochs: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so a noisy moment hits every path alike
        for name, run in runs.items():
            epochs[name].append(timed_epoch(run))
    for name, values in epochs.items():
        rates[name] = round(statistics.median(v[0] for v in values), 1)
        firsts[name] = round(statistics.median(v[1] for v in values), 3)
    ratios = {"local_vs_memory": round(rates[f"local_w{workers[0]}"] / rates["memory"], 3)}
    for n in workers:
        if s3_url:
            ratios[f"s3_vs_local_w{n}"] = round(rates[f"s3_w{n}"] / rates[f"local_w{n}"], 3)
        ratios[f"folder_vs_local_w{n}"] = round(rates[f"folder_w{n}"] / rates[f"local_w{n}"], 3)
    results["ratios"] = ratios
    if tmp is not None:
        tmp.cleanup()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pipeline bench", description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=4096, help="synthetic images")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--mode", choices=["L", "RGB"], default="RGB")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--s3-url", default="", help="s3://bucket/prefix for the S3 shards")
    p.add_argument("--work-dir", default="", help="keep local shards here (default: temp)")
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    results = run_bench(
        args.count,
        args.size,
        args.mode,
        args.batch_size,
        workers,
        args.repeats,
        args.s3_url,
        args.work_dir,
    )
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
