"""The local stack: S3 (SeaweedFS), MLflow, a Ray head and Prometheus, all on 127.0.0.1.

Everything lives in one ignored folder (default ``.stack/``)::

    credentials.env   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (0600, made on first up)
    ray_auth_token    the Ray head's auth token (0600)
    env               non-secret client settings (tracking URI, endpoints, Ray auth mode)
    stack.json        the ports in use, so down/status find the same services
    logs/  pids/  seaweedfs/  mlflow/  ray/  prometheus/

``up`` is idempotent; ``down`` stops exactly the processes ``up`` started, by PID.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.stack.mlflow_server import MlflowServer
from pipeline.stack.prometheus import Prometheus
from pipeline.stack.ray_head import RayHead
from pipeline.stack.seaweedfs import SeaweedFS
from pipeline.stack.supervisor import LOOPBACK, REPO_ROOT, Service, free_port, write_private

DEFAULT_STATE_DIR = ".stack"
BUCKETS = ("data", "mlflow", "checkpoints")
MLFLOW_ARTIFACTS = "s3://mlflow/artifacts"


@dataclass(frozen=True)
class StackPorts:
    """Every port the stack binds on 127.0.0.1 (the first five are the ones clients use)."""

    s3: int = 8333
    mlflow: int = 5000
    ray_gcs: int = 6379
    ray_dashboard: int = 8265
    prometheus: int = 9090
    # SeaweedFS internals (weed's defaults: HTTP port, gRPC = HTTP + 10000)
    weed_master: int = 9333
    weed_master_grpc: int = 19333
    weed_volume: int = 8080
    weed_volume_grpc: int = 18080
    weed_filer: int = 8888
    weed_filer_grpc: int = 18888
    s3_grpc: int = 18333
    # Ray internals (Ray's defaults); workers get 20000-20999, clear of the weed gRPC ports
    ray_client: int = 10001
    ray_dashboard_agent: int = 52365
    ray_autoscaler_metrics: int = 44217
    ray_dashboard_metrics: int = 44227
    ray_worker_min: int = 20000
    ray_worker_max: int = 20999

    @classmethod
    def free(cls) -> StackPorts:
        """Free ports everywhere (tests); Ray keeps its default worker port range."""
        ports = {f.name: free_port() for f in dataclasses.fields(cls)}
        return cls(**{**ports, "ray_worker_min": 10002, "ray_worker_max": 19999})


def read_env_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pairs[key.strip()] = value.strip()
    return pairs


def _write_env_file(path: Path, pairs: dict[str, str], header: str, private: bool) -> None:
    text = f"# {header}\n" + "".join(f"{k}={v}\n" for k, v in pairs.items())
    if private:
        write_private(path, text)
    else:
        path.write_text(text)


def _credentials(state: Path, create: bool) -> dict[str, str]:
    path = state / "credentials.env"
    creds = read_env_file(path)
    if not creds and create:
        creds = {
            "AWS_ACCESS_KEY_ID": "PL" + secrets.token_hex(9).upper(),
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
        }
        _write_env_file(path, creds, "S3 credentials of the local stack; keep private", True)
    return creds


def _ports(state: Path, ports: StackPorts | None) -> StackPorts:
    path = state / "stack.json"
    if ports is None and path.is_file():
        ports = StackPorts(**json.loads(path.read_text())["ports"])
    return ports or StackPorts()


def _services(state: Path, ports: StackPorts, creds: dict[str, str]) -> list[Service]:
    """The stack's services in start order."""
    p = ports
    s3 = SeaweedFS(
        state,
        p.s3,
        access_key=creds.get("AWS_ACCESS_KEY_ID", ""),
        secret_key=creds.get("AWS_SECRET_ACCESS_KEY", ""),
        ports={
            "master": p.weed_master,
            "master.grpc": p.weed_master_grpc,
            "volume": p.weed_volume,
            "volume.grpc": p.weed_volume_grpc,
            "filer": p.weed_filer,
            "filer.grpc": p.weed_filer_grpc,
            "s3.grpc": p.s3_grpc,
        },
    )
    mlflow = MlflowServer(state, p.mlflow, MLFLOW_ARTIFACTS, s3)
    ray = RayHead(
        state,
        p.ray_gcs,
        p.ray_dashboard,
        num_cpus=max(4, os.cpu_count() or 1),  # 2 training workers + driver; oversubscribing is ok
        # the head's env reaches every worker and job driver: S3 + MLflow without runtime_env
        env={
            **s3.env,
            "MLFLOW_TRACKING_URI": mlflow.uri,
            "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url,
            # jobs run from a copy of the working dir, which excludes .cache
            "PIPELINE_FASHION_MNIST_DIR": str(
                REPO_ROOT / ".cache/debs/fashion-mnist" / "usr/share/datasets/fashion-mnist"
            ),
        },
        client_server_port=p.ray_client,
        dashboard_agent_port=p.ray_dashboard_agent,
        metrics_ports=(p.ray_autoscaler_metrics, p.ray_dashboard_metrics),
        worker_ports=(p.ray_worker_min, p.ray_worker_max),
        object_store_memory=2 * 2**30,
    )
    prometheus = Prometheus(state, p.prometheus, ray_sd_file=ray.metrics_sd_file)
    return [s3, mlflow, ray, prometheus]


