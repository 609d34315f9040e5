"""A Ray head node as a supervised local service."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from pipeline.stack.supervisor import (
    LOOPBACK,
    Service,
    ServiceError,
    free_port,
    http_ok,
    venv_bin,
    write_private,
)

# {temp_dir}/session_<date>_<pid>/sockets/plasma_store must fit a unix socket path (107 bytes)
MAX_TEMP_DIR = 45


def make_temp_dir(temp_dir: Path) -> None:
    """Create a Ray node's temp dir, refusing one too long for Ray's unix socket paths."""
    if len(str(temp_dir)) > MAX_TEMP_DIR:
        raise ServiceError(
            f"Ray temp dir {temp_dir} is too long for unix sockets "
            f"({len(str(temp_dir))} > {MAX_TEMP_DIR} characters); "
            "use a shorter state dir path"
        )
    temp_dir.mkdir(parents=True, exist_ok=True)


def node_environment(extra_env: dict[str, str], client_env: dict[str, str]) -> dict[str, str]:
    """The environment of a Ray node process: ours minus any Ray client settings, plus
    ``extra_env`` and the head's ``client_env`` (token auth, single-node mode); job
    entrypoints say `python ...`, so the venv's interpreter comes first on PATH."""
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra_env, **client_env, RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class RayHead(Service):
    """``ray start --head --block`` on 127.0.0.1 with token auth (``RAY_AUTH_MODE=token``).

    The token is in ``token_path`` (0600, made if missing), given to Ray as
    ``RAY_AUTH_TOKEN_PATH``. ``env`` (e.g. S3 credentials) goes into the head's process env, so
    every worker and job driver inherits it. Ray rewrites ``--node-ip-address=127.0.0.1`` to
    the host's routable IP unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (single-node mode):
    the head and every ``ray.init`` client get it (``client_env``).
    """

    name = "ray"
    start_timeout = 120.0
    stop_timeout = 8.0

    def __init__(
        self,
        state_dir,
        port: int | None = None,
        dashboard_port: int | None = None,
        *,
        num_cpus: int = 4,
        env: dict[str, str] | None = None,
        token_path: str | Path | None = None,
        client_server_port: int | None = None,
        dashboard_agent_port: int | None = None,
        metrics_ports: tuple[int, int] | None = None,
        object_store_memory: int | None = None,
        worker_ports: tuple[int, int] | None = None,
    ):
        super().__init__(state_dir)
        self.port, self.dashboard_port = port or free_port(), dashboard_port or free_port()
        self.client_server_port = client_server_port or free_port()
        self.dashboard_agent_port = dashboard_agent_port or free_port()
        # autoscaler + dashboard metrics ports default to a fixed 44217/44227: heads would clash
        self.metrics_ports = metrics_ports or (free_port(), free_port())
        self.ports = (
            self.port,
            self.dashboard_port,
            self.client_server_port,
            self.dashboard_agent_port,
            *self.metrics_ports,
        )
        self.num_cpus, self.extra_env = num_cpus, dict(env or {})
        self.token_path = Path(token_path or self.state_dir / "ray_auth_token").resolve()
        self.object_store_memory, self.worker_ports = object_store_memory, worker_ports
        self.temp_dir = self.state_dir / "ray"

    @property
    def address(self) -> str:
        """GCS address, for ``ray.init(address=...)``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard and job server, for ``JobSubmissionClient``."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    url = dashboard_url

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    @property
    def client_env(self) -> dict[str, str]:
        """Env a client process needs (``ray.init``, ``ray job``, JobSubmissionClient)."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    @property
    def headers(self) -> dict[str, str]:
        """HTTP auth for the dashboard/job API; works without ``client_env``."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def metrics_sd_file(self) -> Path:
        """Ray's Prometheus file_sd file listing its metrics endpoints."""
        return self.temp_dir / "prom_metrics_service_discovery.json"

    def prepare(self) -> None:
        if not self.token_path.exists() or not self.token:
            write_private(self.token_path, secrets.token_hex(32))
        make_temp_dir(self.temp_dir)

    def environment(self) -> dict[str, str]:
        env = node_environment(self.extra_env, self.client_env)
        env["AUTOSCALER_METRIC_PORT"], env["DASHBOARD_METRIC_PORT"] = map(str, self.metrics_ports)
        return env

    def command(self) -> list:
        cmd = [
            venv_bin("ray"),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={LOOPBACK}",
            f"--port={self.port}",
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={self.dashboard_port}",
            f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            f"--ray-client-server-port={self.client_server_port}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_port}",
        ]
        if self.object_store_memory:
            cmd.append(f"--object-store-memory={self.object_store_memory}")
        if self.worker_ports:
            cmd += [
                f"--min-worker-port={self.worker_ports[0]}",
                f"--max-worker-port={self.worker_ports[1]}",
            ]
        return cmd

    def healthy(self) -> bool:
        """GCS up, job API answers with the token, the raylet's dashboard agent is up."""
        return (
            http_ok(f"{self.dashboard_url}/api/gcs_healthz")
            and http_ok(f"{self.dashboard_url}/api/version", headers=self.headers)
            and http_ok(f"http://{LOOPBACK}:{self.dashboard_agent_port}/api/healthz")
        )
