"""The gallery job against a real MLflow server and SeaweedFS, with a model trained here."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline import cli, storage
from pipeline.data.config import IngestConfig
from pipeline.data.heldout import read_images
from pipeline.data.ingest import ingest
from pipeline.model import VAE, elbo_terms
from pipeline.serve.config import SampleJob
from pipeline.serve.gallery import MARKER, config_hash, run_sample
from pipeline.train import checkpoint
from pipeline.train.config import TrainJob
from pipeline.typed import build
from tests.helpers import ARTIFACTS, chromium, chromium_bin, experiment_runs, patched_environ

MODEL = {
    "image_size": 28,
    "in_channels": 1,
    "channels": [8, 16],
    "latent_dim": 8,
    "likelihood": "bernoulli",
}


@pytest.fixture(scope="module")
def registered(s3, mlflow_server, tmp_path_factory):
    """Synthetic shards on S3 and a tiny VAE trained for 60 steps, registered as @candidate."""

    import mlflow
    from ray.train import Checkpoint

    from pipeline.train.driver import register_model

    with patched_environ(s3.env):
        data = s3.make_bucket("sample-data") + "/synth"
        ingest(
            IngestConfig(
                output_url=data,
                source="synthetic",
                synthetic_count=96,
                synthetic_size=28,
                test_fraction=0.5,
                shard_samples=16,
            ),
            progress=False,
        )
        job = build(
            TrainJob,
            {
                "data": {"train_url": f"{data}/train", "binarize": True},
                "model": MODEL,
                "tracking": {
                    "mlflow_uri": mlflow_server.uri,
                    "registered_model": "gallery-vae",
                    "alias": "candidate",
                },
            },
        )
        torch.manual_seed(0)
        vae = VAE.from_config(job.model)
        opt = torch.optim.Adam(vae.parameters(), 3e-3)
        x = read_images(f"{data}/train", 48, 28, 1)
        for _ in range(60):
            opt.zero_grad()
            elbo_terms(vae, x)["loss"].backward()
            opt.step()
        mlflow.set_tracking_uri(mlflow_server.uri)
        mlflow.set_experiment("gallery-train")
        with mlflow.start_run() as run:
            mlflow.log_metric("train/loss", 1.0)
        ckdir = tmp_path_factory.mktemp("ckpt")
        checkpoint.save(
            ckdir,
            model=vae,
            state={
                "step": 60,
                "epoch": 0,
                "mlflow_run_id": run.info.run_id,
                "config": {"model": MODEL},
            },
        )
        version, _ = register_model(job, run.info.run_id, Checkpoint.from_directory(str(ckdir)))
        yield {"data": data, "version": version, "run_id": run.info.run_id, "ckpt": str(ckdir)}


def sample_job(mlflow_server, output_url, data_url, **over) -> SampleJob:
    s = {
        "output_url": output_url,
        "model_name": "gallery-vae",
        "model_alias": "candidate",
        "data_url": data_url,
        "temperatures": [0.5, 1.0],
        "seed": 3,
        **over,
    }
    return build(
        SampleJob,
        {"sample": s, "tracking": {"mlflow_uri": mlflow_server.uri, "experiment": "galleries"}},
    )


def objects(url: str) -> dict[str, bytes]:
    fs, root = storage.get_fs(url)
    return {p[len(root) :]: fs.cat_file(p) for p in fs.find(root)} if fs.exists(root) else {}


def gallery_runs(mlflow_server) -> int:
    return len(experiment_runs(mlflow_server.uri, "galleries"))


def test_gallery_dimensions_links_and_idempotence(registered, s3_env, mlflow_server):
    out = s3_env.make_bucket("galleries") + "/g"
    job = sample_job(mlflow_server, out, f"{registered['data']}/test")
    url = run_sample(job)
    assert url == f"{out}/gallery-vae/v{registered['version']}/{config_hash(job.sample)}"
    files = objects(url)
    # 28-px tiles and 2-px padding, all upscaled 4x (112-px tiles); a 24-px caption band on
    # top; the traversals' 64-px column of row labels
    pad = lambda n: 4 * (n * 30 + 2)  # noqa: E731
    expected = {
        "prior_t0.5.png": (pad(8) + 24, pad(8)),
        "prior_t1.png": (pad(8) + 24, pad(8)),
        "reconstructions.png": (pad(8) + 24, pad(8)),
        "interpolations.png": (pad(8) + 24, pad(10 + 2)),  # endpoints A, B at both ends
        "traversals.png": (pad(8) + 24, pad(9) + 64),
    }
    for name, (h, w) in expected.items():
        img = Image.open(io.BytesIO(files["/" + name]))
        assert (img.height, img.width) == (h, w), name
    html = files["/index.html"].decode()
    assert sorted(re.findall(r'<img src="([^"]+)"', html)) == sorted(expected)
    captions = re.findall(r"<figcaption>([^<]+)</figcaption>", html)
    assert "prior_t0.5.png: prior samples, temperature 0.5" in captions
    assert any(c.startswith("interpolations.png: held-out A | ") for c in captions), captions
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", html)  # works offline
    assert f"version {registered['version']}" in html and registered["run_id"] in html
    marker = json.loads(files["/" + MARKER])
    assert marker["train_run_id"] == registered["run_id"]
    assert sorted(marker["files"]) == sorted([*expected, "index.html"])

    # The re-run is a no-op: no new objects, no new MLflow run.
    before, runs = objects(out), gallery_runs(mlflow_server)
    assert runs == 1
    assert run_sample(job) is None
    assert objects(out) == before and gallery_runs(mlflow_server) == runs

    # --if-new-version: the alias's version has a gallery, so even a new config does nothing.
    other = sample_job(mlflow_server, out, f"{registered['data']}/test", seed=4)
    assert run_sample(other, if_new_version=True) is None
    assert objects(out) == before

    # The model version links to the gallery and its run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    mv = client.get_model_version("gallery-vae", registered["version"])
    assert mv.tags["gallery_url"] == url
    assert mv.run_id == registered["run_id"]  # the version's source run
    gallery_run = client.get_run(mv.tags["gallery_run_id"])
    page = (
        f"{mlflow_server.uri}/#/experiments/{gallery_run.info.experiment_id}/runs/"
        f"{gallery_run.info.run_id}/artifacts/gallery/index.html?workflowType=machine_learning"
    )
    assert mv.tags["gallery_page"] == page
    assert mv.description.startswith(f"Trained in MLflow run [{registered['run_id']}](")
    assert mv.description.endswith(f"Gallery: {url} ([index.html in MLflow]({page}))")
    train_run = client.get_run(registered["run_id"])
    assert train_run.data.tags["gallery_url"] == url
    assert train_run.data.tags["gallery_page"] == page
    exp = client.get_experiment(gallery_run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_same_seed_byte_identical(registered, s3_env, mlflow_server):
    bucket = s3_env.make_bucket("galleries-seed")
    urls = [
        run_sample(sample_job(mlflow_server, f"{bucket}/{d}", f"{registered['data']}/test"))
        for d in ("a", "b")
    ]
    a, b = objects(urls[0]), objects(urls[1])
    pngs = [k for k in a if k.endswith(".png")]
    assert len(pngs) == 5 and all(a[k] == b[k] for k in pngs)


def test_gallery_index_renders_offline_in_chromium(registered, s3_env, mlflow_server, tmp_path):
    """The gallery written to a local folder, opened as a file in headless Chromium: every
    image loads (the page's script counts them). The screenshot stays in test-artifacts/."""
    chromium_bin()
    job = sample_job(mlflow_server, str(tmp_path / "g"), f"{registered['data']}/test", seed=5)
    index = Path(run_sample(job)) / "index.html"
    shot = ARTIFACTS / "gallery_index.png"
    dom = chromium(index.as_uri(), screenshot=shot)
    print(f"screenshot: {shot}")
    assert re.search(r'<body[^>]* data-loaded="5/5"', dom), dom[:2000]


def test_from_checkpoint_url(registered, tmp_path, mlflow_server):
    job = sample_job(mlflow_server, str(tmp_path / "out"), "", checkpoint_url=registered["ckpt"])
    url = run_sample(job)
    assert sorted(p.name for p in Path(url).iterdir()) == [
        MARKER,
        "index.html",
        "prior_t0.5.png",
        "prior_t1.png",
    ]


def test_large_n_writes_exactly_n(registered, s3_env, mlflow_server, ray_env):
    import ray

    ray.init(address=ray_env.address)
    out = s3_env.make_bucket("galleries-large") + "/g"
    job = sample_job(mlflow_server, out, "", num_samples=300, samples_per_shard=128, batch_size=64)
    url = run_sample(job)
    files = objects(f"{url}/samples")
    manifest = json.loads(files["/manifest.json"])
    assert manifest["count"] == 300 and [s["samples"] for s in manifest["shards"]] == [128, 128, 44]
    keys = []
    for s in manifest["shards"]:
        tar = tarfile.open(fileobj=io.BytesIO(files["/" + s["name"]]))
        keys += [m.name for m in tar.getmembers()]
    assert keys == [f"sample-{i:08d}.png" for i in range(300)]


@pytest.mark.parametrize("case", ["missing_model", "missing_alias", "mlflow_down", "s3_down"])
def test_clear_errors(case, registered, s3_env, mlflow_server, tmp_path, capsys, monkeypatch):
    s = {
        "output_url": str(tmp_path / "out"),
        "model_name": "gallery-vae",
        "model_alias": "candidate",
    }
    uri = mlflow_server.uri
    if case == "missing_model":
        s["model_name"] = "no-such-model"
    elif case == "missing_alias":
        s["model_alias"] = "production"
    elif case == "mlflow_down":
        from pipeline.stack import free_port

        uri = f"http://127.0.0.1:{free_port()}"
    else:
        from pipeline.stack import free_port

        dead = f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        # every retry as the product makes it, without its 15.5 s of backoff (0.5 s doubled)
        monkeypatch.setattr(storage, "MAX_BACKOFF", 0.01)
        s["output_url"] = "s3://galleries-down/g"
    path = tmp_path / "sample.yaml"
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "kind": "sample",
                "entrypoint": "python -m pipeline sample x",
                "config": {"sample": s, "tracking": {"mlflow_uri": uri}},
            }
        )
    )
    assert cli.main(["sample", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    want = {
        "missing_model": "model 'no-such-model' alias 'candidate' not found",
        "missing_alias": "model 'gallery-vae' alias 'production' not found",
        "mlflow_down": f"MLflow at {uri} unreachable",
        "s3_down": "s3://galleries-down/g",
    }[case]
    assert want in err[0]
    if case == "s3_down":
        assert dead in err[0]
    assert not (tmp_path / "out").exists()
