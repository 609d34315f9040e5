"""``make gpu-check``: the GPU training path end to end, one prepared run, at most 8 minutes.

On one GPU: a 1-worker Ray Train run (NCCL) of 200 steps of the 64x64 RGB preset with EMA
and bf16 autocast; the worker SIGKILLs itself mid-run and Ray Train resumes it from the last
checkpoint; held-out evaluation and image grids at every epoch end, then the gallery job, on
the GPU. Without a GPU the same checks run on CPU (gloo, a tiny model, a few steps, ~2-3
minutes) and the CUDA-only ones are listed as skipped.

Prints images/s, peak GPU memory and the data-wait fraction, then one PASS/FAIL/SKIP line
per check; exits 0 only if no check failed. Starts its own SeaweedFS, MLflow and Ray head on
free 127.0.0.1 ports in a temp dir and stops exactly those at the end (also on Ctrl-C).

    .venv/bin/python -m bench.gpu_check
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

DEADLINE_S = 8 * 60


@dataclass
class Plan:
    """What the run trains on this machine: the GPU plan or its small CPU twin."""

    device: str
    image_size: int
    model: dict
    n_train: int
    n_test: int
    batch: int
    epochs: int
    checkpoint_every: int
    log_every: int
    kill_step: int  # the worker SIGKILLs itself in this (1-based) step
    loader_workers: int

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.batch

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def resume_step(self) -> int:
        """The last checkpoint before the kill: mid-epoch every ``checkpoint_every`` steps,
        and at every epoch end."""
        marks = [s for s in range(1, self.kill_step) if s % self.checkpoint_every == 0]
        marks += [s for s in range(1, self.kill_step) if s % self.steps_per_epoch == 0]
        return max(marks, default=0)


def plan_for(cuda: bool) -> Plan:
    from pipeline.model import PRESETS

    if cuda:  # preset "64": 2 epochs of 100 steps of 64 images; decode on up to 8 cores
        loaders = max(1, min(8, (os.cpu_count() or 2) - 2))
        return Plan(
            "cuda",
            64,
            dict(PRESETS["64"]),
            n_train=6400,
            n_test=256,
            batch=64,
            epochs=2,
            checkpoint_every=50,
            log_every=10,
            kill_step=130,
            loader_workers=loaders,
        )
    tiny = dict(
        image_size=16,
        in_channels=3,
        channels=[8, 16],
        blocks_per_stage=1,
        latent="spatial",
        latent_channels=4,
        likelihood="discretized_logistic",
    )
    return Plan(
        "cpu",
        16,
        tiny,
        n_train=512,
        n_test=64,
        batch=32,
        epochs=2,
        checkpoint_every=8,
        log_every=4,
        kill_step=12,
        loader_workers=1,
    )


class Report:
    """PASS/FAIL/SKIP lines, printed as they happen and again at the end."""

    def __init__(self):
        self.lines: list[tuple[str, str, str]] = []

    def add(self, status: str, name: str, detail: str) -> None:
        self.lines.append((status, name, detail))
        print(f"{status} {name}: {detail}", flush=True)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.add("PASS" if ok else "FAIL", name, detail)
        return ok

    def skip(self, name: str, detail: str) -> None:
        self.add("SKIP", name, f"CUDA-only, skipped: {detail}")

    @property
    def failed(self) -> bool:
        return any(s == "FAIL" for s, _, _ in self.lines) or not self.lines


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ingest_data(plan: Plan, bucket: str) -> str:
    from pipeline.data.config import IngestConfig
    from pipeline.data.ingest import ingest

    url = f"{bucket}/synthetic{plan.image_size}"
    total = plan.n_train + plan.n_test
    ingest(
        IngestConfig(
            output_url=url,
            source="synthetic",
            synthetic_count=total,
            synthetic_size=plan.image_size,
            synthetic_mode="RGB",
            test_fraction=plan.n_test / total,
            shard_samples=max(64, total // 16),
            workers=max(1, min(8, os.cpu_count() or 1)),
        ),
        progress=False,
    )
    return url


def make_job(plan: Plan, data_url: str, ckpt_url: str, mlflow_uri: str):
    from pipeline.train.config import TrainJob
    from pipeline.typed import build

    cuda = plan.device == "cuda"
    return build(
        TrainJob,
        {
            "data": {
                "train_url": f"{data_url}/train",
                "test_url": f"{data_url}/test",
                "num_workers": plan.loader_workers,
                "shuffle_buffer": 256,
            },
            "model": plan.model,
            "optim": {
                "epochs": plan.epochs,
                "batch_size": plan.batch,
                "lr": 1e-3,
                "warmup_steps": 10,
                "ema_decay": 0.99,
                "precision": "bf16",
                "checkpoint_every": plan.checkpoint_every,
                "log_every": plan.log_every,
                "eval_batches": 2,
                "iwae_k": 8,
                "iwae_images": 16,
                "torch_threads": 0 if cuda else 1,
            },
            "scaling": {
                "num_workers": 1,
                "use_gpu": cuda,
                "gpus_per_worker": 1 if cuda else 0,
                "cpus_per_worker": 1,
                "storage_path": ckpt_url,
                "name": "gpu-check",
                "max_failures": 2,
                "collective_timeout_s": 300,
            },
            "tracking": {
                "mlflow_uri": mlflow_uri,
                "experiment": "gpu-check",
                "registered_model": "gpu-check",
                "metrics_port": -1,
                "metrics_sd_dir": "",
                "system_metrics_interval": 2.0,
            },
        },
    )


def connect_ray_settings() -> None:
    """This process talks to the check's own Ray head on 127.0.0.1 with its token."""
    import ray._private.ray_constants as ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    ray_constants.ENABLE_RAY_CLUSTER = False  # keep 127.0.0.1, not the host's IP
    Config.initialize("")  # Ray reads RAY_AUTH_MODE and the token once per process
    AuthenticationTokenLoader.instance().reset_cache()


