"""A rank stuck for good (a real SIGSTOP of one RayTrainWorker process of a 2-worker run): the
attempt ends within ``scaling.collective_timeout_s`` plus a stated slack, Ray Train retries
once (``scaling.max_failures``) from the last checkpoint, and the run finishes into one MLflow
run whose step axis has every step once. Never an endless hang.

Rank 1 parks (the kill hook, with a delay it never reaches) and is then SIGSTOPped, either
mid-step, so rank 0 waits in DDP's gloo all-reduce (gloo's timeout raises on rank 0), or at
a checkpoint's report, so rank 0 waits in Ray Train's own barrier in ``ray.train.report``,
which has no timeout unless the driver sets one: there only Ray Train's health check of the
stopped process ends the attempt, after 10 minutes unless the driver shortens it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import pytest

from pipeline.train.driver import run_training
from tests.helpers import BATCH, N_TRAIN, make_job, metric_history, wait_for

pytestmark = pytest.mark.slow

TIMEOUT = 20  # scaling.collective_timeout_s for this run
# What ending an attempt costs on top of the collective timeout: Ray Train waits
# TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S (30 s by default, 5 s in this test's Ray job) for
# the stopped rank to leave its process group, plus the controller's poll (every 2 s) and
# killing the actors.
PG_SHUTDOWN = 5
SLACK = PG_SHUTDOWN + 20


def train_runs(cluster) -> list[dict]:
    """Ray Train V2's record of its runs and attempts (RAY_TRAIN_ENABLE_STATE_TRACKING=1)."""
    req = urllib.request.Request(
        f"{cluster.dashboard_url}/api/train/v2/runs/v1", headers=cluster.headers
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["train_runs"]


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "where, step, detail",
    [
        # ("step", 12, ["Timed out waiting 20000ms"]): stopped mid-step, rank 0's gloo
        # all-reduce times out; ended 53.6 s after the SIGSTOP when run. Not in the suite: it
        # held before the driver's fix (gloo has its own timeout) and costs ~2.5 min.
        # Ray Train: rank 0's barrier, or the health check of the stopped rank, whichever is
        # first (both take the timeout)
        ("report", 16, ["have not joined the collective operation: [1]", "health check"]),
    ],
)
def test_stopped_rank_ends_the_attempt_within_the_collective_timeout(
    where,
    step,
    detail,
    fmnist_url,
    mlflow_server,
    ray_session,
    ray_cluster,
    s3,
    tmp_path,
    monkeypatch,
):
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # the driver's run records
    parked = tmp_path / "parked.pid"
    keys_dir = ray_session(
        PIPELINE_FAULT_KILL_STEP=str(step),
        PIPELINE_FAULT_KILL_AT=where,
        PIPELINE_FAULT_KILL_RANK="1",
        PIPELINE_FAULT_MARKER=str(parked),
        PIPELINE_FAULT_KILL_DELAY="3600",  # parked, never killed: the SIGSTOP is the fault
        TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S=str(PG_SHUTDOWN),  # the controller reads it
    )
    name = f"stuck-{where}"
    bucket = s3.make_bucket(f"ckpt-stuck-{where}")
    job = make_job(fmnist_url, mlflow_server, f"{bucket}/ray", name, 2)
    job.scaling.collective_timeout_s = TIMEOUT
    stopped: dict[str, float | int] = {}

    def stop_rank_1():
        deadline = time.monotonic() + 200
        while not parked.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if parked.exists():
            pid = int(parked.read_text())
            os.kill(pid, signal.SIGSTOP)
            stopped.update(pid=pid, at_ns=time.time_ns(), at=time.monotonic())

    t = threading.Thread(target=stop_rank_1, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        res = run_training(job)
    finally:
        t.join(5)
        pid = stopped.get("pid")
        if pid and alive(pid):  # never leave a stopped process behind
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
    elapsed = time.monotonic() - t0
    assert stopped, "rank 1 never reached the step it parks at"
    per_rank = N_TRAIN // (2 * BATCH)
    assert res.metrics["step"] == 2 * per_rank

    # Ray Train's record: one run, two attempts; the first ended, naming the timed-out
    # collective, within the timeout plus the slack after the SIGSTOP.
    [run] = [r for r in train_runs(ray_cluster) if r["name"] == name]
    assert run["status"] == "FINISHED", run["status_detail"]
    first, second = sorted(run["attempts"], key=lambda a: a["start_time_ns"])
    assert first["status"] == "ERRORED" and second["status"] == "FINISHED"
    ended = (first["end_time_ns"] - stopped["at_ns"]) / 1e9
    print(f"attempt ended {ended:.1f}s after the SIGSTOP; run took {elapsed:.0f}s")
    assert ended <= TIMEOUT + SLACK, (ended, first["status_detail"])
    assert any(d in first["status_detail"] for d in detail), first["status_detail"]
    assert {w["pid"] for w in first["workers"]} >= {stopped["pid"]}
    wait_for(lambda: not alive(stopped["pid"]), 30, "Ray to end the stopped worker")

    # Exactly one retry: each rank's loop started twice.
    for rank in (0, 1):
        attempts = (keys_dir / f"attempts-rank{rank}.txt").read_text().split()
        assert len(attempts) == 2, (rank, attempts)
    assert int((keys_dir / "attempts-rank1.txt").read_text().split()[0]) == stopped["pid"]

    # One MLflow run; each logged step once, no gaps.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(f"test-{name}")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [res.run_id]
    steps = [s for s, _ in metric_history(mlflow_server.uri, res.run_id, "train/loss")]
    assert steps == list(range(4, 2 * per_rank + 1, 4))
