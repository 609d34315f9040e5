"""Rate-distortion sweeps on a real local Ray cluster (Ray Tune trials, each a Ray Train
run), data on SeaweedFS, a real MLflow server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image

from pipeline.sweep import results
from pipeline.sweep.config import SweepJob
from pipeline.sweep.driver import CURVE_PNG, CURVE_TABLE, GALLERY_PNG, run_sweep
from pipeline.sweep.trial import PARENT_TAG
from pipeline.typed import build, to_dict
from tests.helpers import ROOT, make_job, wait_for

pytestmark = pytest.mark.slow

EVAL_RATE_KEYS = ("eval/rate_bits", "eval_rate_bits")  # MLflow's key, grouped or not
WEIGHTS = [0.1, 1.0, 10.0]  # a decade apart: the ordering holds after a few steps


def sweep_job(fmnist_url, mlflow_server, storage, name, **sweep) -> SweepJob:
    """tests.helpers.make_job's small bernoulli VAE (1 worker, 1 epoch) at ``WEIGHTS``."""
    train = make_job(fmnist_url, mlflow_server, storage, name, 1, epochs=1, checkpoint_every=8)
    return build(SweepJob, {**to_dict(train), "sweep": {"kl_weights": WEIGHTS, **sweep}})


def child_runs(uri: str, experiment: str, parent: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'")


def test_three_point_sweep_curve_children_and_best_model(
    fmnist_url, mlflow_server, ray_env, s3_env, tmp_path
):
    from mlflow.tracking import MlflowClient

    job = sweep_job(fmnist_url, mlflow_server, str(tmp_path / "ray"), "rd")
    res = run_sweep(job, address=ray_env.address)

    names = ["rd-kl0.1", "rd-kl1", "rd-kl10"]
    assert sorted(res.results) == sorted(names) and sorted(res.trained) == sorted(names)
    assert res.skipped == []
    points = [res.results[n] for n in names]  # in KL-weight order
    assert all(p.status == "finished" for p in points)
    rate = [p.rate_bits for p in points]
    distortion = [p.distortion_bits for p in points]
    assert rate[0] > rate[1] > rate[2] >= 0, rate  # more weight on the rate buys less of it
    assert distortion[0] < distortion[1] < distortion[2], distortion  # ... at more distortion
    for p in points:
        assert p.neg_elbo_bits == pytest.approx(p.rate_bits + p.distortion_bits, rel=1e-4)
        assert p.step == 1024 // 32  # one epoch of tests.helpers' 1024 images, batch 32

    # MLflow: one parent, three finished children with their own KL weight and held-out rate
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = child_runs(mlflow_server.uri, "test-rd", res.parent_run_id)
    assert sorted(c.info.run_name for c in children) == sorted(names)
    assert all(c.info.status == "FINISHED" for c in children)
    by_name = {c.info.run_name: c for c in children}
    for p in points:
        c = by_name[p.name]
        assert c.info.run_id == p.run_id
        assert float(c.data.params["optim.kl_weight"]) == p.kl_weight
        logged = {k: v for k, v in c.data.metrics.items() if k in EVAL_RATE_KEYS}
        assert list(logged.values()) == [pytest.approx(p.rate_bits, rel=1e-6)], logged

    # the curve: a PNG and a table of the three points in the parent run
    arts = {a.path for a in client.list_artifacts(res.parent_run_id)}
    assert {CURVE_PNG, CURVE_TABLE, GALLERY_PNG} <= arts, arts
    png = client.download_artifacts(res.parent_run_id, CURVE_PNG, str(tmp_path))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    gallery = client.download_artifacts(res.parent_run_id, GALLERY_PNG, str(tmp_path))
    with Image.open(gallery) as im:  # a row of data, then a row per point: 4 rows of 28 px tiles
        assert im.height > 4 * 28 * 2, im.size
    table_path = client.download_artifacts(res.parent_run_id, CURVE_TABLE, str(tmp_path))
    table = json.loads(open(table_path).read())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert sorted(r["name"] for r in rows) == sorted(names)

    # the best model: the lowest held-out -ELBO, registered under the sweep's alias
    best = min(points, key=lambda p: p.neg_elbo_bits)
    assert res.best.name == best.name and parent.data.tags["rd.best_point"] == best.name
    mv = client.get_model_version_by_alias("test-rd", "rd-best")
    assert mv.tags["train_run_id"] == best.run_id and res.model_uri == "models:/test-rd@rd-best"


def test_killed_sweep_driver_resumes_without_rerunning_finished_points(
    fmnist_url, mlflow_server, ray_env, s3_env, tmp_path
):
    """SIGKILL the sweep's driver (`pipeline sweep`) once the first point is recorded; the
    same yaml relaunched finishes the sweep and does not train that point again. Two points
    (the first is killed after, the second is left): a third would only repeat the second."""
    weights = [WEIGHTS[0], WEIGHTS[-1]]
    job = sweep_job(
        fmnist_url,
        mlflow_server,
        str(tmp_path / "ray"),
        "rdkill",
        max_concurrent=1,
        kl_weights=weights,
    )
    spec = tmp_path / "rd-sweep.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "kind": "sweep",
                "entrypoint": f"python -m pipeline sweep {spec}",
                "config": to_dict(job),
            }
        )
    )
    points_url = results.points_url(job.root)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "sweep", str(spec), "--address", ray_env.address],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    try:
        first = wait_for(lambda: results.read_all(points_url), 240, "the first point's record")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started locally
        proc.wait()
    assert len(first) == 1, first
    (done,) = first.values()
    time.sleep(3)  # Ray notices the dead driver and ends its trials

    res = run_sweep(job, address=ray_env.address)
    assert res.skipped == [done.name]
    assert res.trained == [({"rdkill-kl0.1", "rdkill-kl10"} - {done.name}).pop()]
    assert res.results[done.name] == done  # its record untouched: not trained again
    children = child_runs(mlflow_server.uri, "test-rdkill", res.parent_run_id)
    assert sorted(c.info.run_name for c in children) == sorted(res.results), [
        c.info.run_name for c in children
    ]  # one child run per point: none duplicated by the relaunch
    assert {c.info.run_id for c in children} == {r.run_id for r in res.results.values()}
    assert all(c.info.status == "FINISHED" for c in children)
    rate = [res.results[f"rdkill-kl{w:g}"].rate_bits for w in weights]
    assert rate[0] > rate[1], rate
