"""The Ray Train worker loop: the only module that talks to ``ray.train``.

Every rank runs :func:`train_loop`. Rank 0 writes checkpoints, logs to MLflow and runs the
held-out evaluation; every rank calls ``ray.train.report`` at the same steps (it is a
barrier), which holds because the data stream gives every rank the same number of batches.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import tempfile
import time
from pathlib import Path

import ray.train
import torch
from torch import nn

from pipeline.config import TrainJob, build, flatten, to_dict
from pipeline.data.stream import ShardStream, make_loader
from pipeline.errors import PipelineError
from pipeline.images import grid
from pipeline.model import VAE, elbo_terms, evaluate, kl_warmup
from pipeline.train import checkpoint
from pipeline.train.metrics import WorkerMetrics
from pipeline.train.tracking import Tracker


class Objective(nn.Module):
    """The negative ELBO as a module, so DDP's forward hooks see it and all-reduce gradients."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, kl_weight: float, free_bits: float) -> dict:
        return elbo_terms(self.vae, x, kl_weight=kl_weight, free_bits=free_bits)


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 10% at ``total`` steps."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        t = min(1.0, (step - warmup) / (total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _fault_hooks(step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
    """Test-only fault injection, driven by env vars the fault tests set on the cluster."""
    if os.environ.get("PIPELINE_FAULT_NAN_STEP") == str(step):
        loss = loss * float("nan")
    kill = os.environ.get("PIPELINE_FAULT_KILL_STEP")
    marker = os.environ.get("PIPELINE_FAULT_MARKER", "")
    if kill == str(step) and rank == int(os.environ.get("PIPELINE_FAULT_KILL_RANK", "1")):
        if marker and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            time.sleep(float(os.environ.get("PIPELINE_FAULT_KILL_DELAY", "3")))  # mid-step work
            os.kill(os.getpid(), signal.SIGKILL)
    return loss


