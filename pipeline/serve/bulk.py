"""Large-N sampling: N prior samples via Ray Data ``map_batches`` on an actor pool,
written as WebDataset shards + manifest (the input for FID-style evaluation elsewhere).

Sample ``i`` is decoded from z drawn with a generator seeded by (seed, i), so the output does
not depend on how Ray splits the work.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.config import IngestConfig
from pipeline.data.ingest import Encoded, IngestStats, ShardWriter, encode
from pipeline.data.manifest import Manifest, write_manifest
from pipeline.serve.config import SampleConfig
from pipeline.serve.registry import LoadedModel


class Sampler:
    """A Ray Data actor: rebuilds the VAE once, then maps ``{"id"}`` batches to PNG bytes."""

    def __init__(self, config: dict, weights: bytes, seed: int, temperature: float):
        from pipeline.model import build_model, load_weights

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = build_model(config)
        self.vae.load_state_dict(load_weights(weights))
        self.vae.eval().to(self.device)
        self.seed, self.temperature = seed, temperature

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        ids = batch["id"]
        z = torch.stack(
            [
                torch.randn(
                    self.vae.latent_shape,
                    generator=torch.Generator().manual_seed(self.seed * 1_000_003 + int(i)),
                )
                for i in ids
            ]
        ).to(self.device)
        x = self.vae.likelihood.mean(self.vae.decode(self.temperature * z)).clamp(0, 1)
        a = (x * 255).round().to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
        pngs = [
            encode(Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img), "png", 95)
            for img in a
        ]
        px = a.reshape(len(a), -1, a.shape[-1]).astype(np.float64) / 255
        return {
            "id": ids,
            "png": np.array(pngs, dtype=object),
            "sum": px.sum(1),
            "sumsq": np.square(px).sum(1),
        }


def generate(m: LoadedModel, s: SampleConfig, url: str, temperature: float = 1.0) -> Manifest:
    """Write ``s.num_samples`` samples under ``url`` as shards + ``manifest.json``."""
    import ray

    from pipeline.model import save_weights
    from pipeline.train.driver import ray_address

    if not ray.is_initialized():
        ray.init(address=ray_address())
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    gpu = 1 if torch.cuda.is_available() else 0
    ds = ray.data.range(
        s.num_samples, override_num_blocks=max(1, -(-s.num_samples // s.batch_size))
    )
    ds = ds.map_batches(
        Sampler,
        batch_size=s.batch_size,
        concurrency=s.num_actors,
        num_gpus=gpu,
        fn_constructor_kwargs={
            "config": m.model_config,
            "weights": save_weights(m.vae),
            "seed": s.seed,
            "temperature": temperature,
        },
    )
    cfg = IngestConfig(output_url=url, shard_samples=s.samples_per_shard, encoding="png")
    writer, stats = ShardWriter(url, cfg), IngestStats()
    c, h, w = (
        m.model_config["in_channels"],
        m.model_config["image_size"],
        m.model_config["image_size"],
    )
    t0 = time.perf_counter()
    with tqdm(total=s.num_samples, desc="sample", unit="img") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, png, px, pxx in zip(batch["id"], batch["png"], batch["sum"], batch["sumsq"]):
                e = Encoded(
                    f"sample-{int(i):08d}",
                    -1,
                    bytes(png),
                    w,
                    h,
                    "L" if c == 1 else "RGB",
                    px.tolist(),
                    pxx.tolist(),
                )
                writer.add(e)
                stats.add(e)
            bar.update(len(batch["id"]))
    shards = writer.close()
    seconds = time.perf_counter() - t0
    manifest = Manifest(
        split="samples",
        shards=shards,
        url=url,
        stats={**stats.to_dict("png", []), "samples_per_second": round(s.num_samples / seconds, 1)},
        ingest={"model": m.name, "version": m.version, "seed": s.seed, "temperature": temperature},
    )
    write_manifest(manifest, url)
    print(
        f"{s.num_samples} samples in {len(shards)} shards at {url} "
        f"({s.num_samples / seconds:,.0f} samples/s)",
        flush=True,
    )
    return manifest
