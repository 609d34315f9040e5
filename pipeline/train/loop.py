"""The Ray Train worker loop: the only module that talks to ``ray.train``.

Every rank runs :func:`train_loop`, which reads like Ray's own example: [1] restore or start
the run state, [2] prepare the model (DDP) and the data stream, [3] step, [4] log, [5] report
and checkpoint. Rank 0 writes checkpoints, logs to MLflow and runs the held-out evaluation;
every rank calls ``ray.train.report`` at the same steps (it is a barrier), which holds
because the data stream gives every rank the same number of batches.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import ray.train
import torch

from pipeline.data.stream import ShardStream, make_loader
from pipeline.model import VAE, elbo_terms, evaluate, kl_warmup
from pipeline.model.quality import binarize, binarize_fixed
from pipeline.serve.images import grid
from pipeline.train import checkpoint, fatal, faults, resume, upload
from pipeline.train.config import OptimConfig, TrainJob
from pipeline.train.metrics import WorkerMetrics
from pipeline.train.progress import Progress
from pipeline.train.step import (
    BadSamples,
    Objective,
    Precision,
    SkipBudget,
    StepResult,
    noise_seed,
    prepare_layout,
    train_step,
)
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


def planned_steps(max_steps: int, per_epoch: int, epochs: int) -> int:
    """Steps the run will take: ``epochs`` epochs, cut short by ``max_steps`` if set (the
    schedule's length and the progress line's total)."""
    return min(max_steps, per_epoch * epochs) if max_steps else per_epoch * epochs


def gather(counts: dict, world: int) -> list[dict]:
    """Every rank's ``counts`` (a collective: all ranks call it at the same step)."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [counts]
    out: list = [None] * world
    dist.all_gather_object(out, counts)
    return out


