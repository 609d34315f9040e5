"""MLflow stopped mid-run and never back: training still ends with its checkpoint (exit 0),
with a warning from the worker's last flush and from the driver; the model is not
registered. The test starts its own MLflow server and stops it for good."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pipeline import stack
from pipeline.train import checkpoint, driver
from tests.helpers import BATCH, N_TRAIN, make_job, wait_for


@pytest.mark.slow
@pytest.mark.services  # its own MLflow server, and the session's Ray cluster
@pytest.mark.timeout(420)
def test_mlflow_gone_at_the_end_keeps_the_checkpoint(
    fmnist_url, ray_session, monkeypatch, tmp_path, capfd
):
    state = Path(tempfile.mkdtemp(prefix="pl-mf-", dir="/tmp"))
    mlflow = stack.MlflowServer(state)
    try:
        mlflow.start()
        monkeypatch.setenv("PIPELINE_MLFLOW_WAIT", "2")  # the driver's bound at the end
        keys_dir = ray_session(PIPELINE_MLFLOW_WAIT="2")  # the worker's last flush
        job = make_job(fmnist_url, mlflow, str(tmp_path / "ckpt"), "mlflow-gone", 1, epochs=1)
        stopped = threading.Event()

        def stop_when_training():
            deadline = time.monotonic() + 300
            while not (keys_dir / "rank0.txt").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            mlflow.stop()
            stopped.set()

        t = threading.Thread(target=stop_when_training, daemon=True)
        t.start()
        res = driver.run_training(job)
        t.join(60)
        assert stopped.is_set()
        assert res.metrics["step"] == N_TRAIN // BATCH
        assert res.model_version is None and res.model_uri is None
        saved = checkpoint.load(res.checkpoint_url)
        assert saved["state"]["step"] == N_TRAIN // BATCH
        out = []

        def warned() -> bool:
            out.append(capfd.readouterr().out)
            text = "".join(out)
            return (
                f"warning: MLflow at {mlflow.uri} unreachable; the model is not registered "
                f"(checkpoint {res.checkpoint_url})"
                in text
                and f"warning: MLflow at {mlflow.uri} still unreachable at the end of training"
                in text
            )

        wait_for(warned, 30, "both warnings")
    finally:
        mlflow.stop()
        shutil.rmtree(state, ignore_errors=True)
