"""Ray Train end to end on a real local Ray cluster, data on SeaweedFS, a real MLflow server."""

from __future__ import annotations

import pytest
import torch

from pipeline import storage
from pipeline.data.stream import ShardStream, make_loader
from pipeline.model import build_model
from pipeline.model.quality import binarize_fixed
from pipeline.train import checkpoint
from pipeline.train.driver import run_training
from pipeline.train.loop import eval_metrics
from pipeline.typed import to_dict
from tests.helpers import (
    BATCH,
    N_TRAIN,
    ROOT,
    keys_by_step,
    make_job,
    metric_history,
    read_keys,
)

pytestmark = pytest.mark.slow


def metric_steps(mlflow_server, run_id, key):
    return metric_history(mlflow_server.uri, run_id, key)


def test_one_worker_trains_registers_and_reproduces_eval(
    fmnist_url, mlflow_server, ray_session, tmp_path
):
    ray_session()
    job = make_job(fmnist_url, mlflow_server, str(tmp_path / "ckpt"), "one", 1)
    res = run_training(job)
    steps_per_epoch = N_TRAIN // BATCH
    assert res.metrics["step"] == 2 * steps_per_epoch
    loss = metric_steps(mlflow_server, res.run_id, "train/loss")
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
    batches = list(binarize_fixed(torch.cat(batches)).split(len(batches[0])))  # as the loop does
    ev = eval_metrics(vae, batches, job.optim.iwae_k, job.optim.iwae_images)
    logged = dict(metric_steps(mlflow_server, res.run_id, "eval/neg_elbo_bits"))
    assert ev["eval_neg_elbo_bits"] == pytest.approx(logged[2 * steps_per_epoch], rel=1e-5)
    assert res.model_version == "1" and res.model_uri == "models:/test-one@candidate"


def test_two_workers_disjoint_samples_and_prometheus(
    fmnist_url, mlflow_server, ray_session, s3, prometheus
):
    # Each worker's endpoint stays up until Prometheus has scraped it once more: a run this
    # short can end before file_sd discovery (~5 s) ever finds it.
    keys_dir = ray_session(PIPELINE_METRICS_LINGER="60")
    name = "two"
    job = make_job(
        fmnist_url,
        mlflow_server,
        s3.make_bucket("ckpt-two") + "/ray",
        name,
        2,
        sd_dir=str(prometheus.targets_dir),
        epochs=3,
    )
    res = run_training(job)
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
    loss = metric_steps(mlflow_server, res.run_id, "train/loss")
    assert loss[-1][1] < loss[0][1]
    result = prometheus.query(f'max_over_time(vae_train_images_per_second{{run="{name}"}}[10m])')
    found = {series["metric"]["rank"]: float(series["value"][1]) for series in result}
    assert sorted(found) == ["0", "1"] and all(v > 0 for v in found.values()), found


def test_worker_killed_mid_epoch_resumes_one_run(
    fmnist_url, mlflow_server, ray_session, s3, tmp_path
):
    marker = tmp_path / "killed.pid"
    keys_dir = ray_session(
        PIPELINE_FAULT_KILL_STEP="12",
        PIPELINE_FAULT_KILL_RANK="1",
        PIPELINE_FAULT_MARKER=str(marker),
    )
    job = make_job(fmnist_url, mlflow_server, s3.make_bucket("ckpt-kill") + "/ray", "kill", 2)
    res = run_training(job)
    assert marker.exists(), "the fault was never injected"
    per_rank = N_TRAIN // (2 * BATCH)
    assert res.metrics["step"] == 2 * per_rank
    # One kill, one retry: both ranks (on one node) restored the same S3 checkpoint at once,
    # each from its own download, so the restart did not fail on a half-rewritten copy.
    for rank in (0, 1):
        attempts = (keys_dir / f"attempts-rank{rank}.txt").read_text().split()
        assert len(attempts) == 2, (rank, attempts)

    # One MLflow run; its step axis has no gaps and no repeats.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("test-kill")
    assert len(client.search_runs([exp.experiment_id])) == 1
    hist = client.get_metric_history(res.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(4, 2 * per_rank + 1, 4))

    # Steps after the last checkpoint (8) up to the kill (12) ran twice, on the same samples;
    # every other step ran once, and each epoch saw every sample exactly once.
    keys = read_keys(keys_dir)
    for rank in (0, 1):
        by_step = keys_by_step(keys[rank])
        assert sorted(by_step) == [
            (e, s) for e in range(2) for s in range(e * per_rank + 1, (e + 1) * per_rank + 1)
        ]
        for (e, s), ks in by_step.items():
            if e == 0 and 8 < s <= 12:
                assert len(ks) == 2 * BATCH and ks[:BATCH] == ks[BATCH:], (rank, e, s)
            else:
                assert len(ks) == BATCH, (rank, e, s)
    for e in range(2):
        seen = [
            k
            for r in (0, 1)
            for (ee, _), ks in keys_by_step(keys[r]).items()
            if ee == e
            for k in ks[:BATCH]
        ]
        assert len(seen) == len(set(seen)) == N_TRAIN
    saved = checkpoint.load(storage.download_dir(res.checkpoint_url, str(tmp_path / "ck")))
    assert res.checkpoint_url.startswith("s3://ckpt-kill/ray/kill/checkpoint_")
    assert to_dict(job)["model"] == saved["state"]["config"]["model"]
    assert torch.isfinite(torch.cat([v.flatten().float() for v in saved["model"].values()])).all()


def test_submit_through_the_job_server(
    fmnist_url, mlflow_server, ray_env, s3_env, tmp_path, capsys
):
    """`pipeline submit` a train yaml to the head's job server: it succeeds, logs come back,
    and its MLflow run has metrics and images."""
    import yaml
    from mlflow.tracking import MlflowClient

    from pipeline import cli

    job = make_job(
        fmnist_url,
        mlflow_server,
        s3_env.make_bucket("ckpt-submit") + "/ray",
        "submitted",
        1,
        epochs=1,
    )
    spec = tmp_path / "train.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "kind": "train",
                "entrypoint": f"python -m pipeline train {spec}",
                "runtime_env": {"working_dir": str(ROOT), "env_vars": {"OMP_NUM_THREADS": "1"}},
                "config": to_dict(job),
            }
        )
    )
    rc = cli.main(["submit", str(spec), "--address", ray_env.dashboard_url])
    out, err = capsys.readouterr()
    assert rc == 0, (out[-3000:], err[-3000:])
    assert "submitted" in out and "SUCCEEDED" in out
    assert f"step {N_TRAIN // BATCH}/{N_TRAIN // BATCH} " in out
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("test-submitted")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert {"train/loss", "eval/neg_elbo_bits", "data/images_per_second"} <= set(run.data.metrics)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("reconstructions" in p for p in images) and any("prior_samples" in p for p in images)
