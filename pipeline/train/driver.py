"""The training driver: owns the MLflow run, launches Ray Train, registers the model.

Relaunching with the same ``scaling.name`` and ``scaling.storage_path`` resumes: Ray Train V2
restores the latest checkpoint, and the driver finds the unfinished MLflow run by its tags.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import TrainJob, to_dict
from pipeline.errors import PipelineError

RUN_TAG = "pipeline.ray_run"
STORE_TAG = "pipeline.storage_path"


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


def storage_path(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _mlflow_run(job: TrainJob) -> str:
    """The unfinished run of this Ray run name + storage path, or a new one with params logged."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.train.loop import config_params
    from pipeline.train.tracking import configure_client_timeouts

    configure_client_timeouts()
    t = job.tracking
    mlflow.set_tracking_uri(t.mlflow_uri)
    try:
        exp = mlflow.set_experiment(t.experiment)
    except Exception as e:
        raise PipelineError(f"MLflow at {t.mlflow_uri} unreachable: {type(e).__name__}") from None
    client = MlflowClient(t.mlflow_uri)
    store = storage_path(job.scaling.storage_path)
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{RUN_TAG}` = '{job.scaling.name}' and tags.`{STORE_TAG}` = '{store}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if found and found[0].info.status != "FINISHED":
        print(f"resuming MLflow run {found[0].info.run_id}", flush=True)
        return found[0].info.run_id
    run = client.create_run(exp.experiment_id, run_name=job.scaling.name,
                            tags={RUN_TAG: job.scaling.name, STORE_TAG: store})
    params = config_params(job)
    items = list(params.items())
    from mlflow.entities import Param

    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
    return run.info.run_id


def run_training(job: TrainJob, address: str | None = None, register: bool = True,
                 env_vars: dict[str, str] | None = None) -> TrainResult:
    """Train ``job`` on Ray Train; register the final model in MLflow."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.loop import train_loop

    run_id = _mlflow_run(job)
    if not ray.is_initialized():
        # The job yaml's env_vars reach the workers the same way under `pipeline submit`,
        # `ray job submit` and a KubeRay RayJob.
        ray.init(address=ray_address(address), log_to_driver=True,
                 runtime_env={"env_vars": env_vars} if env_vars else None)
    s = job.scaling
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": to_dict(job), "mlflow_run_id": run_id},
        scaling_config=ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=s.name, storage_path=storage_path(s.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=s.num_to_keep),
            failure_config=FailureConfig(max_failures=s.max_failures),
        ),
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(job.tracking.mlflow_uri)
    try:
        result = trainer.fit()
    except Exception as e:
        client.set_terminated(run_id, status="FAILED")
        raise PipelineError(f"training run {s.name!r} failed: {_root_cause(e)}") from e
    if result.checkpoint is None:
        raise PipelineError(f"training run {s.name!r} produced no checkpoint")
    version = uri = None
    if register:
        version, uri = register_model(job, run_id, result.checkpoint)
    client.set_terminated(run_id, status="FINISHED")
    ckpt_url = result.checkpoint.path
    if "://" in s.storage_path and "://" not in ckpt_url:
        ckpt_url = f"{s.storage_path.split('://')[0]}://{ckpt_url}"
    print(f"MLflow run {run_id} | checkpoint {ckpt_url}"
          + (f" | model {uri} (version {version}, alias {job.tracking.alias})" if uri else ""), flush=True)
    return TrainResult(run_id, ckpt_url, dict(result.metrics or {}), version, uri)


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


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
    example = np.random.default_rng(0).random((2, m.in_channels, m.image_size, m.image_size),
                                               dtype=np.float32)
    with torch.no_grad():
        params, _ = vae(torch.from_numpy(example), sample_posterior=False)
        recon = vae.likelihood.mean(params).clamp(0, 1).numpy()
    mlflow.set_tracking_uri(t.mlflow_uri)
    with tempfile.TemporaryDirectory() as tmp:
        wpath = Path(tmp) / "weights.safetensors"
        wpath.write_bytes(checkpoint.weights_bytes(vae))
        cpath = Path(tmp) / "config.json"
        cpath.write_text(json.dumps({"model": to_dict(job)["model"], "train_run_id": run_id,
                                     "step": saved["state"]["step"]}, indent=1))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).resolve().parents[1] / "serving.py"),
                artifacts={"weights": str(wpath), "config": str(cpath)},
                code_paths=[str(Path(__file__).resolve().parents[1])],
                signature=infer_signature(example, recon),
                pip_requirements=["torch", "safetensors", "numpy", "mlflow"],
            )
    client = MlflowClient(t.mlflow_uri)
    mv = mlflow.register_model(info.model_uri, t.registered_model, tags={"train_run_id": run_id})
    client.set_registered_model_alias(t.registered_model, t.alias, mv.version)
    return str(mv.version), f"models:/{t.registered_model}@{t.alias}"
