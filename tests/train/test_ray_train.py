"""Ray Train end to end on a real local Ray cluster, data on SeaweedFS, a real MLflow server."""

from __future__ import annotations

import json
import threading
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from pipeline import storage
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.stream import ShardStream, make_loader
from pipeline.model import build_model
from pipeline.train import checkpoint
from pipeline.train.config import TrainJob
from pipeline.train.driver import run_training
from pipeline.train.loop import eval_metrics
from pipeline.typed import build, to_dict

pytestmark = pytest.mark.slow

N_TRAIN = 1024
BATCH = 32


@pytest.fixture(scope="session")
def fmnist_url(s3):
    """A Fashion-MNIST subset (1024 train / 1024 test) as 128-sample shards on S3."""
    import os

    saved = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    try:
        url = s3.make_bucket("train-data") + "/fmnist"
        ingest(IngestConfig(output_url=url, source="fashion_mnist", limit=N_TRAIN,
                            shard_samples=128, workers=2), progress=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return url


def make_job(fmnist_url, mlflow_server, storage, name, workers, sd_dir="", **optim) -> TrainJob:
    o = dict(epochs=2, batch_size=BATCH, lr=3e-3, warmup_steps=4, checkpoint_every=8,
             log_every=4, eval_batches=2, iwae_k=8, iwae_images=16)
    o.update(optim)
    return build(TrainJob, {
        "data": {"train_url": f"{fmnist_url}/train", "test_url": f"{fmnist_url}/test",
                 "num_workers": 0, "shuffle_buffer": 64},
        "model": {"image_size": 28, "in_channels": 1, "channels": [8, 16], "latent_dim": 8,
                  "likelihood": "bernoulli"},
        "optim": o,
        "scaling": {"num_workers": workers, "storage_path": storage, "name": name,
                    "max_failures": 2, "num_to_keep": 2},
        "tracking": {"mlflow_uri": mlflow_server.uri, "experiment": f"test-{name}",
                     "registered_model": f"test-{name}", "metrics_sd_dir": sd_dir},
    })


@pytest.fixture
def ray_session(ray_env, s3_env, tmp_path):
    """ray.init against the session cluster, with per-test worker env vars."""
    import ray

    def init(**env_vars):
        env_vars = {"PIPELINE_RECORD_KEYS_DIR": str(tmp_path), **env_vars}
        ray.init(address=ray_env.address, runtime_env={"env_vars": env_vars},
                 log_to_driver=True)
        return tmp_path

    return init


def read_keys(keys_dir: Path) -> dict[int, list[tuple[int, int, str]]]:
    """rank -> [(epoch, step, key)] in the order the rank consumed them (all attempts)."""
    out = {}
    for f in sorted(keys_dir.glob("rank*.txt")):
        rows = [line.split() for line in f.read_text().splitlines()]
        out[int(f.stem.removeprefix("rank"))] = [(int(e), int(s), k) for e, s, k in rows]
    return out


def metric_steps(mlflow_server, run_id, key):
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(mlflow_server.uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


def test_one_worker_trains_registers_and_reproduces_eval(fmnist_url, mlflow_server, ray_session,
                                                         tmp_path):
    ray_session()
    job = make_job(fmnist_url, mlflow_server, str(tmp_path / "ckpt"), "one", 1)
    res = run_training(job)
    steps_per_epoch = N_TRAIN // BATCH
    assert res.metrics["step"] == 2 * steps_per_epoch
    loss = metric_steps(mlflow_server, res.run_id, "loss")
    assert [s for s, _ in loss] == list(range(4, 2 * steps_per_epoch + 1, 4))
    assert loss[-1][1] < 0.8 * loss[0][1], loss  # the loss went down

    # The checkpoint loads into a plain VAE (no "module." prefix) and reproduces the eval.
    saved = checkpoint.load(res.checkpoint_url)
    assert not any(k.startswith("module.") for k in saved["model"])
    vae = build_model(saved["state"]["config"]["model"])
    vae.load_state_dict(saved["model"], strict=True)
    assert saved["state"]["mlflow_run_id"] == res.run_id
    stream = ShardStream(job.data, rank=0, world_size=1, batch_size=BATCH, split="test")
    stream.set_epoch(0)
    batches = [b["image"] for _, b in zip(range(job.optim.eval_batches), make_loader(stream))]
    ev = eval_metrics(vae, batches, job.optim.iwae_k, job.optim.iwae_images)
    logged = dict(metric_steps(mlflow_server, res.run_id, "eval_neg_elbo_bits"))
    assert ev["eval_neg_elbo_bits"] == pytest.approx(logged[2 * steps_per_epoch], rel=1e-5)
    assert res.model_version == "1" and res.model_uri == "models:/test-one@candidate"


def _poll_prometheus(url: str, query: str, found: dict, stop: threading.Event):
    while not stop.is_set():
        try:
            q = urllib.parse.urlencode({"query": query})
            with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=2) as r:
                result = json.load(r)["data"]["result"]
            for series in result:
                found[series["metric"]["rank"]] = float(series["value"][1])
        except OSError:
            pass
        stop.wait(0.5)


def test_two_workers_disjoint_samples_and_prometheus(fmnist_url, mlflow_server, ray_session,
                                                     s3, prometheus):
    keys_dir = ray_session()
    name = "two"
    job = make_job(fmnist_url, mlflow_server, s3.make_bucket("ckpt-two") + "/ray", name, 2,
                   sd_dir=str(prometheus.targets_dir), epochs=3)
    found, stop = {}, threading.Event()
    poller = threading.Thread(target=_poll_prometheus, args=(
        prometheus.url, f'vae_train_images_per_second{{run="{name}"}}', found, stop), daemon=True)
    poller.start()
    try:
        res = run_training(job)
    finally:
        stop.set()
        poller.join(5)
    per_rank = N_TRAIN // (2 * BATCH)
    assert res.metrics["step"] == 3 * per_rank
    keys = read_keys(keys_dir)
    assert sorted(keys) == [0, 1]
    for epoch in range(3):
        r0 = [k for e, _, k in keys[0] if e == epoch]
        r1 = [k for e, _, k in keys[1] if e == epoch]
        assert len(r0) == len(r1) == per_rank * BATCH
        assert not set(r0) & set(r1)
        assert len(set(r0) | set(r1)) == N_TRAIN
    loss = metric_steps(mlflow_server, res.run_id, "loss")
    assert loss[-1][1] < loss[0][1]
    assert sorted(found) == ["0", "1"] and all(v > 0 for v in found.values()), found


def test_worker_killed_mid_epoch_resumes_one_run(fmnist_url, mlflow_server, ray_session, s3,
                                                 tmp_path):
    marker = tmp_path / "killed.pid"
    keys_dir = ray_session(PIPELINE_FAULT_KILL_STEP="12", PIPELINE_FAULT_KILL_RANK="1",
                           PIPELINE_FAULT_MARKER=str(marker))
    job = make_job(fmnist_url, mlflow_server, s3.make_bucket("ckpt-kill") + "/ray", "kill", 2)
    res = run_training(job)
    assert marker.exists(), "the fault was never injected"
    per_rank = N_TRAIN // (2 * BATCH)
    assert res.metrics["step"] == 2 * per_rank

    # One MLflow run; its step axis has no gaps and no repeats.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("test-kill")
    assert len(client.search_runs([exp.experiment_id])) == 1
    hist = client.get_metric_history(res.run_id, "loss")
    assert sorted(m.step for m in hist) == list(range(4, 2 * per_rank + 1, 4))

    # Steps after the last checkpoint (8) up to the kill (12) ran twice, on the same samples;
    # every other step ran once, and each epoch saw every sample exactly once.
    keys = read_keys(keys_dir)
    for rank in (0, 1):
        by_step = defaultdict(list)
        for e, s, k in keys[rank]:
            by_step[(e, s)].append(k)
        assert sorted(by_step) == [(e, s) for e in range(2)
                                   for s in range(e * per_rank + 1, (e + 1) * per_rank + 1)]
        for (e, s), ks in by_step.items():
            if e == 0 and 8 < s <= 12:
                assert len(ks) == 2 * BATCH and ks[:BATCH] == ks[BATCH:], (rank, e, s)
            else:
                assert len(ks) == BATCH, (rank, e, s)
    for e in range(2):
        seen = [k for r in (0, 1) for (ee, _), ks in _steps(keys[r]).items() if ee == e
                for k in ks[:BATCH]]
        assert len(seen) == len(set(seen)) == N_TRAIN
    saved = checkpoint.load(storage.download_dir(res.checkpoint_url, str(tmp_path / "ck")))
    assert res.checkpoint_url.startswith("s3://ckpt-kill/ray/kill/checkpoint_")
    assert to_dict(job)["model"] == saved["state"]["config"]["model"]
    assert torch.isfinite(torch.cat([v.flatten().float() for v in saved["model"].values()])).all()


def _steps(rows):
    out = defaultdict(list)
    for e, s, k in rows:
        out[(e, s)].append(k)
    return out


def test_submit_through_the_job_server(fmnist_url, mlflow_server, ray_env, s3_env, tmp_path,
                                       capsys):
    """`pipeline submit` a train yaml to the head's job server: it succeeds, logs come back,
    and its MLflow run has metrics and images."""
    import yaml
    from mlflow.tracking import MlflowClient

    from pipeline import cli

    job = make_job(fmnist_url, mlflow_server, s3_env.make_bucket("ckpt-submit") + "/ray",
                   "submitted", 1, epochs=1)
    spec = tmp_path / "train.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "train", "entrypoint": f"python -m pipeline train {spec}",
        "runtime_env": {"working_dir": str(Path(__file__).resolve().parents[1]),
                        "env_vars": {"OMP_NUM_THREADS": "1"}},
        "config": to_dict(job)}))
    rc = cli.main(["submit", str(spec), "--address", ray_env.dashboard_url])
    out, err = capsys.readouterr()
    assert rc == 0, (out[-3000:], err[-3000:])
    assert "submitted" in out and "SUCCEEDED" in out
    assert f"step {N_TRAIN // BATCH}/{N_TRAIN // BATCH} " in out
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("test-submitted")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert {"loss", "eval_neg_elbo_bits", "images_per_second"} <= set(run.data.metrics)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("reconstructions" in p for p in images) and any("prior_samples" in p for p in images)