def client_env(state: Path, ports: StackPorts) -> dict[str, str]:
    """Non-secret settings a client needs; written to ``{state}/env``."""
    s3 = f"http://{LOOPBACK}:{ports.s3}"
    return {
        "MLFLOW_TRACKING_URI": f"http://{LOOPBACK}:{ports.mlflow}",
        "RAY_ADDRESS": f"http://{LOOPBACK}:{ports.ray_dashboard}",
        "PIPELINE_RAY_GCS": f"{LOOPBACK}:{ports.ray_gcs}",  # what `pipeline train` attaches to
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(state / "ray_auth_token"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep Ray on 127.0.0.1; see RayHead
        "AWS_ENDPOINT_URL": s3,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": s3,
    }


def up(
    state_dir: str | Path = DEFAULT_STATE_DIR,
    ports: StackPorts | None = None,
    timeout: float | None = None,
) -> list[tuple[str, str, str]]:
    """Start whatever is not running; create the buckets.

    Args:
        state_dir: the stack folder.
        ports: ports to use; default: those of the last ``up``, else :class:`StackPorts`.
        timeout: per-service readiness timeout in seconds (default: the service's own).

    Returns:
        ``(service, url, "started" | "running")`` per service, in start order.
    """
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    if (
        ports is not None
        and ports != _ports(state, None)
        and any(svc.running() for svc in services(state))
    ):
        raise PipelineError(f"the stack in {state} runs on other ports; `down` it first")
    ports = _ports(state, ports)
    (state / "stack.json").write_text(json.dumps({"ports": dataclasses.asdict(ports)}, indent=1))
    creds = _credentials(state, create=True)
    _write_env_file(state / "env", client_env(state, ports), "local stack clients", False)
    rows = []
    for svc in _services(state, ports, creds):
        launched = svc.start(timeout)
        if isinstance(svc, SeaweedFS):
            for bucket in BUCKETS:
                svc.make_bucket(bucket)
        rows.append((svc.name, svc.url, "started" if launched else "running"))
    return rows


def services(state_dir: str | Path = DEFAULT_STATE_DIR) -> list[Service]:
    """The stack's service objects (start order) as configured by the last ``up``."""
    state = Path(state_dir).resolve()
    return _services(state, _ports(state, None), _credentials(state, create=False))


def down(state_dir: str | Path = DEFAULT_STATE_DIR) -> list[tuple[str, list[int]]]:
    """Stop the stack's processes (reverse start order); returns ``(service, stopped PIDs)``.
    Data and credentials stay; the client settings (``{state_dir}/env``) go with the
    services they point at."""
    stopped = [(svc.name, svc.stop()) for svc in reversed(services(state_dir))]
    (Path(state_dir) / "env").unlink(missing_ok=True)
    return stopped


def running(state_dir: str | Path = DEFAULT_STATE_DIR) -> bool:
    """Whether any service of the stack in ``state_dir`` has a live process (by its pid
    record: the same PID and start time), healthy or not."""
    if not (Path(state_dir) / "pids").is_dir():
        return False
    return any(svc.running() for svc in services(state_dir))


def status(state_dir: str | Path = DEFAULT_STATE_DIR) -> list[tuple[str, str, bool]]:
    """``(service, url, healthy)`` for each service of the stack."""
    return [(svc.name, svc.url, svc.running() and svc.healthy()) for svc in services(state_dir)]


def format_status(rows: list[tuple[str, str, bool]]) -> str:
    """A compact table of :func:`status` rows."""
    lines = [f"{'service':<11} {'url':<24} health"]
    lines += [f"{name:<11} {url:<24} {'ok' if ok else 'DOWN'}" for name, url, ok in rows]
    return "\n".join(lines)


def load_stack_env(state_dir: str | Path = DEFAULT_STATE_DIR) -> list[str]:
    """Set, for each variable not already in ``os.environ``, its value from
    ``{state_dir}/credentials.env`` and ``{state_dir}/env``. Returns the names set (never
    values: they include secrets). A missing stack folder, or one whose services are not
    :func:`running` (stopped, crashed, the host rebooted), sets nothing: its addresses are
    dead.

    Call it before ``import ray``: Ray reads ``RAY_AUTH_MODE``/the token and
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at import."""
    state = Path(state_dir)
    if not running(state):
        return []
    pairs = {**read_env_file(state / "credentials.env"), **read_env_file(state / "env")}
    added = [k for k in pairs if k not in os.environ]
    for key in added:
        os.environ[key] = pairs[key]
    return added
