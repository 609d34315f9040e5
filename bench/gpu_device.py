"""The CUDA path on a GPU machine that has torch and nothing else: no Ray, MLflow or S3.

``make gpu-check`` needs the whole stack (SeaweedFS, MLflow, a Ray head); a bare GPU box
(a CI runner with a GPU, a rented machine) often has only a CUDA torch. This script checks
there what only a GPU can show, with the project's own code:

- the model's layout (channels_last), bf16 autocast, pinned batches copied asynchronously;
- NCCL: a one-rank process group, the model wrapped in DDP, an all-reduce;
- training: 64x64 RGB synthetic shards ingested to a local folder, streamed by the project's
  loader (workers, uint8 hand-over, normalized on the GPU), DDP steps with bf16 and EMA, the
  loss falling; images/s, the data-wait fraction and peak GPU memory;
- a checkpoint written and read back into a fresh model on the GPU (every tensor equal, the
  optimizer state on the GPU), fp16 loss-scaler state included;
- held-out evaluation (ELBO, IWAE, bits/dim) and a prior-sample grid on the GPU;
- the sizing table for docs/CLUSTER.md: presets ``64`` and ``256`` at several batch sizes,
  bf16, images/s of a whole optimizer step and peak GPU memory (3 repetitions each, median
  and spread), and bf16 against fp32 at one size.

Prints one PASS/FAIL/SKIP line per check, then the table; writes ``gpu_device.json`` and the
sample grid to ``--out``. Exits 0 only if no check failed. Without a GPU it says so and exits 0
after the CPU-runnable checks (so it can be smoke-tested anywhere).

    python -m bench.gpu_device --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_check import Plan, Report, check_device_path, log


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(device: torch.device) -> str:
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(backend, rank=0, world_size=1)
    return backend


def ingest(root: Path, n_train: int, n_test: int, size: int) -> str:
    from pipeline.data.config import IngestConfig
    from pipeline.data.ingest import ingest as run_ingest

    url = str(root / f"synthetic{size}")
    total = n_train + n_test
    run_ingest(
        IngestConfig(
            output_url=url,
            source="synthetic",
            synthetic_count=total,
            synthetic_size=size,
            synthetic_mode="RGB",
            test_fraction=n_test / total,
            shard_samples=max(64, total // 16),
            workers=max(1, min(8, os.cpu_count() or 1)),
        ),
        progress=False,
    )
    return url


def build_job(data_url: str, model: dict, batch: int, workers: int, epochs: int):
    from pipeline.train.config import TrainJob
    from pipeline.typed import build

    return build(
        TrainJob,
        {
            "data": {
                "train_url": f"{data_url}/train",
                "test_url": f"{data_url}/test",
                "num_workers": workers,
                "shuffle_buffer": 1000,
            },
            "model": model,
            "optim": {
                "epochs": epochs,
                "batch_size": batch,
                "lr": 1e-3,
                "warmup_steps": 20,
                "ema_decay": 0.99,
                "precision": "auto",
            },
            "scaling": {"num_workers": 1, "storage_path": "/tmp/unused", "name": "gpu-device"},
            "tracking": {"mlflow_uri": "http://127.0.0.1:1", "experiment": "gpu-device"},
        },
        "gpu_device",
    )


def train(job, device: torch.device, report: Report, out: Path, results: dict) -> None:
    """Stream, step (DDP over a one-rank group), checkpoint round trip, evaluate, sample."""
    import copy

    from torch.nn.parallel import DistributedDataParallel as DDP

    from pipeline.data.stream import ShardStream, make_loader
    from pipeline.model import VAE, evaluate
    from pipeline.serve.images import grid
    from pipeline.train import checkpoint
    from pipeline.train.step import Objective, Precision, noise_seed, prepare_layout, train_step

    o = job.optim
    vae = prepare_layout(VAE.from_config(job.model), device).to(device)
    model = DDP(Objective(vae), device_ids=[device.index] if device.type == "cuda" else None)
    ema = copy.deepcopy(vae).requires_grad_(False)
    opt = torch.optim.AdamW(vae.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    stream = ShardStream(job.data, rank=0, world_size=1, batch_size=o.batch_size)
    total = len(stream) * o.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / o.warmup_steps))
    precision = Precision.resolve(o.precision, device)
    loader = make_loader(stream, pin_memory=device.type == "cuda", device=device)
    noise = torch.Generator(device=device)
    losses: list[float] = []
    busy = 0.0
    images = step = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    for epoch in range(o.epochs):
        stream.set_epoch(epoch)
        for batch in loader:
            t_got = time.perf_counter()
            noise.manual_seed(noise_seed(o.seed, 0, step))
            res = train_step(
                model,
                vae,
                opt,
                batch["image"],
                kl_weight=1.0,
                free_bits=0.0,
                grad_clip=o.grad_clip,
                precision=precision,
                ema=ema,
                ema_decay=o.ema_decay,
                generator=noise,
            )
            sched.step()
            step += 1
            losses.append(res.out["loss"].item())  # syncs: the step's time is its GPU time
            busy += time.perf_counter() - t_got
            images += batch["image"].shape[0]
    wall = time.perf_counter() - t_start
    wait = wall - busy  # the wall time not spent in steps: waiting for data (and start-up)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    results["train"] = {
        "steps": step,
        "images": images,
        "seconds": round(wall, 2),
        "images_per_s": round(images / wall, 1),
        "data_wait_fraction": round(wait / wall, 3),
        "peak_gpu_mib": round(peak),
        "loss_first10": round(first, 2),
        "loss_last10": round(last, 2),
        "loader_workers": loader.num_workers,
        "precision": precision.name,
    }
    report.check(
        "train",
        step == total and last < first and all(map(lambda v: v == v, losses)),
        f"{step}/{total} DDP steps ({precision.name}, EMA), loss {first:.1f} -> {last:.1f}, "
        f"{images / wall:,.0f} img/s incl. start-up, data wait {wait / wall:.1%}, "
        f"peak {peak:,.0f} MiB, {loader.num_workers} loader workers",
    )

    ckdir = out / "ckpt"
    checkpoint.save(
        ckdir,
        model=vae,
        state={"step": step, "epoch": o.epochs},
        optimizer=opt,
        scheduler=sched,
        ema=ema,
    )
    saved = checkpoint.load(ckdir)
    fresh = prepare_layout(VAE.from_config(job.model), device).to(device)
    fresh.load_state_dict(saved["model"])
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=o.lr)
    opt2.load_state_dict(saved["optim"]["optimizer"])
    same = all(
        torch.equal(a, b) for a, b in zip(vae.state_dict().values(), fresh.state_dict().values())
    )
    states = [v for s in opt2.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    on_dev = all(v.device.type == device.type for v in states)
    report.check(
        "checkpoint",
        same and on_dev and len(states) > 0,
        f"weights equal after save/load: {same}; {len(states)} optimizer tensors on "
        f"{device.type}: {on_dev}",
    )

    test = ShardStream(job.data, rank=0, world_size=1, batch_size=64, split="test")
    tl = make_loader(test, num_workers=0, device=device)
    m = evaluate(
        ema, (b["image"] for b in tl), k=16, generator=torch.Generator(device).manual_seed(0)
    )
    results["eval"] = {k: round(float(v), 4) for k, v in m.items()}
    report.check(
        "eval",
        all(v == v for v in m.values()) and m["nll_iwae"] <= m["neg_elbo"] + 1e-3,
        f"EMA on {int(m['n_images'])} held-out images: -ELBO {m['neg_elbo']:.1f} nats, "
        f"IWAE-16 {m['nll_iwae']:.1f}, {m['elbo_bits_per_dim']:.3f} bits/dim (ELBO)",
    )
    with torch.no_grad():
        x = ema.sample_prior(16, generator=torch.Generator(device).manual_seed(0))
    from PIL import Image

    Image.fromarray(grid(x.float().cpu(), ncol=8, scale=2)).save(out / "gpu_samples.png")
    report.check("gallery", x.is_cuda == (device.type == "cuda"), f"16 prior samples on {x.device}")


def fp16_scaler_roundtrip(device: torch.device, report: Report) -> None:
    """The fp16 loss scaler's state lives in the checkpoint (scale and growth tracker)."""
    from pipeline.model import VAE, preset
    from pipeline.train import checkpoint
    from pipeline.train.step import Objective, Precision, train_step

    if device.type != "cuda":
        report.skip("fp16-scaler", "no GPU on this machine")
        return
    vae = VAE.from_config(preset("mnist28", likelihood="bernoulli")).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    p = Precision.resolve("fp16", device)
    x = torch.rand(32, 1, 28, 28, device=device).round()
    for _ in range(3):
        train_step(Objective(vae), vae, opt, x, kl_weight=1, free_bits=0, grad_clip=1, precision=p)
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(d, model=vae, state={}, optimizer=opt, scaler=p.scaler)
        saved = checkpoint.load(d)
    q = Precision.resolve("fp16", device)
    q.scaler.load_state_dict(saved["optim"]["scaler"])
    report.check(
        "fp16-scaler",
        q.scaler.get_scale() == p.scaler.get_scale(),
        f"loss scale {p.scaler.get_scale():g} restored as {q.scaler.get_scale():g}",
    )