def train_loop(loop_config: dict) -> None:
    job: TrainJob = build(TrainJob, loop_config["job"])
    run_id: str = loop_config["mlflow_run_id"]
    o, d = job.optim, job.data
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if o.torch_threads:
        torch.set_num_threads(o.torch_threads)
    torch.manual_seed(o.seed)  # identical init on every rank (DDP also broadcasts rank 0's)

    vae = VAE.from_config(job.model)
    opt = torch.optim.AdamW(vae.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    stream = ShardStream(d, rank=rank, world_size=world, batch_size=o.batch_size, split="train")
    per_epoch = len(stream)
    total = o.max_steps or per_epoch * o.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.warmup_steps, total))
    ema = copy.deepcopy(vae).requires_grad_(False) if o.ema_decay > 0 else None
    step, epoch, skipped = 0, 0, 0

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as cdir:
            saved = checkpoint.load(cdir)
        vae.load_state_dict(saved["model"])
        if ema is not None and saved["ema"] is not None:
            ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optim"]["optimizer"])
        sched.load_state_dict(saved["optim"]["scheduler"])
        s = saved["state"]
        step, epoch, skipped = s["step"], s["epoch"], s["skipped_steps"]
        run_id = s["mlflow_run_id"]
        stream.load_state_dict(s["data"])
        if rank == 0:
            print(f"resumed from checkpoint at epoch {epoch} step {step}", flush=True)
    else:
        stream.set_epoch(0)

    model = ray.train.torch.prepare_model(Objective(vae))
    device = next(vae.parameters()).device
    tracker = Tracker(job.tracking.mlflow_uri, run_id) if rank == 0 else None
    port = job.tracking.metrics_port
    port = port + ctx.get_local_rank() if port > 0 else port  # one port per worker on a node
    metrics = WorkerMetrics(job.scaling.name, rank, port, job.tracking.metrics_sd_dir,
                            job.tracking.metrics_host)
    test_stream = None
    if rank == 0 and d.test_url:
        test_stream = ShardStream(d, rank=0, world_size=1, batch_size=o.batch_size, split="test")

    def save_and_report(extra: dict, images: bool = False) -> None:
        """Every rank calls this at the same step; rank 0 attaches the checkpoint."""
        t0 = time.perf_counter()
        report = {"step": step, "epoch": epoch, **extra}
        if rank != 0:
            ray.train.report(report, checkpoint=None)
            return
        state = {"step": step, "epoch": epoch, "skipped_steps": skipped, "mlflow_run_id": run_id,
                 "data": stream.state_dict(), "config": to_dict(job)}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save(tmp, model=vae, state=state, optimizer=opt, scheduler=sched, ema=ema)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        metrics.checkpoint_seconds.observe(time.perf_counter() - t0)
        tracker.metrics({"checkpoint_seconds": time.perf_counter() - t0}, step)
        tracker.flush()  # metrics reach MLflow only once their step is checkpointed

    keys_dir = os.environ.get("PIPELINE_RECORD_KEYS_DIR")  # tests: which rank saw which sample
    imgs_t0, imgs, bad_seen = time.perf_counter(), 0, 0
    wait = busy = 0.0
    while epoch < o.epochs and (not o.max_steps or step < o.max_steps):
        t_fetch = time.perf_counter()
        for batch in make_loader(stream):
            x = batch["image"].to(device, non_blocking=True)
            if keys_dir:
                with open(Path(keys_dir) / f"rank{rank}.txt", "a") as f:
                    f.write("".join(f"{epoch} {step + 1} {k}\n" for k in batch["key"]))
            t_ready = time.perf_counter()
            wait += t_ready - t_fetch
            beta = o.kl_weight * kl_warmup(step, o.kl_warmup_steps)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=o.bf16):
                out = model(x, beta, o.free_bits)
            loss = _fault_hooks(step + 1, rank, out["loss"])
            if not torch.isfinite(loss):
                # NaN into every gradient: DDP all-reduces it, so every rank skips this step.
                loss = sum((p * float("nan")).sum() for p in vae.parameters() if p.requires_grad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(vae.parameters(), o.grad_clip or float("inf"))
            if torch.isfinite(gnorm):
                opt.step()
                if ema is not None:
                    with torch.no_grad():
                        for pe, p in zip(ema.parameters(), vae.parameters()):
                            pe.lerp_(p, 1 - o.ema_decay)
            else:
                skipped += 1
                metrics.skipped_steps.inc()
                if skipped > o.max_skipped_steps:
                    raise PipelineError(
                        f"{skipped} steps skipped for a non-finite loss or gradient "
                        f"(optim.max_skipped_steps={o.max_skipped_steps}); lower optim.lr or check the data")
            sched.step()
            step += 1
            imgs += x.shape[0]
            t_done = time.perf_counter()
            busy += t_done - t_ready
            metrics.step_seconds.observe(t_done - t_fetch)
            metrics.data_wait_seconds.observe(t_ready - t_fetch)
            metrics.images.inc(x.shape[0])
            metrics.step.set(step)
            if step % o.log_every == 0:
                dt = time.perf_counter() - imgs_t0
                ips = imgs * world / dt
                stats = stream.stats()
                metrics.images_per_second.set(imgs / dt)
                metrics.loss.set(float(out["loss"]))
                metrics.bits_per_dim.set(float(out["bits_per_dim"]))
                metrics.data_wait_fraction.set(wait / max(wait + busy, 1e-9))
                metrics.bad_samples.inc(max(0, stats["bad_samples"] - bad_seen))
                bad_seen = max(bad_seen, stats["bad_samples"])
                if rank == 0:
                    row = {"loss": float(out["loss"]), "neg_elbo_bits_per_dim": float(out["bits_per_dim"]),
                           "rate_bits": float(out["rate_bits"]),
                           "distortion_bits": float(out["distortion_bits"]),
                           "grad_norm": float(gnorm), "lr": sched.get_last_lr()[0],
                           "images_per_second": ips, "data_wait_fraction": wait / max(wait + busy, 1e-9),
                           "skipped_steps": skipped, "bad_samples": stats["bad_samples"],
                           "kl_weight": beta, "epoch": epoch}
                    tracker.metrics(row, step)
                    print(f"epoch {epoch} step {step}/{total} | {ips:,.0f} img/s | "
                          f"-ELBO {row['neg_elbo_bits_per_dim']:.4f} bits/dim | "
                          f"rate {row['rate_bits']:.1f} bits | wait {row['data_wait_fraction']:.0%}",
                          flush=True)
                imgs_t0, imgs, wait, busy = time.perf_counter(), 0, 0.0, 0.0
            if o.checkpoint_every and step % o.checkpoint_every == 0 and step % per_epoch:
                save_and_report({})
            if o.max_steps and step >= o.max_steps:
                break
            t_fetch = time.perf_counter()
        epoch += 1
        stream.set_epoch(epoch)
        ev = {}
        if rank == 0:
            ev = _evaluate(vae if ema is None else ema, test_stream, o, device, tracker, step)
        save_and_report(ev)
    metrics.close()


@torch.no_grad()
def eval_metrics(vae: VAE, batches: list[torch.Tensor], iwae_k: int, iwae_images: int) -> dict:
    """Held-out ELBO terms (bits) and IWAE-K bound, PSNR, active units; seeded, so a
    checkpoint's numbers can be reproduced exactly from the same batches."""
    g = torch.Generator(device="cpu").manual_seed(0)
    terms = [elbo_terms(vae, x, generator=g) for x in batches]
    ev = {f"eval_{k}": float(sum(t[k] for t in terms) / len(terms))
          for k in ("neg_elbo_bits", "rate_bits", "distortion_bits", "bits_per_dim")}
    res = evaluate(vae, [torch.cat(batches)[:iwae_images]], k=iwae_k, generator=g)
    for k in ("nll_iwae", "gap", "bits_per_dim", "psnr", "active_units"):
        if k in res:
            ev[f"eval_iwae_{k}" if k == "bits_per_dim" else f"eval_{k}"] = float(res[k])
    return ev


@torch.no_grad()
def _evaluate(vae: VAE, test_stream, o, device, tracker: Tracker, step: int) -> dict:
    """Held-out ELBO, IWAE-K on a subset, PSNR, active units; reconstruction + prior grids."""
    vae.eval()
    try:
        ev = {}
        if test_stream is not None:
            test_stream.set_epoch(0)
            batches = []
            for i, b in enumerate(make_loader(test_stream)):
                if i >= o.eval_batches:
                    break
                batches.append(b["image"].to(device))
            if batches:
                ev = eval_metrics(vae, batches, o.iwae_k, o.iwae_images)
                x = batches[0][:8]
                params, _ = vae(x, sample_posterior=False)
                pairs = torch.cat([x, vae.likelihood.mean(params).clamp(0, 1)])
                tracker.image(grid(pairs, ncol=8), "reconstructions", step)
        g = torch.Generator(device="cpu").manual_seed(0)
        tracker.image(grid(vae.sample_prior(64, generator=g).clamp(0, 1), ncol=8), "prior_samples", step)
        if ev:
            tracker.metrics(ev, step)
        return ev
    finally:
        vae.train()


def config_params(job: TrainJob) -> dict[str, str]:
    """The flattened config as MLflow params (values as strings, capped at MLflow's limit)."""
    return {k: str(v)[:6000] for k, v in flatten(to_dict(job)).items()}
