"""End to end through the CLI (``python -m pipeline``), on the session's real S3, MLflow, Ray
cluster and Prometheus, with secrets planted in the environment:

* training on shards holding a corrupt image, a non-image member, a decompression bomb, a
  wrong size, a wrong mode and a truncated shard, with a NaN loss injected at step 5: the run
  finishes, every bad sample and the skipped step are counted in MLflow and Prometheus;
* the same data with a small error budget: the run fails with one clear line;
* a sampling job from the registered model;
* then every log of the Ray session and the services, every MLflow record and artifact, the
  checkpoints, galleries and the commands' output are searched for the planted secrets.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import storage
from pipeline.data.manifest import Manifest, ShardInfo, write_manifest
from tests.helpers import (
    bomb_png,
    experiment_runs,
    metric_history,
    patched_environ,
    png,
    tar_bytes,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SIZE, PER_SHARD, SHARDS, BATCH = 28, 32, 8, 16
N = PER_SHARD * SHARDS  # 256 samples, 16 steps per epoch on one worker
CUT_AT = 20  # the last shard is cut inside sample 20's image: samples 19..31 are lost
BAD_PER_EPOCH = {
    "decode_error": 1,
    "no_image": 1,
    "too_many_pixels": 1,
    "wrong_size": 1,
    "wrong_mode": 1,
    "truncated_shard": PER_SHARD - CUT_AT + 1,
}
MLFLOW_PASSWORD = "planted-mlflow-password-" + secrets.token_hex(8)
BUCKET = "rel-e2e"
OUTPUT: dict[str, subprocess.CompletedProcess] = {}


@pytest.fixture(scope="module")
def bad_data(s3) -> str:
    """``s3://rel-e2e/bad/train``: 8 shards of 32; shard 0 holds five bad samples, shard 7
    is truncated (its manifest entry records the full size)."""
    with patched_environ(s3.env):
        url = s3.make_bucket(BUCKET) + "/bad/train"
        rng = np.random.default_rng(0)
        infos = []
        for s in range(SHARDS):
            samples = []
            for i in range(PER_SHARD):
                key = f"s{s}-{i:03d}"
                img = png((rng.random((SIZE, SIZE)) * 255).astype(np.uint8))
                samples.append([(f"{key}.png", img), (f"{key}.cls", b"1")])
            if s == 0:
                samples[3] = [("s0-003.png", b"\x89PNG\r\n\x1a\n not really a png")]
                samples[7] = [("s0-007.txt", b"a text member, no image")]
                samples[9] = [("s0-009.png", bomb_png())]
                samples[11] = [("s0-011.png", png(np.zeros((SIZE + 2, SIZE + 2), np.uint8)))]
                samples[15] = [("s0-015.png", png(np.full((SIZE, SIZE), 999, np.uint16)))]
            data = tar_bytes(samples)
            full = len(data)
            if s == SHARDS - 1:
                with tarfile.open(fileobj=io.BytesIO(data)) as t:
                    data = data[: t.getmember(f"s{s}-{CUT_AT:03d}.png").offset_data + 10]
            name = f"shard-{s:06d}.tar"
            storage.put_atomic(f"{url}/{name}", data)
            infos.append(ShardInfo(name, PER_SHARD, full, hashlib.sha256(data).hexdigest()))
        stats = {
            "count": N,
            "width": SIZE,
            "height": SIZE,
            "mode": "L",
            "channels": 1,
            "mean": [0.5],
            "std": [0.29],
            "encoding": "png",
            "classes": [],
        }
        write_manifest(Manifest(split="train", shards=infos, stats=stats), url)
    return url


def cli(tmp: Path, command: str, doc: dict, env: dict) -> subprocess.CompletedProcess:
    path = tmp / f"{command}-{doc['config'].get('scaling', {}).get('name', 'job')}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return subprocess.run(
        [sys.executable, "-m", "pipeline", command, str(path)],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=360,
    )


@pytest.fixture(scope="module")
def env(s3, mlflow_server, ray_cluster, tmp_path_factory) -> dict:
    """The commands' environment: the cluster's client settings, S3 credentials and an MLflow
    password planted as secrets (the tracking server has no auth: it ignores them)."""
    tmp = tmp_path_factory.mktemp("e2e")
    return {
        **os.environ,
        **s3.env,
        "RAY_ADDRESS": ray_cluster.address,
        "PIPELINE_STACK_DIR": str(tmp / "no-stack"),
        "MLFLOW_TRACKING_URI": mlflow_server.uri,
        "MLFLOW_TRACKING_USERNAME": "pipeline",
        "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
    }


def train_doc(
    url: str, mlflow_server, name: str, sd_dir: str = "", data: dict | None = None
) -> dict:
    data_cfg = {"train_url": url, "num_workers": 0, "shuffle_buffer": 64, **(data or {})}
    return {
        "kind": "train",
        "entrypoint": "python -m pipeline train job.yaml",
        "runtime_env": {
            "env_vars": {
                "PIPELINE_FAULT_NAN_STEP": "5",
                # the endpoint stays up until Prometheus has scraped it once more
                **({"PIPELINE_METRICS_LINGER": "60"} if sd_dir else {}),
            }
        },
        "config": {
            "data": data_cfg,
            "model": {"image_size": SIZE, "in_channels": 1, "channels": [8, 16], "latent_dim": 8},
            "optim": {
                "epochs": 2,
                "batch_size": BATCH,
                "lr": 3e-3,
                "warmup_steps": 2,
                "checkpoint_every": 8,
                "log_every": 4,
                "eval_batches": 1,
                "iwae_k": 4,
                "iwae_images": 8,
            },
            "scaling": {
                "num_workers": 1,
                "storage_path": f"s3://{BUCKET}/ckpt",
                "name": name,
                "max_failures": 0,
            },
            "tracking": {
                "mlflow_uri": mlflow_server.uri,
                "experiment": f"rel-{name}",
                "registered_model": f"rel-{name}",
                "metrics_sd_dir": sd_dir,
            },
        },
    }


def history(uri: str, run_id: str, key: str) -> dict[int, float]:
    return dict(metric_history(uri, run_id, key))


def only_run(uri: str, experiment: str):
    runs = experiment_runs(uri, experiment)
    assert len(runs) == 1, runs
    return runs[0]


def test_bad_data_and_nan_are_skipped_and_counted(
    bad_data, env, mlflow_server, prometheus, tmp_path
):
    doc = train_doc(bad_data, mlflow_server, "e2e-bad", str(prometheus.targets_dir))
    res = OUTPUT["train"] = cli(tmp_path, "train", doc, env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    logs = res.stdout + res.stderr
    assert "step 5: non-finite loss or gradient, step skipped (1 so far)" in logs
    assert f"{bad_data}/shard-000007.tar: " in logs and "(truncated)" in logs  # preflight warns

    run = only_run(mlflow_server.uri, "rel-e2e-bad")
    assert run.info.status == "FINISHED"
    steps = 2 * N // BATCH  # every position of both epochs trained: bad samples are padded
    assert sorted(history(mlflow_server.uri, run.info.run_id, "train/loss")) == list(
        range(4, 33, 4)
    )
    bad = history(mlflow_server.uri, run.info.run_id, "data/bad_samples")
    per_epoch = sum(BAD_PER_EPOCH.values())  # 18
    assert bad[steps // 2] == per_epoch and bad[steps] == 2 * per_epoch
    for reason, n in BAD_PER_EPOCH.items():
        assert (
            history(mlflow_server.uri, run.info.run_id, f"data/bad_samples.{reason}")[steps]
            == 2 * n
        )
    skipped = history(mlflow_server.uri, run.info.run_id, "train/skipped_steps")
    assert skipped[4] == 0 and skipped[8] == 1 and skipped[steps] == 1

    def prom(metric: str) -> float:
        result = prometheus.query(f'max_over_time({metric}{{run="e2e-bad"}}[10m])')
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    assert prom("vae_train_bad_samples_total") == 2 * per_epoch
    assert prom("vae_train_skipped_steps_total") == 1
    assert prom("vae_train_step") == steps


def test_error_budget_exceeded_fails_in_one_line(bad_data, env, mlflow_server, tmp_path):
    doc = train_doc(bad_data, mlflow_server, "e2e-budget", data={"max_bad_samples": 4})
    doc["config"]["scaling"]["max_failures"] = 2  # Ray Train would replay the run twice
    keys = tmp_path / "keys"
    keys.mkdir()
    doc["runtime_env"]["env_vars"]["PIPELINE_RECORD_KEYS_DIR"] = str(keys)
    res = OUTPUT["budget"] = cli(tmp_path, "train", doc, env)
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    # one error line, the last thing printed (after the streamed worker logs)
    assert len(errors) == 1 and res.stderr.rstrip().endswith(errors[0]), res.stderr[-3000:]
    assert errors[0].startswith("error: training run 'e2e-budget' failed: BadDataError: rank 0: ")
    assert "exceed max_bad_samples=4; last: " in errors[0]
    assert f"{bad_data}/shard-0000" in errors[0]
    # the restarts failed at once from the recorded failure instead of re-reading the data:
    # every step's batch was read once (a replay would log a step's keys twice)
    assert "; not retried: a restart would fail the same way)" in errors[0]
    steps = Counter(ln.rsplit(" ", 1)[0] for ln in (keys / "rank0.txt").read_text().splitlines())
    assert steps and set(steps.values()) == {BATCH}, steps
    run = only_run(mlflow_server.uri, "rel-e2e-budget")
    assert run.info.status == "FAILED"
    counted = history(mlflow_server.uri, run.info.run_id, "data/bad_samples")
    assert max(counted.values()) > 4  # counted up to the failure


def test_sampling_job(bad_data, env, mlflow_server, tmp_path):
    doc = {
        "kind": "sample",
        "entrypoint": "python -m pipeline sample job.yaml",
        "config": {
            "sample": {
                "output_url": f"s3://{BUCKET}/galleries",
                "model_name": "rel-e2e-bad",
                "data_url": bad_data,
                "temperatures": [1.0],
                "grid_rows": 4,
                "grid_cols": 4,
                "interpolation_pairs": 2,
                "traversal_dims": 2,
            },
            "tracking": {"mlflow_uri": mlflow_server.uri, "experiment": "rel-e2e-galleries"},
        },
    }
    res = OUTPUT["sample"] = cli(tmp_path, "sample", doc, env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"gallery written: s3://{BUCKET}/galleries/rel-e2e-bad/v1/" in res.stdout


def _files(root: Path):
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                yield path
        except OSError:
            continue


def test_planted_secrets_appear_nowhere(s3, mlflow_server, ray_cluster, services_dir, tmp_path):
    assert set(OUTPUT) == {"train", "budget", "sample"}, "run the whole module"
    planted = {
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
        "RAY_AUTH_TOKEN": ray_cluster.head.token,
    }
    needles = {name: value.encode() for name, value in planted.items()}
    found: list[str] = []

    def search(where: str, data: bytes) -> None:
        found.extend(f"{name} in {where}" for name, v in needles.items() if v in data)

    # 0. the search works: the S3 server's identity file (0600) holds the secret, by design
    control = (services_dir / "seaweedfs" / "s3.json").read_bytes()
    assert needles["AWS_SECRET_ACCESS_KEY"] in control
    assert all(len(v) >= 20 for v in planted.values())  # unique values, no accidental hits
    # 1. what the commands printed (the driver, and every Ray worker via log_to_driver)
    for name, res in OUTPUT.items():
        search(f"{name} output", (res.stdout + res.stderr).encode())
    # 2. every log and file of the Ray session (worker logs, runtime env agent, GCS, jobs)
    ray_files = list(_files(ray_cluster.head.temp_dir))
    assert any(p.name.startswith("worker-") for p in ray_files), "no Ray worker logs found"
    # the jobs Ray knows of, with their runtime envs (what the drivers handed to ray.init)
    from ray.util.state import list_jobs

    jobs = list_jobs(address=ray_cluster.dashboard_url, detail=True, limit=1000)
    assert any("PIPELINE_FAULT_NAN_STEP" in repr(j) for j in jobs), jobs
    search("Ray job table (runtime envs)", repr(jobs).encode())
    # 3. the services' own logs (MLflow, SeaweedFS, Ray head, Prometheus)
    log_files = list(_files(services_dir / "logs"))
    assert any(p.name == "mlflow.log" for p in log_files)
    for path in ray_files + log_files:
        search(str(path), path.read_bytes())
    # 4. MLflow: params, tags, metric keys and artifacts of every run, registry tags
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    runs = [
        r
        for name in ("rel-e2e-bad", "rel-e2e-budget", "rel-e2e-galleries")
        for r in client.search_runs([client.get_experiment_by_name(name).experiment_id])
    ]
    assert len(runs) == 3
    for r in runs:
        record = repr((r.data.params, r.data.tags, sorted(r.data.metrics)))
        search(f"MLflow run {r.info.run_id}", record.encode())
        dst = tmp_path / r.info.run_id
        dst.mkdir()
        client.download_artifacts(r.info.run_id, "", str(dst))
        for path in _files(dst):
            search(f"artifact {path.relative_to(tmp_path)}", path.read_bytes())
    for mv in client.search_model_versions("name = 'rel-e2e-bad'"):
        search(f"model version {mv.version}", repr((mv.tags, mv.source)).encode())
    # 5. checkpoints (state.json holds the config) and galleries on S3
    fs, root = storage.get_fs(f"s3://{BUCKET}", {})
    objects = [p for p in fs.find(root) if "/bad/" not in p]
    assert any(p.endswith("state.json") for p in objects) and any("galleries" in p for p in objects)
    for p in objects:
        search(f"s3://{p}", fs.cat_file(p))
    assert not found, found


@pytest.fixture(autouse=True)
def _s3_client_env(s3, monkeypatch):
    for k, v in s3.env.items():  # this process reads S3 (storage.get_fs) in the last test
        monkeypatch.setenv(k, v)
