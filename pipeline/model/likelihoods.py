"""Decoder distributions Q_Phi(y|z) over images.

Data convention: images are float tensors ``(B, C, H, W)`` in ``[0, 1]``; 8-bit data sit on the
grid ``k / 255``. Every likelihood works in these ``[0, 1]`` units (no rescaling to ``[-1, 1]``),
so ``sigma`` and predicted scales are in pixel-intensity units. The decoder emits a raw parameter
tensor ``(..., params_per_channel * C, H, W)``; each likelihood interprets it. ``log_prob`` is
summed per image (nats) and broadcasts over leading sample dimensions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EVENT_DIMS = (-3, -2, -1)  # (C, H, W)
BINS = 256  # 8-bit data
HALF_BIN = 0.5 / (BINS - 1)  # bins of width 1/255 centred on k/255
LOG_2PI = math.log(2 * math.pi)


def noise(
    kind: Literal["normal", "uniform"],
    shape: tuple[int, ...] | torch.Size,
    like: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """N(0, 1) or U[0, 1) noise with ``like``'s dtype and device.

    Drawn on the generator's device and then moved, so a seeded CPU generator gives the same
    draws whatever device the model is on.
    """
    device = like.device if generator is None else generator.device
    draw = torch.randn if kind == "normal" else torch.rand
    return draw(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class Likelihood(nn.Module):
    """Base class. Subclasses set ``params_per_channel`` and ``discrete``."""

    params_per_channel: int = 1
    discrete: bool = False  # True: log_prob is a probability mass of the observed value

    @property
    def dequantization_nats_per_dim(self) -> float:
        """Nats per dimension turning a density on [0, 1] into an 8-bit bin probability.

        ``-ln P(bin) ~= -ln p(x) + ln 255`` for a bin of width 1/255 (Theis et al. 2016); zero
        for discrete likelihoods. Used so bits/dim are comparable across likelihoods.
        """
        return 0.0 if self.discrete else math.log(BINS - 1)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """ln Q(x|z) in nats, summed over (C, H, W): shape ``params.shape[:-3]``."""
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        """A display image in [0, 1] with the data's shape."""
        raise NotImplementedError

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One draw from Q(x|z) with the data's shape."""
        raise NotImplementedError


class _LocationScale(Likelihood):
    """Gaussian / Laplace with a fixed, global or per-channel scale on the decoder's mean."""

    def __init__(
        self,
        sigma: float,
        learn: Literal["none", "global", "channel"] = "none",
        channels: int = 1,
        min_log_scale: float = -7.0,
    ):
        super().__init__()
        self.learn, self.min_log_scale = learn, min_log_scale
        if learn == "none":
            self.register_buffer("log_sigma", torch.tensor([math.log(sigma)]), persistent=False)
        else:
            n = 1 if learn == "global" else channels
            self.log_sigma = nn.Parameter(torch.full((n,), math.log(sigma)))

    def log_scale(self) -> Tensor:
        # (1 or C,) -> (1 or C, 1, 1), broadcasts against (..., C, H, W)
        return self.log_sigma.clamp(min=self.min_log_scale)[:, None, None]

    def mean(self, params: Tensor) -> Tensor:
        return params.clamp(0.0, 1.0)


class Gaussian(_LocationScale):
    """N(x; x_hat, sigma^2), the L2 distortion with lambda = 1 / sigma^2.

    Lecture "Decoding with L_2 Distortion": Q(y|z) ∝ exp(-||y - y_hat(z)||^2 / (2 sigma^2)),
    i.e. -ln Q(y|z) = lambda/2 ||y - y_hat||^2 + D (ln sigma + ln(2 pi)/2).
    """

    @property
    def precision(self) -> Tensor:
        """lambda = 1 / sigma^2 of the lecture's RD objective (per channel if learned so)."""
        return torch.exp(-2 * self.log_scale()).flatten()

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        log_s = self.log_scale().to(params.dtype)
        sq = ((x - params) * torch.exp(-log_s)) ** 2
        return (-0.5 * sq - log_s - 0.5 * LOG_2PI).sum(EVENT_DIMS)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        eps = noise("normal", params.shape, params, generator)
        return params + torch.exp(self.log_scale().to(params.dtype)) * eps


class Laplace(_LocationScale):
    """Laplace(x; x_hat, b): the L1 distortion of the lecture's "Why Blurry?" slide."""

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        log_b = self.log_scale().to(params.dtype)
        return (-(x - params).abs() * torch.exp(-log_b) - log_b - math.log(2)).sum(EVENT_DIMS)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        u = noise("uniform", params.shape, params, generator)
        u = (u - 0.5).clamp(-0.5 + 1e-7, 0.5 - 1e-7)
        # inverse CDF: x = mu - b sgn(u) ln(1 - 2|u|)
        return params - torch.exp(self.log_scale().to(params.dtype)) * u.sign() * torch.log1p(
            -2 * u.abs()
        )


