"""The VAE model (pure torch): config, modules, likelihoods, objective, weight I/O.

``ModelConfig`` and the presets import without torch (config validation stays light); every
other name loads its torch-backed submodule on first access (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import PRESETS, ModelConfig, preset

_LAZY = {
    "build_model": "io",
    "config_from_dict": "io",
    "load_model": "io",
    "load_weights": "io",
    "save_weights": "io",
    "weights_metadata": "io",
    "Bernoulli": "likelihoods",
    "DiscretizedGaussian": "likelihoods",
    "DiscretizedLogistic": "likelihoods",
    "Gaussian": "likelihoods",
    "Laplace": "likelihoods",
    "Likelihood": "likelihoods",
    "make_likelihood": "likelihoods",
    "bits_per_dim": "objective",
    "elbo_analytic": "objective",
    "elbo_mc": "objective",
    "elbo_terms": "objective",
    "evaluate": "objective",
    "iwae_bound": "objective",
    "iwae_terms": "objective",
    "kl_warmup": "objective",
    "psnr": "objective",
    "training_terms": "objective",
    "VAE": "vae",
    "Decoder": "vae",
    "DiagonalGaussian": "vae",
    "Encoder": "vae",
    "MLPDecoder": "vae",
    "MLPEncoder": "vae",
    "PixelShuffleUpsample": "vae",
    "ResBlock": "vae",
    "depth_to_space": "vae",
    "prior_log_prob": "vae",
}

if TYPE_CHECKING:
    from .io import (
        build_model,
        config_from_dict,
        load_model,
        load_weights,
        save_weights,
        weights_metadata,
    )
    from .likelihoods import (
        Bernoulli,
        DiscretizedGaussian,
        DiscretizedLogistic,
        Gaussian,
        Laplace,
        Likelihood,
        make_likelihood,
    )
    from .objective import (
        bits_per_dim,
        elbo_analytic,
        elbo_mc,
        elbo_terms,
        evaluate,
        iwae_bound,
        iwae_terms,
        kl_warmup,
        psnr,
        training_terms,
    )
    from .vae import (
        VAE,
        Decoder,
        DiagonalGaussian,
        Encoder,
        MLPDecoder,
        MLPEncoder,
        PixelShuffleUpsample,
        ResBlock,
        depth_to_space,
        prior_log_prob,
    )

__all__ = [
    "Bernoulli",
    "Decoder",
    "DiagonalGaussian",
    "DiscretizedGaussian",
    "DiscretizedLogistic",
    "Encoder",
    "Gaussian",
    "Laplace",
    "Likelihood",
    "MLPDecoder",
    "MLPEncoder",
    "ModelConfig",
    "PRESETS",
    "PixelShuffleUpsample",
    "ResBlock",
    "VAE",
    "bits_per_dim",
    "build_model",
    "config_from_dict",
    "depth_to_space",
    "elbo_analytic",
    "elbo_mc",
    "elbo_terms",
    "evaluate",
    "iwae_bound",
    "iwae_terms",
    "kl_warmup",
    "load_model",
    "load_weights",
    "make_likelihood",
    "preset",
    "prior_log_prob",
    "psnr",
    "save_weights",
    "training_terms",
    "weights_metadata",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
