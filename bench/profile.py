"""Profile the slowest stage of each path with py-spy (``pip install py-spy``), else cProfile.

    .venv/bin/python -m bench.profile loader    # shard stream, 1 DataLoader worker (28x28)
    .venv/bin/python -m bench.profile step      # the pipeline's train_step, in memory
    .venv/bin/python -m bench.profile sampler   # the Ray Data actor's Sampler.__call__

Prints the frames with the most samples (own and total) over all processes. Not part of
``make bench``: py-spy needs ptrace; the findings are in docs/PERFORMANCE.md. A Ray Train
worker or Ray Data actor can be profiled live the same way: ``py-spy record --pid <pid>``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

TARGETS = ("loader", "step", "sampler")


def target_loader(seconds: float) -> None:
    import torch

    from pipeline.data.config import IngestConfig, StreamConfig
    from pipeline.data.ingest import ingest
    from pipeline.data.stream import ShardStream, make_loader

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        m = ingest(
            IngestConfig(
                output_url=tmp, source="fashion_mnist", limit=8192, shard_samples=1024, workers=2
            ),
            progress=False,
        )["train"]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            stream = ShardStream(
                StreamConfig(train_url=m.url), rank=0, world_size=1, batch_size=64, num_workers=1
            )
            for _ in make_loader(stream):
                pass


def target_step(seconds: float) -> None:
    import torch

    from bench.loops import LIKELIHOOD, MODEL, fmnist_images
    from pipeline.model import VAE, preset
    from pipeline.train.step import Objective, train_step

    torch.set_num_threads(1)
    vae = VAE.from_config(preset(MODEL, likelihood=LIKELIHOOD))
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    x, model, t0 = fmnist_images(128), Objective(vae), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        train_step(model, vae, opt, x, kl_weight=1.0, free_bits=0.0, grad_clip=1.0)


def target_sampler(seconds: float) -> None:
    import numpy as np
    import torch

    from bench.sampling import model
    from pipeline.model import save_weights
    from pipeline.serve.bulk import Sampler

    torch.set_num_threads(1)
    m = model()
    sampler, t0, i = Sampler(m.model_config, save_weights(m.vae), 0, 1.0), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        sampler({"id": np.arange(i, i + 512)})
        i += 512


def summarize(raw: Path, top: int) -> str:
    own, total, n = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, c = stack.split(";"), int(count)
        n += c
        own[frames[-1]] += c
        for f in set(frames[1:]):
            total[f] += c
    out = [f"{n} samples (all processes)", "", "own time:"]
    out += [f"{c / n:6.1%}  {f[:150]}" for f, c in own.most_common(top)]
    out += ["", "total time:"]
    out += [f"{c / n:6.1%}  {f[:150]}" for f, c in total.most_common(top * 2)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("target", choices=TARGETS)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--run", action="store_true", help=argparse.SUPPRESS)  # the profiled child
    args = p.parse_args(argv)
    if args.run:
        globals()[f"target_{args.target}"](args.seconds)
        return 0
    child = [
        sys.executable,
        "-m",
        "bench.profile",
        args.target,
        "--run",
        "--seconds",
        str(args.seconds),
    ]
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if Path(spy).exists():
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.txt"
            subprocess.run(
                [
                    spy,
                    "record",
                    "-r",
                    "200",
                    "--subprocesses",
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                    "--",
                    *child,
                ],
                check=True,
            )
            print(summarize(raw, args.top))
        return 0
    print("py-spy not found: cProfile of the main process only", file=sys.stderr)
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(globals()[f"target_{args.target}"], args.seconds)
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
