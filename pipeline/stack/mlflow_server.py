"""The MLflow tracking server as a supervised local service."""

from __future__ import annotations

import os

from pipeline.stack.seaweedfs import SeaweedFS
from pipeline.stack.supervisor import (
    LOOPBACK,
    Service,
    free_port,
    http_ok,
    venv_bin,
)


class MlflowServer(Service):
    """``mlflow server``: sqlite backend, artifacts proxied (``--serve-artifacts``) to
    ``artifacts_destination`` on ``s3``, so clients need the tracking URI only."""

    name = "mlflow"
    start_timeout = 120.0

    def __init__(
        self,
        state_dir,
        port: int | None = None,
        artifacts_destination: str = "",
        s3: SeaweedFS | None = None,
    ):
        super().__init__(state_dir)
        self.port = port or free_port()
        self.ports = (self.port,)
        self.dir = self.state_dir / "mlflow"
        self.artifacts_destination = artifacts_destination or str(self.dir / "artifacts")
        self.s3 = s3

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    url = uri

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.s3 is not None:
            env.update(self.s3.env, MLFLOW_S3_ENDPOINT_URL=self.s3.endpoint_url)
        # no job runner: it forks ~8 huey consumers (~2 GB RSS) for GenAI jobs we never use
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        return env

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list:
        return [
            venv_bin("mlflow"),
            "server",
            "--host",
            LOOPBACK,
            "--port",
            self.port,
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.dir / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            self.artifacts_destination,
        ]

    def healthy(self) -> bool:
        return http_ok(f"{self.uri}/health")
