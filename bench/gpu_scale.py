"""The data path at scale on one GPU: N structured 64x64 RGB images ingested (JPEG), then one
epoch of the ``64`` preset streamed by the project's loader, with every process's memory
sampled through the epoch.

Reports the ingest's img/s, the epoch's img/s and data-wait fraction (wall time not spent in
steps), and the resident memory (RSS) of the training process and of each loader worker:
the mean over the first and the last quarter of the epoch's steps and the growth between
them. Needs only a CUDA torch (no Ray, MLflow or S3), like ``bench.gpu_device``; runs on CPU
too, slowly (use a small ``--images``).

    python -m bench.gpu_scale --images 200000 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from bench.gpu_device import build_job, log


def ingest_jpeg(url: str, n: int, workers: int, shard_samples: int = 10_000) -> float:
    """``n`` structured 64x64 RGB training images (+ 512 test) as JPEG shards at ``url``;
    returns the seconds it took."""
    from pipeline.data.config import IngestConfig
    from pipeline.data.ingest import ingest

    t0 = time.perf_counter()
    ingest(
        IngestConfig(
            output_url=url,
            source="synthetic",
            synthetic_count=n + 512,
            synthetic_size=64,
            synthetic_mode="RGB",
            encoding="jpeg",
            test_fraction=512 / (n + 512),
            shard_samples=shard_samples,
            workers=workers,
        ),
        progress=False,
    )
    return time.perf_counter() - t0


class MemorySampler(threading.Thread):
    """RSS of each root process and of each of its children (loader workers), every ``every``
    seconds: ``(step, unix time, {name: bytes})``, ``step`` being the step the loop has reached.

    ``roots`` lists the processes to watch, by name; by default this process, as ``main``.
    """

    def __init__(self, every: float = 0.5, roots=None):
        super().__init__(daemon=True)
        self.every, self.step, self.samples = every, 0, []
        self.stop = threading.Event()
        me = psutil.Process()
        self.roots = roots or (lambda: {"main": me})

    def run(self) -> None:
        while not self.stop.is_set():
            rss = {}
            for name, proc in self.roots().items():
                try:
                    rss[name] = proc.memory_info().rss
                    children = proc.children(recursive=True)
                except psutil.Error:
                    continue
                for c in children:
                    try:
                        rss[f"{name}/pid{c.pid}"] = c.memory_info().rss
                    except psutil.Error:
                        pass
            self.samples.append((self.step, time.time(), rss))
            self.stop.wait(self.every)


def quarters(samples: list, total: int) -> dict:
    """Per process: mean RSS (MiB) in the first and last quarter of the steps, and growth."""
    first = [r for s, _, r in samples if 0 < s <= total // 4]
    last = [r for s, _, r in samples if s > total - total // 4]
    out = {}
    for name in sorted({k for r in first for k in r} & {k for r in last for k in r}):
        a = statistics.mean(r[name] for r in first if name in r) / 2**20
        b = statistics.mean(r[name] for r in last if name in r) / 2**20
        out[name] = {"first_quarter_mib": round(a, 1), "last_quarter_mib": round(b, 1)}
        out[name]["growth"] = round(b / a - 1, 4)
    return out


def print_rss(mem: dict) -> float:
    """One line per process of :func:`quarters`' result; returns the largest growth."""
    for name, v in mem.items():
        print(
            f"rss {name}: {v['first_quarter_mib']:.0f} -> {v['last_quarter_mib']:.0f} MiB "
            f"({v['growth']:+.1%}) first vs last quarter of the epoch"
        )
    return max((v["growth"] for v in mem.values()), default=float("nan"))


def main(argv: list[str] | None = None) -> int:
    from pipeline.data.stream import ShardStream, make_loader
    from pipeline.model import PRESETS, VAE
    from pipeline.train.step import Objective, Precision, prepare_layout, train_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="gpu-scale-"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    cpus = os.cpu_count() or 2
    loaders = max(1, min(12, cpus - 2))
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "cpus": cpus}
    url = str(out / "data" / "synthetic64")
    secs = ingest_jpeg(url, args.images, workers=cpus)
    res["ingest"] = {"images": args.images + 512, "seconds": round(secs, 1)}
    res["ingest"]["images_per_second"] = round((args.images + 512) / secs)
    log(
        f"ingested {args.images + 512:,} 64x64 JPEG in {secs:.0f} s ({res['ingest']['images_per_second']:,} img/s)"
    )

    model = dict(PRESETS["64"]) if cuda else dict(PRESETS["64"], channels=[8, 8, 8, 8])
    job = build_job(url, model, batch=args.batch, workers=loaders, epochs=1)
    vae = prepare_layout(VAE.from_config(job.model), device).to(device)
    obj = Objective(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    precision = Precision.resolve("auto", device)
    stream = ShardStream(job.data, rank=0, world_size=1, batch_size=args.batch)
    total = len(stream)
    loader = make_loader(stream, pin_memory=cuda, device=device)
    sampler = MemorySampler()
    sampler.start()
    busy, images, losses = 0.0, 0, []
    t0 = time.perf_counter()
    for step, batch in enumerate(loader, 1):
        t_got = time.perf_counter()
        r = train_step(
            obj,
            vae,
            opt,
            batch["image"],
            kl_weight=1,
            free_bits=0,
            grad_clip=1,
            precision=precision,
        )
        losses.append(r.out["loss"].item())
        busy += time.perf_counter() - t_got
        images += batch["image"].shape[0]
        sampler.step = step
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    mem = quarters(sampler.samples, total)
    res["epoch"] = {
        "steps": total,
        "images": images,
        "seconds": round(wall, 1),
        "images_per_second": round(images / wall),
        "data_wait_fraction": round((wall - busy) / wall, 4),
        "loader_workers": loaders,
        "batch": args.batch,
        "precision": precision.name,
        "loss_first10": round(statistics.mean(losses[:10]), 1),
        "loss_last10": round(statistics.mean(losses[-10:]), 1),
        "bad_samples": stream.stats().get("bad_samples", 0),
    }
    res["rss"] = mem
    res["rss_samples"] = len(sampler.samples)
    (out / "gpu_scale.json").write_text(json.dumps(res, indent=1))
    e = res["epoch"]
    print(
        f"epoch: {e['steps']} steps of {e['batch']} on {res['device']} ({e['precision']}), "
        f"{e['images_per_second']:,} img/s incl. start-up, data wait {e['data_wait_fraction']:.1%}, "
        f"{e['loader_workers']} loader workers, loss {e['loss_first10']} -> {e['loss_last10']}"
    )
    worst = print_rss(mem)
    ok = len(mem) >= loaders + 1 and worst < 0.10 and e["steps"] == total  # + forkserver
    print(f"gpu-scale: {'PASS' if ok else 'FAIL'} (largest RSS growth {worst:+.1%}, bound +10%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
