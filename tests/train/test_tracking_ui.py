"""A training run as its user sees it: the driver's output (the `make demo` path, a
``pipeline train`` process) and the MLflow run page in headless Chromium."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from pipeline.train.tracking import METRIC_GROUPS
from pipeline.typed import to_dict
from tests.helpers import ARTIFACTS, BATCH, N_TRAIN, ROOT, chromium, chromium_bin, make_job

pytestmark = pytest.mark.slow
PROGRESS = re.compile(r"epoch \d+ step \d+/\d+ \|")


@pytest.fixture(scope="module")
def trained(fmnist_url, mlflow_server, ray_cluster, s3, tmp_path_factory):
    """``pipeline train`` in its own process, 2 workers, 1 epoch; its stdout and the run."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("ui")
    job = make_job(fmnist_url, mlflow_server, str(tmp / "ckpt"), "ui", 2, epochs=1)
    path = tmp / "train.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kind": "train",
                "entrypoint": f"python -m pipeline train {path}",
                "config": to_dict(job),
            }
        )
    )
    env = {**os.environ, **s3.env, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", str(path), "--address", ray_cluster.address],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("test-ui")
    (run,) = client.search_runs([exp.experiment_id])
    return {"stdout": out.stdout + out.stderr, "run": run, "exp": exp, "client": client}


def test_each_progress_line_is_printed_once(trained):
    lines = [ln for ln in trained["stdout"].splitlines() if PROGRESS.search(ln)]
    steps = N_TRAIN // (2 * BATCH)  # 2 workers, one epoch
    # "(RayTrainWorker pid=...) epoch 0 step 4/16 | ...": the text after the worker prefix
    texts = Counter(PROGRESS.search(ln).group(0) for ln in lines)
    assert sorted(texts) == sorted(f"epoch 0 step {s}/{steps} |" for s in range(4, steps + 1, 4))
    assert set(texts.values()) == {1}, texts


def test_metrics_are_grouped_and_the_experiment_opens_on_training_runs(trained):
    keys = set(trained["run"].data.metrics)
    groups = {k.split("/", 1)[0] for k in keys if "/" in k}
    assert not {k for k in keys if "/" not in k}, keys  # nothing left ungrouped
    assert groups <= {"train", "eval", "data", "system"}
    assert {f"train/{k}" for k in ("loss", "neg_elbo_bits_per_dim", "rate_bits")} <= keys
    assert {"eval/neg_elbo_bits", "eval/rate_bits", "eval/distortion_bits"} <= keys
    assert {"data/images_per_second", "data/data_wait_fraction", "data/bad_samples"} <= keys
    assert {f"data/{k}" for k in METRIC_GROUPS["data"]} <= keys
    assert trained["exp"].tags["mlflow.experimentKind"] == "custom_model_development"
    (mv,) = trained["client"].search_model_versions("name='test-ui'")
    assert mv.run_id == trained["run"].info.run_id
    assert trained["run"].info.run_id in mv.description


def test_run_page_shows_the_elbo_chart_and_the_reconstructions(trained, mlflow_server):
    """The run's Model metrics tab in headless Chromium: an ELBO chart in the train section,
    and the reconstruction images logged at the end of the epoch."""
    chromium_bin()
    run = trained["run"]
    url = (
        f"{mlflow_server.uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        f"/model-metrics?workflowType=machine_learning"
    )
    shot = ARTIFACTS / "mlflow_run_page.png"
    dom = chromium(url, screenshot=shot, budget_ms=30_000, height=7000)  # all sections
    print(f"screenshot: {shot}")
    assert "train/neg_elbo_bits_per_dim" in dom and "eval/neg_elbo_bits" in dom
    images = re.findall(r'<img[^>]+src="(get-artifact\?path=images%2F[^"]+)"', dom)
    assert any("reconstructions" in src for src in images), images
