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
from pipeline.serve.images import annotate, grid, png_bytes, upscale
from pipeline.serve.registry import LoadedModel, ModelRef, load, resolve
from pipeline.train.tracking import public_uri, ui_url
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
) -> dict[str, tuple[bytes, str]]:
    """All grids as (PNG bytes, caption), keyed by file name. Tiles are upscaled to at least
    96 px (nearest neighbour) and each PNG carries its caption; traversal rows are labelled
    with the latent unit they move. Deterministic for a given seed (the noise is drawn on the
    CPU; the model and ``held_out`` may be on a GPU)."""
    vae, n = m.vae, s.grid_rows * s.grid_cols
    size = m.model_config["image_size"]
    k = upscale(size)
    pitch, pad = k * (size + 2), 2 * k  # one grid row, and the padding above the first

    def png(imgs, ncol, caption, rows=()):
        a = grid(imgs, ncol, scale=k)
        return png_bytes(annotate(a, caption, list(rows), pitch, pad)), caption

    g = torch.Generator().manual_seed(s.seed)
    out: dict[str, tuple[bytes, str]] = {}
    for t in s.temperatures:
        imgs = vae.sample_prior(n, temperature=t, generator=g).clamp(0, 1)
        out[f"prior_t{t:g}.png"] = png(imgs, s.grid_cols, f"prior samples, temperature {t:g}")
    if held_out is None or len(held_out) == 0:
        return out
    x = held_out[: max(2, n // 2)]
    params, post = vae(x, sample_posterior=False)
    recon = vae.likelihood.mean(params).clamp(0, 1)
    pairs = torch.stack([x, recon], 1).flatten(0, 1)  # original, reconstruction, ...
    out["reconstructions.png"] = png(
        pairs,
        s.grid_cols - s.grid_cols % 2 or 2,
        "held-out image, then its reconstruction (pairs left to right)",
    )
    mu = post.mode()
    if s.interpolation_pairs and len(x) >= 2:
        p = min(s.interpolation_pairs, len(x) // 2)
        a, b = mu[:p], mu[p : 2 * p]
        w = torch.linspace(0, 1, s.interpolation_steps, device=mu.device)
        w = w.view(1, -1, *([1] * (mu.dim() - 1)))
        z = a.unsqueeze(1) * (1 - w) + b.unsqueeze(1) * w  # (p, steps, *latent)
        imgs = vae.likelihood.mean(vae.decode(z.flatten(0, 1))).clamp(0, 1)
        imgs = imgs.view(p, s.interpolation_steps, *imgs.shape[1:])
        rows = torch.cat([x[:p, None], imgs, x[p : 2 * p, None]], 1)  # endpoints A ... B
        out["interpolations.png"] = png(
            rows.flatten(0, 1),
            s.interpolation_steps + 2,
            f"held-out A | decode((1-w) mu_A + w mu_B), w = 0..1 in "
            f"{s.interpolation_steps} steps | held-out B",
        )
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
        out["traversals.png"] = png(
            imgs,
            s.traversal_steps,
            f"one latent unit per row (highest KL first), {-s.traversal_range:g} .. "
            f"{s.traversal_range:g}",
            [f"z{int(d)}" for d in dims],
        )
    return out


def index_html(m: LoadedModel, grids: dict[str, str], s: SampleConfig) -> bytes:
    """A page that works offline: relative image links, inline style, no external files. Its
    inline script sets ``body[data-loaded]`` to ``"N/M"`` images loaded once all have settled."""
    e = html.escape
    figures = "".join(
        f'<figure><img src="{e(f)}" alt="{e(c)}"><figcaption>{e(f)}: {e(c)}</figcaption></figure>\n'
        for f, c in grids.items()
    )
    metrics = "".join(
        f"<tr><td>{e(k)}</td><td>{v:.6g}</td></tr>" for k, v in sorted(m.metrics.items())
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(m.name)} "
        f"v{e(m.version)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{e(m.name)} version {e(m.version)}</h1><p>training run: {e(m.train_run_id)}</p>"
        f"<p>seed {s.seed}, temperatures {s.temperatures}</p>\n{figures}"
        f"<table>{metrics}</table>\n<script>{LOADED_JS}</script></body></html>\n"
    ).encode()


STYLE = (
    "body{font:14px sans-serif;margin:16px;background:#fff;color:#111}"
    "figure{margin:0 0 24px}img{image-rendering:pixelated;max-width:100%}"
    "figcaption{margin-top:4px;color:#444}td{padding:0 12px 0 0}"
)
LOADED_JS = (
    "window.addEventListener('load',function(){var i=document.images,n=0;"
    "for(var k=0;k<i.length;k++){if(i[k].complete&&i[k].naturalWidth>0)n++;}"
    "document.body.dataset.loaded=n+'/'+i.length;});"
)


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
    grids = make_gallery(m, s, None if held_out is None else held_out.to(device))
    files = {name: data for name, (data, _) in grids.items()}
    files["index.html"] = index_html(m, {name: c for name, (_, c) in grids.items()}, s)
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
    """Log the gallery as artifacts of a run in the gallery experiment, and link it from the
    model version (tags ``gallery_url``, ``gallery_run_id``, ``gallery_page`` and a line in
    its description) and from its training run (tags ``gallery_url``, ``gallery_page``). A
    gallery of a checkpoint URL links nothing: its run may live on another server."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.tracking import ensure_experiment

    uri = job.tracking.mlflow_uri
    client = MlflowClient(uri)
    exp_id = ensure_experiment(client, job.tracking.experiment)
    run = client.create_run(
        exp_id,
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
    page = ui_url(uri, exp_id, run.info.run_id, "gallery/index.html")
    links = {"gallery_url": url, **({"gallery_page": page} if page else {})}
    if not m.version.startswith("ckpt-"):
        for k, v in {**links, "gallery_run_id": run.info.run_id}.items():
            client.set_model_version_tag(m.name, m.version, k, v)
        mv = client.get_model_version(m.name, m.version)
        line = f"Gallery: {url}" + (f" ([index.html in MLflow]({page}))" if page else "")
        if line not in (mv.description or ""):
            text = "\n\n".join(t for t in (mv.description, line) if t)
            client.update_model_version(m.name, m.version, description=text)
        if m.train_run_id:  # the version's run, on this server
            for k, v in links.items():
                client.set_tag(m.train_run_id, k, v)
    return run.info.run_id
