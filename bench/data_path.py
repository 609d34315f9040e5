"""1. Data path, images/s: in-memory decode (per-core limit), local shards, S3 shards, a plain
folder ``Dataset``; each at DataLoader workers 0, 1, 2. Also the JPEG draft decode
(``data.jpeg_draft``): full decode + resize vs reduced-DCT decode + resize, one core.

Reuses the measurement functions of :mod:`pipeline.data.bench` (steady rate after the first
batch; the first-batch time reported apart) and extends it to JPEG and Fashion-MNIST.

    python -m bench.data_path draft [--count 256] [--repeats 7] [--decoder pillow]  # draft alone
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bench.common import Settings, median, ratio, rnd
from pipeline import storage
from pipeline.data import WORKER_PRELOAD
from pipeline.data.bench import folder_run, memory_run, stream_run, timed_epoch
from pipeline.data.config import IngestConfig, StreamConfig
from pipeline.data.ingest import ingest
from pipeline.data.shards import tar_samples
from pipeline.data.sources import synthetic_image
from pipeline.data.stream import ShardStream, as_is, make_loader
from pipeline.data.transforms import (
    JPEG_DECODER,
    batched,
    collate,
    decode,
    decode_image,
    fill_bad,
    normalize,
    pipeline,
)

# (stored size, mode, training size): the cases draft decode is for (stored above training)
DRAFT_CASES = [(256, "RGB", 64), (256, "RGB", 128), (512, "RGB", 64), (256, "L", 28)]

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
    "synthetic_64_jpeg_RGB": (
        dict(
            source="synthetic",
            synthetic_size=64,
            synthetic_mode="RGB",
            encoding="jpeg",
            jpeg_quality=90,
            test_fraction=0.0,
        ),
        64,
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


class MemoryBatches(IterableDataset):
    """The in-memory decode limit with loader workers: encoded samples already in memory,
    each worker decoding its contiguous share of whole batches (uint8, as the stream)."""

    def __init__(self, samples: list[dict], size: int, channels: int, batch_size: int):
        self.samples, self.size, self.channels, self.batch = samples, size, channels, batch_size

    def __iter__(self):
        info = get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        batches = len(self.samples) // self.batch
        lo, hi = me * batches // workers, (me + 1) * batches // workers
        stages = [
            lambda s: decode(
                s,
                size=(self.size,) * 2,
                channels=self.channels,
                resize=False,
                crop="none",
                max_pixels=2**26,
            ),
            lambda s: batched(s, self.batch),
            lambda s: fill_bad(s, shape=(self.channels, self.size, self.size)),
            collate,
        ]
        yield from pipeline(iter(self.samples[lo * self.batch : hi * self.batch]), stages)


def memory_workers_run(samples: list[dict], size: int, channels: int, batch: int, workers: int):
    def run():
        loader = DataLoader(
            MemoryBatches(samples, size, channels, batch),
            batch_size=None,
            num_workers=workers,
            collate_fn=as_is,
            multiprocessing_context=storage.process_context(WORKER_PRELOAD),
        )
        return (len(normalize(b["image"])) for b in loader)

    return run


def epoch_rates(batches) -> tuple[float, float, float]:
    """One epoch: steady img/s after the first batch, seconds to the first batch, and img/s
    over the whole epoch from the call (loader start-up, first connections included)."""
    t0 = time.perf_counter()
    first_at, first_n, n = 0.0, 0, 0
    for size in batches():
        n += size
        if not first_at:
            first_at, first_n = time.perf_counter(), n
    end = time.perf_counter()
    return (n - first_n) / max(end - first_at, 1e-9), first_at - t0, n / max(end - t0, 1e-9)


def _cpu_seconds(procs: list) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except Exception:  # a process gone since the list was made
            continue
    return total


def measure(data: dict, settings: Settings, s3_server=None) -> dict:
    """All configurations of one dataset, interleaved, ``settings.repeats`` times.

    ``s3_server``: the S3 service (a :class:`pipeline.stack.Service`); its processes' CPU
    seconds during each S3 epoch are reported, per image: on this machine the server shares
    the cores with the loader, which a remote object store does not.
    """
    size, channels = data["size"], data["channels"]
    batch = settings.data_batch_256 if size > 64 else settings.data_batch
    runs = {"memory": memory_run(data["samples"], size, channels, batch)}
    for n in settings.data_workers:
        if n:
            runs[f"memory_w{n}"] = memory_workers_run(data["samples"], size, channels, batch, n)
        runs[f"local_w{n}"] = stream_run(data["local"], batch, n)
        runs[f"s3_w{n}"] = stream_run(data["s3"], batch, n)
        runs[f"folder_w{n}"] = folder_run(data["files"], size, channels, batch, n)
    for run in runs.values():  # warm-up: page cache, forkserver, S3 connection pool
        timed_epoch(run)
    epochs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
    server = s3_server.processes() if s3_server is not None else []
    server_cpu: dict[str, list[float]] = {name: [] for name in runs if name.startswith("s3_")}
    for _ in range(settings.repeats):  # interleaved: a noisy moment hits every path alike
        for name, run in runs.items():
            before = _cpu_seconds(server) if server and name in server_cpu else 0.0
            epochs[name].append(epoch_rates(run))
            if server and name in server_cpu:
                server_cpu[name].append(_cpu_seconds(server) - before)
    rates = {k: rnd(median(r for r, _, _ in v)) for k, v in epochs.items()}
    spread = {k: [rnd(r) for r, _, _ in v] for k, v in epochs.items()}
    firsts = {k: round(median(f for _, f, _ in v), 3) for k, v in epochs.items()}
    whole = {k: rnd(median(w for _, _, w in v)) for k, v in epochs.items()}
    whole_spread = {k: [rnd(w) for _, _, w in v] for k, v in epochs.items()}
    ratios = {}
    for n in settings.data_workers:
        ratios[f"s3_vs_local_w{n}"] = ratio(rates[f"s3_w{n}"], rates[f"local_w{n}"])
        ratios[f"local_vs_limit_w{n}"] = ratio(rates[f"local_w{n}"], rates["memory"])
        ratios[f"shards_vs_folder_w{n}"] = ratio(rates[f"local_w{n}"], rates[f"folder_w{n}"])
        # whole epochs, start-up included; the limit decoding with the same worker count
        limit = whole[f"memory_w{n}" if n else "memory"]
        ratios[f"whole_local_vs_limit_w{n}"] = ratio(whole[f"local_w{n}"], limit)
        ratios[f"whole_s3_vs_limit_w{n}"] = ratio(whole[f"s3_w{n}"], limit)
        ratios[f"whole_s3_vs_local_w{n}"] = ratio(whole[f"s3_w{n}"], whole[f"local_w{n}"])
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
        "whole_epoch_images_per_second": whole,
        "whole_epoch_all_repeats": whole_spread,
        "ratios": ratios,
        # the S3 server's CPU per image served, over every S3 epoch of this dataset (its
        # cpu_times tick is 10 ms: one short epoch alone is too few ticks), and its share of
        # the CPU the machine had during those epochs (whole-epoch wall time x cores)
        "s3_server_cpu": _server_cpu(server_cpu, epochs, data["count"]) if server else {},
    }


def _server_cpu(cpu: dict[str, list[float]], epochs: dict, count: int) -> dict:
    seconds = sum(sum(v) for v in cpu.values())
    images = count * sum(len(v) for v in cpu.values())
    wall = sum(count / whole for name in cpu for _, _, whole in epochs[name])
    return {
        "epochs": sum(len(v) for v in cpu.values()),
        "cpu_seconds": round(seconds, 2),
        "us_per_image": round(seconds / images * 1e6, 2),
        "share_of_machine": round(seconds / (wall * (os.cpu_count() or 1)), 3),
    }


def measure_s3_goal(
    settings: Settings, root: Path, s3_url: str, log=print, s3_server=None, workers: int = 2
) -> dict:
    """Issue 16's S3 goal, measured where a short epoch cannot hide it: the whole
    Fashion-MNIST training split (or ``settings.s3_goal_count`` of it) ingested with the
    defaults to local and S3 shards, read at ``workers`` loader workers, batch 256; whole
    epochs (worker start-up, clients and first GETs included). After one warm-up pair,
    ``settings.s3_goal_pairs`` pairs of adjacent epochs, local and S3 in alternating order:
    each pair's S3 / local ratio (a slow moment of the machine hits both of a pair), their
    median and min-max, and the S3 server's CPU per S3 epoch (it shares these cores).

    The data section's S3 rows, at 4,096 images, fetch a dataset's one or two shards before
    their first batch and so leave most of the S3 cost out of their steady rate.
    """
    limit = {"limit": settings.s3_goal_count} if settings.s3_goal_count else {}
    urls = {}
    for where, url in (("local", str(root / "s3-goal")), ("s3", f"{s3_url}/s3-goal")):
        config = IngestConfig(output_url=url, source="fashion_mnist", encoding="png", **limit)
        manifest = ingest(config, progress=False)["train"]
        urls[where] = manifest.url
    count, batch = manifest.count, 256
    runs = {where: stream_run(url, batch, workers) for where, url in urls.items()}
    server = s3_server.processes() if s3_server is not None else []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in run(): the consumer only casts
    try:
        for run_ in runs.values():  # warm-up: page cache, forkserver, the gateway's cache
            epoch_rates(run_)
        pairs, server_cpu = [], []
        for i in range(settings.s3_goal_pairs):
            pair = {}
            for where in ("local", "s3") if i % 2 == 0 else ("s3", "local"):
                before = _cpu_seconds(server)
                steady, first, whole = epoch_rates(runs[where])
                if where == "s3" and server:
                    server_cpu.append(_cpu_seconds(server) - before)
                pair[where] = {"whole": rnd(whole), "steady": rnd(steady), "first": round(first, 3)}
            pairs.append(pair)
    finally:
        torch.set_num_threads(threads)
    # one more S3 epoch, untimed, for the bytes its GETs asked for against the shards' bytes
    stream = ShardStream(
        StreamConfig(train_url=urls["s3"]),
        rank=0,
        world_size=1,
        batch_size=batch,
        num_workers=workers,
    )
    for _ in make_loader(stream):
        pass
    fetched = sum(io_.get("remote_bytes", 0) for io_ in stream.stats()["io_by_worker"].values())
    whole = sorted(p["s3"]["whole"] / p["local"]["whole"] for p in pairs)
    steady = sorted(p["s3"]["steady"] / p["local"]["steady"] for p in pairs)
    out = {
        "config": {"images": count, "batch_size": batch, "workers": workers, "pairs": len(pairs)},
        "pairs": pairs,
        "whole_ratio": round(median(whole), 3),
        "whole_ratio_min_max": [round(whole[0], 3), round(whole[-1], 3)],
        "steady_ratio": round(median(steady), 3),
        "steady_ratio_min_max": [round(steady[0], 3), round(steady[-1], 3)],
        "images_per_second": {
            w: rnd(median(p[w]["whole"] for p in pairs)) for w in ("local", "s3")
        },
        "first_batch_seconds": {
            w: round(median(p[w]["first"] for p in pairs), 3) for w in ("local", "s3")
        },
        "server_cpu_seconds_per_epoch": round(median(server_cpu), 3) if server_cpu else None,
        "s3_bytes_per_epoch": {"fetched": fetched, "shards": sum(s.bytes for s in manifest.shards)},
    }
    log(f"data s3 goal: {out['whole_ratio']} {out['whole_ratio_min_max']} (whole epochs)")
    return out


def run(settings: Settings, root: Path, s3_url: str, log=print, s3_server=None) -> dict:
    out = {}
    # The consumer (this process) only casts batches, as a GPU loop's host thread does: with
    # torch's default intra-op pool each cast wakes a thread that then spins, taking a core
    # from the loader workers on 2 cores (bench.peers_runner.serve measured it).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in DATASETS:
            count = settings.data_count_256 if "256" in name else settings.data_count_28
            data = prepare(name, count, root, s3_url)
            out[name] = measure(data, settings, s3_server)
            log(f"data {name}: {out[name]['images_per_second']}")
    finally:
        torch.set_num_threads(threads)
    # the draft decode section stays out of this dict: bench.report reads every entry as a
    # dataset (run it with `python -m bench.data_path draft`)
    return out


def measure_draft(count: int = 256, repeats: int = 7, decoder: str = JPEG_DECODER) -> dict:
    """img/s of ``decode_image`` (center crop, one core, ``decoder``) without and with
    ``draft`` on ``count`` structured synthetic JPEGs (quality 90) per case; ``repeats``
    interleaved passes, median and every pass reported, and the per-pass ratios'
    min/median/max."""
    out = {"decoder": decoder}
    for stored, mode, size in DRAFT_CASES:
        channels = 1 if mode == "L" else 3
        images = []
        for i in range(count):
            image, _ = synthetic_image(i, stored, mode, seed=0)
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=90)
            images.append(buf.getvalue())
        rates: dict[str, list[float]] = {"full": [], "draft": []}

        def args(data: bytes, size=size, channels=channels) -> tuple:
            return data, (size, size), channels, True, "center", 2**26

        diffs = [
            np.abs(
                decode_image(*args(d), draft=True, decoder=decoder).astype(int)
                - decode_image(*args(d), decoder=decoder).astype(int)
            ).mean()
            for d in images
        ]
        for _ in range(repeats):  # interleaved: a noisy moment hits both alike
            for name, draft in (("full", False), ("draft", True)):
                t0 = time.perf_counter()
                for d in images:
                    decode_image(*args(d), draft=draft, decoder=decoder)
                rates[name].append(count / (time.perf_counter() - t0))
        per_pass = sorted(d / f for d, f in zip(rates["draft"], rates["full"]))
        out[f"{stored}_{mode}_to_{size}"] = {
            "images": count,
            "repeats": repeats,
            "image_bytes": round(sum(map(len, images)) / count),
            "images_per_second": {k: rnd(median(v)) for k, v in rates.items()},
            "all_repeats": {k: [rnd(r) for r in v] for k, v in rates.items()},
            "ratio_draft_vs_full": ratio(median(rates["draft"]), median(rates["full"])),
            "ratio_per_pass_min_median_max": [
                round(per_pass[0], 2),
                round(median(per_pass), 2),
                round(per_pass[-1], 2),
            ],
            "mean_abs_diff_levels": round(float(np.mean(diffs)), 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data_path")
    parser.add_argument("section", choices=["draft"])
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--decoder", choices=["pillow", "simplejpeg"], default=JPEG_DECODER)
    args = parser.parse_args(argv)
    print(json.dumps(measure_draft(args.count, args.repeats, args.decoder), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
