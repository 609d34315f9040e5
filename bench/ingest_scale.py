"""Ingest at scale (issue 16): N synthetic images -> shards with parallel workers, killed
midway and re-run; prints JSON and writes ``bench/ingest_scale.json``.

    .venv/bin/python -m bench.ingest_scale                 # 1,000,000 images, 28x28 PNG
    .venv/bin/python -m bench.ingest_scale --count 100000 --size 64 --mode RGB --encoding jpeg

Measures the wall time and img/s of an uninterrupted ingest, then of one SIGKILLed after
a third of its shards and re-run: the re-run must keep every shard published before the kill
(same inode and mtime) and end with the same shard hashes as the uninterrupted one. Peak RSS
is the largest resident set of the ingest process and each of its encode workers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "ingest_scale.json"


def _ingest_cmd(out: Path, args) -> list[str]:
    code = (
        "import resource, sys, json\n"
        "from pipeline.data.config import IngestConfig\n"
        "from pipeline.data.ingest import ingest\n"
        f"c = IngestConfig(output_url={str(out)!r}, source='synthetic', "
        f"synthetic_count={args.count}, synthetic_size={args.size}, "
        f"synthetic_mode={args.mode!r}, encoding={args.encoding!r}, test_fraction=0.0, "
        f"shard_samples={args.shard_samples}, workers={args.workers})\n"
        "m = ingest(c, progress=False)['train']\n"
        "ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "rc = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'count': m.count, 'shards': [s.sha256 for s in m.shards], "
        "'rss_main_mib': ru / 1024, 'rss_worker_mib': rc / 1024}))\n"
    )
    return [sys.executable, "-c", code]


def _run(out: Path, args) -> tuple[float, dict]:
    t0 = time.perf_counter()
    done = subprocess.run(_ingest_cmd(out, args), capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, json.loads(done.stdout.strip().splitlines()[-1])


def _shards(split: Path, finished: bool = False) -> dict[str, tuple[int, int]]:
    """The published shards (inode, mtime); ``finished``: only those with their completion
    record, which a killed ingest leaves (a shard killed between its publish and its record
    is not finished, and the re-run redoes it). A completed ingest removes its records."""
    out = {}
    for p in split.glob("shard-*.tar"):
        if not finished or (split / f"_ingest.{p.stem}.json").exists():
            out[p.name] = (p.stat().st_ino, p.stat().st_mtime_ns)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.ingest_scale", description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--mode", default="L", choices=["L", "RGB"])
    p.add_argument("--encoding", default="png", choices=["png", "jpeg"])
    p.add_argument("--shard-samples", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    n_shards = -(-args.count // args.shard_samples)
    with tempfile.TemporaryDirectory(prefix="ingest-scale-") as tmp:
        wall, full = _run(Path(tmp, "full"), args)
        # the same ingest, SIGKILLed once a third of its shards are published, then re-run
        split = Path(tmp, "killed", "train")
        proc = subprocess.Popen(_ingest_cmd(Path(tmp, "killed"), args), stdout=subprocess.PIPE)
        while proc.poll() is None and len(_shards(split, True)) < max(1, n_shards // 3):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = _shards(split, True)
        t0 = time.perf_counter()
        _, resumed = _run(Path(tmp, "killed"), args)
        rerun = time.perf_counter() - t0
        after = _shards(split)
    kept = [n for n, stat in before.items() if after.get(n) == stat]
    result = {
        "config": vars(args) | {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "images": full["count"],
        "shards": len(full["shards"]),
        "wall_seconds": round(wall, 1),
        "images_per_second": round(full["count"] / wall),
        "peak_rss_mib": {
            "main": round(full["rss_main_mib"]),
            "worker": round(full["rss_worker_mib"]),
        },
        "killed_after_shards": len(before),
        "rerun_kept_shards": len(kept),
        "rerun_seconds": round(rerun, 1),
        "rerun_identical": resumed["shards"] == full["shards"],
    }
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    ok = result["rerun_identical"] and len(kept) == len(before) and full["count"] == args.count
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
