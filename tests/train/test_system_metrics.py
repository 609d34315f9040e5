"""MLflow system metrics on every training run: rank 0's tracker samples its node (CPU,
memory; GPU utilization and memory where NVML finds a GPU) into the run, against a real
MLflow server."""

from __future__ import annotations

import secrets

import pytest
import torch

from pipeline.train.tracking import RUN_TAG, STORE_TAG, RunSpec, Tracker
from tests.helpers import wait_for


def spec(uri: str, interval: float) -> RunSpec:
    name = "sysmetrics-" + secrets.token_hex(3)
    return RunSpec(
        uri,
        name,
        name,
        {RUN_TAG: name, STORE_TAG: f"/ckpt/{name}"},
        {},
        system_metrics_interval=interval,
    )


@pytest.mark.timeout(120)
def test_tracker_logs_system_metrics_into_the_run(mlflow_server):
    from mlflow.tracking import MlflowClient

    tracker = Tracker(spec(mlflow_server.uri, 1.0))
    tracker.metrics({"loss": 1.0}, 1)
    assert tracker.flush(wait=30)
    try:
        client = MlflowClient(mlflow_server.uri)

        def system_keys():
            keys = set(client.get_run(tracker.run_id).data.metrics)
            return {k for k in keys if k.startswith("system/")}

        keys = wait_for(system_keys, 30, "system metrics in the run")
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
        if torch.cuda.is_available():  # pragma: no cover - needs a GPU
            assert any(k.startswith("system/gpu_0_") for k in keys), keys
        hist = client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")
        assert all(0 <= m.value <= 100 for m in hist)
    finally:
        tracker.system.finish()


def test_interval_zero_turns_them_off(mlflow_server):
    tracker = Tracker(spec(mlflow_server.uri, 0.0))
    tracker.metrics({"loss": 1.0}, 1)
    assert tracker.flush(wait=30)
    assert tracker.system is None
