"""The local stack: S3 (SeaweedFS), MLflow, a Ray head and Prometheus, all on 127.0.0.1.

One module per service, each a :class:`~pipeline.stack.supervisor.Service` that the process
supervisor starts, health-checks and stops by PID; :mod:`pipeline.stack.local` composes them
into ``pipeline stack up/down/status``. Nothing starts at import time.
"""

from pipeline.stack.local import (
    BUCKETS,
    DEFAULT_STATE_DIR,
    MLFLOW_ARTIFACTS,
    StackPorts,
    client_env,
    down,
    format_status,
    load_stack_env,
    read_env_file,
    running,
    services,
    status,
    up,
)
from pipeline.stack.mlflow_server import MlflowServer
from pipeline.stack.prometheus import Prometheus
from pipeline.stack.ray_head import RayHead
from pipeline.stack.seaweedfs import SeaweedFS
from pipeline.stack.supervisor import (
    LOOPBACK,
    MARKER_ENV,
    REPO_ROOT,
    Service,
    ServiceError,
    alive,
    free_port,
    http_ok,
    port_in_use,
    prometheus_bin,
    psutil,
    send_signal,
    venv_bin,
    wait_gone,
    write_private,
)

__all__ = [
    "BUCKETS",
    "DEFAULT_STATE_DIR",
    "LOOPBACK",
    "MARKER_ENV",
    "MLFLOW_ARTIFACTS",
    "REPO_ROOT",
    "MlflowServer",
    "Prometheus",
    "RayHead",
    "SeaweedFS",
    "Service",
    "ServiceError",
    "StackPorts",
    "alive",
    "client_env",
    "down",
    "format_status",
    "free_port",
    "http_ok",
    "load_stack_env",
    "port_in_use",
    "prometheus_bin",
    "psutil",
    "read_env_file",
    "running",
    "send_signal",
    "services",
    "status",
    "up",
    "venv_bin",
    "wait_gone",
    "write_private",
]
