"""8. Rate-distortion sweep: ``pipeline sweep``'s 3 points (Ray Tune trials, each a 1-worker
Ray Train run) against the same 3 points trained one after another with ``run_training``
(a user's shell loop over ``pipeline train``), in the same run, on the same data.

Both measure wall time from the first call to the last result, start-up included: that is
what a user waits. Two one-after-another runs bracket the sweep (load drifts; the first run
also pays cold caches); their median is the baseline. Concurrency can only win on the cores the Ray head offers; the held-out
rate and distortion of each point come from the sweep.
"""

from __future__ import annotations

import time

from bench.common import Settings, Stopwatch, median, ratio, rnd
from bench.stack import BenchStack
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.sweep.config import SweepJob
from pipeline.typed import build, to_dict

WEIGHTS = [0.1, 1.0, 10.0]


def sweep_job(url: str, stack: BenchStack, name: str, settings: Settings) -> SweepJob:
    """A small conv VAE, 1 worker and 1 torch thread per point, ``settings.train_steps // 2``
    steps: the tests' model size, so the comparison is about scheduling, not FLOPs."""
    return build(
        SweepJob,
        {
            "data": {
                "train_url": f"{url}/train",
                "test_url": f"{url}/test",
                "num_workers": 0,
                "shuffle_buffer": 256,
            },
            "model": {"channels": [16, 32], "latent_dim": 16},
            "optim": {
                "epochs": 1,
                "max_steps": max(settings.train_steps // 2, 10),
                "batch_size": 64,
                "warmup_steps": 0,
                "checkpoint_every": 0,
                "log_every": settings.log_every,
                "torch_threads": settings.threads,
                "eval_batches": 2,
                "iwae_k": 4,
                "iwae_images": 16,
            },
            "scaling": {
                "num_workers": 1,
                "cpus_per_worker": 1,
                "storage_path": str(stack.dir / "ray_results"),
                "name": name,
                "max_failures": 0,
                "num_to_keep": 1,
            },
            "tracking": {
                "mlflow_uri": stack.mlflow.uri,
                "experiment": "bench-sweep",
                "registered_model": "bench-sweep",
                "metrics_sd_dir": "",
                "system_metrics_interval": 0,
            },
            "sweep": {"kl_weights": WEIGHTS},
        },
    )


def run(settings: Settings, stack: BenchStack, log=print) -> dict:
    from pipeline.sweep.driver import run_sweep
    from pipeline.train.driver import run_training

    stack.ray_init()
    url = stack.bucket("bench-sweep") + "/fmnist"
    ingest(
        IngestConfig(output_url=url, source="fashion_mnist", limit=4096, shard_samples=512),
        progress=False,
    )
    stamp = time.strftime("%H%M%S")

    def sequential(name: str) -> float:
        seq = sweep_job(url, stack, name, settings)
        with Stopwatch() as t:
            for point in seq.points():
                run_training(seq.train_job(point), register=False)
        log(f"sequential: 3 points one after another in {t.seconds:.0f}s")
        return t.seconds

    seq = [sequential(f"seq1-{stamp}")]  # the one-after-another runs bracket the sweep
    job = sweep_job(url, stack, f"rd-{stamp}", settings)
    with Stopwatch() as t_sweep:
        res = run_sweep(job, register=False)
    log(f"sweep: 3 points concurrently in {t_sweep.seconds:.0f}s")
    seq.append(sequential(f"seq2-{stamp}"))
    points = sorted(res.results.values(), key=lambda r: r.kl_weight)
    return {
        "config": {
            "kl_weights": WEIGHTS,
            "steps_per_point": job.optim.max_steps,
            "workers_per_point": job.scaling.num_workers,
            "ray_cpus": stack.num_cpus,
            "batch": job.optim.batch_size,
            "model": to_dict(job)["model"],
        },
        "sweep_wall_seconds": rnd(t_sweep.seconds),
        "sequential_wall_seconds": rnd(median(seq)),
        "sequential_runs_seconds": [rnd(x) for x in seq],
        "speedup": ratio(median(seq), t_sweep.seconds),
        "points": [
            {
                "kl_weight": p.kl_weight,
                "rate_bits": rnd(p.rate_bits, 2),
                "distortion_bits": rnd(p.distortion_bits, 2),
                "neg_elbo_bits": rnd(p.neg_elbo_bits, 2),
            }
            for p in points
        ],
        "best": res.best.name if res.best else None,
    }
