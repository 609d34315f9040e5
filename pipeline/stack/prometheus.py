"""Prometheus as a supervised local service."""

from __future__ import annotations

import json
import string
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.stack.supervisor import (
    LOOPBACK,
    PROMETHEUS_TEMPLATE,
    Service,
    ServiceError,
    free_port,
    http_ok,
    prometheus_bin,
)


class Prometheus(Service):
    """Prometheus scraping ``{targets_dir}/*.json`` (file_sd, job ``training``) and Ray's
    service-discovery file (job ``ray``); config rendered from infra/local/prometheus.yml."""

    name = "prometheus"

    def __init__(
        self,
        state_dir,
        port: int | None = None,
        targets_dir: str | Path | None = None,
        *,
        ray_sd_file: str | Path | None = None,
        scrape_interval: str = "5s",
        retention: str = "15d",
    ):
        super().__init__(state_dir)
        self.port = port or free_port()
        self.ports = (self.port,)
        self.dir = self.state_dir / "prometheus"
        self.targets_dir = Path(targets_dir or self.dir / "targets").resolve()
        self.ray_sd_file = Path(ray_sd_file or self.dir / "no-ray.json")
        self.scrape_interval, self.retention = scrape_interval, retention

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def prepare(self) -> None:
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "prometheus.yml").write_text(
            string.Template(PROMETHEUS_TEMPLATE.read_text()).substitute(
                scrape_interval=self.scrape_interval,
                targets_glob=self.targets_dir / "*.json",
                ray_sd_file=self.ray_sd_file,
            )
        )

    def command(self) -> list:
        return [
            prometheus_bin(),
            f"--config.file={self.dir / 'prometheus.yml'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--storage.tsdb.retention.time={self.retention}",
        ]

    def healthy(self) -> bool:
        return http_ok(f"{self.url}/-/ready")

    def query(self, expr: str) -> list[dict]:
        """Instant query over the HTTP API; returns ``data.result``."""
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=5) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise ServiceError(f"prometheus query {expr!r} failed: {body}")
        return body["data"]["result"]
