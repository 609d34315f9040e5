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
from tests.helpers import require


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


# --- the bench-quality protocol: validation split, selection blind to the test split -------


def test_validation_split_is_seeded_disjoint_and_complete():
    from pipeline.model.quality import indices_sha256, validation_split

    train, val = validation_split(60_000, 5_000, seed=17)
    assert (len(train), len(val)) == (55_000, 5_000)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(60_000))
    again = validation_split(60_000, 5_000, seed=17)
    assert torch.equal(again[1], val) and indices_sha256(again[1]) == indices_sha256(val)
    assert indices_sha256(validation_split(60_000, 5_000, seed=18)[1]) != indices_sha256(val)
    assert not torch.equal(val, torch.arange(55_000, 60_000))  # random, not the last 5,000
    with pytest.raises(ValueError, match="validation size"):
        validation_split(10, 10)


class _FakeFashionMNIST:
    """Random uint8 'Fashion-MNIST' whose test split must never be read here."""

    def __init__(self, path: str = ""):
        g = torch.Generator().manual_seed(0)
        self.train = torch.randint(0, 256, (700, 28, 28), generator=g, dtype=torch.uint8)

    def arrays(self, split: str):
        if split != "train":
            raise AssertionError(f"selection or training read the {split!r} split")
        return self.train.numpy(), None


def test_selection_and_training_read_only_the_training_split(monkeypatch, tmp_path):
    import inspect

    from bench import quality, quality_train

    # by construction: selection gets training and validation images, never the test split
    assert list(inspect.signature(quality_train.select_and_train).parameters) == [
        "name",
        "train",
        "val",
        "budget_s",
        "opts",
    ]
    # and by count: the variant's process entry, with a source that refuses the test split
    monkeypatch.setattr("pipeline.data.sources.FashionMNIST", _FakeFashionMNIST)
    opts = {
        "seed": 0,
        "val_size": 100,
        "val_seed": 17,
        "select_k": 2,
        "select_images": 20,
        "select_fraction": 0.5,
        "checkpoints": 2,
    }
    r = quality.train_variant("bernoulli_mlp", 1.0, opts, str(tmp_path))
    assert r["splits_read"] == {"train": 1}
    split = r["validation_split"]
    assert (split["size"], split["train_size"], split["seed"]) == (100, 600, 17)
    names = [c.name for c in quality_train.VARIANTS["bernoulli_mlp"].candidates]
    assert [t["candidate"]["name"] for t in r["selection"]] == names
    scores = {t["candidate"]["name"]: t["validation"]["score"] for t in r["selection"]}
    assert r["chosen"]["name"] == min(scores, key=scores.get)  # argmin of validation scores
    assert all(t["validation"]["images"] == 20 for t in r["selection"])
    c = r["cpu_seconds"]
    assert c["training_total"] >= 1.0 and c["selection_trials"] < c["training_total"]
    assert len(r["train"]["validation_curve"]) >= 2  # checkpoints scored on validation
    assert r["train"]["steps"] > 0 and (tmp_path / "bernoulli_mlp.safetensors").exists()


def _fashion_mnist_available() -> bool:
    try:
        from pipeline.data.sources import FashionMNIST

        FashionMNIST()
    except Exception:
        return False
    return True


