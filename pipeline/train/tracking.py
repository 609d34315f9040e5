"""MLflow tracking that never stops training: buffered, flushed in batches, retried.

Only rank 0 holds a :class:`Tracker`. Metrics are buffered and flushed when a checkpoint
is written, so after a worker failure the steps replayed from the last checkpoint are
logged once: the run's step axis has no gaps and no repeats.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

MAX_BUFFER = 200_000  # metric points kept while the server is down
BATCH = 1000  # MLflow's log_batch limit


def configure_client_timeouts(timeout: int = 10, retries: int = 1) -> None:
    """Bound each MLflow HTTP call; our own buffer does the retrying."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


class Tracker:
    """Buffered metric and image logging into one existing MLflow run."""

    def __init__(self, uri: str, run_id: str, probe: str = "loss"):
        from mlflow.tracking import MlflowClient

        configure_client_timeouts()
        self.client = MlflowClient(uri)
        self.uri, self.run_id = uri, run_id
        self._metrics: list[Any] = []
        self._images: list[tuple[Any, str, int]] = []
        self._warned = False
        self.dropped = 0
        # After a failure Ray may resume from a checkpoint older than the last flush (the
        # controller registers checkpoints asynchronously): steps MLflow already has are not
        # logged again, so the step axis never repeats.
        self.logged_through = -1
        try:
            history = self.client.get_metric_history(run_id, probe)
            self.logged_through = max((m.step for m in history), default=-1)
        except Exception:
            pass  # MLflow down: the checkpoint's own flush point is the best we know

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), now, step) for k, v in values.items()]
        if len(self._metrics) > MAX_BUFFER:  # keep the newest; say how many were lost
            self.dropped += len(self._metrics) - MAX_BUFFER
            self._metrics = self._metrics[-MAX_BUFFER:]

    def image(self, array, key: str, step: int) -> None:
        if step > self.logged_through:
            self._images.append((array, key, step))

    def flush(self) -> bool:
        """Send everything buffered. Returns False (and keeps the buffer) if MLflow is down."""
        try:
            while self._metrics:
                self.client.log_batch(self.run_id, metrics=self._metrics[:BATCH])
                self._metrics = self._metrics[BATCH:]
            while self._images:
                array, key, step = self._images[0]
                self.client.log_image(self.run_id, array, key=key, step=step)
                self._images.pop(0)
        except Exception as e:  # server down, timeout, 5xx: keep buffering, never crash training
            if not self._warned:
                log.warning("MLflow at %s unreachable (%s); buffering %d points and retrying "
                            "at the next checkpoint", self.uri, type(e).__name__, len(self._metrics))
                print(f"warning: MLflow at {self.uri} unreachable; buffering metrics", flush=True)
                self._warned = True
            return False
        if self._warned:
            print(f"MLflow at {self.uri} reachable again; buffered metrics flushed", flush=True)
            self._warned = False
        return True
