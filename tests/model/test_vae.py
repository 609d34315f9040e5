"""Model modules: config validation, shapes, pixel shuffle, reparameterization, I/O, training."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.model import (
    PRESETS,
    VAE,
    Bernoulli,
    DiscretizedLogistic,
    Gaussian,
    Laplace,
    ModelConfig,
    PixelShuffleUpsample,
    build_model,
    depth_to_space,
    elbo_terms,
    load_model,
    load_weights,
    preset,
    save_weights,
    weights_metadata,
)
from pipeline.model.quality import binarize, bits_per_dim_8bit, fashion_mnist_nll, quantize_8bit


def tiny(name: str, **overrides) -> ModelConfig:
    """A preset with width-4 stages (or width-8 MLP layers) and one block each (fast on CPU)."""
    if PRESETS[name].get("arch") == "mlp":
        return preset(name, **{"hidden": [8, 8], **overrides})
    n = len(PRESETS[name]["channels"])
    return preset(name, **{"channels": [4] * n, "blocks_per_stage": 1, **overrides})


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (dict(image_size=28, channels=[8, 8, 8]), "image_size", "2**len(channels)=8, got 28"),
        (dict(sigma=0.0), "sigma", "> 0"),
        (dict(sigma=-1.0), "sigma", "> 0"),
        (dict(sigma=float("nan")), "sigma", "> 0"),
        (dict(channels=[]), "channels", "non-empty"),
        (dict(channels=[8, 0]), "channels", "> 0"),
        (dict(image_size=0), "image_size", "> 0"),
        (dict(image_size=True), "image_size", "int"),
        (dict(in_channels=-3), "in_channels", "> 0"),
        (dict(latent_dim=0), "latent_dim", "> 0"),
        (dict(latent_channels=0), "latent_channels", "> 0"),
        (dict(blocks_per_stage=-1), "blocks_per_stage", ">= 0"),
        (dict(latent="cube"), "latent", "flat"),
        (dict(norm="layer"), "norm", "group"),
        (dict(activation="tanh"), "activation", "silu"),
        (dict(likelihood="poisson"), "likelihood", "bernoulli"),
        (dict(learn_sigma="pixel"), "learn_sigma", "channel"),
        (dict(likelihood="bernoulli", learn_sigma="global"), "learn_sigma", "gaussian/laplace"),
        (dict(logvar_clamp=[1.0, -1.0]), "logvar_clamp", "low < high"),
        (dict(logvar_clamp=[1.0]), "logvar_clamp", "[low, high]"),
        (dict(deterministic_encoder="yes"), "deterministic_encoder", "bool"),
        (dict(arch="transformer"), "arch", "mlp"),
        (dict(max_logit=-1.0), "max_logit", ">= 0"),
        (dict(max_logit=float("inf")), "max_logit", ">= 0"),
        (dict(likelihood="gaussian", max_logit=5.0), "max_logit", "bernoulli"),
        (dict(arch="mlp", hidden=[]), "hidden", "non-empty"),
        (dict(arch="mlp", hidden=[300, -1]), "hidden", "> 0"),
        (dict(arch="mlp", latent="spatial"), "latent", "arch 'mlp' needs latent 'flat'"),
    ],
)
def test_config_error_names_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**overrides)
    assert info.value.key == key
    assert fragment in info.value.msg
    assert str(info.value).startswith(f"{key}: ")


def test_preset_and_build_model_errors_name_key():
    with pytest.raises(ConfigError) as info:
        preset("mnist1000")
    assert info.value.key == "preset"
    with pytest.raises(ConfigError) as info:
        build_model({"image_size": 28, "widths": [8]})
    assert info.value.key == "widths"
    with pytest.raises(ConfigError) as info:
        build_model({"image_size": 30})
    assert info.value.key == "image_size"


def test_presets_are_valid_and_round_trip_through_asdict():
    expect = {"mnist28": (28, 1, 2), "cifar32": (32, 3, 3), "64": (64, 3, 4), "256": (256, 3, 5)}
    for name, (size, c, n_down) in expect.items():
        cfg = preset(name)
        assert (cfg.image_size, cfg.in_channels, cfg.num_downsamples) == (size, c, n_down)
        assert ModelConfig(**asdict(cfg)) == cfg
        assert json.loads(json.dumps(asdict(cfg))) == asdict(cfg)
    assert ModelConfig(channels=(8, 16)).channels == [8, 16]
    mlp = preset("mnist28_mlp")
    assert (mlp.arch, mlp.hidden, mlp.latent_shape) == ("mlp", [300, 300], (40,))
    assert mlp.logvar_clamp == [-6.0, 2.0]  # the baseline's Hardtanh on the log-variance
    # ... and its [1/512, 1 - 1/512] pixel probabilities: a pixel costs at most ln 512 nats
    lik = VAE.from_config(mlp).likelihood
    x, wrong = torch.ones(2, 1, 28, 28), torch.full((2, 1, 28, 28), -100.0)
    assert torch.allclose(lik.log_prob(x, wrong), torch.full((2,), -784 * math.log(512)))
    assert float(lik.mean(wrong).min()) == pytest.approx(1 / 512)
    free = VAE.from_config(preset("mnist28")).likelihood  # unclamped: the full cost
    assert torch.allclose(free.log_prob(x, wrong), torch.full((2,), -784 * 100.0))
    assert ModelConfig(**asdict(mlp)) == mlp
    # the published baseline's size: 784-300-300-80 encoder, 40-300-300-784 decoder
    n_params = sum(p.numel() for p in VAE.from_config(mlp).parameters())
    assert n_params == (784 * 300 + 300) + (300 * 300 + 300) + (300 * 80 + 80) + (
        40 * 300 + 300
    ) + (300 * 300 + 300) + (300 * 784 + 784)
    assert ModelConfig(arch="mlp", image_size=30).image_size == 30  # no stride-2 constraint


# --- shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "latent_shape"),
    [
        ("mnist28", (32,)),
        ("mnist28_mlp", (40,)),
        ("cifar32", (16, 4, 4)),
        ("64", (16, 4, 4)),
        ("256", (16, 8, 8)),
    ],
)
def test_output_shapes(name, latent_shape):
    cfg = tiny(name)
    model = VAE.from_config(cfg).eval()
    s, c = cfg.image_size, cfg.in_channels
    x = torch.rand(2, c, s, s)
    posterior = model.encode(x)
    assert posterior.mu.shape == (2, *latent_shape) == posterior.logvar.shape
    k = model.likelihood.params_per_channel
    assert model.decode(posterior.rsample()).shape == (2, k * c, s, s)
    assert model.decode(posterior.rsample(3)).shape == (3, 2, k * c, s, s)
    params, _ = model(x)
    assert params.shape == (2, k * c, s, s)
    img = model.sample_prior(3, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert img.shape == (3, c, s, s)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace", "bernoulli", "discretized_gaussian"])
def test_decoder_channels_follow_likelihood(likelihood):
    cfg = tiny("mnist28", likelihood=likelihood, latent="spatial", latent_channels=3)
    model = VAE.from_config(cfg)
    params = model.decode(torch.zeros(5, 3, 7, 7))
    assert params.shape == (5, model.likelihood.params_per_channel, 28, 28)
    assert model.likelihood.params_per_channel == (2 if "discretized" in likelihood else 1)
    assert model.likelihood.sample(params).shape == (5, 1, 28, 28)


def test_deterministic_encoder_point_mass():
    cfg = tiny("cifar32", deterministic_encoder=True, likelihood="gaussian", sigma=0.2)
    model = VAE.from_config(cfg)
    x = torch.rand(3, 3, 32, 32)
    posterior = model.encode(x)
    assert posterior.deterministic and posterior.mu.shape == (3, 16, 4, 4)
    assert torch.equal(posterior.rsample(generator=torch.Generator().manual_seed(1)), posterior.mu)
    with pytest.raises(ValueError, match="deterministic"):
        posterior.kl()
    # Lecture "RD:": loss = |z|_Phi (nats) + lambda/2 ||y - y_hat||^2 + D ln(sigma sqrt(2 pi))
    terms = elbo_terms(model, x)
    x_hat = model.decode(posterior.mu)
    d = 3 * 32 * 32
    lam = 1 / 0.2**2
    l2 = 0.5 * lam * ((x - x_hat) ** 2).flatten(1).sum(1) + d * math.log(
        0.2 * math.sqrt(2 * math.pi)
    )
    code = 0.5 * (posterior.mu**2 + math.log(2 * math.pi)).flatten(1).sum(1)
    assert torch.allclose(terms["distortion"], l2.mean(), rtol=1e-5)
    assert torch.allclose(terms["rate"], code.mean(), rtol=1e-5)
    assert torch.allclose(terms["loss"], (l2 + code).mean(), rtol=1e-5)


# --- pixel shuffle ------------------------------------------------------------------------


def test_pixel_shuffle_matches_lecture_indexing():
    torch.manual_seed(0)
    c_in, c_out, h, w = 2, 3, 3, 4
    up = PixelShuffleUpsample(c_in, c_out, kernel_size=3)
    with torch.no_grad():  # break the ICNR symmetry so every sub-pixel is distinct
        up.conv.weight.normal_()
        up.conv.bias.normal_()
    y = torch.randn(1, c_in, h, w)
    out = up(y)
    assert out.shape == (1, c_out, 2 * h, 2 * w)
    W, B = up.conv.weight, up.conv.bias  # (4 C_out, C_in, 3, 3), (4 C_out,)
    y_pad = F.pad(y, (1, 1, 1, 1))[0]  # "same" padding: y[i + di - 1, j + dj - 1]
    expected = torch.zeros_like(out)
    for c in range(c_out):
        for i in range(h):
            for j in range(w):
                for si in range(2):
                    for sj in range(2):
                        # reshape: channel 4c + 2 si + sj of low-res pixel (i, j) -> (2i+si, 2j+sj)
                        ch = 4 * c + 2 * si + sj
                        # stride 1: x_hat[i,j,ch] = sum W'[di,dj,c_y,ch] y[i+di,j+dj,c_y] + B[ch]
                        acc = B[ch].clone()
                        for cy in range(c_in):
                            for di in range(3):
                                for dj in range(3):
                                    acc += W[ch, cy, di, dj] * y_pad[cy, i + di, j + dj]
                        expected[0, c, 2 * i + si, 2 * j + sj] = acc
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(out, F.pixel_shuffle(up.conv(y), 2))
    t = torch.randn(2, 12, 5, 6)
    assert torch.equal(depth_to_space(t, 2), F.pixel_shuffle(t, 2))


def test_pixel_shuffle_icnr_init_is_nearest_neighbour():
    up = PixelShuffleUpsample(3, 5)
    out = up(torch.randn(2, 3, 4, 4))
    assert torch.equal(out[..., 0::2, 0::2], out[..., 1::2, 1::2])
    assert torch.equal(out[..., 0::2, 1::2], out[..., 1::2, 0::2])


# --- reparameterization -------------------------------------------------------------------


def test_gradients_reach_encoder_through_rsample_only():
    torch.manual_seed(0)
    model = VAE.from_config(tiny("mnist28", likelihood="gaussian"))
    x = torch.rand(4, 1, 28, 28)
    head = model.encoder.head.weight
    posterior = model.encode(x)
    z = posterior.rsample(generator=torch.Generator().manual_seed(0))
    (-model.likelihood.log_prob(x, model.decode(z)).mean()).backward()  # distortion only
    assert head.grad is not None and float(head.grad.norm()) > 1e-3
    d = model.config.latent_dim
    assert float(head.grad[d:].norm()) > 1e-3  # logvar rows: only via sigma * eps
    model.zero_grad(set_to_none=True)
    posterior = model.encode(x)
    z = posterior.sample(generator=torch.Generator().manual_seed(0))
    (-model.likelihood.log_prob(x, model.decode(z)).mean()).backward()
    assert head.grad is None  # detached sample: no path back to the encoder


def test_mode_ignores_noise_and_rsample_uses_it():
    model = VAE.from_config(tiny("mnist28")).eval()
    x = torch.rand(3, 1, 28, 28)
    a, _ = model(x, sample_posterior=False, generator=torch.Generator().manual_seed(1))
    b, _ = model(x, sample_posterior=False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c, _ = model(x, generator=torch.Generator().manual_seed(1))
    d, _ = model(x, generator=torch.Generator().manual_seed(2))
    c2, _ = model(x, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(c, d) and torch.equal(c, c2)


# --- I/O ----------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact():
    torch.manual_seed(0)
    cfg = tiny("cifar32", norm="batch", likelihood="gaussian", learn_sigma="channel")
    model = VAE.from_config(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(4, 3, 32, 32)
    for _ in range(2):  # move weights, BN running stats and log_sigma off their init
        opt.zero_grad()
        elbo_terms(model, x)["loss"].backward()
        opt.step()
    meta = {"model_config": json.dumps(asdict(cfg))}
    data = save_weights(model, metadata=meta)
    assert isinstance(data, bytes) and not data.startswith(b"\x80")  # not a pickle
    assert weights_metadata(data) == meta
    state = load_weights(data)
    ref = model.state_dict()
    assert state.keys() == ref.keys() and "likelihood.log_sigma" in state
    assert "encoder.stages.0.1.body.0.running_mean" in state
    for key, value in ref.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    clone = load_model(json.loads(weights_metadata(data)["model_config"]), data)
    model.eval()
    g = torch.Generator().manual_seed(3)
    a, _ = model(x, generator=g)
    b, _ = clone(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(model.encode(x).logvar, clone.encode(x).logvar)


def test_mlp_save_load_round_trip_is_exact():
    torch.manual_seed(0)
    cfg = tiny("mnist28_mlp", likelihood="discretized_logistic", max_logit=0.0)
    model = VAE.from_config(cfg).eval()
    data = save_weights(model, metadata={"model_config": json.dumps(asdict(cfg))})
    clone = load_model(json.loads(weights_metadata(data)["model_config"]), data).eval()
    assert isinstance(clone.decoder, type(model.decoder)) and clone.config.arch == "mlp"
    x = torch.rand(3, 1, 28, 28)
    a, _ = model(x, generator=torch.Generator().manual_seed(1))
    b, _ = clone(x, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 2, 28, 28) and torch.equal(a, b)


# --- training -----------------------------------------------------------------------------


def test_training_lowers_loss():
    torch.manual_seed(0)
    cfg = ModelConfig(
        image_size=16,
        channels=[8, 16],
        blocks_per_stage=1,
        latent="flat",
        latent_dim=8,
        likelihood="bernoulli",
    )
    model = VAE.from_config(cfg)
    # 16 blobs at random centres: structured data the latent can encode
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(16, 2, generator=g) * 10 + 3
    grid = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij"))
    d2 = ((grid[None] - centres[:, :, None, None]) ** 2).sum(1, keepdim=True)
    x = (d2 < 5.5).float()  # (16, 1, 16, 16) binary discs of radius ~2.3
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        terms = elbo_terms(model, x, generator=g)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
    initial, final = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # measured: 154 -> 11.5 nats/image (ratio 0.07) in ~1.7 s
    assert final < 0.15 * initial, (initial, final)


# --- package, likelihoods, precision, benchmark --------------------------------------------


def test_config_import_is_torch_free_and_public_names_resolve():
    code = (
        "import sys; from pipeline.model import ModelConfig, preset; preset('cifar32');"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    import pipeline.model as pm

    assert len(pm.__all__) == 36 and all(getattr(pm, name) is not None for name in pm.__all__)


def test_likelihoods_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 4, generator=g)
    mean = torch.rand(2, 3, 4, 4, generator=g)
    lap = Laplace(0.2)
    ref = torch.distributions.Laplace(mean, 0.2).log_prob(x).sum((1, 2, 3))
    assert torch.allclose(lap.log_prob(x, mean), ref, atol=1e-4)
    xb = torch.bernoulli(x, generator=g)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    ref = torch.distributions.Bernoulli(logits=logits).log_prob(xb).sum((1, 2, 3))
    assert torch.allclose(Bernoulli().log_prob(xb, logits), ref, atol=1e-4)
    gauss = Gaussian(0.3, learn="channel", channels=3)
    assert gauss.log_sigma.shape == (3,) and torch.allclose(
        gauss.precision, torch.full((3,), 1 / 0.09)
    )
    ref = torch.distributions.Normal(mean, 0.3).log_prob(x).sum((1, 2, 3))
    lp = gauss.log_prob(x, mean)
    assert torch.allclose(lp, ref, atol=1e-4)
    lp.sum().backward()
    assert gauss.log_sigma.grad is not None and gauss.log_sigma.grad.shape == (3,)
    params = torch.randn(5, 6, 4, 4, generator=g)
    s = DiscretizedLogistic().sample(params, generator=g)
    assert s.shape == (5, 3, 4, 4)
    assert torch.equal(s, torch.round(s * 255) / 255) and 0 <= float(s.min()) <= float(s.max()) <= 1


def test_bf16_autocast_loss_stays_float32():
    torch.manual_seed(0)
    model = VAE.from_config(tiny("cifar32", likelihood="discretized_logistic"))
    x = torch.round(torch.rand(4, 3, 32, 32) * 255) / 255
    ref = elbo_terms(model, x, generator=torch.Generator().manual_seed(0))["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = elbo_terms(model, x, generator=torch.Generator().manual_seed(0))["loss"]
    assert out.dtype == torch.float32
    assert abs(float(out.detach()) - float(ref.detach())) < 0.02 * abs(float(ref.detach()))


def test_quality_benchmark_functions():
    torch.manual_seed(0)
    model = VAE.from_config(tiny("mnist28"))
    x = torch.rand(6, 1, 28, 28)
    xb = binarize(x, torch.Generator().manual_seed(0))
    assert set(xb.unique().tolist()) <= {0.0, 1.0}
    q = quantize_8bit(x)
    assert torch.equal(q, torch.round(q * 255) / 255)
    out = fashion_mnist_nll(model, [(x[:3], None), (x[3:], None)], k=20, chunk=7)
    assert out["n_images"] == 6 and out["latent_units"] == 32
    assert out["nll_iwae"] <= out["neg_elbo"] and out["gap"] >= 0  # same draws: IWAE >= mean
    assert out["bits_per_dim"] == pytest.approx(out["nll_iwae"] / (784 * math.log(2)))
    with pytest.raises(ValueError, match="bernoulli"):
        fashion_mnist_nll(VAE.from_config(tiny("mnist28", likelihood="gaussian")), [x], k=2)
    rd = VAE.from_config(tiny("cifar32", deterministic_encoder=True))
    res = bits_per_dim_8bit(rd, [torch.rand(2, 3, 32, 32)], k=3)
    assert {"rd_loss", "rate", "distortion", "psnr", "bits_per_dim"} <= res.keys()
    assert "nll_iwae" not in res and res["rd_loss"] == pytest.approx(
        res["rate"] + res["distortion"]
    )
