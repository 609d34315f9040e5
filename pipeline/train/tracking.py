"""MLflow tracking that never stops training: buffered, flushed in batches, retried.

Only rank 0 holds a :class:`Tracker`. Metrics are buffered and flushed when a checkpoint
is written, so after a worker failure the steps replayed from the last checkpoint are
logged once: the run's step axis has no gaps and no repeats.

MLflow may be down when training starts: the driver waits a bounded time
(``PIPELINE_MLFLOW_WAIT`` seconds) for it, then trains anyway with an empty run id. The
Tracker creates (or finds) the run the first time MLflow answers, from the :class:`RunSpec`
the driver handed down, and flushes everything buffered since step 1. Once attached, it
also samples MLflow's system metrics (``system/...``: CPU, memory, disk, network, and GPU
utilization and memory where NVML is present) of its node into the run.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.train.config import TrainJob
from pipeline.typed import flatten, to_dict

log = logging.getLogger(__name__)

MAX_BUFFER = 200_000  # metric points kept while the server is down
BATCH = 1000  # MLflow's log_batch limit
RUN_TAG = "pipeline.ray_run"
STORE_TAG = "pipeline.storage_path"
WAIT_ENV = "PIPELINE_MLFLOW_WAIT"
DEFAULT_WAIT = 30.0  # seconds the driver (start, end) and the last flush wait for MLflow
RETRY_MIN, RETRY_MAX = 2.0, 30.0  # seconds between attempts while MLflow is down
# The MLflow UI lists an experiment of this kind on its training runs (not the GenAI overview).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
WORKFLOW = "?workflowType=machine_learning"  # a UI link's query: the model-training view

# The MLflow key of each metric the loop logs, grouped by prefix: the UI draws one section per
# prefix, so the ELBO, rate and distortion curves are not lost in one alphabetical list.
# train/: the objective and the optimizer; eval/: held-out numbers (the loop's ``eval_*``);
# data/: the input pipeline and checkpoint I/O; system/ is MLflow's own. The loop and the Ray
# reports keep the short names; Prometheus names are separate (pipeline.train.metrics).
METRIC_GROUPS = {
    "train": (
        "loss",
        "neg_elbo_bits_per_dim",
        "rate_bits",
        "distortion_bits",
        "grad_norm",
        "lr",
        "kl_weight",
        "epoch",
        "skipped_steps",
        "gpu_memory_peak_mb",
    ),
    "data": (
        "images_per_second",
        "data_wait_fraction",
        "bad_samples",  # and bad_samples.<reason>
        "checkpoint_seconds",
    ),
}
_GROUP_OF = {name: group for group, names in METRIC_GROUPS.items() for name in names}


def metric_key(name: str) -> str:
    """The MLflow key of the loop's metric ``name``: ``loss`` -> ``train/loss``,
    ``eval_neg_elbo_bits`` -> ``eval/neg_elbo_bits``, ``bad_samples.decode_error`` ->
    ``data/bad_samples.decode_error``. A name in no group is a ``ValueError``."""
    if name.startswith("eval_"):
        return f"eval/{name.removeprefix('eval_')}"
    group = _GROUP_OF.get(name.split(".", 1)[0])
    if group is None:
        raise ValueError(f"metric {name!r} has no group in pipeline.train.tracking.METRIC_GROUPS")
    return f"{group}/{name}"


def configure_client_timeouts(timeout: int = 10, retries: int = 1) -> None:
    """Bound each MLflow HTTP call; our own buffer does the retrying."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def public_uri(uri: str) -> str:
    """``uri`` without any ``user:password@`` part, for messages."""
    scheme, sep, rest = uri.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}{sep}{host.rsplit('@', 1)[-1]}{slash}{path}" if sep else uri


def ui_url(tracking_uri: str, experiment_id: str, run_id: str, artifact: str = "") -> str:
    """The MLflow UI page of a run (or of one of its artifacts); "" if the tracking URI is not
    an HTTP server. The UI (3.17) keeps a GenAI/model-training switch per browser, GenAI by
    default: ``WORKFLOW`` opens it on model training whatever the browser last used."""
    if not tracking_uri.startswith(("http://", "https://")):
        return ""
    page = f"{public_uri(tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return (f"{page}/artifacts/{artifact}" if artifact else page) + WORKFLOW