@dataclass
class RunState:
    """Everything a checkpoint restores on one rank. Built after the model is on its device,
    so the EMA copy and the optimizer state live where the parameters do."""

    job: TrainJob
    rank: int
    world: int
    vae: VAE
    ema: VAE | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    stream: ShardStream
    budget: SkipBudget
    bad: BadSamples
    run_id: str
    test_stream: ShardStream | None = None  # rank 0's held-out split, when there is one
    noise: torch.Generator | None = None  # reparameterization noise, on the model's device
    precision: Precision | None = None  # autocast (fp16: and its loss scaler) on that device
    step: int = 0
    epoch: int = 0

    @classmethod
    def create(cls, job: TrainJob, vae: VAE, rank: int, world: int, run_id: str) -> RunState:
        o = job.optim
        opt = torch.optim.AdamW(vae.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        stream = ShardStream(
            job.data, rank=rank, world_size=world, batch_size=o.batch_size, split="train"
        )
        total = planned_steps(o.max_steps, len(stream), o.epochs)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.warmup_steps, total))
        ema = copy.deepcopy(vae).requires_grad_(False) if o.ema_decay > 0 else None
        device = next(vae.parameters()).device
        test = None
        if rank == 0 and job.data.test_url:
            test = ShardStream(
                job.data, rank=0, world_size=1, batch_size=o.batch_size, split="test"
            )
        return cls(
            job,
            rank,
            world,
            vae,
            ema,
            opt,
            sched,
            stream,
            SkipBudget(o.max_skipped_steps),
            BadSamples(),
            run_id,
            test,
            torch.Generator(device=device),
            Precision.resolve(o.precision, device),
        )

    @property
    def total_steps(self) -> int:
        o = self.job.optim
        return planned_steps(o.max_steps, len(self.stream), o.epochs)

    def step_noise(self) -> torch.Generator:
        """The noise generator for the next step, seeded by (seed, rank, step): a resumed run
        draws what an uninterrupted one would at this step."""
        self.noise.manual_seed(noise_seed(self.job.optim.seed, self.rank, self.step))
        return self.noise

    def done(self) -> bool:
        o = self.job.optim
        return self.epoch >= o.epochs or bool(o.max_steps and self.step >= o.max_steps)

    def restore(self, ckpt: ray.train.Checkpoint | None) -> None:
        """Load ``ckpt`` (weights, EMA, optimizer, schedule, counters, stream position), or
        the run's newest earlier checkpoint that verifies if ``ckpt`` does not."""
        if ckpt is None:
            self.stream.set_epoch(0)
            return
        resumed = resume.load(ckpt)  # this rank's own download, never a shared folder
        if self.rank == 0:
            for bad in resumed.bad:
                print(f"warning: skipping checkpoint {bad}", flush=True)
            if resumed.bad:
                print(f"warning: resuming from the previous checkpoint {resumed.path}", flush=True)
        saved = resumed.saved
        self.vae.load_state_dict(saved["model"])
        if self.ema is not None and saved["ema"] is not None:
            self.ema.load_state_dict(saved["ema"])
        self.opt.load_state_dict(saved["optim"]["optimizer"])  # cast to the params' device
        self.sched.load_state_dict(saved["optim"]["scheduler"])
        if self.precision.scaler is not None and saved["optim"].get("scaler"):
            self.precision.scaler.load_state_dict(saved["optim"]["scaler"])
        s = saved["state"]
        self.step, self.epoch = s["step"], s["epoch"]
        self.budget.count = s["skipped_steps"]
        if self.rank == 0:  # the run totals, counted once (rank 0 holds them)
            self.bad = BadSamples(s.get("bad_samples"))
        self.run_id = s["mlflow_run_id"] or self.run_id
        self.stream.load_state_dict(s["data"])
        self.bad.epoch.update(self.stream.bad_counts())  # the epoch's restored count
        if self.rank == 0:
            print(f"resumed from checkpoint at epoch {self.epoch} step {self.step}", flush=True)

    def kl_weight(self) -> float:
        o = self.job.optim
        return o.kl_weight * kl_warmup(self.step, o.kl_warmup_steps)

    def train_step(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        noise: torch.Generator,
        metrics: WorkerMetrics,
    ) -> StepResult:
        """One optimizer step (skipped whole if not finite), the schedule, the step count."""
        o = self.job.optim
        res = train_step(
            model,
            self.vae,
            self.opt,
            x,
            kl_weight=self.kl_weight(),
            free_bits=o.free_bits,
            grad_clip=o.grad_clip,
            precision=self.precision,
            ema=self.ema,
            ema_decay=o.ema_decay,
            inject=partial(faults.corrupt_loss, self.step + 1, self.rank),
            generator=noise,
        )
        if res.skipped:
            metrics.skipped_steps.inc()
            if self.rank == 0:
                print(
                    f"step {self.step + 1}: non-finite loss or gradient, step skipped "
                    f"({self.budget.count + 1} so far)",
                    flush=True,
                )
        self.budget.record(res.skipped)
        self.sched.step()
        self.step += 1
        return res

    def checkpoint_due(self) -> bool:
        """A mid-epoch checkpoint step (the epoch's last step checkpoints anyway)."""
        every = self.job.optim.checkpoint_every
        return bool(every and self.step % every == 0 and self.step % len(self.stream))

    def end_epoch(self) -> None:
        self.epoch += 1
        self.stream.set_epoch(self.epoch)
        self.bad.epoch.clear()

    def record_failure(
        self, e: BaseException, fatal_url: str, tracker: Tracker | None, metrics: WorkerMetrics
    ) -> None:
        """Before a failure propagates: note a deterministic one (so restarts do not replay
        it) and log what was counted up to it (bad samples, skipped steps)."""
        fatal.record(fatal_url, e, self.step)
        metrics.bad_samples.inc(self.bad.reconcile(self.stream.stats()["bad_reasons"]))
        if tracker is not None:
            totals = BadSamples.as_metrics(self.bad.totals())
            tracker.metrics({"skipped_steps": self.budget.count, **totals}, self.step)
            tracker.flush()

    def save_and_report(self, extra: dict, tracker: Tracker | None, metrics: WorkerMetrics) -> None:
        """Every rank calls this at the same step; rank 0 attaches the checkpoint."""
        t0 = time.perf_counter()
        report = {"step": self.step, "epoch": self.epoch, **extra}
        counts = gather({"run": dict(self.bad.own), "epoch": self.stream.bad_counts()}, self.world)
        faults.kill_point("report", self.step, self.rank)
        if tracker is None:
            ray.train.report(report, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.write(tmp, counts, tracker.run_id)
            faults.hold(self.step, self.rank)
            storage = ray.train.get_context().get_storage()
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                # the storage may restart mid-upload: retried as shard reads are
                checkpoint_upload_fn=upload.retrying(
                    storage.persist_current_checkpoint,
                    self.job.data.retries,
                    self.job.data.retry_backoff,
                ),
            )
        metrics.checkpoint_seconds.observe(time.perf_counter() - t0)
        tracker.metrics({"checkpoint_seconds": time.perf_counter() - t0}, self.step)
        tracker.flush()  # metrics reach MLflow only once their step is checkpointed

    def write(self, directory: str, counts: list[dict], run_id: str) -> None:
        """Write the checkpoint into ``directory``; ``counts`` holds every rank's bad-sample
        counts (``{"run": ..., "epoch": ...}``, in rank order)."""
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "skipped_steps": self.budget.count,
            "bad_samples": self.bad.totals([c["run"] for c in counts[1:]]),
            "mlflow_run_id": run_id,
            "data": self.stream.state_dict([c["epoch"] for c in counts]),
            "config": to_dict(self.job),
        }
        checkpoint.save(
            directory,
            model=self.vae,
            state=state,
            optimizer=self.opt,
            scheduler=self.sched,
            ema=self.ema,
            scaler=self.precision.scaler,
        )


