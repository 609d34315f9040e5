"""Multi-node on one machine (issue 9): a Ray head and a second Ray node, 1 CPU each, both on
127.0.0.1 with token auth. A 2-worker training job goes through the head's job server, as on
a real cluster; its workers land on different nodes and read disjoint samples. The second node
is SIGKILLed mid-epoch; with 1 CPU per node the worker group can only be placed again once the
node is back, and then the run resumes from its last checkpoint into the same MLflow run.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline import stack, storage
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.jobs import load_job
from pipeline.submit import runtime_env_for
from pipeline.train import checkpoint
from tests.helpers import (
    LOOPBACK_IPS,
    keys_by_step,
    listening,
    read_keys,
    registered_step,
    wait_for,
)
from tests.ray_node import RayWorkerNode

pytestmark = [pytest.mark.slow, pytest.mark.services]  # its own Ray head and second node

N_TRAIN = 1000
BATCH = 32
WORLD = 2
PER_EPOCH = N_TRAIN // (WORLD * BATCH)  # 15 steps per rank and epoch
REMAINDER = N_TRAIN - PER_EPOCH * WORLD * BATCH  # 40: the plan's tail, dropped each epoch
EPOCHS = 2
CKPT_EVERY = 8
PAUSE_STEP = 12  # rank 1 parks here (fault-injection marker) until the node is killed
NAME = "multinode"
OBJECT_STORE = 256 * 2**20


def state(head: stack.RayHead, kind: str, **filters: str) -> list[dict]:
    """Ray's state API (``ray list actors|nodes|placement-groups``) over HTTP with the head's
    token; ``ray.util.state`` would take the token from process-wide env instead."""
    query = urllib.parse.urlencode(
        {
            "filter_keys": list(filters),
            "filter_predicates": ["="] * len(filters),
            "filter_values": list(filters.values()),
            "detail": "true",
            "limit": 1000,
        },
        doseq=True,
    )
    req = urllib.request.Request(
        f"{head.dashboard_url}/api/v0/{kind}?{query}", headers=head.headers
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["data"]["result"]["result"]


def train_workers(head: stack.RayHead) -> list[dict]:
    return state(head, "actors", class_name="RayTrainWorker", state="ALIVE")


def train_runs(head: stack.RayHead) -> list[dict]:
    """Ray Train V2's own record of its runs and their attempts (the dashboard's Train view;
    needs RAY_TRAIN_ENABLE_STATE_TRACKING=1 in the driver)."""
    req = urllib.request.Request(f"{head.dashboard_url}/api/train/v2/runs/v1", headers=head.headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["train_runs"]


def leftovers(markers: set[str]) -> list[int]:
    """PIDs of live processes carrying one of our service markers."""
    ps, found = stack.psutil(), []
    for proc in ps.process_iter():
        try:
            if proc.environ().get(stack.MARKER_ENV) in markers and stack.alive(proc):
                found.append(proc.pid)
        except (ps.Error, OSError):
            continue
    return found


@pytest.fixture
def cluster(s3):
    """A head and a worker node, 1 CPU each, S3 credentials in both; every process of
    theirs (also of killed node incarnations) is gone afterwards."""
    state_dir = Path(tempfile.mkdtemp(prefix="pl-mn-", dir="/tmp"))  # short: unix sockets
    head = stack.RayHead(state_dir, num_cpus=1, env=s3.env, object_store_memory=OBJECT_STORE)
    node = RayWorkerNode(state_dir, head, num_cpus=1, env=s3.env, object_store_memory=OBJECT_STORE)
    markers: set[str] = set()
    try:
        head.start()
        markers.add(head._record()["marker"])
        node.start()
        markers.add(node._record()["marker"])
        yield head, node, markers
    finally:
        mine = [p for svc in (node, head) for p in svc.processes()]
        node.stop()
        head.stop()
        survivors = [p.pid for p in mine if stack.alive(p)] + leftovers(markers)
        shutil.rmtree(state_dir, ignore_errors=True)
        assert not survivors, f"processes left behind: {survivors}"


@pytest.fixture
def fmnist_url(s3_env):
    """Fashion-MNIST, the first 1000 train and 1000 test images, as 125-sample shards."""
    url = s3_env.make_bucket("multinode-data") + "/fmnist"
    ingest(
        IngestConfig(
            output_url=url, source="fashion_mnist", limit=N_TRAIN, shard_samples=125, workers=2
        ),
        progress=False,
    )
    return url


def dataset_keys(s3, split_url: str) -> set[str]:
    """Every sample key in a split's shards, read straight from S3."""
    bucket, _, prefix = split_url.removeprefix("s3://").partition("/")
    client, keys = s3.client(), set()
    manifest = client.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read()
    for shard in json.loads(manifest)["shards"]:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{shard['name']}")["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            keys |= {m.name.rsplit(".", 1)[0] for m in tar.getmembers()}
    return keys