def sizing(device: torch.device, results: dict, quick: bool) -> list[dict]:
    """Images/s of a whole optimizer step (bf16, channels_last, EMA off) and peak memory."""
    from pipeline.model import VAE, preset
    from pipeline.train.step import Objective, Precision, prepare_layout, train_step

    cases = [("64", b, "bf16") for b in (64, 128, 256, 512)] + [("64", 256, "fp32")]
    cases += [("256", b, "bf16") for b in (8, 16, 32, 64)] + [("256", 32, "fp32")]
    if quick:
        cases = [("64", 8, "fp32")]
    rows = []
    for name, batch, prec in cases:
        cfg = preset(name)
        if quick:
            cfg = preset(name, channels=[8, 8, 8, 8])
        vae = prepare_layout(VAE.from_config(cfg), device).to(device)
        model = Objective(vae)
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
        p = Precision.resolve(prec, device)
        s = cfg.image_size
        g = torch.Generator(device).manual_seed(0)
        x = torch.randint(0, 256, (batch, 3, s, s), device=device, generator=g)
        x = (x.float() / 255).contiguous(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        steps = 2 if quick else 10
        for _ in range(3):  # warm-up: cuDNN autotune, allocator
            train_step(model, vae, opt, x, kl_weight=1, free_bits=0, grad_clip=1, precision=p)
        reps = []
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(model, vae, opt, x, kl_weight=1, free_bits=0, grad_clip=1, precision=p)
            if device.type == "cuda":
                torch.cuda.synchronize()
            reps.append(batch * steps / (time.perf_counter() - t0))
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        row = {
            "preset": name,
            "batch": batch,
            "precision": prec,
            "images_per_s": round(statistics.median(reps), 1),
            "spread": [round(min(reps), 1), round(max(reps), 1)],
            "peak_gib": round(peak, 2),
            "params_m": round(sum(t.numel() for t in vae.parameters()) / 1e6, 2),
        }
        rows.append(row)
        print(
            f"sizing preset {name:>3} batch {batch:>3} {prec}: {row['images_per_s']:>9,.0f} img/s "
            f"(3 reps of {steps} steps: {row['spread'][0]:,.0f}-{row['spread'][1]:,.0f}), "
            f"peak {peak:.2f} GiB",
            flush=True,
        )
        del vae, model, opt, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["sizing"] = rows
    return rows


def compiled(device: torch.device, report: Report, results: dict) -> None:
    """``optim.compile``: the encoder and decoder compiled in place; steps match eager's loss
    and the speed-up is measured (preset 64, batch 256, bf16)."""
    from pipeline.model import VAE, preset
    from pipeline.train.step import Objective, Precision, prepare_layout, train_step

    if device.type != "cuda":
        report.skip("compile", "no GPU on this machine")
        return
    speeds, losses = {}, {}
    for mode in (False, True):
        torch.manual_seed(0)
        vae = prepare_layout(VAE.from_config(preset("64")), device, compile=mode).to(device)
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
        p = Precision.resolve("bf16", device)
        g = torch.Generator(device).manual_seed(0)
        x = torch.randint(0, 256, (256, 3, 64, 64), device=device, generator=g).float() / 255
        x = x.contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        first = train_step(
            Objective(vae),
            vae,
            opt,
            x,
            kl_weight=1,
            free_bits=0,
            grad_clip=1,
            precision=p,
            generator=torch.Generator(device).manual_seed(1),
        )
        losses[mode] = first.out["loss"].item()
        warm = time.perf_counter() - t0
        for _ in range(3):
            train_step(
                Objective(vae), vae, opt, x, kl_weight=1, free_bits=0, grad_clip=1, precision=p
            )
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            train_step(
                Objective(vae), vae, opt, x, kl_weight=1, free_bits=0, grad_clip=1, precision=p
            )
        torch.cuda.synchronize()
        speeds[mode] = 256 * 20 / (time.perf_counter() - t0)
        log(f"compile={mode}: first step {warm:.1f} s, {speeds[mode]:,.0f} img/s")
    results["compile"] = {
        "eager_img_s": round(speeds[False]),
        "compiled_img_s": round(speeds[True]),
    }
    rel = abs(losses[True] - losses[False]) / abs(losses[False])
    report.check(
        "compile",
        rel < 1e-2,
        f"first-step loss eager {losses[False]:.1f} vs compiled {losses[True]:.1f}; "
        f"{speeds[True]:,.0f} vs {speeds[False]:,.0f} img/s ({speeds[True] / speeds[False]:.2f}x)",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="gpu-device-"))
    ap.add_argument("--images", type=int, default=25_600, help="training images (64x64 RGB)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    report = Report()
    results: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
    }
    log(f"{results['device']}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    from pipeline.model import PRESETS

    plan = Plan(device.type, 64, dict(PRESETS["64"]), 0, 0, 1, 1, 1, 1, 1, 0)
    try:
        check_device_path(plan, report)
        backend = init_group(device)
        t = torch.ones(4, device=device)
        torch.distributed.all_reduce(t)
        report.check(backend, float(t.sum()) == 4.0, f"one-rank {backend} group, all-reduce")
        n_train = args.images if cuda else 512
        t0 = time.perf_counter()
        data = ingest(out / "data", n_train, 512 if cuda else 64, 64)
        log(
            f"ingested {n_train}+{512 if cuda else 64} 64x64 RGB images in {time.perf_counter() - t0:.0f} s"
        )
        model = dict(PRESETS["64"]) if cuda else dict(PRESETS["64"], channels=[8, 8, 8, 8])
        workers = max(1, min(8, (os.cpu_count() or 2) - 2)) if cuda else 1
        job = build_job(data, model, batch=128 if cuda else 32, workers=workers, epochs=2)
        train(job, device, report, out, results)
        fp16_scaler_roundtrip(device, report)
        sizing(device, results, quick=not cuda)
        compiled(device, report, results)
    except Exception as e:  # a failed check, not a crash: report it and go on to the summary
        import traceback

        traceback.print_exc()
        report.add("FAIL", "run", f"{type(e).__name__}: {e}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    results["checks"] = [{"status": s, "name": n, "detail": d} for s, n, d in report.lines]
    (out / "gpu_device.json").write_text(json.dumps(results, indent=1))
    print(f"\n== gpu-device on {results['device']}:")
    for s, n, d in report.lines:
        print(f"{s} {n}: {d}")
    print("gpu-device: " + ("FAILED" if report.failed else "all checks passed"))
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