def start_run(
    job: TrainJob,
    rank: int,
    world: int,
    run_id: str,
    ckpt: ray.train.Checkpoint | None,
    prepare: Callable[[torch.nn.Module], torch.nn.Module],
    device: torch.device | None = None,
) -> tuple[torch.nn.Module, RunState]:
    """The model on its device first (``prepare``: Ray's ``prepare_model``, DDP), then the
    run state built on it and restored from ``ckpt``: the EMA copy, the optimizer state and
    the noise generator follow the parameters' device and dtype. ``device`` (default CPU)
    chooses the model's layout (channels_last on CUDA; ``optim.compile``). Returns (model, run)."""
    vae = prepare_layout(
        VAE.from_config(job.model), device or torch.device("cpu"), job.optim.compile
    )
    model = prepare(Objective(vae, job.optim.objective, job.optim.iwae_train_k))
    run = RunState.create(job, vae, rank, world, run_id)
    run.restore(ckpt)
    return model, run


def open_metrics(job: TrainJob, rank: int, local_rank: int) -> WorkerMetrics:
    """This worker's Prometheus endpoint (one port per worker on a node)."""
    port = job.tracking.metrics_port
    port = port + local_rank if port > 0 else port
    return WorkerMetrics(
        job.scaling.name, rank, port, job.tracking.metrics_sd_dir, job.tracking.metrics_host
    )


def train_loop(loop_config: dict) -> None:
    job: TrainJob = build(TrainJob, loop_config["job"])
    optim = job.optim
    fatal_url = fatal.fatal_url(storage_path(job.scaling.storage_path), job.scaling.name)
    fatal.check(fatal_url)  # an earlier attempt hit a deterministic failure: do not replay it
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    faults.record_attempt(rank)
    if optim.torch_threads:
        torch.set_num_threads(optim.torch_threads)
    torch.manual_seed(optim.seed)  # identical init on every rank (DDP also broadcasts rank 0's)

    # [1] Prepare and wrap the model (DDP), first: EMA and optimizer state follow its device.
    # [2] Restore the run (weights, optimizer, counters, data position) or start it.
    # "" run id: MLflow was down when the driver started; the tracker finds the run later.
    device = ray.train.torch.get_device()  # this rank's GPU, or the CPU
    model, run = start_run(
        job,
        rank,
        world,
        loop_config["mlflow_run_id"],
        ray.train.get_checkpoint(),
        ray.train.torch.prepare_model,
        device,
    )
    tracker = Tracker(RunSpec(**loop_config["mlflow_run"]), run.run_id) if rank == 0 else None
    metrics = open_metrics(job, rank, ctx.get_local_rank())
    progress = Progress(metrics, world, run.total_steps)
    try:
        while not run.done():
            progress.fetching()
            # [3] Prepare the data: this rank's batches, pinned and scaled on its device
            for batch in make_loader(run.stream, pin_memory=device.type == "cuda", device=device):
                progress.ready()
                noise = run.step_noise()  # seeded by (seed, rank, step)
                x = batch["image"]
                if job.data.binarize:  # a fresh draw every step (dynamic binarization)
                    x = binarize(x, noise)
                metrics.bad_samples.inc(run.bad.add(batch["skipped"]))
                faults.record_keys(rank, run.epoch, run.step + 1, batch["key"])
                res = run.train_step(model, x, noise, metrics)  # [4] One optimizer step
                progress.stepped(run.step, x.shape[0])
                if run.step % optim.log_every == 0:  # [5] Log (a collective: all ranks)
                    log_row(run, progress, res, tracker)
                if run.checkpoint_due():  # [6] Report + checkpoint mid-epoch
                    run.save_and_report({}, tracker, metrics)
                if optim.max_steps and run.step >= optim.max_steps:
                    break
                progress.fetching()
            run.end_epoch()
            ev = evaluate_epoch(run, device, tracker) if tracker is not None else {}
            run.save_and_report(ev, tracker, metrics)  # [6] Report + checkpoint: epoch end
        faults.record_weights(rank, run.step, run.vae)
        finish_tracking(tracker)
    except BaseException as e:
        run.record_failure(e, fatal_url, tracker, metrics)
        raise
    finally:
        metrics.close(linger=float(os.environ.get("PIPELINE_METRICS_LINGER", "0")))


