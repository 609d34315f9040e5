"""The process supervisor behind every local service (and the helpers they share).

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
REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_TEMPLATE = REPO_ROOT / "infra" / "local" / "prometheus.yml"
_handed_out: set[int] = set()
# free_port() hands out ports from here up to the kernel's ephemeral range: above Ray's worker
# ports (10002-19999 by default, 20000-20999 in the local stack) and below every port the
# kernel picks itself, for a bind to port 0 or the local end of an outgoing connection
FREE_PORT_LOW = 21000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class ServiceError(PipelineError):
    """A service failed to start, become healthy or stop."""


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1, never the same one twice per process.

    Drawn at random from ``FREE_PORT_LOW`` up to the kernel's ephemeral range (21000-32767 by
    default): a port from the ephemeral range could become the local end of any outgoing
    connection on the machine (Ray's processes open thousands) before the service that was
    given it binds it, and that service would fail to start. Where that window is empty (an
    ephemeral range that starts lower), the kernel picks, as for a bind to port 0.
    """
    low, high = FREE_PORT_LOW, _ephemeral_low()
    for _ in range(100):
        # from the OS's entropy: a seeded ``random`` would give every process the same ports
        port = low + secrets.randbelow(high - low) if high > low else 0
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
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
    raise ServiceError(
        f"prometheus not found ($PROMETHEUS_BIN, {debian}, PATH); "
        "run `make install` (infra/local/fetch_debs.sh)"
    )


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
            if proc and abs(proc.create_time() - rec["create_time"]) < 1 and alive(proc):
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
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                env={**self.environment(), MARKER_ENV: marker},
                start_new_session=True,
            )
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
        return [p for p in found.values() if alive(p)]

    def stop(self, timeout: float | None = None) -> list[int]:
        """Stop exactly our processes; returns their PIDs (empty if nothing ran).

        SIGTERM goes to the leader first, which shuts its children down in order (Ray: ~4s;
        ~15s when all its processes get it at once); what is left after ``timeout`` gets
        SIGTERM (unless it already had one), then SIGKILL.
        """
        timeout = self.stop_timeout if timeout is None else timeout
        rec, procs, leader = self._record(), self.processes(), self.leader()
        termed = [leader] if leader is not None else procs
        for p in termed:
            send_signal(p, signal.SIGTERM)
        wait_gone(procs, timeout)
        leftover = [p for p in procs if alive(p)] + [p for p in self.processes() if p not in procs]
        not_termed = [p for p in leftover if p not in termed]
        for p in not_termed:
            send_signal(p, signal.SIGTERM)
        wait_gone(not_termed, 2.0)
        for p in leftover:
            send_signal(p, signal.SIGKILL)
        wait_gone(leftover, 5.0)
        if self._popen is not None:
            self._popen.poll()  # reap
            self._popen = None
        survivors = [p.pid for p in procs + leftover if alive(p)]
        if survivors:
            raise ServiceError(f"{self.name}: processes {survivors} survived SIGKILL")
        self.pid_path.unlink(missing_ok=True)
        if rec:
            self.after_stop(rec)
        return sorted(p.pid for p in procs)


def alive(proc) -> bool:
    ps = psutil()
    try:
        return proc.is_running() and proc.status() != ps.STATUS_ZOMBIE
    except ps.Error:
        return False


def send_signal(proc, sig) -> None:
    try:
        proc.send_signal(sig)
    except psutil().Error:
        pass


def wait_gone(procs: list, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in procs):
        for p in procs:  # reap our own children so they do not linger as zombies
            try:
                os.waitpid(p.pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.1)
