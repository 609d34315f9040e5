"""The local services for real: loopback-only binding, S3 and Ray auth, the stack's
lifecycle, Prometheus file_sd scraping, MLflow's artifact proxy and Ray job submission."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline import stack
from tests.helpers import LOOPBACK_IPS, listening, wait_for

pytestmark = pytest.mark.services  # also: the stack's own up/down, without fixtures


def http_status(url: str, method: str = "GET", headers=None, data: bytes | None = None) -> int:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def run_job(client, entrypoint: str, timeout: float = 90) -> tuple[str, str]:
    job_id = client.submit_job(entrypoint=entrypoint)
    status = wait_for(
        lambda: (s := client.get_job_status(job_id)).is_terminal() and s,
        timeout,
        f"ray job {job_id}",
        interval=0.5,
    )
    return str(status), client.get_job_logs(job_id)


# ----------------------------------------------------------------------------- binding


def test_servers_listen_on_loopback_only(s3, mlflow_server, ray_cluster, prometheus):
    # a job first, so Ray's job supervisor, driver and task workers have opened their ports too
    driver = "import ray; ray.init(); print(ray.get(ray.remote(lambda: 'task ok').remote()))"
    status, logs = run_job(ray_cluster.job_client(), f'python -c "{driver}"')
    assert status == "SUCCEEDED" and "task ok" in logs, logs
    expected = {
        s3: {s3.s3_port, *s3.role_ports.values()},
        mlflow_server: {mlflow_server.port},
        ray_cluster.head: set(ray_cluster.head.ports),
        prometheus: {prometheus.port},
    }
    for svc, ports in expected.items():

        def all_up(svc=svc, ports=ports):
            socks = listening(svc)
            return ports <= {port for _, port in socks} and socks

        socks = wait_for(all_up, 30, f"{svc.name} to listen on {sorted(ports)}")
        outside = sorted(s for s in socks if s[0] not in LOOPBACK_IPS)
        assert not outside, f"{svc.name} listens beyond loopback: {outside}"
    # Ray opens more than the ports we pass (raylet, object manager, agents): all on loopback
    assert len(listening(ray_cluster.head)) > len(ray_cluster.head.ports)


# ----------------------------------------------------------------------------- S3 auth


def test_s3_refuses_anonymous_and_wrong_keys(s3):
    bucket = s3.make_bucket("auth-test").removeprefix("s3://")
    client = s3.client()
    client.put_object(Bucket=bucket, Key="hello.txt", Body=b"hello s3")
    assert client.get_object(Bucket=bucket, Key="hello.txt")["Body"].read() == b"hello s3"

    url = s3.endpoint_url
    assert http_status(f"{url}/") == 403  # ListBuckets
    assert http_status(f"{url}/{bucket}/hello.txt") == 403
    assert http_status(f"{url}/{bucket}?list-type=2") == 403
    assert http_status(f"{url}/{bucket}/anon.txt", "PUT", data=b"x") == 403
    assert "anon.txt" not in {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}

    import botocore.session
    from botocore.exceptions import ClientError

    for key, secret, code in [
        (s3.access_key, "wrong" * 8, "SignatureDoesNotMatch"),
        ("NOSUCHKEY000", s3.secret_key, "InvalidAccessKeyId"),
    ]:
        bad = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
        )
        with pytest.raises(ClientError) as err:
            bad.get_object(Bucket=bucket, Key="hello.txt")
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert err.value.response["Error"]["Code"] == code


# ----------------------------------------------------------------------------- Ray auth


def _driver_env(tmp_path: Path, with_token: bool, ray_cluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PIPELINE_"))}
    env.update(HOME=str(tmp_path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # no ~/.ray token
    if with_token:
        env.update(ray_cluster.env)
    return env


DRIVER = """
import ray, sys
ray.init(address=sys.argv[1], log_to_driver=False)
print("sum", ray.get(ray.remote(lambda a, b: a + b).remote(20, 22)), flush=True)
"""


def test_ray_refuses_clients_without_token(ray_cluster, tmp_path, monkeypatch):
    api = f"{ray_cluster.dashboard_url}/api/jobs/"
    assert http_status(api) == 401
    assert http_status(api, headers={"Authorization": "Bearer not-the-token"}) == 403
    assert http_status(api, headers=ray_cluster.headers) == 200

    from ray._raylet import AuthenticationTokenLoader, Config
    from ray.job_submission import JobSubmissionClient

    def refresh():  # Ray caches the auth mode and token per process
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    refresh()
    try:
        with pytest.raises(Exception, match="(?i)authenticat"):
            JobSubmissionClient(ray_cluster.dashboard_url).list_jobs()
        authed = JobSubmissionClient(ray_cluster.dashboard_url, headers=ray_cluster.headers)
        assert isinstance(authed.list_jobs(), list)
    finally:
        monkeypatch.undo()
        refresh()

    # a driver without the token is refused by the GCS; Ray retries for a minute, so we watch
    log = tmp_path / "no-token.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, ray_cluster.address],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_driver_env(tmp_path, False, ray_cluster),
        )
    try:
        wait_for(
            lambda: "InvalidAuthToken" in log.read_text() or proc.poll() is not None,
            45,
            "the tokenless driver to be refused",
        )
        assert "InvalidAuthToken" in log.read_text()
        assert "sum 42" not in log.read_text()
    finally:
        proc.kill()
        proc.wait(10)


def test_ray_driver_with_token_connects(ray_cluster, tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, ray_cluster.address],
        capture_output=True,
        text=True,
        timeout=90,
        env=_driver_env(tmp_path, True, ray_cluster),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sum 42" in out.stdout


def test_ray_init_in_process_sees_s3_env(ray_env, s3):
    import ray

    ray.init(address=ray_env.address, log_to_driver=False)
    assert ray.cluster_resources()["CPU"] == 4

    @ray.remote
    def worker_env():
        return {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")}

    assert ray.get(worker_env.remote()) == {
        "AWS_ENDPOINT_URL": s3.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3.access_key,
    }


def test_job_submission_returns_logs(ray_cluster):
    status, logs = run_job(ray_cluster.job_client(), "python -c \"print('hello from ray job')\"")
    assert status == "SUCCEEDED", logs
    assert "hello from ray job" in logs


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_proxies_artifacts_to_s3(mlflow_server, s3, monkeypatch):
    from mlflow import MlflowClient

    for key in list(os.environ):
        if key.startswith(("AWS_", "MLFLOW_")):
            monkeypatch.delenv(key)  # the client needs the tracking URI only
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp_id = client.create_experiment(f"proxy-{time.time_ns()}")
    run = client.create_run(exp_id)
    client.log_text(run.info.run_id, "hello artifact", "notes/hello.txt")
    client.set_terminated(run.info.run_id)

    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    objects = s3.client().list_objects_v2(Bucket="mlflow-test", Prefix="artifacts/")
    keys = [o["Key"] for o in objects.get("Contents", [])]
    match = [k for k in keys if run.info.run_id in k and k.endswith("notes/hello.txt")]
    assert len(match) == 1, keys
    body = s3.client().get_object(Bucket="mlflow-test", Key=match[0])["Body"].read()
    assert body == b"hello artifact"


# ----------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_file_sd_target(prometheus):
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()
    gauge = prometheus_client.Gauge("pipeline_test_gauge", "a test value", registry=registry)
    gauge.set(42.5)
    port = stack.free_port()
    server, thread = prometheus_client.start_http_server(port, "127.0.0.1", registry=registry)
    target = prometheus.targets_dir / "test-worker.json"
    try:
        target.write_text(
            json.dumps(
                [{"targets": [f"127.0.0.1:{port}"], "labels": {"job": "training", "rank": "0"}}]
            )
        )
        instance = f'instance="127.0.0.1:{port}"'

        def up_value():
            result = prometheus.query(f'up{{job="training",{instance}}}')
            return result and result[0]["value"][1] == "1" and result

        result = wait_for(up_value, 45, "prometheus to scrape the file_sd target")
        assert result[0]["metric"]["rank"] == "0"
        value = prometheus.query(f"pipeline_test_gauge{{{instance}}}")
        assert float(value[0]["value"][1]) == 42.5
    finally:
        target.unlink(missing_ok=True)
        server.shutdown()
        thread.join(5)


# ----------------------------------------------------------------------------- the stack


@pytest.fixture
def stack_dir():
    path = Path(tempfile.mkdtemp(prefix="pl-stack-", dir="/tmp"))  # short: Ray's sockets
    yield path
    try:
        stack.down(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_stack_up_idempotent_down_leaves_nothing(stack_dir, monkeypatch, prometheus_bin):
    names = ["seaweedfs", "mlflow", "ray", "prometheus"]
    rows = stack.up(stack_dir, stack.StackPorts.free())
    assert [(name, action) for name, _, action in rows] == [(n, "started") for n in names]
    assert [(name, ok) for name, _, ok in stack.status(stack_dir)] == [(n, True) for n in names]
    leaders = {svc.name: svc.leader().pid for svc in stack.services(stack_dir)}

    # files: secrets private, env has no secret, load_stack_env fills only what is unset
    creds = stack_dir / "credentials.env"
    assert creds.stat().st_mode & 0o777 == 0o600
    assert (stack_dir / "ray_auth_token").stat().st_mode & 0o777 == 0o600
    secret = stack.read_env_file(creds)["AWS_SECRET_ACCESS_KEY"]
    assert secret not in (stack_dir / "env").read_text()
    for key in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_TRACKING_URI",
        "RAY_ADDRESS",
        "RAY_AUTH_MODE",
        "AWS_ENDPOINT_URL",
        "MLFLOW_S3_ENDPOINT_URL",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "kept")
    saved = dict(os.environ)  # load_stack_env writes os.environ directly: restore it after
    try:
        added = stack.load_stack_env(stack_dir)
        assert "RAY_AUTH_MODE" not in added and os.environ["RAY_AUTH_MODE"] == "kept"
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret
        assert os.environ["RAY_ADDRESS"] == rows[2][1]
    finally:
        os.environ.clear()
        os.environ.update(saved)

    # idempotent: a second up leaves every healthy service alone
    again = stack.up(stack_dir)
    assert [action for _, _, action in again] == ["running"] * 4
    assert {svc.name: svc.leader().pid for svc in stack.services(stack_dir)} == leaders

    # a dead service is restarted, the others are left alone
    os.kill(leaders["prometheus"], signal.SIGKILL)
    wait_for(lambda: not stack.services(stack_dir)[3].running(), 10, "prometheus to die")
    assert [ok for *_, ok in stack.status(stack_dir)] == [True, True, True, False]
    assert [a for *_, a in stack.up(stack_dir)] == ["running", "running", "running", "started"]

    # jobs get S3 from the head's env (no runtime_env): list the buckets up created
    ray = stack.services(stack_dir)[2]
    from ray.job_submission import JobSubmissionClient

    lister = (
        "import botocore.session as b; c = b.get_session().create_client('s3'); "
        "print(sorted(x['Name'] for x in c.list_buckets()['Buckets']))"
    )
    status, logs = run_job(
        JobSubmissionClient(ray.dashboard_url, headers=ray.headers), f'python -c "{lister}"'
    )
    assert status == "SUCCEEDED", logs
    assert "['checkpoints', 'data', 'mlflow']" in logs

    # Prometheus finds Ray's metrics endpoints through Ray's own file_sd file
    prom = stack.services(stack_dir)[3]
    wait_for(
        lambda: any(r["value"][1] == "1" for r in prom.query('up{job="ray"}')),
        45,
        "prometheus to scrape ray's metrics",
    )

    procs = [p for svc in stack.services(stack_dir) for p in svc.processes()]
    stopped = dict(stack.down(stack_dir))
    assert list(stopped) == names[::-1] and all(stopped.values())
    assert not [p.pid for p in procs if stack.alive(p)]
    assert not [p for svc in stack.services(stack_dir) for p in svc.processes()]
    assert [ok for *_, ok in stack.status(stack_dir)] == [False] * 4
    assert dict(stack.down(stack_dir)) == {n: [] for n in names[::-1]}  # nothing left to stop
