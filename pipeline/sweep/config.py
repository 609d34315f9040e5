"""The sweep job's config: the training job's, plus the points of the rate-distortion curve.

Each point is the training job with ``optim.kl_weight`` (and optionally ``model.latent_dim``)
replaced; its Ray Train run is named ``{scaling.name}-kl{w}[-z{d}]`` under
``{scaling.storage_path}/{scaling.name}``, so a relaunch finds its checkpoints again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.train.config import TrainJob
from pipeline.train.tracking import storage_path
from pipeline.typed import Checked, Range

__all__ = ["EarlyStopConfig", "Point", "SweepConfig", "SweepJob"]


@dataclass
class EarlyStopConfig(Checked):
    """Ray Tune's ASHA on the held-out -ELBO (bits), compared at epoch ends.

    Stopping a point removes it from the curve, so this is for sweeps with many points where
    a diverged or hopeless one should give its workers to the queue; off by default.
    """

    scheduler: Literal["none", "asha"] = "none"
    grace_epochs: Annotated[int, Range(ge=1)] = 1  # epochs every point runs before a cut
    reduction_factor: Annotated[float, Range(gt=1)] = 3.0


@dataclass
class SweepConfig(Checked):
    """The points of the sweep and how Ray Tune runs them."""

    kl_weights: list[float]  # the rate weight beta of each point
    latent_dims: list[int] = field(default_factory=list)  # []: model.latent_dim only
    # trials running at once; 0: as many as the cluster's resources fit (Tune queues the rest)
    max_concurrent: Annotated[int, Range(ge=0, note="0: as the cluster fits")] = 0
    trial_cpus: Annotated[float, Range(gt=0)] = 0.1  # the trial only drives its Train run
    trial_max_failures: Annotated[int, Range(ge=-1, note="-1: unlimited")] = 1
    alias: str = "rd-best"  # set on the registered model of the ELBO-optimal point
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)

    def __post_init__(self):
        super().__post_init__()
        if not self.kl_weights:
            raise ConfigError("kl_weights", "expected at least one KL weight")
        for i, w in enumerate(self.kl_weights):
            if w < 0:
                raise ConfigError(f"kl_weights[{i}]", f"must be >= 0, got {w}")
        for i, d in enumerate(self.latent_dims):
            if d < 1:
                raise ConfigError(f"latent_dims[{i}]", f"must be >= 1, got {d}")
        for key, values in (("kl_weights", self.kl_weights), ("latent_dims", self.latent_dims)):
            if len(set(values)) != len(values):
                raise ConfigError(key, f"values must be distinct, got {values}")
        if not self.alias:
            raise ConfigError("alias", "must be a non-empty alias name")


@dataclass(frozen=True)
class Point:
    """One point of the curve: a KL weight and a latent size."""

    kl_weight: float
    latent_dim: int
    run_name: str  # its Ray Train run (and MLflow child run) name


@dataclass(kw_only=True)
class SweepJob(TrainJob):
    """A ``kind: sweep`` yaml's config: a :class:`TrainJob` and its ``sweep`` section."""

    sweep: SweepConfig

    def __post_init__(self):
        super().__post_init__()
        if not self.data.test_url:
            raise ConfigError(
                "data.test_url", "a sweep's curve is measured on held-out data: set it"
            )
        if self.sweep.latent_dims and self.model.latent != "flat":
            raise ConfigError(
                "sweep.latent_dims", f"only for model.latent: flat, got {self.model.latent!r}"
            )

    @property
    def root(self) -> str:
        """The sweep's folder: its points' Ray Train runs, Tune's state, the results record."""
        return storage.join(storage_path(self.scaling.storage_path), self.scaling.name)

    def points(self) -> list[Point]:
        dims = self.sweep.latent_dims
        return [
            Point(w, d, f"{self.scaling.name}-kl{w:g}" + (f"-z{d}" if dims else ""))
            for d in (dims or [self.model.latent_dim])
            for w in self.sweep.kl_weights
        ]

    def train_job(self, point: Point | None = None) -> TrainJob:
        """The training job of ``point`` (None: the yaml's own values)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainJob)}
        job = TrainJob(**fields)
        if point is None:
            return job
        return dataclasses.replace(
            job,
            model=dataclasses.replace(job.model, latent_dim=point.latent_dim),
            optim=dataclasses.replace(job.optim, kl_weight=point.kl_weight),
            scaling=dataclasses.replace(job.scaling, name=point.run_name, storage_path=self.root),
        )
