"""1. Data path, images/s: in-memory decode (per-core limit), local shards, S3 shards, a plain
folder ``Dataset``; each at DataLoader workers 0, 1, 2.

Reuses the measurement functions of :mod:`pipeline.data.bench` (steady rate after the first
batch; the first-batch time reported apart) and extends it to JPEG and Fashion-MNIST.
"""

from __future__ import annotations

import io
from pathlib import Path

from bench.common import Settings, median, ratio, rnd
from pipeline.data.bench import folder_run, memory_run, stream_run, timed_epoch
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.shards import tar_samples

DATASETS = {
    # name: (ingest options, image size, channels, extension)
    "synthetic_28_png_L": (
        dict(
            source="synthetic",
            synthetic_size=28,
            synthetic_mode="L",
            encoding="png",
            test_fraction=0.0,
        ),
        28,
        1,
        "png",
    ),
    "synthetic_256_jpeg_RGB": (
        dict(
            source="synthetic",
            synthetic_size=256,
            synthetic_mode="RGB",
            encoding="jpeg",
            jpeg_quality=90,
            test_fraction=0.0,
        ),
        256,
        3,
        "jpg",
    ),
    "fashion_mnist_28_png_L": (dict(source="fashion_mnist", encoding="png"), 28, 1, "png"),
}


def _config(name: str, count: int, url: str) -> IngestConfig:
    options, size, _, _ = DATASETS[name]
    per_shard = 1024 if size <= 64 else 128
    sized = {"limit": count} if options["source"] == "fashion_mnist" else {"synthetic_count": count}
    return IngestConfig(output_url=url, shard_samples=per_shard, workers=2, **options, **sized)


def prepare(name: str, count: int, root: Path, s3_url: str) -> dict:
    """Ingest ``count`` images to local and S3 shards, and write one file per image."""
    _, size, channels, ext = DATASETS[name]
    manifest = ingest(_config(name, count, str(root / name / "shards")), progress=False)["train"]
    ingest(_config(name, count, f"{s3_url}/{name}"), progress=False)
    samples = []
    for i in range(len(manifest.shards)):
        samples += tar_samples(io.BytesIO(Path(manifest.shard_url(i)).read_bytes()), "mem")
    folder = root / name / "files"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for s in samples:
        files.append(folder / f"{s['__key__']}.{ext}")
        files[-1].write_bytes(s[ext])
    return {
        "samples": samples,
        "files": files,
        "local": manifest.url,
        "s3": f"{s3_url}/{name}/train",
        "size": size,
        "channels": channels,
        "count": manifest.count,
        "shard_bytes": manifest.shards[0].bytes,
        "image_bytes": round(sum(len(s[ext]) for s in samples) / len(samples)),
    }


def measure(data: dict, settings: Settings) -> dict:
    """All 10 configurations of one dataset, interleaved, ``settings.repeats`` times."""
    size, channels = data["size"], data["channels"]
    batch = settings.data_batch_256 if size > 64 else settings.data_batch
    runs = {"memory": memory_run(data["samples"], size, channels, batch)}
    for n in settings.data_workers:
        runs[f"local_w{n}"] = stream_run(data["local"], batch, n)
        runs[f"s3_w{n}"] = stream_run(data["s3"], batch, n)
        runs[f"folder_w{n}"] = folder_run(data["files"], size, channels, batch, n)
    for run in runs.values():  # warm-up: page cache, forkserver, S3 connection pool
        timed_epoch(run)
    epochs: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(settings.repeats):  # interleaved: a noisy moment hits every path alike
        for name, run in runs.items():
            epochs[name].append(timed_epoch(run))
    rates = {k: rnd(median(r for r, _ in v)) for k, v in epochs.items()}
    spread = {k: [rnd(r) for r, _ in v] for k, v in epochs.items()}
    firsts = {k: round(median(f for _, f in v), 3) for k, v in epochs.items()}
    ratios = {}
    for n in settings.data_workers:
        ratios[f"s3_vs_local_w{n}"] = ratio(rates[f"s3_w{n}"], rates[f"local_w{n}"])
        ratios[f"local_vs_limit_w{n}"] = ratio(rates[f"local_w{n}"], rates["memory"])
        ratios[f"shards_vs_folder_w{n}"] = ratio(rates[f"local_w{n}"], rates[f"folder_w{n}"])
    return {
        "config": {
            "count": data["count"],
            "size": size,
            "channels": channels,
            "batch_size": batch,
            "repeats": settings.repeats,
            "shard_bytes": data["shard_bytes"],
            "image_bytes": data["image_bytes"],
        },
        "images_per_second": rates,
        "all_repeats": spread,
        "first_batch_seconds": firsts,
        "ratios": ratios,
    }


def run(settings: Settings, root: Path, s3_url: str, log=print) -> dict:
    out = {}
    for name in DATASETS:
        count = settings.data_count_256 if "256" in name else settings.data_count_28
        data = prepare(name, count, root, s3_url)
        out[name] = measure(data, settings)
        log(f"data {name}: {out[name]['images_per_second']}")
    return out
