"""Convolutional VAE: Encoder, Decoder, DiagonalGaussian posterior and the VAE composite.

Notation follows the lecture (TTIC 31230, "Variational Autoencoders"): y is the image, z the
latent, P_Psi(z|y) the encoder's posterior, Q_Phi(z, y) = P_Phi(z) Q_Phi(y|z) the generative
model with prior P_Phi(z) = N(0, I). Inputs are float images (B, C, H, W) in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .likelihoods import Likelihood, make_likelihood, noise

LOG_2PI = math.log(2 * math.pi)


def _activation(name: str) -> nn.Module:
    if name == "silu":
        return nn.SiLU()
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.2)
    raise ValueError(f"unknown activation {name!r}")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 32), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


class ResBlock(nn.Module):
    """norm-act-conv3x3 twice plus identity skip; keeps (B, C, H, W)."""

    def __init__(self, channels: int, norm: str, activation: str):
        super().__init__()
        self.body = nn.Sequential(
            _norm(norm, channels),
            _activation(activation),
            nn.Conv2d(channels, channels, 3, padding=1),
            _norm(norm, channels),
            _activation(activation),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def depth_to_space(x: Tensor, r: int = 2) -> Tensor:
    """(B, r*r*C, H, W) -> (B, C, r*H, r*W), out[c, r*i+di, r*j+dj] = x[c*r*r + r*di + dj, i, j].

    Lecture "Deconvolution: Increasing Spatial Dimension": "the channels at each lower resolution
    pixel x_hat[i, j] are divided among four higher resolution pixels ... by a simple reshaping".
    Same indexing as ``torch.nn.functional.pixel_shuffle``.
    """
    b, c4, h, w = x.shape
    c = c4 // (r * r)
    x = x.view(b, c, r, r, h, w)  # channel index c*r*r + r*di + dj -> (c, di, dj)
    x = x.permute(0, 1, 4, 2, 5, 3)  # (B, C, H, di, W, dj)
    return x.reshape(b, c, h * r, w * r)  # row r*i + di, column r*j + dj


class PixelShuffleUpsample(nn.Module):
    """Stride-1 conv to 4x the channels, then depth-to-space: (B, C_in, H, W) -> (B, C_out, 2H, 2W).

    Lecture "Deconvolution: Increasing Spatial Dimension":
        x_hat[i, j, c] = sum W'[di, dj, c_y, c] y[i + di, j + dj, c_y] + B[c]   (stride 1, 4C out)
    followed by the reshape of ``depth_to_space``. (The slide writes c_x_hat as the input channel
    index of y; it is c_y.) Weights start ICNR-initialised (Aitken et al. 2017): the four
    sub-pixels of each output channel share one kernel, so the initial upsampling is
    nearest-neighbour and free of checkerboard artifacts.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4 * out_channels, kernel_size, padding=kernel_size // 2)
        with torch.no_grad():
            w = self.conv.weight.view(out_channels, 4, in_channels, kernel_size, kernel_size)
            w.copy_(w[:, :1].expand_as(w))
            b = self.conv.bias.view(out_channels, 4)
            b.copy_(b[:, :1].expand_as(b))

    def forward(self, x: Tensor) -> Tensor:
        return depth_to_space(self.conv(x), 2)  # (B, 4C, H, W) -> (B, C, 2H, 2W)


def _mu_logvar(h: Tensor, deterministic: bool) -> tuple[Tensor, Tensor | None]:
    """Split an encoder head's output along channels: (mu, logvar), or (z, None) for the RD
    autoencoder's deterministic encoder."""
    if deterministic:
        return h, None
    mu, logvar = h.chunk(2, dim=1)
    return mu, logvar


