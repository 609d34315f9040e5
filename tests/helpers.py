"""Builders shared by the tests; nothing here starts a server.

ROOT, FIXTURES          the repository; tests/fixtures
wait_for                poll a predicate with a deadline
require                 skip a test whose tool is missing; under CI=true, fail it instead
patched_environ         os.environ patched for a block (fixtures wider than a function)
png, gray_png, bomb_png image bytes: an array, a flat square, a decompression bomb
tar_bytes               a shard: (name, bytes) members per sample, in one tar
listening               the (ip, port) LISTEN sockets of a service's processes
N_TRAIN, BATCH, make_job  the Ray Train job the ``fmnist_url`` fixture's data is cut for
read_keys, keys_by_step   the sample keys workers record (PIPELINE_RECORD_KEYS_DIR)
metric_history, experiment_runs  what a run left in MLflow
chromium_bin, chromium    headless Chromium: a page's DOM after its scripts ran, a screenshot
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import stack
from pipeline.train.config import TrainJob
from pipeline.typed import build

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
LOOPBACK_IPS = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def require(condition, reason: str, gpu: bool = False) -> None:
    """Skip the calling test unless ``condition`` holds (a tool or binary it needs exists).
    Under ``CI=true`` (``.ci/run``) it fails instead: evidence must not vanish as a skip. A
    ``gpu`` test fails there only where ``CI_GPU=true`` says the CI machine has a GPU.
    The one place tests skip; never ``pytest.skip``/``skipif``/``importorskip`` directly."""
    if condition:
        return
    if os.environ.get("CI") == "true" and (not gpu or os.environ.get("CI_GPU") == "true"):
        pytest.fail(f"{reason} (CI=true: a missing requirement fails, it does not skip)")
    pytest.skip(reason)


@contextlib.contextmanager
def patched_environ(env: dict[str, str]):
    """``os.environ`` updated with ``env`` inside the block and restored after it: for module
    and session fixtures, which cannot use ``monkeypatch``."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------- images, shards


class RestartableS3:
    """A SeaweedFS that can be stopped and started again as the same server: same ports, same
    data dir, same identity (``prefix`` starts its access key)."""

    def __init__(self, state: Path, prefix: str = "REL"):
        import secrets

        self.svc = stack.SeaweedFS(
            state,
            access_key=prefix + secrets.token_hex(6).upper(),
            secret_key=secrets.token_hex(16),
        )

    def again(self) -> stack.SeaweedFS:
        """The same server: same ports, same data dir, same identity."""
        s = self.svc
        return stack.SeaweedFS(
            s.state_dir,
            s.s3_port,
            access_key=s.access_key,
            secret_key=s.secret_key,
            ports=s.role_ports,
        )

    def up(self) -> None:
        self.again().start()

    def down(self) -> None:
        self.again().stop()


def synthetic_split(url: str, count: int, shard_samples: int) -> str:
    """``count`` synthetic 32x32 RGB images ingested under ``url`` (``shard_samples`` per
    shard, no test split); returns the train split's URL."""
    from pipeline.data.config import IngestConfig
    from pipeline.data.ingest import ingest

    ingest(
        IngestConfig(
            output_url=url,
            source="synthetic",
            synthetic_count=count,
            synthetic_size=32,
            synthetic_mode="RGB",
            shard_samples=shard_samples,
            test_fraction=0.0,
            workers=1,
        ),
        progress=False,
    )
    return f"{url}/train"


def synthetic_split_on_s3(s3, bucket: str, count: int, shard_samples: int) -> str:
    """:func:`synthetic_split` into a fresh folder of ``bucket`` on the test S3."""
    import uuid

    with patched_environ(s3.env):
        return synthetic_split(
            s3.make_bucket(bucket) + f"/{uuid.uuid4().hex}", count, shard_samples
        )


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def gray_png(value: int, size: int) -> bytes:
    """A ``size`` x ``size`` grayscale PNG, every pixel ``value``."""
    return png(np.full((size, size), value, np.uint8))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG whose header claims 10^10 pixels (Pillow's DecompressionBombError)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def tar_bytes(samples: list[list[tuple[str, bytes]]], format: int = tarfile.USTAR_FORMAT) -> bytes:
    """A tar of regular members, one ``[(name, data), ...]`` list per sample, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tar:
        for members in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ------------------------------------------------------------------------------- services


def listening(svc: stack.Service) -> set[tuple[str, int]]:
    """(ip, port) of every LISTEN socket held by ``svc``'s processes."""
    found = set()
    for proc in svc.processes():
        try:
            conns = proc.net_connections(kind="inet")
        except stack.psutil().Error:
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == "LISTEN"}
    return found


