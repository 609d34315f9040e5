"""The training driver: owns the MLflow run, launches Ray Train, registers the model.

Relaunching with the same ``scaling.name`` and ``scaling.storage_path`` resumes: Ray Train V2
restores the latest checkpoint, and the driver finds the unfinished MLflow run by its tags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.train.config import TrainJob
from pipeline.train.tracking import (
    RunSpec,
    find_or_create_run,
    mlflow_wait,
    public_uri,
    storage_path,
    ui_url,
    wait_for_run,
)
from pipeline.typed import to_dict

__all__ = [
    "TrainResult",
    "ray_address",
    "ray_train_env",
    "register_model",
    "run_training",
    "storage_path",
    "torch_config",
    "worker_env",
]


@dataclass
class TrainResult:
    run_id: str
    checkpoint_url: str  # a local path or a URL with its scheme (s3://...)
    metrics: dict
    model_version: str | None
    model_uri: str | None


def ray_address(explicit: str | None = None) -> str | None:
    """A GCS address for ``ray.init``; None starts a local cluster."""
    for addr in (explicit, os.environ.get("RAY_ADDRESS"), os.environ.get("PIPELINE_RAY_GCS")):
        if addr and not addr.startswith(("http://", "https://")):
            return addr
    return None


def torch_config(job: TrainJob):
    """Ray Train's process-group settings: NCCL on GPUs, gloo on CPUs, and a collective
    timeout, so a rank stuck in an all-reduce fails the attempt (Ray restarts it from the
    last checkpoint) instead of hanging every rank."""
    from ray.train.torch import TorchConfig

    s = job.scaling
    return TorchConfig(backend="nccl" if s.use_gpu else "gloo", timeout_s=s.collective_timeout_s)


def ray_train_env(job: TrainJob) -> dict[str, str]:
    """Ray Train's own timeouts, from the config. Ray reads them from the driver's
    environment when the run starts and hands them to its controller and workers.

    ``RAY_TRAIN_COLLECTIVE_TIMEOUT_S``: Ray Train's barrier in ``ray.train.report`` (no
    timeout by default) gives up after ``scaling.collective_timeout_s``, as gloo/NCCL do.
    ``RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S``: a worker process that stops answering the
    controller's poll (SIGSTOPped, hung) is dead after the same time (Ray: 10 min), wherever
    the other ranks wait. ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``: placing a worker group
    waits ``scaling.worker_start_timeout_s`` for resources (a controller failure).
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: the controller polls the workers, and takes
    their next report, every ``scaling.poll_interval_s`` (Ray: 2 s)."""
    s = job.scaling
    return {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(s.poll_interval_s),
        "RAY_TRAIN_COLLECTIVE_TIMEOUT_S": str(s.collective_timeout_s),
        "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": str(s.collective_timeout_s),
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(s.worker_start_timeout_s),
    }


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    """``os.environ`` updated with ``env`` inside the block, restored after it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def worker_env(job: TrainJob, env_vars: dict[str, str] | None) -> dict[str, str]:
    """The workers' environment variables: the job yaml's, and on GPUs NCCL's asynchronous
    error handling (a failed or timed-out collective aborts the rank; the yaml may override)."""
    nccl = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"} if job.scaling.use_gpu else {}
    return {**nccl, **(env_vars or {})}


# Ray 2.60's workers wrap sys.stdout, so Ray Train's print patch writes each print twice (to
# the wrapped stream and through its logger's console handler): every progress line would reach
# the driver twice. Unpatched, a worker's print goes once, by Ray's log forwarding.
WORKER_PRINT = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def _mlflow_run(spec: RunSpec) -> str:
    """The job's MLflow run id, waiting a bounded time for MLflow; "" if it stayed down (the
    worker then creates the run once MLflow answers, and training goes on meanwhile)."""
    wait = mlflow_wait()
    run_id = wait_for_run(spec, wait)
    if run_id:
        print(f"MLflow run {run_id}", flush=True)
    else:
        print(
            f"warning: MLflow at {public_uri(spec.uri)} unreachable for {wait:.0f}s; training "
            f"starts anyway, metrics are buffered and the run is created when MLflow is back",
            flush=True,
        )
    return run_id