def write_job(
    path: Path,
    data_url: str,
    mlflow_uri: str,
    env_vars: dict[str, str],
    name: str = NAME,
    **scaling,
) -> Path:
    """A train job yaml as a user would write it for a cluster (entrypoint, runtime_env);
    ``scaling`` overrides keys of its ``scaling`` section."""
    path.write_text(
        yaml.safe_dump(
            {
                "kind": "train",
                "entrypoint": f"python -m pipeline train {path}",
                "runtime_env": {"working_dir": str(stack.REPO_ROOT), "env_vars": env_vars},
                "config": {
                    "data": {
                        "train_url": f"{data_url}/train",
                        "test_url": f"{data_url}/test",
                        "num_workers": 0,
                        "shuffle_buffer": 64,
                        "binarize": True,
                    },
                    "model": {
                        "image_size": 28,
                        "in_channels": 1,
                        "channels": [8, 16],
                        "latent_dim": 8,
                        "likelihood": "bernoulli",
                    },
                    "optim": {
                        "epochs": EPOCHS,
                        "batch_size": BATCH,
                        "lr": 3e-3,
                        "warmup_steps": 4,
                        "checkpoint_every": CKPT_EVERY,
                        "log_every": 4,
                        "eval_batches": 2,
                        "iwae_k": 8,
                        "iwae_images": 16,
                        "torch_threads": 1,
                    },
                    "scaling": {
                        "num_workers": WORLD,
                        "cpus_per_worker": 1,
                        "storage_path": f"s3://ckpt-{name}/ray",
                        "name": name,
                        "max_failures": 1,
                        "num_to_keep": 2,
                        **scaling,
                    },
                    "tracking": {
                        "mlflow_uri": mlflow_uri,
                        "experiment": f"test-{name}",
                        "registered_model": f"test-{name}",
                        "metrics_port": -1,
                    },
                },
            },
            sort_keys=False,
        )
    )
    return path


