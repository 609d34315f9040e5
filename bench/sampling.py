"""4. Sampling: samples/s of the large-N job (``pipeline.sample_large.generate``: Ray Data
``map_batches`` on one ``Sampler`` actor, PNG shards to S3) against a plain loop calling the
decoder, same model, batch and threads (1: what Ray gives a 1-CPU actor).

Also the ``Sampler`` called in-process over the same batches, to split the gap into the
sampler's own work (per-sample seeded z, PNG encoding) and Ray Data + shard writing.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from bench.common import Settings, Stopwatch, median, ratio, rnd
from bench.cpu import CpuMeter
from bench.loops import MODEL
from pipeline.model import VAE, preset, save_weights
from pipeline.serve.bulk import Sampler, generate
from pipeline.serve.config import SampleConfig
from pipeline.serve.registry import LoadedModel


def model() -> LoadedModel:
    torch.manual_seed(0)
    config = preset(MODEL)
    vae = VAE.from_config(config).eval()
    return LoadedModel(vae, "bench", "0", "", dataclasses.asdict(config))


@torch.no_grad()
def plain_decoder(m: LoadedModel, count: int, batch: int) -> float:
    """z ~ N(0, I) -> likelihood mean, clamped: the least a sampler must do."""
    vae, n = m.vae, 0
    g = torch.Generator().manual_seed(0)
    vae.likelihood.mean(vae.decode(torch.randn(batch, *vae.latent_shape, generator=g)))
    t0 = time.perf_counter()
    while n < count:
        b = min(batch, count - n)
        z = torch.randn(b, *vae.latent_shape, generator=g)
        vae.likelihood.mean(vae.decode(z)).clamp(0, 1)
        n += b
    return count / (time.perf_counter() - t0)


def sampler_inprocess(m: LoadedModel, count: int, batch: int, cls=Sampler) -> float:
    """The actor's ``__call__`` without Ray: seeded z per sample, decode, PNG encode."""
    sampler = cls(m.model_config, save_weights(m.vae), 0, 1.0)
    sampler({"id": np.arange(8)})
    t0 = time.perf_counter()
    for start in range(0, count, batch):
        sampler({"id": np.arange(start, min(count, start + batch))})
    return count / (time.perf_counter() - t0)


def ray_generate(
    m: LoadedModel, count: int, batch: int, url: str, services: list, actors: int = 1
) -> dict:
    s = SampleConfig(
        output_url=url,
        num_samples=count,
        batch_size=batch,
        num_actors=actors,
        samples_per_shard=10000,
    )
    with Stopwatch() as t, CpuMeter(services) as cpu:
        manifest = generate(m, s, url)
    return {
        "samples_per_second": count / t.seconds,
        "after_start_samples_per_second": manifest.stats["samples_per_second"],
        "wall_seconds": t.seconds,
        "cpu_seconds": sum(cpu.seconds.values()),
    }


def run(settings: Settings, s3_url: str, services: list, threads: int = 1, log=print) -> dict:
    torch.set_num_threads(threads)
    m = model()
    n, b = settings.sample_count, settings.sample_batch
    plain, inproc, ray_runs, two = [], [], [], []
    for i in range(settings.sample_repeats):  # interleaved
        plain.append(plain_decoder(m, n, b))
        inproc.append(sampler_inprocess(m, n, b))
        ray_runs.append(ray_generate(m, n, b, f"{s3_url}/rep{i}", services))
        two.append(ray_generate(m, n, b, f"{s3_url}/two{i}", services, actors=2))
        log(
            f"sampling rep {i}: plain {plain[-1]:.0f}, sampler {inproc[-1]:.0f}, "
            f"generate {ray_runs[-1]['samples_per_second']:.0f}, with 2 actors "
            f"{two[-1]['samples_per_second']:.0f} samples/s"
        )
    base = median(plain)
    gen = median(r["samples_per_second"] for r in ray_runs)
    gen_steady = median(r["after_start_samples_per_second"] for r in ray_runs)
    return {
        "config": {
            "model": MODEL,
            "samples": n,
            "batch_size": b,
            "actors": 1,
            "torch_threads": threads,
            "repeats": settings.sample_repeats,
            "output": "PNG WebDataset shards on S3",
        },
        "samples_per_second": {
            "plain_decoder": rnd(base),
            "sampler_in_process": rnd(median(inproc)),
            "generate_ray_data": rnd(gen),
            "generate_after_start": rnd(gen_steady),
            "generate_2_actors": rnd(median(r["samples_per_second"] for r in two)),
        },
        "cpu_seconds": {
            "plain_decoder": rnd(n / base),
            "generate_ray_data": rnd(median(r["cpu_seconds"] for r in ray_runs)),
            "generate_2_actors": rnd(median(r["cpu_seconds"] for r in two)),
        },
        "all_repeats": {
            "plain_decoder": [rnd(x) for x in plain],
            "sampler_in_process": [rnd(x) for x in inproc],
            "generate_ray_data": [rnd(r["samples_per_second"]) for r in ray_runs],
            "generate_wall_seconds": [rnd(r["wall_seconds"]) for r in ray_runs],
            "generate_2_actors": [rnd(r["samples_per_second"]) for r in two],
        },
        "ratios": {
            "generate_vs_plain": ratio(gen, base),
            "generate_after_start_vs_plain": ratio(gen_steady, base),
            "sampler_vs_plain": ratio(median(inproc), base),
            "generate_2_actors_vs_1": ratio(median(r["samples_per_second"] for r in two), gen),
        },
    }
