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
from functools import partial
from pathlib import Path

import ray.train
import torch

from pipeline.data.stream import ShardStream, make_loader
from pipeline.model import VAE, elbo_terms, evaluate, kl_warmup
from pipeline.serve.images import grid
from pipeline.train import checkpoint, fatal
from pipeline.train.config import TrainJob
from pipeline.train.metrics import WorkerMetrics
from pipeline.train.step import BadSamples, Objective, SkipBudget, train_step
from pipeline.train.tracking import RunSpec, Tracker, mlflow_wait, storage_path
from pipeline.typed import build, to_dict


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
    if str(step) in os.environ.get("PIPELINE_FAULT_NAN_STEP", "").split(","):
        loss = loss * float("nan")
    kill = os.environ.get("PIPELINE_FAULT_KILL_STEP")
    marker = os.environ.get("PIPELINE_FAULT_MARKER", "")
    if kill == str(step) and rank == int(os.environ.get("PIPELINE_FAULT_KILL_RANK", "1")):
        if marker and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            time.sleep(float(os.environ.get("PIPELINE_FAULT_KILL_DELAY", "3")))  # mid-step work
            os.kill(os.getpid(), signal.SIGKILL)
    return loss


def _gather(counts: dict, world: int) -> list[dict]:
    """Every rank's ``counts`` (a collective: all ranks call it at the same step)."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [counts]
    out: list = [None] * world
    dist.all_gather_object(out, counts)
    return out


def train_loop(loop_config: dict) -> None:
    job: TrainJob = build(TrainJob, loop_config["job"])
    fatal_url = fatal.fatal_url(storage_path(job.scaling.storage_path), job.scaling.name)
    fatal.check(fatal_url)  # an earlier attempt hit a deterministic failure: do not replay it
    run_id: str = loop_config["mlflow_run_id"]  # "" if MLflow was down when the driver started
    spec = RunSpec(**loop_config["mlflow_run"])
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
    step, epoch = 0, 0
    budget, bad = SkipBudget(o.max_skipped_steps), BadSamples()

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
        step, epoch = s["step"], s["epoch"]
        budget.count = s["skipped_steps"]
        if rank == 0:  # the run totals, counted once (rank 0 holds them)
            bad = BadSamples(s.get("bad_samples"))
        run_id = s["mlflow_run_id"] or run_id
        stream.load_state_dict(s["data"])
        bad.epoch.update(stream.bad_counts())  # the epoch's restored count, not new ones
        if rank == 0:
            print(f"resumed from checkpoint at epoch {epoch} step {step}", flush=True)
    else:
        stream.set_epoch(0)

    model = ray.train.torch.prepare_model(Objective(vae))
    device = next(vae.parameters()).device
    tracker = Tracker(spec, run_id) if rank == 0 else None
    port = job.tracking.metrics_port
    port = port + ctx.get_local_rank() if port > 0 else port  # one port per worker on a node
    metrics = WorkerMetrics(job.scaling.name, rank, port, job.tracking.metrics_sd_dir,
                            job.tracking.metrics_host)
    test_stream = None
    if rank == 0 and d.test_url:
        test_stream = ShardStream(d, rank=0, world_size=1, batch_size=o.batch_size, split="test")

    def save_and_report(extra: dict) -> None:
        """Every rank calls this at the same step; rank 0 attaches the checkpoint."""
        t0 = time.perf_counter()
        report = {"step": step, "epoch": epoch, **extra}
        counts = _gather({"run": dict(bad.own), "epoch": stream.bad_counts()}, world)
        totals = bad.totals([c["run"] for c in counts[1:]])
        if rank != 0:
            ray.train.report(report, checkpoint=None)
            return
        state = {"step": step, "epoch": epoch, "skipped_steps": budget.count,
                 "bad_samples": totals, "mlflow_run_id": tracker.run_id,
                 "data": stream.state_dict([c["epoch"] for c in counts]),
                 "config": to_dict(job)}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save(tmp, model=vae, state=state, optimizer=opt, scheduler=sched, ema=ema)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        metrics.checkpoint_seconds.observe(time.perf_counter() - t0)
        tracker.metrics({"checkpoint_seconds": time.perf_counter() - t0}, step)
        tracker.flush()  # metrics reach MLflow only once their step is checkpointed

    keys_dir = os.environ.get("PIPELINE_RECORD_KEYS_DIR")  # tests: which rank saw which sample
    imgs_t0, imgs = time.perf_counter(), 0
    wait = busy = 0.0
    try:
        while epoch < o.epochs and (not o.max_steps or step < o.max_steps):
            t_fetch = time.perf_counter()
            for batch in make_loader(stream):
                x = batch["image"].to(device, non_blocking=True)
                metrics.bad_samples.inc(bad.add(batch["skipped"]))
                if keys_dir:
                    with open(Path(keys_dir) / f"rank{rank}.txt", "a") as f:
                        f.write("".join(f"{epoch} {step + 1} {k}\n" for k in batch["key"]))
                t_ready = time.perf_counter()
                wait += t_ready - t_fetch
                beta = o.kl_weight * kl_warmup(step, o.kl_warmup_steps)
                res = train_step(model, vae, opt, x, kl_weight=beta, free_bits=o.free_bits,
                                 grad_clip=o.grad_clip, bf16=o.bf16, ema=ema,
                                 ema_decay=o.ema_decay,
                                 inject=partial(_fault_hooks, step + 1, rank))
                out = res.out
                if res.skipped:
                    metrics.skipped_steps.inc()
                    if rank == 0:
                        print(f"step {step + 1}: non-finite loss or gradient, step skipped "
                              f"({budget.count + 1} so far)", flush=True)
                budget.record(res.skipped)
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
                    wait_frac = wait / max(wait + busy, 1e-9)
                    metrics.images_per_second.set(imgs / dt)
                    metrics.loss.set(out["loss"].detach().item())
                    metrics.bits_per_dim.set(float(out["bits_per_dim"]))
                    metrics.data_wait_fraction.set(wait_frac)
                    totals = bad.totals(_gather(dict(bad.own), world)[1:])
                    if rank == 0:
                        row = {"loss": out["loss"].detach().item(),
                               "neg_elbo_bits_per_dim": float(out["bits_per_dim"]),
                               "rate_bits": float(out["rate_bits"]),
                               "distortion_bits": float(out["distortion_bits"]),
                               "grad_norm": float(res.grad_norm), "lr": sched.get_last_lr()[0],
                               "images_per_second": ips, "data_wait_fraction": wait_frac,
                               "skipped_steps": budget.count, **BadSamples.as_metrics(totals),
                               "kl_weight": beta, "epoch": epoch}
                        tracker.metrics(row, step)
                        print(f"epoch {epoch} step {step}/{total} | {ips:,.0f} img/s | "
                              f"-ELBO {row['neg_elbo_bits_per_dim']:.4f} bits/dim | "
                              f"rate {row['rate_bits']:.1f} bits | wait {wait_frac:.0%}",
                              flush=True)
                    imgs_t0, imgs, wait, busy = time.perf_counter(), 0, 0.0, 0.0
                if o.checkpoint_every and step % o.checkpoint_every == 0 and step % per_epoch:
                    save_and_report({})
                if o.max_steps and step >= o.max_steps:
                    break
                t_fetch = time.perf_counter()
            epoch += 1
            stream.set_epoch(epoch)
            bad.epoch.clear()
            ev = {}
            if rank == 0:
                ev = _evaluate(vae if ema is None else ema, test_stream, o, device, tracker, step)
            save_and_report(ev)
        if tracker is not None and not tracker.flush(wait=mlflow_wait()):
            print(f"warning: MLflow at {tracker.uri} still unreachable at the end of training; "
                  f"{tracker.pending} metric points and images were not logged", flush=True)
    except BaseException as e:
        fatal.record(fatal_url, e, step)
        metrics.bad_samples.inc(bad.reconcile(stream.stats()["bad_reasons"]))
        if tracker is not None:  # what was counted up to the failure (bad samples, skips)
            tracker.metrics({"skipped_steps": budget.count,
                             **BadSamples.as_metrics(bad.totals())}, step)
            tracker.flush()
        raise
    finally:
        metrics.close(linger=float(os.environ.get("PIPELINE_METRICS_LINGER", "0")))


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
