"""Quality benchmark: binarized Fashion-MNIST IWAE NLL and 8-bit bits/dim.

The functions take any iterable of image batches (B, C, H, W) in [0, 1]; loading data and
writing results belong to the caller (the CLI).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from .likelihoods import noise
from .objective import evaluate, images_of
from .vae import VAE


def binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Stochastic binarization, pixel ~ Bernoulli(intensity) (Salakhutdinov & Murray 2008)."""
    return (noise("uniform", x.shape, x, generator) < x).to(x.dtype)


def quantize_8bit(x: Tensor) -> Tensor:
    """Snap [0, 1] images to the 8-bit grid k/255."""
    return torch.round(x.clamp(0.0, 1.0) * 255) / 255


def _mapped(batches: Iterable[Any], fn: Any) -> Iterator[Tensor]:
    for batch in batches:
        yield fn(images_of(batch))


def fashion_mnist_nll(
    model: VAE,
    batches: Iterable[Any],
    k: int = 5000,
    *,
    chunk: int = 100,
    seed: int = 0,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Test NLL (nats/image) by IWAE-k on stochastically binarized Fashion-MNIST 28x28.

    Requires a Bernoulli likelihood. The binarization is seeded so repeated runs see the same
    test set. Returns ``evaluate``'s dict (``nll_iwae`` is the headline number).
    """
    if model.config.likelihood != "bernoulli":
        raise ValueError(
            f"binarized benchmark needs likelihood='bernoulli', got {model.config.likelihood!r}"
        )
    g = torch.Generator().manual_seed(seed)
    data = _mapped(batches, lambda x: binarize(x.cpu(), g))
    return evaluate(model, data, k, chunk=chunk, generator=g, max_batches=max_batches)


def bits_per_dim_8bit(
    model: VAE,
    batches: Iterable[Any],
    k: int = 1000,
    *,
    chunk: int = 50,
    seed: int = 0,
    max_batches: int | None = None,
) -> dict[str, float]:
    """IWAE-k bits/dim on 8-bit images (inputs snapped to k/255).

    Honest for the discretized likelihoods; for gaussian/laplace the density is converted with
    the ln 255 per-dim bin width (``Likelihood.dequantization_nats_per_dim``).
    """
    g = torch.Generator().manual_seed(seed)
    data = _mapped(batches, quantize_8bit)
    return evaluate(model, data, k, chunk=chunk, generator=g, max_batches=max_batches)


def quality_benchmark(
    model: VAE, batches: Iterable[Any], kind: str, k: int | None = None, **kwargs: Any
) -> dict[str, float]:
    """Dispatch: ``kind`` is ``"fashion_mnist_binarized"`` or ``"bits_per_dim_8bit"``."""
    if kind == "fashion_mnist_binarized":
        return fashion_mnist_nll(model, batches, k or 5000, **kwargs)
    if kind == "bits_per_dim_8bit":
        return bits_per_dim_8bit(model, batches, k or 1000, **kwargs)
    raise ValueError(f"unknown benchmark {kind!r}")
