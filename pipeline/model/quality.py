"""Quality benchmark: binarized Fashion-MNIST IWAE NLL and 8-bit bits/dim.

The functions take any iterable of image batches (B, C, H, W) in [0, 1]; loading data and
writing results belong to the caller (the CLI).
"""

from __future__ import annotations

import hashlib
import itertools
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


TEST_BINARIZATION_SEED = 31230  # the lecture's course number; never the IWAE noise's seed


def binarize_fixed(x: Tensor, seed: int = TEST_BINARIZATION_SEED) -> Tensor:
    """One fixed binarization of a held-out set (Salakhutdinov & Murray 2008).

    Drawn over the whole tensor at once from its own CPU generator, so every model variant,
    every K and every chunk size is scored on the same binary images; see
    :func:`binarization_sha256` for the fingerprint to print beside the numbers.
    """
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    return (u.to(x.device) < x).to(x.dtype)


def binarization_sha256(x: Tensor) -> str:
    """sha256 of binary images (any shape), as uint8 bytes in C order."""
    data = x.detach().cpu().to(torch.uint8).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


VALIDATION_SEED = 17  # the issue that asked for the split
VALIDATION_BINARIZATION_SEED = 31231  # validation images' own fixed binarization


def validation_split(n: int, size: int, seed: int = VALIDATION_SEED) -> tuple[Tensor, Tensor]:
    """(train indices, validation indices) of a training set of ``n`` images.

    A seeded permutation of ``range(n)``; its last ``size`` entries are the validation split.
    Both index tensors are sorted, disjoint and together cover ``range(n)``. Model selection
    reads the validation split; the test split stays untouched until the reported numbers.
    """
    if not 0 < size < n:
        raise ValueError(f"validation size must be in 1..{n - 1}, got {size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:-size].sort().values, perm[-size:].sort().values


def indices_sha256(indices: Tensor) -> str:
    """sha256 of an index tensor as little-endian int64 bytes."""
    data = indices.detach().cpu().to(torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return hashlib.sha256(data).hexdigest()


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

    Requires a Bernoulli likelihood. The test set is binarized once, whole, with its own
    generator (:func:`binarize_fixed`), independent of ``k``, ``chunk``, the batching and the
    IWAE noise (seeded by ``seed``). Returns ``evaluate``'s dict (``nll_iwae`` is the headline
    number) plus ``test_binarization_sha256``.
    """
    if model.config.likelihood != "bernoulli":
        raise ValueError(
            f"binarized benchmark needs likelihood='bernoulli', got {model.config.likelihood!r}"
        )
    images = [images_of(b).cpu() for b in itertools.islice(batches, max_batches)]
    binary = binarize_fixed(torch.cat(images))
    res = binary_nll(model, list(binary.split([len(x) for x in images])), k, chunk=chunk, seed=seed)
    return {**res, "test_binarization_sha256": binarization_sha256(binary)}


def binary_nll(
    model: VAE, batches: Iterable[Any], k: int, *, chunk: int = 100, seed: int = 0
) -> dict[str, float]:
    """IWAE-k NLL (nats/image, ``evaluate``'s dict) of images that are binarized already, e.g.
    one slice of a :func:`binarize_fixed` set; ``seed`` seeds the IWAE noise only."""
    if model.config.likelihood != "bernoulli":
        raise ValueError(
            f"binarized benchmark needs likelihood='bernoulli', got {model.config.likelihood!r}"
        )
    g = torch.Generator().manual_seed(seed)
    return evaluate(model, batches, k, chunk=chunk, generator=g)


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
