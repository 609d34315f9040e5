"""Session fixtures that run REAL services on 127.0.0.1 (no mocks), started lazily: a test
that does not ask for Ray never starts Ray. Every fixture stops exactly the processes it
started (pipeline.stack.Service.stop), also when the session is interrupted. A test that
uses one of them, directly or through another fixture, is marked ``services``
(``make test-fast`` deselects those); a test that starts servers itself says so with
``@pytest.mark.services``. Under ``pytest -n N`` (``make test``: pytest-xdist, each test file
whole in one process) every process starts its own services, on free ports and in its own
state dir.

    s3              SeaweedFS: .endpoint_url .access_key .secret_key .env .make_bucket(name)
    s3_env          (function) os.environ patched with s3.env; returns s3
    mlflow_server   MLflow, artifacts proxied to s3://mlflow-test/artifacts: .uri
    ray_cluster     Ray head, token auth, s3.env in its env, 4 CPUs: .address .dashboard_url
                    .env (client env, also put in os.environ while it runs) .headers (HTTP
                    auth) .job_client(); ray.init(address=ray_cluster.address) just works
    ray_env         (function) ray_cluster, shutting down a driver the test left connected
    prometheus      Prometheus scraping {.targets_dir}/*.json every 1s: .url .query(expr)
    prometheus_bin  path of the prometheus binary, or skip (fail under CI=true)
    fmnist_url      (session) tests.helpers.N_TRAIN Fashion-MNIST train and test images as
                    128-sample shards on s3
    ray_session     (function) ray_session(**env_vars) does ray.init against ray_cluster
                    with those worker env vars and PIPELINE_RECORD_KEYS_DIR=tmp_path;
                    returns tmp_path
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Never the checkout's own stack (`make up`/`make demo` leave `.stack/`): the CLI, in this
# process and its children, takes the stack folder from here, a path no test creates.
os.environ["PIPELINE_STACK_DIR"] = str(
    Path(tempfile.gettempdir()) / f"pipeline-tests-no-stack-{os.getpid()}"
)

from pipeline import stack  # noqa: E402
from tests.helpers import N_TRAIN, patched_environ, require  # noqa: E402

# The fixtures that start a server; item.fixturenames is the closure of what a test uses, so
# fixtures built on these (s3_env, ray_env, fmnist_url, ...) and the tests' own count too.
SERVICE_FIXTURES = frozenset({"s3", "mlflow_server", "ray_cluster", "prometheus"})

_started: list[stack.Service] = []


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # SIGTERM (e.g. `timeout`, CI cancel) would end pytest without teardown; as an interrupt,
    # pytest still runs the finalizers that stop the services
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if SERVICE_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.services)


def _stop_all() -> None:
    while _started:
        svc = _started.pop()
        try:
            svc.stop()
        except stack.ServiceError as e:  # keep stopping the others
            print(f"conftest: {e}", file=sys.stderr)


atexit.register(_stop_all)  # backstop if a finalizer never ran


def _run(svc: stack.Service):
    """Start ``svc``, yield it, stop it: the body of every service fixture."""
    _started.append(svc)
    try:
        svc.start()
        yield svc
    finally:
        if svc in _started:
            _started.remove(svc)
        svc.stop()


@pytest.fixture(scope="session")
def services_dir():
    """One short state dir for the session's services (Ray's unix socket paths are short)."""
    path = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def s3(services_dir):
    import secrets

    yield from _run(
        stack.SeaweedFS(
            services_dir,
            access_key="TEST" + secrets.token_hex(8).upper(),
            secret_key=secrets.token_hex(20),
        )
    )


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture(scope="session")
def mlflow_server(s3, services_dir):
    bucket = s3.make_bucket("mlflow-test")
    yield from _run(stack.MlflowServer(services_dir, None, f"{bucket}/artifacts", s3))


class RayCluster:
    """Handle on the session's Ray head, for clients."""

    def __init__(self, head: stack.RayHead):
        self.head = head
        self.address = head.address
        self.dashboard_url = head.dashboard_url
        self.env = head.client_env
        self.token_path = head.token_path

    @property
    def headers(self) -> dict[str, str]:
        return self.head.headers

    def job_client(self):
        """JobSubmissionClient authenticated by header (no env needed)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.headers)


def _refresh_ray_auth() -> None:
    """Ray reads RAY_AUTH_MODE and the token once per process; make it re-read os.environ."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="session")
def ray_cluster(s3, services_dir):
    """While the session's Ray head runs, os.environ carries its client env (``.env``), so
    ``ray.init(address=ray_cluster.address)`` and subprocesses just work."""
    import ray
    import ray._private.ray_constants as ray_constants

    head = stack.RayHead(services_dir, num_cpus=4, env=s3.env, object_store_memory=512 * 2**20)
    env = pytest.MonkeyPatch()
    for h in _run(head):
        for key, value in h.client_env.items():
            env.setenv(key, value)
        for key in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
            env.delenv(key, raising=False)
        # read at `import ray`: without it ray.init rewrites 127.0.0.1 to the host's IP
        env.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        _refresh_ray_auth()
        try:
            yield RayCluster(h)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            env.undo()
            _refresh_ray_auth()


@pytest.fixture
def ray_env(ray_cluster):
    """ray_cluster, and a driver left connected by the test is shut down afterwards."""
    import ray

    yield ray_cluster
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def prometheus_bin():
    try:
        return stack.prometheus_bin()
    except stack.ServiceError as e:
        require(False, str(e))


@pytest.fixture(scope="session")
def prometheus(prometheus_bin, services_dir):
    yield from _run(stack.Prometheus(services_dir, scrape_interval="1s"))


@pytest.fixture(scope="session")
def fmnist_url(s3):
    from pipeline.data.config import IngestConfig
    from pipeline.data.ingest import ingest

    with patched_environ(s3.env):
        url = s3.make_bucket("train-data") + "/fmnist"
        ingest(
            IngestConfig(
                output_url=url,
                source="fashion_mnist",
                limit=N_TRAIN,
                shard_samples=128,
                workers=2,
            ),
            progress=False,
        )
    return url


@pytest.fixture
def ray_session(ray_env, s3_env, tmp_path):
    import ray

    def init(**env_vars):
        env_vars = {"PIPELINE_RECORD_KEYS_DIR": str(tmp_path), **env_vars}
        ray.init(address=ray_env.address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
        return tmp_path

    return init
