"""Objective math against closed forms: KL, the two ELBO forms, a linear-Gaussian VAE, IWAE."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from pipeline.model import (
    VAE,
    DiagonalGaussian,
    DiscretizedGaussian,
    DiscretizedLogistic,
    ModelConfig,
    bits_per_dim,
    elbo_analytic,
    elbo_mc,
    elbo_terms,
    evaluate,
    iwae_bound,
    iwae_terms,
    kl_warmup,
    prior_log_prob,
    psnr,
    training_terms,
)

# --- posterior ----------------------------------------------------------------------------


def test_analytic_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 8, generator=g, dtype=torch.float64)
    logvar = torch.randn(4, 8, generator=g, dtype=torch.float64)
    q = DiagonalGaussian(mu, logvar)
    n = 20_000
    z = q.sample(n, generator=g)  # (n, 4, 8)
    log_ratio = q.log_prob(z) - prior_log_prob(z, 1)  # (n, 4)
    mc, se = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(n)
    assert torch.all((mc - q.kl()).abs() < 4 * se), (mc, q.kl(), se)
    neg_lq = -q.log_prob(z)
    assert torch.all((neg_lq.mean(0) - q.entropy()).abs() < 4 * neg_lq.std(0) / math.sqrt(n))
    ref = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    std_normal = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(q.log_prob(z[:3]), ref.log_prob(z[:3]).sum(-1))
    assert torch.allclose(q.entropy(), ref.entropy().sum(-1))
    assert torch.allclose(q.kl(), torch.distributions.kl_divergence(ref, std_normal).sum(-1))


def test_logvar_is_clamped():
    q = DiagonalGaussian(torch.zeros(1, 3), torch.tensor([[-100.0, 0.0, 100.0]]), (-5.0, 4.0))
    assert q.logvar.tolist() == [[-5.0, 0.0, 4.0]]


def test_two_elbo_forms_agree():
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=8, channels=[4], blocks_per_stage=1, latent_dim=4)
    model = VAE.from_config(cfg).double().eval()
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.3, dtype=torch.float64))
    with torch.no_grad():
        a, se_a = elbo_mc(model, x, 4000, torch.Generator().manual_seed(1))
        b, se_b = elbo_analytic(model, x, 4000, torch.Generator().manual_seed(2))
    # lecture "Derivation of Equivalence II": E ln Q(z, y) + H = E ln Q(y|z) - KL(P_Psi, P_Phi)
    assert torch.all((a - b).abs() < 4 * torch.sqrt(se_a**2 + se_b**2)), (a, b, se_a, se_b)
    assert torch.all(se_a < 0.1) and torch.all(se_b < 0.1)


# --- linear-Gaussian VAE (probabilistic PCA) -----------------------------------------------
# z ~ N(0, I_d), y = W z + b + N(0, s^2 I_D), W with orthogonal columns so the exact
# posterior N(M^-1 W^T (y - b), s^2 M^-1), M = W^T W + s^2 I, is diagonal.

D_SIDE, SIGMA = 4, 0.5
SCALES = torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=torch.float64)  # last unit unused


class LinearEncoder(nn.Module):
    def __init__(self, A: Tensor, b: Tensor, logvar: Tensor):
        super().__init__()
        self.A, self.b, self.lv = nn.Parameter(A), nn.Parameter(b), nn.Parameter(logvar)

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        mu = (y.flatten(1) - self.b) @ self.A.T  # (B, D) -> (B, d)
        return mu, self.lv.expand_as(mu)


class LinearDecoder(nn.Module):
    def __init__(self, W: Tensor, b: Tensor):
        super().__init__()
        self.W, self.b = nn.Parameter(W), nn.Parameter(b)

    def forward(self, z: Tensor) -> Tensor:
        return (z @ self.W.T + self.b).view(-1, 1, D_SIDE, D_SIDE)  # (B, d) -> (B, 1, 4, 4)


def linear_gaussian(mean_shift: float = 0.0, var_factor: float = 1.0):
    """(model, exact posterior (A, logvar), W, b); encoder is exact when shift 0, factor 1."""
    g = torch.Generator().manual_seed(0)
    n_dim, d = D_SIDE * D_SIDE, len(SCALES)
    Q, _ = torch.linalg.qr(torch.randn(n_dim, d, generator=g, dtype=torch.float64))
    W = Q * SCALES  # (D, d), W^T W = diag(SCALES^2)
    b = 0.3 * torch.randn(n_dim, generator=g, dtype=torch.float64)
    m = SCALES**2 + SIGMA**2  # diagonal of M
    A = W.T / m[:, None]  # M^-1 W^T
    logvar = torch.log(SIGMA**2 / m)
    shift = mean_shift * torch.randn(d, n_dim, generator=g, dtype=torch.float64) / math.sqrt(n_dim)
    cfg = ModelConfig(
        image_size=D_SIDE,
        channels=[1],
        blocks_per_stage=0,
        latent_dim=d,
        likelihood="gaussian",
        sigma=SIGMA,
    )
    enc = LinearEncoder(A + shift, b.clone(), logvar + math.log(var_factor))
    model = VAE(cfg, encoder=enc, decoder=LinearDecoder(W, b)).double().eval()
    return model, (A, logvar), W, b


def exact_log_evidence(y: Tensor, W: Tensor, b: Tensor) -> Tensor:
    cov = W @ W.T + SIGMA**2 * torch.eye(W.shape[0], dtype=W.dtype)  # ln N(y; b, W W^T + s^2 I)
    return torch.distributions.MultivariateNormal(b, cov).log_prob(y.flatten(1))


def kl_to_exact_posterior(model: VAE, y: Tensor, A: Tensor, logvar: Tensor) -> Tensor:
    q = model.encode(y)
    mu_p = (y.flatten(1) - model.decoder.b) @ A.T
    var_p = torch.exp(logvar)
    return 0.5 * (q.var / var_p + (q.mu - mu_p) ** 2 / var_p - 1 + logvar - q.logvar).sum(1)


def data(W: Tensor, b: Tensor, n: int = 64) -> Tensor:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, W.shape[1], generator=g, dtype=torch.float64)
    eps = torch.randn(n, W.shape[0], generator=g, dtype=torch.float64)
    return (z @ W.T + b + SIGMA * eps).view(n, 1, D_SIDE, D_SIDE)


@torch.no_grad()
def test_linear_gaussian_elbo_below_exact_by_posterior_kl():
    model, (A, logvar), W, b = linear_gaussian(mean_shift=0.3, var_factor=1.6)
    y = data(W, b)
    exact = exact_log_evidence(y, W, b)
    elbo, se = elbo_analytic(model, y, 2000, torch.Generator().manual_seed(0))
    kl = kl_to_exact_posterior(model, y, A, logvar)
    assert torch.all(elbo < exact)
    assert float(kl.mean()) > 0.5  # a real gap: measured 0.70 nats
    # Lecture "Derivation of Equivalence II": ELBO = ln Q(y) - KL(P_Psi(z|y), Q_Phi(z|y))
    assert torch.all((elbo - (exact - kl)).abs() < 4 * se + 1e-9)


@torch.no_grad()
def test_iwae_increases_with_k_and_reaches_exact():
    model, (A, logvar), W, b = linear_gaussian(mean_shift=0.3, var_factor=1.6)
    y = data(W, b, 256)
    exact = exact_log_evidence(y, W, b)
    means = {}
    for k in (1, 10, 100, 1000):  # averaged over 256 points and 8 seeds
        runs = [
            iwae_bound(model, y, k, chunk=250, generator=torch.Generator().manual_seed(s))
            for s in range(8)
        ]
        means[k] = float(torch.stack(runs).mean())
    gaps = [float(exact.mean()) - means[k] for k in (1, 10, 100, 1000)]
    # measured gaps ln Q(y) - IWAE_k (nats): 0.84, 0.084, 0.0068, 0.0016
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] > -0.002, gaps
    assert abs(gaps[3]) < 0.005, gaps
    out = evaluate(
        model,
        [y[:128], (y[128:], None)],
        k=1000,
        chunk=500,
        generator=torch.Generator().manual_seed(0),
    )
    assert out["n_images"] == 256 and out["latent_units"] == 4
    assert abs(out["nll_iwae"] + float(exact.mean())) < 0.005  # measured 0.0015
    kl = float(kl_to_exact_posterior(model, y, A, logvar).mean())
    assert abs(out["gap"] - kl) < 0.01  # IWAE - ELBO estimates KL(P_Psi(z|y), Q_Phi(z|y))
    assert out["bits_per_dim"] == pytest.approx(
        (out["nll_iwae"] + 16 * math.log(255)) / (16 * math.log(2))
    )


@torch.no_grad()
def test_exact_posterior_closes_the_gap():
    model, _, W, b = linear_gaussian()
    y = data(W, b)
    exact = exact_log_evidence(y, W, b)
    g = torch.Generator().manual_seed(0)
    # every log weight ln Q(z, y) - ln P_Psi(z|y) equals ln Q(y): zero-variance estimates
    mc, se = elbo_mc(model, y, 5, g)
    assert float((mc - exact).abs().max()) < 1e-4 and float(se.max()) < 1e-6
    assert float((iwae_bound(model, y, 5, generator=g) - exact).abs().max()) < 1e-4
    out = evaluate(model, [y], k=10, generator=g)
    assert abs(out["gap"]) < 1e-4 and abs(out["nll_iwae"] + float(exact.mean())) < 1e-4
    # Cov_y(E[z|y]) = s^2 / (s^2 + sigma^2) = 0.94, 0.8, 0.5, 0: the unused 4th unit is inactive
    assert out["active_units"] == 3 and out["latent_units"] == 4
    # the second form still carries Monte-Carlo noise in E ln Q(y|z); unbiased around exact
    an, se = elbo_analytic(model, y, 2000, g)
    assert torch.all((an - exact).abs() < 4 * se)


# --- the IWAE bound as a training objective ------------------------------------------------


def test_iwae_objective_with_one_draw_is_the_elbo_loss():
    model, _, W, b = linear_gaussian(mean_shift=0.3, var_factor=1.6)
    y = data(W, b, 32)
    # K = 1: ln w = ln Q(y, z) - ln P_Psi(z|y) on one draw, the ELBO's first form, exactly
    t = iwae_terms(model, y, 1, generator=torch.Generator().manual_seed(5))
    mc, _ = elbo_mc(model, y, 1, torch.Generator().manual_seed(5))
    assert torch.allclose(t["loss"], -mc.mean(), rtol=0, atol=1e-10)
    assert torch.allclose(t["neg_iwae"], t["loss"].detach())
    # ... and in expectation the closed-form-KL ELBO loss that elbo_terms trains on
    runs = torch.stack(
        [
            iwae_terms(model, y, 1, generator=torch.Generator().manual_seed(s))["loss"].detach()
            for s in range(400)
        ]
    )
    ref = elbo_terms(model, y, n_samples=4000, generator=torch.Generator().manual_seed(0))
    se = runs.std() / math.sqrt(len(runs))
    assert abs(float(runs.mean() - ref["loss"].detach())) < 4 * float(se) + 1e-3, (runs.mean(), ref)
    # the reported parts are elbo_terms' (second ELBO form, KL in closed form)
    assert torch.allclose(t["rate"], model.encode(y).kl().mean())
    assert torch.allclose(t["neg_elbo"], t["rate"] + t["distortion"])
    # training_terms dispatches on optim.objective
    same = training_terms(
        model, y, objective="iwae", iwae_k=1, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(same["loss"], t["loss"])
    with pytest.raises(ValueError, match="objective must be"):
        training_terms(model, y, objective="vi")


def test_iwae_objective_is_between_exact_nll_and_elbo_loss_and_trains_the_encoder():
    model, _, W, b = linear_gaussian(mean_shift=0.3, var_factor=1.6)
    y = data(W, b, 128)
    exact = float(exact_log_evidence(y, W, b).mean())
    means = {}
    for k in (1, 5, 50):  # Burda et al. 2015, thm. 1: -ln Q(y) <= E[-L_k] <= E[-L_1]
        with torch.no_grad():
            runs = [
                float(iwae_terms(model, y, k, generator=torch.Generator().manual_seed(s))["loss"])
                for s in range(16)
            ]
        means[k] = sum(runs) / len(runs)
    assert means[1] > means[5] > means[50] > -exact, (means, -exact)
    assert means[1] + exact > 0.5 and means[50] + exact < 0.1, (means, -exact)
    # the exact posterior: every log weight is ln Q(y), so -L_k = -ln Q(y) for any k
    exact_model, _, _, _ = linear_gaussian()
    with torch.no_grad():
        t = iwae_terms(exact_model, y, 7, generator=torch.Generator().manual_seed(0))
    assert abs(float(t["loss"]) + exact) < 1e-6
    # gradients reach the encoder through the reparameterized draws
    model.zero_grad()
    iwae_terms(model, y, 5, generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert (
        float(model.encoder.A.grad.abs().sum()) > 0 and float(model.encoder.lv.grad.abs().sum()) > 0
    )
    # kl_weight weighs ln P(z) - ln P_Psi(z|y) inside the weights: 0 leaves the distortion alone
    with torch.no_grad():
        t0 = iwae_terms(model, y, 1, kl_weight=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(t0["loss"], t0["distortion"])


@pytest.mark.parametrize(
    ("optim", "message"),
    [
        ({"objective": "iwea"}, r"^optim\.objective: expected one of 'elbo', 'iwae'"),
        ({"objective": "iwae", "iwae_train_k": 0}, r"^optim\.iwae_train_k: must be >= 1"),
        ({"iwae_train_k": 5}, r"^optim\.iwae_train_k: only for objective 'iwae'"),
        ({"objective": "iwae", "free_bits": 0.5}, r"^optim\.free_bits: only for objective 'elbo'"),
    ],
)
def test_objective_config_errors_name_the_key(optim, message):
    from pipeline.errors import ConfigError
    from pipeline.train.config import TrainJob
    from pipeline.typed import build

    job = {"data": {"train_url": "x/train"}, "optim": optim}
    with pytest.raises(ConfigError, match=message):
        build(TrainJob, job)
    ok = build(TrainJob, {**job, "optim": {"objective": "iwae", "iwae_train_k": 5}})
    assert (ok.optim.objective, ok.optim.iwae_train_k) == ("iwae", 5)
    # the worker's loss module trains on what optim.objective names
    from pipeline.train.step import Objective

    model, _, W, b = linear_gaussian(mean_shift=0.3)
    y = data(W, b, 8)
    loss = Objective(model, ok.optim.objective, ok.optim.iwae_train_k)
    out = loss(y, 1.0, 0.0, torch.Generator().manual_seed(0))
    ref = iwae_terms(model, y, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["loss"], ref["loss"]) and "neg_iwae" not in Objective(model)(y, 1.0, 0.0)


# --- objective pieces ---------------------------------------------------------------------


def test_elbo_terms_units_free_bits_and_warmup():
    torch.manual_seed(0)
    cfg = ModelConfig(
        image_size=8,
        channels=[4],
        latent="spatial",
        latent_channels=3,
        likelihood="discretized_logistic",
    )
    model = VAE.from_config(cfg)
    x = torch.round(torch.rand(5, 1, 8, 8) * 255) / 255
    t = elbo_terms(model, x, generator=torch.Generator().manual_seed(0))
    assert t["rate_per_group"].shape == (3,)  # one group per latent channel
    assert torch.allclose(t["rate"], t["rate_per_group"].sum())
    assert torch.allclose(t["neg_elbo"], t["rate"] + t["distortion"])
    assert torch.allclose(t["loss"].detach(), t["neg_elbo"])
    assert torch.allclose(t["rate_bits"], t["rate"] / math.log(2))
    assert torch.allclose(t["bits_per_dim"], t["neg_elbo"] / (64 * math.log(2)))
    fb = 10.0  # every channel's batch-mean KL is below 10 nats -> rate term = 3 * 10
    assert float(t["rate_per_group"].max()) < fb
    t = elbo_terms(
        model, x, kl_weight=0.5, free_bits=fb, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(t["loss"].detach(), t["distortion"] + 0.5 * 3 * fb)
    assert [kl_warmup(s, 100) for s in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0]
    assert kl_warmup(7, 0) == 1.0
    assert bits_per_dim(64 * math.log(2), 64) == pytest.approx(1.0)
    x = torch.full((2, 3, 4, 4), 0.5)
    assert torch.allclose(psnr(x, x + 0.1), torch.full((2,), 20.0, dtype=x.dtype))


# --- discretized likelihoods --------------------------------------------------------------


@pytest.mark.parametrize("cls", [DiscretizedLogistic, DiscretizedGaussian])
def test_discretized_likelihood_sums_to_one(cls):
    lik = cls()
    grid = torch.arange(256, dtype=torch.float32) / 255  # all 8-bit values
    for mu in (-0.2, 0.0, 0.3, 0.5, 0.999, 1.0, 1.3):
        for log_s in (-7.0, -6.0, -4.0, -2.0, -1.0, 0.0, 1.0):
            params = torch.tensor([mu, log_s]).view(1, 2, 1, 1).expand(256, 2, 1, 1)
            lp = lik.log_prob(grid.view(256, 1, 1, 1), params)  # (256,)
            assert torch.isfinite(lp).all()
            assert abs(float(lp.exp().sum()) - 1.0) < 1e-5, (mu, log_s)


def test_discretized_mass_matches_cdf_difference():
    x = torch.tensor([0.0, 10 / 255, 128 / 255, 1.0], dtype=torch.float64).view(4, 1, 1, 1)
    mu, s = 0.45, 0.2
    params = (
        torch.tensor([mu, math.log(s)], dtype=torch.float64).view(1, 2, 1, 1).expand(4, 2, 1, 1)
    )
    h = 0.5 / 255
    normal = torch.distributions.Normal(mu, s)
    hi = torch.where(x >= 1, torch.tensor(1.0, dtype=torch.float64), normal.cdf(x + h))
    lo = torch.where(x <= 0, torch.tensor(0.0, dtype=torch.float64), normal.cdf(x - h))
    expected = torch.log(hi - lo).flatten()
    assert torch.allclose(DiscretizedGaussian().log_prob(x, params), expected, atol=1e-9)
    sig = torch.sigmoid
    hi = torch.where(x >= 1, torch.tensor(1.0, dtype=torch.float64), sig((x + h - mu) / s))
    lo = torch.where(x <= 0, torch.tensor(0.0, dtype=torch.float64), sig((x - h - mu) / s))
    assert torch.allclose(DiscretizedLogistic().log_prob(x, params), torch.log(hi - lo).flatten())
