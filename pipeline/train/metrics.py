"""Prometheus metrics of one training worker.

Each worker serves its own registry on ``tracking.metrics_host``: 127.0.0.1 and a free port
in the local stack, where it writes ``{sd_dir}/{run}-rank{r}.json`` so the stack's Prometheus
(``file_sd_configs``) finds it (the file is removed on close); on a cluster 0.0.0.0 and a
fixed port (the pod's ``vae-metrics`` port, found by ``kubernetes_sd``).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class WorkerMetrics:
    """Throughput, step time, data wait, loss, skipped steps, bad samples, checkpoint time."""

    def __init__(
        self, run: str, rank: int, port: int = 0, sd_dir: str = "", host: str = "127.0.0.1"
    ):
        self.registry = CollectorRegistry()
        labels = {"run": run, "rank": str(rank)}
        r = self.registry

        def g(name, doc):
            return Gauge(name, doc, list(labels), registry=r).labels(**labels)

        def c(name, doc):
            return Counter(name, doc, list(labels), registry=r).labels(**labels)

        def h(name, doc, buckets):
            return Histogram(name, doc, list(labels), registry=r, buckets=buckets).labels(**labels)

        self.images_per_second = g("vae_train_images_per_second", "training images per second")
        self.loss = g("vae_train_loss", "training loss (negative ELBO, weighted)")
        self.bits_per_dim = g("vae_train_bits_per_dim", "negative ELBO in bits per dimension")
        self.data_wait_fraction = g(
            "vae_train_data_wait_fraction", "share of step time waiting on data"
        )
        self.step = g("vae_train_step", "global optimizer step")
        self.images = c("vae_train_images", "images consumed")
        self.skipped_steps = c(
            "vae_train_skipped_steps", "steps skipped for a non-finite loss/gradient"
        )
        self.bad_samples = c("vae_train_bad_samples", "corrupt samples skipped by the reader")
        self.step_seconds = h(
            "vae_train_step_seconds", "wall time of one step", (0.01, 0.03, 0.1, 0.3, 1, 3, 10)
        )
        self.data_wait_seconds = h(
            "vae_train_data_wait_seconds",
            "time waiting for a batch",
            (0.001, 0.01, 0.03, 0.1, 0.3, 1, 3),
        )
        self.checkpoint_seconds = h(
            "vae_train_checkpoint_seconds",
            "time to write a checkpoint",
            (0.1, 0.3, 1, 3, 10, 30, 100),
        )
        self.scrapes = ScrapeCount()
        r.register(self.scrapes)
        self.port = None
        self.sd_file: Path | None = None
        if port >= 0:
            self.server = serve(port, host, self.registry)
            self.port = self.server.server_port
            if sd_dir:
                self.sd_file = Path(sd_dir) / f"{run}-rank{rank}.json"
                self.sd_file.parent.mkdir(parents=True, exist_ok=True)
                target = [
                    {
                        "targets": [f"{reachable(host)}:{self.port}"],
                        "labels": {
                            "job": "vae-train",
                            "run": run,
                            "rank": str(rank),
                            "node": socket.gethostname(),
                        },
                    }
                ]
                tmp = self.sd_file.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(target))
                tmp.replace(self.sd_file)  # Prometheus never reads a half-written target file

    def close(self, linger: float = 0.0) -> None:
        """Stop serving; first wait, at most ``linger`` seconds, for the next scrape, so
        Prometheus has the final values (a run shorter than its target discovery, ~5 s for
        ``file_sd``, would otherwise never be scraped), and until that scrape's response is
        sent: the process may exit as soon as this returns."""
        if linger > 0 and self.port is not None:
            seen, deadline = self.scrapes.count, time.monotonic() + linger
            while self.scrapes.count == seen and time.monotonic() < deadline:
                time.sleep(0.05)
            handler = self.scrapes.thread
            if self.scrapes.count != seen and handler not in (None, threading.current_thread()):
                handler.join(timeout=10.0)  # Prometheus's default scrape timeout
        if self.sd_file is not None:
            self.sd_file.unlink(missing_ok=True)
        if self.port is not None:
            self.server.shutdown()
            self.server.server_close()
            self.port = None


class ScrapeCount:
    """A collector with no metrics that counts the scrapes of its registry, and keeps the
    thread of the last one (the endpoint serves each request in a thread of its own, which
    ends once the response is sent)."""

    def __init__(self):
        self.count = 0
        self.thread: threading.Thread | None = None

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self.thread = threading.current_thread()
        self.count += 1
        return []


def serve(port: int, host: str, registry: CollectorRegistry, wait: float = 10.0):
    """Start the HTTP endpoint. A fixed port still held by this node's previous worker (a
    restarted attempt) is retried for ``wait`` seconds before the error is raised."""
    deadline = time.monotonic() + wait
    while True:
        try:
            server, _ = start_http_server(port, addr=host, registry=registry)
            return server
        except OSError as e:
            if port == 0 or e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise OSError(e.errno, f"metrics endpoint {host}:{port}: {e.strerror}") from e
            time.sleep(0.5)


def reachable(host: str) -> str:
    """The address a scraper uses for a server bound to ``host`` (a wildcard: this node)."""
    return socket.gethostname() if host in ("", "0.0.0.0", "::") else host
