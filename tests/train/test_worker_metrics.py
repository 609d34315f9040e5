"""The worker's Prometheus endpoint as configured: host and port from ``tracking``, local rank
r on ``metrics_port + r``, a fixed port still held by a previous worker retried, a wildcard
bind announced under a name other hosts can reach."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from pipeline.train.config import TrainJob
from pipeline.train.loop import open_metrics
from pipeline.train.metrics import WorkerMetrics
from pipeline.typed import build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> int:
    """A base port such that ``base .. base + n - 1`` are all free on 127.0.0.1 now (an
    ephemeral port's neighbour may belong to another process, e.g. a Ray worker)."""
    for _ in range(100):
        socks = []
        try:
            base = free_port()
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def job(**tracking) -> TrainJob:
    return build(TrainJob, {"data": {"train_url": "s3://b/train"}, "tracking": tracking})


def test_local_ranks_serve_consecutive_ports_from_the_configured_base(tmp_path):
    base = free_ports(2)
    cfg = job(metrics_port=base, metrics_host="127.0.0.1", metrics_sd_dir=str(tmp_path))
    m0, m1 = open_metrics(cfg, rank=4, local_rank=0), open_metrics(cfg, rank=5, local_rank=1)
    try:
        assert (m0.port, m1.port) == (base, base + 1)
        m1.step.set(7)
        assert 'vae_train_step{rank="5",run="vae"} 7.0' in scrape(base + 1)
        (target,) = json.loads((tmp_path / "vae-rank5.json").read_text())
        assert target["targets"] == [f"127.0.0.1:{base + 1}"]
    finally:
        m0.close()
        m1.close()
    assert not list(tmp_path.iterdir())


def test_wildcard_bind_announces_the_host_name(tmp_path):
    port = free_port()
    m = WorkerMetrics("run", 0, port, str(tmp_path), host="0.0.0.0")
    try:
        assert m.port == port
        assert "vae_train_images_total" in scrape(port)
        (target,) = json.loads((tmp_path / "run-rank0.json").read_text())
        assert target["targets"] == [f"{socket.gethostname()}:{port}"]
    finally:
        m.close()


def test_a_fixed_port_held_by_the_previous_worker_is_retried():
    port = free_port()
    old = WorkerMetrics("run", 0, port)
    threading.Timer(1.0, old.close).start()  # the previous attempt's process lets go
    new = WorkerMetrics("run", 0, port)
    try:
        assert new.port == port and "vae_train_loss" in scrape(port)
    finally:
        new.close()


def test_a_port_held_for_good_fails_naming_the_endpoint():
    import pipeline.train.metrics as metrics

    port = free_port()
    holder = WorkerMetrics("run", 0, port)
    try:
        with pytest.raises(OSError, match=f"metrics endpoint 127.0.0.1:{port}: "):
            metrics.serve(port, "127.0.0.1", holder.registry, wait=0.6)
    finally:
        holder.close()


def test_close_lingers_until_the_next_scrape_and_no_longer():
    m = WorkerMetrics("run", 0, 0)
    m.step.set(7)
    port = m.port
    scraped: list[str] = []
    # one scrape, 0.5 s into a linger of 120 s: close returns once it has sent the values
    scraper = threading.Timer(0.5, lambda: scraped.append(scrape(port)))
    scraper.start()
    m.close(linger=120)
    assert m.scrapes.count == 1 and m.port is None
    scraper.join(10)  # the scraper's own thread has yet to append what it read
    assert 'vae_train_step{rank="0",run="run"} 7.0' in scraped[0]
    with pytest.raises(OSError):
        scrape(port)  # closed


def test_close_without_a_scrape_waits_the_linger_and_closes():
    m = WorkerMetrics("run", 0, 0)
    port = m.port
    m.close(linger=0.3)
    assert m.scrapes.count == 0 and m.port is None
    with pytest.raises(OSError):
        scrape(port)


LAST_WORDS = """
import time
from pipeline.train.metrics import WorkerMetrics

class Slow:  # collected after the scrape is counted: the response is sent 2 s later, past the
    # 0.5 s the endpoint takes to shut down
    def describe(self):
        return []
    def collect(self):
        time.sleep(2.0)
        return []

m = WorkerMetrics("run", 0, 0)
m.step.set(7)
m.registry.register(Slow())
print(m.port, flush=True)
m.close(linger=60)
"""


def test_a_worker_exiting_right_after_close_still_answers_the_last_scrape():
    # the process ends as soon as close returns (as a training worker does): close must not
    # return before the response of the scrape it waited for is sent
    child = subprocess.Popen([sys.executable, "-c", LAST_WORDS], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        for attempt in range(3):
            try:
                text = scrape(port)
            except urllib.error.URLError as e:  # refused: closed after a whole response
                if attempt == 0 or not isinstance(e.reason, ConnectionRefusedError):
                    raise
                break
            # every response arrives whole; the one that ends the child's linger too
            assert 'vae_train_step{rank="0",run="run"} 7.0' in text
            try:
                child.wait(10)
                break
            except subprocess.TimeoutExpired:
                # scraped before the child's close began to wait (a loaded machine can hold
                # the child between its print and close): close waits for the next scrape
                continue
        assert child.wait(10) == 0
    finally:
        child.kill()
        child.wait()
