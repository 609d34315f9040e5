"""The gallery job: sample grids from a registered model, idempotently.

Output goes under ``{output_url}/{model}/v{version}/{config_hash}/``; ``_SUCCESS.json`` is
written last, so a gallery without it is incomplete and a re-run with the same model version
and sampling config finds the marker and does nothing. The model is rebuilt from the config
stored with it; this module never imports the training loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import tempfile
import time
from pathlib import Path

import torch

from pipeline import storage
from pipeline.errors import PipelineError, first_line
from pipeline.serve.config import SampleConfig, SampleJob
from pipeline.serve.images import grid, png_bytes
from pipeline.serve.registry import LoadedModel, ModelRef, load, resolve
from pipeline.train.tracking import public_uri
from pipeline.typed import to_dict

MARKER = "_SUCCESS.json"


def config_hash(s: SampleConfig) -> str:
    """A short hash of everything that changes the gallery's pixels (not where it goes)."""
    d = to_dict(s)
    for k in ("output_url", "model_name", "model_alias", "model_version", "checkpoint_url"):
        d.pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@torch.no_grad()
def make_gallery(
    m: LoadedModel, s: SampleConfig, held_out: torch.Tensor | None
) -> dict[str, bytes]:
    """All grids as PNG bytes, keyed by file name. Deterministic for a given seed (the noise
    is drawn on the CPU; the model and ``held_out`` may be on a GPU)."""
    vae, n = m.vae, s.grid_rows * s.grid_cols
    g = torch.Generator().manual_seed(s.seed)
    out: dict[str, bytes] = {}
    for t in s.temperatures:
        imgs = vae.sample_prior(n, temperature=t, generator=g).clamp(0, 1)
        out[f"prior_t{t:g}.png"] = png_bytes(grid(imgs, s.grid_cols))
    if held_out is None or len(held_out) == 0:
        return out
    x = held_out[: max(2, n // 2)]
    params, post = vae(x, sample_posterior=False)
    recon = vae.likelihood.mean(params).clamp(0, 1)
    pairs = torch.stack([x, recon], 1).flatten(0, 1)  # original, reconstruction, ...
    out["reconstructions.png"] = png_bytes(grid(pairs, s.grid_cols - s.grid_cols % 2 or 2))
    mu = post.mode()
    if s.interpolation_pairs and len(x) >= 2:
        k = min(s.interpolation_pairs, len(x) // 2)
        a, b = mu[:k], mu[k : 2 * k]
        w = torch.linspace(0, 1, s.interpolation_steps, device=mu.device)
        w = w.view(1, -1, *([1] * (mu.dim() - 1)))
        z = a.unsqueeze(1) * (1 - w) + b.unsqueeze(1) * w  # (k, steps, *latent)
        imgs = vae.likelihood.mean(vae.decode(z.flatten(0, 1))).clamp(0, 1)
        out["interpolations.png"] = png_bytes(grid(imgs, s.interpolation_steps))
    if s.traversal_dims and not vae.deterministic:
        kl = post.kl_per_unit().flatten(1).mean(0)  # nats per latent unit
        dims = kl.argsort(descending=True)[: s.traversal_dims]
        base = mu[:1].flatten(1).repeat(len(dims) * s.traversal_steps, 1)
        vals = torch.linspace(
            -s.traversal_range, s.traversal_range, s.traversal_steps, device=mu.device
        )
        for i, d in enumerate(dims):
            base[i * s.traversal_steps : (i + 1) * s.traversal_steps, d] = vals
        imgs = vae.likelihood.mean(vae.decode(base.view(-1, *mu.shape[1:]))).clamp(0, 1)
        out["traversals.png"] = png_bytes(grid(imgs, s.traversal_steps))
    return out


def index_html(m: LoadedModel, files: list[str], s: SampleConfig) -> bytes:
    rows = "".join(
        f'<h2>{html.escape(f)}</h2><p><img src="{html.escape(f)}" alt="{html.escape(f)}"></p>\n'
        for f in files
    )
    metrics = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>" for k, v in sorted(m.metrics.items())
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(m.name)} "
        f"v{html.escape(m.version)}</title></head><body><h1>{html.escape(m.name)} version "
        f"{html.escape(m.version)}</h1><p>training run: {html.escape(m.train_run_id)}</p>"
        f"<p>seed {s.seed}, temperatures {s.temperatures}</p><table>{metrics}</table>\n"
        f"{rows}</body></html>\n"
    ).encode()


def _held_out(s: SampleConfig, model_config: dict) -> torch.Tensor | None:
    if not s.data_url:
        return None
    from pipeline.data.heldout import read_images

    need = max(2 * s.interpolation_pairs, s.grid_rows * s.grid_cols // 2, 2)
    return read_images(s.data_url, need, model_config["image_size"], model_config["in_channels"])


def run_sample(job: SampleJob, if_new_version: bool = False) -> str | None:
    """Write the gallery for the configured model; return its URL (None if nothing to do)."""
    s = job.sample
    ref = ModelRef(
        s.model_name, s.model_alias, s.model_version, s.checkpoint_url, job.tracking.mlflow_uri
    )
    version, mv = resolve(ref)
    base = storage.join(s.output_url, s.model_name, f"v{version}")
    if if_new_version and any(
        storage.exists(storage.join(base, h, MARKER)) for h in storage.listdir(base)
    ):
        print(
            f"nothing to do: version {version} of {s.model_name!r} already has a gallery under {base}"
        )
        return None
    url = storage.join(base, config_hash(s))
    if storage.exists(storage.join(url, MARKER)):
        print(f"nothing to do: gallery complete at {url}/index.html")
        return None
    m = load(ref, version, mv)
    _check_tracking(job)  # before any output: the gallery is logged there at the end
    if s.num_samples:
        from pipeline.serve.bulk import generate

        generate(m, s, storage.join(url, "samples"))
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m.vae.to(device)
    held_out = _held_out(s, m.model_config)
    files = make_gallery(m, s, None if held_out is None else held_out.to(device))
    files["index.html"] = index_html(m, [f for f in files if f.endswith(".png")], s)
    written: list[str] = []
    try:
        for name, data in files.items():
            storage.put_atomic(storage.join(url, name), data)
            written.append(name)
        run_id = _log_mlflow(job, m, files, url)
    except Exception as e:  # no half gallery left behind: a re-run starts clean
        for name in written:
            with contextlib.suppress(Exception):
                storage.remove(storage.join(url, name), retries=0)
        if isinstance(e, PipelineError):
            raise
        first = first_line(e)
        raise PipelineError(f"gallery {url}: {type(e).__name__}: {first}") from e
    marker = {
        "model": s.model_name,
        "version": version,
        "train_run_id": m.train_run_id,
        "gallery_run_id": run_id,
        "files": sorted(files),
        "config": to_dict(s),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    storage.put_atomic(storage.join(url, MARKER), json.dumps(marker, indent=1).encode())
    print(f"gallery written: {url}/index.html (drawn on {device.type})")
    return url


def _check_tracking(job: SampleJob) -> None:
    """One clear line now if MLflow is unreachable, instead of a failure after the output."""
    from pipeline.serve.registry import mlflow_client

    uri = job.tracking.mlflow_uri
    try:
        mlflow_client(uri).search_experiments(max_results=1)
    except Exception as e:
        raise PipelineError(
            f"MLflow at {public_uri(uri)} unreachable ({type(e).__name__})"
        ) from None


def _log_mlflow(job: SampleJob, m: LoadedModel, files: dict[str, bytes], url: str) -> str:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(job.tracking.mlflow_uri)
    exp = mlflow.set_experiment(job.tracking.experiment)
    client = MlflowClient(job.tracking.mlflow_uri)
    run = client.create_run(
        exp.experiment_id,
        run_name=f"gallery-{m.name}-v{m.version}",
        tags={
            "model_name": m.name,
            "model_version": m.version,
            "train_run_id": m.train_run_id,
            "gallery_url": url,
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        client.log_artifacts(run.info.run_id, tmp, artifact_path="gallery")
    client.set_terminated(run.info.run_id)
    if not m.version.startswith("ckpt-"):
        client.set_model_version_tag(m.name, m.version, "gallery_url", url)
        client.set_model_version_tag(m.name, m.version, "gallery_run_id", run.info.run_id)
    return run.info.run_id
