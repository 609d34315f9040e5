"""The gallery job's config: which model, what to draw, where to write."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pipeline.errors import ConfigError
from pipeline.storage import check_url
from pipeline.train.config import TrackingConfig
from pipeline.typed import Checked, Range

__all__ = ["SampleConfig", "SampleJob"]


@dataclass
class SampleConfig(Checked):
    """The gallery job: which model, what to draw, where to write."""

    output_url: str
    model_name: str = "vae"
    model_alias: str = "candidate"
    model_version: Annotated[int, Range(ge=0)] = 0  # 0: use the alias
    checkpoint_url: str = ""  # set instead of the registry to sample from a checkpoint
    data_url: str = ""  # held-out shards for reconstructions/interpolations; "" skips them
    temperatures: list[float] = field(default_factory=lambda: [0.5, 0.8, 1.0])
    grid_rows: Annotated[int, Range(ge=1)] = 8
    grid_cols: Annotated[int, Range(ge=1)] = 8
    interpolation_pairs: Annotated[int, Range(ge=0)] = 8
    interpolation_steps: Annotated[int, Range(ge=1)] = 10
    traversal_dims: Annotated[int, Range(ge=0)] = 8
    traversal_steps: Annotated[int, Range(ge=1)] = 9
    traversal_range: float = 3.0
    seed: int = 0
    num_samples: Annotated[int, Range(ge=0)] = 0  # >0: large-N mode, N samples as WebDataset shards
    samples_per_shard: Annotated[int, Range(ge=1)] = 10000
    batch_size: Annotated[int, Range(ge=1)] = 512
    num_actors: Annotated[int, Range(ge=1)] = 1

    def __post_init__(self):
        super().__post_init__()
        if not self.output_url:
            raise ConfigError("output_url", "must be a URL or path for the gallery")
        for key in ("output_url", "checkpoint_url", "data_url"):
            if getattr(self, key):
                check_url(getattr(self, key), key)
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ConfigError(
                "temperatures", f"must be a non-empty list of numbers > 0, got {self.temperatures}"
            )


@dataclass
class SampleJob:
    sample: SampleConfig
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
