"""2. End to end: ``run_training`` (Ray Train, data streamed from S3) against the plain loop
over in-memory tensors; 2 DDP workers against 1 at the same global batch.
3. Ray Train overhead: the minimal loop under ``TorchTrainer`` against ``torchrun``.

The Ray runs' steady rate is the median of the later half of the ``images_per_second``
points rank 0 logs to MLflow every ``log_every`` steps (global img/s over the window), so
Ray/worker start-up and the first DataLoader batches are excluded; wall time is reported too.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Settings, Stopwatch, later_half, median, ratio, rnd
from bench.cpu import CpuMeter
from bench.loops import LIKELIHOOD, MODEL, minimal_loop
from bench.stack import REPO_ROOT, BenchStack
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.train.config import TrainJob
from pipeline.typed import build


def ingest_fmnist(s3_url: str, count: int) -> str:
    """The first ``count`` Fashion-MNIST train images as 1024-sample shards on S3."""
    ingest(
        IngestConfig(
            output_url=s3_url, source="fashion_mnist", limit=count, shard_samples=1024, workers=2
        ),
        progress=False,
    )
    return f"{s3_url}/train"


def make_job(
    train_url: str,
    stack: BenchStack,
    name: str,
    workers: int,
    settings: Settings,
    model: dict | None = None,
    **optim,
) -> TrainJob:
    """The pipeline's job for ``workers`` Ray Train workers at global batch ``settings.batch``;
    ``model`` replaces the bench's model, ``optim`` overrides optimizer settings."""
    from pipeline.model import PRESETS

    return build(
        TrainJob,
        {
            "data": {"train_url": train_url, "num_workers": settings.loader_workers},
            "model": model or dict(PRESETS[MODEL], likelihood=LIKELIHOOD),
            "optim": {
                "epochs": 1,
                "max_steps": settings.train_steps,
                "batch_size": settings.batch // workers,
                "lr": 2e-3,
                "warmup_steps": 0,
                "checkpoint_every": 0,
                "log_every": settings.log_every,
                "torch_threads": settings.threads,
                "eval_batches": 1,
                "iwae_k": 1,
                "iwae_images": 1,
                **optim,
            },
            "scaling": {
                "num_workers": workers,
                "cpus_per_worker": 1,
                "storage_path": str(stack.dir / "ray_results"),
                "name": name,
                "max_failures": 0,
                "num_to_keep": 1,
            },
            "tracking": {
                "mlflow_uri": stack.mlflow.uri,
                "experiment": "bench",
                "registered_model": "bench",
                "metrics_sd_dir": "",
            },
        },
    )