def finish_tracking(tracker: Tracker | None) -> None:
    """Rank 0: wait (bounded) for MLflow to take every pending metric point and image."""
    if tracker is not None and not tracker.flush(wait=mlflow_wait()):
        print(
            f"warning: MLflow at {tracker.uri} still unreachable at the end of training; "
            f"{tracker.pending} metric points and images were not logged",
            flush=True,
        )


def log_row(run: RunState, progress: Progress, res: StepResult, tracker: Tracker | None) -> None:
    """The periodic metric row: gauges on every rank, MLflow and the progress line on rank 0.
    Gathers the ranks' bad-sample counts, so every rank calls it at the same step."""
    totals = run.bad.totals(gather(dict(run.bad.own), run.world)[1:])
    row = progress.row(
        res,
        lr=run.sched.get_last_lr()[0],
        kl_weight=float(res.out["kl_weight"]),
        epoch=run.epoch,
        skipped_steps=run.budget.count,
        bad_totals=totals,
    )
    if tracker is not None:
        tracker.metrics(row, run.step)
        print(progress.line(row, run.step), flush=True)


def evaluate_epoch(run: RunState, device: torch.device, tracker: Tracker) -> dict:
    """Rank 0's end-of-epoch evaluation, on the EMA weights when there are any."""
    return _evaluate(
        run.vae if run.ema is None else run.ema,
        run.test_stream,
        run.job.optim,
        device,
        tracker,
        run.step,
        binarized=run.job.data.binarize,
    )


@torch.no_grad()
def eval_metrics(vae: VAE, batches: list[torch.Tensor], iwae_k: int, iwae_images: int) -> dict:
    """Held-out ELBO terms (bits) and IWAE-K bound, PSNR, active units; seeded, so a
    checkpoint's numbers can be reproduced exactly from the same batches."""
    g = torch.Generator(device="cpu").manual_seed(0)
    terms = [elbo_terms(vae, x, generator=g) for x in batches]
    ev = {
        f"eval_{k}": float(sum(t[k] for t in terms) / len(terms))
        for k in ("neg_elbo_bits", "rate_bits", "distortion_bits", "bits_per_dim")
    }
    res = evaluate(vae, [torch.cat(batches)[:iwae_images]], k=iwae_k, generator=g)
    for k in ("nll_iwae", "gap", "bits_per_dim", "psnr", "active_units"):
        if k in res:
            ev[f"eval_iwae_{k}" if k == "bits_per_dim" else f"eval_{k}"] = float(res[k])
    return ev


@torch.no_grad()
def _evaluate(
    vae: VAE, test_stream, o: OptimConfig, device, tracker: Tracker, step: int, binarized: bool
) -> dict:
    """Held-out ELBO, IWAE-K on a subset, PSNR, active units; reconstruction + prior grids.
    A binarized run is scored on one fixed binarization of the held-out batches."""
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
            if batches and binarized:
                batches = list(binarize_fixed(torch.cat(batches)).split(len(batches[0])))
            if batches:
                ev = eval_metrics(vae, batches, o.iwae_k, o.iwae_images)
                x = batches[0][:8]
                params, _ = vae(x, sample_posterior=False)
                pairs = torch.cat([x, vae.likelihood.mean(params).clamp(0, 1)])
                tracker.image(grid(pairs, ncol=8), "reconstructions", step)
        g = torch.Generator(device="cpu").manual_seed(0)
        tracker.image(
            grid(vae.sample_prior(64, generator=g).clamp(0, 1), ncol=8), "prior_samples", step
        )
        if ev:
            tracker.metrics(ev, step)
        return ev
    finally:
        vae.train()
