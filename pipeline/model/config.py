"""Model configuration: one dataclass, validated on construction, plus named presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from pipeline.errors import ConfigError

ARCHS = ("conv", "mlp")
LATENTS = ("flat", "spatial")
NORMS = ("none", "group", "batch")
ACTIVATIONS = ("silu", "relu", "gelu", "leaky_relu")
LIKELIHOODS = ("gaussian", "laplace", "bernoulli", "discretized_logistic", "discretized_gaussian")
LEARN_SIGMA = ("none", "global", "channel")


@dataclass
class ModelConfig:
    """Architecture and likelihood of the VAE.

    Inputs are float images ``(B, in_channels, image_size, image_size)`` in ``[0, 1]``.
    With ``arch="conv"`` (the default) the encoder halves the resolution ``len(channels)`` times
    (one stride-2 conv per stage) and the decoder doubles it back with pixel-shuffle upsampling.
    ``arch="mlp"`` is the fully connected VAE of Kingma & Welling (2013) and of the published
    binarized-MNIST/Fashion-MNIST baselines (two hidden layers of 300, 40 latents): it is
    there to compare like with like, and only takes a flat latent.

    Attributes:
        arch: ``"conv"`` or ``"mlp"``.
        hidden: widths of the MLP's hidden layers (encoder order; the decoder mirrors it).
        image_size: height and width of the (square) input; divisible by ``2**len(channels)``.
        in_channels: image channels (1 grayscale, 3 RGB).
        channels: width of each resolution stage, highest resolution first.
        blocks_per_stage: residual blocks per stage (0 allowed).
        latent: ``"flat"`` (a vector of ``latent_dim``) or ``"spatial"``
            (``latent_channels`` maps at ``image_size / 2**len(channels)``).
        latent_dim: size of the flat latent.
        latent_channels: channels of the spatial latent.
        norm: normalisation inside residual blocks.
        activation: nonlinearity everywhere.
        likelihood: decoder distribution Q(y|z), see ``pipeline.model.likelihoods``.
        sigma: fixed scale of the gaussian (std) and laplace (b) likelihoods, in [0, 1] pixel
            units; also the initial value when ``learn_sigma`` is not ``"none"``.
        learn_sigma: learn the gaussian/laplace scale: not at all, one global, or per channel.
        min_log_scale: lower clamp of any learned or predicted log scale.
        max_logit: clamp of the bernoulli logits to [-max_logit, max_logit] (0: none); bounds
            one pixel's cost at ln(1 + e^max_logit) nats.
        deterministic_encoder: rate-distortion autoencoder (encoder outputs z = mu only).
        logvar_clamp: ``[low, high]`` clamp of the posterior log-variance.
    """

    arch: Literal["conv", "mlp"] = "conv"
    hidden: list[int] = field(default_factory=lambda: [300, 300])
    image_size: int = 28
    in_channels: int = 1
    channels: list[int] = field(default_factory=lambda: [32, 64])
    blocks_per_stage: int = 1
    latent: Literal["flat", "spatial"] = "flat"
    latent_dim: int = 32
    latent_channels: int = 4
    norm: Literal["none", "group", "batch"] = "group"
    activation: Literal["silu", "relu", "gelu", "leaky_relu"] = "silu"
    likelihood: Literal[
        "gaussian", "laplace", "bernoulli", "discretized_logistic", "discretized_gaussian"
    ] = "discretized_logistic"
    sigma: float = 0.1
    learn_sigma: Literal["none", "global", "channel"] = "none"
    min_log_scale: float = -7.0
    max_logit: float = 0.0
    deterministic_encoder: bool = False
    logvar_clamp: list[float] = field(default_factory=lambda: [-30.0, 20.0])

    def __post_init__(self) -> None:
        self.channels = list(self.channels) if isinstance(self.channels, tuple) else self.channels
        self.hidden = list(self.hidden) if isinstance(self.hidden, tuple) else self.hidden
        if isinstance(self.logvar_clamp, tuple):
            self.logvar_clamp = list(self.logvar_clamp)
        for name in ("image_size", "in_channels", "latent_dim", "latent_channels"):
            _positive_int(name, getattr(self, name))
        _int("blocks_per_stage", self.blocks_per_stage, ok=self.blocks_per_stage >= 0, want=">= 0")
        if not isinstance(self.channels, list) or not self.channels:
            raise ConfigError(
                "channels", f"must be a non-empty list of ints, got {self.channels!r}"
            )
        for width in self.channels:
            _positive_int("channels", width)
        if not isinstance(self.hidden, list) or not self.hidden:
            raise ConfigError("hidden", f"must be a non-empty list of ints, got {self.hidden!r}")
        for width in self.hidden:
            _positive_int("hidden", width)
        factor = 2 ** len(self.channels)
        if self.arch == "conv" and self.image_size % factor:
            raise ConfigError(
                "image_size",
                f"must be divisible by 2**len(channels)={factor}, got {self.image_size}",
            )
        for name, allowed in (
            ("arch", ARCHS),
            ("latent", LATENTS),
            ("norm", NORMS),
            ("activation", ACTIVATIONS),
            ("likelihood", LIKELIHOODS),
            ("learn_sigma", LEARN_SIGMA),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    name, f"must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        if self.arch == "mlp" and self.latent != "flat":
            raise ConfigError("latent", f"arch 'mlp' needs latent 'flat', got {self.latent!r}")
        if not _real(self.sigma) or not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ConfigError("sigma", f"must be a finite float > 0, got {self.sigma!r}")
        if not _real(self.min_log_scale) or not math.isfinite(self.min_log_scale):
            raise ConfigError(
                "min_log_scale", f"must be a finite float, got {self.min_log_scale!r}"
            )
        if not _real(self.max_logit) or not (math.isfinite(self.max_logit) and self.max_logit >= 0):
            raise ConfigError("max_logit", f"must be a finite float >= 0, got {self.max_logit!r}")
        if self.max_logit and self.likelihood != "bernoulli":
            raise ConfigError(
                "max_logit", f"only applies to the bernoulli likelihood, got {self.likelihood!r}"
            )
        if self.learn_sigma != "none" and self.likelihood not in ("gaussian", "laplace"):
            raise ConfigError(
                "learn_sigma",
                f"only applies to gaussian/laplace likelihoods, got likelihood={self.likelihood!r}",
            )
        if not isinstance(self.deterministic_encoder, bool):
            raise ConfigError(
                "deterministic_encoder", f"must be a bool, got {self.deterministic_encoder!r}"
            )
        clamp = self.logvar_clamp
        if (
            not isinstance(clamp, list)
            or len(clamp) != 2
            or not all(_real(v) and math.isfinite(v) for v in clamp)
            or clamp[0] >= clamp[1]
        ):
            raise ConfigError("logvar_clamp", f"must be [low, high] with low < high, got {clamp!r}")

    @property
    def num_downsamples(self) -> int:
        """Number of stride-2 stages (= ``len(channels)``)."""
        return len(self.channels)

    @property
    def latent_resolution(self) -> int:
        """Spatial size at the bottleneck, ``image_size / 2**len(channels)``."""
        return self.image_size // 2 ** len(self.channels)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent sample without the batch dimension."""
        if self.latent == "flat":
            return (self.latent_dim,)
        r = self.latent_resolution
        return (self.latent_channels, r, r)


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(name: str, v: Any, *, ok: bool, want: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not ok:
        raise ConfigError(name, f"must be an int {want}, got {v!r}")


def _positive_int(name: str, v: Any) -> None:
    _int(name, v, ok=isinstance(v, int) and v > 0, want="> 0")


PRESETS: dict[str, dict[str, Any]] = {
    # 28 = 4 * 7: only two stride-2 stages fit.
    "mnist28": dict(
        image_size=28,
        in_channels=1,
        channels=[32, 64],
        blocks_per_stage=1,
        latent="flat",
        latent_dim=32,
        likelihood="bernoulli",
    ),
    # The published MLP baseline (VampPrior / Exemplar VAE "VAE"): 784-300-300-40, with their
    # Hardtanh(-6, 2) on the posterior log-variance and [1/512, 1 - 1/512] clamp of the pixel
    # probabilities (max_logit ln 511). Unbounded, one dense outlier test image (Fashion-MNIST
    # test #9596, 85% bright pixels) drove logvar to 20 and its KL to 1e8 nats, and with the
    # variance bounded still cost ~9,300 nats (a tenth of the whole test NLL's mean).
    "mnist28_mlp": dict(
        arch="mlp",
        hidden=[300, 300],
        image_size=28,
        in_channels=1,
        latent="flat",
        latent_dim=40,
        likelihood="bernoulli",
        logvar_clamp=[-6.0, 2.0],
        max_logit=math.log(511),
    ),
    "cifar32": dict(
        image_size=32,
        in_channels=3,
        channels=[64, 128, 256],
        blocks_per_stage=2,
        latent="spatial",
        latent_channels=16,
        likelihood="discretized_logistic",
    ),
    "64": dict(
        image_size=64,
        in_channels=3,
        channels=[64, 128, 256, 256],
        blocks_per_stage=2,
        latent="spatial",
        latent_channels=16,
        likelihood="discretized_logistic",
    ),
    "256": dict(
        image_size=256,
        in_channels=3,
        channels=[64, 128, 256, 256, 512],
        blocks_per_stage=2,
        latent="spatial",
        latent_channels=16,
        likelihood="discretized_logistic",
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named ``ModelConfig`` (``mnist28``, ``mnist28_mlp``, ``cifar32``, ``64``, ``256``)
    with overrides.

    Raises:
        ConfigError: unknown preset name or unknown/invalid override.
    """
    if name not in PRESETS:
        raise ConfigError("preset", f"must be one of {sorted(PRESETS)}, got {name!r}")
    known = {f.name for f in fields(ModelConfig)}
    for key in overrides:
        if key not in known:
            raise ConfigError(key, f"unknown ModelConfig field (known: {sorted(known)})")
    return ModelConfig(**{**PRESETS[name], **overrides})