def history(client, run_id: str, name: str) -> list[tuple[int, float]]:
    """Every (step, value) of the loop's metric ``name`` (its MLflow key: ``metric_key``)."""
    from pipeline.train.tracking import metric_key

    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric_key(name)))


def check_device_path(plan: Plan, report: Report) -> None:
    """In this process, on this machine's device: the model layout and the batch path."""
    from pipeline.model import VAE
    from pipeline.model.config import ModelConfig
    from pipeline.train.step import Precision, prepare_layout

    if plan.device != "cuda":
        for name in ("cuda-layout", "cuda-bf16", "cuda-pinned"):
            report.skip(name, "no GPU on this machine")
        return
    dev = torch.device("cuda")
    vae = prepare_layout(VAE.from_config(ModelConfig(**plan.model)), dev).to(dev)
    conv = next(m for m in vae.modules() if isinstance(m, torch.nn.Conv2d))
    report.check(
        "cuda-layout",
        conv.weight.is_contiguous(memory_format=torch.channels_last),
        "conv weights channels_last on cuda",
    )
    p = Precision.resolve("auto", dev)
    report.check(
        "cuda-bf16",
        p.name == "bf16" and torch.cuda.is_bf16_supported(),
        f"precision auto resolves to {p.name} on {torch.cuda.get_device_name()}",
    )
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8).pin_memory()
    y = x.to(dev, non_blocking=True)
    torch.cuda.synchronize()
    report.check("cuda-pinned", x.is_pinned() and y.is_cuda, "pinned batch, async copy to GPU")


def run(report: Report) -> None:
    from bench.stack import BenchStack

    cuda = torch.cuda.is_available()
    plan = plan_for(cuda)
    log(
        f"device {plan.device}: {plan.steps} steps of {plan.batch} {plan.image_size}x"
        f"{plan.image_size} RGB images, kill at step {plan.kill_step}"
    )
    check_device_path(plan, report)
    with BenchStack(num_cpus=4) as st:
        report.check(
            "services",
            True,
            "SeaweedFS, MLflow, Ray head on 127.0.0.1 "
            + ", ".join(f"{k} {v}s" for k, v in st.startup_seconds.items()),
        )
        t0 = time.perf_counter()
        data = ingest_data(plan, st.bucket("data"))
        log(f"ingested {plan.n_train}+{plan.n_test} images in {time.perf_counter() - t0:.0f}s")
        train_and_check(plan, st, data, report)