@pytest.mark.slow
def test_bench_quality_smoke_writes_the_protocol_fields(tmp_path):
    """``bench.run --quality-smoke`` end to end (~1-2 min on 2 quiet cores), two variants."""
    require(_fashion_mnist_available(), "needs the Fashion-MNIST package (make install)")
    import json

    from bench import run
    from bench.quality_train import CountingSource
    from pipeline.model.quality import indices_sha256, validation_split

    argv = ["--only", "quality", "--quality-smoke", "--out-dir", str(tmp_path)]
    assert run.main([*argv, "--quality-variants", "bernoulli_mlp,bernoulli"]) == 0
    q = json.loads((tmp_path / "results.json").read_text())["quality"]
    p, v = q["protocol"], q["variants"]
    split = p["validation_split"]
    assert (split["size"], split["train_size"], split["seed"]) == (5000, 55000, 17)
    assert split["indices_sha256"] == indices_sha256(validation_split(60_000, 5_000, 17)[1])
    test = CountingSource().images("test")[:500]
    assert p["test_binarization"]["sha256"] == binarization_sha256(binarize_fixed(test))
    assert p["side_by_side"]["processes"] == 2 and p["side_by_side"]["all_running_seconds"] > 0
    assert p["test_split_reads"]["selection_and_training"] == 0
    assert p["test_split_reads"]["test_evaluation_jobs"] == sum(
        r["test"]["eval_jobs"] for r in v.values()
    )
    assert len(p["git"]["commit"]) == 40 and p["command"].startswith(".venv/bin/python -m")
    assert len(p["training_load_average"]["start"]) == 3 and p["machine"]["cores"] >= 1
    for r in v.values():
        assert r["splits_read"] == {"train": 1}
        assert r["cpu_seconds"]["training_total"] >= 8.0 and r["train"]["steps"] > 0
        assert r["test"]["images"] == 500 and r["test"]["iwae_k"] == 20
    assert v["bernoulli"]["test"]["iwae_images"] == 16
    assert v["bernoulli_mlp"]["test"]["iwae_images"] == 500
    assert v["bernoulli_mlp"]["test"]["same_images_as_conv"]["images"] == 16
    assert (tmp_path / "results.md").exists() and (tmp_path / "training_curve.png").exists()
    assert [i["training"] for i in p["invocations"]] == ["ran"]
    # the README block: each goal's row carries the run's number, and nothing else changes
    from bench.run import write_readme_quality
    from tests.helpers import ROOT

    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    write_readme_quality({"quality": q}, readme)
    text = readme.read_text()
    mlp, conv = v["bernoulli_mlp"]["test"], v["bernoulli"]["test"]
    assert "| bernoulli_mlp | binarized NLL, nats (published MLP VAE) | 30 (ran 0.13) | " in text
    assert f"**{mlp['iwae_nll_nats']:.2f}** | IWAE-20, 500 test images |" in text
    assert f"**{conv['iwae_nll_nats']:.2f}** | IWAE-20, 16 test images |" in text
    assert "| <= 3.0 |" not in text  # the 8-bit goal's variant did not run
    outside = text.split("<!-- bench.quality -->")[0]
    assert outside == (ROOT / "README.md").read_text().split("<!-- bench.quality -->")[0]
    # stopped and run again: the trained models and every finished test job are kept
    eval_files = sorted((tmp_path / "models" / "eval").glob("*.json"))
    assert len(eval_files) == p["eval"]["jobs"]
    eval_files[0].unlink()
    assert run.main([*argv, "--quality-variants", "bernoulli_mlp,bernoulli"]) == 0
    again = json.loads((tmp_path / "results.json").read_text())["quality"]
    runs = again["protocol"]["invocations"]
    assert len(runs) == 2 and runs[1]["training"].startswith("reused")
    assert (runs[1]["eval_jobs_run"], runs[1]["eval_jobs_reused"]) == (1, len(eval_files) - 1)

    def numbers(variants: dict) -> dict:  # the re-run job's CPU seconds differ, nothing else
        return {n: {**r["test"], "eval_cpu_seconds": 0} for n, r in variants.items()}

    assert numbers(again["variants"]) == numbers(v)


def test_readme_quality_block_is_the_committed_run(tmp_path):
    """The README's quality block is what ``make bench-quality`` rendered from the committed
    ``bench/quality/results.json``; with no protocol run there, it claims no number."""
    import json
    import re

    from bench.common import readme_block_pattern
    from bench.report import readme_quality
    from bench.run import QUALITY_BLOCK, write_readme_quality
    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    block = readme_block_pattern(QUALITY_BLOCK).search(readme)
    assert block, "README.md lacks the <!-- bench.quality --> block"
    q = json.loads((ROOT / "bench" / "quality" / "results.json").read_text()).get("quality", {})
    body = block.group(0)
    if "protocol" not in q:
        assert "No `make bench-quality` run" in body and not re.search(r"\d nats", body)
        return
    assert body == block.group(1) + "\n".join(readme_quality(q)).rstrip("\n") + "\n" + (
        "<!-- /bench.quality -->"
    )
    copy = tmp_path / "README.md"  # and rendering it again changes nothing
    copy.write_text(readme)
    write_readme_quality({"quality": q}, copy)
    assert copy.read_text() == readme