class Encoder(nn.Module):
    """y -> (mu, logvar) of P_Psi(z|y); logvar is None for a deterministic encoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config.channels
        self.deterministic = config.deterministic_encoder
        self.latent = config.latent
        self.conv_in = nn.Conv2d(config.in_channels, c[0], 3, padding=1)
        stages = []
        for i, width in enumerate(c):
            # Lecture "Deconvolution: Increasing Spatial Dimension", stride-2 convolution:
            # y[i, j, c_y] = sum W[di, dj, c_x, c_y] x[2i + di, 2j + dj, c_x] + B[c_y]
            layers = [nn.Conv2d(c[max(i - 1, 0)], width, 3, stride=2, padding=1)]
            layers += [
                ResBlock(width, config.norm, config.activation)
                for _ in range(config.blocks_per_stage)
            ]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.out = nn.Sequential(_norm(config.norm, c[-1]), _activation(config.activation))
        n_out = 1 if self.deterministic else 2
        if config.latent == "flat":
            r = config.latent_resolution
            self.head = nn.Linear(c[-1] * r * r, n_out * config.latent_dim)
        else:
            self.head = nn.Conv2d(c[-1], n_out * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = 2 * x - 1  # [0, 1] -> [-1, 1], zero-centred input
        h = self.out(self.stages(self.conv_in(x)))  # (B, C_last, H / 2^L, W / 2^L)
        if self.latent == "flat":
            h = h.flatten(1)
        return _mu_logvar(self.head(h), self.deterministic)  # from (B, 2D) or (B, 2C_z, h, w)


class Decoder(nn.Module):
    """z -> raw likelihood parameters (B, out_channels, H, W)."""

    def __init__(self, config: ModelConfig, out_channels: int):
        super().__init__()
        c = config.channels
        self.latent = config.latent
        self.r = config.latent_resolution
        if config.latent == "flat":
            self.proj = nn.Linear(config.latent_dim, c[-1] * self.r * self.r)
        else:
            self.proj = nn.Conv2d(config.latent_channels, c[-1], 3, padding=1)
        stages = []
        for i in reversed(range(len(c))):
            layers: list[nn.Module] = [
                ResBlock(c[i], config.norm, config.activation)
                for _ in range(config.blocks_per_stage)
            ]
            layers.append(PixelShuffleUpsample(c[i], c[max(i - 1, 0)]))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.out = nn.Sequential(
            _norm(config.norm, c[0]),
            _activation(config.activation),
            nn.Conv2d(c[0], out_channels, 3, padding=1),
        )

    def forward(self, z: Tensor) -> Tensor:
        h = self.proj(z)
        if self.latent == "flat":
            h = h.view(z.shape[0], -1, self.r, self.r)  # (B, C_last, h, w)
        return self.out(self.stages(h))  # (B, C_last, h, w) -> (B, out_channels, H, W)


class MLPEncoder(nn.Module):
    """Fully connected y -> (mu, logvar): flatten, ``hidden`` layers with the activation."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.deterministic = config.deterministic_encoder
        widths = [config.in_channels * config.image_size**2, *config.hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), _activation(config.activation)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], (1 if self.deterministic else 2) * config.latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return _mu_logvar(self.head(self.body((2 * x - 1).flatten(1))), self.deterministic)


class MLPDecoder(nn.Module):
    """Fully connected z -> likelihood params (B, out_channels, H, W); mirrors the encoder."""

    def __init__(self, config: ModelConfig, out_channels: int):
        super().__init__()
        self.shape = (out_channels, config.image_size, config.image_size)
        widths = [config.latent_dim, *reversed(config.hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), _activation(config.activation)]
        layers.append(nn.Linear(widths[-1], math.prod(self.shape)))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z).view(z.shape[0], *self.shape)