def train_and_check(plan: Plan, st, data_url: str, report: Report) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline import storage
    from pipeline.train import checkpoint
    from pipeline.train.driver import run_training

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=st.dir))
    marker, keys_dir = tmp / "killed.pid", tmp / "keys"
    keys_dir.mkdir()
    job = make_job(plan, data_url, st.bucket("checkpoints") + "/ray", st.mlflow.uri)
    faults = {
        "PIPELINE_FAULT_KILL_STEP": str(plan.kill_step),
        "PIPELINE_FAULT_KILL_RANK": "0",
        "PIPELINE_FAULT_MARKER": str(marker),
        # Ray Train V2 registers a reported checkpoint when its controller next polls the
        # worker; a worker killed before that poll restarts from the checkpoint before it.
        # The delay keeps the kill clear of that window, so the check measures the resume.
        "PIPELINE_FAULT_KILL_DELAY": "5",
        "PIPELINE_RECORD_KEYS_DIR": str(keys_dir),
        "OMP_NUM_THREADS": "1",
    }
    connect_ray_settings()
    t0 = time.perf_counter()
    res = run_training(job, address=st.ray.address, env_vars=faults)
    wall = time.perf_counter() - t0
    client = MlflowClient(st.mlflow.uri)
    loss = history(client, res.run_id, "loss")
    report.check(
        "train",
        res.metrics.get("step") == plan.steps and len(loss) > 1 and loss[-1][1] < loss[0][1],
        f"1 worker on {plan.device} ({'nccl' if plan.device == 'cuda' else 'gloo'}), "
        f"{res.metrics.get('step')}/{plan.steps} steps in {wall:.0f}s, bf16 autocast, "
        f"EMA; loss {loss[0][1]:.1f} -> {loss[-1][1]:.1f}",
    )

    # kill and resume: steps after the last checkpoint up to the kill ran twice, the rest once
    runs = client.search_runs([client.get_experiment_by_name("gpu-check").experiment_id])
    steps = defaultdict(int)
    for line in (keys_dir / "rank0.txt").read_text().splitlines():
        steps[int(line.split()[1])] += 1
    replayed = sorted(s for s, n in steps.items() if n == 2 * plan.batch)
    ran_twice = f"{replayed[0]}-{replayed[-1]}" if replayed else "none"
    want = list(range(plan.resume_step + 1, plan.kill_step + 1))
    axis = [s for s, _ in loss] == list(range(plan.log_every, plan.steps + 1, plan.log_every))
    report.check(
        "kill-resume",
        marker.exists()
        and replayed == want
        and len(runs) == 1
        and axis
        and sorted(steps) == list(range(1, plan.steps + 1)),
        f"worker SIGKILLed in step {plan.kill_step}, resumed from the step "
        f"{plan.resume_step} checkpoint: steps {ran_twice} ran twice (want "
        f"{want[0]}-{want[-1]}), every other step once; {len(runs)} MLflow run, "
        f"loss axis {'without' if axis else 'WITH'} gaps or repeats",
    )

    saved = checkpoint.load(storage.download_dir(res.checkpoint_url, str(tmp / "ckpt")))
    ema, model = saved["ema"], saved["model"]
    finite = ema is not None and all(torch.isfinite(v).all() for v in ema.values())
    differs = ema is not None and any(not torch.equal(ema[k], model[k]) for k in model)
    report.check(
        "ema",
        finite and differs and saved["state"]["step"] == plan.steps,
        f"final checkpoint (step {saved['state']['step']}) holds finite EMA weights "
        f"that differ from the model's",
    )

    ev = history(client, res.run_id, "eval_neg_elbo_bits")
    ends = [plan.steps_per_epoch * e for e in range(1, plan.epochs + 1)]
    images = {a.path for a in client.list_artifacts(res.run_id, "images")}
    drawn = any("reconstructions" in p for p in images) and any("prior" in p for p in images)
    report.check(
        "eval",
        [s for s, _ in ev] == ends and all(math.isfinite(v) for _, v in ev) and drawn,
        f"held-out -ELBO at steps {[s for s, _ in ev]}: "
        f"{', '.join(f'{v:.0f}' for _, v in ev)} bits; reconstruction and prior grids "
        f"logged, on {plan.device}",
    )

    system = [k for k in client.get_run(res.run_id).data.metrics if k.startswith("system/")]
    report.check(
        "system-metrics",
        "system/cpu_utilization_percentage" in system,
        f"{len(system)} MLflow system/ metrics in the run",
    )

    gallery_check(plan, st, data_url, report)
    summary(plan, client, res.run_id, report)


