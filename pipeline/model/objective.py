"""Training objective and evaluation: rate, distortion, ELBO (both lecture forms), IWAE
(as an estimate and as a training loss).

All values are per image in nats unless named ``*_bits`` or ``bits_per_dim``. Notation of the
lecture (TTIC 31230, "Variational Autoencoders"): y image, z latent, P_Psi(z|y) encoder,
Q_Phi(z, y) = P_Phi(z) Q_Phi(y|z) generative model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .vae import VAE, DiagonalGaussian

LN2 = math.log(2)


def bits_per_dim(nats: Tensor | float, num_dims: int) -> Tensor | float:
    """nats per image -> bits per dimension, nats / (ln 2 * C*H*W)."""
    return nats / (LN2 * num_dims)


def kl_warmup(step: int, warmup_steps: int) -> float:
    """Linear KL weight schedule 0 -> 1 over ``warmup_steps`` (Bowman et al. 2016); 1 if 0."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / warmup_steps))


def _num_dims(x: Tensor) -> int:
    return x[0].numel()


def _sample_terms(
    model: VAE,
    x: Tensor,
    posterior: DiagonalGaussian,
    k: int,
    chunk: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """ln Q(y|z), ln P_Phi(z), ln P_Psi(z|y) for k draws z ~ P_Psi(z|y); each (k, B)."""
    log_px, log_pz, log_qz = [], [], []
    # default chunk: about 2**20 decoded pixels per call
    step = max(1, 2**20 // x.numel()) if chunk is None else max(1, chunk)
    for start in range(0, k, step):
        z = posterior.rsample(min(step, k - start), generator)  # (k', B, *latent)
        log_px.append(model.likelihood.log_prob(x, model.decode(z)))
        log_pz.append(model.prior_log_prob(z))
        log_qz.append(posterior.log_prob(z))
    return torch.cat(log_px), torch.cat(log_pz), torch.cat(log_qz)


def _mean_and_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    # (k, B) -> (B,), (B,); stderr 0 for k == 1
    n = samples.shape[0]
    std = samples.std(0) if n > 1 else torch.zeros_like(samples[0])
    return samples.mean(0), std / math.sqrt(n)


def elbo_mc(
    model: VAE, x: Tensor, n_samples: int = 1, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """First ELBO form, all by Monte Carlo: E_z[ln Q_Phi(z, y) - ln P_Psi(z|y)].

    Lecture "Variational Autoencoders": ELBO = E_{z~P_Psi(z|y)} ln Q_Phi(z, y) + H(P_Psi(z|y)),
    with H = E_eps[-ln P_Psi(z(y, eps)|y)] (lecture "The Reparameterization Trick").

    Returns:
        (estimate, standard error), each (B,) nats.
    """
    posterior = model.encode(x)
    log_px, log_pz, log_qz = _sample_terms(model, x, posterior, n_samples, generator=generator)
    return _mean_and_stderr(log_pz + log_px - log_qz)  # ln Q(z, y) - ln P_Psi(z|y)


def elbo_analytic(
    model: VAE, x: Tensor, n_samples: int = 1, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Second ELBO form: E_z[ln Q_Phi(y|z)] - KL(P_Psi(z|y), P_Phi(z)), KL in closed form.

    Equal to the first form since ln Q(z, y) = ln P(z) + ln Q(y|z) and
    E[ln P(z)] + H(P_Psi) = -KL(P_Psi, P_Phi) (lecture "Decoding with L_2 Distortion").

    Returns:
        (estimate, standard error), each (B,) nats.
    """
    posterior = model.encode(x)
    log_px, _, _ = _sample_terms(model, x, posterior, n_samples, generator=generator)
    mean, stderr = _mean_and_stderr(log_px)
    return mean - posterior.kl(), stderr


def iwae_bound(
    model: VAE,
    x: Tensor,
    k: int,
    chunk: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Importance-weighted estimate of ln Q_Phi(y), (B,) nats (Burda et al. 2015, eq. 8).

    L_k = E[ln (1/k) sum_i Q_Phi(z_i, y) / P_Psi(z_i|y)] <= ln Q_Phi(y), non-decreasing in k
    and converging to ln Q_Phi(y). Draws are decoded ``chunk`` at a time; only the (k, B) log
    weights are kept, combined by logsumexp.
    """
    posterior = model.encode(x)
    log_px, log_pz, log_qz = _sample_terms(model, x, posterior, k, chunk, generator)
    log_w = log_pz + log_px - log_qz  # (k, B)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


def elbo_terms(
    model: VAE,
    x: Tensor,
    *,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Training loss and its parts for a batch x (B, C, H, W) in [0, 1].

    VAE (lecture "Soft EM is to Hard EM as VAE is to Rate-Distortion"):
        min E_{y,eps} |z|_Phi + lambda/2 ||y - y_hat(z)||^2 - |z|_{Psi,y}
    where distortion = -ln Q(y|z) (lambda = 1/sigma^2 lives in the Gaussian likelihood) and
    rate = E[|z|_Phi - |z|_{Psi,y}] = KL(P_Psi(z|y), P_Phi(z)), taken in closed form.
    ``loss = distortion + kl_weight * max(free_bits, KL_g)`` summed over latent groups g
    (flat: each unit; spatial: each channel), with KL_g averaged over the batch first
    (free bits, Kingma et al. 2016, IAF appendix C.8).

    RD mode (deterministic encoder), lecture "RD:": min E_y |z(y)|_Phi + lambda/2 ||y - y_hat||^2
    with z = mu and rate = -ln P_Phi(mu), the code length of z under the prior (a density, so a
    code length up to the quantisation constant); ``free_bits`` is ignored.

    Returns:
        ``loss`` (scalar with grad), and detached batch means: ``distortion``, ``rate``,
        ``neg_elbo`` (nats/image), ``neg_elbo_bits``, ``rate_bits``, ``distortion_bits``,
        ``bits_per_dim`` (8-bit honest, see ``Likelihood.dequantization_nats_per_dim``),
        ``rate_per_group`` (G,) nats and ``kl_weight``.
    """
    posterior = model.encode(x)
    z = posterior.rsample(n_samples, generator)  # (S, B, *latent)
    distortion = -model.likelihood.log_prob(x, model.decode(z)).mean(0)  # (B,)
    if posterior.deterministic:
        rate = -model.prior_log_prob(z[0])  # |z|_Phi * ln 2, (B,)
        rate_groups = rate[:, None]
        rate_loss = rate.mean()
    else:
        kl_units = posterior.kl_per_unit()  # (B, D) or (B, C_z, h, w)
        groups = kl_units if kl_units.dim() == 2 else kl_units.flatten(2).sum(-1)  # (B, G)
        rate = groups.sum(1)
        rate_groups = groups
        rate_loss = groups.mean(0).clamp(min=free_bits).sum()
    loss = distortion.mean() + kl_weight * rate_loss
    neg_elbo = (distortion + rate).mean().detach()
    dims = _num_dims(x)
    honest = neg_elbo + dims * model.likelihood.dequantization_nats_per_dim
    return {
        "loss": loss,
        "distortion": distortion.mean().detach(),
        "rate": rate.mean().detach(),
        "neg_elbo": neg_elbo,
        "neg_elbo_bits": neg_elbo / LN2,
        "rate_bits": rate.mean().detach() / LN2,  # E[|z|_Phi - |z|_{Psi,y}] in bits
        "distortion_bits": distortion.mean().detach() / LN2,
        "bits_per_dim": bits_per_dim(honest, dims),
        "rate_per_group": rate_groups.mean(0).detach(),
        "kl_weight": loss.new_tensor(float(kl_weight)).detach(),
    }


def iwae_terms(
    model: VAE,
    x: Tensor,
    k: int,
    *,
    kl_weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The importance-weighted bound as a training loss (Burda et al. 2015, eq. 8).

    ``loss = -mean_y L_k(y)``, L_k = ln (1/k) sum_i exp(ln w_i), with the log weights
    ln w_i = ln Q_Phi(y|z_i) + kl_weight (ln P_Phi(z_i) - ln P_Psi(z_i|y)), z_i ~ P_Psi(z|y):
    at ``kl_weight = 1`` the lecture's ln Q(y) estimate, L_1 <= L_k <= ln Q_Phi(y), and for
    k = 1 exactly the first ELBO form on the same draw (lecture "Variational Autoencoders").
    ``kl_weight < 1`` is KL warm-up applied inside the weights. Free bits have no meaning here.

    Returns:
        ``elbo_terms``' keys (``rate``/``distortion``/``neg_elbo`` in the second ELBO form, KL
        in closed form, averaged over the k draws) plus ``neg_iwae`` (nats/image, detached).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    posterior = model.encode(x)
    if posterior.deterministic:
        raise ValueError("the IWAE objective needs a stochastic encoder")
    z = posterior.rsample(k, generator)  # (k, B, *latent)
    log_px = model.likelihood.log_prob(x, model.decode(z))  # (k, B)
    log_ratio = model.prior_log_prob(z) - posterior.log_prob(z)  # ln P_Phi(z) - ln P_Psi(z|y)
    bound = torch.logsumexp(log_px + kl_weight * log_ratio, dim=0) - math.log(k)  # (B,)
    loss = -bound.mean()
    distortion = -log_px.mean(0).detach()
    groups = posterior.kl_per_unit().detach()
    groups = groups if groups.dim() == 2 else groups.flatten(2).sum(-1)  # (B, G)
    rate = groups.sum(1)
    neg_elbo = (distortion + rate).mean()
    dims = _num_dims(x)
    honest = neg_elbo + dims * model.likelihood.dequantization_nats_per_dim
    return {
        "loss": loss,
        "neg_iwae": loss.detach(),
        "distortion": distortion.mean(),
        "rate": rate.mean(),
        "neg_elbo": neg_elbo,
        "neg_elbo_bits": neg_elbo / LN2,
        "rate_bits": rate.mean() / LN2,
        "distortion_bits": distortion.mean() / LN2,
        "bits_per_dim": bits_per_dim(honest, dims),
        "rate_per_group": groups.mean(0),
        "kl_weight": loss.new_tensor(float(kl_weight)).detach(),
    }


def training_terms(
    model: VAE,
    x: Tensor,
    *,
    objective: str = "elbo",
    iwae_k: int = 1,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """``elbo_terms`` (``objective="elbo"``) or ``iwae_terms`` with ``iwae_k`` draws."""
    if objective == "elbo":
        return elbo_terms(model, x, kl_weight=kl_weight, free_bits=free_bits, generator=generator)
    if objective == "iwae":
        return iwae_terms(model, x, iwae_k, kl_weight=kl_weight, generator=generator)
    raise ValueError(f"objective must be 'elbo' or 'iwae', got {objective!r}")


def psnr(x: Tensor, x_hat: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image (B,) in dB for data in [0, 1]."""
    mse = ((x - x_hat) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return -10.0 * torch.log10(mse)


def images_of(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        return batch["image"]
    raise TypeError(
        f"a batch must be a tensor, (images, ...) or {{'image': ...}}, got {type(batch)}"
    )


@torch.no_grad()
def evaluate(
    model: VAE,
    batches: Iterable[Any],
    k: int = 100,
    *,
    chunk: int | None = None,
    active_threshold: float = 0.01,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Dataset-level metrics, averaged per image, with the model in eval mode.

    Args:
        batches: iterable of image tensors (B, C, H, W) in [0, 1] (or ``(images, labels)``).
        k: importance samples for the IWAE-k log-likelihood (also the ELBO's sample count).
        chunk: samples decoded at once inside the IWAE estimate (default: ~2**20 pixels).
        active_threshold: a latent unit is active if Cov_y(E[z|y]) > threshold (Burda et al.).

    Returns:
        ``neg_elbo`` (first form, k-sample average of the IWAE log weights), ``nll_iwae``
        (nats/image), ``gap`` = ln Q_k(y) - ELBO, an estimate of KL(P_Psi(z|y), Q_Phi(z|y))
        (lecture "Derivation of Equivalence II"; biased low by the IWAE-k gap), ``bits_per_dim``
        (IWAE), ``elbo_bits_per_dim``, ``rate``, ``distortion``, ``active_units``,
        ``latent_units``, ``psnr`` (dB, reconstruction from mu via the likelihood's mean) and
        ``n_images``. ``rate`` is the closed-form KL and ``distortion`` E[-ln Q(y|z)], whose sum
        is the second ELBO form (equal to ``neg_elbo`` in expectation). For a deterministic
        encoder the IWAE/ELBO keys are replaced by the RD objective ``rd_loss`` = rate +
        distortion, with rate = -ln P_Phi(mu).
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    mu_sum = mu_sq = None
    dims = 0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = images_of(batch).to(next(model.parameters()).device)
            dims = _num_dims(x)
            posterior = model.encode(x)
            mu = posterior.mode().flatten(1).double()  # (B, U)
            mu_sum = mu.sum(0) if mu_sum is None else mu_sum + mu.sum(0)
            mu_sq = (mu**2).sum(0) if mu_sq is None else mu_sq + (mu**2).sum(0)
            params = model.decode(posterior.mode())
            per_image: dict[str, Tensor] = {
                "psnr": psnr(x, model.likelihood.mean(params).clamp(0.0, 1.0))
            }
            if posterior.deterministic:
                per_image["rate"] = -model.prior_log_prob(posterior.mode())
                per_image["distortion"] = -model.likelihood.log_prob(x, params)
                per_image["rd_loss"] = per_image["rate"] + per_image["distortion"]
            else:
                log_px, log_pz, log_qz = _sample_terms(model, x, posterior, k, chunk, generator)
                log_w = log_pz + log_px - log_qz  # (k, B)
                # first ELBO form on the IWAE draws: the paired gap is >= 0 and exactly 0 when
                # P_Psi(z|y) = Q_Phi(z|y) (all log weights equal ln Q(y))
                elbo = log_w.mean(0)
                ll = torch.logsumexp(log_w, 0) - math.log(k)  # Burda et al. 2015, eq. 8
                kl = posterior.kl()
                per_image |= {
                    "neg_elbo": -elbo,
                    "nll_iwae": -ll,
                    "gap": ll - elbo,
                    "rate": kl,
                    "distortion": -log_px.mean(0),
                }
            for key, v in per_image.items():
                sums[key] = sums.get(key, 0.0) + float(v.double().sum())
            n += x.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got no batches")
    out = {key: v / n for key, v in sums.items()}
    offset = dims * model.likelihood.dequantization_nats_per_dim
    if "nll_iwae" in out:
        out["bits_per_dim"] = float(bits_per_dim(out["nll_iwae"] + offset, dims))
        out["elbo_bits_per_dim"] = float(bits_per_dim(out["neg_elbo"] + offset, dims))
    else:
        out["bits_per_dim"] = float(bits_per_dim(out["rd_loss"] + offset, dims))
    # Burda et al. 2015, sec. 5.2: unit u active if Cov_y(E_{z~P_Psi(z|y)}[z_u]) > 0.01
    var = mu_sq / n - (mu_sum / n) ** 2
    if n > 1:
        var = var * n / (n - 1)
    out["active_units"] = float((var > active_threshold).sum())
    out["latent_units"] = float(var.numel())
    out["n_images"] = float(n)
    return out
