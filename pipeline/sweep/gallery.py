"""What rate buys, as one picture: a row per point of the sweep, in KL-weight order, of
prior samples (the same noise for every point) and reconstructions of the same held-out
images, under a row of those images. Rebuilds each point's model from its checkpoint (the
config stored in it); never imports the train loop."""

from __future__ import annotations

import torch

from pipeline.serve.images import annotate, grid, png_bytes, upscale
from pipeline.serve.registry import ModelRef, load
from pipeline.sweep.results import PointResult

__all__ = ["sweep_gallery"]


@torch.no_grad()
def sweep_gallery(
    points: list[PointResult], data_url: str, n_prior: int = 8, n_recon: int = 6, seed: int = 0
) -> bytes:
    """The PNG: row 0 the held-out images (right), then per point ``n_prior`` prior samples
    (left) and the reconstructions of row 0 (right). Points without a checkpoint are left out."""
    from pipeline.data.heldout import read_images

    rows, labels, x, size = [], ["data"], None, 0
    several_dims = len({p.latent_dim for p in points}) > 1
    for r in sorted((p for p in points if p.checkpoint_url), key=lambda p: p.kl_weight):
        m = load(ModelRef(checkpoint_url=r.checkpoint_url))
        cfg = m.model_config
        if x is None:
            size = cfg["image_size"]
            x = read_images(data_url, n_recon, size, cfg["in_channels"])[:n_recon]
            blank = torch.ones(n_prior, *x.shape[1:])
            rows.append(torch.cat([blank, x]))
        g = torch.Generator().manual_seed(seed)  # the same prior noise for every point
        prior = m.vae.sample_prior(n_prior, generator=g).clamp(0, 1)
        params, _ = m.vae(x, sample_posterior=False)
        recon = m.vae.likelihood.mean(params).clamp(0, 1)
        rows.append(torch.cat([prior, recon]))
        labels.append(f"kl={r.kl_weight:g}" + (f" z{r.latent_dim}" if several_dims else ""))
    if x is None:
        raise ValueError("no point has a checkpoint to draw from")
    k = upscale(size, 56)
    a = grid(torch.cat(rows), n_prior + len(x), scale=k)
    title = f"per KL weight (kl=): {n_prior} prior samples | reconstructions of the data row"
    return png_bytes(annotate(a, title, labels, k * (size + 2), 2 * k))