def test_two_nodes_split_data_and_survive_node_death(
    cluster, fmnist_url, mlflow_server, s3, tmp_path
):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    head, node, markers = cluster
    t0 = time.monotonic()
    nodes = state(head, "nodes", state="ALIVE")
    head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
    first_id = node.node_id()
    assert sorted(n["node_id"] for n in nodes) == sorted([head_id, first_id])
    assert [(n["node_ip"], n["resources_total"]["CPU"]) for n in nodes] == [("127.0.0.1", 1)] * 2

    # the second node, like the head, listens on loopback only
    def node_sockets():
        socks = listening(node)
        return set(node.ports) <= {port for _, port in socks} and socks

    socks = wait_for(node_sockets, 30, "node 2 to listen on its ports")
    assert {ip for ip, _ in socks} <= LOOPBACK_IPS, socks
    s3.make_bucket(f"ckpt-{NAME}")

    keys_dir, paused = tmp_path / "keys", tmp_path / "paused.pid"
    keys_dir.mkdir()
    spec = load_job(
        write_job(
            tmp_path / "train-multinode.yaml",
            fmnist_url,
            mlflow_server.uri,
            {
                "OMP_NUM_THREADS": "1",
                "PIPELINE_RECORD_KEYS_DIR": str(keys_dir),
                "PIPELINE_FAULT_KILL_STEP": str(PAUSE_STEP),
                "PIPELINE_FAULT_KILL_RANK": "1",
                "PIPELINE_FAULT_MARKER": str(paused),
                "PIPELINE_FAULT_KILL_DELAY": "90",
                "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",  # Ray Train's run/attempt records, below
            },
        )
    )
    runtime_env = runtime_env_for(spec)
    client = JobSubmissionClient(head.dashboard_url, headers=head.headers)
    job_id = client.submit_job(entrypoint=spec.entrypoint, runtime_env=runtime_env)

    def status() -> JobStatus:
        return client.get_job_status(job_id)

    try:
        # 1. Both workers run, one per node; rank 1 parks at step 12, after the step-8
        #    checkpoint, which Ray Train has registered before the node goes.
        wait_for(lambda: paused.exists() or status().is_terminal(), 150, "rank 1 at step 12")
        assert not status().is_terminal(), client.get_job_logs(job_id)
        running = train_workers(head)
        assert sorted(w["node_id"] for w in running) == sorted([head_id, first_id]), running
        wait_for(
            lambda: registered_step(s3.client(), f"ckpt-{NAME}", NAME) == CKPT_EVERY,
            30,
            "the step-8 checkpoint",
        )

        # 2. The second node dies: every process of it at once, as in a machine crash.
        t_kill = time.monotonic()
        killed = node.kill()
        assert len(killed) >= 4, killed  # launcher, raylet, agents, a train worker
        wait_for(lambda: node.gcs_state(first_id) == "DEAD", 60, "the GCS to mark node 2 DEAD")
        t_dead = time.monotonic() - t_kill

        # 3. Ray Train retries (max_failures=1), but with 1 CPU left the new worker group
        #    cannot be placed: it waits in SCHEDULING, and training makes no progress.
        def stalled() -> bool:
            [run] = train_runs(head)
            pgs = [p["state"] for p in state(head, "placement_groups")]
            return (
                run["status"] == "SCHEDULING"
                and run["attempts"][-1]["status"] == "PENDING"
                and "PENDING" in pgs
                and not train_workers(head)
            )

        wait_for(stalled, 60, "Ray Train waiting to place the worker group again")
        sizes = {f.name: f.stat().st_size for f in keys_dir.iterdir()}
        time.sleep(3)
        assert stalled() and status() == JobStatus.RUNNING
        assert {f.name: f.stat().st_size for f in keys_dir.iterdir()} == sizes

        # 4. The node comes back (a new node id); the run resumes and finishes.
        node.start()
        markers.add(node._record()["marker"])
        second_id = node.node_id()
        assert second_id not in (first_id, head_id)
        final = wait_for(lambda: (s := status()).is_terminal() and s, 180, "the job to end")
    finally:
        if not status().is_terminal():
            client.stop_job(job_id)
    logs = client.get_job_logs(job_id)
    (tmp_path / "job.log").write_text(logs)
    print(
        f"node death noticed by the GCS after {t_dead:.1f}s; test body {time.monotonic() - t0:.0f}s"
    )
    assert final == JobStatus.SUCCEEDED, logs[-5000:]

    # Ray Train's record: one run, two attempts. The first placed one rank per node and ended
    # when the worker on node 2 was lost; the second ran on the head and the new node.
    [run] = train_runs(head)
    assert (run["name"], run["status"], len(run["attempts"])) == (NAME, "FINISHED", 2)
    first, second = sorted(run["attempts"], key=lambda a: a["start_time_ns"])
    # Whichever the controller's poll sees first ends it: the lost worker's failed health
    # check (naming its node), or rank 0's all-reduce, whose peer on node 2 is gone.
    detail = first["status_detail"]
    assert first["status"] == "ERRORED"
    assert ("A worker health check failed" in detail and first_id in detail) or (
        "[Rank 0 Error Snippet]" in detail and "Connection closed by peer" in detail
    ), detail
    assert second["status"] == "FINISHED"
    rank_node = {w["world_rank"]: w["node_id"] for w in first["workers"]}
    assert sorted(rank_node.values()) == sorted([head_id, first_id])
    # Ray Train groups workers into nodes by IP: both nodes are 127.0.0.1 (cluster_node.py)
    assert [(w["node_rank"], w["local_rank"]) for w in first["workers"]] == [(0, 0), (0, 1)]
    assert first["workers"][1]["pid"] == int(paused.read_text())
    assert sorted(w["node_id"] for w in second["workers"]) == sorted([head_id, second_id])

    # One MLflow run, FINISHED, its step axis complete: no gaps, no repeats; the model is
    # registered from the final checkpoint (step 30).
    ml = MlflowClient(mlflow_server.uri)
    exp = ml.get_experiment_by_name(f"test-{NAME}")
    runs = ml.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    total = EPOCHS * PER_EPOCH
    assert [m.step for m in ml.get_metric_history(run_id, "train/loss")] == list(
        range(4, total + 1, 4)
    )
    evals = ml.get_metric_history(run_id, "eval/neg_elbo_bits")
    assert sorted(m.step for m in evals) == [PER_EPOCH, total]
    version = ml.get_model_version_by_alias(f"test-{NAME}", "candidate")
    assert version.run_id == run_id and version.version == "1"
    assert registered_step(s3.client(), f"ckpt-{NAME}", NAME) == total
    # the driver's last line came back through the job server
    done = re.search(rf"MLflow run {run_id} \| checkpoint (s3://ckpt-{NAME}/ray/{NAME}/\S+)", logs)
    assert done, logs[-3000:]
    ckpt_url = done.group(1)
    saved = checkpoint.load(storage.download_dir(ckpt_url, str(tmp_path / "ckpt")))
    assert saved["state"]["step"] == total and saved["state"]["mlflow_run_id"] == run_id

    # Samples, by rank and so by node: every step once, except steps 9..12 of epoch 0 (after
    # the checkpoint, up to the kill), replayed on the same samples. Per epoch the two nodes'
    # samples are disjoint and cover the data set but for the 40-sample remainder.
    keys = {rank: keys_by_step(rows) for rank, rows in read_keys(keys_dir).items()}  # by step
    assert sorted(keys) == [0, 1]
    want = [
        (e, s) for e in range(EPOCHS) for s in range(e * PER_EPOCH + 1, (e + 1) * PER_EPOCH + 1)
    ]
    for rank in (0, 1):
        assert sorted(keys[rank]) == want
        for (e, s), ks in keys[rank].items():
            if e == 0 and CKPT_EVERY < s <= PAUSE_STEP:
                assert len(ks) == 2 * BATCH and ks[:BATCH] == ks[BATCH:], (rank, e, s)
            else:
                assert len(ks) == BATCH, (rank, e, s)
    everything = dataset_keys(s3, f"{fmnist_url}/train")
    assert len(everything) == N_TRAIN
    for e in range(EPOCHS):
        seen = [
            {k for (ee, _), ks in keys[r].items() if ee == e for k in ks[:BATCH]} for r in (0, 1)
        ]
        assert len(seen[0]) == len(seen[1]) == PER_EPOCH * BATCH, (e, rank_node)
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] <= everything
        assert len(everything - seen[0] - seen[1]) == REMAINDER