class DiagonalGaussian:
    """The encoder's posterior P_Psi(z|y) = N(mu, diag(exp(logvar))).

    ``logvar=None`` gives the rate-distortion autoencoder's point mass at mu. Densities are
    summed over the event dimensions (all but the batch dimension of ``mu``).

    Args:
        mu: (B, *event) posterior mean.
        logvar: (B, *event) log-variance, clamped to ``logvar_clamp``; or None.
        logvar_clamp: (low, high).
    """

    def __init__(
        self,
        mu: Tensor,
        logvar: Tensor | None,
        logvar_clamp: tuple[float, float] | list[float] = (-30.0, 20.0),
    ):
        self.mu = mu
        self.deterministic = logvar is None
        self.event_dims = tuple(range(-(mu.dim() - 1), 0))
        if logvar is not None:
            self.logvar = logvar.clamp(logvar_clamp[0], logvar_clamp[1])
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def _need_stochastic(self, what: str) -> None:
        if self.deterministic:
            raise ValueError(f"{what} is undefined for a deterministic (point-mass) posterior")

    def rsample(self, n: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterized draw, differentiable in (mu, logvar): (B, *event) or (n, B, *event).

        Lecture "The Reparameterization Trick": z[i] = mu(y)[i] + sigma(y)[i] eps[i],
        eps[i] ~ N(0, 1).
        """
        shape = self.mu.shape if n is None else (n, *self.mu.shape)
        if self.deterministic:
            return self.mu.expand(shape)
        eps = noise("normal", shape, self.mu, generator)
        return self.mu + self.std * eps

    def sample(self, n: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Like ``rsample`` but detached from the graph."""
        return self.rsample(n, generator).detach()

    def mode(self) -> Tensor:
        """mu (the argmax; the RD autoencoder's code)."""
        return self.mu

    def log_prob(self, z: Tensor) -> Tensor:
        """ln P_Psi(z|y) in nats: shape ``z.shape[:-len(event)]``; -ln2 times |z|_{Psi,y}."""
        self._need_stochastic("log_prob")
        sq = (z - self.mu) ** 2 / self.var
        return -0.5 * (LOG_2PI + self.logvar + sq).sum(self.event_dims)

    def entropy(self) -> Tensor:
        """H(P_Psi(z|y)) = sum 0.5 (ln(2 pi e) + logvar), nats per image (B,)."""
        self._need_stochastic("entropy")
        return 0.5 * (LOG_2PI + 1.0 + self.logvar).sum(self.event_dims)

    def kl_per_unit(self) -> Tensor:
        """KL(N(mu, var), N(0, 1)) per latent unit, (B, *event), nats.

        Kingma & Welling 2013, appendix B: 0.5 (mu^2 + var - 1 - logvar).
        """
        self._need_stochastic("kl")
        return 0.5 * (self.mu**2 + self.var - 1.0 - self.logvar)

    def kl(self) -> Tensor:
        """KL(P_Psi(z|y), N(0, I)) in nats per image, (B,)."""
        return self.kl_per_unit().sum(self.event_dims)


def _full_precision(t: Tensor) -> Tensor:
    # under bf16/fp16 autocast the densities and their per-image sums stay in float32
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def prior_log_prob(z: Tensor, event_dims: int) -> Tensor:
    """ln P_Phi(z) under N(0, I), summed over the last ``event_dims`` dimensions (nats).

    Lecture "Decoding with L_2 Distortion": |z|_Phi = -log2 P_Phi(z) = -prior_log_prob / ln 2.
    """
    return -0.5 * (LOG_2PI + z**2).sum(tuple(range(-event_dims, 0)))


class VAE(nn.Module):
    """Encoder P_Psi(z|y), prior P_Phi(z) = N(0, I), decoder Q_Phi(y|z) = likelihood(decode(z)).

    Args:
        config: architecture and likelihood.
        encoder, decoder, likelihood: optional replacements (e.g. a linear-Gaussian model);
            ``encoder(x) -> (mu, logvar | None)``, ``decoder(z) -> params``.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        likelihood: Likelihood | None = None,
    ):
        super().__init__()
        self.config = config
        self.likelihood = likelihood or make_likelihood(
            config.likelihood,
            sigma=config.sigma,
            learn_sigma=config.learn_sigma,
            channels=config.in_channels,
            min_log_scale=config.min_log_scale,
            max_logit=config.max_logit,
        )
        mlp = config.arch == "mlp"
        self.encoder = encoder or (MLPEncoder(config) if mlp else Encoder(config))
        out_channels = self.likelihood.params_per_channel * config.in_channels
        self.decoder = decoder or (
            MLPDecoder(config, out_channels) if mlp else Decoder(config, out_channels)
        )

    @classmethod
    def from_config(cls, config: ModelConfig) -> VAE:
        """A freshly initialised VAE for ``config``."""
        return cls(config)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent sample, without the batch dimension."""
        return self.config.latent_shape

    @property
    def deterministic(self) -> bool:
        """True for the rate-distortion autoencoder (point-mass posterior)."""
        return self.config.deterministic_encoder

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """(B, C, H, W) in [0, 1] -> posterior over (B, *latent_shape)."""
        mu, logvar = self.encoder(x)
        logvar = None if logvar is None else _full_precision(logvar)
        return DiagonalGaussian(_full_precision(mu), logvar, self.config.logvar_clamp)

    def decode(self, z: Tensor) -> Tensor:
        """(*lead, *latent_shape) -> likelihood params (*lead, k*C, H, W), at least float32."""
        n_event = len(self.latent_shape)
        lead = z.shape[: z.dim() - n_event]
        params = self.decoder(z.reshape(-1, *z.shape[z.dim() - n_event :]))
        return _full_precision(params).view(*lead, *params.shape[1:])

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """ln P_Phi(z), summed per latent sample (nats)."""
        return prior_log_prob(z, len(self.latent_shape))

    def forward(
        self,
        x: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Encode, draw z (``rsample``, or ``mode`` if not ``sample_posterior``), decode.

        Returns:
            (decoder params, posterior).
        """
        posterior = self.encode(x)
        z = posterior.rsample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @torch.no_grad()
    def sample_prior(
        self,
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        *,
        sample_pixels: bool = False,
    ) -> Tensor:
        """n images (n, C, H, W) from z ~ N(0, temperature^2 I) (lecture "Sampling").

        Returns the likelihood's display mean, or a draw from it if ``sample_pixels``.
        """
        z = noise("normal", (n, *self.latent_shape), next(self.parameters()), generator)
        params = self.decode(temperature * z)
        if sample_pixels:
            return self.likelihood.sample(params, generator)
        return self.likelihood.mean(params)
