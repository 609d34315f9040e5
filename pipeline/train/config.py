"""The training job's config: scaling (Ray Train), the optimiser loop, tracking."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pipeline.data.config import StreamConfig
from pipeline.errors import ConfigError
from pipeline.model.config import ModelConfig
from pipeline.typed import Checked, Range

__all__ = ["OptimConfig", "ScalingConfig", "TrackingConfig", "TrainJob"]


@dataclass
class ScalingConfig(Checked):
    """Where the training runs: Ray Train ScalingConfig/RunConfig/FailureConfig values."""

    num_workers: Annotated[int, Range(ge=1)] = 2
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Range(gt=0)] = 1.0
    gpus_per_worker: Annotated[float, Range(ge=0)] = 0.0
    storage_path: str = ".data/ray_results"
    name: str = "vae"
    max_failures: Annotated[int, Range(ge=-1, note="-1: unlimited")] = 2
    # Placing the worker group (a new attempt, after a failure) waits this many seconds for
    # its resources; each time out is a controller failure, and past
    # ``controller_failure_limit`` of them the run fails: a node that never returns ends the
    # run after about (controller_failure_limit + 1) x worker_start_timeout_s, never a hang.
    controller_failure_limit: Annotated[int, Range(ge=-1, note="-1: unlimited")] = 3
    worker_start_timeout_s: Annotated[int, Range(ge=1)] = 60
    num_to_keep: Annotated[int, Range(ge=1)] = 2
    # A rank that does not reach a collective (all-reduce, gather, Ray Train's barrier in
    # ``report``) within this many seconds, or whose process stops answering Ray Train's
    # health check that long (SIGSTOPped, hung), ends the attempt, and Ray restarts it from
    # the last checkpoint.
    collective_timeout_s: Annotated[int, Range(ge=1)] = 600
    # How often Ray Train's controller polls the workers (its health check): it takes one
    # ``ray.train.report`` per poll, and each rank's next report waits until it has, so at
    # Ray's default (2 s) every checkpoint after the first cost ~1.2-1.8 s of training on
    # a 1-worker run with checkpoints 0.3 s apart (1 poll ~ 1 actor call per worker).
    poll_interval_s: Annotated[float, Range(gt=0)] = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not self.name or "/" in self.name:
            raise ConfigError("name", f"must be a non-empty name without '/', got {self.name!r}")


@dataclass
class OptimConfig(Checked):
    """The worker loop: optimiser, schedule, objective knobs, checkpoint cadence."""

    epochs: Annotated[int, Range(ge=1)] = 2
    max_steps: Annotated[int, Range(ge=0)] = 0  # 0: no step cap, run ``epochs``
    batch_size: Annotated[int, Range(ge=1)] = 128  # per worker
    lr: Annotated[float, Range(gt=0)] = 2e-3
    weight_decay: Annotated[float, Range(ge=0)] = 1e-4
    warmup_steps: Annotated[int, Range(ge=0)] = 100
    grad_clip: Annotated[float, Range(ge=0)] = 1.0
    kl_weight: Annotated[float, Range(ge=0)] = 1.0  # the beta / lambda weight
    kl_warmup_steps: Annotated[int, Range(ge=0)] = 0
    free_bits: Annotated[float, Range(ge=0)] = 0.0  # nats per latent group
    # elbo: the negative ELBO; iwae: the negative importance-weighted bound on iwae_train_k
    # draws per image (Burda et al. 2015), tighter than the ELBO for iwae_train_k > 1
    objective: Literal["elbo", "iwae"] = "elbo"
    iwae_train_k: Annotated[int, Range(ge=1)] = 1
    ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.0  # 0: no EMA weights
    # auto: bf16 autocast on a CUDA device that has it, fp32 elsewhere; fp16: with loss scaling
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the encoder and decoder
    max_skipped_steps: Annotated[int, Range(ge=0)] = 20
    checkpoint_every: Annotated[int, Range(ge=0)] = 200  # steps; 0: only at epoch end
    log_every: Annotated[int, Range(ge=1)] = 20
    eval_batches: Annotated[int, Range(ge=1)] = 8
    iwae_k: Annotated[int, Range(ge=1)] = 64
    iwae_images: Annotated[int, Range(ge=1)] = 64
    seed: int = 0
    torch_threads: Annotated[int, Range(ge=0)] = 0  # 0: leave torch's default

    def __post_init__(self):
        super().__post_init__()
        if self.objective == "elbo" and self.iwae_train_k != 1:
            raise ConfigError("iwae_train_k", "only for objective 'iwae' (objective is 'elbo')")
        if self.objective == "iwae" and self.free_bits:
            raise ConfigError("free_bits", "only for objective 'elbo' (objective is 'iwae')")


@dataclass
class TrackingConfig(Checked):
    """MLflow and Prometheus. Credentials never live here: they come from the environment."""

    mlflow_uri: str = ""  # "": MLFLOW_TRACKING_URI from the environment (the stack sets it)
    experiment: str = "vae"
    registered_model: str = "vae"
    alias: str = "candidate"
    metrics_port: Annotated[
        int, Range(ge=-1, le=65535, note="a port, 0: pick a free one, -1: none")
    ] = 0  # N: local rank r serves N + r (a range per node); 0: a free port; -1: none
    metrics_host: str = "127.0.0.1"  # on a cluster: 0.0.0.0 with a fixed metrics_port
    metrics_sd_dir: str = ".stack/prometheus/targets"  # file_sd targets for the stack's Prometheus
    # MLflow system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) of rank 0's node
    system_metrics_interval: Annotated[float, Range(ge=0, note="seconds, 0: off")] = 10.0

    def resolved(self) -> TrackingConfig:
        """This config with ``mlflow_uri`` filled from ``MLFLOW_TRACKING_URI`` if empty."""
        uri = self.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            raise ConfigError(
                "tracking.mlflow_uri",
                "empty and MLFLOW_TRACKING_URI is not set "
                "(run `make up`, or set it to your tracking server)",
            )
        return dataclasses.replace(self, mlflow_uri=uri)


@dataclass
class TrainJob:
    data: StreamConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        m, d = self.model, self.data
        if d.image_size and d.image_size != m.image_size:
            raise ConfigError(
                "data.image_size", f"{d.image_size} differs from model.image_size={m.image_size}"
            )
        if d.channels and d.channels != m.in_channels:
            raise ConfigError(
                "data.channels", f"{d.channels} differs from model.in_channels={m.in_channels}"
            )
        # Shards hold 8-bit images: a Bernoulli density on them is not a likelihood, and its
        # bits/dim would look better than it is.
        if m.likelihood == "bernoulli" and not d.binarize:
            raise ConfigError(
                "model.likelihood",
                "'bernoulli' needs binary pixels but shards hold 8-bit images: set "
                "data.binarize: true (dynamic binarization) or use 'discretized_logistic'",
            )
        if self.optim.objective == "iwae" and m.deterministic_encoder:
            raise ConfigError(
                "optim.objective", "'iwae' needs a stochastic encoder (model.deterministic_encoder)"
            )
        if d.binarize and m.likelihood != "bernoulli":
            raise ConfigError(
                "data.binarize", f"only for the bernoulli likelihood, got {m.likelihood!r}"
            )
