"""``make bench-jpeg``: ``data.jpeg_decoder`` pillow vs simplejpeg on this machine.

1. One image at a time in this process (``decode_image``, one core): microseconds per image,
   and whether the pixels are identical.
2. The loader: local shards of structured synthetic JPEGs (``ingest``'s defaults, quality 95),
   whole epochs with worker start-up, shuffle on, batch 64, 0 and 2 loader workers.

Both decoders run interleaved (A, B, A, B, ...) so a slow moment of the machine hits both;
medians with min-max. Writes ``bench/jpeg_decode.json`` and ``bench/jpeg_decode.md``.

    .venv/bin/python -m bench.jpeg_decode [--repeats 9] [--out bench]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg

from bench.data_path import epoch_rates
from pipeline.data.config import IngestConfig, StreamConfig
from pipeline.data.ingest import ingest
from pipeline.data.sources import synthetic_image
from pipeline.data.stream import ShardStream, make_loader
from pipeline.data.transforms import decode_image

DECODERS = ("pillow", "simplejpeg")
# (stored size, training size, images): at the stored size, and drafted to a quarter
PER_IMAGE = [(64, 64, 2048), (256, 256, 512), (256, 64, 512)]
LOADER = [(64, 0, 16384), (256, 0, 2048), (256, 64, 2048)]  # image_size 0: the stored size
BATCH = 64


def encoded(size: int, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        image, _ = synthetic_image(i, size, "RGB", seed=0)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=95)  # ingest's default jpeg_quality
        out.append(buf.getvalue())
    return out


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def per_image(repeats: int) -> list[dict]:
    rows = []
    for stored, size, n in PER_IMAGE:
        data = encoded(stored, n)

        def run(decoder: str, data=data, size=size) -> list[np.ndarray]:
            args = ((size, size), 3, True, "center", 2**26)
            return [decode_image(d, *args, None, True, "jpg", decoder) for d in data]

        identical = all(
            np.array_equal(a, b) for a, b in zip(run("pillow"), run("simplejpeg"), strict=True)
        )
        times: dict[str, list[float]] = {d: [] for d in DECODERS}
        for r in range(repeats):
            for decoder in DECODERS if r % 2 == 0 else DECODERS[::-1]:
                t0 = time.perf_counter()
                run(decoder)
                times[decoder].append((time.perf_counter() - t0) / n * 1e6)
        rows.append(
            {
                "stored": stored,
                "size": size,
                "images": n,
                "bytes_per_image": round(sum(map(len, data)) / n),
                "identical_pixels": identical,
                "us_per_image": {d: spread(t) for d, t in times.items()},
                "repeats": times,
            }
        )
        print(_per_image_line(rows[-1]), flush=True)
    return rows


def loader(repeats: int, root: Path) -> list[dict]:
    rows = []
    urls = {}
    for stored, size, n in LOADER:
        if stored not in urls:
            urls[stored] = str(root / f"synthetic_{stored}")
            ingest(
                IngestConfig(
                    output_url=urls[stored],
                    source="synthetic",
                    synthetic_count=n,
                    synthetic_size=stored,
                    synthetic_mode="RGB",
                    encoding="jpeg",
                    test_fraction=0.0,
                    workers=2,
                ),
                progress=False,
            )
        for workers in (0, 2):
            rates: dict[str, list[float]] = {d: [] for d in DECODERS}
            for r in range(repeats + 1):  # the first round warms the page cache, not counted
                for decoder in DECODERS if r % 2 == 0 else DECODERS[::-1]:
                    config = StreamConfig(
                        train_url=f"{urls[stored]}/train", image_size=size, jpeg_decoder=decoder
                    )

                    def batches(config=config, workers=workers):
                        stream = ShardStream(
                            config, rank=0, world_size=1, batch_size=BATCH, num_workers=workers
                        )
                        return (len(b["key"]) for b in make_loader(stream))

                    whole = epoch_rates(batches)[2]
                    if r:
                        rates[decoder].append(whole)
            rows.append(
                {
                    "stored": stored,
                    "size": size or stored,
                    "images": n,
                    "workers": workers,
                    "img_per_s": {d: spread(v) for d, v in rates.items()},
                    "repeats": rates,
                }
            )
            print(_loader_line(rows[-1]), flush=True)
    return rows


def _ratio(row: dict, key: str) -> float:
    return row[key]["simplejpeg"]["median"] / row[key]["pillow"]["median"]


def _fmt(s: dict, digits: int = 0) -> str:
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'])} ({f.format(s['min'])}-{f.format(s['max'])})"


def _per_image_line(row: dict) -> str:
    t = row["us_per_image"]
    return (
        f"{row['stored']} -> {row['size']} px: pillow {_fmt(t['pillow'], 1)} us, simplejpeg "
        f"{_fmt(t['simplejpeg'], 1)} us, identical {row['identical_pixels']}"
    )


def _loader_line(row: dict) -> str:
    r = row["img_per_s"]
    return (
        f"{row['stored']} -> {row['size']} px, {row['workers']} workers: pillow "
        f"{_fmt(r['pillow'])} img/s, simplejpeg {_fmt(r['simplejpeg'])} img/s"
    )


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# `data.jpeg_decoder`: pillow vs simplejpeg",
        "",
        f"`make bench-jpeg` ({result['date']}, {m['cpus']} cores, {m['python']}, "
        f"Pillow {m['pillow']}, simplejpeg {m['simplejpeg']}; load average {m['load_start']} at "
        f"start, {m['load_end']} at end). Structured synthetic RGB JPEGs (quality 95); "
        f"median (min-max) of {result['repeats']} interleaved repetitions.",
        "",
        "### One image at a time (`decode_image`, one core, in-process)",
        "",
        "| stored -> trained | images | bytes/image | pillow us/image | simplejpeg us/image "
        "| pillow / simplejpeg time | identical pixels |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["per_image"]:
        t = row["us_per_image"]
        lines.append(
            f"| {row['stored']} -> {row['size']} | {row['images']:,} | {row['bytes_per_image']:,} "
            f"| {_fmt(t['pillow'], 1)} | {_fmt(t['simplejpeg'], 1)} "
            f"| {1 / _ratio(row, 'us_per_image'):.2f} | {'yes' if row['identical_pixels'] else 'NO'} |"
        )
    lines += [
        "",
        f"### The loader (local shards, whole epochs with start-up, shuffle on, batch {BATCH})",
        "",
        "| stored -> trained | images | loader workers | pillow img/s | simplejpeg img/s "
        "| simplejpeg / pillow |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["loader"]:
        r = row["img_per_s"]
        lines.append(
            f"| {row['stored']} -> {row['size']} | {row['images']:,} | {row['workers']} "
            f"| {_fmt(r['pillow'])} | {_fmt(r['simplejpeg'])} | {_ratio(row, 'img_per_s'):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--loader-repeats", type=int, default=5)
    p.add_argument("--out", default="bench")
    args = p.parse_args(argv)
    import PIL

    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-jpeg-") as tmp:
        rows = per_image(args.repeats)
        loader_rows = loader(args.loader_repeats, Path(tmp))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "make bench-jpeg",
        "repeats": f"{args.repeats} (per image) / {args.loader_repeats} (loader)",
        "machine": {
            "cpus": os.cpu_count(),
            "python": f"Python {platform.python_version()}",
            "pillow": PIL.__version__,
            "simplejpeg": simplejpeg.__version__,
            "load_start": load_start,
            "load_end": [round(x, 2) for x in os.getloadavg()],
        },
        "per_image": rows,
        "loader": loader_rows,
    }
    out = Path(args.out)
    (out / "jpeg_decode.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "jpeg_decode.md").write_text(render(result))
    print(f"wrote {out / 'jpeg_decode.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