class Bernoulli(Likelihood):
    """Bernoulli(x; sigmoid(logits)) for binarized images (x in {0, 1}).

    ``max_logit > 0`` clamps the logits to [-max_logit, max_logit], so no pixel costs more than
    ln(1 + e^max_logit) nats (ln 512 for max_logit = ln 511: the [1/512, 1 - 1/512] probability
    clamp of the VampPrior code). Still a normalised Bernoulli; 0 leaves the logits free.
    """

    discrete = True

    def __init__(self, max_logit: float = 0.0):
        super().__init__()
        self.max_logit = max_logit

    def _logits(self, params: Tensor) -> Tensor:
        m = self.max_logit
        return params.clamp(-m, m) if m > 0 else params

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        logits = self._logits(params)
        x = x.expand_as(logits)
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(EVENT_DIMS)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(self._logits(params))

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return (noise("uniform", params.shape, params, generator) < self.mean(params)).to(
            params.dtype
        )


def _log1mexp(a: Tensor) -> Tensor:
    """ln(1 - e^a) for a < 0 (Maechler 2012)."""
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


class _Discretized(Likelihood):
    """A continuous location-scale law binned onto the 256 values k/255 of 8-bit data.

    Bin k covers [k/255 - 1/510, k/255 + 1/510]; bin 0 extends to -inf and bin 255 to +inf, so
    the 256 masses sum to 1 and bits/dim are those of a real 8-bit code (Salimans et al. 2017,
    PixelCNN++). Params ``(..., 2C, H, W)``: location then log-scale. ``x`` is snapped to the
    nearest k/255.
    """

    params_per_channel = 2
    discrete = True

    def __init__(self, min_log_scale: float = -7.0):
        super().__init__()
        self.min_log_scale = min_log_scale

    def _log_cdf(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_pdf(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _standard_sample(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """(..., 2C, H, W) -> location (..., C, H, W), clamped log-scale (..., C, H, W)."""
        mu, log_s = params.chunk(2, dim=-3)
        return mu, log_s.clamp(min=self.min_log_scale)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        mu, log_s = self.split(params)
        inv_s = torch.exp(-log_s)
        # edges (k +- 1/2) / 255 computed from the bin index, so neighbouring bins share the
        # exact same float edge and the 256 masses telescope to 1 even for tiny scales
        k = torch.round(x * (BINS - 1))
        plus = ((k + 0.5) / (BINS - 1) - mu) * inv_s  # standardized upper bin edge
        minus = ((k - 0.5) / (BINS - 1) - mu) * inv_s  # standardized lower bin edge
        # ln(F(plus) - F(minus)); for a symmetric law flip to the lower tail where ln F is precise
        flip = (plus + minus) > 0
        a = torch.where(flip, -minus, plus)
        b = torch.where(flip, -plus, minus)
        log_fa = self._log_cdf(a)
        d = (self._log_cdf(b) - log_fa).clamp(max=-1e-12)
        log_mass = log_fa + _log1mexp(d)
        # bins narrow against the scale: midpoint rule, ln p(mid) + ln(width / s)
        mid = self._log_pdf(0.5 * (plus + minus)) + math.log(2 * HALF_BIN) - log_s
        log_mass = torch.where(d > -1e-3, mid, log_mass)
        log_p = torch.where(
            k <= 0,
            self._log_cdf(plus),  # bin 0 takes the lower tail
            torch.where(k >= BINS - 1, self._log_cdf(-minus), log_mass),  # bin 255: upper tail
        )
        return log_p.sum(EVENT_DIMS)

    def mean(self, params: Tensor) -> Tensor:
        return self.split(params)[0].clamp(0.0, 1.0)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mu, log_s = self.split(params)
        x = mu + torch.exp(log_s) * self._standard_sample(mu, generator)
        return torch.round(x.clamp(0.0, 1.0) * (BINS - 1)) / (BINS - 1)


class DiscretizedLogistic(_Discretized):
    """Discretized logistic, F(u) = sigmoid(u)."""

    def _log_cdf(self, u: Tensor) -> Tensor:
        return F.logsigmoid(u)

    def _log_pdf(self, u: Tensor) -> Tensor:
        return -u - 2 * F.softplus(-u)

    def _standard_sample(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        u = noise("uniform", like.shape, like, generator)
        u = u.clamp(1e-6, 1 - 1e-6)
        return torch.log(u) - torch.log1p(-u)


class DiscretizedGaussian(_Discretized):
    """Discretized Gaussian, F(u) = Phi(u)."""

    def _log_cdf(self, u: Tensor) -> Tensor:
        return torch.special.log_ndtr(u)

    def _log_pdf(self, u: Tensor) -> Tensor:
        return -0.5 * u**2 - 0.5 * LOG_2PI

    def _standard_sample(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        return noise("normal", like.shape, like, generator)


def make_likelihood(
    name: str,
    *,
    sigma: float = 0.1,
    learn_sigma: Literal["none", "global", "channel"] = "none",
    channels: int = 1,
    min_log_scale: float = -7.0,
    max_logit: float = 0.0,
) -> Likelihood:
    """The likelihood named by ``ModelConfig.likelihood``.

    Raises:
        ValueError: unknown name.
    """
    if name == "gaussian":
        return Gaussian(sigma, learn_sigma, channels, min_log_scale)
    if name == "laplace":
        return Laplace(sigma, learn_sigma, channels, min_log_scale)
    if name == "bernoulli":
        return Bernoulli(max_logit)
    if name == "discretized_logistic":
        return DiscretizedLogistic(min_log_scale)
    if name == "discretized_gaussian":
        return DiscretizedGaussian(min_log_scale)
    raise ValueError(f"unknown likelihood {name!r}")