# ------------------------------------------------------------------------ training runs

N_TRAIN = 1024  # Fashion-MNIST train (and test) images in the fmnist_url fixture
BATCH = 32


def make_job(fmnist_url, mlflow_server, storage, name, workers, sd_dir="", **optim) -> TrainJob:
    """A small bernoulli VAE on ``fmnist_url``, 2 epochs, tracked in ``mlflow_server``."""
    o = dict(
        epochs=2,
        batch_size=BATCH,
        lr=3e-3,
        warmup_steps=4,
        checkpoint_every=8,
        log_every=4,
        eval_batches=2,
        iwae_k=8,
        iwae_images=16,
    )
    o.update(optim)
    return build(
        TrainJob,
        {
            "data": {
                "train_url": f"{fmnist_url}/train",
                "test_url": f"{fmnist_url}/test",
                "num_workers": 0,
                "shuffle_buffer": 64,
                "binarize": True,  # bernoulli: dynamic binarization of the 8-bit images
            },
            "model": {
                "image_size": 28,
                "in_channels": 1,
                "channels": [8, 16],
                "latent_dim": 8,
                "likelihood": "bernoulli",
            },
            "optim": o,
            "scaling": {
                "num_workers": workers,
                "storage_path": storage,
                "name": name,
                "max_failures": 2,
                "num_to_keep": 2,
            },
            "tracking": {
                "mlflow_uri": mlflow_server.uri,
                "experiment": f"test-{name}",
                "registered_model": f"test-{name}",
                "metrics_sd_dir": sd_dir,
            },
        },
    )


def read_keys(keys_dir: Path) -> dict[int, list[tuple[int, int, str]]]:
    """rank -> [(epoch, step, key)] in the order the rank consumed them (all attempts)."""
    out = {}
    for f in sorted(keys_dir.glob("rank*.txt")):
        rows = [line.split() for line in f.read_text().splitlines()]
        out[int(f.stem.removeprefix("rank"))] = [(int(e), int(s), k) for e, s, k in rows]
    return out


def keys_by_step(rows: list[tuple[int, int, str]]) -> dict[tuple[int, int], list[str]]:
    """(epoch, step) -> keys, in consumption order, from one rank's :func:`read_keys` rows."""
    out = defaultdict(list)
    for e, s, k in rows:
        out[(e, s)].append(k)
    return out


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """Every logged (step, value) of ``key``, sorted."""
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def experiment_runs(uri: str, experiment: str) -> list:
    """The runs of ``experiment``; none if it does not exist."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


# ------------------------------------------------------------------------------- browser

# Headless Chromium as a test harness: no sandbox (root in CI), nothing fetched but the page.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--run-all-compositor-stages-before-draw",
]
ARTIFACTS = ROOT / "test-artifacts"  # screenshots kept after the run (git-ignored)


def chromium_bin() -> str:
    """Debian's chromium (``apt-get install chromium``); skip (fail under CI=true) without it."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    require(path, "headless Chromium not found (Debian: apt-get install chromium)")
    return path


def chromium(
    url: str, screenshot: Path | None = None, budget_ms: int = 20_000, height: int = 2200
) -> str:
    """The DOM of ``url`` in a 1400 x ``height`` window after ``budget_ms`` of virtual time
    (scripts run, fetches settle); with ``screenshot``, also a PNG of the page written there.
    Pages that render only what is on screen (MLflow's charts) need the height."""
    exe = chromium_bin()

    def run(*args: str) -> str:
        with tempfile.TemporaryDirectory() as profile:
            out = subprocess.run(
                [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                capture_output=True,
                text=True,
                timeout=120,
            )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    budget, window = f"--virtual-time-budget={budget_ms}", f"--window-size=1400,{height}"
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        run(budget, window, f"--screenshot={screenshot}")
        assert screenshot.stat().st_size > 0
    return run(budget, window, "--dump-dom")


def registered_step(client, bucket: str, name: str) -> int | None:
    """The step of the latest checkpoint Ray Train has registered for run ``name`` (its
    checkpoint manager's snapshot under ``s3://<bucket>/ray/<name>/``), or None before the
    first. A worker's report counts only once the controller has polled it (every 2 s), and
    only a registration writes the snapshot."""
    key = f"ray/{name}/checkpoint_manager_snapshot.json"
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    latest = json.loads(body)["latest_checkpoint_result"]
    return latest["metrics"]["step"] if latest else None
