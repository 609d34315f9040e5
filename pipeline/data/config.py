"""Data configs: ingest (sources -> shards) and streaming (shards -> batches)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pipeline.errors import ConfigError
from pipeline.storage import check_url
from pipeline.typed import Checked, Range


@dataclass
class IngestConfig(Checked):
    """Turn an image dataset into WebDataset tar shards plus ``manifest.json`` per split.

    Output layout: ``{output_url}/{split}/shard-000000.tar`` ... and
    ``{output_url}/{split}/manifest.json`` (see :mod:`pipeline.data.manifest`).
    """

    output_url: str
    source: Literal["fashion_mnist", "folder", "archive", "synthetic"] = "fashion_mnist"
    source_path: str = ""  # fashion_mnist: idx dir ("" -> Debian's package); folder/archive: path
    shard_bytes: Annotated[int, Range(ge=1)] = 128 * 2**20  # target bytes per shard
    shard_samples: Annotated[int, Range(ge=0)] = (
        0  # >0: cut shards by sample count instead of bytes
    )
    encoding: Literal["png", "jpeg"] = "png"
    jpeg_quality: Annotated[int, Range(ge=1, le=100)] = 95
    image_size: Annotated[int, Range(ge=0)] = (
        0  # 0: keep the source size; else resize + center crop to a square
    )
    mode: Literal["", "L", "RGB"] = ""  # "": keep the source mode
    test_fraction: Annotated[float, Range(ge=0, lt=1)] = (
        0.1  # folder/archive/synthetic sources without their own split
    )
    limit: Annotated[int, Range(ge=0)] = 0  # >0: take only the first N samples of each split
    synthetic_count: Annotated[int, Range(ge=1)] = 1000
    synthetic_size: Annotated[int, Range(ge=1)] = 28
    synthetic_mode: Literal["L", "RGB"] = "L"
    seed: int = 0
    workers: Annotated[int, Range(ge=1)] = 2
    shuffle: bool = True  # shuffle sample order (by seed) before sharding, so shards mix classes
    max_pixels: Annotated[int, Range(ge=1)] = 2**26  # larger images: skipped as decompression bombs
    max_bad_files: Annotated[int, Range(ge=0)] = 1000  # per split; more ends the ingest
    storage_options: dict = field(default_factory=dict)  # non-secret fsspec options only

    def __post_init__(self):
        super().__post_init__()
        if not self.output_url:
            raise ConfigError(
                "output_url", "must be a local path or fsspec URL, e.g. s3://bucket/prefix"
            )
        check_url(self.output_url, "output_url")
        if self.source in ("folder", "archive") and not self.source_path:
            raise ConfigError("source_path", f"required for source {self.source!r}")


@dataclass
class StreamConfig(Checked):
    """Stream shards from a URL into one rank's batches."""

    train_url: str  # a split folder holding manifest.json, e.g. s3://bucket/fmnist/train
    test_url: str = ""
    image_size: Annotated[int, Range(ge=0)] = 0  # 0: the manifest's size
    channels: Annotated[int, Range(ge=0)] = 0  # 0: the manifest's mode (1 for L, 3 for RGB)
    crop: Literal["center", "random", "none"] = "center"
    shuffle_buffer: Annotated[int, Range(ge=0)] = 1000
    seed: int = 0
    num_workers: Annotated[int, Range(ge=0)] = 2  # DataLoader workers per rank
    remainder: Literal["drop", "pad"] = "drop"
    normalize: Literal["unit", "symmetric", "standard"] = "unit"  # [0,1]; [-1,1]; manifest mean/std
    # dynamic binarization (pixel ~ Bernoulli(intensity), redrawn every step) in the training
    # worker; required by the bernoulli likelihood, whose density is only defined on {0, 1}
    binarize: bool = False
    max_pixels: Annotated[int, Range(ge=1)] = (
        2**26
    )  # larger images are skipped as decompression bombs
    max_bad_samples: Annotated[int, Range(ge=0)] = 100  # error budget per rank per epoch
    retries: Annotated[int, Range(ge=0)] = 5  # per shard read on transient storage errors
    retry_backoff: Annotated[float, Range(ge=0)] = 0.5  # seconds, doubled per retry
    storage_options: dict = field(default_factory=dict)  # non-secret fsspec options only
    # remote shards fetched ahead of the one being decoded, per loader worker; each open
    # remote shard buffers at most ~25 MiB, so memory stays bounded whatever the shard size
    prefetch_shards: Annotated[int, Range(ge=0, le=8)] = 1
    # a local folder caching remote shards across epochs (LRU, atomic, checked against the
    # manifest's size and sha256); "": no cache. Shared by the loader workers and ranks of
    # a node; cache_max_bytes bounds the folder and is required with it
    cache_dir: str = ""
    cache_max_bytes: Annotated[int, Range(ge=0)] = 0
    # JPEGs stored larger than image_size are decoded at a reduced DCT scale (Pillow's
    # draft) before the resize: measured faster, pixels within a few levels (bench/)
    jpeg_draft: bool = True
    # "simplejpeg": JPEGs are decoded by simplejpeg (libjpeg-turbo, as in Pillow, without
    # Pillow's per-image overhead): the same pixels, 1.3-3.0x faster (bench/jpeg_decode.md);
    # what it cannot decode to Pillow's exact pixels goes through Pillow. "pillow": Pillow
    # decodes every image
    jpeg_decoder: Literal["pillow", "simplejpeg"] = "simplejpeg"

    def __post_init__(self):
        super().__post_init__()
        if self.cache_dir:
            if "://" in self.cache_dir:
                raise ConfigError(
                    "cache_dir", f"must be a local folder path, got {self.cache_dir!r}"
                )
            if not self.cache_max_bytes:
                raise ConfigError("cache_max_bytes", "required (> 0) with cache_dir")
        elif self.cache_max_bytes:
            raise ConfigError("cache_max_bytes", "set cache_dir too, or leave it 0")
        if not self.train_url:
            raise ConfigError("train_url", "must be a shard folder URL holding manifest.json")
        check_url(self.train_url, "train_url")
        if self.test_url:
            check_url(self.test_url, "test_url")
        if self.channels not in (0, 1, 3):
            raise ConfigError(
                "channels", f"must be 1 or 3 (0: from the manifest), got {self.channels}"
            )


@dataclass
class IngestJob:
    ingest: IngestConfig
