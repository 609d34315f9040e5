"""Data configs: ingest (sources -> shards) and streaming (shards -> batches)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.errors import ConfigError


@dataclass
class IngestConfig:
    """Turn an image dataset into WebDataset tar shards plus ``manifest.json`` per split.

    Output layout: ``{output_url}/{split}/shard-000000.tar`` ... and
    ``{output_url}/{split}/manifest.json`` (see :mod:`pipeline.data.manifest`).
    """

    output_url: str
    source: Literal["fashion_mnist", "folder", "archive", "synthetic"] = "fashion_mnist"
    source_path: str = ""  # fashion_mnist: idx dir ("" -> Debian's package); folder/archive: path
    shard_bytes: int = 128 * 2**20  # target bytes per shard
    shard_samples: int = 0  # >0: cut shards by sample count instead of bytes
    encoding: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = 95
    image_size: int = 0  # 0: keep the source size; else resize + center crop to a square
    mode: Literal["", "L", "RGB"] = ""  # "": keep the source mode
    test_fraction: float = 0.1  # folder/archive/synthetic sources without their own split
    limit: int = 0  # >0: take only the first N samples of each split
    synthetic_count: int = 1000
    synthetic_size: int = 28
    synthetic_mode: Literal["L", "RGB"] = "L"
    seed: int = 0
    workers: int = 2
    shuffle: bool = True  # shuffle sample order (by seed) before sharding, so shards mix classes
    storage_options: dict = field(default_factory=dict)  # non-secret fsspec options only

    def __post_init__(self):
        if not self.output_url:
            raise ConfigError("output_url",
                              "must be a local path or fsspec URL, e.g. s3://bucket/prefix")
        for name in ("shard_bytes", "synthetic_count", "synthetic_size", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("shard_samples", "image_size", "limit"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("jpeg_quality", f"must be in 1..100, got {self.jpeg_quality}")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError("test_fraction", f"must be in [0, 1), got {self.test_fraction}")
        if self.source in ("folder", "archive") and not self.source_path:
            raise ConfigError("source_path", f"required for source {self.source!r}")


@dataclass
class StreamConfig:
    """Stream shards from a URL into one rank's batches."""

    train_url: str  # a split folder holding manifest.json, e.g. s3://bucket/fmnist/train
    test_url: str = ""
    image_size: int = 0  # 0: the manifest's size
    channels: int = 0  # 0: the manifest's mode (1 for L, 3 for RGB)
    crop: Literal["center", "random", "none"] = "center"
    shuffle_buffer: int = 1000
    seed: int = 0
    num_workers: int = 2  # DataLoader workers per rank
    remainder: Literal["drop", "pad"] = "drop"
    normalize: Literal["unit", "symmetric", "standard"] = "unit"  # [0,1]; [-1,1]; manifest mean/std
    max_pixels: int = 2**26  # larger images are skipped as decompression bombs
    max_bad_samples: int = 100  # error budget per rank per epoch
    retries: int = 5  # per shard read on transient storage errors
    retry_backoff: float = 0.5  # seconds, doubled per retry
    storage_options: dict = field(default_factory=dict)  # non-secret fsspec options only

    def __post_init__(self):
        if not self.train_url:
            raise ConfigError("train_url", "must be a shard folder URL holding manifest.json")
        for name in ("image_size", "channels", "shuffle_buffer", "num_workers", "max_bad_samples",
                     "retries"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.channels not in (0, 1, 3):
            raise ConfigError("channels",
                              f"must be 1 or 3 (0: from the manifest), got {self.channels}")
        if self.retry_backoff < 0:
            raise ConfigError("retry_backoff", f"must be >= 0, got {self.retry_backoff}")
        if self.max_pixels < 1:
            raise ConfigError("max_pixels", f"must be >= 1, got {self.max_pixels}")
