"""Time to the first batch (and the whole epoch) of a 2-worker loader on S3 shards, with s3fs
in the loader workers' forkserver preload (``on``, the default) and without it (``off``).

Each measurement is a fresh process (the forkserver starts once per process); ``off`` and
``on`` interleave rep by rep. Starts its own SeaweedFS on a free loopback port.

    .venv/bin/python -m bench.first_batch [--reps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
import pipeline.data as pd
if sys.argv[2] == "off":
    pd.WORKER_PRELOAD = ("pipeline.data.stream", "pipeline.data.ingest")
import pipeline.data.stream as st
st.WORKER_PRELOAD = pd.WORKER_PRELOAD
from pipeline.data.config import StreamConfig
if __name__ == "__main__":
    cfg = StreamConfig(train_url=sys.argv[1], num_workers=2, shuffle_buffer=1000)
    s = st.ShardStream(cfg, rank=0, world_size=1, batch_size=256)
    t0 = time.perf_counter()
    it = iter(st.make_loader(s))
    next(it)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in it)
    print(json.dumps({"first": t1 - t0, "epoch": time.perf_counter() - t0, "batches": n}))
"""


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=4)
    args = p.parse_args()
    from bench.stack import BenchStack
    from pipeline.data.config import IngestConfig
    from pipeline.data.ingest import ingest

    with BenchStack(with_ray=False, with_mlflow=False) as stk:
        url = stk.s3.make_bucket("data") + "/syn"
        ingest(
            IngestConfig(
                output_url=url,
                source="synthetic",
                synthetic_count=8192,
                synthetic_size=28,
                test_fraction=0.0,
                shard_samples=1024,
                workers=2,
            ),
            progress=False,
        )
        child = stk.dir / "child.py"
        child.write_text(CHILD)
        res: dict[str, list[dict]] = {"off": [], "on": []}
        for rep in range(args.reps):
            for mode in ("off", "on"):
                out = subprocess.run(
                    [sys.executable, str(child), f"{url}/train", mode],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                res[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(
                    f"rep {rep} {mode}: {res[mode][-1]} load {os.getloadavg()[0]:.1f}", flush=True
                )
    for mode in ("off", "on"):
        first = [r["first"] for r in res[mode]]
        epoch = [r["epoch"] for r in res[mode]]
        print(f"{mode}: first batch {summary(first)}, epoch {summary(epoch)} ({args.reps} reps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