def mlflow_wait() -> float:
    """Seconds to wait for an unreachable MLflow where waiting is worth it (env override)."""
    try:
        return max(0.0, float(os.environ.get(WAIT_ENV, DEFAULT_WAIT)))
    except ValueError:
        return DEFAULT_WAIT


def storage_path(path: str) -> str:
    """``path`` as Ray Train and the run's tag see it: a URL, or an absolute local path."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def config_params(job: TrainJob) -> dict[str, str]:
    """The flattened config as MLflow params (values as strings, capped at MLflow's limit)."""
    return {k: str(v)[:6000] for k, v in flatten(to_dict(job)).items()}


@dataclass
class RunSpec:
    """Everything needed to find or create a training job's MLflow run, built on the driver
    (where relative storage paths resolve) and handed to rank 0."""

    uri: str
    experiment: str
    run_name: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    system_metrics_interval: float = 10.0  # seconds; 0: no system metrics

    @classmethod
    def from_job(cls, job: TrainJob) -> RunSpec:
        store = storage_path(job.scaling.storage_path)
        return cls(
            job.tracking.mlflow_uri,
            job.tracking.experiment,
            job.scaling.name,
            {RUN_TAG: job.scaling.name, STORE_TAG: store},
            config_params(job),
            job.tracking.system_metrics_interval,
        )


def ensure_experiment(client, name: str) -> str:
    """The id of experiment ``name``, created if need be, of the :data:`EXPERIMENT_KIND` (an
    existing experiment of no kind gets it; one a user gave another kind keeps theirs)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags=EXPERIMENT_KIND)
        except Exception:  # created concurrently
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    for k, v in EXPERIMENT_KIND.items():
        if k not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


def find_or_create_run(spec: RunSpec, client=None, create: bool = True) -> str:
    """The unfinished run tagged with this Ray run name + storage path, else a new one with
    the params logged ("" if none and not ``create``). Raises whatever MLflow raises."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    configure_client_timeouts()
    client = client or MlflowClient(spec.uri)
    if not create and client.get_experiment_by_name(spec.experiment) is None:
        return ""
    exp_id = ensure_experiment(client, spec.experiment)
    found = client.search_runs(
        [exp_id],
        filter_string=" and ".join(f"tags.`{k}` = '{v}'" for k, v in spec.tags.items()),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found and found[0].info.status != "FINISHED":
        return found[0].info.run_id
    if not create:
        return ""
    run = client.create_run(exp_id, run_name=spec.run_name, tags=dict(spec.tags))
    items = list(spec.params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
    return run.info.run_id


def wait_for_run(spec: RunSpec, wait: float, create: bool = True) -> str:
    """:func:`find_or_create_run`, retried for ``wait`` seconds; "" if MLflow stayed down."""
    deadline = time.monotonic() + wait
    delay = 1.0
    while True:
        try:
            return find_or_create_run(spec, create=create)
        except Exception as e:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("MLflow at %s unreachable (%s)", public_uri(spec.uri), type(e).__name__)
                return ""
            time.sleep(min(delay, left))
            delay = min(2 * delay, 8.0)


class Tracker:
    """Buffered metric and image logging into one MLflow run (created lazily if need be).

    Args:
        spec: how to find or create the run.
        run_id: the run, or "" when MLflow was down at start: created at the first flush
            that reaches MLflow.
        probe: a metric logged every ``log_every`` steps, used to find the last step MLflow
            already has.

    Metrics go in under the loop's short names and reach MLflow under :func:`metric_key`.
    """

    def __init__(self, spec: RunSpec, run_id: str = "", probe: str = "loss"):
        from mlflow.tracking import MlflowClient

        configure_client_timeouts()
        self.client = MlflowClient(spec.uri)
        self.spec, self.uri, self.run_id = spec, public_uri(spec.uri), run_id
        self.probe = metric_key(probe)
        self._metrics: list[Any] = []
        self._images: list[tuple[Any, str, int]] = []
        self._down = False
        self._next_try = 0.0
        self._retry = RETRY_MIN
        self.dropped = 0
        # After a failure Ray may resume from a checkpoint older than the last flush (the
        # controller registers checkpoints asynchronously): steps MLflow already has are not
        # logged again, so the step axis never repeats. Learnt at the first flush that works.
        self.logged_through = -1
        self._synced = False
        self.system: Any = None  # mlflow's SystemMetricsMonitor once attached; False: unavailable

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        self._metrics += [Metric(metric_key(k), float(v), now, step) for k, v in values.items()]
        if len(self._metrics) > MAX_BUFFER:  # keep the newest; say how many were lost
            self.dropped += len(self._metrics) - MAX_BUFFER
            self._metrics = self._metrics[-MAX_BUFFER:]

    def image(self, array, key: str, step: int) -> None:
        if step > self.logged_through:
            self._images.append((array, key, step))

    @property
    def pending(self) -> int:
        """Metric points and images not yet in MLflow."""
        return len(self._metrics) + len(self._images)

    def _sync(self) -> None:
        """Attach to the run (creating it if need be) and drop what MLflow already has."""
        if not self.run_id:
            self.run_id = find_or_create_run(self.spec, self.client)
            print(f"MLflow run {self.run_id} attached", flush=True)
        history = self.client.get_metric_history(self.run_id, self.probe)
        self.logged_through = max((m.step for m in history), default=-1)
        self._metrics = [m for m in self._metrics if m.step > self.logged_through]
        self._images = [i for i in self._images if i[2] > self.logged_through]
        self._synced = True
        self._start_system_metrics()

    def _start_system_metrics(self) -> None:
        """Sample this node's system metrics into the run (a daemon thread that ends with the
        run or the process); continues the ``system/`` step axis after a resume."""
        interval = self.spec.system_metrics_interval
        if self.system is not None or interval <= 0:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.system = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=interval,
                resume_logging=True,
                tracking_uri=self.spec.uri,
            )
            self.system.start()
        except Exception as e:  # e.g. psutil missing: tracking must not stop training
            self.system = False
            print(f"warning: no MLflow system metrics ({type(e).__name__}: {e})", flush=True)

    def flush(self, wait: float = 0.0) -> bool:
        """Send everything buffered; with ``wait``, keep trying that many seconds.

        Returns False (and keeps the buffer) if MLflow is down. While it is down, attempts
        are spaced ``RETRY_MIN``..``RETRY_MAX`` seconds apart so a hung server costs training
        at most one request timeout per interval.
        """
        deadline = time.monotonic() + wait
        while True:
            if self._attempt():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(max(self._next_try - time.monotonic(), 0.5), left))

    def _attempt(self) -> bool:
        if self._down and time.monotonic() < self._next_try:
            return False
        try:
            if not self._synced:
                self._sync()
            while self._metrics:
                self.client.log_batch(self.run_id, metrics=self._metrics[:BATCH])
                self._metrics = self._metrics[BATCH:]
            while self._images:
                array, key, step = self._images[0]
                self.client.log_image(self.run_id, array, key=key, step=step)
                self._images.pop(0)
        except Exception as e:  # server down, timeout, 5xx: keep buffering, never crash training
            if not self._down:
                log.warning(
                    "MLflow at %s unreachable (%s); buffering %d points and retrying",
                    self.uri,
                    type(e).__name__,
                    self.pending,
                )
                print(
                    f"warning: MLflow at {self.uri} unreachable ({type(e).__name__}); "
                    f"training continues, metrics buffered",
                    flush=True,
                )
                self._down, self._retry = True, RETRY_MIN
            else:
                self._retry = min(2 * self._retry, RETRY_MAX)
            self._next_try = time.monotonic() + self._retry
            return False
        if self._down:
            print(f"MLflow at {self.uri} reachable again; buffered metrics flushed", flush=True)
            self._down = False
        if self.dropped:
            print(
                f"warning: {self.dropped} metric points were dropped while MLflow was down "
                f"(buffer limit {MAX_BUFFER})",
                flush=True,
            )
            self.dropped = 0
        return True
