"""Launchers for the local services: SeaweedFS (S3), MLflow, a Ray head, Prometheus.

Each service runs in its own session (``start_new_session``) with a unique marker in its
environment and records ``{pid, create_time, marker, cmd}`` in ``{state_dir}/pids/{name}.json``.
``stop()`` ends exactly the processes that are ours: the leader, its descendants, its session
and anything carrying the marker (Ray job drivers leave the session but keep the env).
Everything binds to 127.0.0.1. Nothing happens at import time.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.errors import PipelineError

LOOPBACK = "127.0.0.1"
MARKER_ENV = "PIPELINE_SERVICE_MARKER"
REPO_ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_TEMPLATE = REPO_ROOT / "infra" / "local" / "prometheus.yml"
_handed_out: set[int] = set()


class ServiceError(PipelineError):
    """A service failed to start, become healthy or stop."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1, never the same one twice per process."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise ServiceError("could not find a free port on 127.0.0.1")


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


def venv_bin(name: str) -> Path:
    """``name`` next to the running interpreter (the project venv), else on PATH."""
    path = Path(sys.executable).parent / name
    found = path if path.exists() else shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` not found at {path} or on PATH; run `make install`")
    return Path(found)


def prometheus_bin() -> Path:
    """$PROMETHEUS_BIN, else the Debian binary from infra/local/fetch_debs.sh, else PATH."""
    debian = REPO_ROOT / ".cache/debs/prometheus/usr/bin/prometheus"
    for cand in (os.environ.get("PROMETHEUS_BIN"), debian, shutil.which("prometheus")):
        if cand and Path(cand).is_file():
            return Path(cand)
    raise ServiceError(f"prometheus not found ($PROMETHEUS_BIN, {debian}, PATH); "
                       "run `make install` (infra/local/fetch_debs.sh)")  # fmt: skip


def psutil():
    """psutil, which ships vendored inside ray (ray/thirdparty_files), not in the venv."""
    try:
        import psutil as mod
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("ray")
        if spec is None or not spec.submodule_search_locations:
            raise
        sys.path.append(str(Path(list(spec.submodule_search_locations)[0]) / "thirdparty_files"))
        import psutil as mod
    return mod


def http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (0600), also when it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


class Service:
    """One supervised server (and whatever it spawns). Subclasses set ``name``, ``url``,
    ``ports`` and implement ``command()`` and ``healthy()``."""

    name = "service"
    url = ""
    ports: tuple[int, ...] = ()
    start_timeout = 60.0
    stop_timeout = 10.0

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir).resolve()
        self.log_path = self.state_dir / "logs" / f"{self.name}.log"
        self.pid_path = self.state_dir / "pids" / f"{self.name}.json"
        self._popen: subprocess.Popen | None = None

    def command(self) -> list:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def prepare(self) -> None:
        """Write config files etc. before launching."""

    def after_stop(self, record: dict) -> None:
        """Clean up files the stopped run (``record``: its pid file) left behind."""

    def _record(self) -> dict | None:
        try:
            return json.loads(self.pid_path.read_text())
        except (OSError, ValueError):
            return None

    def leader(self):
        """The recorded leader process if that same process still lives, else None."""
        rec, ps = self._record(), psutil()
        try:
            proc = ps.Process(rec["pid"]) if rec else None
            if proc and abs(proc.create_time() - rec["create_time"]) < 1 and _alive(proc):
                return proc
        except ps.Error:
            pass
        return None

    def running(self) -> bool:
        return self.leader() is not None

    def start(self, timeout: float | None = None) -> bool:
        """Start unless running; wait until healthy. Returns whether it launched anything."""
        if self.running():
            self.wait_ready(timeout)
            return False
        if self._record():
            self.stop()  # stale pid file: clear what is left of a dead run
        busy = [p for p in self.ports if port_in_use(p)]
        if busy:
            raise ServiceError(f"{self.name}: port(s) {busy} on {LOOPBACK} already in use")
        self.prepare()
        # an empty cwd: Ray job drivers inherit it, and a `ray/` or `mlflow/` dir there would
        # shadow the real packages on their sys.path
        workdir = self.state_dir / "run" / self.name
        for path in (self.log_path.parent, self.pid_path.parent, workdir):
            path.mkdir(parents=True, exist_ok=True)
        marker = f"{self.name}-{secrets.token_hex(8)}"
        cmd = [str(c) for c in self.command()]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%F %T')} {' '.join(cmd)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
                env={**self.environment(), MARKER_ENV: marker}, start_new_session=True,
            )  # fmt: skip
        pid = self._popen.pid
        rec = {"pid": pid, "create_time": psutil().Process(pid).create_time(), "marker": marker}
        self.pid_path.write_text(json.dumps({**rec, "cmd": cmd}, indent=1))
        try:
            self.wait_ready(timeout)
        except ServiceError:
            self.stop()
            raise
        return True

    def wait_ready(self, timeout: float | None = None) -> None:
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if not self.running():
                raise ServiceError(f"{self.name} exited during startup; see {self.log_path}")
            time.sleep(0.25)
        raise ServiceError(f"{self.name} not healthy after {timeout:.0f}s; see {self.log_path}")

    def processes(self) -> list:
        """Every live process of ours: leader, descendants, its session, marker holders."""
        rec, ps, leader = self._record(), psutil(), self.leader()
        if not rec:
            return []
        found = {}
        if leader is not None:
            found = {p.pid: p for p in [leader, *leader.children(recursive=True)]}
        for proc in ps.process_iter():
            if proc.pid in found or proc.pid == os.getpid():
                continue
            try:
                if (leader is not None and os.getsid(proc.pid) == leader.pid) or (
                    proc.environ().get(MARKER_ENV) == rec["marker"]
                ):
                    found[proc.pid] = proc
            except (ps.Error, OSError):
                continue
        return [p for p in found.values() if _alive(p)]

    def stop(self, timeout: float | None = None) -> list[int]:
        """Stop exactly our processes; returns their PIDs (empty if nothing ran).

        SIGTERM goes to the leader first, which shuts its children down in order (Ray: ~4s;
        ~15s when all its processes get it at once); what is left after ``timeout`` gets
        SIGTERM, then SIGKILL.
        """
        timeout = self.stop_timeout if timeout is None else timeout
        rec, procs, leader = self._record(), self.processes(), self.leader()
        for p in [leader] if leader is not None else procs:
            _signal(p, signal.SIGTERM)
        _wait_gone(procs, timeout)
        leftover = [p for p in procs if _alive(p)] + [p for p in self.processes() if p not in procs]
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            for p in leftover:
                _signal(p, sig)
            _wait_gone(leftover, wait)
        if self._popen is not None:
            self._popen.poll()  # reap
            self._popen = None
        survivors = [p.pid for p in procs + leftover if _alive(p)]
        if survivors:
            raise ServiceError(f"{self.name}: processes {survivors} survived SIGKILL")
        self.pid_path.unlink(missing_ok=True)
        if rec:
            self.after_stop(rec)
        return sorted(p.pid for p in procs)


def _alive(proc) -> bool:
    ps = psutil()
    try:
        return proc.is_running() and proc.status() != ps.STATUS_ZOMBIE
    except ps.Error:
        return False


def _signal(proc, sig) -> None:
    try:
        proc.send_signal(sig)
    except psutil().Error:
        pass


def _wait_gone(procs: list, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        for p in procs:  # reap our own children so they do not linger as zombies
            try:
                os.waitpid(p.pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.1)


class SeaweedFS(Service):
    """``weed server`` (master, volume, filer, S3 gateway); S3 requires the one identity
    (``access_key``/``secret_key``), anonymous requests get 403.

    ``ports`` maps weed's other roles (``master``, ``master.grpc``, ``volume``,
    ``volume.grpc``, ``filer``, ``filer.grpc``, ``s3.grpc``) to ports; missing ones are free.
    """

    name = "seaweedfs"
    # on SIGTERM its filer first waits 15s for the S3 gateway's stream; a SIGKILL loses no
    # acknowledged write (volumes and the filer's leveldb log are in the page cache)
    stop_timeout = 2.0
    ROLES = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")

    def __init__(self, state_dir, s3_port: int | None = None, *, access_key: str,
                 secret_key: str, ports: dict[str, int] | None = None,
                 volume_size_limit_mb: int = 64):  # fmt: skip
        super().__init__(state_dir)
        self.s3_port = s3_port or free_port()
        self.role_ports = {r: (ports or {}).get(r) or free_port() for r in self.ROLES}
        self.ports = (self.s3_port, *self.role_ports.values())
        self.access_key, self.secret_key = access_key, secret_key
        self.volume_size_limit_mb = volume_size_limit_mb
        self.dir = self.state_dir / "seaweedfs"

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    url = endpoint_url

    @property
    def env(self) -> dict[str, str]:
        """What an S3 client (botocore, s3fs, Ray workers) needs."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip

    def prepare(self) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        identity = {"name": "pipeline", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}  # fmt: skip
        write_private(self.dir / "s3.json", json.dumps({"identities": [identity]}))

    def command(self) -> list:
        p = self.role_ports
        return [
            venv_bin("weed"), "server", f"-dir={self.dir / 'data'}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}", "-master.telemetry=false",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=0", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            "-filer.disableHttp",  # the filer's HTTP API would serve bucket files unsigned
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.config={self.dir / 's3.json'}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-s3.localSocket={self.dir / 's3.sock'}",
        ]  # fmt: skip

    def client(self):
        """A botocore S3 client signed with this server's identity."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 2}, connect_timeout=3, read_timeout=10),
        )  # fmt: skip

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
            if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return f"s3://{name}"

    def after_stop(self, record: dict) -> None:
        # weed names its gRPC unix sockets after the run's ports; a SIGKILL leaves them behind
        for arg in record.get("cmd", []):
            flag, _, port = arg.lstrip("-").partition("=")
            if flag.endswith(".port.grpc") and port.isdigit():
                Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock").unlink(missing_ok=True)


class MlflowServer(Service):
    """``mlflow server``: sqlite backend, artifacts proxied (``--serve-artifacts``) to
    ``artifacts_destination`` on ``s3``, so clients need the tracking URI only."""

    name = "mlflow"
    start_timeout = 120.0

    def __init__(self, state_dir, port: int | None = None, artifacts_destination: str = "",
                 s3: SeaweedFS | None = None):  # fmt: skip
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
            venv_bin("mlflow"), "server", "--host", LOOPBACK, "--port", self.port,
            "--workers", "1", "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", self.artifacts_destination,
        ]  # fmt: skip

    def healthy(self) -> bool:
        return http_ok(f"{self.uri}/health")


class RayHead(Service):
    """``ray start --head --block`` on 127.0.0.1 with token auth (``RAY_AUTH_MODE=token``).

    The token is in ``token_path`` (0600, made if missing), given to Ray as
    ``RAY_AUTH_TOKEN_PATH``. ``env`` (e.g. S3 credentials) goes into the head's process env, so
    every worker and job driver inherits it. Ray rewrites ``--node-ip-address=127.0.0.1`` to
    the host's routable IP unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (single-node mode):
    the head and every ``ray.init`` client get it (``client_env``).
    """

    name = "ray"
    start_timeout = 120.0
    stop_timeout = 8.0

    def __init__(self, state_dir, port: int | None = None, dashboard_port: int | None = None, *,
                 num_cpus: int = 4, env: dict[str, str] | None = None,
                 token_path: str | Path | None = None, client_server_port: int | None = None,
                 dashboard_agent_port: int | None = None,
                 metrics_ports: tuple[int, int] | None = None,
                 object_store_memory: int | None = None,
                 worker_ports: tuple[int, int] | None = None):  # fmt: skip
        super().__init__(state_dir)
        self.port, self.dashboard_port = port or free_port(), dashboard_port or free_port()
        self.client_server_port = client_server_port or free_port()
        self.dashboard_agent_port = dashboard_agent_port or free_port()
        # autoscaler + dashboard metrics ports default to a fixed 44217/44227: heads would clash
        self.metrics_ports = metrics_ports or (free_port(), free_port())
        self.ports = (self.port, self.dashboard_port, self.client_server_port,
                      self.dashboard_agent_port, *self.metrics_ports)  # fmt: skip
        self.num_cpus, self.extra_env = num_cpus, dict(env or {})
        self.token_path = Path(token_path or self.state_dir / "ray_auth_token").resolve()
        self.object_store_memory, self.worker_ports = object_store_memory, worker_ports
        self.temp_dir = self.state_dir / "ray"

    @property
    def address(self) -> str:
        """GCS address, for ``ray.init(address=...)``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard and job server, for ``JobSubmissionClient``."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    url = dashboard_url

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    @property
    def client_env(self) -> dict[str, str]:
        """Env a client process needs (``ray.init``, ``ray job``, JobSubmissionClient)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip

    @property
    def headers(self) -> dict[str, str]:
        """HTTP auth for the dashboard/job API; works without ``client_env``."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def metrics_sd_file(self) -> Path:
        """Ray's Prometheus file_sd file listing its metrics endpoints."""
        return self.temp_dir / "prom_metrics_service_discovery.json"

    def prepare(self) -> None:
        # {temp_dir}/session_<date>_<pid>/sockets/plasma_store must fit a unix socket path
        if len(str(self.temp_dir)) > 45:
            raise ServiceError(f"Ray temp dir {self.temp_dir} is too long for unix sockets; "
                               "use a state dir path under ~40 characters")  # fmt: skip
        if not self.token_path.exists() or not self.token:
            write_private(self.token_path, secrets.token_hex(32))
        self.temp_dir.mkdir(parents=True, exist_ok=True)

    def environment(self) -> dict[str, str]:
        drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(self.extra_env, **self.client_env, RAY_USAGE_STATS_ENABLED="0")
        env["AUTOSCALER_METRIC_PORT"], env["DASHBOARD_METRIC_PORT"] = map(str, self.metrics_ports)
        # job entrypoints say `python ...`: make that the venv's interpreter, as for the head
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def command(self) -> list:
        cmd = [
            venv_bin("ray"), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}",
            f"--port={self.port}", f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={self.dashboard_port}", f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
            f"--ray-client-server-port={self.client_server_port}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_port}",
        ]  # fmt: skip
        if self.object_store_memory:
            cmd.append(f"--object-store-memory={self.object_store_memory}")
        if self.worker_ports:
            cmd += [f"--min-worker-port={self.worker_ports[0]}",
                    f"--max-worker-port={self.worker_ports[1]}"]  # fmt: skip
        return cmd

    def healthy(self) -> bool:
        """GCS up, job API answers with the token, the raylet's dashboard agent is up."""
        return (
            http_ok(f"{self.dashboard_url}/api/gcs_healthz")
            and http_ok(f"{self.dashboard_url}/api/version", headers=self.headers)
            and http_ok(f"http://{LOOPBACK}:{self.dashboard_agent_port}/api/healthz")
        )


class Prometheus(Service):
    """Prometheus scraping ``{targets_dir}/*.json`` (file_sd, job ``training``) and Ray's
    service-discovery file (job ``ray``); config rendered from infra/local/prometheus.yml."""

    name = "prometheus"

    def __init__(self, state_dir, port: int | None = None, targets_dir: str | Path | None = None,
                 *, ray_sd_file: str | Path | None = None, scrape_interval: str = "5s",
                 retention: str = "15d"):  # fmt: skip
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
        (self.dir / "prometheus.yml").write_text(string.Template(
            PROMETHEUS_TEMPLATE.read_text()).substitute(
            scrape_interval=self.scrape_interval, targets_glob=self.targets_dir / "*.json",
            ray_sd_file=self.ray_sd_file,
        ))  # fmt: skip

    def command(self) -> list:
        return [
            prometheus_bin(), f"--config.file={self.dir / 'prometheus.yml'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--storage.tsdb.retention.time={self.retention}",
        ]  # fmt: skip

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