def gallery_check(plan: Plan, st, data_url: str, report: Report) -> None:
    from pipeline import storage
    from pipeline.serve.config import SampleJob
    from pipeline.serve.gallery import MARKER, run_sample
    from pipeline.typed import build

    job = build(
        SampleJob,
        {
            "sample": {
                "model_name": "gpu-check",
                "output_url": st.bucket("galleries"),
                "data_url": f"{data_url}/test",
                "temperatures": [0.8, 1.0],
                "grid_rows": 4,
                "grid_cols": 4,
                "interpolation_pairs": 2,
                "traversal_dims": 2,
            },
            "tracking": {"mlflow_uri": st.mlflow.uri, "experiment": "gpu-check-galleries"},
        },
    )
    url = run_sample(job)
    files = storage.listdir(url) if url else []
    pngs = [f for f in files if f.endswith(".png")]
    report.check(
        "gallery",
        MARKER in files and "index.html" in files and len(pngs) == 5,
        f"{len(pngs)} grids and index.html from the registered model, drawn on {plan.device}",
    )


def summary(plan: Plan, client, run_id: str, report: Report) -> None:
    ips = [v for _, v in history(client, run_id, "images_per_second")][1:]  # after warm-up
    wait = [v for _, v in history(client, run_id, "data_wait_fraction")][1:]
    print(
        f"images/s (median of logged windows after the first): "
        f"{statistics.median(ips) if ips else float('nan'):,.0f}",
        flush=True,
    )
    print(
        f"data-wait fraction (mean): {statistics.fmean(wait) if wait else float('nan'):.1%}",
        flush=True,
    )
    if plan.device == "cuda":
        peak = max((v for _, v in history(client, run_id, "gpu_memory_peak_mb")), default=0.0)
        print(f"peak GPU memory (training worker): {peak:,.0f} MiB", flush=True)
        report.check(
            "cuda-memory", peak > 0, f"the worker trained on the GPU, peak {peak:,.0f} MiB"
        )
    else:
        print("peak GPU memory: n/a (no GPU on this machine)", flush=True)
        report.skip("cuda-memory", "no GPU on this machine")


def _timeout(signum, frame):
    raise TimeoutError(f"gpu-check ran past {DEADLINE_S // 60} minutes")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # services are stopped by BenchStack.__exit__
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(DEADLINE_S)
    report = Report()
    t0 = time.perf_counter()
    try:
        run(report)
    except BaseException as e:  # a check that could not finish is a failed check
        traceback.print_exc()
        report.add("FAIL", "run", f"{type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
    print(
        f"\n== gpu-check on {'cuda' if torch.cuda.is_available() else 'cpu'}: "
        f"{time.perf_counter() - t0:.0f}s ==",
        flush=True,
    )
    for status, name, detail in report.lines:
        print(f"{status} {name}: {detail}")
    skipped = [n for s, n, _ in report.lines if s == "SKIP"]
    if skipped:
        print(f"CUDA-only checks skipped (no GPU on this machine): {', '.join(skipped)}")
    print("gpu-check: " + ("FAILED" if report.failed else "all checks passed"), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
