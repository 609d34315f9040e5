"""Read a shard set in order, one process, no shuffle: for evaluation and galleries."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.data.config import StreamConfig
from pipeline.data.stream import ShardStream, make_loader


def iter_images(
    url: str,
    batch_size: int,
    image_size: int = 0,
    channels: int = 0,
    storage_options: dict | None = None,
) -> Iterator[torch.Tensor]:
    """Batches (B, C, H, W) in [0, 1] of the split at ``url``, in shard order (last partial
    batch dropped)."""
    config = StreamConfig(
        train_url=url,
        image_size=image_size,
        channels=channels,
        num_workers=0,
        storage_options=storage_options or {},
    )
    stream = ShardStream(
        config, rank=0, world_size=1, batch_size=batch_size, split="train", shuffle=False
    )
    stream.set_epoch(0)
    for batch in make_loader(stream):
        yield batch["image"]


def read_images(url: str, n: int, image_size: int = 0, channels: int = 0) -> torch.Tensor:
    """The first ``n`` images of the split at ``url`` (fewer if it holds fewer)."""
    out: list[torch.Tensor] = []
    for x in iter_images(url, min(n, 16), image_size, channels):
        out.append(x)
        if sum(len(b) for b in out) >= n:
            break
    return torch.cat(out)[:n] if out else torch.empty(0)
