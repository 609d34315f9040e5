"""SeaweedFS (S3) as a supervised local service."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.stack.supervisor import (
    LOOPBACK,
    Service,
    free_port,
    http_ok,
    venv_bin,
    write_private,
)


class SeaweedFS(Service):
    """``weed server`` (master, volume, filer, S3 gateway); S3 requires the one identity
    (``access_key``/``secret_key``), anonymous requests get 403.

    ``cache_mb``: memory for the S3 gateway's cache of chunks it served (0: none).
    ``ports`` maps weed's other roles (``master``, ``master.grpc``, ``volume``,
    ``volume.grpc``, ``filer``, ``filer.grpc``, ``s3.grpc``) to ports; missing ones are free.
    """

    name = "seaweedfs"
    # on SIGTERM its filer first waits 15s for the S3 gateway's stream; a SIGKILL loses no
    # acknowledged write (volumes and the filer's leveldb log are in the page cache)
    stop_timeout = 2.0
    ROLES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")

    def __init__(
        self,
        state_dir,
        s3_port: int | None = None,
        *,
        access_key: str,
        secret_key: str,
        ports: dict[str, int] | None = None,
        volume_size_limit_mb: int = 64,
        cache_mb: int = 256,
    ):
        super().__init__(state_dir)
        self.s3_port = s3_port or free_port()
        self.role_ports = {r: (ports or {}).get(r) or free_port() for r in self.ROLES}
        self.ports = (self.s3_port, *self.role_ports.values())
        self.access_key, self.secret_key = access_key, secret_key
        self.volume_size_limit_mb, self.cache_mb = volume_size_limit_mb, cache_mb
        self.dir = self.state_dir / "seaweedfs"

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    url = endpoint_url

    @property
    def env(self) -> dict[str, str]:
        """What an S3 client (botocore, s3fs, Ray workers) needs."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def prepare(self) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "pipeline",
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
        }
        write_private(self.dir / "s3.json", json.dumps({"identities": [identity]}))

    def command(self) -> list:
        p = self.role_ports
        return [
            venv_bin("weed"),
            "server",
            f"-dir={self.dir / 'data'}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            "-filer.disableHttp",  # the filer's HTTP API would serve bucket files unsigned
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.config={self.dir / 's3.json'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.dir / 's3.sock'}",
            # chunks the gateway served stay in its memory (LRU): a later epoch's GETs skip
            # the volume server, which halves the store's CPU per epoch on the loader's cores
            f"-s3.cacheCapacityMB={self.cache_mb}",
        ]

    def client(self):
        """A botocore S3 client signed with this server's identity."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 2}, connect_timeout=3, read_timeout=10),
        )

    def healthy(self) -> bool:
        try:
            return http_ok(f"{self.endpoint_url}/healthz") and bool(self.client().list_buckets())
        except Exception:
            return False

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` unless it exists; returns ``s3://name``."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.ClientError as e:
            if e.response["Error"]["Code"] not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise
        return f"s3://{name}"

    def after_stop(self, record: dict) -> None:
        # weed names its gRPC unix sockets after the run's ports; a SIGKILL leaves them behind
        for arg in record.get("cmd", []):
            flag, _, port = arg.lstrip("-").partition("=")
            if flag.endswith(".port.grpc") and port.isdigit():
                Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock").unlink(
                    missing_ok=True
                )