def pipeline_run(job: TrainJob, stack: BenchStack) -> dict:
    """One ``run_training``; steady img/s and data-wait share from its MLflow metrics, and
    the CPU seconds each of our process groups used meanwhile."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.driver import run_training
    from pipeline.train.tracking import metric_key

    with Stopwatch() as t, CpuMeter(stack.started) as cpu:
        res = run_training(job, register=False)
    client = MlflowClient(job.tracking.mlflow_uri)

    def series(name: str) -> list[float]:
        history = client.get_metric_history(res.run_id, metric_key(name))
        return [m.value for m in sorted(history, key=lambda m: m.step)]

    ips, wait = series("images_per_second"), series("data_wait_fraction")
    return {
        "run_id": res.run_id,
        "steps_done": res.metrics.get("step"),
        "images_per_second": rnd(median(later_half(ips))),
        "data_wait_fraction": round(median(later_half(wait)), 3),
        "windows": [rnd(v) for v in ips],
        "data_wait_windows": [round(v, 3) for v in wait],
        # [step, unix ms when rank 0 logged it, loss]
        "loss_log": [
            [m.step, m.timestamp, rnd(m.value)]
            for m in sorted(
                client.get_metric_history(res.run_id, metric_key("loss")), key=lambda m: m.step
            )
        ],
        "wall_seconds": rnd(t.seconds),
        "cpu_seconds_by_process": cpu.seconds,
        "cpu_seconds_by_name": cpu.by_name,
        "steps": job.optim.max_steps,
        "workers": job.scaling.num_workers,
    }


def plain_run(settings: Settings) -> dict:
    """The baseline: :func:`minimal_loop` in this process, same model, batch and threads."""
    return minimal_loop(
        {
            "steps": settings.plain_steps,
            "batch": settings.batch,
            "threads": settings.threads,
            "log_every": settings.log_every,
        }
    )


def end_to_end(settings: Settings, stack: BenchStack, log=print) -> dict:
    stack.ray_init()
    count = settings.batch * settings.train_steps
    url = ingest_fmnist(stack.bucket("bench-train") + "/fmnist", count)
    plain, runs = [], {}
    stamp = time.strftime("%H%M%S")
    plain.append(plain_run(settings))  # baselines bracket the Ray runs (load drifts)
    runs["ray_1w"] = pipeline_run(make_job(url, stack, f"bench-1w-{stamp}", 1, settings), stack)
    log(f"train ray_1w: {runs['ray_1w']['images_per_second']} img/s")
    plain.append(plain_run(settings))
    runs["ray_2w"] = pipeline_run(make_job(url, stack, f"bench-2w-{stamp}", 2, settings), stack)
    log(f"train ray_2w: {runs['ray_2w']['images_per_second']} img/s")
    plain.append(plain_run(settings))
    base = median(p["images_per_second"] for p in plain)
    log(f"train plain: {[rnd(p['images_per_second']) for p in plain]} img/s")
    return {
        "config": {
            "model": MODEL,
            "global_batch": settings.batch,
            "torch_threads": settings.threads,
            "loader_workers_per_rank": settings.loader_workers,
            "ray_steps": settings.train_steps,
            "plain_steps": settings.plain_steps,
            "log_every": settings.log_every,
            "plain_repeats": len(plain),
            "ray_repeats": 1,
            "dataset": f"Fashion-MNIST train, first {count}",
        },
        "plain": {
            "images_per_second": rnd(base),
            "repeats": [rnd(p["images_per_second"]) for p in plain],
        },
        **runs,
        "ratios": {
            "ray_1w_vs_plain": ratio(runs["ray_1w"]["images_per_second"], base),
            "ray_2w_vs_ray_1w": ratio(
                runs["ray_2w"]["images_per_second"], runs["ray_1w"]["images_per_second"]
            ),
        },
    }


def torchtrainer_run(settings: Settings, stack: BenchStack, name: str, out: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bench.loops import ray_loop

    config = {
        "steps": settings.overhead_steps,
        "batch": settings.batch,
        "threads": settings.threads,
        "log_every": settings.log_every,
        "out": str(out),
    }
    trainer = TorchTrainer(
        ray_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=str(stack.dir / "ray_results")),
    )
    with Stopwatch() as t, CpuMeter(stack.started) as cpu:
        trainer.fit()
    return {
        **json.loads(out.read_text()),
        "wall_seconds": rnd(t.seconds),
        "cpu_seconds": rnd(sum(cpu.seconds.values())),
        "cpu_seconds_by_name": cpu.by_name,
    }


def torchrun_run(settings: Settings, out: Path) -> dict:
    from pipeline.stack import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "bench.loops",
        "--steps",
        str(settings.overhead_steps),
        "--batch",
        str(settings.batch),
        "--threads",
        str(settings.threads),
        "--log-every",
        str(settings.log_every),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with Stopwatch() as t:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800
        )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {**json.loads(out.read_text()), "wall_seconds": rnd(t.seconds), "cpu_seconds": rnd(cpu)}


def overhead(settings: Settings, stack: BenchStack, log=print) -> dict:
    stack.ray_init()
    ray_runs, torchrun_runs = [], []
    for i in range(settings.overhead_repeats):  # alternating, so drifting load hits both
        torchrun_runs.append(torchrun_run(settings, stack.dir / f"torchrun-{i}.json"))
        name = f"bench-minimal-{i}-{time.strftime('%H%M%S')}"
        ray_runs.append(torchtrainer_run(settings, stack, name, stack.dir / f"{name}.json"))
        log(
            f"overhead rep {i}: torchrun {rnd(torchrun_runs[-1]['images_per_second'])}, "
            f"TorchTrainer {rnd(ray_runs[-1]['images_per_second'])} img/s"
        )

    def summary(runs: list[dict]) -> dict:
        return {
            "images_per_second": rnd(median(r["images_per_second"] for r in runs)),
            "wall_seconds": rnd(median(r["wall_seconds"] for r in runs)),
            "seconds_to_first_step": rnd(median(r["seconds_to_first_step"] for r in runs), 2),
            "cpu_seconds": rnd(median(r["cpu_seconds"] for r in runs)),
            "repeats": [rnd(r["images_per_second"]) for r in runs],
            "wall_repeats": [r["wall_seconds"] for r in runs],
        }

    ray_s, tr_s = summary(ray_runs), summary(torchrun_runs)
    ray_s["cpu_seconds_by_name_last_rep"] = ray_runs[-1]["cpu_seconds_by_name"]
    return {
        "config": {
            "model": MODEL,
            "processes": 2,
            "global_batch": settings.batch,
            "torch_threads": settings.threads,
            "steps": settings.overhead_steps,
            "repeats": settings.overhead_repeats,
            "backend": "gloo",
            "data": "in-memory Fashion-MNIST tensors",
        },
        "torchtrainer": ray_s,
        "torchrun": tr_s,
        "ratios": {
            "torchtrainer_vs_torchrun": ratio(
                ray_s["images_per_second"], tr_s["images_per_second"]
            ),
            "wall_torchtrainer_vs_torchrun": ratio(ray_s["wall_seconds"], tr_s["wall_seconds"]),
            "cpu_torchtrainer_vs_torchrun": ratio(ray_s["cpu_seconds"], tr_s["cpu_seconds"]),
        },
    }
