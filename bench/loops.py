"""The minimal training loop: in-memory Fashion-MNIST tensors, the pipeline's model and
objective, AdamW, gradient clipping; DDP (gloo) when a process group is up.

The same function runs as the plain single-process baseline (section 2), under Ray Train's
``TorchTrainer`` (:func:`ray_loop`) and under ``torchrun`` (``python -m torch.distributed.run
--nproc_per_node 2 -m bench.loops ...``, section 3), so only the launcher differs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from pipeline.data.sources import FashionMNIST
from pipeline.model import VAE, preset
from pipeline.train.step import Objective

MODEL = "mnist28"
# The benches train on 8-bit images: the preset's Bernoulli likelihood would need binarized
# data (the pipeline refuses it on 8-bit shards), so every bench loop uses the default one.
LIKELIHOOD = "discretized_logistic"


def fmnist_images(count: int = 0, split: str = "train") -> torch.Tensor:
    """Fashion-MNIST images as float32 (N, 1, 28, 28) in [0, 1] (the first ``count``)."""
    images, _ = FashionMNIST().arrays(split)
    images = images[:count] if count else images
    return torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255)


def minimal_loop(config: dict) -> dict:
    """Train ``steps`` steps of global batch ``batch``; returns steady-state global img/s.

    Rates are per window of ``log_every`` steps, globally (all ranks); ``images_per_second``
    is the median of the later half of the windows (start-up excluded).
    """
    import torch.distributed as dist

    t_start = time.perf_counter()
    torch.set_num_threads(config["threads"])
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    batch = config["batch"] // world
    torch.manual_seed(0)
    vae = VAE.from_config(preset(MODEL, likelihood=LIKELIHOOD))
    model = Objective(vae)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=1e-4)
    data = fmnist_images(config["batch"] * config["steps"])[rank::world]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    data = data[order]
    every, windows, t0 = config["log_every"], [], time.perf_counter()
    first_step = 0.0
    for step in range(config["steps"]):
        i = step * batch % (len(data) - batch + 1)
        x = data[i : i + batch]
        out = model(x, 1.0, 0.0)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step == 0:
            first_step = time.perf_counter() - t_start
        if (step + 1) % every == 0:
            now = time.perf_counter()
            windows.append(every * batch * world / (now - t0))
            t0 = now
    steady = windows[len(windows) // 2 :]
    return {
        "images_per_second": float(torch.tensor(steady).median()) if steady else 0.0,
        "windows": [round(w, 1) for w in windows],
        "world_size": world,
        "steps": config["steps"],
        "batch": config["batch"],
        "threads": config["threads"],
        "seconds_to_first_step": round(first_step, 2),
        "loop_seconds": round(time.perf_counter() - t_start, 2),
        "loss": float(out["loss"].detach()),
    }


def ray_loop(config: dict) -> None:
    """:func:`minimal_loop` as a Ray Train ``train_loop_per_worker`` (process group is up);
    rank 0 writes the result to ``config["out"]`` as the torchrun entry point does."""
    import ray.train

    res = minimal_loop(config)
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump(res, f)


def main(argv: list[str] | None = None) -> int:
    """torchrun entry point: every rank trains, rank 0 writes the result as JSON."""
    import torch.distributed as dist

    p = argparse.ArgumentParser(description="minimal DDP loop (bench)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, required=True, help="global batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    try:
        res = minimal_loop(
            {
                "steps": args.steps,
                "batch": args.batch,
                "threads": args.threads,
                "log_every": args.log_every,
            }
        )
        if not dist.is_initialized() or dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(res, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
