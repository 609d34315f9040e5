"""The quality protocol: one fixed test binarization, and no Bernoulli job on 8-bit data."""

from __future__ import annotations

import pytest
import torch

from pipeline import cli
from pipeline.errors import ConfigError
from pipeline.model import VAE, preset
from pipeline.model.quality import binarization_sha256, binarize_fixed, fashion_mnist_nll
from pipeline.train.config import TrainJob
from pipeline.typed import build


def _images(n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand((n, 1, 28, 28), generator=g)


def test_fixed_binarization_is_binary_and_reproducible():
    x = _images()
    b = binarize_fixed(x)
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(b, binarize_fixed(x.clone()))
    # pixel ~ Bernoulli(intensity): the mean matches the mean intensity within 4 SE
    p = x.mean().item()
    se = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(b.mean().item() - p) < 4 * se
    assert binarization_sha256(b) == binarization_sha256(b.clone())
    assert binarization_sha256(b) != binarization_sha256(binarize_fixed(x, seed=1))


def test_test_binarization_does_not_depend_on_k_chunk_or_batching():
    torch.manual_seed(0)
    vae = VAE.from_config(preset("mnist28_mlp", hidden=[16, 16], latent_dim=4))
    x = _images()
    runs = [
        fashion_mnist_nll(vae, [x], k=4, chunk=2),
        fashion_mnist_nll(vae, [x], k=16, chunk=16),
        fashion_mnist_nll(vae, list(x.split(5)), k=8, chunk=3),
        fashion_mnist_nll(vae, list(x.split(7)), k=8, chunk=8, seed=3),  # other IWAE noise
    ]
    shas = {r["test_binarization_sha256"] for r in runs}
    assert shas == {binarization_sha256(binarize_fixed(x))}, shas


def _job(likelihood: str, **data) -> dict:
    return {
        "data": {"train_url": "s3://data/fashion-mnist/train", **data},
        "model": {
            "image_size": 28,
            "in_channels": 1,
            "channels": [8, 16],
            "likelihood": likelihood,
        },
    }


def test_bernoulli_on_8bit_data_needs_binarization():
    with pytest.raises(ConfigError, match=r"model\.likelihood: 'bernoulli' needs binary pixels"):
        build(TrainJob, _job("bernoulli"))
    assert build(TrainJob, _job("bernoulli", binarize=True)).data.binarize
    with pytest.raises(ConfigError, match=r"data\.binarize: only for the bernoulli likelihood"):
        build(TrainJob, _job("discretized_logistic", binarize=True))
    # the default likelihood is an honest one for 8-bit pixels
    assert build(TrainJob, {"data": {"train_url": "x/train"}}).model.likelihood == (
        "discretized_logistic"
    )


def test_validate_rejects_a_bernoulli_job_without_binarization(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(
        "kind: train\nentrypoint: python -m pipeline train train.yaml\nconfig:\n"
        "  data: {train_url: s3://data/fashion-mnist/train}\n"
        "  model: {image_size: 28, in_channels: 1, likelihood: bernoulli}\n"
    )
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.model.likelihood: 'bernoulli' needs binary pixels" in err[0]