def _terminate(spec: RunSpec, run_id: str, status: str) -> str:
    """Mark the run ``status`` (finding it by its tags if need be); warn if MLflow is down."""
    from mlflow.tracking import MlflowClient

    try:
        run_id = run_id or find_or_create_run(spec, create=False)
        if run_id:
            MlflowClient(spec.uri).set_terminated(run_id, status=status)
    except Exception as e:  # tracking must not mask the training outcome
        print(
            f"warning: could not mark MLflow run {run_id or '?'} {status} at "
            f"{public_uri(spec.uri)} ({type(e).__name__})",
            flush=True,
        )
    return run_id


def run_training(
    job: TrainJob,
    address: str | None = None,
    register: bool = True,
    env_vars: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    callbacks: list | None = None,
) -> TrainResult:
    """Train ``job`` on Ray Train; register the final model in MLflow.

    ``tags`` are added to the MLflow run's (e.g. ``mlflow.parentRunId`` for a sweep's point);
    ``callbacks`` are Ray Train callbacks (e.g. one reporting to the Ray Tune trial it runs in).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train import fatal
    from pipeline.train.loop import train_loop
    from pipeline.train.preflight import preflight

    preflight(job)  # bad input: one line, before any run, cluster or folder exists
    # a new launch tries again what an earlier launch recorded as a deterministic failure
    fatal.clear(fatal.fatal_url(storage_path(job.scaling.storage_path), job.scaling.name))
    spec = RunSpec.from_job(job)
    spec.tags.update(tags or {})
    run_id = _mlflow_run(spec)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        # The job yaml's env_vars reach the workers the same way under `pipeline submit`,
        # `ray job submit` and a KubeRay RayJob.
        # Under `ray job submit` they are already in this driver's env (and job runtime env).
        env = worker_env(job, env_vars)
        env_vars = {k: v for k, v in env.items() if os.environ.get(k) != v}
        ray.init(
            address=ray_address(address),
            log_to_driver=True,
            runtime_env={"env_vars": env_vars} if env_vars else None,
        )
    s = job.scaling
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "job": to_dict(job),
            "mlflow_run_id": run_id,
            "mlflow_run": dataclasses.asdict(spec),
        },
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={
                "CPU": s.cpus_per_worker,
                **({"GPU": s.gpus_per_worker} if s.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=s.name,
            storage_path=storage_path(s.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=s.num_to_keep),
            failure_config=FailureConfig(
                max_failures=s.max_failures, controller_failure_limit=s.controller_failure_limit
            ),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": WORKER_PRINT},
        ),
        torch_config=torch_config(job),
    )
    try:
        with _environ(ray_train_env(job)):
            result = trainer.fit()
    except Exception as e:
        _terminate(spec, run_id, "FAILED")
        if owns_ray:  # stop streaming worker logs, so the error is the last line printed
            ray.shutdown()
        raise PipelineError(f"training run {s.name!r} failed: {_failure(job, e)}") from e
    if result.checkpoint is None:
        raise PipelineError(f"training run {s.name!r} produced no checkpoint")
    from pipeline.train import checkpoint

    with result.checkpoint.as_directory() as cdir:
        run_id = checkpoint.load(cdir, with_optimizer=False)["state"]["mlflow_run_id"] or run_id
    # MLflow may be down now: wait a bounded time (creating the run if it never existed)
    reachable = wait_for_run(spec, mlflow_wait())
    run_id = run_id or reachable
    version = uri = None
    if register and reachable:
        try:
            version, uri = register_model(job, run_id, result.checkpoint)
        except Exception as e:
            raise PipelineError(
                f"training run {s.name!r} finished (checkpoint {result.checkpoint.path}) but "
                f"registering the model at {public_uri(spec.uri)} failed: {_root_cause(e)}"
            ) from e
    elif register:
        print(
            f"warning: MLflow at {public_uri(spec.uri)} unreachable; the model is not "
            f"registered (checkpoint {result.checkpoint.path})",
            flush=True,
        )
    if reachable:
        _terminate(spec, run_id, "FINISHED")
    ckpt_url = result.checkpoint.path
    if "://" in s.storage_path and "://" not in ckpt_url:
        ckpt_url = f"{s.storage_path.split('://')[0]}://{ckpt_url}"
    print(
        f"MLflow run {run_id or '(none: MLflow unreachable)'} | checkpoint {ckpt_url}"
        + (f" | model {uri} (version {version}, alias {job.tracking.alias})" if uri else ""),
        flush=True,
    )
    return TrainResult(run_id, ckpt_url, dict(result.metrics or {}), version, uri)


def _failure(job: TrainJob, e: BaseException) -> str:
    """One line saying why the run failed: a worker group that could not be placed (a node
    lost and not replaced) names the resources, the bound and the settings behind it."""
    cause = getattr(e, "controller_failure", None)
    if type(cause).__name__ == "WorkerGroupStartupTimeoutError":
        s = job.scaling
        per_worker = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
        tries = s.controller_failure_limit + 1
        return (
            f"the cluster could not place {s.num_workers} workers ({per_worker} each) within "
            f"{s.worker_start_timeout_s}s, {tries} times in a row (scaling.worker_start_timeout_s"
            f"={s.worker_start_timeout_s}, scaling.controller_failure_limit="
            f"{s.controller_failure_limit}): a node was lost and not replaced, or the cluster "
            f"is too small"
        )
    return _root_cause(e)


def _root_cause(e: BaseException) -> str:
    """One line: the exception a worker (lowest failing rank) or the controller raised."""
    failures = getattr(e, "worker_failures", None) or {}
    if failures:
        e = failures[min(failures)]
    e = getattr(e, "controller_failure", None) or e
    e = getattr(e, "cause", None) or e  # a RayTaskError wraps the user's exception
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = (lines[0] if isinstance(e, PipelineError) else lines[-1]) if lines else ""
    text = re.sub(r"^(?:[A-Za-z_][\w]*\.)+(\w+: )", r"\1", text)  # pkg.mod.Error: -> Error:
    named = re.match(r"^\w+(Error|Exception|Exit|Interrupt): ", text)
    return text if named else f"{type(e).__name__}: {text}"


def register_model(job: TrainJob, run_id: str, ckpt) -> tuple[str, str]:
    """Log the final weights + config as an MLflow pyfunc model, register it, set the alias."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from pipeline.model import build_model
    from pipeline.train import checkpoint

    t, m = job.tracking, job.model
    with ckpt.as_directory() as cdir:
        saved = checkpoint.load(cdir, with_optimizer=False)
    weights = saved["ema"] if saved["ema"] is not None else saved["model"]
    vae = build_model(to_dict(job)["model"])
    vae.load_state_dict(weights)
    vae.eval()
    example = np.random.default_rng(0).random(
        (2, m.in_channels, m.image_size, m.image_size), dtype=np.float32
    )
    with torch.no_grad():
        params, _ = vae(torch.from_numpy(example), sample_posterior=False)
        recon = vae.likelihood.mean(params).clamp(0, 1).numpy()
    mlflow.set_tracking_uri(t.mlflow_uri)
    # the fluent API refuses a run outside its active experiment (set by earlier calls in
    # this process), so make the run's own experiment the active one
    exp_id = MlflowClient(t.mlflow_uri).get_run(run_id).info.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    with tempfile.TemporaryDirectory() as tmp:
        wpath = Path(tmp) / "weights.safetensors"
        wpath.write_bytes(checkpoint.weights_bytes(vae))
        cpath = Path(tmp) / "config.json"
        cpath.write_text(
            json.dumps(
                {
                    "model": to_dict(job)["model"],
                    "train_run_id": run_id,
                    "step": saved["state"]["step"],
                },
                indent=1,
            )
        )
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).resolve().parents[1] / "serve" / "pyfunc.py"),
                artifacts={"weights": str(wpath), "config": str(cpath)},
                code_paths=[str(Path(__file__).resolve().parents[1])],
                signature=infer_signature(example, recon),
                pip_requirements=["torch", "safetensors", "numpy", "mlflow"],
            )
    client = MlflowClient(t.mlflow_uri)
    mv = mlflow.register_model(info.model_uri, t.registered_model, tags={"train_run_id": run_id})
    page = ui_url(t.mlflow_uri, exp_id, run_id)
    client.update_model_version(
        t.registered_model,
        mv.version,
        description=f"Trained in MLflow run {f'[{run_id}]({page})' if page else run_id} "
        f"(step {saved['state']['step']}).",
    )
    client.set_registered_model_alias(t.registered_model, t.alias, mv.version)
    return str(mv.version), f"models:/{t.registered_model}@{t.alias}"
