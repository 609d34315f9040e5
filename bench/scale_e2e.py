"""Issue 16's end-to-end run at 64x64 on the full stack: N structured 64x64 RGB images
ingested as JPEG shards to a real S3 (SeaweedFS), then one epoch of the ``64`` preset by
``run_training``: Ray Train, 2 DDP workers (gloo on CPU), each streaming its shards from that
S3 with its own loader workers, tracked in MLflow.

Reports the ingest's img/s; the epoch's wall time, the global img/s and rank 0's data-wait
fraction (its MLflow series: every window and the median of the later half); and the
resident memory (RSS) of every Ray Train worker and of each of its loader workers, sampled
every 0.5 s from outside: the mean over the first and the last quarter of the epoch and the
growth between them (the issue's bound: under 10%).

The issue's run is 200,000 images: on 2 CPUs with AVX512-BF16 the ``64`` preset trains at
about 34 img/s in bf16 (``bench/scale_e2e.json``), ~100 min; in fp32 at about 18. A smaller
``--images`` is a quicker check; the output states the count.

    python -m bench.scale_e2e --images 200000 --out DIR      # ~100 min on 2 CPUs
    python -m bench.scale_e2e --images 2560 --out DIR        # ~2 min on 2 CPUs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from bench.common import Settings, rnd
from bench.gpu_scale import MemorySampler, ingest_jpeg, print_rss, quarters
from bench.stack import BenchStack
from bench.train_path import make_job, pipeline_run

LOG_EVERY = 5  # steps between rank 0's MLflow points, which date the RSS samples


def log(message: str) -> None:
    print(f"[scale-e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ray_train_workers() -> dict[str, psutil.Process]:
    """This machine's Ray Train worker processes (their title names the actor), by PID."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::") and "RayTrainWorker" in cmdline:
            found[f"train_worker_pid{proc.info['pid']}"] = proc
    return found


def main(argv: list[str] | None = None) -> int:
    from pipeline.model import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    ap.add_argument("--loader-workers", type=int, default=1, help="DataLoader workers per rank")
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument(
        "--precision",
        default="bf16",
        choices=["auto", "fp32", "bf16"],
        help="the step's autocast; bf16 is what precision: auto picks on an Ampere or newer GPU; "
        "on this repo's 2-core CPU (AVX512-BF16) the 64 preset steps at 33.9 img/s in bf16 "
        "against 18.1 in fp32 (bench/scale_e2e.json and its previous version)",
    )
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="scale-e2e-"))
    args = ap.parse_args(argv)
    if args.images // args.batch < 8 * LOG_EVERY:  # quarters need a few logged steps each
        ap.error(
            f"--images {args.images} is {args.images // args.batch} steps of {args.batch}; the "
            f"RSS quarters need at least {8 * LOG_EVERY} (--images {8 * LOG_EVERY * args.batch})"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "config": {
            "images": args.images,
            "ray_train_workers": args.workers,
            "loader_workers_per_rank": args.loader_workers,
            "global_batch": args.batch,
            "model": 'PRESETS["64"]',
            "precision": args.precision,
            "cpus": psutil.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in psutil.getloadavg()],
        }
    }
    settings = Settings.full()
    settings.batch, settings.loader_workers = args.batch, args.loader_workers
    with BenchStack(num_cpus=max(4, args.workers)) as stack:
        url = stack.bucket("scale") + "/synthetic64"
        # >= 16 shards, so every rank's loader workers get several (10,000 a shard at scale)
        shard = min(10_000, max(256, args.images // 16))
        secs = ingest_jpeg(url, args.images, workers=psutil.cpu_count() or 2, shard_samples=shard)
        res["ingest"] = {
            "url": url,
            "images": args.images + 512,
            "shard_samples": shard,
            "seconds": rnd(secs),
            "images_per_second": round((args.images + 512) / secs),
        }
        log(f"ingested {args.images + 512:,} 64x64 JPEG to S3 in {secs:.0f} s")
        stack.ray_init()
        job = make_job(
            f"{url}/train",
            stack,
            f"scale-{time.strftime('%H%M%S')}",
            args.workers,
            settings,
            model=dict(PRESETS["64"]),
            max_steps=0,
            epochs=1,
            log_every=LOG_EVERY,
            precision=args.precision,
        )
        sampler = MemorySampler(roots=ray_train_workers)
        sampler.start()
        run = pipeline_run(job, stack)
        sampler.stop.set()
        sampler.join()
    # each RSS sample's step, from the times rank 0 logged its steps to MLflow: the epoch's
    # quarters are quarters of its steps (start-up before the first log and the final
    # evaluation after the last are outside)
    logged = [(t / 1000, step) for step, t, _ in run["loss_log"]]
    t_log, s_log = [t for t, _ in logged], [s for _, s in logged]
    tagged = [
        (float(np.interp(t, t_log, s_log)), t, r)
        for _, t, r in sampler.samples
        if t_log[0] <= t <= t_log[-1]
    ]
    mem = quarters(tagged, s_log[-1])
    steps = run["steps_done"]
    res["epoch"] = {
        "steps": steps,
        "images": steps * args.batch,
        "wall_seconds_with_startup": run["wall_seconds"],
        "images_per_second_later_half": run["images_per_second"],
        "data_wait_fraction_later_half": run["data_wait_fraction"],
        "data_wait_windows": run["data_wait_windows"],
        "images_per_second_windows": run["windows"],
        "loss_log": run["loss_log"],
        "memory_window_steps": [s_log[0], s_log[-1]],
        "cpu_seconds_by_name": run["cpu_seconds_by_name"],
    }
    res["rss"], res["rss_samples"] = mem, len(tagged)
    (out / "scale_e2e.json").write_text(json.dumps(res, indent=1))
    e = res["epoch"]
    print(
        f"epoch: {e['steps']} steps of {args.batch} over {args.workers} Ray Train workers from "
        f"S3, {e['wall_seconds_with_startup']:.0f} s with start-up, "
        f"{e['images_per_second_later_half']} img/s (later half), rank 0 data wait "
        f"{e['data_wait_fraction_later_half']:.1%} (later half; windows "
        f"{min(e['data_wait_windows']):.1%}-{max(e['data_wait_windows']):.1%}), "
        f"loss {e['loss_log'][0][2]} -> {e['loss_log'][-1][2]}"
    )
    worst = print_rss(mem)
    ok = len([k for k in mem if "/" not in k]) == args.workers and worst < 0.10
    print(f"scale-e2e: {'PASS' if ok else 'FAIL'} (largest RSS growth {worst:+.1%}, bound +10%)")
    print(f"wrote {out / 'scale_e2e.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
