"""How ``Service.stop`` escalates, on a stand-in service whose leader ignores SIGTERM (as
SeaweedFS does for seconds) and whose child exits on it. No server starts here."""

from __future__ import annotations

import signal
import sys
import textwrap

from pipeline import stack

# Each process appends "TERM" to its own file per SIGTERM it gets. The leader ignores them;
# its child (same session, not told by the leader) exits on the first.
SCRIPT = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    role, out = sys.argv[1], sys.argv[2]
    def note(*_):
        with open(f"{out}/{role}.log", "a") as f:
            f.write("TERM\\n")
        if role == "child":
            sys.exit(0)
    signal.signal(signal.SIGTERM, note)
    if role == "leader":
        subprocess.Popen([sys.executable, __file__, "child", out])
        open(f"{out}/ready", "w").close()
    while True:
        time.sleep(0.05)
    """
)


class Stubborn(stack.Service):
    name = "stubborn"
    stop_timeout = 0.5

    def __init__(self, state_dir):
        super().__init__(state_dir)
        self.script = self.state_dir / "stubborn.py"

    def prepare(self) -> None:
        self.script.write_text(SCRIPT)

    def command(self) -> list:
        return [sys.executable, self.script, "leader", self.state_dir]

    def healthy(self) -> bool:
        return (self.state_dir / "ready").exists() and len(self.processes()) == 2


def test_what_outlives_its_sigterm_is_killed_and_the_rest_get_one_sigterm(tmp_path):
    svc = Stubborn(tmp_path)
    assert svc.start(timeout=30)
    procs = svc.processes()
    assert len(procs) == 2
    try:
        stopped = svc.stop()
    finally:
        for p in procs:  # never leave the stand-in behind, whatever stop did
            stack.send_signal(p, signal.SIGKILL)
    assert stopped == sorted(p.pid for p in procs)
    assert not [p for p in procs if stack.alive(p)]
    # the leader had its SIGTERM first and ignored it: SIGKILL next, no second SIGTERM
    assert (tmp_path / "leader.log").read_text() == "TERM\n"
    # the child, which the leader never stopped, got exactly one SIGTERM, and exited on it
    assert (tmp_path / "child.log").read_text() == "TERM\n"
    assert not svc.pid_path.exists()
