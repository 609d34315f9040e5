"""A second Ray node on this machine: ``ray start --address=HEAD --block`` on 127.0.0.1.

For multi-node tests on one host. The node joins a :class:`~pipeline.stack.RayHead` with
its token, gets its own ports and temp dir, and is stopped, or killed to simulate a crash,
exactly by PID/marker like every other :class:`~pipeline.stack.Service`.

Ray fights a loopback worker node twice: ``ray start --address`` aborts in single-node mode
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which the head needs to stay on 127.0.0.1), and
outside it rewrites ``--address=127.0.0.1:P`` and ``--node-ip-address=127.0.0.1`` to the
host's routable IP, where the head's GCS does not listen. So the node is started by
:func:`main`: ``ray start`` with exactly those two behaviours switched off. Every process it
spawns runs in single-node mode, like the head's.

The node shares the head's IP on purpose: Ray binds its servers to loopback only when the
node IP *is* ``127.0.0.1`` (any other address, even ``127.0.0.2``, makes the raylet and
agents listen on all interfaces). The price: Ray Train numbers ``node_rank``/``local_rank``
by node IP, so it sees one node with ``local_world_size`` 2; node ids stay distinct.
"""

from __future__ import annotations

import json
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request

from pipeline.stack import (
    LOOPBACK,
    RayHead,
    Service,
    ServiceError,
    alive,
    free_port,
    http_ok,
    psutil,
    send_signal,
    wait_gone,
)
from pipeline.stack.ray_head import make_temp_dir, node_environment
from tests.helpers import ROOT

# The node's launcher runs :func:`main` in a fresh interpreter whose cwd is an empty run dir
# and whose sys.path lacks the repository (only ``pipeline`` is installed): put the
# repository on its sys.path alone, not on PYTHONPATH, which every process of the node would
# inherit.
LAUNCH = (
    f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
    "from tests.ray_node import main; sys.exit(main())"
)


class RayWorkerNode(Service):
    """A non-head Ray node joined to ``head``, on 127.0.0.1.

    Args:
        state_dir: where logs, the pid file and the node's Ray temp dir go (keep it short:
            Ray's unix socket paths live under it).
        head: the running head to join; its token authenticates the node.
        num_cpus: the node's CPU resource.
        env: extra environment (e.g. S3 credentials) for the raylet and its workers.
        name: the service name (pid/log file names); one per node.
        resources: custom resources, e.g. ``{"node2": 1}``.
    """

    start_timeout = 90.0
    stop_timeout = 8.0

    def __init__(
        self,
        state_dir,
        head: RayHead,
        *,
        num_cpus: int = 1,
        env: dict[str, str] | None = None,
        name: str = "ray-worker",
        resources: dict[str, float] | None = None,
        object_store_memory: int | None = None,
    ):
        self.name = name
        super().__init__(state_dir)
        self.head, self.num_cpus = head, num_cpus
        self.extra_env, self.resources = dict(env or {}), dict(resources or {})
        self.object_store_memory = object_store_memory
        # fixed across restarts, as on a real machine; free_port() draws them from under the
        # kernel's ephemeral range, so a restarted node finds them free: an ephemeral one could
        # meanwhile be the local end of any of the connections the other services open
        self.port_map = {
            flag: free_port()
            for flag in (
                "node-manager-port",
                "object-manager-port",
                "runtime-env-agent-port",
                "dashboard-agent-grpc-port",
                "dashboard-agent-listen-port",
                "metrics-export-port",
            )
        }
        self.ports = tuple(self.port_map.values())
        self.temp_dir = self.state_dir / name

    @property
    def url(self) -> str:
        """The node's dashboard agent."""
        return f"http://{LOOPBACK}:{self.port_map['dashboard-agent-listen-port']}"

    def prepare(self) -> None:
        make_temp_dir(self.temp_dir)

    def environment(self) -> dict[str, str]:
        # client_env sets single-node mode, as on the head: see the module docstring
        return node_environment(self.extra_env, self.head.client_env)

    def command(self) -> list:
        cmd = [
            sys.executable,
            "-c",
            LAUNCH,
            "start",
            f"--address={self.head.address}",
            "--block",
            f"--node-ip-address={LOOPBACK}",
            f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            *(f"--{flag}={port}" for flag, port in self.port_map.items()),
        ]
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        if self.object_store_memory:
            cmd.append(f"--object-store-memory={self.object_store_memory}")
        return cmd

    def node_id(self) -> str | None:
        """This incarnation's node id (a restart gets a new one): our raylet's ``--node_id``."""
        for proc in self.processes():
            try:
                for arg in proc.cmdline():
                    if arg.startswith("--node_id="):
                        return arg.split("=", 1)[1]
            except psutil().Error:
                continue
        return None

    def gcs_state(self, node_id: str | None = None) -> str | None:
        """What the head's GCS says of ``node_id`` (default: ours): ALIVE, DEAD or None."""
        node_id = node_id or self.node_id()
        if not node_id:
            return None
        query = urllib.parse.urlencode(
            {
                "filter_keys": "node_id",
                "filter_predicates": "=",
                "filter_values": node_id,
                "detail": "true",
            }
        )
        req = urllib.request.Request(
            f"{self.head.dashboard_url}/api/v0/nodes?{query}", headers=self.head.headers
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                nodes = json.load(r)["data"]["result"]["result"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            return None
        return nodes[0]["state"] if nodes else None

    def healthy(self) -> bool:
        """The node's agent answers and the head's GCS lists the node ALIVE."""
        return http_ok(f"{self.url}/api/healthz") and self.gcs_state() == "ALIVE"

    def kill(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process of the node at once, as a machine crash would; returns their
        PIDs. The GCS notices only through its health checks."""
        killed = {}
        for _ in range(5):  # the raylet may fork a worker between listing and killing
            procs = [p for p in self.processes() if p.pid not in killed]
            if not procs:
                break
            for p in procs:
                send_signal(p, signal.SIGKILL)
                killed[p.pid] = p
            wait_gone(procs, timeout)
        if self._popen is not None:
            self._popen.poll()
            self._popen = None
        survivors = [pid for pid, p in killed.items() if alive(p)]
        if survivors:
            raise ServiceError(f"{self.name}: processes {survivors} survived SIGKILL")
        self.pid_path.unlink(missing_ok=True)
        return sorted(killed)


def main(argv: list[str] | None = None) -> int:
    """``ray start ARGV`` for a worker node that keeps loopback addresses as given."""
    import ray._private.ray_constants as ray_constants
    import ray._private.services as ray_services
    from ray.scripts.scripts import cli

    # in this process only: what it spawns reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 from env
    ray_constants.ENABLE_RAY_CLUSTER = True  # let `ray start --address` run
    ray_services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 as given
    return cli.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="ray")


if __name__ == "__main__":
    sys.exit(main())
