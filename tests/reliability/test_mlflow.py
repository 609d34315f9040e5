"""MLflow down at start or mid-run: training goes on, metrics are buffered and flushed when
MLflow is back, with a warning, into one run whose step axis has no gaps and no repeats.

Each test starts its own MLflow server (sqlite in a temp dir) on a free port, stops it and
restarts it on the same port and database.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pipeline import stack
from pipeline.train import driver
from pipeline.train.tracking import (
    RUN_TAG,
    STORE_TAG,
    RunSpec,
    Tracker,
    find_or_create_run,
    public_uri,
)
from tests.helpers import BATCH, N_TRAIN, make_job, metric_history


@pytest.fixture
def own_mlflow():
    """A dedicated MLflow server, not started; stopped and removed afterwards."""
    state = Path(tempfile.mkdtemp(prefix="pl-mf-", dir="/tmp"))
    svc = stack.MlflowServer(state)
    try:
        yield svc
    finally:
        svc.stop()
        shutil.rmtree(state, ignore_errors=True)


def spec_for(svc, name: str) -> RunSpec:
    return RunSpec(
        svc.uri,
        f"rel-{name}",
        name,
        {RUN_TAG: name, STORE_TAG: f"/ckpt/{name}"},
        {"optim.lr": "0.001", "model.latent_dim": "8"},
    )


@pytest.mark.services  # its own MLflow server, stopped and restarted
@pytest.mark.timeout(240)
def test_tracker_buffers_while_down_and_flushes_exact_steps(own_mlflow, capsys, monkeypatch):
    spec = spec_for(own_mlflow, "buffered")

    # Down at start: the driver gives up after its bound and trains on with no run id.
    monkeypatch.setenv("PIPELINE_MLFLOW_WAIT", "2")
    t0 = time.monotonic()
    assert driver._mlflow_run(spec) == ""
    assert time.monotonic() - t0 < 10
    out = capsys.readouterr().out
    assert f"warning: MLflow at {own_mlflow.uri} unreachable for 2s; training starts anyway" in out

    tracker = Tracker(spec, run_id="")  # rank 0 of that run
    for step in range(1, 4):
        tracker.metrics({"loss": 10.0 - step}, step)
    assert tracker.flush() is False and tracker.pending == 3 and tracker.run_id == ""
    t0 = time.monotonic()
    assert tracker.flush() is False  # while down, attempts are spaced: no cost to training
    assert time.monotonic() - t0 < 0.1
    assert capsys.readouterr().out.count("unreachable") == 1  # warned once per outage

    # MLflow comes up: the run is created with its tags and params, steps 1-3 land.
    own_mlflow.start()
    assert tracker.flush(wait=30) is True and tracker.pending == 0
    run_id = tracker.run_id
    assert run_id and find_or_create_run(spec) == run_id  # the driver would find this run
    from mlflow.tracking import MlflowClient

    run = MlflowClient(own_mlflow.uri).get_run(run_id)
    assert run.data.tags[RUN_TAG] == "buffered" and run.data.params["optim.lr"] == "0.001"
    for step in range(4, 7):
        tracker.metrics({"loss": 10.0 - step}, step)
    assert tracker.flush() is True
    assert "reachable again" in capsys.readouterr().out

    # Down mid-run: buffered, flush reports False, nothing is lost.
    own_mlflow.stop()
    for step in range(7, 13):
        tracker.metrics({"loss": 10.0 - step}, step)
    assert tracker.flush() is False and tracker.pending == 6
    assert f"warning: MLflow at {own_mlflow.uri} unreachable" in capsys.readouterr().out

    # Back on the same port and database: everything buffered is flushed, once.
    own_mlflow.start()
    for step in range(13, 16):
        tracker.metrics({"loss": 10.0 - step}, step)
    assert tracker.flush(wait=30) is True and tracker.pending == 0
    assert metric_history(own_mlflow.uri, run_id, "train/loss") == [
        (s, 10.0 - s) for s in range(1, 16)
    ]

    # A Tracker restarted from an older checkpoint (steps 1-9 replayed) logs no step twice.
    again = Tracker(spec, run_id=run_id)
    for step in range(10, 19):
        again.metrics({"loss": 10.0 - step}, step)
    assert again.flush() is True
    assert metric_history(own_mlflow.uri, run_id, "train/loss") == [
        (s, 10.0 - s) for s in range(1, 19)
    ]


def test_uri_credentials_never_printed():
    assert public_uri("https://alice:s3cr3t@mlflow.example.com/api") == (
        "https://mlflow.example.com/api"
    )
    assert public_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


@pytest.mark.slow
@pytest.mark.services  # its own MLflow server, and the session's Ray cluster
@pytest.mark.timeout(420)
def test_training_with_mlflow_down_at_start(
    own_mlflow, fmnist_url, ray_session, monkeypatch, tmp_path, capsys
):
    """A real 1-worker run: MLflow is down when the driver starts and comes up mid-run.
    Training never waits for it; the run appears with params, tags and every logged step."""
    monkeypatch.setenv("PIPELINE_MLFLOW_WAIT", "1")  # the driver's bound
    keys_dir = ray_session(PIPELINE_MLFLOW_WAIT="120")  # the worker's last flush may wait
    job = make_job(fmnist_url, own_mlflow, str(tmp_path / "ckpt"), "mlflow-down", 1)
    started = threading.Event()

    def start_when_training():
        deadline = time.monotonic() + 300
        while not (keys_dir / "rank0.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        started.set()  # steps are being taken while MLflow is down
        own_mlflow.start()

    t = threading.Thread(target=start_when_training, daemon=True)
    t.start()
    res = driver.run_training(job)
    t.join(150)
    assert started.is_set()
    out = capsys.readouterr().out
    assert f"warning: MLflow at {own_mlflow.uri} unreachable for 1s; training starts anyway" in out
    steps = 2 * N_TRAIN // BATCH
    assert res.metrics["step"] == steps

    from mlflow.tracking import MlflowClient

    client = MlflowClient(own_mlflow.uri)
    exp = client.get_experiment_by_name("test-mlflow-down")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [res.run_id]  # one run, made by the worker
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags[RUN_TAG] == "mlflow-down"
    assert run.data.params["optim.batch_size"] == str(BATCH)
    assert [s for s, _ in metric_history(own_mlflow.uri, res.run_id, "train/loss")] == list(
        range(4, steps + 1, 4)
    )
    assert [s for s, _ in metric_history(own_mlflow.uri, res.run_id, "eval/neg_elbo_bits")] == [
        steps // 2,
        steps,
    ]
    assert res.model_version == "1"