# A node that never returns: the retry waits START_TIMEOUT s to place the worker group,
# CONTROLLER_LIMIT + 1 times, then the run fails. Bound after the kill: Ray noticing the lost
# worker (the controller's poll, or the GCS's node health check: 5 missed checks 3 s apart on
# Ray's defaults) plus those waits, plus the controller's and the driver's own seconds.
START_TIMEOUT = 10
CONTROLLER_LIMIT = 1
DETECTION = 30
LOST_BOUND = DETECTION + (CONTROLLER_LIMIT + 1) * START_TIMEOUT + 20


@pytest.mark.timeout(300)
def test_node_that_never_returns_fails_the_run_naming_the_cause(
    cluster, fmnist_url, mlflow_server, s3, tmp_path
):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    head, node, markers = cluster
    name = "node-lost"
    s3.make_bucket(f"ckpt-{name}")
    paused = tmp_path / "paused.pid"
    spec = load_job(
        write_job(
            tmp_path / "train-node-lost.yaml",
            fmnist_url,
            mlflow_server.uri,
            {
                "OMP_NUM_THREADS": "1",
                "PIPELINE_FAULT_KILL_STEP": str(PAUSE_STEP),
                "PIPELINE_FAULT_KILL_RANK": "1",
                "PIPELINE_FAULT_MARKER": str(paused),
                "PIPELINE_FAULT_KILL_DELAY": "90",
            },
            name=name,
            worker_start_timeout_s=START_TIMEOUT,
            controller_failure_limit=CONTROLLER_LIMIT,
        )
    )
    client = JobSubmissionClient(head.dashboard_url, headers=head.headers)
    job_id = client.submit_job(entrypoint=spec.entrypoint, runtime_env=runtime_env_for(spec))

    def status() -> JobStatus:
        return client.get_job_status(job_id)

    try:
        # Both workers run, one per node; rank 1 (on node 2) parks at step 12.
        wait_for(lambda: paused.exists() or status().is_terminal(), 150, "rank 1 at step 12")
        assert not status().is_terminal(), client.get_job_logs(job_id)
        node_id = node.node_id()
        assert node_id in {w["node_id"] for w in train_workers(head)}

        # Node 2 dies for good: every process of it at once, and it never comes back.
        t_kill = time.monotonic()
        node.kill()
        final = wait_for(
            lambda: (s := status()).is_terminal() and s, LOST_BOUND + 60, "the job to end"
        )
        ended = time.monotonic() - t_kill
    finally:
        if not status().is_terminal():
            client.stop_job(job_id)
    logs = client.get_job_logs(job_id)
    (tmp_path / "job.log").write_text(logs)
    print(f"the run failed {ended:.1f}s after node 2 was killed (bound {LOST_BOUND}s)")
    assert final == JobStatus.FAILED, logs[-5000:]
    assert node.gcs_state(node_id) == "DEAD"
    assert ended <= LOST_BOUND, ended

    # One line names the cause, the bound and the settings behind it; it is the last line.
    want = (
        f"training run {name!r} failed: the cluster could not place 2 workers "
        f"({{'CPU': 1.0}} each) within {START_TIMEOUT}s, {CONTROLLER_LIMIT + 1} times in a row "
        f"(scaling.worker_start_timeout_s={START_TIMEOUT}, "
        f"scaling.controller_failure_limit={CONTROLLER_LIMIT}): a node was lost and not "
        f"replaced, or the cluster is too small"
    )
    assert logs.strip().splitlines()[-1].endswith(want), logs[-3000:]
    # Ray Train tried exactly that often: one worker-group failure, then the placements.
    assert logs.count("The worker group startup timed out after") >= CONTROLLER_LIMIT + 1

    # The MLflow run is marked FAILED, and no model is registered.
    ml = MlflowClient(mlflow_server.uri)
    exp = ml.get_experiment_by_name(f"test-{name}")
    [run] = ml.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
